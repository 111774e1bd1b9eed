//! Onboarding (SPEC §9): a person consents once and tokenproxy stores the first token.
//!
//! Two flows end in the same place, [`Onboarding::complete`]: the token endpoint's answer is
//! written through the token store, read back, and adopted by the cache at once. Nothing is
//! reported as connected unless all three happened.
//! - The browser flow (authorization code with PKCE): [`Onboarding::start`] stores a pending flow
//!   on disk ([`pending`]) and sends the browser to the provider; [`Onboarding::callback`] checks
//!   the state, exchanges the code and completes.
//! - The device flow (RFC 8628), for machines without a browser: [`device`].
//!
//! Every end of a flow is an [`Outcome`]: kept for the page and `tokenproxy authorize`, counted in
//! `tokenproxy_authorizations_total`, and logged with the account's fingerprint.

pub mod command;
pub mod device;
pub mod http;
pub mod page;
pub mod pending;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::accounts;
use crate::config::OnboardingSettings;
use crate::oauth::{IssuedToken, OAuthClient, RefreshError, RefreshErrorKind, TokenGrant};
use crate::secrets::fingerprint;
use crate::tokens::store::Key;
use crate::tokens::{Provider, Providers};
use pending::{Pending, PendingFlows, StateProblem};

/// How many finished flows are remembered for the page and `tokenproxy authorize`.
const OUTCOMES_KEPT: usize = 256;

/// Why a flow failed: the `result` label of `tokenproxy_authorizations_total`, with what the
/// person is told.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The person (or the provider on their behalf) said no.
    AccessDenied(Option<String>),
    /// Never issued, already used, or another browser's.
    StateUnknown(String),
    /// The person took longer than `state_ttl` (or the device code expired).
    StateExpired,
    /// The token endpoint did not give a token for the code.
    ExchangeFailed(RefreshError),
    /// The token could not be stored, or read back: where, and the OS error.
    WriteFailed(String),
}

impl Failure {
    pub fn label(&self) -> &'static str {
        match self {
            Failure::AccessDenied(_) => "access_denied",
            Failure::StateUnknown(_) => "state_unknown",
            Failure::StateExpired => "state_expired",
            Failure::ExchangeFailed(_) => "exchange_failed",
            Failure::WriteFailed(_) => "write_failed",
        }
    }

    /// One line: the label and its detail (`exchange_failed: invalid_client: …`).
    pub fn detail(&self) -> String {
        match self {
            Failure::AccessDenied(None) => "access_denied".into(),
            Failure::AccessDenied(Some(why)) => format!("access_denied: {why}"),
            Failure::StateUnknown(why) => format!("state_unknown: {why}"),
            Failure::StateExpired => "state_expired".into(),
            Failure::ExchangeFailed(e) => format!("exchange_failed: {e}"),
            Failure::WriteFailed(why) => format!("write_failed: {why}"),
        }
    }

    /// What happened, in a sentence for the person who was there.
    pub fn sentence(&self) -> String {
        match self {
            Failure::AccessDenied(_) => {
                "Access was not granted at the provider, so no token was stored.".into()
            }
            Failure::StateUnknown(_) => {
                "This sign-in link was not started in this browser, or it was already used.".into()
            }
            Failure::StateExpired => "The sign-in took longer than tokenproxy waits for it.".into(),
            Failure::ExchangeFailed(e) => {
                format!("The provider's token endpoint did not issue a token ({}).", e.kind.label())
            }
            Failure::WriteFailed(_) => {
                "The provider issued a token, but tokenproxy could not store it, so it is not connected."
                    .into()
            }
        }
    }

    /// What to do about it.
    pub fn action(&self) -> String {
        match self {
            Failure::AccessDenied(_) => "Connect again and allow access, if that is what you want.".into(),
            Failure::StateUnknown(_) => {
                "Start again from the /connect page (or tokenproxy authorize), and finish in the same browser.".into()
            }
            Failure::StateExpired => "Start again; the link is valid for [onboarding] state_ttl.".into(),
            Failure::ExchangeFailed(e) => match e.kind {
                RefreshErrorKind::InvalidClient => {
                    "Check the provider's client_id, client secret, client_auth and redirect_uri in the config, then connect again.".into()
                }
                RefreshErrorKind::InvalidGrant => {
                    "The code was refused (expired, used, or a redirect_uri or PKCE mismatch); connect again.".into()
                }
                _ => "Connect again in a moment; check the token endpoint's health if it persists.".into(),
            },
            Failure::WriteFailed(_) => {
                "Make the token folder writable by tokenproxy (permissions, disk space), then connect again.".into()
            }
        }
    }
}

