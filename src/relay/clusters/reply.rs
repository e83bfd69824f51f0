//! The management API's answers: JSON bodies and empty ones, always whole.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

/// The relay answers with whole bodies.
pub type Body = Full<Bytes>;

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// 200 when the request changed something, 204 when there was nothing to change.
pub fn changed(changed: bool) -> Response<Body> {
    empty(if changed {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    })
}
