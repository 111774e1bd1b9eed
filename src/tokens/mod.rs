//! The token cache: one [`Provider`] per configured provider (its settings, token endpoint client
//! and refresh policy), each with a [`Credential`] holding its current token in an `ArcSwap` that
//! the request path reads without a lock and without file I/O.
//!
//! The token file is the source of truth. The cache changes only when the file's content changes
//! (see [`watch`]) or, later, when a refresh completes; it never holds anything the file did not
//! say, except a token kept in use after the file became unreadable.

mod credential;
pub mod file;
pub mod refresh;
pub mod store;
pub mod watch;

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{FileFormat, ProviderConfig};
use crate::errors::ProxyError;
use crate::hosts::normalize_host;
use crate::metrics;
use crate::oauth::{OAuthClient, RefreshError};
use crate::secrets::fingerprint;
pub use credential::Credential;
use credential::{FileStatus, Status};
use file::{ExpirySource, TokenDocument};

/// A token ready for the request path: the header value is built once, when the token arrives.
pub struct Token {
    header_value: HeaderValue,
    pub fingerprint: String,
    pub expires_at: Option<OffsetDateTime>,
    pub expiry_source: ExpirySource,
    pub issued_at: Option<OffsetDateTime>,
    /// Increases with every token this provider adopts; tells a request whether the token it
    /// carried is still the current one.
    pub generation: u64,
}

impl Token {
    /// The header value to inject (marked sensitive so that hyper never logs it).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header_value
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Where a token stands against its expiry (see [`Provider::freshness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// No expiry is known: only a 401 tells that it died.
    Unknown,
    /// Valid, and not yet within the refresh margin; it enters it after `expiring_in`.
    Fresh {
        expiring_in: Duration,
    },
    /// Within the refresh margin: a proactive refresh is due.
    Expiring,
    Expired,
}

/// What a provider's token looks like to a user (SPEC §6 `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Valid,
    Expiring,
    Expired,
    Refreshing,
    NeedsReauth,
    Error,
    Missing,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Expiring => "expiring",
            TokenState::Expired => "expired",
            TokenState::Refreshing => "refreshing",
            TokenState::NeedsReauth => "needs_reauth",
            TokenState::Error => "error",
            TokenState::Missing => "missing",
        }
    }

    /// Whether a request could be served with a token right now.
    pub fn is_ready(self) -> bool {
        matches!(self, TokenState::Valid | TokenState::Expiring | TokenState::Refreshing)
    }
}

/// Why a provider has no token to give a request (or a manual refresh).
#[derive(Debug)]
pub enum Unavailable<'a> {
    /// The refresh failed.
    Refresh(&'a RefreshError),
    /// No fresh token came within this long; the refresh goes on.
    Timeout(Duration),
    /// No token endpoint, and the file holds no usable token.
    NoToken,
}

/// One provider: its settings, its token endpoint client, and its credential.
pub struct Provider {
    pub config: ProviderConfig,
    /// The provider's one token and its state (one per account, once providers have accounts).
    credential: Credential,
    /// The token endpoint client, for providers with an `[oauth]` section.
    oauth_client: Option<OAuthClient>,
    /// The longest a request waits for a refresh.
    pub wait_limit: Duration,
    /// This provider's request counters, registered once.
    pub request_metrics: metrics::RequestMetrics,
}

/// The outcome of re-reading a token file, also the `result` label of
/// `tokenproxy_token_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Ok,
    ParseError,
    IoError,
}

impl Provider {
    pub fn new(config: ProviderConfig, oauth_client: Option<OAuthClient>, wait_limit: Duration) -> Provider {
        let oauth_client = oauth_client.filter(|_| config.oauth.is_some());
        Provider {
            request_metrics: metrics::RequestMetrics::new(&config.name),
            config,
            credential: Credential::default(),
            oauth_client,
            wait_limit,
        }
    }

    /// Whether tokenproxy can refresh this provider's token itself.
    pub fn can_refresh(&self) -> bool {
        self.oauth_client.is_some()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The credential the request path reads.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.credential.status()
    }

