//! The Azure CLI's signed-in account: `az account get-access-token`, run directly (no shell) and
//! killed if it takes longer than 30 seconds. The CLI caches and refreshes its own tokens, so
//! each renewal is one cheap local run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use super::source::{ChainOptions, Environment, Source, SourceFuture, SourceKind};
use super::SourceError;
use crate::auth::refresh::ExpiringToken;
use crate::secret::Secret;
use crate::tunnel::sas::unix_now;

/// A CLI run slower than this is treated as failed (az can stall on a proxy or a prompt).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// When an old CLI gives only `expiresOn` in local time, which this process cannot convert
/// reliably: az never hands out a token with less than five minutes left, so this is safe, and
/// renewal half way through keeps it fresh.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(5 * 60);

pub struct AzureCli {
    az: PathBuf,
    resource: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CliToken {
    access_token: String,
    /// Epoch seconds; az 2.54 and later.
    #[serde(default, rename = "expires_on")]
    expires_on: Option<serde_json::Value>,
}

impl AzureCli {
    pub fn from_env(env: &Environment, opts: &ChainOptions) -> Result<Self, SourceError> {
        let az = find_az(env.path.as_ref())
            .ok_or_else(|| SourceError::NotConfigured("`az` is not on PATH".into()))?;
        Ok(AzureCli {
            az,
            resource: opts.server_app_id.clone(),
            tenant: opts.tenant.clone().or_else(|| env.tenant_id.clone()),
        })
    }

    async fn get(&self) -> Result<ExpiringToken, SourceError> {
        let mut cmd = Command::new(&self.az);
        cmd.args([
            "account",
            "get-access-token",
            "--resource",
            &self.resource,
            "--output",
            "json",
        ]);
        if let Some(tenant) = &self.tenant {
            cmd.args(["--tenant", tenant]);
        }
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let output = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .map_err(|_| {
                SourceError::Failed(
                    format!(
                        "`az account get-access-token` did not finish within {}s",
                        RUN_TIMEOUT.as_secs()
                    )
                    .into(),
                )
            })?
            .map_err(|e| {
                SourceError::Failed(super::Reason::new(
                    format!("cannot run {}", self.az.display()),
                    e,
                ))
            })?;
        if !output.status.success() {
            // stdout is never shown; stderr says why (az writes no token there).
            let why = shorten_stderr(&String::from_utf8_lossy(&output.stderr));
            let reason = format!("`az account get-access-token` failed: {why}");
            // Not signed in is "this source is not set up here", as azure-identity treats it.
            return Err(
                if why.contains("az login") || why.contains("az account set") {
                    SourceError::Unavailable(reason.into())
                } else {
                    SourceError::Failed(reason.into())
                },
            );
        }
        parse_output(&output.stdout, unix_now()).map_err(|r| SourceError::Failed(r.into()))
    }
}

impl Source for AzureCli {
    fn kind(&self) -> SourceKind {
        SourceKind::AzureCli
    }

    fn attempt(&self) -> SourceFuture<'_> {
        Box::pin(self.get())
    }
}

