//! Rotation, as `enableSecretRotation` does it: the sync pass repeated every poll interval until
//! shutdown. A pass that fails (Key Vault or the apiserver briefly unreachable) is logged and
//! the next interval tries again; files and Secrets keep their last good content meanwhile.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::sync::Syncer;
use crate::tunnel::http::error_chain;

/// Runs passes every `interval` until `shutdown`; the first pass is the caller's.
pub async fn run(syncer: &mut Syncer, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match syncer.pass().await {
            Ok(report) => {
                tracing::debug!(
                    rotated = report.rotated.len(),
                    kept = report.kept.len(),
                    files_written = report.files_written.len(),
                    "rotation pass done"
                );
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), retry_in_s = interval.as_secs(), "rotation pass failed; keeping the last good content");
            }
        }
    }
}