    /// Re-reads the token file and adopts its token if the content changed.
    ///
    /// A file that cannot be read or parsed never replaces a good token: the last good one stays
    /// in use and the problem shows as `last_error`.
    pub fn reload(&self) -> Reload {
        let path = &self.config.token_file;
        let bytes = file::read(path);
        let mut status = self.status();
        let mut write_back = None;
        let (outcome, file_status, error) = match bytes {
            Err(file::ReadError::Io(e)) => {
                let (file_status, reason) = if e.kind() == std::io::ErrorKind::NotFound {
                    (FileStatus::Missing, "not found".to_string())
                } else {
                    (FileStatus::Unreadable, e.to_string())
                };
                if status.file == file_status {
                    return Reload::Unchanged;
                }
                status.content_hash = None;
                (Reload::IoError, file_status, format!("token file {}: {reason}", path.display()))
            }
            Err(e @ file::ReadError::TooLarge) => {
                if status.file == FileStatus::Unparsable && status.content_hash.is_none() {
                    return Reload::Unchanged;
                }
                status.content_hash = None;
                (Reload::ParseError, FileStatus::Unparsable, format!("token file {}: {e}", path.display()))
            }
            Ok(bytes) => {
                let hash: [u8; 32] = Sha256::digest(&bytes).into();
                if status.content_hash == Some(hash) {
                    return Reload::Unchanged;
                }
                status.content_hash = Some(hash);
                match file::parse(FileFormat::of(path), &bytes).map_err(|e| e.to_string()).and_then(|doc| {
                    let (doc, merged) = reconcile_pending(&mut status, doc);
                    self.adopt(&doc).map(|_| (doc, merged))
                }) {
                    Ok((doc, merged)) => {
                        // A changed file is a new chance: whatever stopped automatic refreshes
                        // (a revoked refresh token, a backoff) may be fixed by it.
                        status.fields = doc.fields;
                        status.reauth_reason = None;
                        status.config_error = None;
                        status.retry_not_before = None;
                        status.last_failure = None;
                        write_back = merged;
                        (Reload::Ok, FileStatus::Ok, String::new())
                    }
                    Err(e) => (
                        Reload::ParseError,
                        FileStatus::Unparsable,
                        format!("token file {} cannot be parsed: {e}", path.display()),
                    ),
                }
            }
        };
        status.file = file_status.clone();
        drop(status);
        let label = match outcome {
            Reload::Ok => "ok",
            Reload::ParseError => "parse_error",
            _ => "io_error",
        };
        metrics::token_reload(self.name(), label);
        if let Some(fields) = write_back {
            // Called off the async threads (the watcher's blocking task, or at start).
            let _lock = store::lock(&self.config.token_file).ok();
            self.write_fields(&fields);
            tracing::info!(
                provider = self.name(),
                "the token file parses again; the refreshed token is written into it"
            );
        }
        if outcome == Reload::Ok {
            let write_error = self.status().write_error.clone();
            self.status().last_error = write_error;
            let token = self.credential.current();
            let token = token.as_deref().expect("adopt stored a token");
            tracing::info!(
                provider = self.name(),
                fingerprint = %token.fingerprint,
                expires_at = %fmt_time(token.expires_at).unwrap_or_else(|| "unknown".into()),
                expiry_source = token.expiry_source.as_str(),
                "token loaded from file"
            );
        } else {
            match self.credential.current().map(|t| t.fingerprint.clone()) {
                Some(kept) => tracing::warn!(
                    provider = self.name(),
                    error = %error,
                    kept_fingerprint = %kept,
                    "token file not usable; keeping the last good token"
                ),
                None if file_status == FileStatus::Missing && self.config.oauth.is_some() => tracing::info!(
                    provider = self.name(),
                    path = %path.display(),
                    "no token file yet; the first refresh creates it"
                ),
                None => {
                    tracing::warn!(provider = self.name(), error = %error, "token file not usable; no token yet")
                }
            }
            self.status().last_error = Some(error);
        }
        outcome
    }

