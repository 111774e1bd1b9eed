//! Accepting connections, and serving them until shutdown (see [`crate::drain`]).
//!
//! Every listener (forward proxy, routes, admin) is served by [`serve`]: HTTP/1.1 with keep-alive,
//! a bounded request head, and a deadline for a client to send it. On shutdown the accept loops
//! stop, each open connection finishes the request in flight and closes, and [`crate::drain::Drain::wait`]
//! returns when the last one is gone.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::ProxyBody;
use crate::callers::Peer;
use crate::drain::DrainWatch;
use crate::drain::until_drained;
use crate::proxy::h1::{PlainRelay, Served};
use crate::relay::Rewound;

/// Connection-level limits shared by every listener.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Connections served at once on one listener.
    pub max_connections: usize,
}

/// A client connection's place under `max_connections`. A CONNECT or upgrade request carries it
/// (in its extensions), so that a tunnel, an interception or a WebSocket that outlives its
/// request keeps the place until it closes.
#[derive(Clone)]
pub struct ConnectionPermit {
    _place: Arc<OwnedSemaphorePermit>,
}

/// Failed accepts (out of file descriptors, mostly) back off exponentially and are logged once
/// per interval with a count, instead of a line every few milliseconds.
struct AcceptTrouble {
    delay: Duration,
    failures: u64,
    last_log: Option<Instant>,
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

impl AcceptTrouble {
    fn new() -> Self {
        AcceptTrouble { delay: ACCEPT_BACKOFF_MIN, failures: 0, last_log: None }
    }

    /// Records a failure and returns how long to wait before the next accept.
    fn failed(&mut self, listener: &str, error: &std::io::Error) -> Duration {
        self.failures += 1;
        if self.last_log.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
            tracing::warn!(
                listener,
                error = %error,
                failures = self.failures,
                retry_in_ms = self.delay.as_millis() as u64,
                "accepting connections fails (out of file descriptors? raise `ulimit -n` or lower proxy.max_connections)"
            );
            self.last_log = Some(Instant::now());
            self.failures = 0;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
        delay
    }

    fn succeeded(&mut self) {
        self.delay = ACCEPT_BACKOFF_MIN;
    }
}

/// The accept loop every listener shares: at most `max_connections` at once (beyond that new
/// connections wait in the listen backlog, said once per 10 s), and failed accepts (out of file
/// descriptors, mostly) back off and are logged once per 10 s with a count.
pub struct Acceptor {
    name: &'static str,
    listener: TcpListener,
    places: Arc<Semaphore>,
    max_connections: usize,
    trouble: AcceptTrouble,
    full_since: Option<Instant>,
}

impl Acceptor {
    pub fn new(name: &'static str, listener: TcpListener, max_connections: usize) -> Acceptor {
        Acceptor {
            name,
            listener,
            places: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            trouble: AcceptTrouble::new(),
            full_since: None,
        }
    }

    /// The next connection with its place under the limit, or `None` once shutdown is signaled.
    pub async fn next(
        &mut self,
        drain: &mut DrainWatch,
    ) -> Option<(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        loop {
            // A place first: at max_connections, new connections wait in the listen backlog.
            let place = match self.places.clone().try_acquire_owned() {
                Ok(place) => place,
                Err(_) => {
                    if self.full_since.is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(
                            listener = self.name,
                            max_connections = self.max_connections,
                            "connection limit reached; new connections wait until one closes"
                        );
                        self.full_since = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = drain.signaled() => return None,
                        place = self.places.clone().acquire_owned() => place.expect("the semaphore is never closed"),
                    }
                }
            };
            tokio::select! {
                _ = drain.signaled() => return None,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        self.trouble.succeeded();
                        let _ = stream.set_nodelay(true);
                        return Some((stream, peer, place));
                    }
                    Err(e) => {
                        let delay = self.trouble.failed(self.name, &e);
                        tokio::select! {
                            _ = drain.signaled() => return None,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        }
    }
}

/// Binds `addr`, naming the config key in the error so that a port in use is a one-line reason.
pub async fn bind(key: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}"))
}

/// Serves HTTP/1.1 on `listener` until shutdown, calling `handler` for every request with the
/// client's connection (the admin API decides by its address who may do what; the proxy finds
/// callers by it). With a `relay` (the proxy's listeners), each connection is served by it
/// first, and by hyper and `handler` from the first request the relay hands over.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    limits: ConnectionLimits,
    drain: DrainWatch,
    relay: Option<Arc<PlainRelay>>,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    serve_on(name, listener, limits, drain, vec![Worker { runtime: None, relay, handler }]).await
}

