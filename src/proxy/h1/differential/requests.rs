//! The relay's reading of request heads against hyper's server, configured as tokenproxy
//! configures it. A head the relay takes (it serves the request itself rather than handing the
//! connection to hyper) must be one hyper's server takes too, with the same method, path and
//! headers, and ending at the same byte: a request pipelined after it must arrive whole. A head
//! the relay hands over is hyper's by construction, so nothing is compared there.
//!
//! Generated heads: request lines in absolute and other forms, odd methods, versions,
//! authorities and path bytes; framing, hop-by-hop and tokenproxy's own headers; bad header
//! names, white space before a colon, obs-fold, control bytes and obs-text; bare LF line ends;
//! then byte mutations.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Rng, mutate};
use crate::proxy::h1::MAX_HEADERS;
use crate::proxy::h1::request::{Form, forward_target, head_end, parse, tokens};

/// The bytes mutations insert: the request grammar's delimiters and bytes it must refuse.
const REQUEST_ALPHABET: &[u8] = b"\r\n \t:/?#@[]%\"{}|\\^`0aZ-.,;\x00\x01\x7f\x80\xff";

const MARKER: &[u8] = b"GET /marker HTTP/1.1\r\nhost: marker.test\r\n\r\n";

/// A request as its reader saw it: method, path (with query) and headers (lowercased names,
/// sorted: hyper's map groups values by name).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
}

/// The requests hyper's server read from `bytes`, in order, as its service saw them.
async fn hyper_serves(bytes: Vec<u8>) -> Vec<Seen> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let uri = req.uri();
        let path = format!("{}{}", uri.path(), uri.query().map(|q| format!("?{q}")).unwrap_or_default());
        let mut headers: Vec<(String, Vec<u8>)> =
            req.headers().iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect();
        headers.sort();
        record.lock().unwrap().push(Seen { method: req.method().to_string(), path, headers });
        async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok")))) }
    });
    // As crate::server::serve configures it.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    let conn = tokio::spawn(async move { builder.serve_connection(TokioIo::new(server), service).await });
    client.write_all(&bytes).await.ok();
    // Until hyper closes, or nothing more comes (virtual time: at once when all is idle).
    let mut sink = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), client.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
    conn.abort();
    std::mem::take(&mut *seen.lock().unwrap())
}

/// The relay's reading of a head it takes in `form` (the forward port's absolute form, or the
/// origin form of a route or an intercepted tunnel); `None`: it hands it to hyper.
fn relay_reads(head: &[u8], form: Form<'_>) -> Option<Seen> {
    let mut storage = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let parsed = parse(head, form, &mut storage)?;
    if matches!(form, Form::Absolute) {
        forward_target(parsed.authority)?;
    }
    let mut path = Vec::new();
    parsed.path.write(&mut path);
    let mut headers: Vec<(String, Vec<u8>)> =
        parsed.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
    headers.sort();
    Some(Seen { method: parsed.method.to_string(), path: String::from_utf8(path).ok()?, headers })
}