    /// Makes `doc`'s token the current one: one atomic swap, seen by the next request. Returns
    /// the token stored, which a caller uses rather than loading the current one again (a
    /// concurrent re-read may have replaced it meanwhile).
    pub fn adopt(&self, doc: &TokenDocument) -> Result<Arc<Token>, String> {
        Ok(self.credential.install(self.prepare(doc)?))
    }

    /// The token `doc` stands for, ready for the request path but not yet in use: a refresh
    /// checks it can be used before writing it anywhere.
    fn prepare(&self, doc: &TokenDocument) -> Result<Token, String> {
        let value = format!("{}{}{}", self.config.format_prefix, doc.access_token, self.config.format_suffix);
        let mut header_value = HeaderValue::from_str(&value)
            .map_err(|_| "access_token has characters not allowed in an HTTP header".to_string())?;
        header_value.set_sensitive(true);
        let token = Token {
            header_value,
            fingerprint: fingerprint(&doc.access_token),
            expires_at: doc.expires_at,
            expiry_source: doc.expiry_source,
            issued_at: doc.issued_at,
            generation: 0,
        };
        Ok(token)
    }

    /// Where `token` stands against its expiry: the one rule that the request path's refresh,
    /// the background refresher and the admin state all follow.
    pub fn freshness(&self, token: &Token, now: OffsetDateTime) -> Freshness {
        match token.expires_at {
            None => Freshness::Unknown,
            Some(_) if token.is_expired(now) => Freshness::Expired,
            Some(at) => {
                let left = (at - now).unsigned_abs();
                let margin = self.refresh_margin(token);
                if left <= margin {
                    Freshness::Expiring
                } else {
                    Freshness::Fresh { expiring_in: left - margin }
                }
            }
        }
    }

    /// How long before expiry a token counts as expiring: `refresh_before`, capped at half the
    /// token's lifetime when the lifetime is known.
    pub fn refresh_margin(&self, token: &Token) -> Duration {
        let margin = self.config.refresh_before();
        match (token.issued_at, token.expires_at) {
            (Some(from), Some(to)) if to > from => {
                let half = (to - from).unsigned_abs() / 2;
                margin.min(half)
            }
            _ => margin,
        }
    }

    pub fn state(&self, now: OffsetDateTime) -> TokenState {
        let (file, reauth, config_error) = {
            let s = self.status();
            (s.file.clone(), s.reauth_reason.is_some(), s.config_error.is_some())
        };
        if reauth {
            return TokenState::NeedsReauth;
        }
        if config_error {
            return TokenState::Error;
        }
        if self.credential.refreshing.load(Ordering::Relaxed) {
            return TokenState::Refreshing;
        }
        match self.credential.current() {
            None if matches!(file, FileStatus::Missing | FileStatus::NotRead) => TokenState::Missing,
            None => TokenState::Error,
            Some(t) => match self.freshness(&t, now) {
                Freshness::Expired => TokenState::Expired,
                Freshness::Expiring => TokenState::Expiring,
                Freshness::Fresh { .. } | Freshness::Unknown => TokenState::Valid,
            },
        }
    }

    /// The one `502 token_unavailable` answer, with what to do about it.
    pub fn unavailable(&self, why: Unavailable<'_>) -> ProxyError {
        let path = self.config.token_file.display();
        let (reason, action) = match why {
            Unavailable::Refresh(e) => (e.to_string(), e.action(&self.config.token_file)),
            Unavailable::Timeout(limit) => (
                format!("no fresh token within {}s; the refresh goes on in the background", limit.as_secs()),
                "look at /tokens in a moment; if this persists, check the token endpoint's health".into(),
            ),
            Unavailable::NoToken => match self.view(OffsetDateTime::now_utc()) {
                view if view.state == TokenState::Missing => (
                    format!("token file {path} does not exist"),
                    format!("write the token to {path}; it is picked up without a restart"),
                ),
                view => (
                    view.last_error.unwrap_or_else(|| "no token loaded".into()),
                    format!("fix the token file {path}; it is picked up without a restart"),
                ),
            },
        };
        ProxyError::TokenUnavailable { provider: self.name().to_string(), reason, action }
    }

