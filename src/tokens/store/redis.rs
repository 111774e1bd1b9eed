//! [`RedisStore`]: one token set shared by a fleet of replicas through Redis (SPEC §11).
//!
//! Per (provider, account) a hash holds the document (`doc`, sealed when a key is configured)
//! and a `version` (random per write). A write is a compare-and-set on the version in a Lua script, which
//! also publishes the change so that every replica re-reads within a moment (the watcher's slow
//! poll is the safety net for a missed message). The refresh lock is `SET lock owner NX PX
//! lock_ttl`, kept alive while the holder works and released only by its owner (a script), so a
//! fleet spends a rotated refresh token exactly once, and a holder that dies releases it after
//! `lock_ttl`. A key Redis does not have yet is seeded from the provider's token file.
//!
//! Keys are unambiguous for every provider and account name (neither may hold a `:`, and a
//! provider has either one token or accounts): `{prefix}:token:{provider}[:{account}]` for
//! documents, the same and `:lock` for locks, `{prefix}:changes` for the change feed. With an encryption key the account is
//! `#` and a keyed fingerprint of its name (SPEC §11), in keys and change messages alike; the
//! name itself is sealed in the hash (`name`), for listing the accounts.
//!
//! Redis being down is an error of every call, never a panic: the cache keeps serving its tokens,
//! and no refresh starts without the lock (its result could not be recorded).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::file::FileStore;
use super::primary::{CALL_TIMEOUT, Primary};
use super::seal::{self, Sealer};
use super::{
    Change, ChangeFeed, Fields, Key, Loaded, SaveError, StoreError, StoreErrorClass, StoreFuture, StoreLock,
    TokenStore, Version,
};
use crate::config::{FileFormat, ProviderConfig, RedisSettings};
use crate::metrics;

/// How often a waiting replica tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(25);

/// Compare-and-set: writes `doc` with the new version `ARGV[5]` if the version is still the
/// expected one (`""`: nothing stored), publishes the change. Returns `{1, new}` or
/// `{0, current}`. Versions are random, not a counter: a counter starts again at 1 after Redis
/// lost its data, and a replica that last saw version 7 before the loss would take the new
/// version 7 for the document it already has (and miss a newer token).
const SAVE_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], 'version')
if (ARGV[1] == '' and current) or (ARGV[1] ~= '' and current ~= ARGV[1]) then
  return {0, current or ''}
end
redis.call('HSET', KEYS[1], 'version', ARGV[5], 'doc', ARGV[2])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'name', ARGV[6])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, ARGV[5]}
";

/// Moves a document stored under its account's name (before a key was configured, or by an
/// older tokenproxy) to the fingerprinted key, with the sealed name, if that key is still free.
const ADOPT_NAMED_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[1])
  redis.call('HSET', KEYS[1], 'name', ARGV[1])
  return 1
end
return 0
";

/// What marks a fingerprinted account in a key (never part of a name: see `accounts::check`).
const FINGERPRINTED: char = '#';

