//! The token cache: one [`Provider`] per configured provider (its settings, token endpoint and
//! refresh policy), each with a [`Credential`] per account (one for a single-account provider)
//! holding its current token in an `ArcSwap` that the request path reads without a lock and
//! without file I/O.
//!
//! The [`store`] is the source of truth. The cache changes only when a stored document changes
//! (see [`watch`]) or when a refresh completes; it never holds anything the store did not say,
//! except a token kept in use after its document became unreadable, or a refreshed token whose
//! write failed.
//!
//! Split along its seams: here the cache and the choice of a credential; [`refresh`] decides
//! when a token is asked for and talks to an [`endpoint::TokenEndpoint`]; `reconcile` follows
//! the store; `view` is what the admin API and a 502 say; [`clock`] is the time they all read.

pub mod clock;
mod credential;
pub mod endpoint;
pub mod file;
mod reconcile;
pub mod refresh;
pub mod store;
mod view;
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
use reconcile::Basis;
use store::{Change, Key, Loaded, StoreError, TokenStore};
pub use view::TokenView;

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
    /// A provider that signs its requests (AWS SigV4) instead of injecting a token: its
    /// credentials. Such a provider has one credential that never holds a token.
    pub signer: Option<Arc<crate::sigv4::Signer>>,
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
        let signer = config.sigv4.clone().map(|c| Arc::new(crate::sigv4::Signer::new(&config.name, c)));
        Provider {
            request_metrics: metrics::RequestMetrics::new(&config.name),
            signer,
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

    /// Whether a refresh can create a missing token file (a grant that mints, like
    /// `client_credentials`, needs no refresh token).
    pub fn creates_token_files(&self) -> bool {
        self.can_refresh() && self.config.oauth.as_ref().is_some_and(|o| o.grant.mints())
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

    /// Why the single credential's last refresh could not be recorded in the store, while that
    /// is still so (a success or an adopted token clears it): a store that answers but did not
    /// acknowledge a write (SPEC §11 `min_replicas_ack`) is as unable to refresh as one that is
    /// away. Accounts are left out, as on `/readyz` (one account never speaks for the pod).
    pub fn store_trouble(&self) -> Option<String> {
        let failure = self.single()?.status().last_failure.clone()?;
        (failure.kind == crate::oauth::RefreshErrorKind::StoreUnavailable)
            .then(|| format!("{}: {}", self.name(), failure.message))
    }

    pub(super) fn set_provider_error(&self, error: Option<String>) {
        *self.provider_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
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
}

/// A time as the admin API, the page and logs show it: RFC 3339 in whole seconds (a refresh's
/// nanoseconds are noise to a person).
pub fn fmt_time(t: Option<OffsetDateTime>) -> Option<String> {
    t.and_then(|t| t.replace_nanosecond(0).ok()).and_then(|t| t.format(&Rfc3339).ok())
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
            match (&provider.signer, &oauth_client) {
                (Some(signer), Some(client)) => signer.start(client.http()).await,
                (Some(_), None) => {}
                (None, _) => provider.load_at_start().await,
            }
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
