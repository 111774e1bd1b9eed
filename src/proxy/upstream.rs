//! The pooled client that carries requests to upstreams, over plain TCP or verified TLS.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::config::ProxySettings;
use crate::egress::{Egress, EgressConnector};

pub type Client = hyper_util::client::legacy::Client<HttpsConnector<EgressConnector>, ProxyBody>;

/// How long an idle upstream connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One client for the whole process: connections are pooled per upstream, HTTP/2 is used when
/// the upstream offers it through ALPN, redirects are never followed (the client has no such
/// feature: a 3xx goes back to the application as it is).
pub fn client(
    tls: Arc<rustls::ClientConfig>,
    settings: &ProxySettings,
    egress: Arc<Egress>,
    protocols: Protocols,
) -> Client {
    // Every connection is dialled through the egress policy (resolved addresses checked).
    let http = EgressConnector { egress, timeout: settings.upstream_timeout };
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls).clone()).https_or_http();
    let connector = match protocols {
        Protocols::Http1AndHttp2 => builder.enable_http1().enable_http2().wrap_connector(http),
        Protocols::Http1Only => builder.enable_http1().wrap_connector(http),
    };
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(settings.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// What an upstream connection may speak (offered through ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    Http1AndHttp2,
    /// For upgrades (WebSocket), which HTTP/2 here cannot carry.
    Http1Only,
}

/// A one-line reason from a client error and its causes ("connection refused", "invalid peer
/// certificate: UnknownIssuer"). Errors from the client never carry request headers.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    if parts.is_empty() { e.to_string() } else { parts.join(": ") }
}
