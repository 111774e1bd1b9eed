//! A differential test of the relay's answer framing against hyper's client, the oracle: the
//! same bytes go to both, and they must agree on whether the answer is accepted and where it
//! ends. Answers are generated and mutated (Content-Length forms, transfer codings, chunked
//! bodies with extensions, white space and trailers, bare CR and LF, HEAD, 1xx, 204/304,
//! close-delimited). `cargo test` runs a short, fixed-seed round; `bench/framing.sh` runs long
//! ones (`TOKENPROXY_FRAMING_CASES`, `TOKENPROXY_FRAMING_SEED`).
//!
//! hyper's verdict on an input X: X followed by a marker answer is served on a connection, and
//! hyper accepts X (its head and whole body) and then reads the marker as the next answer, or it
//! does not. The relay's verdict: refused, ends at byte p, or runs until the connection closes.
//! Where the relay ends X at p, hyper must accept X[..p] and then read the marker; where the
//! relay refuses X, hyper must not accept X's head and body; until close, hyper must read the
//! body to the connection's end.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Rng, mutate};
use crate::proxy::h1::answer::{RelayVerdict, refused_for_bare_lf_in_trailers, relay_verdict};

/// The bytes mutations insert: those of the framing's grammar, and a few it must refuse.
const FRAMING_ALPHABET: &[u8] = b"\r\n \t;:0159afAFx-+,\x00\x7f\xff";

const MARKER: &[u8] = b"HTTP/1.1 299 Marker\r\ncontent-length: 4\r\n\r\nNEXT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HyperVerdict {
    /// The answer, then the marker.
    ThenMarker,
    /// The answer's head and body were read, but the marker did not follow.
    AcceptedOnly,
    Refused,
}

/// Serves `answer` on an in-memory connection to hyper's client, as a server does: after the
/// request has arrived (hyper refuses bytes that come before it). With `marker`, the marker is
/// served after a second request, if hyper sends one (it does once it holds the whole first
/// answer); then the connection closes, which also ends a wait for more of the first answer.
async fn hyper_reads(answer: Vec<u8>, marker: bool, head: bool) -> (HyperVerdict, Option<Bytes>) {
    let (client, mut server) = tokio::io::duplex(1 << 22);
    let serve = tokio::spawn(async move {
        if read_request(&mut server, Duration::from_secs(5)).await {
            server.write_all(&answer).await.ok();
            if marker && read_request(&mut server, Duration::from_millis(300)).await {
                server.write_all(MARKER).await.ok();
            }
        }
        let _ = server.shutdown().await;
        let mut sink = vec![0u8; 4096];
        while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let verdict = async {
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client)).await
        else {
            return (HyperVerdict::Refused, None);
        };
        tokio::spawn(conn);
        let method = if head { http::Method::HEAD } else { http::Method::GET };
        let request = http::Request::builder().method(method).uri("/").body(Empty::new()).unwrap();
        let Ok(response) = sender.send_request(request).await else { return (HyperVerdict::Refused, None) };
        let Ok(body) = response.into_body().collect().await else { return (HyperVerdict::Refused, None) };
        let body = body.to_bytes();
        if !marker || sender.ready().await.is_err() {
            return (HyperVerdict::AcceptedOnly, Some(body));
        }
        let request = http::Request::builder().uri("/").body(Empty::new()).unwrap();
        let Ok(next) = sender.send_request(request).await else {
            return (HyperVerdict::AcceptedOnly, Some(body));
        };
        let marked = next.status().as_u16() == 299
            && next.into_body().collect().await.is_ok_and(|b| b.to_bytes().as_ref() == b"NEXT");
        (if marked { HyperVerdict::ThenMarker } else { HyperVerdict::AcceptedOnly }, Some(body))
    };
    let verdict =
        tokio::time::timeout(Duration::from_secs(10), verdict).await.unwrap_or((HyperVerdict::Refused, None));
    serve.abort();
    verdict
}

