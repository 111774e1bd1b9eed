//! Writing the token file after a refresh, and the advisory lock that keeps processes sharing
//! one file from spending a rotated refresh token twice (SPEC §4).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::FileFormat;
use crate::fsutil::{Existing, remove_stale_temporaries, write_atomically};
use crate::oauth::IssuedToken;

/// An exclusive advisory lock on `<token_file>.lock`, released on drop. Held while deciding to
/// refresh, refreshing and writing.
pub struct TokenFileLock {
    _file: File,
}

/// The file a token path stands for: a symlinked token file is written through to its target
/// (replacing the link would leave the target holding a spent refresh token), and its lock lives
/// beside the target, where every process sharing the target finds it.
pub fn resolve(token_file: &Path) -> PathBuf {
    match std::fs::symlink_metadata(token_file) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::canonicalize(token_file).unwrap_or_else(|_| token_file.to_path_buf())
        }
        _ => token_file.to_path_buf(),
    }
}

pub fn lock_path(token_file: &Path) -> PathBuf {
    let token_file = resolve(token_file);
    let mut name = token_file.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    token_file.with_file_name(name)
}

/// Blocks until the lock is ours; call it off the async threads.
pub fn lock(token_file: &Path) -> std::io::Result<TokenFileLock> {
    let token_file = resolve(token_file);
    if let Some(dir) = token_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(&token_file))?;
    file.lock()?;
    Ok(TokenFileLock { _file: file })
}

/// The fields of the file after a refresh: everything it had, with the new `access_token`,
/// `expires_at`, `updated_at`, and a rotated `refresh_token` when the endpoint sent one.
pub fn refreshed_fields(
    previous: &Map<String, Value>,
    issued: &IssuedToken,
    now: OffsetDateTime,
) -> Map<String, Value> {
    let time = |t: OffsetDateTime| Value::String(t.format(&Rfc3339).unwrap_or_default());
    let mut fields = previous.clone();
    fields.insert("access_token".into(), Value::String(issued.access_token.clone()));
    fields.insert("expires_at".into(), time(issued.expires_at));
    fields.insert("updated_at".into(), time(now));
    if let Some(refresh_token) = &issued.refresh_token {
        fields.insert("refresh_token".into(), Value::String(refresh_token.clone()));
    }
    if let Some(token_type) = &issued.token_type {
        fields.insert("token_type".into(), Value::String(token_type.clone()));
    }
    if let Some(scope) = &issued.scope {
        fields.insert("scope".into(), Value::String(scope.clone()));
    }
    // `expires_in` relative to an old timestamp would now contradict `expires_at`.
    for key in REFRESH_REMOVES {
        fields.remove(key);
    }
    fields
}

/// The fields a refresh owns, and those it removes.
const REFRESH_OWNED: [&str; 6] =
    ["access_token", "refresh_token", "expires_at", "updated_at", "token_type", "scope"];
const REFRESH_REMOVES: [&str; 2] = ["expires_in", "issued_at"];

/// `file`'s fields with a refresh's own fields (from `refreshed`) laid on top: a person's edit
/// to other fields is kept, the refresh's tokens and times win.
pub fn overlay_refresh(file: &Map<String, Value>, refreshed: &Map<String, Value>) -> Map<String, Value> {
    let mut fields = file.clone();
    for key in REFRESH_OWNED {
        if let Some(value) = refreshed.get(key) {
            fields.insert(key.into(), value.clone());
        }
    }
    for key in REFRESH_REMOVES {
        fields.remove(key);
    }
    fields
}

/// Serialises `fields` in the file's format.
pub fn encode(format: FileFormat, fields: &Map<String, Value>) -> std::io::Result<Vec<u8>> {
    let value = Value::Object(fields.clone());
    match format {
        FileFormat::Json => {
            let mut bytes = serde_json::to_vec_pretty(&value).map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            Ok(bytes)
        }
        FileFormat::Yaml => {
            serde_norway::to_string(&value).map(String::into_bytes).map_err(std::io::Error::other)
        }
        FileFormat::Raw => Err(std::io::Error::other("a raw token file is only read, never written")),
    }
}

/// Writes the token file atomically with mode 0600. Called under the token file's lock, so the
/// leftovers of a writer killed mid-write can be cleared first.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let path = resolve(path);
    remove_stale_temporaries(&path);
    write_atomically(&path, bytes, 0o600, Existing::Replace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_keeps_every_other_field_and_keeps_an_unrotated_refresh_token() {
        let previous: Map<String, Value> = serde_json::from_str(
            r#"{"access_token":"old","refresh_token":"r1","custom":{"a":1},"expires_in":60,"updated_at":"x"}"#,
        )
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = IssuedToken {
            access_token: "new".into(),
            refresh_token: None,
            expires_at: now + time::Duration::hours(1),
            token_type: None,
            scope: None,
        };
        let fields = refreshed_fields(&previous, &issued, now);
        assert_eq!(fields["access_token"], "new");
        assert_eq!(fields["refresh_token"], "r1");
        assert_eq!(fields["custom"], serde_json::json!({"a": 1}));
        assert!(!fields.contains_key("expires_in"));
        let doc = super::super::file::document_from_fields(fields).unwrap();
        assert_eq!(doc.expiry_source, super::super::file::ExpirySource::ExpiresAt);
    }

    #[test]
    fn a_write_clears_what_a_killed_writer_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let stale = dir.path().join(".t.json.tokenproxy-abc123.tmp");
        let other = dir.path().join(".other.json.tokenproxy-abc123.tmp");
        std::fs::write(&stale, "half").unwrap();
        std::fs::write(&other, "another file's").unwrap();
        write(&path, b"{}\n").unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "only this file's temporaries are touched");
    }

    #[test]
    fn a_yaml_token_file_round_trips_with_every_field() {
        let fields: Map<String, Value> = serde_json::from_str(
            r#"{"access_token":"a: b # not a comment","refresh_token":"r","expires_at":"2099-01-01T00:00:00Z","userid":12345,"nested":{"k":[1,"two"]}}"#,
        )
        .unwrap();
        let bytes = encode(FileFormat::Yaml, &fields).unwrap();
        let doc = super::super::file::parse(FileFormat::Yaml, &bytes).unwrap();
        assert_eq!(doc.fields, fields);
        assert_eq!(doc.access_token, "a: b # not a comment");
    }

    #[test]
    fn writes_are_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        write(&path, b"{}\n").unwrap();
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
