//! The proxy listener's worker threads, as nginx has worker processes: with `[proxy] workers`
//! above one, each worker is a thread with an event loop of its own (a current-thread runtime)
//! and a listening socket of its own on the proxy's address (`SO_REUSEPORT`). The kernel spreads
//! new connections over the sockets; a connection is then served on one thread from accept to
//! close, with that thread's upstream connections, so nothing moves between cores per request.
//! (On one multi-threaded runtime, work stealing moved connections' tasks between workers and
//! woke idle ones: a second worker cost 6–17 % more CPU per request, `bench/scaling.sh`.)
//!
//! The admin API, routes, transparent mode and background work (refreshes, the store's change
//! feed) stay on the main runtime.

use std::net::SocketAddr;

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

/// `addr` bound `count` times, sockets that share the address (`SO_REUSEPORT`). The first is
/// bound before it allows sharing, so that an address another process listens on (another
/// tokenproxy included) still stops the start instead of being shared with it; it also decides
/// the port when `addr` asks for any (port 0). Called inside the main runtime; each listener is
/// handed to its worker as a std socket (see [`tokio::net::TcpListener::from_std`]).
pub fn bind(key: &str, addr: SocketAddr, count: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let failed =
        |addr: SocketAddr, e: std::io::Error| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}");
    let socket =
        || if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let first = socket().map_err(|e| failed(addr, e))?;
    first.set_reuseaddr(true).map_err(|e| failed(addr, e))?;
    first.bind(addr).map_err(|e| failed(addr, e))?;
    // Before listen(): the listening socket founds the group the others join.
    first.set_reuseport(true).map_err(|e| failed(addr, e))?;
    let first = first.listen(LISTEN_BACKLOG).map_err(|e| failed(addr, e))?;
    let bound = first.local_addr().map_err(|e| failed(addr, e))?;
    let mut listeners = vec![first.into_std().map_err(|e| failed(addr, e))?];
    for _ in 1..count {
        let next = socket().map_err(|e| failed(bound, e))?;
        next.set_reuseaddr(true).map_err(|e| failed(bound, e))?;
        next.set_reuseport(true).map_err(|e| failed(bound, e))?;
        next.bind(bound).map_err(|e| failed(bound, e))?;
        let next = next.listen(LISTEN_BACKLOG).map_err(|e| failed(bound, e))?;
        listeners.push(next.into_std().map_err(|e| failed(bound, e))?);
    }
    Ok(listeners)
}

/// As tokio's `TcpListener::bind`.
const LISTEN_BACKLOG: u32 = 1024;
