//! [`FileStore`]: token files on disk (SPEC §4), the only code that touches token bytes there.
//!
//! A file's version is a hash of its bytes, so tokenproxy's own write comes back through the
//! watcher as "unchanged", and a write based on content that a person has since edited is a
//! conflict. Writes are atomic and private (0600); a symlinked file is written through to its
//! target. The refresh lock is an advisory lock on `<token_file>.lock`, which keeps processes
//! sharing one file from spending a rotated refresh token twice. Changes are reported from a
//! watch on each token *folder* (a watch on the file dies when an atomic replace renames over
//! it, and a Kubernetes secret volume swaps a `..data` symlink without touching the file's name).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::seal::{self, Sealer};
use super::{
    Change, ChangeFeed, Fields, Key, Loaded, SaveError, StoreError, StoreFuture, StoreLock, TokenStore,
    Version,
};
use crate::config::{FileFormat, ProviderConfig};
use crate::fsutil::{Existing, remove_stale_temporaries, write_atomically};
use std::sync::Arc;

/// A token file larger than this is refused as unparsable: no token document is near it, and
/// holding and hashing such a file on every poll would cost memory and time for nothing.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Token files, laid out as each provider's `token_file` says; sealed when a key is configured.
pub struct FileStore {
    providers: Vec<ProviderConfig>,
    sealer: Option<Arc<Sealer>>,
}

/// Whom a document belongs to, owned, for work on the blocking pool: what a sealed document is
/// bound to.
struct Owner {
    provider: String,
    account: Option<String>,
}

impl Owner {
    fn of(key: Key<'_>) -> Owner {
        Owner { provider: key.provider.to_string(), account: key.account.map(str::to_string) }
    }

    fn key(&self) -> Key<'_> {
        Key { provider: &self.provider, account: self.account.as_deref() }
    }
}

impl FileStore {
    /// Token files in plaintext.
    pub fn new(providers: &[ProviderConfig]) -> FileStore {
        FileStore::sealed(providers, None)
    }

    /// Token files sealed with `sealer` when written (plaintext ones are still read, and sealed
    /// on their next write).
    pub fn sealed(providers: &[ProviderConfig], sealer: Option<Arc<Sealer>>) -> FileStore {
        // A provider that signs (SPEC §14 `sigv4`) keeps no token file.
        let providers = providers.iter().filter(|p| p.sigv4.is_none()).cloned().collect();
        FileStore { providers, sealer }
    }

    fn config(&self, provider: &str) -> Result<&ProviderConfig, StoreError> {
        self.providers
            .iter()
            .find(|p| p.name == provider)
            .ok_or_else(|| StoreError::config(format!("no provider named {provider:?} in the file store")))
    }

    /// The token file of `key`.
    pub fn path(&self, key: Key<'_>) -> Result<PathBuf, StoreError> {
        let config = self.config(key.provider)?;
        Ok(match key.account {
            Some(account) => config.account_file(account),
            None => config.token_file.clone(),
        })
    }
}

/// Runs blocking file work on the blocking pool, never on a thread that serves requests.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::unavailable("the file task failed").caused_by(e))
}

impl TokenStore for FileStore {
    fn load<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<Loaded, StoreError>> {
        let path = self.path(key);
        let (owner, sealer) = (Owner::of(key), self.sealer.clone());
        Box::pin(async move {
            let path = path?;
            blocking(move || load_file(&path, &owner, sealer.as_deref()).map(|stored| stored.loaded))
                .await?
                .map_err(|e| StoreError::io("reading", e))
        })
    }

