//! Shutdown: every listener and connection holds a [`DrainWatch`]; [`Drain::wait`] signals them
//! and returns when the last one is gone (or a limit passes). Apart from the accept loops
//! (`server.rs`) so that what runs connections (the relay, tunnels) needs only this.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, watch};

use crate::body::ProxyBody;

/// Signals shutdown to every listener and connection, and knows when they are all done.
pub struct Drain {
    signal: watch::Sender<bool>,
    alive: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
}

/// What a listener or connection holds: the shutdown signal, and a token whose drop says "done".
#[derive(Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl DrainWatch {
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|stop| *stop).await;
    }

    pub fn is_signaled(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Makes [`DrainWatch`]es for connections that start outside an accept loop (intercepted TLS,
/// tunnels) without itself keeping the drain from finishing.
#[derive(Clone)]
pub struct DrainHandle {
    signal: watch::Receiver<bool>,
    alive: mpsc::WeakSender<()>,
}

impl DrainHandle {
    /// A watch for a new connection, or `None` once shutdown has finished.
    pub fn watch(&self) -> Option<DrainWatch> {
        Some(DrainWatch { signal: self.signal.clone(), _alive: self.alive.upgrade()? })
    }
}

/// A connection that can be asked to finish its request in flight and close.
pub trait GracefulConnection: Future {
    fn start_graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> GracefulConnection for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs `conn` to its end; on shutdown, lets it finish the request in flight and close.
///
/// The caller pins `conn` where it lives. An async fn keeps its arguments for its whole life
/// beside whatever it moves them into, so a connection passed by value would be stored twice
/// in every connection's task, and twice again by each wrapper around this future.
pub async fn until_drained<C, E>(mut conn: Pin<&mut C>, drain: &mut DrainWatch)
where
    C: GracefulConnection<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = drain.signaled() => {
            conn.as_mut().start_graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

impl Drain {
    pub fn handle(&self) -> DrainHandle {
        DrainHandle { signal: self.signal.subscribe(), alive: self.alive.downgrade() }
    }

    pub fn new() -> Drain {
        let (signal, _) = watch::channel(false);
        let (alive, done) = mpsc::channel(1);
        Drain { signal, alive, done }
    }

    pub fn watch(&self) -> DrainWatch {
        DrainWatch { signal: self.signal.subscribe(), _alive: self.alive.clone() }
    }

    /// Signals shutdown and waits up to `limit` for every watcher to finish. Returns whether all
    /// did.
    pub async fn wait(self, limit: Duration) -> bool {
        let Drain { signal, alive, mut done } = self;
        let _ = signal.send(true);
        drop(alive);
        tokio::time::timeout(limit, done.recv()).await.is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}
