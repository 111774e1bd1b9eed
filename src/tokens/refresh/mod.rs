//! Refreshing a provider's token: single flight within a process, an advisory file lock across
//! processes, backoff for transient failures, and a stop on `invalid_grant`.
//!
//! Every caller (a request that found the token expired, a request that got a 401, the background
//! task, the admin API) goes through [`Provider::refresh`]. Callers queue on one async mutex; the
//! first does the work, and the others find on waking that the token they were unhappy with has
//! already been replaced, so any number of waiters share one call to the token endpoint.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use time::OffsetDateTime;

use super::credential::{FileStatus, Held, PendingWrite};
use super::endpoint::TokenEndpoint;
use super::file;
use super::store::{Fields, Loaded, SaveError};
use super::{Basis, Credential, Freshness, Provider, Reload, Token};
use crate::errors::report;
use crate::metrics;
use crate::oauth::{RefreshError, RefreshErrorKind};

/// How long refreshes wait after the store could not be locked.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How long a refresh waits after the shared store lost data, for the replicas to write their
/// newest tokens back (each hears of the loss within about 100 ms of the first write-back).
const CONVERGE_AFTER_LOSS: Duration = Duration::from_secs(1);

/// Why a refresh was asked for: the `trigger` label of `tokenproxy_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Proactive,
    Expired,
    Unauthorized,
    Manual,
    Startup,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Proactive => "proactive",
            Trigger::Expired => "expired",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Manual => "manual",
            Trigger::Startup => "startup",
        }
    }
}

/// Transient failures are retried after `BACKOFF_BASE * 2^attempt` at most (full jitter), capped.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
const MAX_ATTEMPTS: u32 = 5;
/// How long one refresh may keep retrying when nobody is waiting for it.
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(120);
/// After an account's requests start a proactive refresh, the longest before they may start
/// another (a success replaces the token, which ends the margin; a failure sets its backoff).
const PROACTIVE_PAUSE: Duration = Duration::from_secs(30);

/// What the store held when a refresh took its lock.
enum Newer {
    /// A token another process wrote: no refresh needed.
    Adopted(Arc<Token>),
    /// Nothing newer; the stored document's fields (empty when there is none or it does not
    /// parse), the base of the refresh's write, and the content they were read from.
    Base(Fields, Basis),
    /// The shared store had nothing, or something older than this replica holds: it lost data,
    /// and this replica's document was written back.
    Lost,
}

impl Newer {
    /// How much longer a refresh should wait for the fleet to converge after the shared store
    /// lost data: the whole pause for the replica that found the loss, the rest of it for one
    /// that reads a document written back moments ago.
    fn converging(&self, now: OffsetDateTime) -> Option<Duration> {
        match self {
            Newer::Lost => Some(CONVERGE_AFTER_LOSS),
            Newer::Base(fields, _) => {
                let at = fields.get(file::RESTORED_AT)?.as_str()?;
                let at = OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
                let left = (at + CONVERGE_AFTER_LOSS) - now;
                (left > time::Duration::ZERO).then(|| left.unsigned_abs())
            }
            Newer::Adopted(_) => None,
        }
    }
}

/// The basis of a write that found `current` stored instead of what it was based on: a
/// document that parses gets the refresh's fields laid on top (a person's edit is kept, the
/// refresh's tokens win).
fn on_top_of(current: Loaded, fields: &mut Fields) -> Basis {
    match current {
        Loaded::Missing => Basis::Stored(None),
        Loaded::Found { version, doc: Ok(doc), .. } => {
            *fields = file::overlay_refresh(&doc.fields, fields);
            Basis::Stored(Some(version))
        }
        Loaded::Found { version, doc: Err(_), .. } => Basis::Unparsable(version),
    }
}

/// Why a refreshed token was not written.
enum Unwritten {
    /// The stored document does not parse: it waits in memory.
    Unparsable,
    Failed(String),
    /// Written, but not held by `min_replicas_ack` replicas in time: a failover could take it
    /// back, so it is not used until a later write of it is acknowledged.
    Unacknowledged(String),
}

/// What [`Provider::persist`] did with a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Persisted {
    Written,
    /// Not written (kept in memory, and used).
    Kept,
    /// Not acknowledged: kept in memory, not used yet.
    Unacknowledged,
}

