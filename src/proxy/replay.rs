//! Keeping a request body while it streams out, so that the one retry after a 401 can resend it.
//!
//! The body is never held back: frames go upstream as they arrive, and a copy is kept only while
//! the total stays within `max_replay_body`. Past that the copy is dropped and the request is not
//! replayable.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::BoxError;

#[derive(Default)]
struct Copy {
    chunks: Vec<Bytes>,
    len: u64,
    overflowed: bool,
    ended: bool,
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

pub fn tee<B: Body>(inner: B, limit: u64) -> (TeeBody<B>, Replay) {
    let copy = Arc::new(Mutex::new(Copy::default()));
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
                    copy.len += data.len() as u64;
                    if copy.len > self.limit {
                        copy.overflowed = true;
                        copy.chunks = Vec::new();
                    } else if !copy.overflowed {
                        copy.chunks.push(data.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn a_small_body_is_kept_whole_and_a_large_one_is_not() {
        let (body, replay) = tee(Full::new(Bytes::from_static(b"hello")), 10);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(replay.take().unwrap(), "hello");

        let chunks =
            (0..4).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abcd"))));
        let (body, replay) = tee(StreamBody::new(futures_util::stream::iter(chunks)), 10);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 16, "everything still streams");
        assert!(replay.take().is_none());
    }

    #[tokio::test]
    async fn a_body_not_yet_sent_whole_is_not_replayable() {
        let chunks =
            (0..2).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ab"))));
        let (mut body, replay) = tee(StreamBody::new(futures_util::stream::iter(chunks)), 10);
        let _first = body.frame().await;
        assert!(replay.take().is_none());
    }
}
