//! One token's state: the credential of a provider, or of one account of a multi-account
//! provider (SPEC §8). The request path reads only [`Credential::current`]: one atomic load, no
//! lock, no I/O. Everything else here is for the refresher and the admin view.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use time::OffsetDateTime;

use super::Token;
use super::store::Version;
use crate::oauth::RefreshError;

pub struct Credential {
    token: ArcSwapOption<Token>,
    generations: AtomicU64,
    /// The account's name; `None` for a single-account provider.
    account: Option<Box<str>>,
    /// How logs name the account: its fingerprint.
    account_log: Option<Box<str>>,
    /// Set once the store has been read for the first time (accounts load on first use).
    pub(super) loaded: tokio::sync::OnceCell<()>,
    /// Everything the admin API shows besides the token. Never touched on the request path.
    status: Mutex<Status>,
    /// Single flight: one refresh at a time; waiters queue here.
    pub(super) refresh_lock: tokio::sync::Mutex<()>,
    pub(super) refreshing: AtomicBool,
    /// Wakes the background refresher when the token changes.
    pub(super) changed: tokio::sync::Notify,
    /// Unix milliseconds before which a request does not start another proactive refresh (an
    /// account in use is kept fresh by its requests, not by a timer).
    pub(super) proactive_after_ms: AtomicU64,
}

impl Credential {
    /// The credential of a single-account provider, or of its account `name` (already checked).
    pub(super) fn new(account: Option<&str>) -> Credential {
        let account_log = account.map(crate::accounts::log_name);
        Credential {
            token: ArcSwapOption::empty(),
            generations: AtomicU64::new(0),
            account: account.map(Into::into),
            account_log: account_log.map(Into::into),
            loaded: tokio::sync::OnceCell::new(),
            status: Mutex::default(),
            refresh_lock: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            proactive_after_ms: AtomicU64::new(0),
        }
    }

    /// The account's name (`None` for a single-account provider): for the admin API only.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The account as logs name it: its fingerprint (`None` for a single-account provider).
    pub fn account_log(&self) -> Option<&str> {
        self.account_log.as_deref()
    }

    /// Whether the store has been read once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.initialized()
    }

    /// Claims the right to start a proactive refresh now, so that of the many requests that find
    /// the token expiring one starts it, and none for `pause` after.
    pub(super) fn claim_proactive(&self, pause: std::time::Duration) -> bool {
        let now = unix_ms();
        let after = self.proactive_after_ms.load(Ordering::Relaxed);
        now >= after
            && self
                .proactive_after_ms
                .compare_exchange(after, now + pause.as_millis() as u64, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// No proactive refresh from requests before `at` (after a failure, its backoff).
    pub(super) fn defer_proactive(&self, pause: std::time::Duration) {
        self.proactive_after_ms.store(unix_ms() + pause.as_millis() as u64, Ordering::Relaxed);
    }
    /// The current token: one atomic load, no lock, no I/O.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.token.load_full()
    }

    /// Makes `token` the current one, with the next generation: one atomic swap, seen by the
    /// next request.
    pub(super) fn install(&self, token: Token) -> Arc<Token> {
        self.install_as(token, self.generations.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Makes `token` the current one as `generation`: the same token with news about it (its
    /// expiry) keeps the generation of the one it replaces.
    pub(super) fn install_as(&self, mut token: Token, generation: u64) -> Arc<Token> {
        token.generation = generation;
        let token = Arc::new(token);
        self.token.store(Some(token.clone()));
        self.changed.notify_one();
        token
    }

    /// Counts a request sent again with a fresh token after the upstream rejected the old one.
    pub fn note_retry(&self) {
        self.status().retry_count += 1;
    }

    pub(super) fn status(&self) -> MutexGuard<'_, Status> {
        // A panic while holding this lock cannot leave the status half-written in a way that
        // matters more than losing the admin view, so poisoning is ignored.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the token file looked like when last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FileStatus {
    #[default]
    NotRead,
    Ok,
    Missing,
    Unreadable,
    Unparsable,
}

/// A refreshed token that could not be written because the token file did not parse (a person
/// mid-edit): it waits in memory and is merged into the file once the file parses again.
#[derive(Clone)]
pub(super) struct PendingWrite {
    /// The fields the refresh would have written.
    pub(super) fields: serde_json::Map<String, serde_json::Value>,
    /// The fingerprint of the access token the refresh replaced: a fixed file that still holds
    /// it was edited from the old content, so the refresh belongs on top of it.
    pub(super) based_on: Option<String>,
}

/// A document a replica holds, with the time that orders it.
#[derive(Clone)]
pub(super) struct Held {
    pub(super) updated_at: Option<time::OffsetDateTime>,
    pub(super) fields: std::sync::Arc<serde_json::Map<String, serde_json::Value>>,
    /// `false` for a refresh whose write `min_replicas_ack` replicas did not acknowledge: not in
    /// use yet, and written again (then used) at the next chance (SPEC §11).
    pub(super) acknowledged: bool,
}

impl Held {
    pub(super) fn of(fields: &serde_json::Map<String, serde_json::Value>) -> Held {
        Held {
            updated_at: super::file::updated_at(fields),
            fields: std::sync::Arc::new(fields.clone()),
            acknowledged: true,
        }
    }

    pub(super) fn unacknowledged(fields: &serde_json::Map<String, serde_json::Value>) -> Held {
        Held { acknowledged: false, ..Held::of(fields) }
    }
}

#[derive(Default)]
pub(super) struct Status {
    pub(super) file: FileStatus,
    /// The store's probe when last read: a poll of many accounts reads only those whose probe
    /// changed.
    pub(super) probe: Option<u64>,
    /// The version last read or written: a read of the same version is a no-op (this absorbs
    /// duplicate change events and tokenproxy's own writes), and a write names it.
    pub(super) version: Option<Version>,
    pub(super) last_error: Option<String>,
    /// What the last read of the store found wrong (not found, unreadable, unusable), as the
    /// store says it; `None` after a good read.
    pub(super) store_error: Option<String>,
    /// The document last read is plaintext where encryption at rest is configured.
    pub(super) unsealed: bool,
    /// Set by `invalid_grant`: no automatic refresh until the file changes or a manual refresh.
    pub(super) reauth_reason: Option<String>,
    /// Set by `invalid_client`: the config is wrong.
    pub(super) config_error: Option<String>,
    /// After a transient failure, automatic refreshes wait until then.
    pub(super) retry_not_before: Option<tokio::time::Instant>,
    pub(super) last_failure: Option<RefreshError>,
    /// The last failed write of the token file, shown until a write succeeds.
    pub(super) write_error: Option<String>,
    pub(super) pending_write: Option<PendingWrite>,
    /// The fingerprint of the token the last refresh replaced.
    pub(super) replaced_fingerprint: Option<String>,
    /// The refresh token of the document last read or written, or of a refresh whose write
    /// failed: the one the next refresh spends. (The rest of the document is read from the store
    /// when a refresh writes, not kept for every account.)
    pub(super) refresh_token: Option<Box<str>>,
    /// In a shared store only: the newest document this replica holds (read, refreshed or
    /// written), which it writes back over anything older (SPEC §11).
    pub(super) held: Option<Held>,
    pub(super) last_refresh_at: Option<OffsetDateTime>,
    pub(super) last_refresh_result: Option<String>,
    pub(super) refresh_count: u64,
    pub(super) retry_count: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
