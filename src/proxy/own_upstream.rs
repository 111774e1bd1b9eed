//! Plain-HTTP/1.1 upstream connections, driven in the task of the client connection that uses
//! them.
//!
//! The shared client (hyper-util's pool) checks a connection out and back in for every request,
//! hashing the pool key with SipHash each time, and hands every request to the upstream
//! connection's own task through a channel, waking that task and then being woken by it. For a
//! plain-HTTP request that was most of tokenproxy's own CPU. Here a client connection holds the
//! upstream connection it uses and polls it in its own task ([`ConnectionUpstream::drive`]):
//!
//! - A client connection's first request borrows an idle connection from the pool (or dials one)
//!   and gives it back once its response has been read to the end, so that clients that open a
//!   connection per request share upstream connections as before.
//! - From its second request to a host on, a client connection keeps its upstream connection until
//!   either side closes: no pool round trip per request. At most `proxy.max_idle_per_host` client
//!   connections keep one per host at a time; the others go on borrowing.
//! - The pool keeps at most `proxy.max_idle_per_host` idle connections per host, each for at
//!   most 90 seconds, and drops those the upstream closed.
//!
//! HTTPS upstreams, HTTP/2 and upgrades stay on the shared client, where a handshake or a
//! multiplexed connection makes sharing across client connections worth its cost.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Target;
use crate::body::ProxyBody;
use crate::egress::{DialError, Egress};

/// How long an idle connection stays in the pool.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Io = TokioIo<TcpStream>;

/// One upstream connection: the half requests are sent on, and the half that does the I/O, which
/// does nothing unless someone polls it.
struct Conn {
    authority: Authority,
    /// The `Host` header for every request on it, made once.
    host: http::HeaderValue,
    sender: http1::SendRequest<ProxyBody>,
    io: Pin<Box<http1::Connection<Io, ProxyBody>>>,
}

impl Conn {
    /// Lets the connection do its I/O; false once it has ended (closed by either side, or
    /// failed).
    fn poll_alive(&mut self, cx: &mut Context<'_>) -> bool {
        self.io.as_mut().poll(cx).is_pending()
    }

    /// Open, with no exchange in flight: the last response has been read to its end.
    fn is_idle(&self) -> bool {
        self.sender.is_ready()
    }
}

/// Why a request could not be relayed.
#[derive(Debug)]
pub enum UpstreamError {
    Dial(DialError),
    Http(hyper::Error),
}

/// The idle plain-HTTP/1.1 connections, per upstream host, shared by every client connection.
pub struct PlainPool {
    hosts: Mutex<HashMap<Authority, Host, foldhash::fast::RandomState>>,
    max_per_host: usize,
    egress: Arc<Egress>,
    connect_timeout: Duration,
    builder: http1::Builder,
}

#[derive(Default)]
struct Host {
    /// Newest last, with the time each went idle.
    idle: Vec<(Conn, Instant)>,
    /// Client connections that keep a connection to this host between requests.
    kept: usize,
}