/// Extends the lock only for its owner.
const KEEP_ALIVE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Releases the lock only for its owner.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub struct RedisStore {
    primary: Arc<Primary>,
    settings: RedisSettings,
    sealer: Option<Arc<Sealer>>,
    /// Token files, read to seed keys Redis does not have yet.
    seeds: FileStore,
    save: redis::Script,
    adopt_named: redis::Script,
    keep_alive: Arc<redis::Script>,
    release: Arc<redis::Script>,
    /// Fingerprint to account name, for every account this replica has used: a change message
    /// names an account by fingerprint only, and only accounts used here need reading again.
    fingerprinted: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl RedisStore {
    /// Connects lazily: a Redis that is down at start is an error of the first call, not of the
    /// start.
    /// `tls_roots`: for `rediss://`, the PEM roots to verify the server with (the same roots as
    /// every other TLS connection tokenproxy opens).
    pub fn new(
        settings: RedisSettings,
        providers: &[ProviderConfig],
        sealer: Option<Arc<Sealer>>,
        tls_roots: Option<Vec<u8>>,
    ) -> Result<RedisStore, StoreError> {
        crate::tls::install_crypto_provider();
        Ok(RedisStore {
            primary: Primary::new(&settings, tls_roots)?,
            seeds: FileStore::sealed(providers, sealer.clone()),
            sealer,
            settings,
            save: redis::Script::new(SAVE_SCRIPT),
            adopt_named: redis::Script::new(ADOPT_NAMED_SCRIPT),
            fingerprinted: Default::default(),
            keep_alive: Arc::new(redis::Script::new(KEEP_ALIVE_SCRIPT)),
            release: Arc::new(redis::Script::new(RELEASE_SCRIPT)),
        })
    }

    /// How keys and change messages name an account: by name, or with an encryption key by
    /// `#` and the name's keyed fingerprint.
    fn account_in_key(&self, provider: &str, account: &str) -> String {
        let Some(sealer) = &self.sealer else { return account.to_string() };
        let shown = format!("{FINGERPRINTED}{}", sealer.name_fingerprint(provider, account));
        let mut known = self.fingerprinted.lock().unwrap_or_else(|e| e.into_inner());
        if !known.contains_key(&shown) {
            known.insert(shown.clone(), account.to_string());
        }
        shown
    }

    fn document_key(&self, key: Key<'_>) -> String {
        let prefix = &self.settings.key_prefix;
        match key.account {
            Some(account) => {
                format!("{prefix}:token:{}:{}", key.provider, self.account_in_key(key.provider, account))
            }
            None => format!("{prefix}:token:{}", key.provider),
        }
    }

    /// Beside the document (`:` is in no name, so no document key ends like this). Kept where
    /// earlier versions had it: replicas of two versions during a rolling upgrade take one lock.
    fn lock_key(&self, key: Key<'_>) -> String {
        format!("{}:lock", self.document_key(key))
    }

    /// The change message for a key: the provider, a newline, the account as keys show it.
    fn change_message(&self, key: Key<'_>) -> String {
        let account = key.account.map(|a| self.account_in_key(key.provider, a)).unwrap_or_default();
        format!("{}\n{account}", key.provider)
    }

    fn channel(&self) -> String {
        format!("{}:changes", self.settings.key_prefix)
    }

    fn error(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::unavailable(format!("token store {} unavailable", self.settings.shown_url)).caused_by(e)
    }

    /// A failed call's error; one that says the node is no longer the primary makes the
    /// follower look for the new one at once.
    fn failed(&self, e: redis::RedisError) -> StoreError {
        self.primary.saw(&e);
        self.error(e)
    }

    /// The current primary's connection.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.primary.connection().await.map_err(|e| self.error(e))
    }

    /// Waits until `min_replicas_ack` replicas hold what this connection wrote (Redis `WAIT`),
    /// so that a failover cannot take it back (SPEC §11). `Ok(false)`: not in time.
    async fn acknowledged(&self, connection: &mut ConnectionManager) -> Result<bool, StoreError> {
        let wanted = self.settings.min_replicas_ack;
        if wanted == 0 {
            return Ok(true);
        }
        // At most lock_ttl, and inside the call timeout (a longer WAIT would be cut off by it).
        let wait = self.settings.lock_ttl.min(CALL_TIMEOUT - Duration::from_millis(300));
        let acks: redis::RedisResult<u32> =
            redis::cmd("WAIT").arg(wanted).arg(wait.as_millis() as u64).query_async(connection).await;
        Ok(acks.map_err(|e| self.failed(e))? >= wanted)
    }

    /// The stored document and version, as Redis has them.
    async fn read(&self, key: Key<'_>) -> Result<Option<(Version, Vec<u8>)>, StoreError> {
        let found = self.read_once(key).await?;
        if found.is_some() || !self.adopt_named(key).await? {
            return Ok(found);
        }
        self.read_once(key).await
    }

    /// With an encryption key, an account's document may still be under its name (stored before
    /// the key was configured): moves it to the fingerprinted key. `true`: moved.
    async fn adopt_named(&self, key: Key<'_>) -> Result<bool, StoreError> {
        let (Some(sealer), Some(account)) = (&self.sealer, key.account) else { return Ok(false) };
        let named = format!("{}:token:{}:{account}", self.settings.key_prefix, key.provider);
        let mut connection = self.connection().await?;
        let moved: redis::RedisResult<i64> = self
            .adopt_named
            .key(self.document_key(key))
            .key(named)
            .arg(sealer.seal_name(key.provider, account))
            .invoke_async(&mut connection)
            .await;
        let moved = moved.map_err(|e| self.failed(e))? == 1;
        if moved {
            tracing::info!(
                provider = key.provider,
                account = crate::accounts::log_name(account),
                "moved an account's token in the store from its name to its fingerprint"
            );
        }
        Ok(moved)
    }

    async fn read_once(&self, key: Key<'_>) -> Result<Option<(Version, Vec<u8>)>, StoreError> {
        let mut connection = self.connection().await?;
        let answer: redis::RedisResult<(Option<Vec<u8>>, Option<u64>)> = redis::cmd("HMGET")
            .arg(self.document_key(key))
            .arg("doc")
            .arg("version")
            .query_async(&mut connection)
            .await;
        metrics::store_operation("read", if answer.is_ok() { "ok" } else { "error" });
        let (doc, version) = answer.map_err(|e| self.failed(e))?;
        Ok(match (doc, version) {
            (Some(doc), Some(version)) => Some((Version(version), doc)),
            _ => None,
        })
    }

    /// Bytes as a document, and the error when they are sealed with a key this process lacks.
    fn decode(&self, key: Key<'_>, version: Version, bytes: &[u8]) -> (Loaded, Option<seal::OpenError>) {
        let decoded = seal::decode(self.sealer.as_deref(), key, FileFormat::Json, bytes);
        (Loaded::Found { version, doc: decoded.doc, sealed: decoded.sealed }, decoded.foreign_key)
    }

    fn encode(&self, key: Key<'_>, fields: &Fields) -> Result<Vec<u8>, StoreError> {
        seal::encode(self.sealer.as_deref(), key, FileFormat::Json, fields)
            .map_err(|e| StoreError::refused(e.to_string()))
    }

    /// The compare-and-set.
    async fn compare_and_set(
        &self,
        key: Key<'_>,
        bytes: &[u8],
        expected: Option<Version>,
    ) -> Result<Result<Version, Option<Version>>, StoreError> {
        let mut connection = self.connection().await?;
        let expected = expected.map(|v| v.0.to_string()).unwrap_or_default();
        let message = self.change_message(key);
        let sealed_name = match (&self.sealer, key.account) {
            (Some(sealer), Some(account)) => sealer.seal_name(key.provider, account),
            _ => Vec::new(),
        };
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| self.error(e))?;
        let new_version = u64::from_le_bytes(random).max(1);
        let answer: redis::RedisResult<(i64, String)> = self
            .save
            .key(self.document_key(key))
            .arg(expected)
            .arg(bytes)
            .arg(self.channel())
            .arg(message)
            .arg(new_version.to_string())
            .arg(sealed_name)
            .invoke_async(&mut connection)
            .await;
        let (written, version) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                metrics::store_operation("write", "error");
                return Err(self.failed(e));
            }
        };
        let version = version.parse().ok().map(Version);
        if written != 1 {
            metrics::store_operation("write", "conflict");
            return Ok(Err(version));
        }
        if !self.acknowledged(&mut connection).await? {
            metrics::store_operation("write", "unacknowledged");
            return Err(StoreError::new(
                StoreErrorClass::Unacknowledged,
                format!(
                    "the write to {} was not acknowledged by {} replica(s) (min_replicas_ack) in time: a failover could \
                 take it back",
                    self.settings.shown_url, self.settings.min_replicas_ack
                ),
            ));
        }
        metrics::store_operation("write", "ok");
        Ok(version.ok_or(None))
    }

    /// Seeds a key Redis does not have from the provider's token file, if there is one.
    async fn seed_from_file(&self, key: Key<'_>) -> Result<Loaded, StoreError> {
        let Ok(Loaded::Found { doc: Ok(doc), .. }) = self.seeds.load(key).await else {
            return Ok(Loaded::Missing);
        };
        let mut fields = doc.fields.clone();
        if fields.is_empty() {
            // A raw token file: the token is the whole document.
            fields.insert("access_token".into(), doc.access_token.clone().into());
        }
        let bytes = self.encode(key, &fields)?;
        match self.compare_and_set(key, &bytes, None).await? {
            Ok(version) => {
                tracing::info!(
                    provider = key.provider,
                    account = key.account.map(crate::accounts::log_name),
                    "the token store had nothing for this key: seeded from its token file"
                );
                Ok(self.decode(key, version, &bytes).0)
            }
            // Another replica seeded it first: what it wrote is the truth.
            Err(_) => match self.read(key).await? {
                Some((version, bytes)) => Ok(self.decode(key, version, &bytes).0),
                None => Ok(Loaded::Missing),
            },
        }
    }
}