/// `az` (or `az.cmd` on Windows) in one of PATH's directories.
pub fn find_az(path: Option<&OsString>) -> Option<PathBuf> {
    let names: &[&str] = if cfg!(windows) {
        &["az.cmd", "az.exe", "az.bat"]
    } else {
        &["az"]
    };
    std::env::split_paths(path?)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// The error lines of az's stderr (it also prints warnings), cut to a readable length.
fn shorten_stderr(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ERROR:") || l.contains("az login"))
        .collect();
    let text = if errors.is_empty() {
        stderr.trim().lines().collect::<Vec<_>>().join(" ")
    } else {
        errors.join(" ")
    };
    let text = text.trim_start_matches("ERROR:").trim();
    if text.is_empty() {
        return "no error message (exit status only)".into();
    }
    match text.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

fn parse_output(stdout: &[u8], now: u64) -> Result<ExpiringToken, String> {
    let parsed: CliToken = serde_json::from_slice(stdout).map_err(|e| {
        format!(
            "`az account get-access-token` printed something that is not its JSON ({:?} at line {} column {}); is az up to date?",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    if parsed.access_token.is_empty() {
        return Err("`az account get-access-token` printed an empty accessToken".into());
    }
    let expires_on = match parsed.expires_on {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let lifetime = match expires_on {
        Some(at) if at > now => Duration::from_secs(at - now),
        Some(_) => return Err("`az account get-access-token` returned an expired token; run `az account get-access-token` yourself to see why".into()),
        None => ASSUMED_LIFETIME,
    };
    Ok(ExpiringToken::new(
        Secret::new(parsed.access_token),
        lifetime,
    ))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::entra::test_server::options;

    /// A fake `az` that prints `stdout`/`stderr` and exits with `code`; it records its
    /// arguments next to itself.
    pub(crate) fn fake_az(dir: &Path, stdout: &str, stderr: &str, code: i32) {
        std::fs::write(dir.join("stdout"), stdout).unwrap();
        std::fs::write(dir.join("stderr"), stderr).unwrap();
        let d = dir.display();
        let script = format!(
            "#!/bin/sh\necho \"$@\" > '{d}/args'\ncat '{d}/stdout'\ncat '{d}/stderr' >&2\nexit {code}\n"
        );
        let path = dir.join("az");
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn a_fake_az_on_the_environments_path_gives_the_token_and_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let expires = unix_now() + 1800;
        fake_az(
            dir.path(),
            &format!(
                r#"{{"accessToken":"cli-token","expiresOn":"2030-01-01 10:00:00.000000","expires_on":{expires},"tokenType":"Bearer"}}"#
            ),
            "WARNING: something harmless",
            0,
        );
        let env = Environment {
            path: Some(dir.path().as_os_str().to_owned()),
            tenant_id: Some("tenant-x".into()),
            ..Environment::default()
        };
        let source = AzureCli::from_env(&env, &options("http://unused")).unwrap();
        let token = source.get().await.unwrap();
        assert_eq!(token.token.expose(), "cli-token");
        let lifetime = (token.expires_at - token.issued_at).as_secs();
        assert!((1790..=1800).contains(&lifetime), "{lifetime}");
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(
            args.trim(),
            format!(
                "account get-access-token --resource {} --output json --tenant tenant-x",
                crate::entra::ARC_SERVER_APP_ID
            )
        );
    }

    #[tokio::test]
    async fn not_signed_in_is_unavailable_and_says_so_and_absent_az_is_not_configured() {
        let dir = tempfile::tempdir().unwrap();
        fake_az(
            dir.path(),
            "",
            "ERROR: Please run 'az login' to setup account.",
            1,
        );
        let mut env = Environment {
            path: Some(dir.path().as_os_str().to_owned()),
            ..Environment::default()
        };
        let source = AzureCli::from_env(&env, &options("http://unused")).unwrap();
        let err = source.get().await.unwrap_err();
        assert!(matches!(err, SourceError::Unavailable(_)), "{err:?}");
        assert_eq!(
            err.reason(),
            "`az account get-access-token` failed: Please run 'az login' to setup account."
        );
        let empty = tempfile::tempdir().unwrap();
        env.path = Some(empty.path().as_os_str().to_owned());
        assert!(matches!(
            AzureCli::from_env(&env, &options("http://unused")),
            Err(SourceError::NotConfigured(_))
        ));
    }

    #[test]
    fn old_clis_without_expires_on_get_a_short_assumed_lifetime() {
        let t = parse_output(
            br#"{"accessToken":"a","expiresOn":"2030-01-01 10:00:00.000000"}"#,
            1_000,
        )
        .unwrap();
        assert_eq!(t.expires_at - t.issued_at, ASSUMED_LIFETIME);
        let t = parse_output(br#"{"accessToken":"a","expires_on":"4600"}"#, 1_000).unwrap();
        assert_eq!(t.expires_at - t.issued_at, Duration::from_secs(3600));
        let err = parse_output(b"not json sekrit", 0).unwrap_err();
        assert!(!err.contains("sekrit"), "{err}");
    }
}