/// How a flow ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub provider: String,
    pub account: Option<String>,
    /// `ok`, or the failure's label.
    pub result: &'static str,
    /// The label and its detail, e.g. `exchange_failed: invalid_client: HTTP 401 …`; `null` when ok.
    pub error: Option<String>,
    pub sentence: String,
    pub action: Option<String>,
    /// The id of the `tokenproxy authorize` link that started the flow, if one did.
    pub flow: Option<String>,
    /// The new token's fingerprint, when connected.
    pub fingerprint: Option<String>,
    pub expires_at: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.result == "ok"
    }
}

/// What a connected flow produced.
pub struct Connected {
    pub fingerprint: String,
    pub expires_at: Option<OffsetDateTime>,
    /// Whether the provider sent a refresh token (without one the token cannot be renewed).
    pub has_refresh_token: bool,
}

/// Why a flow could not start: a bad request, not an authorization result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("no provider named {0:?}")]
    UnknownProvider(String),
    #[error("{0}")]
    NotConnectable(String),
    #[error("{0}")]
    Account(String),
    #[error("pending authorizations cannot be stored: {0}")]
    StateDir(String),
}

/// A started browser flow.
pub struct Started {
    /// The provider's authorization URL, with every parameter.
    pub authorize_url: String,
    /// The flow's own cookie, which only the callback's path receives.
    pub cookie_name: String,
    pub cookie_path: String,
}