impl PlainPool {
    pub fn new(egress: Arc<Egress>, connect_timeout: Duration, max_per_host: usize) -> PlainPool {
        PlainPool {
            hosts: Mutex::default(),
            max_per_host,
            egress,
            connect_timeout,
            builder: http1::Builder::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Authority, Host, foldhash::fast::RandomState>> {
        // A panic elsewhere cannot leave the map half-changed: every change is one call.
        self.hosts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection to `authority` that is still open, newest first.
    fn take(&self, authority: &Authority) -> Option<Conn> {
        let mut hosts = self.lock();
        let host = hosts.get_mut(authority)?;
        while let Some((mut conn, since)) = host.idle.pop() {
            // Polling it once reads a close the upstream sent while it sat here.
            if since.elapsed() < IDLE_TIMEOUT && conn.poll_alive(&mut Context::from_waker(Waker::noop())) {
                return Some(conn);
            }
        }
        None
    }

    /// Takes a connection back if it is idle and there is room; otherwise it closes.
    fn put(&self, conn: Conn) {
        if !conn.is_idle() {
            return;
        }
        let mut hosts = self.lock();
        let host = hosts.entry(conn.authority.clone()).or_default();
        host.idle.retain(|(_, since)| since.elapsed() < IDLE_TIMEOUT);
        if host.idle.len() < self.max_per_host {
            host.idle.push((conn, Instant::now()));
        }
    }

    /// A place for one more client connection to keep a connection to `authority`, if any is
    /// left.
    fn try_keep(&self, authority: &Authority) -> bool {
        let mut hosts = self.lock();
        let host = hosts.entry(authority.clone()).or_default();
        let room = host.kept < self.max_per_host;
        host.kept += usize::from(room);
        room
    }

    fn release_keep(&self, authority: &Authority) {
        if let Some(host) = self.lock().get_mut(authority) {
            host.kept = host.kept.saturating_sub(1);
        }
    }

    async fn dial(&self, target: &Target) -> Result<Conn, UpstreamError> {
        let tcp = self
            .egress
            .connect(target.host(), target.port, self.connect_timeout)
            .await
            .map_err(UpstreamError::Dial)?;
        let (sender, io) = self.builder.handshake(TokioIo::new(tcp)).await.map_err(UpstreamError::Http)?;
        // A normal-form authority is always a valid header value.
        let host = http::HeaderValue::from_str(target.host_header()).expect("an authority is a header value");
        Ok(Conn { authority: target.authority.clone(), host, sender, io: Box::pin(io) })
    }

    /// Closes connections idle too long or closed by the upstream, and forgets hosts with none
    /// left. Called periodically: an idle connection is otherwise only looked at when taken.
    pub fn sweep(&self) {
        let mut noop = Context::from_waker(Waker::noop());
        self.lock().retain(|_, host| {
            host.idle
                .retain_mut(|(conn, since)| since.elapsed() < IDLE_TIMEOUT && conn.poll_alive(&mut noop));
            !host.idle.is_empty() || host.kept > 0
        });
    }
}

/// Passes over a connection's futures within one poll of its task before it yields.
const MAX_PASSES: usize = 4;
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// The waker [`ConnectionUpstream::drive`] gives to what it polls. Half of what wakes a
/// connection's task comes from inside it: the handler handing a request to the upstream
/// connection, the upstream connection handing back the answer and its body. Such a wake, while
/// the task is polling, only asks for one more pass of that same poll instead of scheduling the
/// task again; any other wake goes to the task.
#[derive(Default)]
struct PassWaker {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for PassWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(IDLE) = self.state.compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire) {
            self.task.wake();
        }
    }
}

/// A client connection's plain-HTTP/1.1 upstream connection. Clones share it: the request
/// handler sends on it, [`ConnectionUpstream::drive`] polls it.
#[derive(Clone)]
pub struct ConnectionUpstream {
    slot: Arc<Mutex<Slot>>,
}

struct Slot {
    pool: Arc<PlainPool>,
    conn: Option<Conn>,
    /// `conn` holds a keeping place of its host ([`PlainPool::try_keep`]); otherwise it is
    /// borrowed, and goes back to the pool as soon as it is idle.
    kept: bool,
    /// Requests this client connection has sent upstream.
    requests: u64,
}

impl Slot {
    /// Empties the slot: the connection goes back to the pool (if idle) and its place is freed.
    fn give_back(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.kept {
                self.pool.release_keep(&conn.authority);
            }
            self.pool.put(conn);
        }
        self.kept = false;
    }

