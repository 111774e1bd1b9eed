//! Reconciliation with the store: reading a credential's document again, adopting what changed,
//! writing back a refreshed token that waited for a document to parse again (or for a shared
//! store that lost it), and following the store's change feed. The cache changes only here and
//! when a refresh completes.

use super::*;

impl Provider {
    /// Reads the credential's stored token again and adopts it if it changed. A refreshed token
    /// that waited for a file to parse again is written into it.
    ///
    /// A document that cannot be read or parsed never replaces a good token: the last good one
    /// stays in use and the problem shows as `last_error`.
    pub async fn reload(&self, cred: &Credential) -> Reload {
        if self.signer.is_some() {
            // Nothing stored: its credentials are the signer's (SPEC §14 `sigv4`).
            return Reload::Unchanged;
        }
        let read = self.read_store(cred).await;
        if let Some(fields) = read.write_back {
            let _lock = self.store.lock(self.key(cred)).await;
            if self.persist(cred, &fields, read.basis).await == refresh::Persisted::Written
                && read.unacknowledged
            {
                self.use_written(cred, &fields);
                return Reload::Ok;
            }
            tracing::info!(
                provider = self.name(),
                account = cred.account_log(),
                "the token file parses again; the refreshed token is written into it"
            );
        }
        read.outcome
    }

    /// Puts a refreshed token into use once its write is acknowledged (it was held back until
    /// then, SPEC §11 `min_replicas_ack`).
    pub(super) fn use_written(&self, cred: &Credential, fields: &store::Fields) -> Option<Arc<Token>> {
        let doc = file::document_from_fields(fields.clone()).ok()?;
        let token = self.prepare(&doc).ok()?;
        if cred.current().is_some_and(|current| current.fingerprint == token.fingerprint) {
            return cred.current();
        }
        tracing::info!(
            provider = self.name(),
            account = cred.account_log(),
            fingerprint = %token.fingerprint,
            "the refreshed token's write is acknowledged now; it is in use"
        );
        // The refresh it finishes succeeded after all: nothing to back off from or report.
        let mut status = cred.status();
        status.retry_not_before = None;
        status.last_failure = None;
        status.last_error = status.write_error.clone();
        drop(status);
        Some(cred.install(token))
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
            unacknowledged: false,
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
            // A write that was not acknowledged is written again over the same document too
            // (the primary may keep it, or a failover may have taken it back).
            let behind = |at: Option<time::OffsetDateTime>| {
                file::is_older(at, held.updated_at)
                    || (!held.acknowledged && !file::is_older(held.updated_at, at))
            };
            if let Some(stored_at) = stored_at.filter(|at| behind(*at)) {
                let basis = match &loaded {
                    Ok(Loaded::Found { version, .. }) => Basis::Stored(Some(*version)),
                    _ => Basis::Stored(None),
                };
                drop(status);
                if held.acknowledged {
                    tracing::warn!(
                        provider = self.name(),
                        account = cred.account_log(),
                        location = %shown,
                        stored = if stored_at.is_some() { "older" } else { "nothing" },
                        "the token store holds an older token than this replica (or none): writing this replica's back"
                    );
                } else {
                    tracing::info!(
                        provider = self.name(),
                        account = cred.account_log(),
                        location = %shown,
                        "writing the refreshed token again: its last write was not acknowledged by min_replicas_ack replicas"
                    );
                }
                let mut restored = (*held.fields).clone();
                let now = self.clock.now().format(&Rfc3339).unwrap_or_default();
                restored.insert(file::RESTORED_AT.into(), serde_json::Value::String(now));
                return StoreRead {
                    write_back: Some(restored.clone()),
                    fields: Some(restored),
                    basis,
                    lost: held.acknowledged,
                    unacknowledged: !held.acknowledged,
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
                (FileStatus::Unreadable, format!("{shown}: {}", crate::errors::report(&e)))
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
}

impl Providers {
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
    /// `write_back` is this replica's refresh whose write was not acknowledged: once written, it
    /// is the token to use.
    pub(super) unacknowledged: bool,
}

/// The stored content a write is based on: the store writes only over that content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Basis {
    /// A document that parsed, at this version, or none.
    Stored(Option<store::Version>),
    /// A document that does not parse (a person may be mid-edit): never written over.
    Unparsable(store::Version),
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
