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

const TEMPORARY_SUFFIX: &str = ".tmp";

/// Temporary files are named after their target (`.token.json.tokenproxy-XXXX.tmp`), so that
/// those a crash left behind can be found and removed.
fn temporary_prefix(path: &Path) -> String {
    format!(".{}.tokenproxy-", path.file_name().unwrap_or_default().to_string_lossy())
}

/// Removes temporary files that a process killed in the middle of writing `path` left behind.
/// Call it only while no other process can be writing `path` (under its lock).
pub fn remove_stale_temporaries(path: &Path) {
    let (Some(dir), prefix) = (path.parent(), temporary_prefix(path)) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(TEMPORARY_SUFFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path`: a temporary file in the same folder (so the rename is atomic), with
/// `mode`, fsynced, renamed into place, then the folder fsynced so the rename itself is durable.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp =
        tempfile::Builder::new().prefix(&temporary_prefix(path)).suffix(TEMPORARY_SUFFIX).tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map(drop).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map(drop).map_err(|e| e.error)?,
    }
    std::fs::File::open(dir)?.sync_all()
}
