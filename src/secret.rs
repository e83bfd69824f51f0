//! A string that must never reach a log line: tokens, keys, local credentials.

use std::fmt;

/// Holds a secret value; `Debug` and `Display` print `***` so a stray `{:?}` cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality, for comparing a presented credential with the expected one.
    pub fn ct_eq(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// Caller-supplied text quoted in an error, cut to `max` characters: an error must not grow
/// with hostile input (a 16 MiB field must not become a 16 MiB log line or response).
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn compares_in_constant_time_but_correctly() {
        let s = Secret::new("abc");
        assert!(s.ct_eq(b"abc"));
        assert!(!s.ct_eq(b"abd"));
        assert!(!s.ct_eq(b"ab"));
    }

    #[test]
    fn clip_cuts_long_text_on_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc...");
        assert_eq!(clip("ééééé", 2), "éé...");
    }
}