/// Keeps a lock alive while it is held; releases it (only if still ours) when dropped.
struct HeldLock {
    keep_alive: tokio::task::JoinHandle<()>,
    release: Option<(Arc<Primary>, Arc<redis::Script>, String, String)>,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.keep_alive.abort();
        if let Some((primary, script, key, owner)) = self.release.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                // The primary now, which after a failover holds the lock if it was acknowledged.
                let Ok(mut connection) = primary.connection().await else { return };
                let released: redis::RedisResult<i64> = script.key(key).arg(owner).invoke_async(&mut connection).await;
                if let Err(e) = released {
                    tracing::warn!(error = %e, "could not release the refresh lock; it expires by itself after lock_ttl");
                }
            });
        }
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TokenStore for RedisStore {
    fn load<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(async move {
            match self.read(key).await? {
                Some((version, bytes)) => Ok(self.decode(key, version, &bytes).0),
                None => Ok(Loaded::Missing),
            }
        })
    }

    fn save<'a>(
        &'a self,
        key: Key<'a>,
        fields: &'a Fields,
        expected: Option<Version>,
    ) -> StoreFuture<'a, Result<Version, SaveError>> {
        Box::pin(async move {
            super::check_storable(fields).map_err(SaveError::Failed)?;
            let current = self.read(key).await.map_err(SaveError::Failed)?;
            if let Some((version, bytes)) = &current {
                let (loaded, foreign) = self.decode(key, *version, bytes);
                if let Some(e) = foreign {
                    return Err(SaveError::Failed(StoreError::refused(format!("{e}; it is left as it is"))));
                }
                if Some(*version) != expected {
                    metrics::store_operation("write", "conflict");
                    return Err(SaveError::Conflict(Box::new(loaded)));
                }
            } else if expected.is_some() {
                metrics::store_operation("write", "conflict");
                return Err(SaveError::Conflict(Box::new(Loaded::Missing)));
            }
            let bytes = self.encode(key, fields).map_err(SaveError::Failed)?;
            super::check_stored_size(&bytes).map_err(SaveError::Failed)?;
            match self.compare_and_set(key, &bytes, expected).await.map_err(SaveError::Failed)? {
                Ok(version) => Ok(version),
                Err(_) => {
                    let now = self.read(key).await.map_err(SaveError::Failed)?;
                    let loaded = match now {
                        Some((version, bytes)) => self.decode(key, version, &bytes).0,
                        None => Loaded::Missing,
                    };
                    Err(SaveError::Conflict(Box::new(loaded)))
                }
            }
        })
    }

    fn lock<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<StoreLock, StoreError>> {
        Box::pin(async move {
            let lock_key = self.lock_key(key);
            let owner = crate::secrets::random_token();
            let ttl = self.settings.lock_ttl;
            let ttl_ms = ttl.as_millis() as u64;
            // A holder keeps its lock alive; one that died frees it within lock_ttl. Waiting longer
            // than that (and a margin) means the store is not answering as it should.
            let give_up = tokio::time::Instant::now() + ttl + Duration::from_secs(5);
            let mut connection = self.connection().await?;
            loop {
                let taken: redis::RedisResult<Option<String>> = redis::cmd("SET")
                    .arg(&lock_key)
                    .arg(&owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut connection)
                    .await;
                let taken = taken.map_err(|e| {
                    metrics::store_operation("lock", "error");
                    self.failed(e)
                })?;
                if taken.is_some() {
                    // The lock too must survive a failover: a promoted replica without it would
                    // let another replica spend the refresh token this holder is spending.
                    if !self.acknowledged(&mut connection).await? {
                        metrics::store_operation("lock", "unacknowledged");
                        let _: redis::RedisResult<i64> =
                            self.release.key(&lock_key).arg(&owner).invoke_async(&mut connection).await;
                        return Err(StoreError::unavailable(format!(
                            "the refresh lock {lock_key} was not acknowledged by {} replica(s) (min_replicas_ack) in time",
                            self.settings.min_replicas_ack
                        )));
                    }
                    metrics::store_operation("lock", "ok");
                    break;
                }
                // A failover may have moved the primary while we waited.
                connection = self.connection().await?;
                if tokio::time::Instant::now() >= give_up {
                    metrics::store_operation("lock", "error");
                    return Err(StoreError::unavailable(format!(
                        "the refresh lock {lock_key} stayed taken for longer than lock_ttl ({}s)",
                        ttl.as_secs()
                    )));
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
            let keep_alive = {
                let (primary, script, lock_key, owner) =
                    (self.primary.clone(), self.keep_alive.clone(), lock_key.clone(), owner.clone());
                tokio::spawn(async move {
                    let mut every = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
                    every.tick().await;
                    loop {
                        every.tick().await;
                        // On whichever node is the primary now: after a failover, the promoted
                        // replica holds the lock if it acknowledged it.
                        let kept: redis::RedisResult<i64> = match primary.connection().await {
                            Ok(mut connection) => {
                                script
                                    .key(&lock_key)
                                    .arg(&owner)
                                    .arg(ttl_ms)
                                    .invoke_async(&mut connection)
                                    .await
                            }
                            Err(_) => continue,
                        };
                        if let Err(e) = kept {
                            primary.saw(&e);
                            tracing::warn!(error = %e, "could not keep the refresh lock alive");
                        }
                    }
                })
            };
            Ok(StoreLock::new(HeldLock {
                keep_alive,
                release: Some((self.primary.clone(), self.release.clone(), lock_key, owner)),
            }))
        })
    }

    fn probe<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let mut connection = self.connection().await.ok()?;
            connection.hget::<_, _, Option<u64>>(self.document_key(key), "version").await.ok().flatten()
        })
    }

    fn accounts<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let prefix = format!("{}:token:{provider}:", self.settings.key_prefix);
            let mut connection = self.connection().await?;
            let mut names: Vec<String> = Vec::new();
            let mut listed: Vec<String> = Vec::new();
            {
                let mut keys: redis::AsyncIter<'_, String> =
                    connection.scan_match(format!("{prefix}*")).await.map_err(|e| self.failed(e))?;
                while let Some(key) = keys.next_item().await {
                    let key = key.map_err(|e| self.failed(e))?;
                    if let Some(name) = key.strip_prefix(&prefix).filter(|n| !n.contains(':')) {
                        listed.push(name.to_string());
                    }
                }
            }
            for name in listed {
                if !name.starts_with(FINGERPRINTED) {
                    names.push(name);
                    continue;
                }
                // A fingerprinted key: the name is sealed beside the document.
                let Some(sealer) = &self.sealer else { continue };
                let sealed: Option<Vec<u8>> =
                    connection.hget(format!("{prefix}{name}"), "name").await.map_err(|e| self.failed(e))?;
                let opened = sealed.and_then(|sealed| sealer.open_name(provider, &sealed));
                // Only a name that is this key's own: a name copied from another key is not.
                match opened.filter(|account| self.account_in_key(provider, account) == name) {
                    Some(account) => names.push(account),
                    None => tracing::warn!(
                        provider,
                        key = %format!("{prefix}{name}"),
                        "a fingerprinted key in the token store without its own sealed name: not listed"
                    ),
                }
            }
            // Token files not seeded yet are accounts too.
            names.extend(self.seeds.accounts(provider).await.unwrap_or_default());
            names.sort();
            names.dedup();
            Ok(names)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn seed<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(self.seed_from_file(key))
    }

    fn sealing_key_id(&self) -> Option<&str> {
        self.sealer.as_deref().map(Sealer::key_id)
    }

    fn problem<'a>(&'a self, _provider: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut connection = match self.connection().await {
                Ok(connection) => connection,
                Err(e) => return Some(crate::errors::report(&e)),
            };
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut connection).await;
            pong.err().map(|e| crate::errors::report(&self.failed(e)))
        })
    }

    fn location(&self, key: Key<'_>) -> String {
        format!("redis key {} at {}", self.document_key(key), self.settings.shown_url)
    }

    fn watch(&self) -> ChangeFeed {
        let (tx, changes) = mpsc::unbounded_channel();
        let primary = self.primary.clone();
        let channel = self.channel();
        let shown = self.settings.shown_url.clone();
        let fingerprinted = self.fingerprinted.clone();
        let task = tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                // Subscribed on the primary of the moment, and again on the next one after a
                // failover (a stopped primary would keep an old subscription silent forever).
                let mut moved = primary.changes();
                moved.mark_unchanged();
                let node = primary.node().await;
                let subscribed = match &node {
                    Ok(node) => node.client.get_async_pubsub().await.map_err(|e| e.to_string()),
                    Err(e) => Err(crate::errors::report(e)),
                };
                match subscribed {
                    Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                        Ok(()) => {
                            delay = Duration::from_millis(200);
                            // Whatever changed while we were not listening.
                            let _ = tx.send(Change::Everything);
                            let mut messages = pubsub.on_message();
                            loop {
                                let message = tokio::select! {
                                    message = messages.next() => message,
                                    _ = moved.changed() => {
                                        tracing::info!(store = %shown, "the primary moved; following the change feed there");
                                        break;
                                    }
                                };
                                let Some(message) = message else {
                                    tracing::warn!(store = %shown, "lost the token store's change feed; reconnecting");
                                    break;
                                };
                                let text: String = message.get_payload().unwrap_or_default();
                                let (provider, account) =
                                    text.split_once('\n').unwrap_or((text.as_str(), ""));
                                let account = if account.starts_with(FINGERPRINTED) {
                                    // An account never used here has nothing here to read again.
                                    let known = fingerprinted.lock().unwrap_or_else(|e| e.into_inner());
                                    let Some(name) = known.get(account) else {
                                        continue;
                                    };
                                    Some(name.clone())
                                } else {
                                    (!account.is_empty()).then(|| account.to_string())
                                };
                                let change = Change::Key { provider: provider.to_string(), account };
                                if tx.send(change).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(store = %shown, error = %e, "cannot subscribe to token changes")
                        }
                    },
                    Err(e) => {
                        tracing::debug!(store = %shown, error = %e, "token store unreachable for changes")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        });
        ChangeFeed { changes, _source: Some(Box::new(AbortOnDrop(task))) }
    }
}
