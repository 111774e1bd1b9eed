//! A request's record: its metrics and, when `proxy.access_log` is on, its access log line. Both
//! codecs end every request here.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};

use super::Target;
use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::metrics;
use crate::tokens::{Credential, Provider};

/// A request's start and, when `proxy.access_log` is on, what its access log line will say:
/// method, host in normal form, path without its query. Never a query string, userinfo or a
/// header value. Nothing is copied when the log is off.
pub(crate) struct Access {
    started: Instant,
    line: Option<AccessLine>,
}

struct AccessLine {
    method: Method,
    host: String,
    path: String,
}

/// Marks a response that came from the retry after a refresh.
#[derive(Clone, Copy)]
pub(crate) struct Retried;

/// The credential whose token a response's request carried (only while the access log is on).
#[derive(Clone)]
pub(crate) struct AccountUsed(pub Arc<Credential>);

impl Access {
    pub(crate) fn start<B>(enabled: bool, req: &Request<B>) -> Access {
        let path = || if req.method() == Method::CONNECT { "-" } else { req.uri().path() };
        Access::begin(enabled, req.method().as_str(), path)
    }

    /// [`Access::start`] from a request line's method and path (without the query).
    pub(crate) fn begin<'a>(enabled: bool, method: &str, path: impl FnOnce() -> &'a str) -> Access {
        let line = enabled.then(|| AccessLine {
            method: Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET),
            host: "-".into(),
            path: path().to_string(),
        });
        Access { started: Instant::now(), line }
    }

    pub(crate) fn host(&mut self, target: &Target) {
        if let Some(line) = &mut self.line {
            line.host = target.authority.to_string();
        }
    }
}

/// Records the request's metrics (and access log line) and turns an error into its answer.
pub(crate) fn finish(
    provider: Option<&Provider>,
    access: Access,
    result: Result<Response<ProxyBody>, ProxyError>,
) -> Response<ProxyBody> {
    let response = result.unwrap_or_else(|e| {
        log_refusal(provider, &e);
        e.into_response()
    });
    let account = response.extensions().get::<AccountUsed>().map(|a| a.0.as_ref());
    let retried = response.extensions().get::<Retried>().is_some();
    record(provider, access, response.status(), account, retried);
    response
}

/// The log line of a request tokenproxy refused.
pub(crate) fn log_refusal(provider: Option<&Provider>, e: &ProxyError) {
    let label = provider.map_or(metrics::NO_PROVIDER, Provider::name);
    tracing::warn!(provider = label, error = %e, code = e.code(), "request refused");
}

/// Records a request's metrics and, when the access log is on, its line.
pub(crate) fn record(
    provider: Option<&Provider>,
    access: Access,
    status: http::StatusCode,
    account: Option<&Credential>,
    retried: bool,
) {
    let label = provider.map_or(metrics::NO_PROVIDER, Provider::name);
    let handles = match provider {
        Some(p) => &p.request_metrics,
        None => metrics::RequestMetrics::unmatched(),
    };
    let elapsed = access.started.elapsed();
    handles.record(status, elapsed);
    if let Some(line) = access.line {
        tracing::info!(
            target: "tokenproxy::access",
            method = %line.method,
            host = %line.host,
            path = %line.path,
            status = status.as_u16(),
            provider = label,
            account = account.and_then(Credential::account_log),
            retried,
            duration_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}