/// A request head; with `origin`, mostly in origin form (what a client sends inside a tunnel).
fn generate(rng: &mut Rng, origin: bool) -> Vec<u8> {
    let eol = |rng: &mut Rng| if rng.one_in(10) { "\n" } else { "\r\n" };
    let method = *rng.pick(&[
        "GET", "GET", "GET", "GET", "GET", "GET", "HEAD", "DELETE", "OPTIONS", "PUT", "get", "PATCH",
        "M-SEARCH", "CONNECT", "TRACE", "G{T", "",
    ]);
    let scheme =
        if rng.one_in(4) { *rng.pick(&["HTTP://", "https://", "http:/", "", "Http://"]) } else { "http://" };
    let usual_authority = *rng.pick(&["api.test", "api.test:8080", "API.Test", "127.0.0.1:80", "[::1]:8080"]);
    let authority = if !rng.one_in(4) {
        usual_authority
    } else {
        *rng.pick(&[
            "api.test",
            "api.test",
            "api.test:8080",
            "API.Test",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "api.test:",
            "api.test:99999",
            "user@api.test",
            "user:pw@api.test",
            "api.test:8o",
            "a_b.test",
            "api.test.",
            "",
            "a b",
            "api.test%2f",
            "api\\test",
            "[::1",
        ])
    };
    let usual_path = *rng.pick(&["/", "/v1/me", "/v1/me?page=2&q=a%20b", "", "/a/b/c.json"]);
    let path = if !rng.one_in(4) {
        usual_path
    } else {
        *rng.pick(&[
            "",
            "/",
            "/v1/me",
            "/v1/me",
            "/a/../b",
            "/%7Euser",
            "/%zz",
            "/\"q\"",
            "/{x}",
            "/a|b",
            "/a\\b",
            "/^",
            "/`",
            "/\u{e9}",
            "?q=1",
            "/p?a=1&b=%20",
            "/p#frag",
            "//double",
            "/p?q=<x>",
            "/p?",
            "/*",
        ])
    };
    let target = match rng.below(20) {
        0 if !origin => "/origin".to_string(),
        0 => format!("{scheme}{authority}{path}"),
        1 => "*".to_string(),
        _ if origin => path.to_string(),
        _ => format!("{scheme}{authority}{path}"),
    };
    let version = if rng.one_in(6) {
        *rng.pick(&["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 "])
    } else {
        "HTTP/1.1"
    };
    let gap = if rng.one_in(15) { "  " } else { " " };
    let mut out = format!("{method}{gap}{target} {version}{}", eol(rng)).into_bytes();
    // Mostly headers a client sends; now and then one the relay must not take, or a broken one.
    let usual: [&[u8]; 16] = [
        b"Host: api.test",
        b"Accept: */*",
        b"User-Agent: t/1",
        b"Content-Length: 0",
        b"Connection: close",
        b"Connection: keep-alive, X-A",
        b"X-A: 1",
        b"Tokenproxy-Account: alice",
        b"Proxy-Authorization: Basic YWxpY2U6cA==",
        b"TE: trailers",
        b"X-Empty:",
        b"X-Tab: a\tb",
        b"X-Obs: \x80\xff",
        b"X-Trailing-Space: v ",
        b"Authorization: Bearer client-own",
        b"Accept-Encoding: gzip, br",
    ];
    let unusual: [&[u8]; 19] = [
        b"Content-Length:  0 ",
        b"Content-Length: 00",
        b"Content-Length: +0",
        b"Content-Length: 0, 0",
        b"Content-Length: 1",
        b"Transfer-Encoding: chunked",
        b"Tokenproxy-Account: bob",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
        b"X Y: 1",
        b"X:Y: 2",
        b"(X): 3",
        b" folded: x",
        b"\tcontinued",
        b"X-Nul: a\x00b",
        b"X-Del: \x7f",
        b"X-Sp : 1",
        b": no-name",
        b"Connection: close, Upgrade",
    ];
    for _ in 0..rng.below(6) {
        let header: &[u8] =
            if rng.one_in(8) { unusual[rng.below(unusual.len())] } else { usual[rng.below(usual.len())] };
        out.extend_from_slice(header);
        out.extend_from_slice(eol(rng).as_bytes());
    }
    out.extend_from_slice(eol(rng).as_bytes());
    if rng.one_in(4) {
        mutate(rng, &mut out, REQUEST_ALPHABET);
    }
    out
}

/// Runs `cases` generated heads from `seed`, read by the relay in `form`: the disagreements, and
/// how many the relay took, handed to hyper, and could not end (no blank line).
pub async fn run(seed: u64, cases: usize, form: Form<'static>) -> (Vec<String>, [usize; 3]) {
    let mut rng = Rng(seed.max(1));
    let mut found = Vec::new();
    let mut counts = [0usize; 3];
    for _ in 0..cases {
        let bytes = generate(&mut rng, matches!(form, Form::Origin { .. }));
        let Some(end) = head_end(&bytes) else {
            counts[2] += 1;
            continue;
        };
        let Some(relay) = relay_reads(&bytes[..end], form) else {
            counts[1] += 1;
            continue;
        };
        counts[0] += 1;
        let mut served = bytes[..end].to_vec();
        served.extend_from_slice(MARKER);
        let hyper = hyper_serves(served).await;
        // After `Connection: close` no request follows, for either.
        let closes = relay.headers.iter().any(|(name, value)| {
            name == "connection" && tokens(value).any(|t| t.eq_ignore_ascii_case(b"close"))
        });
        let marker_next = hyper.get(1).is_some_and(|s| s.path == "/marker") || (closes && hyper.len() == 1);
        if hyper.first() != Some(&relay) || !marker_next {
            found.push(format!(
                "the relay takes {:?} as {relay:?}; hyper read {hyper:?}",
                String::from_utf8_lossy(&bytes[..end])
            ));
        }
    }
    (found, counts)
}

#[cfg(test)]
mod tests {
    use super::Form;

    async fn check(form: Form<'static>, label: &str) {
        let (cases, seed) = super::super::cases_and_seed(3000, 7);
        let (found, [taken, handed, unended]) = super::run(seed, cases, form).await;
        // Seen with --nocapture, and by bench/framing.sh.
        println!(
            "requests{label}: {cases} heads from seed {seed}: taken by the relay {taken}, handed to hyper {handed}, no end {unended}, disagreements {}",
            found.len()
        );
        // Both verdicts are exercised, or the generator has gone blind.
        assert!(
            taken > cases / 5 && handed > cases / 5,
            "taken {taken}, handed {handed}: {:#?}",
            &found[..found.len().min(8)]
        );
        assert!(
            found.is_empty(),
            "{} of {cases} disagree; first: {:#?}",
            found.len(),
            &found[..found.len().min(8)]
        );
    }

    // Virtual time: a wait for bytes that will not come ends as soon as nothing else can run.
    #[tokio::test(start_paused = true)]
    async fn every_request_head_the_relay_takes_hyper_takes_and_reads_alike() {
        check(Form::Absolute, "").await;
    }

    /// Inside an intercepted tunnel (and on a route), in origin form.
    #[tokio::test(start_paused = true)]
    async fn every_origin_form_head_the_relay_takes_in_a_tunnel_hyper_takes_and_reads_alike() {
        check(Form::Origin { base: "" }, " (origin form)").await;
    }
}