/// Reads one bodiless request head; whether it came within `patience`.
async fn read_request(server: &mut tokio::io::DuplexStream, patience: Duration) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match server.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    tokio::time::timeout(patience, read).await.unwrap_or(false)
}

/// One generated answer, and whether it answers a HEAD.
fn generate(rng: &mut Rng) -> (Vec<u8>, bool) {
    let head = rng.one_in(8);
    let mut out = Vec::new();
    if rng.one_in(10) {
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let version = if rng.one_in(10) { "HTTP/1.0" } else { "HTTP/1.1" };
    let status = *rng.pick(&[200u16, 200, 200, 201, 204, 304, 404, 500]);
    out.extend_from_slice(format!("{version} {status} X\r\n").as_bytes());
    let data: Vec<u8> = (0..rng.below(40)).map(|i| b'a' + (i % 26) as u8).collect();
    let framing = rng.below(4);
    let mut body = Vec::new();
    match framing {
        // Content-Length, in the forms servers and attackers write it.
        0 => {
            let n = data.len();
            let value = match rng.below(12) {
                0 => format!("+{n}"),
                1 => format!(" {n} "),
                2 => format!("{n}, {n}"),
                3 => format!("{n},{}", n + 1),
                4 => format!("0x{n:x}"),
                5 => String::new(),
                6 => format!("{n} {n}"),
                7 => format!("-{n}"),
                8 => format!("{n},"),
                _ => n.to_string(),
            };
            out.extend_from_slice(format!("Content-Length: {value}\r\n").as_bytes());
            if rng.one_in(6) {
                let again = if rng.one_in(2) { n } else { n + 1 };
                out.extend_from_slice(format!("content-length: {again}\r\n").as_bytes());
            }
            body.extend_from_slice(&data);
        }
        // Chunked, possibly beside a length or after another coding.
        1 | 2 => {
            let coding = *rng.pick(&[
                "chunked",
                "chunked",
                "chunked",
                "gzip, chunked",
                "chunked, gzip",
                "Chunked",
                " chunked ",
            ]);
            out.extend_from_slice(format!("Transfer-Encoding: {coding}\r\n").as_bytes());
            if rng.one_in(6) {
                out.extend_from_slice(format!("Content-Length: {}\r\n", rng.below(9)).as_bytes());
            }
            body = chunked(rng, &data);
        }
        // Neither: until the connection closes.
        _ => body.extend_from_slice(&data),
    }
    out.extend_from_slice(b"X-Other: y\r\n\r\n");
    out.extend_from_slice(&body);
    if rng.one_in(3) {
        mutate(rng, &mut out, FRAMING_ALPHABET);
    }
    (out, head)
}

/// A chunked body of `data`, with extensions, white space and trailers now and then.
fn chunked(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(12)).min(rest.len());
        let size = if rng.one_in(2) { format!("{n:x}") } else { format!("{n:X}") };
        out.extend_from_slice(size.as_bytes());
        match rng.below(8) {
            0 => out.extend_from_slice(b";ext=1"),
            1 => out.extend_from_slice(b" ;a=\"b\""),
            2 => out.extend_from_slice(b"\t "),
            _ => {}
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    for _ in 0..rng.below(3) {
        let trailers: [&[u8]; 3] = [b"X-Trailer: 1\r\n", b"Digest:sha-256=x\r\n", b"E:\r\n"];
        let trailer: &[u8] = trailers[rng.below(trailers.len())];
        out.extend_from_slice(trailer);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Where the relay and hyper part.
enum Disagreement {
    /// Where the relay is stricter on purpose, and safe: see [`deliberately_stricter`].
    Stricter,
    /// Anything else, in words.
    Fails(String),
}

/// The two places the relay refuses what hyper takes, on purpose: a bare LF inside a trailer
/// line (see `refused_for_bare_lf_in_trailers`), and a `101` to a request that asked for no
/// upgrade (hyper hands the connection over; the relay serves only bodiless requests and cuts
/// it). Either way the client's connection is cut, so no later answer can be misread.
fn deliberately_stricter(answer: &[u8], head: bool) -> bool {
    let unasked_upgrade = answer.windows(13).any(|w| w.starts_with(b"HTTP/1.") && &w[8..13] == b" 101 ");
    unasked_upgrade || refused_for_bare_lf_in_trailers(answer, head)
}

/// Where relay and hyper disagree on `answer`.
async fn disagreement(answer: &[u8], head: bool) -> Option<Disagreement> {
    let relay = relay_verdict(answer, head);
    let problem = match relay {
        RelayVerdict::Ends(end, close) => {
            let (hyper, _) = hyper_reads(answer[..end].to_vec(), true, head).await;
            // After an answer that closes the connection (HTTP/1.0, `Connection: close`) no
            // answer follows, for the relay or for hyper.
            let agreed = hyper == HyperVerdict::ThenMarker || (close && hyper == HyperVerdict::AcceptedOnly);
            (!agreed).then(|| format!("the relay ends it at {end} (close: {close}), hyper: {hyper:?}"))
        }
        RelayVerdict::Refused => {
            let (hyper, _) = hyper_reads(answer.to_vec(), true, head).await;
            if hyper != HyperVerdict::Refused && deliberately_stricter(answer, head) {
                return Some(Disagreement::Stricter);
            }
            (hyper != HyperVerdict::Refused).then(|| format!("the relay refuses it, hyper: {hyper:?}"))
        }
        RelayVerdict::UntilClose(body_start) => {
            let (hyper, body) = hyper_reads(answer.to_vec(), false, head).await;
            let whole = body.as_deref() == Some(&answer[body_start..]);
            (hyper == HyperVerdict::Refused || !whole)
                .then(|| format!("the relay reads until close, hyper: {hyper:?} with {body:?}"))
        }
        // Not all there: nothing to compare.
        RelayVerdict::Incomplete => None,
    };
    problem
        .map(|p| Disagreement::Fails(format!("{p} for {:?} (HEAD: {head})", String::from_utf8_lossy(answer))))
}

/// Runs `cases` generated answers from `seed`; the disagreements, and how many of each verdict
/// (ends, refused, until close, incomplete, refused on purpose where hyper accepts).
pub async fn run(seed: u64, cases: usize) -> (Vec<String>, [usize; 5]) {
    let mut rng = Rng(seed.max(1));
    let mut found = Vec::new();
    let mut counts = [0usize; 5];
    for _ in 0..cases {
        let (answer, head) = generate(&mut rng);
        counts[match relay_verdict(&answer, head) {
            RelayVerdict::Ends(..) => 0,
            RelayVerdict::Refused => 1,
            RelayVerdict::UntilClose(_) => 2,
            RelayVerdict::Incomplete => 3,
        }] += 1;
        match disagreement(&answer, head).await {
            Some(Disagreement::Fails(problem)) => found.push(problem),
            Some(Disagreement::Stricter) => counts[4] += 1,
            None => {}
        }
    }
    (found, counts)
}

#[cfg(test)]
mod tests {
    // Virtual time: a wait for bytes that will not come ends as soon as nothing else can run.
    #[tokio::test(start_paused = true)]
    async fn the_relay_and_hyper_agree_on_where_every_answer_ends() {
        let (cases, seed) = super::super::cases_and_seed(3000, 7);
        let (found, counts) = super::run(seed, cases).await;
        let [ends, refused, until_close, incomplete, stricter] = counts;
        // Seen with --nocapture, and by bench/framing.sh.
        println!(
            "framing: {cases} answers from seed {seed}: ends {ends}, refused {refused} ({stricter} of them on purpose where hyper accepts), until close {until_close}, incomplete {incomplete}, disagreements {}",
            found.len()
        );
        // Every kind of verdict is exercised, or the generator has gone blind.
        assert!(ends > cases / 10 && refused > cases / 20 && until_close > cases / 50, "{counts:?}");
        assert!(
            found.is_empty(),
            "{} of {cases} disagree (ends {ends}, refused {refused}, until close {until_close}, incomplete {incomplete}); first: {:#?}",
            found.len(),
            &found[..found.len().min(8)]
        );
    }
}