/// A uniformly random duration in `[0, max)`, without a dependency: the std hasher is randomly
/// keyed per process.
pub fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    max.mul_f64(unit)
}

fn no_token_endpoint() -> RefreshError {
    RefreshError::new(
        RefreshErrorKind::BadResponse,
        "no [oauth] section: tokenproxy cannot refresh this token; update the token file",
    )
}

/// Whole milliseconds, rounded down: tokio's timer rounds a sleep up to the next millisecond,
/// so a fraction would let the wait reach the bound the jitter stays below.
fn backoff(attempt: u32) -> Duration {
    let waited = jitter(BACKOFF_BASE.saturating_mul(2u32.saturating_pow(attempt)).min(BACKOFF_CAP));
    Duration::from_millis(waited.as_millis() as u64)
}

impl Provider {
    /// Refreshes the token (or adopts one another process wrote) and returns the token to use.
    ///
    /// `seen` is the generation of the token the caller is unhappy with; if the current token is
    /// already newer, it is returned without a refresh. A refresh after a transient failure waits
    /// for its backoff to pass (see [`Provider::refresh_forced`] for the exception).
    pub async fn refresh(
        self: &Arc<Self>,
        cred: &Arc<Credential>,
        trigger: Trigger,
        seen: Option<u64>,
    ) -> Result<Arc<Token>, RefreshError> {
        self.refresh_with(cred, trigger, seen, false).await
    }

    /// A manual refresh that does not wait for the backoff of a failing token endpoint (the
    /// admin API's `?force=true`). It still joins a refresh in flight.
    pub async fn refresh_forced(
        self: &Arc<Self>,
        cred: &Arc<Credential>,
        seen: Option<u64>,
    ) -> Result<Arc<Token>, RefreshError> {
        self.refresh_with(cred, Trigger::Manual, seen, true).await
    }

    async fn refresh_with(
        self: &Arc<Self>,
        cred: &Arc<Credential>,
        trigger: Trigger,
        seen: Option<u64>,
        force: bool,
    ) -> Result<Arc<Token>, RefreshError> {
        if self.token_endpoint().is_err() {
            // No token endpoint: the store is all there is. Read it again in case it changed.
            self.reload(cred).await;
            return match cred.current() {
                Some(t) if seen.is_none_or(|g| t.generation > g) => Ok(t),
                _ => Err(no_token_endpoint()),
            };
        }
        if cred.account().is_some() && cred.current().is_none() && !self.creates_token_files() {
            // Only a person can give an account its first token (or fix a stored document that
            // cannot be used): nothing to send, nothing to lock. What is wrong is the store's
            // own finding, not a grant the provider refused.
            let status = cred.status();
            let message = match (&status.file, &status.store_error) {
                (FileStatus::Missing | FileStatus::NotRead, _) | (_, None) => {
                    format!("the account has no token yet ({})", self.shown_location(cred))
                }
                (_, Some(problem)) => format!("the stored token cannot be used: {problem}"),
            };
            return Err(RefreshError::new(RefreshErrorKind::NoToken, message));
        }
        let _flight = cred.refresh_lock.lock().await;
        if let Some(token) = cred.current()
            && !self.needs_refresh(&token, trigger, seen)
        {
            return Ok(token);
        }
        {
            let status = cred.status();
            // A revoked refresh token stops automatic refreshes; a person asking is the exception.
            if let Some(reason) = &status.reauth_reason
                && trigger != Trigger::Manual
            {
                return Err(RefreshError::new(RefreshErrorKind::InvalidGrant, reason.clone()));
            }
            if let (Some(until), Some(last)) = (status.retry_not_before, &status.last_failure)
                && Instant::now() < until
                && !force
            {
                let mut waiting = last.clone();
                waiting.message = format!(
                    "{} (backing off for {}s more)",
                    waiting.message,
                    until.saturating_duration_since(Instant::now()).as_secs() + 1
                );
                return Err(waiting);
            }
        }
        let deadline = match trigger {
            Trigger::Proactive => BACKGROUND_DEADLINE,
            // Someone is waiting: no longer than the upstream timeout that bounds every wait.
            _ => self.wait_limit,
        };
        cred.refreshing.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.refresh_under_store_lock(cred, trigger, seen, started + deadline).await;
        cred.refreshing.store(false, Ordering::Relaxed);
        self.record(cred, trigger, started.elapsed(), &result);
        result
    }

