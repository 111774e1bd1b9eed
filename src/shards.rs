//! The proxy listener's worker threads, as nginx has worker processes: with `[proxy] workers`
//! above one, each worker is a thread with an event loop of its own (a current-thread runtime).
//! One accept loop hands each new connection to the next worker in turn
//! ([`crate::server::serve_on`]); the connection is then served on that thread from its first
//! byte to its close, with that thread's upstream connections, so nothing moves between cores
//! per request. (One accept loop rather than a `SO_REUSEPORT` socket per worker: the kernel's
//! hash would leave a connection waiting in one worker's queue while another had room under
//! `max_connections`, and a socket that allows sharing is one another process can join.)
//! (On one multi-threaded runtime, work stealing moved connections' tasks between workers and
//! woke idle ones: a second worker cost 6–17 % more CPU per request, `bench/scaling.sh`.)
//!
//! The admin API, routes, transparent mode and background work (refreshes, the store's change
//! feed) stay on the main runtime.

use tokio::runtime::Handle;

/// Starts `count` worker threads and returns their runtimes' handles, to spawn work onto. The
/// threads run until the process exits.
pub fn start(count: usize) -> anyhow::Result<Vec<Handle>> {
    (0..count)
        .map(|i| {
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new().name(format!("tokenproxy-worker-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = started.send(Ok(runtime.handle().clone()));
                        runtime.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            })?;
            handle
                .recv()
                .map_err(|_| anyhow::anyhow!("worker thread {i} stopped while starting"))?
                .map_err(|e| anyhow::anyhow!("cannot start worker thread {i}: {e}"))
        })
        .collect()
}