    fn save<'a>(
        &'a self,
        key: Key<'a>,
        fields: &'a Fields,
        expected: Option<Version>,
    ) -> StoreFuture<'a, Result<Version, SaveError>> {
        let path = self.path(key);
        let checked = super::check_storable(fields);
        let fields = fields.clone();
        let (owner, sealer) = (Owner::of(key), self.sealer.clone());
        Box::pin(async move {
            checked.map_err(SaveError::Failed)?;
            let path = path.map_err(SaveError::Failed)?;
            blocking(move || save_file(&path, &fields, expected, &owner, sealer.as_deref()))
                .await
                .map_err(SaveError::Failed)?
        })
    }

    fn lock<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Result<StoreLock, StoreError>> {
        let path = self.path(key);
        Box::pin(async move {
            let path = path?;
            let locking = path.clone();
            match blocking(move || lock(&locking)).await? {
                Ok(file) => Ok(StoreLock::new(file)),
                // A folder where the lock file cannot be created (read-only) must not stop
                // refreshes: traffic goes on, without protection against other processes.
                Err(e) => {
                    let shown = self.location(Key { account: key.account.map(|_| "<account>"), ..key });
                    tracing::warn!(
                        provider = key.provider,
                        account = key.account.map(crate::accounts::log_name),
                        lock = %format!("{shown}.lock"),
                        error = %e,
                        "cannot take the token file lock; refreshing without cross-process protection"
                    );
                    Ok(StoreLock::unprotected())
                }
            }
        })
    }

    fn probe<'a>(&'a self, key: Key<'a>) -> StoreFuture<'a, Option<u64>> {
        let path = self.path(key);
        Box::pin(async move { blocking(move || probe(&path.ok()?)).await.ok().flatten() })
    }

    fn accounts<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Result<Vec<String>, StoreError>> {
        let config = self.config(provider).cloned();
        Box::pin(async move {
            let config = config?;
            blocking(move || account_files(&config)).await?
        })
    }

    fn problem<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<String>> {
        let folder = self.config(provider).ok().and_then(|c| c.token_file.parent().map(Path::to_path_buf));
        Box::pin(async move {
            let folder = folder?;
            blocking(move || match std::fs::read_dir(&folder) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Some(format!("token folder {} cannot be read: {e}", folder.display()))
                }
                _ => None,
            })
            .await
            .ok()
            .flatten()
        })
    }

    fn location(&self, key: Key<'_>) -> String {
        match self.path(key) {
            Ok(path) => format!("token file {}", path.display()),
            Err(e) => crate::errors::report(&e),
        }
    }

    fn sealing_key_id(&self) -> Option<&str> {
        self.sealer.as_deref().map(Sealer::key_id)
    }

    fn forget(&self, key: Key<'_>) {
        let Ok(path) = self.path(key) else { return };
        if !path.exists() {
            let _ = std::fs::remove_file(lock_path(&path));
        }
    }

    fn watch(&self) -> ChangeFeed {
        let (tx, changes) = mpsc::unbounded_channel();
        let providers = self.providers.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading a file is an "access" event in its folder: acting on those would make every
            // re-read trigger the next one.
            let paths = match event {
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
                Ok(e) if !e.need_rescan() => e.paths,
                // An event that names no path (or asks for a rescan) concerns everything.
                _ => Vec::new(),
            };
            for change in changes_for(&providers, &paths) {
                let _ = tx.send(change);
            }
        });
        let watcher = match watcher {
            Ok(mut watcher) => {
                for folder in watched_folders(&self.providers) {
                    if let Err(e) = watcher.watch(&folder, RecursiveMode::NonRecursive) {
                        tracing::warn!(
                            folder = %folder.display(),
                            error = %e,
                            "cannot watch token folder; changes there are picked up by polling"
                        );
                    }
                }
                Some(Box::new(watcher) as Box<dyn Send>)
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable; polling token files instead");
                None
            }
        };
        ChangeFeed { changes, _source: watcher }
    }
}

/// Why a token file could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The first bytes, to tell one oversized content from another.
    #[error("the file is larger than {} KiB; refused", MAX_FILE_BYTES / 1024)]
    TooLarge(Vec<u8>),
}

/// Reads a token file, refusing one over [`MAX_FILE_BYTES`] (whatever its metadata claims).
fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge(bytes));
    }
    Ok(bytes)
}