    /// The provider's `[oauth]` settings and where its tokens come from.
    fn token_endpoint(&self) -> Result<(&crate::config::OAuthConfig, &dyn TokenEndpoint), RefreshError> {
        match (&self.config.oauth, &self.endpoint) {
            (Some(oauth), Some(endpoint)) => Ok((oauth, endpoint.as_ref())),
            _ => Err(no_token_endpoint()),
        }
    }

    /// Whether `token` is still what the trigger complains about.
    fn needs_refresh(&self, token: &Token, trigger: Trigger, seen: Option<u64>) -> bool {
        let now = self.clock.now();
        match trigger {
            // Both name the token they are unhappy with; a newer one is the answer.
            Trigger::Manual | Trigger::Unauthorized => seen.is_none_or(|g| token.generation <= g),
            Trigger::Expired | Trigger::Startup => self.freshness(token, now) == Freshness::Expired,
            Trigger::Proactive => {
                matches!(self.freshness(token, now), Freshness::Expired | Freshness::Expiring)
            }
        }
    }

    /// The refresh itself, under the store's lock: another process (or replica) that refreshed
    /// while we waited for the lock has written its token, which is adopted instead.
    async fn refresh_under_store_lock(
        self: &Arc<Self>,
        cred: &Arc<Credential>,
        trigger: Trigger,
        seen: Option<u64>,
        deadline: Instant,
    ) -> Result<Arc<Token>, RefreshError> {
        let take_lock = || async {
            self.store.lock(self.key(cred)).await.map_err(|e| {
                // Nothing was spent; try again soon rather than on every request meanwhile.
                cred.status().retry_not_before = Some(Instant::now() + STORE_RETRY);
                let what = format!("{}: cannot take the refresh lock", self.shown_location(cred));
                RefreshError::new(RefreshErrorKind::StoreUnavailable, what).caused_by(e)
            })
        };
        let mut lock = take_lock().await?;
        let mut newer = self.adopt_newer(cred, trigger).await?;
        if let Some(wait) = newer.converging(self.clock.now()) {
            // The shared store lost data a moment ago, and this replica's document (or another
            // replica's) was written back. Another replica may hold a newer token still (its
            // refresh token is the live one, and this one's may be spent): the fleet is given a
            // moment, without the lock, to write the newest back and for this replica to adopt
            // it, before anything is spent.
            drop(lock);
            tracing::info!(
                provider = self.name(),
                account = cred.account_log(),
                wait_ms = wait.as_millis() as u64,
                "the token store lost data moments ago; waiting for the fleet's newest token before refreshing"
            );
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            lock = take_lock().await?;
            newer = self.adopt_newer(cred, trigger).await?;
        }
        let (mut base, basis) = match newer {
            Newer::Adopted(token) => {
                drop(lock);
                return Ok(token);
            }
            Newer::Base(fields, basis) => (fields, basis),
            Newer::Lost => {
                let held = cred.status().held.as_ref().map(|h| (*h.fields).clone()).unwrap_or_default();
                (held, Basis::Stored(None))
            }
        };
        // While this waited for the lock, the watcher may have adopted the token another process
        // (another replica) wrote: if that one will do, nothing is spent.
        if let Some(token) = cred.current()
            && !self.needs_refresh(&token, trigger, seen)
        {
            drop(lock);
            return Ok(token);
        }

        let (oauth, client) = self.token_endpoint()?;
        // The refresh token in memory, which may be newer than the stored one (a write failed).
        let refresh_token = cred.status().refresh_token.as_deref().map(str::to_string);
        if let Some(refresh_token) = &refresh_token {
            base.insert("refresh_token".into(), refresh_token.as_str().into());
        }
        let mut attempt = 0;
        let issued = loop {
            match client.issue(oauth, cred.account(), refresh_token.as_deref()).await {
                Ok(issued) => break issued,
                Err(e) if e.kind.is_transient() && attempt + 1 < MAX_ATTEMPTS => {
                    let delay = match e.kind {
                        RefreshErrorKind::RateLimited { retry_after: Some(after) } => after,
                        _ => backoff(attempt),
                    };
                    if Instant::now() + delay > deadline {
                        cred.status().retry_not_before = Some(Instant::now() + delay);
                        return Err(e);
                    }
                    tracing::warn!(
                        provider = self.name(),
                        account = cred.account_log(),
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "token refresh failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => {
                    if e.kind.is_transient() {
                        cred.status().retry_not_before = Some(Instant::now() + backoff(attempt + 1));
                    }
                    return Err(e);
                }
            }
        };

        let now = self.clock.now();
        let fields = file::refreshed_fields(&base, &issued, now);
        cred.status().replaced_fingerprint = cred.current().map(|t| t.fingerprint.clone());
        let doc = file::document_from_fields(fields.clone())
            .map_err(|e| RefreshError::new(RefreshErrorKind::BadResponse, e.to_string()))?;
        let token = self.prepare(&doc).map_err(|e| RefreshError::new(RefreshErrorKind::BadResponse, e))?;
        // On disk first, then in use: a request served with the new token finds it in the file
        // too (a failed write is reported, and the token is used all the same, unless a failover
        // could take the write back).
        let persisted = self.persist(cred, &fields, basis).await;
        drop(lock);
        if persisted == Persisted::Unacknowledged {
            cred.status().retry_not_before = Some(Instant::now() + STORE_RETRY);
            let error = cred.status().write_error.clone().unwrap_or_default();
            return Err(RefreshError::new(RefreshErrorKind::StoreUnavailable, error));
        }
        Ok(cred.install(token))
    }

    /// Adopts the stored token if another process wrote it since we last read or wrote it. A
    /// document that does not parse is left alone: the refresh goes on from memory, and its
    /// result waits to be written (see [`Provider::persist`]).
    async fn adopt_newer(
        self: &Arc<Self>,
        cred: &Arc<Credential>,
        trigger: Trigger,
    ) -> Result<Newer, RefreshError> {
        let before = cred.current().map(|t| t.fingerprint.clone());
        let read = self.read_store(cred).await;
        if let Some(fields) = &read.write_back {
            let persisted = self.persist(cred, fields, read.basis).await;
            if read.unacknowledged {
                // This replica's own refresh, held back until its write is acknowledged.
                if persisted != Persisted::Written {
                    let error = cred.status().write_error.clone().unwrap_or_default();
                    return Err(RefreshError::new(RefreshErrorKind::StoreUnavailable, error));
                }
                if let Some(token) = self.use_written(cred, fields) {
                    return Ok(Newer::Adopted(token));
                }
            }
            if read.lost {
                return Ok(Newer::Lost);
            }
        }
        // The store's own finding, not `last_error` (which a failed refresh overwrites with its
        // classed message: quoting that would prefix the class again on every attempt).
        if read.outcome == Reload::IoError && cred.status().file == FileStatus::Unreadable {
            let error = cred.status().store_error.clone().unwrap_or_default();
            return Err(RefreshError::new(RefreshErrorKind::StoreUnavailable, error));
        }
        // A stored document that cannot be used (unparsable, sealed with another key) and no
        // refresh token in memory: there is nothing to refresh with, and the problem is the
        // document, not the grant.
        if matches!(read.basis, Basis::Unparsable(_)) && cred.status().refresh_token.is_none() {
            let error = cred.status().store_error.clone().unwrap_or_default();
            return Err(RefreshError::new(RefreshErrorKind::StoreUnavailable, error));
        }
        let base = || Newer::Base(read.fields.clone().unwrap_or_default(), read.basis);
        let Some(token) = read.adopted.clone() else { return Ok(base()) };
        // The same token read again (a store that was unreachable came back) is not newer.
        if before.as_deref() == Some(token.fingerprint.as_str()) {
            return Ok(base());
        }
        // A newer token is the answer unless it is itself what the trigger complains about.
        if token.is_expired(self.clock.now()) && trigger != Trigger::Unauthorized {
            return Ok(base());
        }
        tracing::info!(
            provider = self.name(),
            account = cred.account_log(),
            fingerprint = %token.fingerprint,
            "adopted a token another process wrote; no refresh needed"
        );
        Ok(Newer::Adopted(token))
    }

    /// Writes `fields` through the store (the caller holds its lock), only over the content it was
    /// based on (read under the same lock; a watcher may have read newer content meanwhile, so
    /// not the credential's last version). A failure is logged, counted and shown, and traffic goes on with the new token in
    /// memory (FIELD-NOTES #3). A document that does not parse is never written over (SPEC §4):
    /// a person may be mid-edit; the fields wait in memory until it parses again. A document a
    /// person changed while the refresh was in flight keeps their other fields; the refresh's
    /// tokens win.
    pub(super) async fn persist(&self, cred: &Credential, fields: &Fields, mut basis: Basis) -> Persisted {
        let key = self.key(cred);
        cred.status().refresh_token = file::refresh_token(fields);
        // The document this replica holds is updated once the write is over, whatever its
        // outcome (a failed one is written back once the store takes it): set before, a re-read
        // racing the write would find the store "older" and write the same token a second time.
        let shared = self.store.shared();
        let mut fields = fields.clone();
        let unwritten = 'write: {
            // A conflict is retried on top of what is stored now, a bounded number of times.
            for _ in 0..3 {
                let expected = match basis {
                    Basis::Stored(version) => version,
                    // Unless it has changed since, it is left alone.
                    Basis::Unparsable(version) => match self.store.load(key).await {
                        Ok(Loaded::Found { version: now, doc: Err(_), .. }) if now == version => {
                            break 'write Unwritten::Unparsable;
                        }
                        Ok(current) => {
                            basis = on_top_of(current, &mut fields);
                            continue;
                        }
                        Err(e) => break 'write Unwritten::Failed(report(&e)),
                    },
                };
                match self.store.save(key, &fields, expected).await {
                    Ok(version) => {
                        let mut status = cred.status();
                        if shared {
                            status.held = Some(Held::of(&fields));
                        }
                        status.version = Some(version);
                        status.file = FileStatus::Ok;
                        // The failed write it shows as the last error is over.
                        if status.last_error.is_some() && status.last_error == status.write_error {
                            status.last_error = None;
                        }
                        status.write_error = None;
                        status.pending_write = None;
                        drop(status);
                        metrics::token_write(self.name(), "ok");
                        return Persisted::Written;
                    }
                    Err(SaveError::Conflict(current)) => basis = on_top_of(*current, &mut fields),
                    Err(SaveError::Failed(e))
                        if e.class == crate::tokens::store::StoreErrorClass::Unacknowledged =>
                    {
                        break 'write Unwritten::Unacknowledged(report(&e));
                    }
                    Err(SaveError::Failed(e)) => break 'write Unwritten::Failed(report(&e)),
                }
            }
            Unwritten::Failed("it kept changing while being written".into())
        };
        let shown = self.shown_location(cred);
        let mut status = cred.status();
        if shared {
            status.held = Some(match unwritten {
                Unwritten::Unacknowledged(_) => Held::unacknowledged(&fields),
                _ => Held::of(&fields),
            });
        }
        match unwritten {
            Unwritten::Unacknowledged(reason) => {
                let message = format!(
                    "{shown}: {reason}; the refreshed token is kept in memory and used once a write of it is acknowledged"
                );
                status.write_error = Some(message.clone());
                drop(status);
                metrics::token_write(self.name(), "error");
                tracing::warn!(provider = self.name(), account = cred.account_log(), error = %message, "refreshed token held back");
                Persisted::Unacknowledged
            }
            Unwritten::Unparsable => {
                let based_on = match &status.pending_write {
                    Some(pending) => pending.based_on.clone(),
                    None => status.replaced_fingerprint.clone(),
                };
                status.pending_write = Some(PendingWrite { fields, based_on });
                let message = format!(
                    "{shown} cannot be parsed, so the refreshed token was not written over it; it is kept \
                     in memory and written once the file parses again"
                );
                status.write_error = Some(message.clone());
                drop(status);
                metrics::token_write(self.name(), "deferred");
                tracing::warn!(provider = self.name(), account = cred.account_log(), error = %message, "token file left alone");
                Persisted::Kept
            }
            Unwritten::Failed(reason) => {
                let message = format!("{shown} could not be written: {reason}");
                status.write_error = Some(message.clone());
                drop(status);
                metrics::token_write(self.name(), "error");
                tracing::error!(
                    provider = self.name(),
                    account = cred.account_log(),
                    error = %message,
                    "refreshed token kept in memory only; it will be lost on restart"
                );
                Persisted::Kept
            }
        }
    }