    fn poll_upstream(&mut self, cx: &mut Context<'_>) {
        let Some(conn) = self.conn.as_mut() else { return };
        if !conn.poll_alive(cx) {
            self.give_back(); // closed: nothing goes back, the place is freed
        } else if !self.kept && conn.is_idle() {
            self.give_back();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl ConnectionUpstream {
    pub fn new(pool: Arc<PlainPool>) -> ConnectionUpstream {
        let slot = Slot { pool, conn: None, kept: false, requests: 0 };
        ConnectionUpstream { slot: Arc::new(Mutex::new(slot)) }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `client` (the client connection being served) to its end, polling the upstream
    /// connection in the same task. When it ends, the upstream connection goes back to the pool.
    pub async fn drive<F: Future>(&self, client: F) -> F::Output {
        let mut client = std::pin::pin!(client);
        let wakes = Arc::new(PassWaker::default());
        let waker = Waker::from(wakes.clone());
        std::future::poll_fn(|cx| {
            wakes.task.register(cx.waker());
            let mut inner = Context::from_waker(&waker);
            for _ in 0..MAX_PASSES {
                wakes.state.store(POLLING, Ordering::Release);
                self.lock().poll_upstream(&mut inner);
                if let Poll::Ready(out) = client.as_mut().poll(&mut inner) {
                    wakes.state.store(IDLE, Ordering::Release);
                    return Poll::Ready(out);
                }
                // A request the handler just sent, or a connection it just put in the slot, is
                // written now rather than in another turn of the task.
                self.lock().poll_upstream(&mut inner);
                if wakes.state.compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return Poll::Pending; // nothing woke meanwhile: wait for the sockets
                }
            }
            // Still busy: let other tasks run first.
            wakes.state.store(IDLE, Ordering::Release);
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// Sends `request` (absolute URI, no `Host`) to `target` over this client connection's
    /// upstream connection, making or borrowing one when it has none for that host.
    pub async fn send(
        &self,
        target: &Target,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        to_origin_form(&mut request);
        let (mut conn, reused) = self.connection_to(target).await?;
        request.headers_mut().insert(http::header::HOST, conn.host.clone());
        let sent = conn.sender.try_send_request(request);
        self.hold(conn);
        match sent.await {
            Ok(response) => Ok(response),
            Err(mut failed) => match failed.take_message() {
                // The upstream closed the connection before the request went out (an idle
                // connection racing its own timeout): once more on a new connection.
                Some(request) if reused => {
                    let pool = self.lock().pool.clone();
                    let mut conn = pool.dial(target).await?;
                    let sent = conn.sender.send_request(request);
                    self.hold(conn);
                    sent.await.map_err(UpstreamError::Http)
                }
                _ => Err(UpstreamError::Http(failed.into_error())),
            },
        }
    }

    /// The connection for this request, out of the slot while the handler uses it; and whether it
    /// has served a request before.
    async fn connection_to(&self, target: &Target) -> Result<(Conn, bool), UpstreamError> {
        let (pool, keep) = {
            let mut slot = self.lock();
            slot.requests += 1;
            if let Some(conn) = slot.conn.take_if(|c| c.authority == target.authority && c.is_idle()) {
                return Ok((conn, true));
            }
            slot.give_back(); // another host's, or busy: not this request's
            // A second request shows a keep-alive client: it keeps its connection from now on.
            let keep = slot.requests >= 2 && slot.pool.try_keep(&target.authority);
            slot.kept = keep;
            (slot.pool.clone(), keep)
        };
        let taken = pool.take(&target.authority);
        let reused = taken.is_some();
        let conn = match taken {
            Some(conn) => conn,
            None => match pool.dial(target).await {
                Ok(conn) => conn,
                Err(e) => {
                    if keep {
                        self.lock().kept = false;
                        pool.release_keep(&target.authority);
                    }
                    return Err(e);
                }
            },
        };
        Ok((conn, reused))
    }

    /// Puts the connection in use in the slot, where [`ConnectionUpstream::drive`] polls it.
    fn hold(&self, conn: Conn) {
        let mut slot = self.lock();
        if let Some(previous) = slot.conn.replace(conn) {
            slot.pool.put(previous);
        }
    }
}

/// What hyper-util's client did for us: an origin-form target (`/path?query`). (The `Host`
/// header comes from the connection.)
fn to_origin_form(request: &mut Request<ProxyBody>) {
    let path = match request.uri().path_and_query() {
        Some(pq) if pq.as_str() != "/" => pq.clone(),
        _ => PathAndQuery::from_static("/"),
    };
    *request.uri_mut() = Uri::from(path);
}