/// A flow id from a `tokenproxy authorize` link: short and plain, since it is stored and echoed.
pub fn is_flow_id(id: &str) -> bool {
    (8..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The onboarding flows of one process.
pub struct Onboarding {
    providers: Arc<Providers>,
    oauth: OAuthClient,
    pub flows: PendingFlows,
    outcomes: Mutex<VecDeque<Arc<Outcome>>>,
    /// Woken whenever a flow ends.
    pub finished: tokio::sync::Notify,
}

/// A provider a person can connect now, with the account and the endpoint the flow starts at:
/// what [`Onboarding::target`] checked, so that nothing after it checks again.
pub struct Connectable {
    pub provider: Arc<Provider>,
    pub account: Option<String>,
    pub oauth: crate::config::OAuthConfig,
    /// The authorization endpoint (browser) or the device authorization endpoint.
    pub url: ::http::Uri,
}

impl Onboarding {
    /// Reads the pending flows' folder (sweeping expired ones, indexing the rest) on the
    /// blocking pool: its cost grows with the number pending, so never on a runtime thread.
    pub async fn open(
        providers: Arc<Providers>,
        oauth: OAuthClient,
        settings: &OnboardingSettings,
    ) -> Onboarding {
        let flows = PendingFlows::new(settings.state_dir.clone(), settings.state_ttl, settings.max_pending);
        let reading = flows.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let swept = reading.sweep();
            reading.load();
            swept
        })
        .await
        .unwrap_or(0);
        if swept > 0 {
            tracing::info!(swept, dir = %flows.dir().display(), "removed expired pending authorizations");
        }
        Onboarding {
            providers,
            oauth,
            flows,
            outcomes: Mutex::new(VecDeque::new()),
            finished: tokio::sync::Notify::new(),
        }
    }

    pub fn providers(&self) -> &Arc<Providers> {
        &self.providers
    }

    /// The provider and account a flow would connect: the provider must have an authorization
    /// endpoint (`browser`) or a device endpoint; a multi-account provider needs an account (or
    /// its `default_account`), a single-account one ignores it.
    pub fn target(
        &self,
        provider: &str,
        account: Option<&str>,
        browser: bool,
    ) -> Result<Connectable, StartError> {
        let p = self.providers.get(provider).ok_or_else(|| StartError::UnknownProvider(provider.into()))?;
        let Some(oauth) = p.oauth() else {
            return Err(StartError::NotConnectable(format!(
                "provider {provider:?} has no [oauth] section: its token is kept by something else"
            )));
        };
        if oauth.grant.mints() {
            return Err(StartError::NotConnectable(format!(
                "provider {provider:?} uses the {} grant: it needs no person's consent",
                oauth.grant.name()
            )));
        }
        let (key, url) = if browser {
            ("authorize_url", &oauth.authorize_url)
        } else {
            ("device_authorization_url", &oauth.device_authorization_url)
        };
        let Some(url) = url.clone() else {
            return Err(StartError::NotConnectable(format!(
                "provider {provider:?} has no {key}: set [providers.{provider}.oauth] {key}"
            )));
        };
        let connectable = |account| Connectable { provider: p.clone(), account, oauth: oauth.clone(), url };
        if !p.is_multi_account() {
            return Ok(connectable(None));
        }
        let name =
            account.filter(|a| !a.is_empty()).or(p.config.default_account.as_deref()).ok_or_else(|| {
                StartError::Account(format!(
                    "provider {provider:?} keeps one token per account: name the account"
                ))
            })?;
        accounts::check(name).map_err(|e| StartError::Account(e.to_string()))?;
        Ok(connectable(Some(name.to_string())))
    }

    /// Starts a browser flow for the browser whose cookie is `browser_cookie`: stores the
    /// pending flow (one file write, off the runtime's threads) and returns the provider's
    /// authorization URL. `flow` is the id a `tokenproxy authorize` link carries.
    pub async fn start(
        &self,
        provider: &str,
        account: Option<&str>,
        flow: Option<&str>,
        browser_cookie: &str,
    ) -> Result<Started, StartError> {
        let Connectable { provider: p, account, oauth, url: authorize_url } =
            self.target(provider, account, true)?;
        let oauth = &oauth;
        let now = OffsetDateTime::now_utc();
        let code_verifier = oauth.pkce.then(crate::secrets::random_token);
        let pending = Pending {
            provider: p.name().to_string(),
            account: account.clone(),
            code_verifier: code_verifier.clone(),
            redirect_uri: oauth.redirect_uri.clone(),
            browser: pending::sha256_hex(browser_cookie),
            flow: flow.filter(|f| is_flow_id(f)).map(str::to_string),
            created_at: now,
            expires_at: now + self.flows.ttl,
        };
        let flows = self.flows.clone();
        let state = tokio::task::spawn_blocking(move || flows.create(&pending))
            .await
            .map_err(|e| StartError::StateDir(e.to_string()))?
            .map_err(|e| StartError::StateDir(e.to_string()))?;
        let mut params: Vec<(&str, &str)> = vec![
            ("response_type", "code"),
            ("client_id", &oauth.client_id),
            ("redirect_uri", &oauth.redirect_uri),
            ("state", &state),
        ];
        if !oauth.scope.is_empty() {
            params.push(("scope", &oauth.scope));
        }
        let challenge = code_verifier.as_deref().map(pending::code_challenge);
        if let Some(challenge) = &challenge {
            params.push(("code_challenge", challenge));
            params.push(("code_challenge_method", "S256"));
        }
        for (k, v) in &oauth.authorize_params {
            params.push((k, v));
        }
        let base = authorize_url.to_string();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
        let separator = if base.contains('?') { '&' } else { '?' };
        tracing::info!(
            provider = p.name(),
            account = account.as_deref().map(accounts::log_name),
            pkce = oauth.pkce,
            "authorization started"
        );
        let cookie_path = oauth
            .redirect_uri
            .parse::<::http::Uri>()
            .ok()
            .map(|u| u.path().to_string())
            .filter(|p| p.starts_with('/'))
            .unwrap_or_else(|| "/oauth/callback".into());
        Ok(Started {
            authorize_url: format!("{base}{separator}{}", query.join("&")),
            cookie_name: pending::cookie_name(&state),
            cookie_path,
        })
    }

    /// Finishes a browser flow from the callback's query and the browser's cookies (the flow's
    /// own is found by its name, which the state determines).
    pub async fn callback(&self, query: &crate::query::Query, cookies: &[(String, String)]) -> Arc<Outcome> {
        let param = |name: &str| query.get(name);
        let Some(state) = param("state").filter(|s| !s.is_empty()) else {
            return self.record(
                None,
                None,
                None,
                Err(Failure::StateUnknown("the callback carries no state".into())),
            );
        };
        let name = pending::cookie_name(state);
        let browser_cookie = cookies.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        let flows = self.flows.clone();
        let (state, cookie) = (state.to_string(), browser_cookie.map(str::to_string));
        let taken = tokio::task::spawn_blocking(move || flows.take(&state, cookie.as_deref()))
            .await
            .unwrap_or_else(|e| Err(StateProblem::Io(e.to_string())));
        let pending = match taken {
            Ok(pending) => pending,
            Err(StateProblem::Unknown(why)) => {
                return self.record(None, None, None, Err(Failure::StateUnknown(why.into())));
            }
            Err(StateProblem::Expired(flow)) => {
                let (provider, account, flow) = *flow;
                return self.record(Some(&provider), account.as_deref(), flow, Err(Failure::StateExpired));
            }
            Err(StateProblem::Io(e)) => return self.record(None, None, None, Err(Failure::WriteFailed(e))),
        };
        let (provider, account) = (pending.provider.as_str(), pending.account.as_deref());
        let result = match (param("error"), param("code")) {
            (Some("access_denied"), _) => {
                Err(Failure::AccessDenied(param("error_description").map(|d| d.chars().take(200).collect())))
            }
            (Some(error), _) => Err(Failure::ExchangeFailed(RefreshError::new(
                RefreshErrorKind::BadResponse,
                format!(
                    "the authorization endpoint answered error {:?}{}",
                    error.chars().take(64).collect::<String>(),
                    param("error_description")
                        .map(|d| format!(": {}", d.chars().take(200).collect::<String>()))
                        .unwrap_or_default()
                ),
            ))),
            (None, None | Some("")) => Err(Failure::ExchangeFailed(RefreshError::new(
                RefreshErrorKind::BadResponse,
                "the callback carries neither a code nor an error",
            ))),
            (None, Some(code)) => self.exchange(&pending, code).await,
        };
        self.record(Some(provider), account, pending.flow.clone(), result)
    }

    async fn exchange(&self, pending: &Pending, code: &str) -> Result<Connected, Failure> {
        let provider = self
            .providers
            .get(&pending.provider)
            .ok_or_else(|| Failure::StateUnknown("the provider is no longer configured".into()))?;
        let oauth = provider
            .oauth()
            .ok_or_else(|| Failure::StateUnknown("the provider has no [oauth] any more".into()))?;
        let grant = TokenGrant::AuthorizationCode {
            code,
            redirect_uri: &pending.redirect_uri,
            code_verifier: pending.code_verifier.as_deref(),
        };
        let issued = self.oauth.token_request(oauth, grant).await.map_err(Failure::ExchangeFailed)?;
        self.complete(provider, pending.account.as_deref(), &issued).await
    }

    /// Stores a newly issued token for (provider, account) through the token store (atomic; a
    /// reconnect replaces what was there), reads it back, and adopts it in the cache.
    pub async fn complete(
        &self,
        provider: &Provider,
        account: Option<&str>,
        issued: &IssuedToken,
    ) -> Result<Connected, Failure> {
        let store = provider.store();
        let key = Key { provider: provider.name(), account };
        let location = store.location(key);
        let now = OffsetDateTime::now_utc();
        let mut fields = issued.fields.clone();
        let time = |t: OffsetDateTime| Value::String(t.format(&Rfc3339).unwrap_or_default());
        fields.insert("access_token".into(), Value::String(issued.access_token.clone()));
        fields.insert("expires_at".into(), time(issued.expires_at));
        fields.insert("updated_at".into(), time(now));
        let written = fingerprint(&issued.access_token);
        crate::tokens::store::replace(store.as_ref(), key, &fields).await.map_err(Failure::WriteFailed)?;
        let adopted = provider.adopt_connected(account).await;
        if adopted.as_ref().map(|t| t.fingerprint.as_str()) != Some(written.as_str()) {
            return Err(Failure::WriteFailed(format!(
                "{location}: written, but the token in use is not the new one (changed meanwhile?)"
            )));
        }
        Ok(Connected {
            fingerprint: written,
            expires_at: Some(issued.expires_at),
            has_refresh_token: issued.refresh_token.is_some(),
        })
    }

    /// Records how a flow ended: the outcome list, the metric, a log line, and a wake-up for
    /// whoever waits.
    pub fn record(
        &self,
        provider: Option<&str>,
        account: Option<&str>,
        flow: Option<String>,
        result: Result<Connected, Failure>,
    ) -> Arc<Outcome> {
        let label = provider.unwrap_or("none");
        let outcome = match &result {
            Ok(connected) => Outcome {
                provider: label.to_string(),
                account: account.map(str::to_string),
                result: "ok",
                error: None,
                sentence: if connected.has_refresh_token {
                    "The token is stored and in use, and tokenproxy keeps it fresh from now on.".into()
                } else {
                    "The token is stored and in use. The provider sent no refresh token, so it cannot be renewed when it expires (some providers need authorize_params such as access_type = \"offline\").".into()
                },
                action: None,
                flow: flow.clone(),
                fingerprint: Some(connected.fingerprint.clone()),
                expires_at: crate::tokens::fmt_time(connected.expires_at),
                at: OffsetDateTime::now_utc(),
            },
            Err(failure) => Outcome {
                provider: label.to_string(),
                account: account.map(str::to_string),
                result: failure.label(),
                error: Some(failure.detail()),
                sentence: failure.sentence(),
                action: Some(failure.action()),
                flow: flow.clone(),
                fingerprint: None,
                expires_at: None,
                at: OffsetDateTime::now_utc(),
            },
        };
        crate::metrics::authorization(label, outcome.result);
        let account_log = account.map(accounts::log_name);
        match &result {
            Ok(c) => {
                tracing::info!(provider = label, account = account_log, fingerprint = %c.fingerprint, "authorization connected")
            }
            Err(f) => {
                tracing::warn!(provider = label, account = account_log, error = %f.detail(), "authorization failed")
            }
        }
        let outcome = Arc::new(outcome);
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        if outcomes.len() >= OUTCOMES_KEPT {
            outcomes.pop_front();
        }
        outcomes.push_back(outcome.clone());
        drop(outcomes);
        self.finished.notify_waiters();
        outcome
    }

    /// The outcome of the flow a `tokenproxy authorize` link with id `flow` started.
    pub fn outcome_of_flow(&self, flow: &str) -> Option<Arc<Outcome>> {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.iter().rev().find(|o| o.flow.as_deref() == Some(flow)).cloned()
    }

    /// The last outcome of (provider, account) (`account` is ignored for a single-account
    /// provider).
    pub fn last_outcome(&self, provider: &str, account: Option<&str>) -> Option<Arc<Outcome>> {
        let single = self.providers.get(provider).is_some_and(|p| !p.is_multi_account());
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes
            .iter()
            .rev()
            .find(|o| o.provider == provider && (single || o.account.as_deref() == account))
            .cloned()
    }
}

/// Percent-encodes a query component (RFC 3986 unreserved characters stay).
pub fn encode(value: &str) -> String {
    const COMPONENT: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(value, COMPONENT).to_string()
}