    fn record(
        &self,
        cred: &Credential,
        trigger: Trigger,
        elapsed: Duration,
        result: &Result<Arc<Token>, RefreshError>,
    ) {
        let label = match result {
            Ok(_) => "ok",
            Err(e) => e.kind.label(),
        };
        metrics::refresh(self.name(), trigger.label(), label, elapsed);
        let mut status = cred.status();
        status.last_refresh_at = Some(self.clock.now());
        status.last_refresh_result = Some(label.to_string());
        status.refresh_count += 1;
        match result {
            Ok(token) => {
                status.reauth_reason = None;
                status.config_error = None;
                status.retry_not_before = None;
                status.last_failure = None;
                status.last_error = status.write_error.clone();
                drop(status);
                self.set_provider_error(None);
                tracing::info!(
                    provider = self.name(),
                    account = cred.account_log(),
                    trigger = trigger.label(),
                    fingerprint = %token.fingerprint,
                    expires_at = %super::fmt_time(token.expires_at).unwrap_or_else(|| "unknown".into()),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "token refreshed"
                );
            }
            Err(e) => {
                status.last_error = Some(e.to_string());
                status.last_failure = Some(e.clone());
                match e.kind {
                    RefreshErrorKind::InvalidGrant => status.reauth_reason = Some(e.message.clone()),
                    RefreshErrorKind::InvalidClient => status.config_error = Some(e.message.clone()),
                    _ => {}
                }
                drop(status);
                if e.kind == RefreshErrorKind::InvalidClient {
                    // Wrong client credentials are every account's problem.
                    self.set_provider_error(Some(e.to_string()));
                }
                self.forget_failed_account(cred, e);
                tracing::warn!(
                    provider = self.name(),
                    account = cred.account_log(),
                    trigger = trigger.label(),
                    result = e.kind.label(),
                    error = %e,
                    "token refresh failed"
                );
            }
        }
    }

