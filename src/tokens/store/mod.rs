//! Where tokens live between runs: the [`TokenStore`] seam.
//!
//! The token cache ([`super::Credential`]) is what requests read; a store is its source of truth,
//! keyed by (provider, account). Everything the cache needs from it is here: read a document,
//! write one only if the stored version is still the one the write was based on, hold the lock
//! that covers a refresh (from the re-read, through the token endpoint call, to the write), and
//! report which keys changed. [`FileStore`] (token files, SPEC §4) is the one implementation
//! today; the trait is shaped for a remote, fallible one as well (every call is async and may
//! fail, and the lock is a value that the store keeps alive for as long as it is held).

mod file;
#[cfg(test)]
pub(crate) mod memory;
mod primary;
mod redis;
pub mod seal;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::file::TokenDocument;
use crate::errors::report;
pub use file::{FileStore, MAX_FILE_BYTES};
pub use redis::RedisStore;

/// What [`replace`] read back.
pub struct Replaced {
    pub doc: TokenDocument,
    pub sealed: bool,
}

/// Replaces `key`'s document with `fields`, whatever is stored now (a person's new token wins
/// over the old one), under the refresh lock so that a refresh of the old token cannot write over
/// it, then reads it back: `Ok` only when the store gives back the access token just written.
/// The error is one line that says where.
pub async fn replace(store: &dyn TokenStore, key: Key<'_>, fields: &Fields) -> Result<Replaced, String> {
    let location = store.location(key);
    let written = fields.get("access_token").and_then(serde_json::Value::as_str).unwrap_or_default();
    let _lock = store.lock(key).await.map_err(|e| format!("{location}: {}", report(&e)))?;
    let mut attempts = 0;
    let version = loop {
        let expected = match store.load(key).await.map_err(|e| format!("{location}: {}", report(&e)))? {
            Loaded::Found { version, .. } => Some(version),
            Loaded::Missing => None,
        };
        match store.save(key, fields, expected).await {
            Ok(version) => break version,
            Err(SaveError::Conflict(_)) if attempts < 3 => attempts += 1,
            Err(SaveError::Conflict(_)) => {
                return Err(format!("{location}: kept changing while being written"));
            }
            Err(SaveError::Failed(e)) => return Err(format!("{location}: {}", report(&e))),
        }
    };
    match store.load(key).await {
        Ok(Loaded::Found { version: read, doc: Ok(doc), sealed })
            if read == version && doc.access_token == written =>
        {
            Ok(Replaced { doc, sealed })
        }
        Ok(_) => Err(format!("{location}: reading it back did not give the token just written")),
        Err(e) => Err(format!("{location}: reading it back: {}", report(&e))),
    }
}

/// Whether `fields` may replace what is stored (SPEC §5): the whole document is checked before
/// anything is written, so that a refused document (a token endpoint's 3 MiB answer, an access
/// token with a line break) leaves the stored token as it was. Every store's `save` asks this,
/// so refreshes, reconnects and `token put` all follow one rule.
pub fn check_storable(fields: &Fields) -> Result<(), StoreError> {
    let refused = |why: String| Err(StoreError::refused(format!("{why}; refused, the stored token is kept")));
    let doc = match super::file::document_from_fields(fields.clone()) {
        Ok(doc) => doc,
        Err(e) => return refused(format!("the new token document is not usable ({e})")),
    };
    if http::HeaderValue::from_str(&doc.access_token).is_err() {
        return refused("the new access_token has characters not allowed in an HTTP header".into());
    }
    let size = serde_json::to_vec(fields).map(|b| b.len() as u64).unwrap_or(u64::MAX);
    if size > MAX_FILE_BYTES {
        return refused(format!(
            "the new token document is {} KiB, more than the {} KiB a token document may hold",
            size / 1024,
            MAX_FILE_BYTES / 1024
        ));
    }
    Ok(())
}

/// Stored bytes (sealed or not) over [`MAX_FILE_BYTES`] would not be read back: refused.
fn check_stored_size(bytes: &[u8]) -> Result<(), StoreError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(StoreError::refused(format!(
            "the stored form of the new token document would be over {} KiB; refused, the stored token is kept",
            MAX_FILE_BYTES / 1024
        )));
    }
    Ok(())
}

/// The store a config names: token files, or a Redis shared by a fleet (SPEC §11).
pub fn for_config(config: &crate::config::Config) -> Result<std::sync::Arc<dyn TokenStore>, StoreError> {
    use crate::config::StoreSettings;
    let sealer = match &config.sealing_key {
        Some(source) => Some(Arc::new(seal::Sealer::open(source).map_err(StoreError::config)?)),
        None => None,
    };
    Ok(match &config.store {
        StoreSettings::File => std::sync::Arc::new(FileStore::sealed(&config.providers, sealer)),
        StoreSettings::Redis(settings) => {
            let roots = match settings.shown_url.starts_with("rediss://") {
                true => Some(
                    crate::tls::roots_pem(&config.extra_roots)
                        .map_err(|e| StoreError::config("extra_roots").caused_by(e))?,
                ),
                false => None,
            };
            std::sync::Arc::new(RedisStore::new((**settings).clone(), &config.providers, sealer, roots)?)
        }
    })
}

/// The fields of a stored token document, in order (a write keeps the ones it does not own).
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// What every store call returns: a future that may be sent between threads.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a store keys a token by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    pub provider: &'a str,
    /// `None` for a single-account provider.
    pub account: Option<&'a str>,
}

/// One stored content of a key: equal versions are the same document. A store hands one out with
/// every read and write; a write names the version it was based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(pub u64);

