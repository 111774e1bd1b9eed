//! Connections that carry bytes rather than requests, and knowing when any connection is idle.
//!
//! A blind tunnel and an upgraded connection (a WebSocket after `101`) are both two byte
//! streams joined by [`join`]. An HTTP/2 connection has no request-head deadline, so its idleness
//! is measured the same way. [`Activity`] records when bytes last moved and how many requests
//! are in flight; [`Activity::idle`] ends when a connection has been quiet too long, which is
//! what bounds silent clients, forgotten keep-alive connections and half-closed tunnels.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::drain::DrainWatch;

/// After one direction of a joined connection has ended, the other may stay quiet this long at
/// most: a peer that half-closed rarely waits long for the answer, and a peer that vanished must
/// not pin two sockets until the idle timeout.
const HALF_CLOSED_LINGER: Duration = Duration::from_secs(30);

/// When bytes last moved on a connection, and whether anything is in flight on it.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    half_closed: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            half_closed: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks a request in flight until the returned guard is dropped (put it in the response
    /// body, so that a slow stream is not idle).
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Completes once the connection has moved no bytes and had no request in flight for
    /// `limit` (`before_first` until the first request arrives; shorter after a half-close).
    pub async fn idle(&self, limit: Duration, before_first: Duration) {
        loop {
            let limit = if self.requests.load(Ordering::Relaxed) == 0 {
                before_first
            } else if self.half_closed.load(Ordering::Relaxed) {
                limit.min(HALF_CLOSED_LINGER)
            } else {
                limit
            };
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(limit).await;
                continue;
            }
            let quiet = self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A request in flight; see [`Activity::request`].
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it is finished or dropped.
pub struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> InFlightBody<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        InFlightBody { inner, _in_flight: in_flight }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for InFlightBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A byte stream that reports to an [`Activity`] whenever bytes move.
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        Tracked { inner, activity }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A byte stream with the bytes already read from it put back in front: what a connection
/// speaks is decided from its first byte without losing it, and a connection the hand-written
/// relay hands to hyper is served from the bytes the relay had read.
pub struct Rewound<T> {
    /// The bytes read ahead, and how many of them have been read again.
    read: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Rewound<T> {
    pub fn new(read: Vec<u8>, inner: T) -> Rewound<T> {
        Rewound { read, at: 0, inner }
    }
}

/// Reads the first byte of `io` and returns it with the stream rewound, or `None` when the peer
/// closed before sending anything.
pub async fn first_byte<T: AsyncRead + Unpin>(mut io: T) -> io::Result<Option<(u8, Rewound<T>)>> {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    if io.read(&mut byte).await? == 0 {
        return Ok(None);
    }
    Ok(Some((byte[0], Rewound::new(vec![byte[0]], io))))
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = (this.read.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                // Read again whole: the memory goes.
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, the connection
/// has been idle for `idle_timeout`, or shutdown. When one side half-closes, the other is told
/// at once (its write side is shut down), and the remaining direction may linger only briefly.
pub async fn join<A, B>(a: A, b: B, idle_timeout: Duration, mut drain: DrainWatch) -> JoinEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    // A joined connection has no requests: it counts as past its first one.
    activity.requests.store(1, Ordering::Relaxed);
    let (mut a_read, mut a_write) = tokio::io::split(Tracked::new(a, activity.clone()));
    let (mut b_read, mut b_write) = tokio::io::split(Tracked::new(b, activity.clone()));
    let a_to_b = copy_then_shutdown(&mut a_read, &mut b_write, &activity);
    let b_to_a = copy_then_shutdown(&mut b_read, &mut a_write, &activity);
    let both = async { tokio::join!(a_to_b, b_to_a) };
    tokio::select! {
        _ = both => JoinEnd::Closed,
        _ = activity.idle(idle_timeout, idle_timeout) => JoinEnd::Idle,
        _ = drain.signaled() => JoinEnd::Shutdown,
    }
}

async fn copy_then_shutdown<R, W>(from: &mut R, to: &mut W, activity: &Activity)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy(from, to).await;
    if let Err(e) = copied {
        tracing::debug!(error = %e, "relay direction ended with an error");
    }
    let _ = to.shutdown().await;
    activity.half_closed.store(true, Ordering::Relaxed);
}

/// Why a joined connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinEnd {
    Closed,
    Idle,
    Shutdown,
}
