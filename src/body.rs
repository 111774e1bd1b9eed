//! The body type on both sides of the proxy, shared by every module that makes or relays a
//! response: streamed, never collected whole.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body that is all there in memory.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// A whole response: `status`, `bytes`, and their content type.
pub fn response(
    status: http::StatusCode,
    bytes: impl Into<Bytes>,
    content_type: &'static str,
) -> http::Response<ProxyBody> {
    let mut response = http::Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

/// A JSON response serialised straight from `value`: a `/tokens` of many accounts never becomes a
/// tree of `serde_json::Value`s first.
pub fn json(status: http::StatusCode, value: &impl serde::Serialize) -> http::Response<ProxyBody> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = response(status, body, "application/json");
    // A browser must never render an answer that echoes a name as anything but JSON.
    response
        .headers_mut()
        .insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
    response
}
