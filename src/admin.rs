//! The admin listener (SPEC §6): `/healthz`, `/readyz`, `/metrics`, `/tokens`.
//!
//! Answers are built from `TokenView`s, which hold fingerprints only.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use time::OffsetDateTime;

use crate::body::ProxyBody;
use crate::metrics;
use crate::tokens::refresh::Trigger;
use crate::tokens::{Providers, Unavailable};

pub struct Admin {
    providers: Arc<Providers>,
    metrics: PrometheusHandle,
}

impl Admin {
    pub fn new(providers: Arc<Providers>, metrics: PrometheusHandle) -> Admin {
        Admin { providers, metrics }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        let path = req.uri().path();
        if !matches!(*req.method(), Method::GET | Method::HEAD)
            && let Err(reason) = same_origin(&req)
        {
            return json_response(StatusCode::FORBIDDEN, &json!({"error": "cross_origin", "reason": reason}));
        }
        if let Some(name) = path.strip_prefix("/tokens/").and_then(|rest| rest.strip_suffix("/refresh")) {
            let force = query_flag(req.uri().query(), "force");
            return match *req.method() {
                Method::POST => self.manual_refresh(name, force).await,
                _ => json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &json!({"error": "method_not_allowed", "reason": "POST to force a refresh"}),
                ),
            };
        }
        match (req.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n", "text/plain"),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/tokens") => {
                let now = OffsetDateTime::now_utc();
                let views: Vec<_> = self.providers.iter().map(|p| p.view(now)).collect();
                json_response(StatusCode::OK, &json!(views))
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/tokens") => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "reason": format!("{path} answers GET only")}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "reason": "admin paths: /healthz /readyz /metrics /tokens"}),
            ),
        }
    }

    /// `POST /tokens/{provider}/refresh[?force=true]`: 200 with the provider's view when it holds
    /// a fresh token afterwards, else 502 with the error body of SPEC §5. Concurrent requests
    /// share one refresh; a token endpoint in backoff is left alone unless `force`.
    async fn manual_refresh(&self, name: &str, force: bool) -> Response<ProxyBody> {
        let Some(provider) = self.providers.get(name) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "unknown_provider", "reason": format!("no provider named {name:?}")}),
            );
        };
        let wait = provider.wait_limit.max(std::time::Duration::from_secs(1));
        // The token this request is unhappy with: a refresh that replaces it meanwhile (another
        // POST's, a request's) answers this one too.
        let seen = provider.credential().current().map(|t| t.generation);
        let refresh = async {
            if force {
                provider.refresh_forced(seen).await
            } else {
                provider.refresh(Trigger::Manual, seen).await
            }
        };
        let result = tokio::time::timeout(wait, refresh).await;
        match result {
            Ok(Ok(_)) => json_response(StatusCode::OK, &json!(provider.view(OffsetDateTime::now_utc()))),
            Ok(Err(e)) => provider.unavailable(Unavailable::Refresh(&e)).into_response(),
            Err(_) => provider.unavailable(Unavailable::Timeout(wait)).into_response(),
        }
    }

    fn readyz(&self) -> Response<ProxyBody> {
        let now = OffsetDateTime::now_utc();
        let not_ready: Vec<_> = self
            .providers
            .iter()
            .map(|p| p.view(now))
            .filter(|v| !v.state.is_ready())
            .map(|v| json!({"provider": v.provider, "state": v.state, "last_error": v.last_error}))
            .collect();
        if not_ready.is_empty() {
            text(StatusCode::OK, "ready\n", "text/plain")
        } else {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!(not_ready))
        }
    }

    fn metrics(&self) -> Response<ProxyBody> {
        let now = OffsetDateTime::now_utc();
        // The gauge is a function of the clock, so it is set when it is read.
        for provider in self.providers.iter() {
            if let Some(at) = provider.credential().current().and_then(|t| t.expires_at) {
                metrics::token_expires_in(provider.name(), (at - now).as_seconds_f64());
            }
        }
        self.metrics.run_upkeep();
        text(StatusCode::OK, &self.metrics.render(), "text/plain; version=0.0.4")
    }
}

/// A state-changing request must come from the admin API's own origin: a page on another site
/// that a person's browser runs must not force refreshes (or, later, start authorizations).
/// Requests without `Origin` (curl, scripts) are not from a browser page and pass.
fn same_origin<B>(req: &Request<B>) -> Result<(), String> {
    if req.headers().get("sec-fetch-site").is_some_and(|v| v == "cross-site") {
        return Err("a cross-site request cannot change state here".into());
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else { return Ok(()) };
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin = origin.to_str().unwrap_or("null");
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    match origin_host {
        Some(authority) if !host.is_empty() && authority.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(format!(
            "Origin {origin:?} is not this admin API ({host}); state-changing requests must come from it"
        )),
    }
}

/// `?name`, `?name=true` or `?name=1`.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.unwrap_or("").split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        key == name && matches!(value, "" | "1" | "true" | "yes")
    })
}

fn text(status: StatusCode, body: &str, content_type: &'static str) -> Response<ProxyBody> {
    let mut response =
        Response::new(Full::new(Bytes::from(body.to_string())).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    text(status, &body, "application/json")
}
