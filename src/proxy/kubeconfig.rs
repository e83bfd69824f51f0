//! Writing the proxy's context into a kubeconfig without disturbing anything else in it:
//! one cluster, one user and one context named after the connection are added or replaced,
//! every other entry is kept as it was, and the file is replaced atomically with mode 0600.
//!
//! The read-modify-write happens under kubectl's own lock (`<file>.lock`, see
//! [`crate::files::LockFile`]), so kubectl and clusterconnect never lose each other's
//! changes. A symlinked kubeconfig is updated at its target. Entries clusterconnect writes
//! carry an `extensions` entry named [`MARKER`] (kubeconfig's schema allows extensions on
//! clusters, users and contexts, and kubectl keeps them when it rewrites the file); a
//! same-name entry without it belongs to someone else and is only replaced when asked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_norway::{Mapping, Value};

use crate::files::{self, LockError, LockFile};
use crate::secret::Secret;

/// The name of the extension that marks a cluster, user or context as written by clusterconnect.
pub const MARKER: &str = "clusterconnect";

/// How long a write waits for another writer's `<file>.lock`: kubectl holds it for
/// milliseconds, so seconds of waiting means a stale lock from a killed process.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The flag that lets [`write_many`] replace entries clusterconnect did not write.
pub const OVERWRITE_FLAG: &str = "--overwrite-context";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read kubeconfig {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kubeconfig {path} is not valid YAML; fix or move it, or pass --file to write elsewhere"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    #[error("kubeconfig {path}: '{field}' must be a list")]
    Shape { path: PathBuf, field: &'static str },
    #[error("{path} is not a kubeconfig (its content is not a mapping of clusters, users and contexts); fix or move it, or write elsewhere with --file")]
    NotAMapping { path: PathBuf },
    #[error(
        "kubeconfig {path} already has {} that clusterconnect did not write, so context \
         '{context}' cannot be added; pass {OVERWRITE_FLAG} to replace {}, or --file to write \
         elsewhere",
        describe(entries), if entries.len() == 1 { "it" } else { "them" }
    )]
    Foreign {
        path: PathBuf,
        context: String,
        entries: Vec<Foreign>,
    },
    #[error(
        "kubeconfig {path} is locked: {lock} exists, so another kubectl or clusterconnect is \
         writing it (waited {}s); if none is, remove {lock}",
        waited.as_secs_f32().round()
    )]
    Locked {
        path: PathBuf,
        lock: PathBuf,
        waited: Duration,
    },
    #[error("cannot lock kubeconfig {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: LockError,
    },
    #[error("cannot write kubeconfig {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A same-name entry of one of the kubeconfig's lists that clusterconnect did not write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// `context`, `cluster` or `user`.
    pub kind: &'static str,
    pub name: String,
}

fn describe(entries: &[Foreign]) -> String {
    let mut parts: Vec<String> = entries
        .iter()
        .map(|f| format!("a {} named '{}'", f.kind, f.name))
        .collect();
    match parts.pop() {
        Some(last) if !parts.is_empty() => format!("{} and {last}", parts.join(", ")),
        last => last.unwrap_or_default(),
    }
}

/// What the proxy writes for one connection.
pub struct Entry<'a> {
    pub name: &'a str,
    pub server: &'a str,
    pub ca_pem: &'a str,
    pub token: &'a Secret,
}

impl Entry<'_> {
    pub fn user_name(&self) -> String {
        user_name(self.name)
    }
}

fn user_name(context: &str) -> String {
    format!("clusterconnect-{context}")
}

/// How [`merge`] and [`write_many`] treat the document.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Make the (first) entry the current context.
    pub set_current: bool,
    /// Replace same-name entries clusterconnect did not write instead of refusing.
    pub overwrite: bool,
    /// How long to wait for `<file>.lock`.
    pub lock_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            set_current: true,
            overwrite: false,
            lock_wait: LOCK_WAIT,
        }
    }
}

/// `$KUBECONFIG`'s first file, else `~/.kube/config`, as kubectl picks the file it writes.
pub fn default_path() -> PathBuf {
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
    {
        return first;
    }
    home_dir().join(".kube").join("config")
}

pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn parse(existing: &str, path: &Path) -> Result<Value, KubeconfigError> {
    if existing.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    serde_norway::from_str(existing).map_err(|source| KubeconfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Returns `existing` (a kubeconfig document, possibly empty) with `entry` merged in; refuses
/// to replace a same-name entry clusterconnect did not write unless `options.overwrite`.
pub fn merge(
    existing: &str,
    entry: &Entry,
    options: &Options,
    path: &Path,
) -> Result<String, KubeconfigError> {
    let mut doc = parse(existing, path)?;
    merge_into(&mut doc, entry, options, path)?;
    serde_norway::to_string(&doc).map_err(|source| KubeconfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn merge_into(
    doc: &mut Value,
    entry: &Entry,
    options: &Options,
    path: &Path,
) -> Result<(), KubeconfigError> {
    if !options.overwrite {
        let entries = foreign_in(doc, entry.name);
        if !entries.is_empty() {
            return Err(KubeconfigError::Foreign {
                path: path.to_path_buf(),
                context: entry.name.to_string(),
                entries,
            });
        }
    }
    let Value::Mapping(root) = doc else {
        return Err(KubeconfigError::NotAMapping {
            path: path.to_path_buf(),
        });
    };
    root.entry("apiVersion".into()).or_insert("v1".into());
    root.entry("kind".into()).or_insert("Config".into());

    let ca = base64::engine::general_purpose::STANDARD.encode(entry.ca_pem);
    let user = entry.user_name();
    upsert(
        root,
        "clusters",
        entry.name,
        "cluster",
        marked(&[
            ("server", entry.server),
            ("certificate-authority-data", &ca),
        ]),
        path,
    )?;
    upsert(
        root,
        "users",
        &user,
        "user",
        marked(&[("token", entry.token.expose())]),
        path,
    )?;
    upsert(
        root,
        "contexts",
        entry.name,
        "context",
        marked(&[("cluster", entry.name), ("user", &user)]),
        path,
    )?;
    if options.set_current {
        root.insert("current-context".into(), entry.name.into());
    }
    if !root.contains_key("preferences") {
        root.insert("preferences".into(), Value::Mapping(Mapping::new()));
    }
    Ok(())
}

/// A cluster, user or context body with `pairs` and the clusterconnect extension.
fn marked(pairs: &[(&str, &str)]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert((*k).into(), (*v).into());
    }
    let mut extension = Mapping::new();
    extension.insert(
        "note".into(),
        "written by clusterconnect proxy; replaced on each start".into(),
    );
    let mut named = Mapping::new();
    named.insert("name".into(), MARKER.into());
    named.insert("extension".into(), Value::Mapping(extension));
    m.insert(
        "extensions".into(),
        Value::Sequence(vec![Value::Mapping(named)]),
    );
    Value::Mapping(m)
}

/// The entries named like `context`'s (its cluster, `clusterconnect-<context>` user and the
/// context) that exist in `doc` and that clusterconnect did not write.
pub fn foreign_in(doc: &Value, context: &str) -> Vec<Foreign> {
    let user = user_name(context);
    [
        ("contexts", "context", context),
        ("clusters", "cluster", context),
        ("users", "user", user.as_str()),
    ]
    .into_iter()
    .filter_map(|(field, kind, name)| {
        let body = find(doc, field, name)?.get(kind).unwrap_or(&Value::Null);
        (!is_ours(kind, body, context)).then(|| Foreign {
            kind,
            name: name.to_string(),
        })
    })
    .collect()
}

fn find<'d>(doc: &'d Value, field: &str, name: &str) -> Option<&'d Value> {
    doc.get(field)?
        .as_sequence()?
        .iter()
        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
}

/// Whether a cluster, user or context body was written by clusterconnect: it carries the
/// marker, or (written before the marker existed) it has exactly the shape the proxy wrote.
fn is_ours(kind: &str, body: &Value, context: &str) -> bool {
    let marked = body
        .get("extensions")
        .and_then(Value::as_sequence)
        .is_some_and(|list| {
            list.iter()
                .any(|e| e.get("name").and_then(Value::as_str) == Some(MARKER))
        });
    if marked {
        return true;
    }
    let Some(map) = body.as_mapping() else {
        return false;
    };
    let keys: Vec<&str> = map.keys().filter_map(Value::as_str).collect();
    let str_of = |k: &str| body.get(k).and_then(Value::as_str);
    match kind {
        "cluster" => {
            let server_is_ours = str_of("server")
                .and_then(|s| s.strip_prefix("https://127.0.0.1:"))
                .and_then(|s| s.split_once('/'))
                .is_some_and(|(port, rest)| {
                    port.parse::<u16>().is_ok()
                        && format!("/{rest}") == format!("{}{context}", super::CLUSTER_PREFIX)
                });
            server_is_ours && keys.len() == 2 && keys.contains(&"certificate-authority-data")
        }
        "user" => keys == ["token"],
        "context" => {
            keys.len() == 2
                && str_of("cluster") == Some(context)
                && str_of("user") == Some(user_name(context).as_str())
        }
        _ => false,
    }
}

/// Replaces the named entry of list `field` in place (keeping its position), or appends it.
fn upsert(
    root: &mut Mapping,
    field: &'static str,
    name: &str,
    kind: &str,
    body: Value,
    path: &Path,
) -> Result<(), KubeconfigError> {
    let list = root
        .entry(field.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if list.is_null() {
        *list = Value::Sequence(Vec::new());
    }
    let Value::Sequence(items) = list else {
        return Err(KubeconfigError::Shape {
            path: path.to_path_buf(),
            field,
        });
    };
    let mut item = Mapping::new();
    item.insert("name".into(), name.into());
    item.insert(kind.into(), body);
    match items
        .iter_mut()
        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
    {
        Some(existing) => *existing = Value::Mapping(item),
        None => items.push(Value::Mapping(item)),
    }
    Ok(())
}

/// Merges `entry` into the kubeconfig at `path` (created if absent); see [`write_many`].
/// Same-name entries clusterconnect did not write are refused.
pub fn write(path: &Path, entry: &Entry, set_current: bool) -> Result<(), KubeconfigError> {
    let options = Options {
        set_current,
        ..Options::default()
    };
    write_many(path, std::slice::from_ref(entry), &options)
}

/// Merges `entries` into the kubeconfig at `path` (created if absent) under its lock, the first
/// becoming current when `options.set_current`, and replaces the file atomically: a crash
/// mid-write leaves the old file, never half a file. A symlink at `path` is followed and its
/// target written, so the link stays a link. Nothing is written when any entry is refused.
pub fn write_many(
    path: &Path,
    entries: &[Entry],
    options: &Options,
) -> Result<(), KubeconfigError> {
    let real = files::resolve_symlinks(path).map_err(|source| KubeconfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // kubectl locks the name it was given: the link's lock keeps out a kubectl pointed at the
    // link, the target's lock one pointed at the target. Always link first, so two
    // clusterconnects never wait on each other in opposite order.
    let _link_lock = if real != path {
        Some(lock(path, options.lock_wait)?)
    } else {
        None
    };
    let _lock = lock(&real, options.lock_wait)?;
    let existing = read_existing(&real)?;
    let mut doc = parse(&existing, &real)?;
    for (i, entry) in entries.iter().enumerate() {
        let each = Options {
            set_current: options.set_current && i == 0,
            ..*options
        };
        merge_into(&mut doc, entry, &each, &real)?;
    }
    let merged = serde_norway::to_string(&doc).map_err(|source| KubeconfigError::Parse {
        path: real.clone(),
        source,
    })?;
    files::write_private(&real, merged.as_bytes())
        .map_err(|source| KubeconfigError::Write { path: real, source })
}

/// Refuses early, before anything is started, when the kubeconfig at `path` holds an entry
/// for one of `contexts` that clusterconnect did not write. [`write_many`] checks again
/// under the lock.
pub fn check_foreign(path: &Path, contexts: &[String]) -> Result<(), KubeconfigError> {
    let real = files::resolve_symlinks(path).map_err(|source| KubeconfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let doc = parse(&read_existing(&real)?, &real)?;
    for context in contexts {
        let entries = foreign_in(&doc, context);
        if !entries.is_empty() {
            return Err(KubeconfigError::Foreign {
                path: real,
                context: context.clone(),
                entries,
            });
        }
    }
    Ok(())
}

fn read_existing(path: &Path) -> Result<String, KubeconfigError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(KubeconfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn lock(path: &Path, wait: Duration) -> Result<LockFile, KubeconfigError> {
    LockFile::acquire(path, wait).map_err(|e| match e {
        LockError::Busy { lock, waited } => KubeconfigError::Locked {
            path: path.to_path_buf(),
            lock,
            waited,
        },
        source => KubeconfigError::Lock {
            path: path.to_path_buf(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXISTING: &str = "apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: https://prod.example.com:6443
    certificate-authority-data: QUJD
users:
- name: prod-admin
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZ
contexts:
- name: prod
  context:
    cluster: prod
    user: prod-admin
    namespace: web
current-context: prod
";

    /// What the proxy wrote before entries carried the marker.
    const LEGACY: &str = "apiVersion: v1
kind: Config
clusters:
- name: edge
  cluster:
    server: https://127.0.0.1:47012/clusters/edge
    certificate-authority-data: UEVN
users:
- name: clusterconnect-edge
  user:
    token: old
contexts:
- name: edge
  context:
    cluster: edge
    user: clusterconnect-edge
current-context: edge
";

    fn entry(token: &Secret) -> Entry<'_> {
        Entry {
            name: "edge",
            server: "https://127.0.0.1:47011/clusters/edge",
            ca_pem: "PEM",
            token,
        }
    }

    fn opts(set_current: bool, overwrite: bool) -> Options {
        Options {
            set_current,
            overwrite,
            ..Options::default()
        }
    }

    #[test]
    fn merge_keeps_unrelated_entries_and_replaces_its_own() {
        let token = Secret::new("local-secret");
        let path = Path::new("config");
        let once = merge(EXISTING, &entry(&token), &opts(true, false), path).unwrap();
        let twice = merge(&once, &entry(&token), &opts(true, false), path).unwrap();
        let before: Value = serde_norway::from_str(EXISTING).unwrap();
        let after: Value = serde_norway::from_str(&twice).unwrap();
        for field in ["clusters", "users", "contexts"] {
            let list = after[field].as_sequence().unwrap();
            assert_eq!(list.len(), 2, "{field} in {twice}");
            assert_eq!(list[0], before[field][0], "{field} entry changed");
        }
        assert_eq!(after["current-context"], "edge");
        assert_eq!(after["users"][1]["user"]["token"], "local-secret");
        assert_eq!(
            after["clusters"][1]["cluster"]["certificate-authority-data"],
            "UEVN"
        );
        for (field, kind) in [
            ("clusters", "cluster"),
            ("users", "user"),
            ("contexts", "context"),
        ] {
            assert_eq!(
                after[field][1][kind]["extensions"][0]["name"], MARKER,
                "{field} not marked"
            );
        }
        let kept = merge(EXISTING, &entry(&token), &opts(false, false), path).unwrap();
        let kept: Value = serde_norway::from_str(&kept).unwrap();
        assert_eq!(kept["current-context"], "prod");
    }

    #[test]
    fn entries_written_before_the_marker_are_ours() {
        let doc: Value = serde_norway::from_str(LEGACY).unwrap();
        assert_eq!(foreign_in(&doc, "edge"), []);
        let merged = merge(
            LEGACY,
            &entry(&Secret::new("new")),
            &opts(true, false),
            Path::new("c"),
        );
        let merged: Value = serde_norway::from_str(&merged.unwrap()).unwrap();
        assert_eq!(merged["users"][0]["user"]["token"], "new");
        assert_eq!(merged["contexts"].as_sequence().unwrap().len(), 1);
    }

    #[test]
    fn a_foreign_same_name_entry_is_refused_unless_overwriting() {
        let foreign = EXISTING.replace("name: prod\n  context", "name: edge\n  context");
        let err = merge(
            &foreign,
            &entry(&Secret::new("t")),
            &opts(true, false),
            Path::new("/k/config"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("a context named 'edge' that"), "{message}");
        assert!(
            message.contains("context 'edge' cannot be added"),
            "{message}"
        );
        assert!(message.contains(OVERWRITE_FLAG), "{message}");
        assert!(message.contains("/k/config"), "{message}");
        let replaced = merge(
            &foreign,
            &entry(&Secret::new("t")),
            &opts(true, true),
            Path::new("c"),
        )
        .unwrap();
        let replaced: Value = serde_norway::from_str(&replaced).unwrap();
        assert_eq!(
            replaced["contexts"][0]["context"]["user"],
            "clusterconnect-edge"
        );
        // Once replaced it is ours: the next run updates it without the flag.
        let again = serde_norway::to_string(&replaced).unwrap();
        merge(
            &again,
            &entry(&Secret::new("t2")),
            &opts(true, false),
            Path::new("c"),
        )
        .unwrap();
    }

    #[test]
    fn lookalikes_that_differ_from_what_the_proxy_writes_are_foreign() {
        let cases = [
            // someone else's cluster called edge
            LEGACY.replace(
                "https://127.0.0.1:47012/clusters/edge",
                "https://edge.example.com",
            ),
            // a user with a client certificate
            LEGACY.replace(
                "    token: old",
                "    token: old\n    client-key-data: S0VZ",
            ),
            // a context pointing elsewhere
            LEGACY.replace("    user: clusterconnect-edge", "    user: admin"),
        ];
        let kinds = ["cluster", "user", "context"];
        for (text, kind) in cases.iter().zip(kinds) {
            let doc: Value = serde_norway::from_str(text).unwrap();
            let found = foreign_in(&doc, "edge");
            assert_eq!(found.len(), 1, "{text}");
            assert_eq!(found[0].kind, kind);
        }
    }

    #[test]
    fn the_message_lists_every_foreign_entry() {
        let f = |kind, name: &str| Foreign {
            kind,
            name: name.into(),
        };
        assert_eq!(describe(&[f("context", "a")]), "a context named 'a'");
        assert_eq!(
            describe(&[
                f("context", "a"),
                f("cluster", "a"),
                f("user", "clusterconnect-a")
            ]),
            "a context named 'a', a cluster named 'a' and a user named 'clusterconnect-a'"
        );
    }

    #[test]
    fn broken_yaml_is_reported_not_overwritten() {
        let err = merge(
            "clusters: [unclosed",
            &entry(&Secret::new("t")),
            &opts(true, false),
            Path::new("/x/config"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/x/config"), "{err}");
        // YAML, but a word or a list rather than a kubeconfig.
        for not_a_kubeconfig in ["hello", "- a\n- b"] {
            let err = merge(
                not_a_kubeconfig,
                &entry(&Secret::new("t")),
                &opts(true, false),
                Path::new("/x/config"),
            )
            .unwrap_err();
            assert!(
                err.to_string().starts_with("/x/config is not a kubeconfig"),
                "{err}"
            );
        }
    }

    #[test]
    fn write_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config");
        write(&path, &entry(&Secret::new("t")), true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file and no lock left behind.
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_refused_entry_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let foreign = EXISTING.replace("name: prod\n  context", "name: edge\n  context");
        std::fs::write(&path, &foreign).unwrap();
        let token = Secret::new("t");
        let other = Entry {
            name: "other",
            ..entry(&token)
        };
        let err = write_many(&path, &[other, entry(&token)], &Options::default()).unwrap_err();
        assert!(matches!(err, KubeconfigError::Foreign { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), foreign);
        assert!(check_foreign(&path, &["edge".into()]).is_err());
        assert!(check_foreign(&path, &["other".into()]).is_ok());
        assert!(!dir.path().join("config.lock").exists());
    }
}