/// What a read found.
#[derive(Debug)]
pub enum Loaded {
    /// Nothing is stored under the key.
    Missing,
    /// A stored document, or why it cannot be used (never its content: it may hold a token);
    /// `sealed` when it is stored encrypted (SPEC §11).
    Found { version: Version, doc: Result<TokenDocument, String>, sealed: bool },
}

/// The store could not be read or written, or refused what it was given. The message says where
/// and what failed, never what a document holds; the cause is its [`std::error::Error::source`]
/// ([`crate::errors::report`] shows both), and its class says whether trying again may help.
#[derive(Debug, Clone)]
pub struct StoreError {
    what: String,
    pub class: StoreErrorClass,
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for StoreError {
    /// The cause itself (not the `Arc` that lets the error be cloned), so it can be downcast.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorClass {
    /// Down, unreachable or a file system error: nothing was changed, and later may work.
    Unavailable,
    /// The store will not take this as it stands (a document that is not a usable token, a
    /// file sealed with another key): the same again fails the same way.
    Refused,
    /// The configuration names something that cannot be used (a URL, a key, a provider).
    Config,
    /// Written to the primary, but not held by `min_replicas_ack` replicas in time: a failover
    /// could take it back, so it does not count as written (SPEC §11). Later may work.
    Unacknowledged,
}

impl StoreError {
    pub fn new(class: StoreErrorClass, what: impl Into<String>) -> StoreError {
        StoreError { what: what.into(), class, cause: None }
    }

    pub fn unavailable(what: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorClass::Unavailable, what)
    }

    pub fn refused(what: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorClass::Refused, what)
    }

    pub fn config(what: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorClass::Config, what)
    }

    pub fn caused_by(mut self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        self.cause = Some(Arc::from(cause.into()));
        self
    }

    /// A file system error with nothing more to say than the operation.
    pub fn io(operation: &str, e: std::io::Error) -> StoreError {
        StoreError::unavailable(operation).caused_by(e)
    }
}

/// Why a write did not happen.
#[derive(Debug)]
pub enum SaveError {
    /// The stored document is no longer the version the write was based on; this is what is
    /// stored now.
    Conflict(Box<Loaded>),
    Failed(StoreError),
}

/// A held refresh lock: released when dropped.
pub struct StoreLock {
    _held: Option<Box<dyn Send + Sync>>,
}

impl StoreLock {
    pub fn new(held: impl Send + Sync + 'static) -> StoreLock {
        StoreLock { _held: Some(Box::new(held)) }
    }

    /// A lock that protects nothing: the store could not lock, and says so itself, but a refresh
    /// may still go on (a read-only token folder must not stop traffic).
    pub fn unprotected() -> StoreLock {
        StoreLock { _held: None }
    }
}

/// A change a store reports: which keys to read again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// This key's document may have changed.
    Key { provider: String, account: Option<String> },
    /// Any of this provider's keys may have changed (a change that names no key, like a
    /// Kubernetes secret volume's `..data` swap): check the loaded ones cheaply.
    Provider(String),
    /// Anything may have changed.
    Everything,
}

/// The changes a store reports, for as long as this value lives.
pub struct ChangeFeed {
    pub changes: mpsc::UnboundedReceiver<Change>,
    /// What keeps the feed running (a file watcher, a subscription).
    pub _source: Option<Box<dyn Send>>,
}

/// The source of truth of the token cache, keyed by (provider, account).
pub trait TokenStore: Send + Sync + 'static {
    /// Reads `key`'s document.
    fn load<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>>;

    /// Stores `fields` as `key`'s document if what is stored is still `expected` (`None`: nothing
    /// stored), and returns the new version. Atomic: a reader sees the old document or the new.
    fn save<'a>(
        &'a self,
        key: Key<'a>,
        fields: &'a Fields,
        expected: Option<Version>,
    ) -> StoreFuture<'a, Result<Version, SaveError>>;

    /// Takes `key`'s refresh lock, waiting for another holder (another process, another replica)
    /// to release it.
    fn lock<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<StoreLock, StoreError>>;

    /// A cheap marker that changes whenever `key`'s document may have changed (a file's
    /// metadata), so that a poll of many keys reads only those that did; `None` when the store
    /// has none, and then every poll reads.
    fn probe<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Option<u64>>;

    /// The accounts of a multi-account provider that have a stored document, sorted.
    fn accounts<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Result<Vec<String>, StoreError>>;

    /// A problem of the store for every account of `provider` (an unreadable token folder).
    fn problem<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Where `key` is kept, as messages name it ("token file /var/lib/tokens/github.json").
    fn location(&self, key: Key<'_>) -> String;

    /// Whether other processes write the same keys and the store can lose what it held (a
    /// Redis restarted empty, a failover): then a replica keeps the document it holds and never
    /// adopts an older one (SPEC §11). A token file a person edits by hand is not such a store.
    fn shared(&self) -> bool {
        false
    }

    /// For a key the store has nothing for: fills it from where the store seeds from (Redis:
    /// the provider's token file, SPEC §11) and returns what it then holds. Only a replica that
    /// holds no token of its own asks: one that does writes its own back (never an older file).
    fn seed<'a>(&'a self, _key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(async { Ok(Loaded::Missing) })
    }

    /// The id of the key that seals token data at rest, when one is configured.
    fn sealing_key_id(&self) -> Option<&str> {
        None
    }

    /// Whether token data is sealed at rest.
    fn seals(&self) -> bool {
        self.sealing_key_id().is_some()
    }

    /// Removes what the store keeps beside `key`'s document (a lock file) when there is no
    /// document: an account that never got a token leaves nothing behind.
    fn forget(&self, _key: Key<'_>) {}

    /// Starts reporting changes.
    fn watch(&self) -> ChangeFeed;
}
