//! Re-reading token files when they change on disk.
//!
//! The watch is on each token file's *folder*, not the file: a watch on the file itself dies when
//! the file is replaced by a rename, and a Kubernetes secret volume swaps a `..data` symlink
//! without touching the file's own name. Folder events are only a hint: after a short debounce
//! every token file is re-read through its path, and a provider changes only when the content
//! did. A slow poll backs the watch up for folders that did not exist at start, or events that a
//! file system does not deliver.

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
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file is an "access" event in its folder: acting on those would make every
        // re-read trigger the next one.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    });
    // The token file's folder, and for a symlinked file also its target's folder, where edits
    // and tokenproxy's own writes land.
    let folders: BTreeSet<PathBuf> = providers
        .iter()
        .flat_map(|p| [p.config.token_file.clone(), super::store::resolve(&p.config.token_file)])
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
            tokio::select! {
                event = rx.recv(), if events_open => {
                    if event.is_none() {
                        // The watcher is gone; polling carries on alone.
                        events_open = false;
                        continue;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            let providers = providers.clone();
            // File reads are blocking; keep them off the request-serving threads.
            let _ = tokio::task::spawn_blocking(move || providers.reload_all()).await;
        }
    })
}
