//! The relay's side of an answer: its head read and rewritten for the client, and where its body
//! ends, decided by hyper's client's rules (the differential test in [`super::differential`]
//! holds the two together). The body is never decoded: the relay copies it with its framing.

use http::StatusCode;

use super::MAX_HEADERS;
use super::request::{push_line, tokens};
use crate::proxy::headers::Kind;

/// How a response body ends.
#[derive(Debug, Clone, Copy)]
pub(super) enum Body {
    Empty,
    Length(u64),
    Chunked(Chunks),
    /// Until the upstream closes (no length, not chunked): the client connection closes too.
    UntilClose,
}

impl Body {
    /// How many of `bytes`, the next ones read, belong to the body, and whether it ends with
    /// them; what is left to read is kept. `Err`: the chunked framing is broken.
    pub(super) fn take(&mut self, bytes: &[u8]) -> Result<(usize, bool), BrokenChunks> {
        Ok(match self {
            Body::Empty => (0, true),
            Body::Length(rest) => {
                let take = (*rest).min(bytes.len() as u64) as usize;
                *rest -= take as u64;
                (take, *rest == 0)
            }
            Body::Chunked(chunks) => match chunks.scan(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            },
            Body::UntilClose => (bytes.len(), false),
        })
    }
}

/// An answer's head, read.
#[derive(Clone, Copy)]
pub(super) struct Head {
    pub(super) status: StatusCode,
    /// Bytes of the head in `rbuf`.
    pub(super) len: usize,
    pub(super) body: Body,
    pub(super) interim: bool,
    /// The upstream connection closes after this answer.
    pub(super) close: bool,
}

/// Reads the answer head at the start of `rbuf` and writes the client's version of it into
/// `wbuf`: hop-by-hop headers out, `Connection: close` in when the client connection will close.
pub(super) fn parse_answer(
    rbuf: &[u8],
    head_method: bool,
    client_close: bool,
    wbuf: &mut Vec<u8>,
) -> Result<Head, &'static str> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        rbuf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err("the upstream's answer is not HTTP/1.x"),
    };
    let code = parsed.code.ok_or("the upstream's answer has no status")?;
    let status = StatusCode::from_u16(code).map_err(|_| "the upstream's answer has an invalid status")?;
    let interim = status.is_informational();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the upstream switched protocols unasked");
    }
    let mut connection: &[u8] = b"";
    let mut coded = false;
    let mut names = [Kind::Other; MAX_HEADERS];
    for (h, kind) in parsed.headers.iter().zip(&mut names) {
        *kind = Kind::of(h.name.as_bytes());
        match *kind {
            Kind::Connection => connection = h.value,
            Kind::TransferEncoding => coded = true,
            _ => {}
        }
    }
    let body = answer_body(status, parsed.version, parsed.headers, &names, head_method)?;
    let keep_alive =
        parsed.version == Some(1) || tokens(connection).any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
    let close = matches!(body, Body::UntilClose)
        || !keep_alive
        || tokens(connection).any(|t| t.eq_ignore_ascii_case(b"close"));

    wbuf.extend_from_slice(b"HTTP/1.1 ");
    wbuf.extend_from_slice(status.as_str().as_bytes());
    wbuf.push(b' ');
    wbuf.extend_from_slice(parsed.reason.unwrap_or_default().as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    for (h, kind) in parsed.headers.iter().zip(names) {
        let name = h.name.as_bytes();
        let dropped = match kind {
            Kind::Other | Kind::Host | Kind::Expect => {
                tokens(connection).any(|t| t.eq_ignore_ascii_case(name))
            }
            // A length beside a transfer coding is wrong, and the coding wins (RFC 9112 §6.3).
            Kind::ContentLength => coded,
            Kind::TransferEncoding => false,
            Kind::Te => !h.value.trim_ascii().eq_ignore_ascii_case(b"trailers"),
            _ => true,
        };
        if !dropped {
            push_line(wbuf, rbuf, h);
        }
    }
    if !interim && (client_close || matches!(body, Body::UntilClose)) {
        wbuf.extend_from_slice(b"connection: close\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    Ok(Head { status, len, body, interim, close })
}

/// How the body of an answer ends, decided as hyper's client decides it (`proto/h1/role.rs`), so
/// that the relay and the client agree: 1xx, 204, 304 and HEAD have none; a Transfer-Encoding
/// wins over Content-Length (not even read then) and is refused on HTTP/1.0, and frames by
/// chunks only when `chunked` is the last coding of the last such header (else until close);
/// a Content-Length is digits only (no sign, no space inside), the same value however often it is
/// given or listed.
fn answer_body(
    status: StatusCode,
    version: Option<u8>,
    headers: &[httparse::Header<'_>],
    names: &[Kind],
    head_method: bool,
) -> Result<Body, &'static str> {
    if status.is_informational()
        || head_method
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Body::Empty);
    }
    let mut coding = None;
    let mut has_length = false;
    for (h, name) in headers.iter().zip(names) {
        match name {
            Kind::TransferEncoding => coding = Some(h.value),
            Kind::ContentLength => has_length = true,
            _ => {}
        }
    }
    if let Some(last) = coding {
        if version == Some(0) {
            return Err("the upstream's HTTP/1.0 answer has a Transfer-Encoding");
        }
        let chunked = std::str::from_utf8(last).is_ok_and(|v| {
            v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
                && v.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
        });
        return Ok(if chunked { Body::Chunked(Chunks::default()) } else { Body::UntilClose });
    }
    if !has_length {
        return Ok(Body::UntilClose);
    }
    let lengths = headers.iter().zip(names).filter(|(_, n)| **n == Kind::ContentLength).map(|(h, _)| h.value);
    match content_length(lengths) {
        Some(0) => Ok(Body::Empty),
        Some(n) => Ok(Body::Length(n)),
        None => Err("the upstream's answer has an invalid Content-Length"),
    }
}

