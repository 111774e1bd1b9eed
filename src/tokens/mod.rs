//! The token cache: one [`Provider`] per configured provider (its settings, token endpoint client
//! and refresh policy), each with a [`Credential`] per account (one for a single-account
//! provider) holding its current token in an `ArcSwap` that the request path reads without a lock
//! and without file I/O.
//!
//! The [`store`] is the source of truth. The cache changes only when a stored document changes
//! (see [`watch`]) or when a refresh completes; it never holds anything the store did not say,
//! except a token kept in use after its document became unreadable, or a refreshed token whose
//! write failed.

pub mod clock;
mod credential;
pub mod endpoint;
pub mod file;
pub mod refresh;
pub mod store;
pub mod watch;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::ProviderConfig;
use crate::errors::ProxyError;
use crate::hosts::normalize_host;
use crate::metrics;
use crate::oauth::{OAuthClient, RefreshError};
use crate::secrets::fingerprint;
use clock::Clock;
pub use credential::{Credential, FileStatus};
use credential::{Held, Status};
use endpoint::TokenEndpoint;
use file::{ExpirySource, TokenDocument};
use store::{Change, Key, Loaded, StoreError, TokenStore};

/// A token ready for the request path: the header value is built once, when the token arrives.
pub struct Token {
    header_value: HeaderValue,
    pub fingerprint: String,
    pub expires_at: Option<OffsetDateTime>,
    pub expiry_source: ExpirySource,
    pub issued_at: Option<OffsetDateTime>,
    /// When the token enters its refresh margin (see [`Provider::freshness`]); computed once so
    /// that a request can tell cheaply that its account's token is due.
    refresh_due_at: Option<OffsetDateTime>,
    /// Increases with every token this credential adopts; tells a request whether the token it
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

