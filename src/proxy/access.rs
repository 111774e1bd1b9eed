//! A request's record: its metrics, `tokenproxy_decisions_total`, and when they are on its access
//! log line and its audit line (SPEC §13). Both codecs end every request here.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};

use super::decide::{Ruled, Verdict};
use super::{Proxy, Target};
use crate::body::ProxyBody;
use crate::callers::Peer;
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
    /// The listener the request came on (`proxy`, `route`, `transparent`).
    listener: &'static str,
    /// The code of tokenproxy's refusal, when it refused before any rule was asked.
    refusal: Option<&'static str>,
}

/// Marks a response that came from the retry after a refresh.
#[derive(Clone, Copy)]
pub(crate) struct Retried;

/// The credential whose token a response's request carried (only while the access log is on).
#[derive(Clone)]
pub(crate) struct AccountUsed(pub Arc<Credential>);

impl Access {
    pub(crate) fn start<B>(enabled: bool, req: &Request<B>, listener: &'static str) -> Access {
        let path = || if req.method() == Method::CONNECT { "-" } else { req.uri().path() };
        Access::begin(enabled, req.method().as_str(), path, listener)
    }

    /// [`Access::start`] from a request line's method and path (without the query).
    pub(crate) fn begin<'a>(
        enabled: bool,
        method: &str,
        path: impl FnOnce() -> &'a str,
        listener: &'static str,
    ) -> Access {
        let line = enabled.then(|| AccessLine {
            method: Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET),
            host: "-".into(),
            path: path().to_string(),
            listener,
            refusal: None,
        });
        Access { started: Instant::now(), line }
    }

    /// Notes that tokenproxy refused the request with this error.
    pub(crate) fn refused(&mut self, e: &ProxyError) {
        if let Some(line) = &mut self.line {
            line.refusal = Some(e.code());
        }
    }

    pub(crate) fn host(&mut self, target: &Target) {
        if let Some(line) = &mut self.line {
            line.host = target.authority.to_string();
        }
    }
}

impl Proxy {
    /// The start of a request's record; see [`Access`]. Its line is kept when the access log
    /// or the audit log is on.
    pub(crate) fn access<B>(&self, req: &Request<B>, peer: &Peer) -> Access {
        Access::start(self.keeps_lines(), req, peer.listener)
    }

    /// Whether a request's line is kept: for the access log or the audit log.
    pub(crate) fn keeps_lines(&self) -> bool {
        self.settings.access_log || self.audit.is_some()
    }

    /// Records the request's metrics, access log and audit lines, and turns an error into its
    /// answer.
    pub(crate) fn finish(
        &self,
        provider: Option<&Provider>,
        mut access: Access,
        verdict: &Verdict,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        let response = result.unwrap_or_else(|e| {
            log_refusal(provider, &e);
            access.refused(&e);
            e.into_response()
        });
        let account = response.extensions().get::<AccountUsed>().map(|a| a.0.as_ref());
        let retried = response.extensions().get::<Retried>().is_some();
        self.record(provider, access, verdict, response.status(), account, retried);
        response
    }

    /// Records a request's metrics and, when they are on, its access log and audit lines.
    pub(crate) fn record(
        &self,
        provider: Option<&Provider>,
        access: Access,
        verdict: &Verdict,
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
        match &verdict.caller {
            Some(caller) => caller.count(verdict.allowed),
            None if verdict.unknown => crate::callers::count_unknown(),
            None => {}
        }
        let Some(line) = access.line else { return };
        if let Some(audit) = &self.audit {
            let account = match account.and_then(Credential::account) {
                Some(name) => Some(name),
                None => verdict.account.as_deref(),
            };
            audit.record(&crate::audit::Line {
                time: crate::audit::now(),
                caller: verdict.caller.as_ref().map(|c| &*c.name),
                provider: provider.map(Provider::name),
                account: account.map(crate::accounts::log_name),
                method: line.method.as_str(),
                host: &line.host,
                path: &line.path,
                decision: if verdict.allowed { "allow" } else { "deny" },
                rule: match verdict.rule {
                    Some(Ruled::Rule(i)) => crate::audit::Rule::Index(i),
                    Some(Ruled::Reason(why)) => crate::audit::Rule::Reason(why),
                    None => crate::audit::Rule::Reason(line.refusal.unwrap_or("undecided")),
                },
                status: status.as_u16(),
                retried,
                duration_us: elapsed.as_micros() as u64,
                listener: line.listener,
            });
        }
        if self.settings.access_log {
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
}

/// The log line of a request tokenproxy refused.
pub(crate) fn log_refusal(provider: Option<&Provider>, e: &ProxyError) {
    let label = provider.map_or(metrics::NO_PROVIDER, Provider::name);
    tracing::warn!(provider = label, error = %e, code = e.code(), "request refused");
}
