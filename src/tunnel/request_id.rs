//! One id per kubectl request, across proxy, agent and apiserver: `Audit-ID`, the header the
//! kube-apiserver keeps as the audit id of a request (and returns), so an operator can follow
//! one call from the proxy's log to the agent's to the apiserver's audit log.

use http::{HeaderMap, HeaderValue};

pub const HEADER: &str = "audit-id";

/// The request's id: the caller's `Audit-ID` when it is a plausible id (at most 64 letters,
/// digits, `-`, `_` or `.`), else a fresh UUID, which replaces whatever was there.
pub fn ensure(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| plausible(v))
    {
        return id.to_string();
    }
    let id = uuid::Uuid::new_v4().to_string();
    // A UUID is always a valid header value; were it not, no other id would go on either.
    headers.remove(HEADER);
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(HEADER, value);
    }
    id
}

fn plausible(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_plausible_id_and_replaces_anything_else() {
        let mut h = HeaderMap::new();
        let fresh = ensure(&mut h);
        assert_eq!(h.get(HEADER).unwrap(), fresh.as_str());
        assert_eq!(ensure(&mut h), fresh);
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static("ci-run-42.step_3"));
        assert_eq!(ensure(&mut h), "ci-run-42.step_3");
        for bad in ["has space", "a/b", &"x".repeat(65)] {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_str(bad).unwrap());
            let id = ensure(&mut h);
            assert_ne!(id, bad);
            assert_eq!(h.get(HEADER).unwrap(), id.as_str());
        }
    }
}
