//! The body type on both sides of the proxy, shared by every module that makes or relays a
//! response: streamed, never collected whole.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;
