//! Re-reading token files when they change on disk.
//!
//! The watch is on each token file's *folder*, not the file: a watch on the file itself dies when
//! the file is replaced by a rename, and a Kubernetes secret volume swaps a `..data` symlink
//! without touching the file's own name. Folder events are only a hint: after a short debounce
//! the token files they may concern are re-read through their paths (an account's own file when
//! the event names it, every loaded file otherwise), and a credential changes only when the
//! content did. A slow poll backs the watch up for folders that did not exist at start, or
//! events that a file system does not deliver.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Providers;

/// Events closer together than this are handled as one.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The safety net for changes that no event announced.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Starts watching every provider's token folder. The returned task runs until aborted.
pub fn spawn(providers: Arc<Providers>) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file is an "access" event in its folder: acting on those would make every
        // re-read trigger the next one.
        match event {
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => {}
            // An event that names no path (or asks for a rescan) concerns everything.
            Ok(e) if !e.need_rescan() && !e.paths.is_empty() => {
                let _ = tx.send(e.paths);
            }
            _ => {
                let _ = tx.send(Vec::new());
            }
        }
    });
    // The token file's folder, and for a symlinked file also its target's folder, where edits
    // and tokenproxy's own writes land.
    let folders: BTreeSet<PathBuf> = providers
        .iter()
        .flat_map(|p| {
            // A multi-account provider's template names no file: its folder is the one to watch.
            let file = &p.config.token_file;
            if p.is_multi_account() {
                vec![file.clone()]
            } else {
                vec![file.clone(), super::store::resolve(file)]
            }
        })
        .filter_map(|file| file.parent().map(|d| d.to_path_buf()))
        .collect();
    let watcher = match watcher {
        Ok(mut watcher) => {
            for folder in &folders {
                if let Err(e) = watcher.watch(folder, RecursiveMode::NonRecursive) {
                    tracing::warn!(
                        folder = %folder.display(),
                        error = %e,
                        "cannot watch token folder; changes there are picked up by polling every {}s",
                        POLL_EVERY.as_secs()
                    );
                }
            }
            Some(watcher)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; polling token files instead");
            None
        }
    };
    tokio::spawn(async move {
        // Owned by the task so that the watch lives exactly as long as it.
        let _watcher = watcher;
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut events_open = true;
        loop {
            // `None`: everything (the poll, or an event that names no path).
            let changed: Option<Vec<PathBuf>> = tokio::select! {
                event = rx.recv(), if events_open => {
                    let Some(paths) = event else {
                        // The watcher is gone; polling carries on alone.
                        events_open = false;
                        continue;
                    };
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut all = Some(paths);
                    while let Ok(more) = rx.try_recv() {
                        all = all.filter(|_| !more.is_empty()).map(|mut all| { all.extend(more); all });
                    }
                    all.filter(|paths| !paths.is_empty())
                }
                _ = poll.tick() => None,
            };
            let providers = providers.clone();
            // File reads are blocking; keep them off the request-serving threads.
            let _ = tokio::task::spawn_blocking(move || match changed {
                Some(paths) => providers.reload_changed(&paths),
                None => providers.reload_all(),
            })
            .await;
        }
    })
}