fn version_of(bytes: &[u8]) -> Version {
    let digest = Sha256::digest(bytes);
    Version(u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes")))
}

/// A stored file as read: what the cache sees, and whether it is sealed with a key this process
/// does not hold (such a file is never written over).
struct Stored {
    loaded: Loaded,
    foreign_key: Option<seal::OpenError>,
}

fn load_file(path: &Path, owner: &Owner, sealer: Option<&Sealer>) -> std::io::Result<Stored> {
    let bytes = match read(path) {
        Ok(bytes) => bytes,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Stored { loaded: Loaded::Missing, foreign_key: None });
        }
        Err(ReadError::Io(e)) => return Err(e),
        Err(e @ ReadError::TooLarge(_)) => {
            let ReadError::TooLarge(bytes) = &e else { unreachable!() };
            let loaded = Loaded::Found { version: version_of(bytes), doc: Err(e.to_string()), sealed: false };
            return Ok(Stored { loaded, foreign_key: None });
        }
    };
    let decoded = seal::decode(sealer, owner.key(), FileFormat::of(path), &bytes);
    let loaded = Loaded::Found { version: version_of(&bytes), doc: decoded.doc, sealed: decoded.sealed };
    Ok(Stored { loaded, foreign_key: decoded.foreign_key })
}

/// Writes `fields` if the file still holds `expected`, sealed when there is a sealer. Called
/// under the file's lock, so the leftovers of a writer killed mid-write can be cleared first.
/// A file sealed with a key this process does not hold is never written over.
fn save_file(
    path: &Path,
    fields: &Fields,
    expected: Option<Version>,
    owner: &Owner,
    sealer: Option<&Sealer>,
) -> Result<Version, SaveError> {
    let failed = |e: std::io::Error| SaveError::Failed(StoreError::io("writing", e));
    let path = resolve(path);
    let current = load_file(&path, owner, sealer)
        .map_err(|e| SaveError::Failed(StoreError::io("cannot be read", e)))?;
    if let Some(foreign) = current.foreign_key {
        return Err(SaveError::Failed(StoreError::refused(format!("{foreign}; it is left as it is"))));
    }
    let stored = match &current.loaded {
        Loaded::Missing => None,
        Loaded::Found { version, .. } => Some(*version),
    };
    if stored != expected {
        return Err(SaveError::Conflict(Box::new(current.loaded)));
    }
    let bytes = seal::encode(sealer, owner.key(), FileFormat::of(&path), fields).map_err(failed)?;
    super::check_stored_size(&bytes).map_err(SaveError::Failed)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    remove_stale_temporaries(&path);
    write_atomically(&path, &bytes, 0o600, Existing::Replace).map_err(failed)?;
    Ok(version_of(&bytes))
}

/// The file a token path stands for: a symlinked token file is written through to its target
/// (replacing the link would leave the target holding a spent refresh token), and its lock lives
/// beside the target, where every process sharing the target finds it.
fn resolve(token_file: &Path) -> PathBuf {
    match std::fs::symlink_metadata(token_file) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::canonicalize(token_file).unwrap_or_else(|_| token_file.to_path_buf())
        }
        _ => token_file.to_path_buf(),
    }
}

fn lock_path(token_file: &Path) -> PathBuf {
    let token_file = resolve(token_file);
    let mut name = token_file.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    token_file.with_file_name(name)
}

/// Blocks until the lock on `<token_file>.lock` is ours; released when the file is closed.
fn lock(token_file: &Path) -> std::io::Result<File> {
    let token_file = resolve(token_file);
    if let Some(dir) = token_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(&token_file))?;
    file.lock()?;
    Ok(file)
}

/// What tells cheaply that a file may have changed: size, times and identity (an atomic replace
/// is a new inode), hashed.
fn probe(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    (m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec(), m.ino(), m.dev()).hash(&mut hasher);
    Some(hasher.finish())
}

/// The accounts that have a token file in a multi-account provider's folder, sorted. A folder
/// that does not exist yet has none.
fn account_files(config: &ProviderConfig) -> Result<Vec<String>, StoreError> {
    let Some(folder) = config.token_file.parent() else { return Ok(Vec::new()) };
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            let what = format!("token folder {} cannot be read", folder.display());
            return Err(StoreError::unavailable(what).caused_by(e));
        }
    };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).filter_map(|e| config.account_of_file(&e.path())).collect();
    names.sort();
    Ok(names)
}

/// The folders to watch: each token file's folder, and for a symlinked file also its target's
/// folder, where edits and tokenproxy's own writes land. A multi-account provider's template
/// names no file: its folder is the one.
fn watched_folders(providers: &[ProviderConfig]) -> BTreeSet<PathBuf> {
    providers
        .iter()
        .flat_map(|p| {
            let file = &p.token_file;
            if p.is_multi_account() { vec![file.clone()] } else { vec![file.clone(), resolve(file)] }
        })
        .filter_map(|file| file.parent().map(Path::to_path_buf))
        .collect()
}