    /// Keeps an account in use fresh (SPEC §8): a request that finds its account's token within
    /// the refresh margin starts one background refresh and goes on with the current token.
    /// Accounts that serve no requests have no timer and are never refreshed this way.
    pub fn refresh_ahead(self: &Arc<Self>, cred: &Arc<Credential>) {
        if !self.can_refresh() || !cred.claim_proactive(PROACTIVE_PAUSE) {
            return;
        }
        let (provider, cred) = (self.clone(), cred.clone());
        tokio::spawn(async move {
            if provider.refresh(&cred, Trigger::Proactive, None).await.is_err() {
                let backoff = cred.status().retry_not_before;
                let pause =
                    backoff.map_or(PROACTIVE_PAUSE, |until| until.saturating_duration_since(Instant::now()));
                cred.defer_proactive(pause.max(Duration::from_millis(500)));
            }
        });
    }

    /// The background task of a provider with a token endpoint: refreshes before expiry (with
    /// jitter, so that many proxies do not refresh at once), and at start when the token is
    /// missing or already expired.
    pub async fn keep_fresh(self: Arc<Self>, cred: Arc<Credential>) {
        let mut first = true;
        loop {
            let now = self.clock.now();
            let startup_or_expired = if first { Trigger::Startup } else { Trigger::Expired };
            let (trigger, wait) = match cred.current() {
                None => (Some(startup_or_expired), Duration::ZERO),
                Some(t) => match self.freshness(&t, now) {
                    Freshness::Expired => (Some(startup_or_expired), Duration::ZERO),
                    Freshness::Expiring => (Some(Trigger::Proactive), Duration::ZERO),
                    Freshness::Unknown => (None, Duration::from_secs(30)),
                    // Wake somewhere in the last tenth of the margin before it begins.
                    Freshness::Fresh { expiring_in } => {
                        let wait = expiring_in + jitter(self.refresh_margin(&t) / 10);
                        (None, wait.min(Duration::from_secs(30)))
                    }
                },
            };
            first = false;
            let stuck = {
                let status = cred.status();
                status.reauth_reason.is_some() || status.config_error.is_some()
            };
            if let Some(trigger) = trigger
                && !stuck
            {
                if self.refresh(&cred, trigger, None).await.is_err() {
                    let pause = cred.status().retry_not_before.map_or(Duration::from_secs(5), |until| {
                        until.saturating_duration_since(Instant::now()).max(Duration::from_millis(500))
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = cred.changed.notified() => {}
                    }
                }
                continue;
            }
            let wait = if stuck { Duration::from_secs(3600) } else { wait };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cred.changed.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
