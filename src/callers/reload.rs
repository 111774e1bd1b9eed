//! Edits take effect without a restart, within a second (SPEC §13): the config file and every
//! caller's secret and JWKS file are looked at four times a second (their metadata only), and
//! when one changed, the callers are read again and the table replaced whole.
//!
//! An edit is best made by writing a new file and renaming it over the old one: a file read while
//! it is being written is read again on the next look, but until then a half-written config or
//! secret is what is in force.
//!
//! A config that no longer loads keeps the callers in force (a half-saved edit must not open the
//! proxy to everyone or shut it for everyone), with an error in the log until it is mended. A
//! secret or JWKS file that cannot be used closes that identity: deleting a caller's secret
//! file revokes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Callers, Table};
use crate::config::Config;

/// How often the files are looked at: a revocation is in force within this plus a rebuild.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What is known of a file without reading it; a change in any part is an edit (a rename over
/// it changes the inode, a Kubernetes `..data` swap changes what the path leads to).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    changed: i64,
    len: u64,
    inode: u64,
}

impl Seen {
    /// What no file looks like: compared with it, every file has changed.
    const UNKNOWN: Seen = Seen { modified: None, changed: i64::MIN, len: u64::MAX, inode: 0 };
}

fn look(path: &Path) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Seen {
        modified: meta.modified().ok(),
        changed: meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// The files a table was built from: the config's and each caller's secret and JWKS file.
fn files_of(source: &Path, table: &Table) -> Vec<PathBuf> {
    let mut files = vec![source.to_path_buf()];
    for config in &table.configs {
        files.extend(config.secret_file.iter().cloned());
        files.extend(config.jwt.iter().map(|j| j.jwks_file.clone()));
    }
    files
}

/// Watches for edits until the task is aborted.
pub async fn keep_current(callers: Arc<Callers>, source: PathBuf) {
    let mut files = files_of(&source, &callers.current());
    // Not what the files are now: the table was built from them earlier (the config was read
    // before the providers were loaded and this task first ran), and an edit made in between
    // would never be seen. The first look reads them again.
    let mut seen: Vec<Option<Seen>> = vec![Some(Seen::UNKNOWN); files.len()];
    let mut every = tokio::time::interval(LOOK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now: Vec<Option<Seen>> = files.iter().map(|f| look(f)).collect();
        if now == seen {
            continue;
        }
        let loaded = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || reload(&source)).await
        };
        if let Ok(Some(table)) = loaded {
            callers.replace(table);
        }
        // What the files were before they were read is the baseline: one written again while
        // it was being read (a half-written edit) is read once more on the next look. A file the
        // new table names for the first time is taken as it is now.
        let before: Vec<(PathBuf, Option<Seen>)> = files.into_iter().zip(now).collect();
        files = files_of(&source, &callers.current());
        seen = files
            .iter()
            .map(|f| match before.iter().find(|(path, _)| path == f) {
                Some((_, was)) => was.clone(),
                None => look(f),
            })
            .collect();
    }
}

/// The callers of the config as it is now, or `None` when it does not load.
fn reload(source: &Path) -> Option<Table> {
    let config = match Config::load(source) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(
                config = %source.display(),
                problems = %e.problems.join("; "),
                "the config file changed but does not load: the callers in force stay as they were"
            );
            return None;
        }
    };
    let (table, problems) = Table::build(&config.callers);
    for problem in &problems {
        tracing::warn!(problem = %problem, "caller identity closed until this is mended");
    }
    tracing::info!(callers = config.callers.len(), "callers reloaded");
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is built when the config is read, and this task starts later (after the
    /// providers are loaded): an edit made in between is still taken.
    #[tokio::test]
    async fn an_edit_made_before_the_watch_started_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenproxy.toml");
        let base = "[providers.api]\nhosts = [\"api.test\"]\ntoken_file = \"api.json\"\n";
        std::fs::write(&path, base).unwrap();
        let (table, _) = Table::build(&Config::load(&path).unwrap().callers);
        let callers = Arc::new(Callers::new(table));
        std::fs::write(dir.path().join("ci.secret"), "a-secret-of-sixteen-chars").unwrap();
        let edited = format!("{base}[callers.ci]\nsecret_file = \"ci.secret\"\n");
        std::fs::write(&path, edited).unwrap();
        let watch = tokio::spawn(keep_current(callers.clone(), path));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while callers.current().is_open() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        watch.abort();
        assert!(!callers.current().is_open(), "the caller added before the watch started is in force");
    }
}
