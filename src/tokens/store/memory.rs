//! A store in memory, for tests: the proof that the token cache needs nothing from a store but
//! the [`TokenStore`] calls (no file is read or written through it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{
    Change, ChangeFeed, Fields, Key, Loaded, SaveError, StoreError, StoreErrorClass, StoreFuture, StoreLock,
    TokenStore, Version,
};
use crate::tokens::file::document_from_fields;

type Owned = (String, Option<String>);

#[derive(Default)]
pub struct MemoryStore {
    documents: Mutex<BTreeMap<Owned, (Version, Fields)>>,
    versions: std::sync::atomic::AtomicU64,
    lock: Arc<tokio::sync::Mutex<()>>,
    pub saves: std::sync::atomic::AtomicUsize,
    /// How many times its lock was taken.
    pub locks: std::sync::atomic::AtomicUsize,
    /// Faults to inject: a lock or a write that fails as a store that is down does.
    pub failing_locks: std::sync::atomic::AtomicBool,
    pub failing_writes: std::sync::atomic::AtomicBool,
    /// Writes are made but reported as not acknowledged by replicas (`min_replicas_ack`).
    pub unacknowledged_writes: std::sync::atomic::AtomicBool,
    /// Whether it plays a store shared by a fleet.
    pub shared: std::sync::atomic::AtomicBool,
}

fn owned(key: Key<'_>) -> Owned {
    (key.provider.to_string(), key.account.map(str::to_string))
}

impl MemoryStore {
    /// Stores `fields` as another writer would, without a version check.
    pub fn put(&self, key: Key<'_>, fields: serde_json::Value) -> Version {
        let serde_json::Value::Object(fields) = fields else { panic!("a document is an object") };
        let version = Version(self.versions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        self.documents.lock().unwrap().insert(owned(key), (version, fields));
        version
    }

    pub fn get(&self, key: Key<'_>) -> Option<Fields> {
        self.documents.lock().unwrap().get(&owned(key)).map(|(_, fields)| fields.clone())
    }

    fn loaded(&self, key: Key<'_>) -> Loaded {
        match self.documents.lock().unwrap().get(&owned(key)) {
            None => Loaded::Missing,
            Some((version, fields)) => Loaded::Found {
                version: *version,
                doc: document_from_fields(fields.clone()).map_err(|e| e.to_string()),
                sealed: false,
            },
        }
    }
}

impl TokenStore for MemoryStore {
    fn load<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>> {
        Box::pin(async move { Ok(self.loaded(key)) })
    }

    fn save<'a>(
        &'a self,
        key: Key<'a>,
        fields: &'a Fields,
        expected: Option<Version>,
    ) -> StoreFuture<'a, Result<Version, SaveError>> {
        Box::pin(async move {
            if self.failing_writes.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SaveError::Failed(StoreError::unavailable(
                    "the memory store refuses writes (test)",
                )));
            }
            let stored = self.documents.lock().unwrap().get(&owned(key)).map(|(v, _)| *v);
            if stored != expected {
                return Err(SaveError::Conflict(Box::new(self.loaded(key))));
            }
            self.saves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let version = self.put(key, serde_json::Value::Object(fields.clone()));
            if self.unacknowledged_writes.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(SaveError::Failed(StoreError::new(
                    StoreErrorClass::Unacknowledged,
                    "no replica acknowledged the write (test)",
                )));
            }
            Ok(version)
        })
    }

    fn lock<'a>(&'a self, _key: Key<'a>) -> StoreFuture<'a, Result<StoreLock, StoreError>> {
        self.locks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            if self.failing_locks.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::unavailable("the memory store is down (test)"));
            }
            Ok(StoreLock::new(self.lock.clone().lock_owned().await))
        })
    }

    fn probe<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move { self.documents.lock().unwrap().get(&owned(key)).map(|(v, _)| v.0) })
    }

    fn accounts<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let documents = self.documents.lock().unwrap();
            Ok(documents.keys().filter(|(p, _)| p == provider).filter_map(|(_, a)| a.clone()).collect())
        })
    }

    fn shared(&self) -> bool {
        self.shared.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn problem<'a>(&'a self, _provider: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async { None })
    }

    fn location(&self, key: Key<'_>) -> String {
        format!("memory key {}/{}", key.provider, key.account.unwrap_or("-"))
    }

    fn watch(&self) -> ChangeFeed {
        let (_tx, changes) = mpsc::unbounded_channel::<Change>();
        ChangeFeed { changes, _source: None }
    }
}