    /// Whether the token is within its refresh margin (or past it).
    pub fn is_refresh_due(&self, now: OffsetDateTime) -> bool {
        self.refresh_due_at.is_some_and(|at| at <= now)
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
    pub const ALL: [TokenState; 7] = [
        TokenState::Valid,
        TokenState::Expiring,
        TokenState::Expired,
        TokenState::Refreshing,
        TokenState::NeedsReauth,
        TokenState::Error,
        TokenState::Missing,
    ];

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

/// One provider: its settings, its token endpoint client, and its credentials.
pub struct Provider {
    pub config: ProviderConfig,
    accounts: Accounts,
    /// A problem of the provider rather than of one account (`invalid_client` seen by any of
    /// its accounts): what makes a multi-account provider unready.
    provider_error: Mutex<Option<String>>,
    /// Where tokens come from, for providers with an `[oauth]` section.
    endpoint: Option<Arc<dyn TokenEndpoint>>,
    /// The time every expiry and backoff decision reads.
    pub clock: Clock,
    /// The longest a request waits for a refresh.
    pub wait_limit: Duration,
    /// This provider's request counters, registered once.
    pub request_metrics: metrics::RequestMetrics,
    /// Where the tokens are kept.
    store: Arc<dyn TokenStore>,
    /// Accounts of a grant that needs no person (`client_credentials`) whose first token call
    /// failed, with when and why: such a name is not kept, and for a minute it costs no token
    /// call (names that requests make up must not each cost one, nor leave files behind).
    failed_accounts: Mutex<std::collections::HashMap<Box<str>, (tokio::time::Instant, RefreshError)>>,
}

/// How long an account whose first token call failed is answered from that failure.
const FAILED_ACCOUNT_PAUSE: Duration = Duration::from_secs(60);
/// The most such failures remembered at once.
const FAILED_ACCOUNTS_KEPT: usize = 10_000;

/// A provider's credentials.
enum Accounts {
    /// A single-account provider's one credential.
    One(Arc<Credential>),
    /// A multi-account provider's loaded accounts, by name: read without a lock.
    Many(papaya::HashMap<Box<str>, Arc<Credential>, foldhash::fast::RandomState>),
}

/// What [`Provider::find_credential`] found.
pub enum Found {
    Ready(Arc<Credential>),
    /// An account not in memory yet, by its checked name.
    ToLoad(String),
}

/// Why no credential could be chosen for a request to a multi-account provider.
#[derive(Debug)]
pub enum AccountError {
    /// The request named no account and the provider has no `default_account`.
    Required,
    Bad(crate::accounts::BadAccount),
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
    pub fn new(
        config: ProviderConfig,
        endpoint: Option<Arc<dyn TokenEndpoint>>,
        wait_limit: Duration,
        store: Arc<dyn TokenStore>,
    ) -> Provider {
        let endpoint = endpoint.filter(|_| config.oauth.is_some());
        let accounts = if config.is_multi_account() {
            Accounts::Many(papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()))
        } else {
            Accounts::One(Arc::new(Credential::new(None)))
        };
        Provider {
            request_metrics: metrics::RequestMetrics::new(&config.name),
            config,
            accounts,
            provider_error: Mutex::new(None),
            endpoint,
            clock: Clock::SYSTEM,
            wait_limit,
            store,
            failed_accounts: Mutex::default(),
        }
    }

    /// Whether the provider holds one token per account (SPEC §8).
    pub fn is_multi_account(&self) -> bool {
        matches!(self.accounts, Accounts::Many(_))
    }

    /// A single-account provider's credential.
    pub fn single(&self) -> Option<&Arc<Credential>> {
        match &self.accounts {
            Accounts::One(credential) => Some(credential),
            Accounts::Many(_) => None,
        }
    }

    /// The credential a request uses: a single-account provider's one credential whatever the
    /// request named; for a multi-account provider the named account, else `default_account`.
    /// A loaded account is found without I/O or a lock; an account not loaded yet is read from
    /// its file first (off the async threads).
    pub async fn credential_for(&self, named: Option<&str>) -> Result<Arc<Credential>, AccountError> {
        match self.find_credential(named)? {
            Found::Ready(credential) => Ok(credential),
            Found::ToLoad(name) => Ok(Box::pin(self.load_account(&name)).await),
        }
    }

    /// [`Provider::credential_for`] as far as it goes without waiting: the credential, or the
    /// (checked) name of an account that must first be read from the store.
    pub fn find_credential(&self, named: Option<&str>) -> Result<Found, AccountError> {
        if let Some(single) = self.single() {
            return Ok(Found::Ready(single.clone()));
        }
        let name = named.or(self.config.default_account.as_deref()).ok_or(AccountError::Required)?;
        if let Some(credential) = self.loaded_account(name) {
            return Ok(Found::Ready(credential));
        }
        crate::accounts::check(name).map_err(AccountError::Bad)?;
        if let Some(failed) = self.recent_failure(name) {
            return Ok(Found::Ready(failed));
        }
        Ok(Found::ToLoad(name.to_string()))
    }

    /// Reads a checked account's credential from the store (see [`Provider::find_credential`]).
    pub async fn load_named(&self, name: &str) -> Arc<Credential> {
        Box::pin(self.load_account(name)).await
    }

    /// A credential that answers with the failure of `name`'s first token call, if it failed
    /// less than a minute ago: kept outside the cache, it refreshes nothing (its backoff runs
    /// until the minute is over) and creates no file.
    fn recent_failure(&self, name: &str) -> Option<Arc<Credential>> {
        let failed = self.failed_accounts.lock().unwrap_or_else(|e| e.into_inner());
        let (at, error) = failed.get(name)?;
        let until = *at + FAILED_ACCOUNT_PAUSE;
        if tokio::time::Instant::now() >= until {
            return None;
        }
        let credential = Arc::new(Credential::new(Some(name)));
        let mut status = credential.status();
        status.file = FileStatus::Missing;
        status.retry_not_before = Some(until);
        status.last_failure = Some(error.clone());
        status.last_error = Some(error.to_string());
        drop(status);
        Some(credential)
    }

    /// After the first token call of an account that has no token failed (a grant that needs
    /// no person): the account is not kept (nor its lock file), and its name is answered from
    /// the failure for a minute.
    pub(super) fn forget_failed_account(&self, cred: &Credential, error: &RefreshError) {
        let (Accounts::Many(map), Some(name)) = (&self.accounts, cred.account()) else { return };
        if !self.creates_token_files() || cred.current().is_some() {
            return;
        }
        let now = tokio::time::Instant::now();
        {
            let mut failed = self.failed_accounts.lock().unwrap_or_else(|e| e.into_inner());
            failed.retain(|_, (at, _)| now.duration_since(*at) < FAILED_ACCOUNT_PAUSE);
            if failed.len() < FAILED_ACCOUNTS_KEPT {
                failed.insert(name.into(), (now, error.clone()));
            }
        }
        // Requests already holding this credential wait out the minute too, without a call.
        cred.status().retry_not_before = Some(now + FAILED_ACCOUNT_PAUSE);
        map.pin().remove_if(name, |_, c| std::ptr::eq(Arc::as_ptr(c), cred) && c.current().is_none()).ok();
        self.store.forget(self.key(cred));
    }

    /// Loads account `name` (checked) once, however many requests ask at the same time. An
    /// account the store has nothing for is not kept: names that requests make up must not
    /// accumulate (it is read again on its next use).
    async fn load_account(&self, name: &str) -> Arc<Credential> {
        let Accounts::Many(map) = &self.accounts else { unreachable!("checked by find_credential") };
        let credential =
            map.pin().get_or_insert_with(name.into(), || Arc::new(Credential::new(Some(name)))).clone();
        credential
            .loaded
            .get_or_init(|| async {
                self.reload(&credential).await;
            })
            .await;
        // Only an account the store has nothing for is dropped: one whose document exists but
        // cannot be used (sealed with another key, unparsable, a refused token) stays listed on
        // /tokens with what is wrong with it.
        let nothing_stored = matches!(credential.status().file, FileStatus::Missing | FileStatus::NotRead);
        if credential.current().is_none() && nothing_stored && !self.creates_token_files() {
            map.pin().remove_if(name, |_, c| Arc::ptr_eq(c, &credential) && c.current().is_none()).ok();
        }
        credential
    }

    /// After a person connected `account` (SPEC §9): reads its newly stored token into the cache
    /// now, without waiting for the watcher, and returns the token in use afterwards. A changed
    /// document also clears `needs_reauth` and any backoff.
    pub async fn adopt_connected(&self, account: Option<&str>) -> Option<Arc<Token>> {
        let credential = match self.single() {
            Some(single) => single.clone(),
            None => {
                let name = account?;
                match self.loaded_account(name) {
                    Some(loaded) => loaded,
                    // Not loaded yet: loading it reads the new document.
                    None => return self.credential_for(Some(name)).await.ok()?.current(),
                }
            }
        };
        self.reload(&credential).await;
        credential.current()
    }

    /// The token endpoint settings, for onboarding.
    pub fn oauth(&self) -> Option<&crate::config::OAuthConfig> {
        self.config.oauth.as_ref()
    }

    /// The store this provider's tokens live in.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// Loads the accounts that start loaded: a single-account provider's one, a multi-account
    /// provider's `default_account`.
    async fn load_at_start(&self) {
        match &self.accounts {
            Accounts::One(credential) => {
                self.reload(credential).await;
                let _ = credential.loaded.set(());
            }
            Accounts::Many(map) => {
                if let Some(name) = &self.config.default_account {
                    let credential = Arc::new(Credential::new(Some(name)));
                    self.reload(&credential).await;
                    let _ = credential.loaded.set(());
                    map.pin().insert(name.as_str().into(), credential);
                }
            }
        }
    }

    /// The accounts that have a stored token, sorted (for `check`; the proxy itself loads
    /// accounts on first use).
    pub async fn account_names_stored(&self) -> Result<Vec<String>, StoreError> {
        self.store.accounts(self.name()).await
    }

    /// Reads account `name` (checked) into a credential of its own, outside the cache (for
    /// `check`).
    pub async fn read_account(&self, name: &str) -> Arc<Credential> {
        let credential = Arc::new(Credential::new(Some(name)));
        self.reload(&credential).await;
        credential
    }

    /// Every loaded credential (for the admin view, the watcher and the gauges).
    pub fn credentials(&self) -> Vec<Arc<Credential>> {
        match &self.accounts {
            Accounts::One(credential) => vec![credential.clone()],
            Accounts::Many(map) => {
                let mut all: Vec<_> = map.pin().values().filter(|c| c.is_loaded()).cloned().collect();
                all.sort_by(|a, b| a.account().cmp(&b.account()));
                all
            }
        }
    }

    /// The loaded credential of account `name`, if any.
    pub fn loaded_account(&self, name: &str) -> Option<Arc<Credential>> {
        match &self.accounts {
            Accounts::One(_) => None,
            Accounts::Many(map) => map.pin().get(name).filter(|c| c.is_loaded()).cloned(),
        }
    }

    /// Whether a refresh can create a missing token file (a `client_credentials` grant needs no
    /// refresh token).
    pub fn creates_token_files(&self) -> bool {
        self.can_refresh()
            && self.config.oauth.as_ref().is_some_and(|o| o.grant == crate::config::Grant::ClientCredentials)
    }

    /// A problem of the provider itself, not of one account: `invalid_client`, or a store that
    /// fails for every account (an unreadable token folder). Only this makes a multi-account
    /// provider unready.
    pub async fn provider_problem(&self) -> Option<String> {
        if let Some(error) = self.provider_error.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(error);
        }
        self.store.problem(self.name()).await
    }

