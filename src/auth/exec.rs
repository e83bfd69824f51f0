//! A credential from a command, the way kubectl's exec plugins work: the command prints a
//! `client.authentication.k8s.io/v1` `ExecCredential` (token and expirationTimestamp), or just
//! a token. Wrapped in [`Refreshing`](super::refresh::Refreshing), it is re-run ahead of
//! expiry, and a failing run never ends the session while the current token is valid.

use crate::tunnel::http::error_chain;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;
use tokio::time::Instant;

use super::refresh::{ExpiringToken, FetchFuture, TokenFetcher};
use super::CredentialError;
use crate::secret::Secret;

/// A run slower than this is treated as failed (and retried with backoff).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a bare token (no expiry given) is used before the command runs again.
pub const BARE_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);

pub struct TokenCommand {
    program: Program,
}

/// What runs: a shell line (`--token-command`), or a kubeconfig exec plugin as kubectl runs it.
enum Program {
    Shell(String),
    Plugin {
        command: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        /// `KUBERNETES_EXEC_INFO`: the ExecCredential request kubectl hands its plugins.
        exec_info: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecCredential {
    kind: Option<String>,
    status: Option<ExecStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecStatus {
    token: Option<String>,
    expiration_timestamp: Option<String>,
}

impl TokenCommand {
    pub fn new(command: impl Into<String>) -> Self {
        TokenCommand {
            program: Program::Shell(command.into()),
        }
    }

    /// A kubeconfig `users[].user.exec` plugin, run the way kubectl runs it (non-interactive:
    /// nobody is there to answer a prompt).
    pub fn plugin(exec: &kube::config::ExecConfig) -> Option<Self> {
        let command = exec.command.clone().filter(|c| !c.is_empty())?;
        let api_version = exec
            .api_version
            .clone()
            .unwrap_or_else(|| "client.authentication.k8s.io/v1".into());
        let env = exec
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.get("name")?.clone(), e.get("value")?.clone())))
            .collect();
        let exec_info = serde_json::json!({
            "apiVersion": api_version,
            "kind": "ExecCredential",
            "spec": {"interactive": false},
        })
        .to_string();
        Some(TokenCommand {
            program: Program::Plugin {
                command,
                args: exec.args.clone().unwrap_or_default(),
                env,
                exec_info,
            },
        })
    }

    fn fail(&self, reason: impl Into<super::BoxError>) -> CredentialError {
        CredentialError::unavailable(self.describe(), reason)
    }

    async fn run(&self) -> Result<ExpiringToken, CredentialError> {
        let mut command = match &self.program {
            Program::Shell(line) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(line);
                c
            }
            Program::Plugin {
                command,
                args,
                env,
                exec_info,
            } => {
                let mut c = Command::new(command);
                c.args(args)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("KUBERNETES_EXEC_INFO", exec_info);
                c
            }
        };
        let output = command
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(RUN_TIMEOUT, output)
            .await
            .map_err(|_| self.fail(format!("did not finish within {}s", RUN_TIMEOUT.as_secs())))?
            .map_err(|e| self.fail(format!("cannot run it: {}", error_chain(&e))))?;
        if !output.status.success() {
            // The tail of stderr says why; stdout is never shown, it may hold a token.
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(self.fail(format!("exited with {}: {tail}", output.status)));
        }
        let stdout = String::from_utf8(output.stdout)
            .map_err(|_| self.fail("printed something that is not UTF-8"))?;
        parse_output(
            stdout.trim(),
            Instant::now(),
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|reason| self.fail(reason))
    }
}

