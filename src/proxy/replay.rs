//! Keeping a request body while it streams out, so that the one retry after a 401 can resend it.
//!
//! The body is never held back: frames go upstream as they arrive, and a copy is kept only while
//! the total stays within `max_replay_body` and the process-wide [`ReplayBudget`] has room for it.
//! Past either, the copy is dropped (its bytes go back to the budget) and the request is not
//! replayable.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::body::BoxError;

/// The bytes all kept copies may hold at once, across every request: without it, many
/// concurrent large uploads to a slow provider hold their copies at once.
#[derive(Clone)]
pub struct ReplayBudget {
    left: Arc<AtomicU64>,
}

impl ReplayBudget {
    pub fn new(bytes: u64) -> ReplayBudget {
        ReplayBudget { left: Arc::new(AtomicU64::new(bytes)) }
    }

    /// Takes `n` bytes if that many are left.
    fn take(&self, n: u64) -> bool {
        self.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(n)).is_ok()
    }

    fn give_back(&self, n: u64) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }

    /// Bytes not held by any copy now.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }
}

struct Copy {
    chunks: Vec<Bytes>,
    len: u64,
    /// Bytes of the budget this copy holds.
    held: u64,
    budget: ReplayBudget,
    overflowed: bool,
    ended: bool,
}