    pub(super) fn set_provider_error(&self, error: Option<String>) {
        *self.provider_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// How many loaded accounts are in each state (the `tokenproxy_accounts` gauge).
    pub fn account_states(&self, now: OffsetDateTime) -> Vec<(TokenState, usize)> {
        let mut counts = TokenState::ALL.map(|s| (s, 0usize));
        for credential in self.credentials() {
            let state = self.state(&credential, now);
            if let Some(entry) = counts.iter_mut().find(|(s, _)| *s == state) {
                entry.1 += 1;
            }
        }
        counts.to_vec()
    }

    /// Whether tokenproxy can refresh this provider's token itself.
    pub fn can_refresh(&self) -> bool {
        self.endpoint.is_some()
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What the store keys a credential by.
    pub fn key<'a>(&'a self, cred: &'a Credential) -> Key<'a> {
        Key { provider: self.name(), account: cred.account() }
    }

    /// Where a credential's token is kept, for the person who must act on it (with the account's
    /// name in clear: not for logs).
    pub fn location(&self, cred: &Credential) -> String {
        self.store.location(self.key(cred))
    }

    /// Where a credential's token is kept, as messages that reach logs say it: the account named
    /// by its fingerprint.
    pub(super) fn shown_location(&self, cred: &Credential) -> String {
        let label = cred.account_log().map(|log| format!("<account {log}>"));
        self.store.location(Key { provider: self.name(), account: label.as_deref() })
    }

    /// Reads the credential's stored token again and adopts it if it changed. A refreshed token
    /// that waited for a file to parse again is written into it.
    ///
    /// A document that cannot be read or parsed never replaces a good token: the last good one
    /// stays in use and the problem shows as `last_error`.
    pub async fn reload(&self, cred: &Credential) -> Reload {
        let read = self.read_store(cred).await;
        if let Some(fields) = read.write_back {
            let _lock = self.store.lock(self.key(cred)).await;
            self.persist(cred, &fields, read.basis).await;
            tracing::info!(
                provider = self.name(),
                account = cred.account_log(),
                "the token file parses again; the refreshed token is written into it"
            );
        }
        read.outcome
    }

    /// [`Provider::reload`], unless the store's probe says nothing changed since the last read:
    /// what a poll of many accounts does.
    pub async fn reload_if_touched(&self, cred: &Credential) -> Reload {
        let probe = self.store.probe(self.key(cred)).await;
        let unchanged = probe.is_some() && cred.status().probe == probe;
        if unchanged { Reload::Unchanged } else { self.reload(cred).await }
    }

    /// Reads the credential's document and adopts its token if its version is new; the caller
    /// writes what it returns to write back (under the store's lock).
    pub(super) async fn read_store(&self, cred: &Credential) -> StoreRead {
        let key = self.key(cred);
        let probe = self.store.probe(key).await;
        let loaded = match self.store.load(key).await {
            // Nothing stored: seeded (from a token file) only by a replica that holds nothing
            // itself; one that holds a token writes its own back below (SPEC §11).
            Ok(Loaded::Missing) if cred.status().held.is_none() => self.store.seed(key).await,
            other => other,
        };
        let shown = self.shown_location(cred);
        let mut status = cred.status();
        status.probe = probe;
        let unchanged = || StoreRead {
            outcome: Reload::Unchanged,
            adopted: None,
            write_back: None,
            fields: None,
            basis: Basis::Stored(None),
            lost: false,
        };
        let mut read = StoreRead { outcome: Reload::Ok, ..unchanged() };
        // A shared store that lost what this replica holds, or holds something older (a Redis
        // restarted empty and re-seeded from an old token file, a failover before a write
        // replicated): the newest token wins, and this replica writes its own back (SPEC §11).
        if let Some(held) = status.held.clone() {
            let stored_at = match &loaded {
                Ok(Loaded::Missing) => Some(None),
                Ok(Loaded::Found { doc: Ok(doc), .. }) => Some(file::updated_at(&doc.fields)),
                _ => None,
            };
            if let Some(stored_at) = stored_at.filter(|at| file::is_older(*at, held.updated_at)) {
                let basis = match &loaded {
                    Ok(Loaded::Found { version, .. }) => Basis::Stored(Some(*version)),
                    _ => Basis::Stored(None),
                };
                drop(status);
                tracing::warn!(
                    provider = self.name(),
                    account = cred.account_log(),
                    location = %shown,
                    stored = if stored_at.is_some() { "older" } else { "nothing" },
                    "the token store holds an older token than this replica (or none): writing this replica's back"
                );
                let mut restored = (*held.fields).clone();
                let now = self.clock.now().format(&Rfc3339).unwrap_or_default();
                restored.insert(file::RESTORED_AT.into(), serde_json::Value::String(now));
                return StoreRead {
                    write_back: Some(restored.clone()),
                    fields: Some(restored),
                    basis,
                    lost: true,
                    ..unchanged()
                };
            }
        }
        let (file_status, error) = match loaded {
            Ok(Loaded::Missing) => {
                if status.file == FileStatus::Missing {
                    return unchanged();
                }
                status.version = None;
                read.outcome = Reload::IoError;
                (FileStatus::Missing, format!("{shown}: not found"))
            }
            Err(e) => {
                if status.file == FileStatus::Unreadable {
                    return unchanged();
                }
                status.version = None;
                read.outcome = Reload::IoError;
                (FileStatus::Unreadable, format!("{shown}: {e}"))
            }
            Ok(Loaded::Found { version, doc, sealed }) => {
                let unsealed = self.store.seals() && !sealed && doc.is_ok();
                if unsealed && !status.unsealed {
                    tracing::warn!(
                        provider = self.name(),
                        account = cred.account_log(),
                        location = %shown,
                        "a token document is in plaintext although encryption at rest is configured (planted over a sealed one?); it is used, and sealed on its next write"
                    );
                }
                status.unsealed = unsealed;
                if status.version == Some(version) {
                    return match doc {
                        Ok(doc) if status.file != FileStatus::Unparsable => StoreRead {
                            fields: Some(doc.fields),
                            basis: Basis::Stored(Some(version)),
                            ..unchanged()
                        },
                        _ => StoreRead { basis: Basis::Unparsable(version), ..unchanged() },
                    };
                }
                status.version = Some(version);
                read.basis = Basis::Stored(Some(version));
                match doc.and_then(|doc| {
                    let (doc, merged) = reconcile_pending(&mut status, doc);
                    self.adopt(cred, &doc).map(|token| (doc, merged, token))
                }) {
                    Ok((doc, merged, token)) => {
                        // A changed document is a new chance: whatever stopped automatic
                        // refreshes (a revoked refresh token, a backoff) may be fixed by it.
                        status.refresh_token = file::refresh_token(&doc.fields);
                        if self.store.shared() {
                            status.held = Some(Held::of(merged.as_ref().unwrap_or(&doc.fields)));
                        }
                        status.reauth_reason = None;
                        status.config_error = None;
                        status.retry_not_before = None;
                        status.last_failure = None;
                        read.fields = Some(merged.clone().unwrap_or(doc.fields));
                        read.write_back = merged;
                        read.adopted = Some(token);
                        (FileStatus::Ok, String::new())
                    }
                    Err(e) => {
                        read.outcome = Reload::ParseError;
                        read.basis = Basis::Unparsable(version);
                        (FileStatus::Unparsable, format!("{shown}: {e}"))
                    }
                }
            }
        };
        status.file = file_status.clone();
        status.store_error = (file_status != FileStatus::Ok).then(|| error.clone());
        drop(status);
        let label = match read.outcome {
            Reload::Ok => "ok",
            Reload::ParseError => "parse_error",
            _ => "io_error",
        };
        metrics::token_reload(self.name(), label);
        let account = cred.account_log();
        if let Some(token) = &read.adopted {
            let write_error = cred.status().write_error.clone();
            cred.status().last_error = write_error;
            tracing::info!(
                provider = self.name(),
                account,
                fingerprint = %token.fingerprint,
                expires_at = %fmt_time(token.expires_at).unwrap_or_else(|| "unknown".into()),
                expiry_source = token.expiry_source.as_str(),
                "token loaded from file"
            );
        } else {
            match cred.current().map(|t| t.fingerprint.clone()) {
                Some(kept) => tracing::warn!(
                    provider = self.name(),
                    account,
                    error = %error,
                    kept_fingerprint = %kept,
                    "token file not usable; keeping the last good token"
                ),
                None if file_status == FileStatus::Missing && self.config.oauth.is_some() => tracing::info!(
                    provider = self.name(),
                    account,
                    location = %shown,
                    "no token file yet; the first refresh or authorization creates it"
                ),
                None => tracing::warn!(
                    provider = self.name(),
                    account,
                    error = %error,
                    "token file not usable; no token yet"
                ),
            }
            cred.status().last_error = Some(error);
        }
        read
    }

    /// Makes `doc`'s token the credential's current one: one atomic swap, seen by the next
    /// request. Returns the token stored, which a caller uses rather than loading the current
    /// one again (a concurrent re-read may have replaced it meanwhile).
    pub fn adopt(&self, cred: &Credential, doc: &TokenDocument) -> Result<Arc<Token>, String> {
        let token = self.prepare(doc)?;
        // The token in use read again (a store that was unreachable came back, a rewrite with
        // other fields or another expiry): not a new token, so a request that saw it fail, or a
        // refresh asked for it, still counts it as seen. Only its expiry may be news.
        if let Some(current) = cred.current()
            && current.fingerprint == token.fingerprint
        {
            if current.expires_at == token.expires_at {
                return Ok(current);
            }
            return Ok(cred.install_as(token, current.generation));
        }
        Ok(cred.install(token))
    }

    /// The token `doc` stands for, ready for the request path but not yet in use: a refresh
    /// checks it can be used before writing it anywhere.
    fn prepare(&self, doc: &TokenDocument) -> Result<Token, String> {
        let value = format!("{}{}{}", self.config.format_prefix, doc.access_token, self.config.format_suffix);
        let mut header_value = HeaderValue::from_str(&value)
            .map_err(|_| "access_token has characters not allowed in an HTTP header".to_string())?;
        header_value.set_sensitive(true);
        let mut token = Token {
            header_value,
            fingerprint: fingerprint(&doc.access_token),
            expires_at: doc.expires_at,
            expiry_source: doc.expiry_source,
            issued_at: doc.issued_at,
            refresh_due_at: None,
            generation: 0,
        };
        let margin = time::Duration::try_from(self.refresh_margin(&token)).unwrap_or(time::Duration::ZERO);
        token.refresh_due_at = token.expires_at.map(|at| at - margin);
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

    pub fn state(&self, cred: &Credential, now: OffsetDateTime) -> TokenState {
        let (file, reauth, config_error) = {
            let s = cred.status();
            (s.file.clone(), s.reauth_reason.is_some(), s.config_error.is_some())
        };
        if reauth {
            return TokenState::NeedsReauth;
        }
        if config_error {
            return TokenState::Error;
        }
        if cred.refreshing.load(Ordering::Relaxed) {
            return TokenState::Refreshing;
        }
        match cred.current() {
            None if matches!(file, FileStatus::Missing | FileStatus::NotRead) => TokenState::Missing,
            None => TokenState::Error,
            Some(t) => match self.freshness(&t, now) {
                Freshness::Expired => TokenState::Expired,
                Freshness::Expiring => TokenState::Expiring,
                Freshness::Fresh { .. } | Freshness::Unknown => TokenState::Valid,
            },
        }
    }

    /// The one `502 token_unavailable` answer, with what to do about it. Its reason never names
    /// an account in clear (it reaches logs); its action does (it is what the caller must run).
    pub fn unavailable(&self, cred: &Credential, why: Unavailable<'_>) -> ProxyError {
        let shown = self.shown_location(cred);
        let (reason, action) = match why {
            // Nothing to refresh with: said as for a credential without a token.
            Unavailable::Refresh(e) if e.kind == crate::oauth::RefreshErrorKind::NoToken => {
                return self.unavailable(cred, Unavailable::NoToken);
            }
            Unavailable::Refresh(e) => {
                let action = match e.kind {
                    crate::oauth::RefreshErrorKind::InvalidGrant => self.authorize_action(cred),
                    _ => e.action(&self.location(cred)),
                };
                (e.to_string(), action)
            }
            Unavailable::Timeout(limit) => (
                format!("no fresh token within {}s; the refresh goes on in the background", limit.as_secs()),
                "look at /tokens in a moment; if this persists, check the token endpoint's health".into(),
            ),
            Unavailable::NoToken => match (self.view(cred, self.clock.now()), cred.account()) {
                (view, Some(_)) if view.state == TokenState::Missing => {
                    (format!("the account has no token yet ({shown})"), self.authorize_action(cred))
                }
                (view, None) if view.state == TokenState::Missing => {
                    (format!("{shown} does not exist"), self.authorize_action(cred))
                }
                (view, _) => (
                    view.last_error.unwrap_or_else(|| "no token loaded".into()),
                    format!("fix {shown}; it is picked up without a restart"),
                ),
            },
        };
        ProxyError::TokenUnavailable {
            provider: self.name().to_string(),
            account: cred.account().map(str::to_string),
            reason,
            action,
        }
    }

    /// What gets a credential its first token, or a new one after revocation: the onboarding
    /// flows (SPEC §9; an account's answer always names them, SPEC §8), else writing the token by
    /// hand.
    fn authorize_action(&self, cred: &Credential) -> String {
        let location = self.location(cred);
        let oauth = self.config.oauth.as_ref();
        let browser = oauth.is_some_and(|o| o.authorize_url.is_some());
        let device = oauth.is_some_and(|o| o.device_authorization_url.is_some());
        let name = self.name();
        if cred.account().is_none() && !browser && !device {
            return format!(
                "re-authorize: put a new refresh_token (or token) into {location}; tokenproxy picks it up \
                 without a restart (or set authorize_url in [providers.{name}.oauth] to connect from /connect)"
            );
        }
        let account = cred.account().map(|a| format!(" --account {a}")).unwrap_or_default();
        let device_only = device && !browser;
        let command =
            format!("tokenproxy authorize {name}{account}{}", if device_only { " --device" } else { "" });
        let page = if device_only { "" } else { ", or use Connect on the admin listener's /connect page" };
        let setup = if browser || device {
            String::new()
        } else {
            format!(" (once [providers.{name}.oauth] has an authorize_url)")
        };
        format!(
            "re-authorize: run `{command}`{page}{setup}; it writes {location}, which is picked up without a restart"
        )
    }

    /// A credential as `GET /tokens` shows it. Holds fingerprints only.
    pub fn view(&self, cred: &Credential, now: OffsetDateTime) -> TokenView {
        let state = self.state(cred, now);
        let token = cred.current();
        let status = cred.status();
        TokenView {
            provider: self.name().to_string(),
            account: cred.account().map(str::to_string),
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
            warning: status.unsealed.then(|| {
                format!(
                    "{} is stored in plaintext although encryption at rest is configured: it was not written by tokenproxy (planted over a sealed one?); it is sealed on its next write",
                    self.shown_location(cred)
                )
            }),
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
    let fields = file::overlay_refresh(&doc.fields, &pending.fields);
    match file::document_from_fields(fields.clone()) {
        Ok(merged) => (merged, Some(fields)),
        Err(_) => (doc, None),
    }
}

/// A time as the admin API, the page and logs show it: RFC 3339 in whole seconds (a refresh's
/// nanoseconds are noise to a person).
pub fn fmt_time(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.replace_nanosecond(0).ok()).and_then(|t| t.format(&Rfc3339).ok())
}

/// One provider on `GET /tokens` (SPEC §6).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    pub provider: String,
    /// The account's name; `null` for a single-account provider.
    pub account: Option<String>,
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
    /// Something to know that is not an error: a plaintext token document where encryption at
    /// rest is configured (planted over a sealed one, or not written by tokenproxy yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Every configured provider, with host lookup.
pub struct Providers {
    list: Vec<Arc<Provider>>,
    store: Arc<dyn TokenStore>,
}

impl Providers {
    /// Builds the providers on `store` and reads each token that starts loaded once.
    pub async fn load(
        configs: &[ProviderConfig],
        oauth_client: Option<OAuthClient>,
        wait_limit: Duration,
        store: Arc<dyn TokenStore>,
    ) -> Providers {
        let list: Vec<Arc<Provider>> = configs
            .iter()
            .cloned()
            .map(|c| {
                let endpoint = oauth_client.clone().map(|client| Arc::new(client) as Arc<dyn TokenEndpoint>);
                Arc::new(Provider::new(c, endpoint, wait_limit, store.clone()))
            })
            .collect();
        for provider in &list {
            provider.load_at_start().await;
        }
        Providers { list, store }
    }

    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
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

    /// Reads again what a change reported by the store may have touched. A key's own change
    /// reads it; a change that names no key checks every loaded credential cheaply first (a
    /// multi-account provider may have thousands).
    pub async fn apply(&self, change: &Change) {
        match change {
            Change::Key { provider, account } => {
                let Some(provider) = self.get(provider) else { return };
                let credential = match account {
                    Some(name) => provider.loaded_account(name),
                    None => provider.single().cloned(),
                };
                if let Some(credential) = credential {
                    provider.reload(&credential).await;
                }
            }
            Change::Provider(name) => {
                if let Some(provider) = self.get(name) {
                    provider.reload_touched().await;
                }
            }
            Change::Everything => {
                for provider in &self.list {
                    provider.reload_touched().await;
                }
            }
        }
    }
}

impl Provider {
    /// Reads again every loaded credential whose probe changed (a single-account provider's one
    /// always: its content decides, and reading one document costs nothing).
    async fn reload_touched(&self) {
        for credential in self.credentials() {
            if self.is_multi_account() {
                self.reload_if_touched(&credential).await;
            } else {
                self.reload(&credential).await;
            }
        }
    }
}

/// What [`Provider::read_store`] found.
pub(super) struct StoreRead {
    pub(super) outcome: Reload,
    /// The token adopted from a new version.
    pub(super) adopted: Option<Arc<Token>>,
    /// A refreshed token merged into a document that parses again, to be written.
    pub(super) write_back: Option<store::Fields>,
    /// The stored document's fields, when it parses: the base of a refresh's write.
    pub(super) fields: Option<store::Fields>,
    /// What a write based on this read is based on.
    pub(super) basis: Basis,
    /// The shared store had nothing or something older than the document this replica holds,
    /// which is `write_back`.
    pub(super) lost: bool,
}

/// The stored content a write is based on: the store writes only over that content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Basis {
    /// A document that parsed, at this version, or none.
    Stored(Option<store::Version>),
    /// A document that does not parse (a person may be mid-edit): never written over.
    Unparsable(store::Version),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use serde_json::json;

    use super::store::memory::MemoryStore;
    use super::*;

    async fn providers_on(store: Arc<MemoryStore>, dir: &std::path::Path) -> Providers {
        let toml = dir.join("tokenproxy.toml");
        std::fs::write(
            &toml,
            "[providers.one]\nhosts = [\"one.test\"]\ntoken_file = \"one.json\"\n\
             [providers.many]\nhosts = [\"many.test\"]\ntoken_file = \"users/{account}.json\"\n",
        )
        .unwrap();
        let configs = crate::config::Config::load(&toml).unwrap().providers;
        std::fs::remove_file(&toml).unwrap();
        Providers::load(&configs, None, Duration::from_secs(30), store).await
    }

    fn key<'a>(provider: &'a str, account: Option<&'a str>) -> Key<'a> {
        Key { provider, account }
    }

    #[tokio::test]
    async fn the_cache_works_on_any_store_and_reads_writes_and_follows_only_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MemoryStore::default());
        store.put(key("one", None), json!({"access_token": "o1", "expires_at": "2099-01-01T00:00:00Z"}));
        store.put(key("many", Some("alice")), json!({"access_token": "a1", "refresh_token": "r1"}));
        let providers = providers_on(store.clone(), dir.path()).await;
        let (one, many) = (providers.get("one").unwrap(), providers.get("many").unwrap());
        assert_eq!(one.single().unwrap().current().unwrap().fingerprint, fingerprint("o1"));

        // An account is read on first use; one the store does not have is not kept.
        let alice = many.credential_for(Some("alice")).await.unwrap();
        assert_eq!(alice.current().unwrap().fingerprint, fingerprint("a1"));
        assert!(many.credential_for(Some("bob")).await.unwrap().current().is_none());
        assert_eq!(many.credentials().len(), 1);

        // A change the store reports is adopted; the same version again is nothing.
        store.put(
            key("many", Some("alice")),
            json!({"access_token": "a2", "refresh_token": "r1", "note": "n"}),
        );
        let change = Change::Key { provider: "many".into(), account: Some("alice".into()) };
        providers.apply(&change).await;
        assert_eq!(alice.current().unwrap().fingerprint, fingerprint("a2"));
        assert_eq!(many.reload(&alice).await, Reload::Unchanged);

        // A write names the version it was based on: our own write reads back as unchanged...
        let refreshed = |token: &str| match json!({"access_token": token, "refresh_token": "r2"}) {
            serde_json::Value::Object(fields) => fields,
            _ => unreachable!(),
        };
        let basis = Basis::Stored(alice.status().version);
        many.persist(&alice, &refreshed("a3"), basis).await;
        assert_eq!(store.get(key("many", Some("alice"))).unwrap()["access_token"], "a3");
        assert_eq!(many.reload(&alice).await, Reload::Unchanged);
        // ...and a write after another writer's change keeps its other fields, ours win.
        store.put(
            key("many", Some("alice")),
            json!({"access_token": "a3", "refresh_token": "r2", "edited": 1}),
        );
        let basis = Basis::Stored(alice.status().version);
        many.persist(&alice, &refreshed("a4"), basis).await;
        let stored = store.get(key("many", Some("alice"))).unwrap();
        assert_eq!((stored["access_token"].as_str(), stored["edited"].as_i64()), (Some("a4"), Some(1)));
        assert_eq!(store.saves.load(Ordering::Relaxed), 2);
        assert!(alice.status().write_error.is_none());

        // Messages name the store's location, with the account by fingerprint.
        let shown = many.shown_location(&alice);
        assert!(shown.starts_with("memory key many/<account ") && !shown.contains("alice"), "{shown}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a file was touched");
    }
}