/// A token and its expiry from the command's output.
fn parse_output(
    stdout: &str,
    now: Instant,
    wall_now: time::OffsetDateTime,
) -> Result<ExpiringToken, String> {
    if stdout.is_empty() {
        return Err("printed nothing; it must print a token or an ExecCredential".into());
    }
    if !stdout.starts_with('{') {
        if stdout.contains(char::is_whitespace) {
            return Err(
                "printed several words; it must print just the token, or an ExecCredential".into(),
            );
        }
        return Ok(ExpiringToken {
            token: Secret::new(stdout),
            issued_at: now,
            expires_at: now + BARE_TOKEN_LIFETIME,
        });
    }
    let cred: ExecCredential = serde_json::from_str(stdout)
        .map_err(|e| format!("printed JSON that is not an ExecCredential: {e}"))?;
    if cred.kind.as_deref().is_some_and(|k| k != "ExecCredential") {
        return Err("printed JSON whose kind is not ExecCredential".into());
    }
    let status = cred.status.ok_or("ExecCredential has no status")?;
    let token = status
        .token
        .filter(|t| !t.is_empty())
        .ok_or("ExecCredential has no status.token")?;
    let expires_at = match status.expiration_timestamp {
        None => now + BARE_TOKEN_LIFETIME,
        Some(ts) => {
            let at =
                time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| format!("status.expirationTimestamp {ts:?} is not RFC 3339"))?;
            let left = (at - wall_now).whole_seconds();
            if left <= 0 {
                return Err(format!("the token it printed already expired at {ts}"));
            }
            now + Duration::from_secs(left as u64).min(super::refresh::MAX_LIFETIME)
        }
    };
    Ok(ExpiringToken {
        token: Secret::new(token),
        issued_at: now,
        expires_at,
    })
}

impl TokenFetcher for TokenCommand {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.run())
    }

    fn describe(&self) -> String {
        match &self.program {
            Program::Shell(_) => "--token-command".into(),
            Program::Plugin { command, .. } => format!("the kubeconfig's exec plugin {command}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exec_credentials_and_bare_tokens() {
        let now = Instant::now();
        let wall = time::macros::datetime!(2026-11-23 12:00 UTC);
        let json = r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"abc","expirationTimestamp":"2026-11-23T13:00:00Z"}}"#;
        let t = parse_output(json, now, wall).unwrap();
        assert_eq!(t.token.expose(), "abc");
        assert_eq!(t.expires_at - now, Duration::from_secs(3600));
        let bare = parse_output("xyz", now, wall).unwrap();
        assert_eq!(bare.expires_at - now, BARE_TOKEN_LIFETIME);
        let expired = r#"{"kind":"ExecCredential","status":{"token":"a","expirationTimestamp":"2026-11-23T11:00:00Z"}}"#;
        assert!(parse_output(expired, now, wall)
            .unwrap_err()
            .contains("already expired"));
        assert!(parse_output("", now, wall).is_err());
        assert!(parse_output("two words", now, wall).is_err());
        assert!(
            parse_output(r#"{"kind":"ExecCredential","status":{}}"#, now, wall)
                .unwrap_err()
                .contains("status.token")
        );
    }

    #[tokio::test]
    async fn a_failing_command_is_reported_without_its_stdout() {
        let cmd = TokenCommand::new("echo secret-token-value; echo 'login required' >&2; exit 3");
        let err = error_chain(&cmd.run().await.unwrap_err());
        assert!(
            err.contains("login required") && err.contains("--token-command"),
            "{err}"
        );
        assert!(!err.contains("secret-token-value"), "{err}");
        let ok = TokenCommand::new("echo tok123").run().await.unwrap();
        assert_eq!(ok.token.expose(), "tok123");
    }

    #[tokio::test]
    async fn a_kubeconfig_exec_plugin_runs_with_its_args_env_and_exec_info() {
        let exec: kube::config::ExecConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "sh",
            "args": ["-c", "echo \"$KUBERNETES_EXEC_INFO\" | grep -q '\"interactive\":false' && echo \"$TOKEN_FOR_TEST\""],
            "env": [{"name": "TOKEN_FOR_TEST", "value": "plugin-token"}],
        }))
        .unwrap();
        let plugin = TokenCommand::plugin(&exec).expect("a plugin with a command");
        assert_eq!(plugin.run().await.unwrap().token.expose(), "plugin-token");
        assert_eq!(plugin.describe(), "the kubeconfig's exec plugin sh");
        let none: kube::config::ExecConfig =
            serde_json::from_value(serde_json::json!({"apiVersion": "v1"})).unwrap();
        assert!(TokenCommand::plugin(&none).is_none());
    }
}
