//! Writing files so that a crash at any moment leaves either the old file or the new one, whole.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Whether an existing file at the destination may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Fail with `AlreadyExists` instead (two processes creating the same CA at once).
    Keep,
}

/// Writes `bytes` to `path`: a temporary file in the same folder (so the rename is atomic), with
/// `mode`, fsynced, renamed into place, then the folder fsynced so the rename itself is durable.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".tokenproxy-").suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map(drop).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map(drop).map_err(|e| e.error)?,
    }
    std::fs::File::open(dir)?.sync_all()
}
