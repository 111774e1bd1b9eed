//! One token's state: the credential of a provider (of one account of it, once providers have
//! accounts). The request path reads only [`Credential::current`]: one atomic load, no lock, no
//! I/O. Everything else here is for the refresher and the admin view.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use time::OffsetDateTime;

use super::Token;
use crate::oauth::RefreshError;

#[derive(Default)]
pub struct Credential {
    token: ArcSwapOption<Token>,
    generations: AtomicU64,
    /// Everything the admin API shows besides the token. Never touched on the request path.
    status: Mutex<Status>,
    /// Single flight: one refresh at a time; waiters queue here.
    pub(super) refresh_lock: tokio::sync::Mutex<()>,
    pub(super) refreshing: AtomicBool,
    /// Wakes the background refresher when the token changes.
    pub(super) changed: tokio::sync::Notify,
}

impl Credential {
    /// The current token: one atomic load, no lock, no I/O.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.token.load_full()
    }

    /// Makes `token` the current one, with the next generation: one atomic swap, seen by the
    /// next request.
    pub(super) fn install(&self, mut token: Token) -> Arc<Token> {
        token.generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
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
pub(super) enum FileStatus {
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

#[derive(Default)]
pub(super) struct Status {
    pub(super) file: FileStatus,
    /// SHA-256 of the bytes last read, so that a re-read of unchanged content is a no-op (this
    /// absorbs duplicate watcher events and, later, tokenproxy's own writes).
    pub(super) content_hash: Option<[u8; 32]>,
    pub(super) last_error: Option<String>,
    /// Set by `invalid_grant`: no automatic refresh until the file changes or a manual refresh.
    pub(super) reauth_reason: Option<String>,
    /// Set by `invalid_client`: the config is wrong.
    pub(super) config_error: Option<String>,
    /// After a transient failure, automatic refreshes wait until then.
    pub(super) retry_not_before: Option<std::time::Instant>,
    pub(super) last_failure: Option<RefreshError>,
    /// The last failed write of the token file, shown until a write succeeds.
    pub(super) write_error: Option<String>,
    pub(super) pending_write: Option<PendingWrite>,
    /// The fingerprint of the token the last refresh replaced.
    pub(super) replaced_fingerprint: Option<String>,
    /// The fields of the token last read or written: the base of the next write, and where the
    /// refresh token comes from even when a write failed.
    pub(super) fields: serde_json::Map<String, serde_json::Value>,
    pub(super) last_refresh_at: Option<OffsetDateTime>,
    pub(super) last_refresh_result: Option<String>,
    pub(super) refresh_count: u64,
    pub(super) retry_count: u64,
}