/// The keys that events on `paths` may concern (all of them when no path is named). A single
/// account provider's file is read again on any change in its folders, since its content decides.
fn changes_for(providers: &[ProviderConfig], paths: &[PathBuf]) -> BTreeSet<Change> {
    if paths.is_empty() {
        return BTreeSet::from([Change::Everything]);
    }
    let mut changes = BTreeSet::new();
    for path in paths.iter().filter(|p| !is_bookkeeping(p)) {
        for config in providers {
            let provider = config.name.clone();
            if config.is_multi_account() {
                if let Some(account) = config.account_of_file(path) {
                    changes.insert(Change::Key { provider, account: Some(account) });
                } else if path.parent() == config.token_file.parent() {
                    changes.insert(Change::Provider(provider));
                }
            } else {
                let folder = path.parent();
                if folder == config.token_file.parent() || folder == resolve(&config.token_file).parent() {
                    changes.insert(Change::Key { provider, account: None });
                }
            }
        }
    }
    changes
}

/// tokenproxy's own files beside the token files: locks and the temporaries of atomic writes.
fn is_bookkeeping(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    name.ends_with(".lock") || (name.starts_with('.') && name.ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Key<'static> = Key { provider: "p", account: None };

    fn save(path: &Path, json: &str, expected: Option<Version>) -> Result<Version, SaveError> {
        save_file(path, &serde_json::from_str(json).unwrap(), expected, &Owner::of(OWNER), None)
    }

    fn load_file(path: &Path) -> std::io::Result<Loaded> {
        super::load_file(path, &Owner::of(OWNER), None).map(|stored| stored.loaded)
    }

    #[test]
    fn a_failure_keeps_its_cause_and_class_and_a_person_reads_both() {
        use std::error::Error;

        use crate::tokens::store::StoreErrorClass;
        let dir = tempfile::tempdir().unwrap();
        // A write where the token's folder is a file: the file system's own error is the source.
        let not_a_folder = dir.path().join("plain");
        std::fs::write(&not_a_folder, "x").unwrap();
        let Err(SaveError::Failed(e)) = save(&not_a_folder.join("t.json"), r#"{"access_token":"a"}"#, None)
        else {
            panic!("a write under a file succeeded")
        };
        assert_eq!(e.class, StoreErrorClass::Unavailable);
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io error as source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotADirectory);
        let shown = crate::errors::report(&e);
        assert!(shown.contains(&e.to_string()) && shown.contains(&io.to_string()), "{shown}");
        // A document that is not a token is refused, and says so without a cause to retry.
        let refused =
            crate::tokens::store::check_storable(&serde_json::from_str(r#"{"x":1}"#).unwrap()).unwrap_err();
        assert_eq!((refused.class, refused.source().is_none()), (StoreErrorClass::Refused, true));
    }

    #[test]
    fn a_write_based_on_another_version_is_a_conflict_that_shows_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let first = save(&path, r#"{"access_token":"a"}"#, None).unwrap();
        assert!(matches!(save(&path, r#"{"access_token":"b"}"#, None), Err(SaveError::Conflict(_))));
        std::fs::write(&path, r#"{"access_token":"edited"}"#).unwrap();
        let Err(SaveError::Conflict(current)) = save(&path, r#"{"access_token":"b"}"#, Some(first)) else {
            panic!("a write based on the version before the edit must conflict");
        };
        let Loaded::Found { doc: Ok(doc), version, .. } = *current else {
            panic!("the conflict shows the edit")
        };
        assert_eq!(doc.access_token, "edited");
        assert_ne!(version, first);
        save(&path, r#"{"access_token":"b"}"#, Some(version)).unwrap();
        let Loaded::Found { version, doc, .. } = load_file(&path).unwrap() else { panic!("missing") };
        assert_eq!(doc.unwrap().access_token, "b");
        save(&path, r#"{"access_token":"c"}"#, Some(version)).unwrap();
    }

    #[test]
    fn a_plaintext_file_is_read_and_sealed_on_its_next_write_and_a_foreign_key_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"access_token":"plain-secret"}"#).unwrap();
        let owner = Owner::of(OWNER);
        let sealer = Sealer::new(&[9u8; 32]);
        let Stored { loaded: Loaded::Found { version, doc, sealed }, .. } =
            super::load_file(&path, &owner, Some(&sealer)).unwrap()
        else {
            panic!("missing")
        };
        assert_eq!((doc.unwrap().access_token.as_str(), sealed), ("plain-secret", false));
        let fields = serde_json::from_str(r#"{"access_token":"new-secret"}"#).unwrap();
        let written = save_file(&path, &fields, Some(version), &owner, Some(&sealer)).unwrap();
        let bytes = std::fs::read_to_string(&path).unwrap();
        assert!(bytes.contains("tokenproxy_sealed") && !bytes.contains("new-secret"), "{bytes}");
        let Stored { loaded: Loaded::Found { version, doc, sealed }, .. } =
            super::load_file(&path, &owner, Some(&sealer)).unwrap()
        else {
            panic!("missing")
        };
        assert_eq!((version, doc.unwrap().access_token.as_str(), sealed), (written, "new-secret", true));

        // Another key, or none: a clear error, and the file is left as it is.
        let other = Sealer::new(&[1u8; 32]);
        for wrong in [Some(&other), None] {
            let Stored { loaded: Loaded::Found { doc, .. }, foreign_key } =
                super::load_file(&path, &owner, wrong).unwrap()
            else {
                panic!("missing")
            };
            assert!(doc.unwrap_err().contains(sealer.key_id()) && foreign_key.is_some());
            let refused = save_file(&path, &fields, Some(written), &owner, wrong);
            assert!(matches!(refused, Err(SaveError::Failed(e)) if e.to_string().contains("left as it is")));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bytes, "untouched");
        }
    }

    #[test]
    fn the_version_is_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let written = save(&path, r#"{"access_token":"a"}"#, None).unwrap();
        let Loaded::Found { version, .. } = load_file(&path).unwrap() else { panic!("missing") };
        assert_eq!(version, written, "our own write reads back as the version it returned");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let Loaded::Found { version, .. } = load_file(&path).unwrap() else { panic!("missing") };
        assert_eq!(version, written, "the same bytes in a new file are the same version");
        assert!(probe(&path).is_some());
        assert!(matches!(load_file(&dir.path().join("none.json")).unwrap(), Loaded::Missing));
    }

    #[test]
    fn events_become_the_keys_they_concern() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("tokenproxy.toml");
        std::fs::write(
            &toml,
            format!(
                "[providers.one]\nhosts = [\"one.test\"]\ntoken_file = \"{0}/one.json\"\n\
                 [providers.many]\nhosts = [\"many.test\"]\ntoken_file = \"{0}/users-{{account}}.json\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let providers = crate::config::Config::load(&toml).unwrap().providers;
        let changes = changes_for(
            &providers,
            &[dir.path().join("users-alice.json"), dir.path().join("users-bob.json.lock")],
        );
        let key = |p: &str, a: Option<&str>| Change::Key { provider: p.into(), account: a.map(Into::into) };
        assert_eq!(changes, BTreeSet::from([key("one", None), key("many", Some("alice"))]));
        let changes = changes_for(&providers, &[dir.path().join("..data")]);
        assert_eq!(changes, BTreeSet::from([key("one", None), Change::Provider("many".into())]));
        assert_eq!(changes_for(&providers, &[]), BTreeSet::from([Change::Everything]));
        assert!(changes_for(&providers, &[PathBuf::from("/elsewhere/one.json")]).is_empty());
    }

    #[test]
    fn a_write_clears_what_a_killed_writer_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let stale = dir.path().join(".t.json.tokenproxy-abc123.tmp");
        let other = dir.path().join(".other.json.tokenproxy-abc123.tmp");
        std::fs::write(&stale, "half").unwrap();
        std::fs::write(&other, "another file's").unwrap();
        save(&path, r#"{"access_token":"a"}"#, None).unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "only this file's temporaries are touched");
    }

    #[test]
    fn writes_are_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        save(&path, r#"{"access_token":"a"}"#, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _lock = lock(&path).unwrap();
        assert!(lock_path(&path).exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