    /// The provider as `GET /tokens` shows it. Holds fingerprints only.
    pub fn view(&self, now: OffsetDateTime) -> TokenView {
        let state = self.state(now);
        let token = self.credential.current();
        let status = self.status();
        TokenView {
            provider: self.name().to_string(),
            state,
            expires_at: token.as_ref().and_then(|t| fmt_time(t.expires_at)),
            expires_in_s: token.as_ref().and_then(|t| t.expires_at).map(|at| (at - now).whole_seconds()),
            expiry_source: token.as_ref().map_or("unknown", |t| t.expiry_source.as_str()),
            fingerprint: token.as_ref().map(|t| t.fingerprint.clone()),
            last_refresh_at: fmt_time(status.last_refresh_at),
            last_refresh_result: status.last_refresh_result.clone(),
            last_error: status.last_error.clone(),
            refresh_count: status.refresh_count,
            retry_count: status.retry_count,
        }
    }
}

/// A file that parses again after a refresh could not be written over it: when it still holds
/// the token the refresh replaced, the refresh goes on top of the person's edit (returned as the
/// fields to write); when it holds another token, the person's token wins.
fn reconcile_pending(
    status: &mut Status,
    doc: TokenDocument,
) -> (TokenDocument, Option<serde_json::Map<String, serde_json::Value>>) {
    let Some(pending) = status.pending_write.take() else { return (doc, None) };
    if pending.based_on.as_deref() != Some(fingerprint(&doc.access_token).as_str()) {
        tracing::warn!(
            fingerprint = %fingerprint(&doc.access_token),
            "the token file parses again and holds a new token; it replaces the refreshed one that could not be written"
        );
        status.write_error = None;
        return (doc, None);
    }
    let fields = store::overlay_refresh(&doc.fields, &pending.fields);
    match file::document_from_fields(fields.clone()) {
        Ok(merged) => (merged, Some(fields)),
        Err(_) => (doc, None),
    }
}

pub fn fmt_time(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.format(&Rfc3339).ok())
}

/// One provider on `GET /tokens` (SPEC §6).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    pub provider: String,
    pub state: TokenState,
    pub expires_at: Option<String>,
    pub expires_in_s: Option<i64>,
    pub expiry_source: &'static str,
    pub fingerprint: Option<String>,
    pub last_refresh_at: Option<String>,
    pub last_refresh_result: Option<String>,
    pub last_error: Option<String>,
    pub refresh_count: u64,
    pub retry_count: u64,
}

/// Every configured provider, with host lookup.
pub struct Providers {
    list: Vec<Arc<Provider>>,
}

impl Providers {
    /// Builds the providers and reads each token file once.
    pub fn load(
        configs: &[ProviderConfig],
        oauth_client: Option<OAuthClient>,
        wait_limit: Duration,
    ) -> Providers {
        let list: Vec<Arc<Provider>> = configs
            .iter()
            .cloned()
            .map(|c| Arc::new(Provider::new(c, oauth_client.clone(), wait_limit)))
            .collect();
        for provider in &list {
            provider.reload();
        }
        Providers { list }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.list.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.list.iter().find(|p| p.name() == name)
    }

    /// The provider whose host patterns match `host:port`. `host` may be in any case and may
    /// carry IPv6 brackets.
    pub fn for_host(&self, host: &str, port: u16) -> Option<&Arc<Provider>> {
        let host = normalize_host(host);
        let find = |exact: bool| {
            self.list
                .iter()
                .find(|p| p.config.hosts.iter().any(|h| h.is_exact() == exact && h.matches(&host, port)))
        };
        find(true).or_else(|| find(false))
    }

    /// Re-reads every token file; used by the watcher.
    pub fn reload_all(&self) {
        for provider in &self.list {
            provider.reload();
        }
    }
}