/// The one length that every Content-Length value states, as hyper reads them: each value
/// visible ASCII, a comma-separated list of digits-only numbers, all equal.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let mut length = None;
    for value in values {
        if !value.iter().all(|b| *b == b'\t' || (b' '..=b'~').contains(b)) {
            return None;
        }
        for item in value.split(|b| *b == b',') {
            let digits = item.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n =
                digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// What the relay makes of an answer's bytes, for the differential test against hyper
/// (`differential::answers`): the same head and body rules the relay loop follows.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayVerdict {
    /// The answer ends after this many bytes; and the connection closes after it.
    Ends(usize, bool),
    Refused,
    /// Its body, from this byte, runs until the connection closes.
    UntilClose(usize),
    /// Not all there.
    Incomplete,
}

/// Whether the relay refuses `answer` for a bare LF inside a chunked body's trailer line, one of
/// the two places where it is deliberately stricter than hyper (which hands the trailers to
/// httparse, and httparse takes a bare LF for a line end, and ignores what follows an empty
/// line). Refusing there is the safe side: the client's connection is cut, never read past.
#[cfg(test)]
pub(crate) fn refused_for_bare_lf_in_trailers(answer: &[u8], head_method: bool) -> bool {
    let mut at = 0;
    loop {
        let rest = &answer[at..];
        let Ok(head) = parse_answer(rest, head_method, false, &mut Vec::new()) else { return false };
        at += head.len;
        if head.interim {
            continue;
        }
        let Body::Chunked(mut chunks) = head.body else { return false };
        for &b in &answer[at..] {
            let before = chunks.state;
            if chunks.scan(&[b]).is_err() {
                return b == b'\n' && matches!(before, ChunkState::TrailerValue | ChunkState::EndCr);
            }
        }
        return false;
    }
}

#[cfg(test)]
pub(crate) fn relay_verdict(answer: &[u8], head_method: bool) -> RelayVerdict {
    let mut at = 0;
    loop {
        let rest = &answer[at..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        if let Ok(httparse::Status::Partial) = httparse::Response::new(&mut headers).parse(rest) {
            return RelayVerdict::Incomplete;
        }
        let head = match parse_answer(rest, head_method, false, &mut Vec::new()) {
            Ok(head) => head,
            Err(_) => return RelayVerdict::Refused,
        };
        let start = at + head.len;
        if head.interim {
            at = start;
            continue;
        }
        let mut body = head.body;
        if let Body::UntilClose = body {
            return RelayVerdict::UntilClose(start);
        }
        return match body.take(&answer[start..]) {
            Err(BrokenChunks) => RelayVerdict::Refused,
            Ok((n, true)) => RelayVerdict::Ends(start + n, head.close),
            Ok((_, false)) => RelayVerdict::Incomplete,
        };
    }
}

/// Whether `rbuf` holds the whole answer whose head it starts with, and nothing after it.
pub(super) fn whole_in(rbuf: &[u8], head: Head) -> bool {
    let (bytes, mut body) = (&rbuf[head.len..], head.body);
    matches!(body.take(bytes), Ok((take, true)) if take == bytes.len())
}

/// Where a chunked body's framing is: scanned (never decoded) to find where the body ends, by
/// the rules of hyper's decoder (`proto/h1/decode.rs`), so that the relay and a client built on
/// hyper agree on every answer's end: CR LF after the size, after each chunk and after each
/// trailer line (a bare LF is refused), no digits after white space, at most 16 KiB of chunk
/// extensions per body, and trailers of at most 100 lines and 16 KiB that are header lines.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Chunks {
    state: ChunkState,
    /// Extension bytes so far, in the whole body.
    extension_bytes: u32,
    /// Trailer bytes and lines so far.
    trailer_bytes: u32,
    trailer_lines: u16,
}

/// hyper's limits on what a chunked body may carry besides data.
const MAX_EXTENSION_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_LINES: u16 = 100;

#[derive(Debug, Clone, Copy, Default)]
pub(super) enum ChunkState {
    /// A chunk-size line's first hex digit.
    #[default]
    Start,
    /// More hex digits, or what may follow them.
    Size(u64),
    /// White space after the size: no more digits.
    SizeLws(u64),
    /// After `;`, up to the CR.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk, at the start of a line: CR ends the body, anything else starts a
    /// trailer line.
    EndCr,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body whose framing is broken, or whose extensions or trailers are over their cap:
/// where it ends cannot be known, so the client's connection is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BrokenChunks;

/// A `tchar` (RFC 9110 §5.6.2), what a header name is made of.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Chunks {
    /// Scans `bytes`: `Some(n)` when the body ends after the first `n` of them.
    pub(super) fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, BrokenChunks> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            // Trailer bytes count from a trailer line's first byte to the body's last (hyper
            // buffers them to parse the trailers).
            let in_trailers = match self.state {
                EndCr => b != b'\r' || self.trailer_bytes > 0,
                EndLf => self.trailer_bytes > 0,
                TrailerName | TrailerValue | TrailerLf => true,
                _ => false,
            };
            if in_trailers {
                self.trailer_bytes += 1;
                if self.trailer_bytes >= MAX_TRAILER_BYTES {
                    return Err(BrokenChunks);
                }
            }
            self.state = match self.state {
                Start => Size(hex(b).ok_or(BrokenChunks)?),
                Size(n) => match hex(b) {
                    Some(d) => Size(n.checked_mul(16).and_then(|n| n.checked_add(d)).ok_or(BrokenChunks)?),
                    None => match b {
                        b' ' | b'\t' => SizeLws(n),
                        b';' => Extension(n),
                        b'\r' => SizeLf(n),
                        _ => return Err(BrokenChunks),
                    },
                },
                SizeLws(n) => match b {
                    b' ' | b'\t' => SizeLws(n),
                    b';' => Extension(n),
                    b'\r' => SizeLf(n),
                    _ => return Err(BrokenChunks),
                },
                Extension(n) => match b {
                    b'\r' => SizeLf(n),
                    b'\n' => return Err(BrokenChunks),
                    _ => {
                        self.extension_bytes += 1;
                        if self.extension_bytes >= MAX_EXTENSION_BYTES {
                            return Err(BrokenChunks);
                        }
                        Extension(n)
                    }
                },
                SizeLf(0) if b == b'\n' => EndCr,
                SizeLf(n) if b == b'\n' => Data(n),
                SizeLf(_) => return Err(BrokenChunks),
                Data(rest) => {
                    let take = rest.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if rest == take { DataCr } else { Data(rest - take) };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Start,
                DataCr | DataLf => return Err(BrokenChunks),
                EndCr if b == b'\r' => EndLf,
                EndCr if is_token(b) => TrailerName,
                EndCr => return Err(BrokenChunks),
                TrailerName if is_token(b) => TrailerName,
                TrailerName if b == b':' => TrailerValue,
                TrailerName => return Err(BrokenChunks),
                TrailerValue => match b {
                    b'\r' => TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => TrailerValue,
                    _ => return Err(BrokenChunks),
                },
                TrailerLf if b == b'\n' => {
                    if self.trailer_lines >= MAX_TRAILER_LINES {
                        return Err(BrokenChunks);
                    }
                    self.trailer_lines += 1;
                    EndCr
                }
                TrailerLf => return Err(BrokenChunks),
                EndLf if b == b'\n' => {
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                EndLf => return Err(BrokenChunks),
                Done => return Ok(Some(i)),
            };
            i += 1;
        }
        Ok(None)
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_framing_is_scanned_to_its_end_across_any_split() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        // Whole, and split at every byte.
        assert_eq!(Chunks::default().scan(body), Ok(Some(end)));
        for split in 0..end {
            let mut chunks = Chunks::default();
            let first = chunks.scan(&body[..split]).unwrap();
            assert_eq!(first, None, "split {split}");
            assert_eq!(chunks.scan(&body[split..]), Ok(Some(end - split)), "split {split}");
        }
        assert_eq!(Chunks::default().scan(b"0\r\n\r\n"), Ok(Some(5)));
        // As hyper's decoder: a bare LF anywhere in the framing, a digit after white space, an
        // extension over 16 KiB and a trailer that is no header line are refused.
        for broken in [
            &b"0\n\n"[..],
            b"3\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"3;x\nabc\r\n0\r\n\r\n",
            b"0\r\nA: b\n\r\n",
            b"0\r\n\n",
            b"5 junk\r\n",
            b"5 5\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
        ] {
            assert_eq!(
                Chunks::default().scan(broken),
                Err(BrokenChunks),
                "{:?}",
                String::from_utf8_lossy(broken)
            );
        }
        let long_extension = [&b"1;"[..], &[b'x'; 16 * 1024], b"\r\na\r\n0\r\n\r\n"].concat();
        assert_eq!(Chunks::default().scan(&long_extension), Err(BrokenChunks));
        let fine = b"5 \t;a=b\r\nhello\r\n0\r\nX-A: 1\r\nX-B:\r\n\r\n";
        assert_eq!(Chunks::default().scan(fine), Ok(Some(fine.len())));
        assert_eq!(Chunks::default().scan(b"zz\r\n"), Err(BrokenChunks));
        assert_eq!(Chunks::default().scan(b"3\r\nabcX"), Err(BrokenChunks));
        assert_eq!(Chunks::default().scan(b"fffffffffffffffffff\r\n"), Err(BrokenChunks));
    }
}
