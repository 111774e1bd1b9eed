//! Keeping the cache in step with the store: the changes the store reports, read again after a
//! short debounce, and a slow poll as the safety net for changes that no event announced (a
//! folder that did not exist at start, a file system that delivers no events). A credential
//! changes only when its stored version did.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Providers;
use super::store::Change;

/// Changes closer together than this are handled as one.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The safety net for changes that no event announced.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Starts following the store's changes. The returned task runs until aborted.
pub fn spawn(providers: Arc<Providers>) -> tokio::task::JoinHandle<()> {
    let feed = providers.store().watch();
    tokio::spawn(async move {
        // Owned whole by the task (not just its receiver), so that the source lives as long.
        let mut feed = feed;
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut events_open = true;
        loop {
            let changes: BTreeSet<Change> = tokio::select! {
                change = feed.changes.recv(), if events_open => {
                    let Some(change) = change else {
                        // The source is gone; polling carries on alone.
                        events_open = false;
                        continue;
                    };
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut changes = BTreeSet::from([change]);
                    while let Ok(more) = feed.changes.try_recv() {
                        changes.insert(more);
                    }
                    tracing::debug!(source = "event", changes = changes.len(), "reading changed tokens");
                    if changes.contains(&Change::Everything) {
                        BTreeSet::from([Change::Everything])
                    } else {
                        changes
                    }
                }
                _ = poll.tick() => {
                    tracing::debug!(source = "poll", "reading changed tokens");
                    BTreeSet::from([Change::Everything])
                }
            };
            for change in &changes {
                providers.apply(change).await;
            }
        }
    })
}
