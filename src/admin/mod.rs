//! The admin listener (SPEC §6): `/healthz`, `/readyz`, `/metrics`, `/tokens`, and the
//! onboarding pages (`/connect`, `/oauth/callback`, see [`crate::onboarding`]).
//!
//! Answers are built from `TokenView`s, which hold fingerprints only.

pub mod doors;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use time::OffsetDateTime;

use crate::body::ProxyBody;
use crate::errors::{AccountAsk, ProxyError};
use crate::metrics;
use crate::onboarding::Onboarding;
use crate::onboarding::http::{is_onboarding_path, same_origin_or_direct};
use crate::tokens::refresh::Trigger;
use crate::tokens::{AccountError, Providers, Unavailable};
use doors::Doors;

pub struct Admin {
    providers: Arc<Providers>,
    metrics: PrometheusHandle,
    onboarding: Arc<Onboarding>,
    doors: Doors,
}

impl Admin {
    pub fn new(
        providers: Arc<Providers>,
        metrics: PrometheusHandle,
        onboarding: Arc<Onboarding>,
        doors: Doors,
    ) -> Admin {
        Admin { providers, metrics, onboarding, doors }
    }

    /// Answers `req` from `peer`: who may ask is decided first ([`doors`]), then the path.
    pub async fn handle(&self, req: Request<hyper::body::Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        if let Err(refusal) = self.doors.check(&req, peer) {
            return *refusal;
        }
        let path = req.uri().path();
        // Onboarding answers its own refusals, as pages for the person who was sent there.
        if is_onboarding_path(path) {
            return self.onboarding.handle(req).await;
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD)
            && let Err(reason) = same_origin_or_direct(req.headers())
        {
            return json_response(StatusCode::FORBIDDEN, &json!({"error": "cross_origin", "reason": reason}));
        }
        let query = crate::query::Query::parse(req.uri().query());
        if let Some(name) = path.strip_prefix("/tokens/").and_then(|rest| rest.strip_suffix("/refresh")) {
            let force = query.flag("force");
            let account = query.account();
            return match *req.method() {
                Method::POST => self.manual_refresh(name, account.as_deref(), force).await,
                _ => json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &json!({"error": "method_not_allowed", "reason": "POST to force a refresh"}),
                ),
            };
        }
        match (req.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n", "text/plain"),
            (&Method::GET, "/readyz") => self.readyz().await,
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/tokens") => self.tokens(query.get("provider")),
            (_, "/healthz" | "/readyz" | "/metrics" | "/tokens") => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "reason": format!("{path} answers GET only")}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "reason": "admin paths: /healthz /readyz /metrics /tokens /connect"}),
            ),
        }
    }

    /// `GET /tokens[?provider=NAME]`: one object per provider, or per loaded account of a
    /// multi-account provider (SPEC §6).
    fn tokens(&self, only: Option<&str>) -> Response<ProxyBody> {
        if let Some(name) = only
            && self.providers.get(name).is_none()
        {
            return unknown_provider(name);
        }
        let now = OffsetDateTime::now_utc();
        let views: Vec<_> = self
            .providers
            .iter()
            .filter(|p| only.is_none_or(|name| p.name() == name))
            .flat_map(|p| p.credentials().into_iter().map(move |c| p.view(&c, now)))
            .collect();
        json_response(StatusCode::OK, &views)
    }

    /// `POST /tokens/{provider}/refresh[?account=NAME][&force=true]`: 200 with the credential's
    /// view when it holds a fresh token afterwards, else 502 with the error body of SPEC §5.
    /// Concurrent requests share one refresh; a token endpoint in backoff is left alone unless
    /// `force`.
    async fn manual_refresh(&self, name: &str, account: Option<&str>, force: bool) -> Response<ProxyBody> {
        let Some(provider) = self.providers.get(name) else { return unknown_provider(name) };
        if let Some(signer) = &provider.signer {
            return match signer.renew().await {
                Ok(_) => json_response(StatusCode::OK, &json!(signer.view(OffsetDateTime::now_utc()))),
                Err(()) => ProxyError::TokenUnavailable {
                    provider: name.to_string(),
                    account: None,
                    reason: signer.last_error().unwrap_or_else(|| "renewal failed".into()),
                    action: signer.action(),
                }
                .into_response(),
            };
        }
        let credential = match provider.credential_for(account).await {
            Ok(credential) => credential,
            Err(AccountError::Required) => {
                let e =
                    ProxyError::AccountRequired { provider: name.to_string(), asked_on: AccountAsk::Admin };
                return e.into_response();
            }
            Err(AccountError::Bad(reason)) => {
                return ProxyError::BadAccount { provider: name.to_string(), reason }.into_response();
            }
        };
        let wait = provider.wait_limit.max(std::time::Duration::from_secs(1));
        // The token this request is unhappy with: a refresh that replaces it meanwhile (another
        // POST's, a request's) answers this one too.
        let seen = credential.current().map(|t| t.generation);
        let refresh = async {
            if force {
                provider.refresh_forced(&credential, seen).await
            } else {
                provider.refresh(&credential, Trigger::Manual, seen).await
            }
        };
        let result = tokio::time::timeout(wait, refresh).await;
        match result {
            Ok(Ok(_)) => {
                json_response(StatusCode::OK, &json!(provider.view(&credential, OffsetDateTime::now_utc())))
            }
            Ok(Err(e)) => provider.unavailable(&credential, Unavailable::Refresh(&e)).into_response(),
            Err(_) => provider.unavailable(&credential, Unavailable::Timeout(wait)).into_response(),
        }
    }

    /// `200` when every single-account provider has a usable token and no multi-account
    /// provider is broken as a whole; one account's state never makes the pod unready (SPEC §8).
    async fn readyz(&self) -> Response<ProxyBody> {
        let not_ready = not_ready(&self.providers).await;
        if not_ready.is_empty() {
            // Tokens in hand keep serving while the store is away (SPEC §11): still ready, but
            // said, since no refresh can happen until it is back.
            let store = self.providers.store().problem("").await;
            match store.or_else(|| self.providers.iter().find_map(|p| p.store_trouble())) {
                Some(problem) => {
                    text(StatusCode::OK, &format!("ready; store_unavailable: {problem}\n"), "text/plain")
                }
                None => text(StatusCode::OK, "ready\n", "text/plain"),
            }
        } else {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!(not_ready))
        }
    }

    fn metrics(&self) -> Response<ProxyBody> {
        let now = OffsetDateTime::now_utc();
        // The gauges are functions of the clock, so they are set when they are read.
        for provider in self.providers.iter() {
            if let Some(at) = provider.single().and_then(|c| c.current()).and_then(|t| t.expires_at) {
                metrics::token_expires_in(provider.name(), (at - now).as_seconds_f64());
            }
            for (state, count) in provider.account_states(now) {
                metrics::accounts(provider.name(), state.as_str(), count);
            }
        }
        self.metrics.run_upkeep();
        text(StatusCode::OK, &self.metrics.render(), "text/plain; version=0.0.4")
    }
}

/// What keeps the pod out of service: a single-account provider without a usable token, or a
/// multi-account provider that is broken for every account.
async fn not_ready(providers: &Providers) -> Vec<serde_json::Value> {
    let now = OffsetDateTime::now_utc();
    let mut not_ready = Vec::new();
    for provider in providers.iter() {
        match provider.single() {
            Some(credential) => {
                let v = provider.view(credential, now);
                if !v.state.is_ready() {
                    not_ready
                        .push(json!({"provider": v.provider, "state": v.state, "last_error": v.last_error}));
                }
            }
            None => {
                if let Some(problem) = provider.provider_problem().await {
                    not_ready
                        .push(json!({"provider": provider.name(), "state": "error", "last_error": problem}));
                }
            }
        }
    }
    not_ready
}

fn unknown_provider(name: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": "unknown_provider", "reason": format!("no provider named {name:?}")}),
    )
}

fn text(status: StatusCode, body: &str, content_type: &'static str) -> Response<ProxyBody> {
    crate::body::response(status, body.to_string(), content_type)
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<ProxyBody> {
    crate::body::json(status, value)
}
