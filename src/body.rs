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