impl Copy {
    /// Drops the copy for good: the request is not replayable.
    fn overflow(&mut self) {
        self.overflowed = true;
        self.chunks = Vec::new();
        self.budget.give_back(std::mem::take(&mut self.held));
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// The body as sent upstream, keeping a copy.
pub struct TeeBody<B> {
    inner: B,
    copy: Arc<Mutex<Copy>>,
    limit: u64,
    /// The length the body declared, if it did: hyper stops polling once that much is sent.
    expected: Option<u64>,
}

/// The kept copy, read after the response arrived.
pub struct Replay {
    copy: Arc<Mutex<Copy>>,
    expected: Option<u64>,
}

pub fn tee<B: Body>(inner: B, limit: u64, budget: &ReplayBudget) -> (TeeBody<B>, Replay) {
    let copy = Arc::new(Mutex::new(Copy {
        chunks: Vec::new(),
        len: 0,
        held: 0,
        budget: budget.clone(),
        overflowed: false,
        ended: false,
    }));
    let expected = inner.size_hint().exact();
    let replay = Replay { copy: copy.clone(), expected };
    (TeeBody { inner, copy, limit, expected }, replay)
}

impl Replay {
    /// The whole body, if it was sent completely and was within the limit.
    pub fn take(&self) -> Option<Bytes> {
        let copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        let complete = copy.ended || self.expected == Some(copy.len);
        if copy.overflowed || !complete {
            return None;
        }
        let mut all = BytesMut::with_capacity(copy.len as usize);
        for chunk in &copy.chunks {
            all.extend_from_slice(chunk);
        }
        Some(all.freeze())
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let mut copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    copy.len += n;
                    if !copy.overflowed {
                        if copy.len > self.limit || !copy.budget.take(n) {
                            copy.overflow();
                        } else {
                            copy.held += n;
                            copy.chunks.push(data.clone());
                        }
                    }
                }
            }
            Poll::Ready(None) => copy.ended = true,
            _ => {}
        }
        if self.expected == Some(copy.len) {
            copy.ended = true;
        }
        drop(copy);
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body read whole before it is sent (a signature covers it): its bytes count against the
/// budget until this is dropped.
pub struct HeldBody {
    pub bytes: Bytes,
    held: u64,
    budget: ReplayBudget,
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// What [`hold`] made of a body.
pub enum Hold<B> {
    Whole(HeldBody),
    /// Its declared length is above the limit: not read at all.
    Declared(B, u64),
    /// No length was declared and it went past the limit: what was read is lost.
    Overflowed,
    /// The budget has no room for it now.
    NoBudget,
}

/// Reads `body` whole when it fits in `limit` and in the budget.
pub async fn hold<B>(mut body: B, limit: u64, budget: &ReplayBudget) -> Result<Hold<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    if let Some(declared) = body.size_hint().exact()
        && declared > limit
    {
        return Ok(Hold::Declared(body, declared));
    }
    let mut all = BytesMut::new();
    // Whatever happens below, the bytes taken from the budget go back when this is dropped.
    let mut held = HeldBody { bytes: Bytes::new(), held: 0, budget: budget.clone() };
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Into::into)?.into_data() else { continue };
        let n = data.len() as u64;
        if held.held + n > limit {
            return Ok(Hold::Overflowed);
        }
        if !budget.take(n) {
            return Ok(Hold::NoBudget);
        }
        held.held += n;
        all.extend_from_slice(&data);
    }
    held.bytes = all.freeze();
    Ok(Hold::Whole(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_small_body_is_kept_whole_and_a_large_one_is_not() {
        let budget = ReplayBudget::new(1000);
        let (body, replay) = tee(Full::new(Bytes::from_static(b"hello")), 10, &budget);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(replay.take().unwrap(), "hello");

        let chunks =
            (0..4).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abcd"))));
        let (body, replay) = tee(StreamBody::new(futures_util::stream::iter(chunks)), 10, &budget);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 16, "everything still streams");
        assert!(replay.take().is_none());
        assert_eq!(budget.left(), 1000 - 5, "an overflowed copy gives its bytes back at once");
    }

    #[tokio::test]
    async fn copies_share_one_budget_and_give_it_back_when_dropped() {
        let budget = ReplayBudget::new(8);
        let (first, first_replay) = tee(Full::new(Bytes::from_static(b"12345")), 100, &budget);
        let (second, second_replay) = tee(Full::new(Bytes::from_static(b"67890")), 100, &budget);
        assert_eq!(first.collect().await.unwrap().to_bytes(), "12345");
        assert_eq!(
            second.collect().await.unwrap().to_bytes(),
            "67890",
            "the body streams whatever the budget"
        );
        assert_eq!(first_replay.take().unwrap(), "12345");
        assert!(second_replay.take().is_none(), "no budget left for the second copy");
        assert_eq!(budget.left(), 3);
        drop(first_replay);
        assert_eq!(budget.left(), 8);
    }

    #[tokio::test]
    async fn a_held_body_takes_the_budget_until_dropped_and_an_overflow_gives_it_back() {
        let budget = ReplayBudget::new(100);
        let Hold::Whole(held) = hold(Full::new(Bytes::from_static(b"hello")), 10, &budget).await.unwrap()
        else {
            panic!("five bytes fit")
        };
        assert_eq!((&held.bytes[..], budget.left()), (&b"hello"[..], 95));
        drop(held);
        assert_eq!(budget.left(), 100);
        assert!(matches!(
            hold(Full::new(Bytes::from_static(b"0123456789ab")), 10, &budget).await.unwrap(),
            Hold::Declared(_, 12)
        ));
        let chunks =
            (0..4).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abcd"))));
        let unknown = StreamBody::new(futures_util::stream::iter(chunks));
        assert!(matches!(hold(unknown, 10, &budget).await.unwrap(), Hold::Overflowed));
        assert_eq!(budget.left(), 100);
        let small = ReplayBudget::new(3);
        assert!(matches!(
            hold(Full::new(Bytes::from_static(b"hello")), 10, &small).await.unwrap(),
            Hold::NoBudget
        ));
        assert_eq!(small.left(), 3);
    }

    #[tokio::test]
    async fn a_body_not_yet_sent_whole_is_not_replayable() {
        let chunks =
            (0..2).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ab"))));
        let (mut body, replay) =
            tee(StreamBody::new(futures_util::stream::iter(chunks)), 10, &ReplayBudget::new(100));
        let _first = body.frame().await;
        assert!(replay.take().is_none());
    }
}
