//! Writing the proxy's context into a kubeconfig without disturbing anything else in it:
//! one cluster, one user and one context named after the connection are added or replaced,
//! every other entry is kept as it was, and the file is replaced atomically with mode 0600.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_norway::{Mapping, Value};

use crate::secret::Secret;

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
    #[error("cannot write kubeconfig {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        format!("clusterconnect-{}", self.name)
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

/// Returns `existing` (a kubeconfig document, possibly empty) with `entry` merged in.
pub fn merge(
    existing: &str,
    entry: &Entry,
    set_current: bool,
    path: &Path,
) -> Result<String, KubeconfigError> {
    let mut doc: Value = if existing.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_norway::from_str(existing).map_err(|source| KubeconfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?
    };
    let Value::Mapping(root) = &mut doc else {
        return Err(KubeconfigError::Shape {
            path: path.to_path_buf(),
            field: "the document",
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
        yaml_map(&[
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
        yaml_map(&[("token", entry.token.expose())]),
        path,
    )?;
    upsert(
        root,
        "contexts",
        entry.name,
        "context",
        yaml_map(&[("cluster", entry.name), ("user", &user)]),
        path,
    )?;
    if set_current {
        root.insert("current-context".into(), entry.name.into());
    }
    if !root.contains_key("preferences") {
        root.insert("preferences".into(), Value::Mapping(Mapping::new()));
    }
    serde_norway::to_string(&doc).map_err(|source| KubeconfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn yaml_map(pairs: &[(&str, &str)]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert((*k).into(), (*v).into());
    }
    Value::Mapping(m)
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

/// Merges `entry` into the kubeconfig at `path` (created if absent) and replaces the file
/// atomically: a crash mid-write leaves the old file, never half a file.
pub fn write(path: &Path, entry: &Entry, set_current: bool) -> Result<(), KubeconfigError> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(KubeconfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let merged = merge(&existing, entry, set_current, path)?;
    write_private(path, merged.as_bytes())
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KubeconfigError> {
    crate::files::write_private(path, bytes).map_err(|source| KubeconfigError::Write {
        path: path.to_path_buf(),
        source,
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

    fn entry(token: &Secret) -> Entry<'_> {
        Entry {
            name: "edge",
            server: "https://127.0.0.1:47011",
            ca_pem: "PEM",
            token,
        }
    }

    #[test]
    fn merge_keeps_unrelated_entries_and_replaces_its_own() {
        let token = Secret::new("local-secret");
        let path = Path::new("config");
        let once = merge(EXISTING, &entry(&token), true, path).unwrap();
        let twice = merge(&once, &entry(&token), true, path).unwrap();
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
        let kept = merge(EXISTING, &entry(&token), false, path).unwrap();
        let kept: Value = serde_norway::from_str(&kept).unwrap();
        assert_eq!(kept["current-context"], "prod");
    }

    #[test]
    fn broken_yaml_is_reported_not_overwritten() {
        let err = merge(
            "clusters: [unclosed",
            &entry(&Secret::new("t")),
            true,
            Path::new("/x/config"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/x/config"), "{err}");
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
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
