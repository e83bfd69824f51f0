//! Small helpers every test file uses to wait on state and to explain a failed command.

use std::process::Output;
use std::time::Duration;

/// How long a test waits for output that should come promptly.
pub const PROMPT: Duration = Duration::from_secs(30);

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command's status and output, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Polls `condition` every 20 ms for up to 30 s; tests wait on observable state, never on sleeps.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..1500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}