/// Where accepted connections are served: a worker thread's runtime (`None`: the accept loop's
/// own), with that worker's relay and handler (and so its upstream pools).
pub struct Worker<H> {
    pub runtime: Option<tokio::runtime::Handle>,
    pub relay: Option<Arc<PlainRelay>>,
    pub handler: H,
}

/// [`serve`], handing each accepted connection to the next of `workers` in turn, where it is
/// served from its first byte to its close ([`crate::shards`]). One accept loop, so
/// `max_connections` counts every connection once, and no connection waits in a queue of its
/// own while another worker has room.
pub async fn serve_on<H, F>(
    name: &'static str,
    listener: TcpListener,
    limits: ConnectionLimits,
    mut drain: DrainWatch,
    workers: Vec<Worker<H>>,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    assert!(!workers.is_empty(), "a listener is served by one worker at least");
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let mut acceptor = Acceptor::new(name, listener, limits.max_connections);
    let mut turn = 0usize;
    loop {
        let Some((stream, peer, place)) = acceptor.next(&mut drain).await else { break };
        // The address the client dialled: with its own, it finds the client's socket (uids).
        let local = stream.local_addr().unwrap_or(peer);
        let worker = &workers[turn % workers.len()];
        turn = turn.wrapping_add(1);
        let connection = Connection {
            peer: Arc::new(Peer::new(peer, local, name)),
            builder: builder.clone(),
            drain: drain.clone(),
            permit: ConnectionPermit { _place: Arc::new(place) },
            relay: worker.relay.clone(),
        };
        let handler = worker.handler.clone();
        let Some(runtime) = &worker.runtime else {
            tokio::spawn(connection.serve(stream, handler));
            continue;
        };
        // Registered again, with the worker's own event loop.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot hand a connection to a worker thread");
                continue;
            }
        };
        runtime.spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => connection.serve(stream, handler).await,
                Err(e) => tracing::warn!(error = %e, "a worker thread cannot take a connection"),
            }
        });
    }
}

/// One accepted connection, with what serving it needs.
struct Connection {
    peer: Arc<Peer>,
    builder: Arc<http1::Builder>,
    drain: DrainWatch,
    permit: ConnectionPermit,
    relay: Option<Arc<PlainRelay>>,
}

impl Connection {
    async fn serve<H, F>(self, stream: tokio::net::TcpStream, handler: H)
    where
        H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let Connection { peer, builder, mut drain, permit, relay } = self;
        let (stream, read) = match relay {
            Some(relay) => match relay.serve(stream, &peer, &mut drain).await {
                Served::Closed => return,
                Served::HandOff { stream, read } => (stream, read),
            },
            None => (stream, Vec::new()),
        };
        let service = service_fn(move |mut req: Request<Incoming>| {
            // Only a CONNECT or an upgrade outlives its request; inserting the permit into
            // every request would cost an allocation each.
            if req.method() == http::Method::CONNECT || req.headers().contains_key(http::header::UPGRADE) {
                req.extensions_mut().insert(permit.clone());
            }
            let handler = handler.clone();
            let peer = peer.clone();
            // Boxed per request: hyper otherwise keeps room for this future in every
            // connection, idle or not, and an allocation per request is cheaper than that
            // much memory per idle connection.
            let response: Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(async move { Ok::<_, Infallible>(handler(req, peer).await) });
            response
        });
        // With upgrades: CONNECT hands the connection over to a tunnel or an interception.
        // Boxed: the relay's connections that never need hyper do not carry room for it.
        let io = TokioIo::new(Rewound::new(read, stream));
        let mut conn = Box::pin(builder.serve_connection(io, service).with_upgrades());
        until_drained(conn.as_mut(), &mut drain).await;
    }
}
