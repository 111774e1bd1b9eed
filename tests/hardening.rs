//! The data path as an attacker or a careless client would use it: userinfo in a target, host
//! names in odd spellings, loopback in disguise, tokenproxy's own admin port, clients that go
//! silent, tunnels that are forgotten.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "tok-hard-1a2b3c4d";

/// Sends raw bytes and reads the answer until the proxy closes or `patience` runs out.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn get(url: &str) -> Vec<u8> {
    let host = url.split('/').nth(2).unwrap();
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn plain_proxy(dir: &std::path::Path, mock: &MockApi, extra: &str) -> TokenProxy {
    let limits = "header_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n";
    let token_file = dir.join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    TokenProxy::start(dir, &format!("{}{extra}", mock.plain_config(&token_file, limits)))
}

#[tokio::test]
async fn a_target_with_userinfo_is_refused_and_the_credentials_are_never_echoed_or_logged() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    // The provider is narrowed to the mock's port; the userinfo request names another port.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    let tp = plain_proxy(dir.path(), &mock, "");
    for target in [
        format!("http://u:hunter2-secret@127.0.0.1:{other_port}/steal"),
        format!("http://hunter2-secret@{}/steal", mock.authority()),
    ] {
        let answer = exchange(tp.proxy, &get(&target)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("bad_target"), "{answer}");
        assert!(!answer.contains("hunter2"), "the body repeats the credentials: {answer}");
    }
    // CONNECT with userinfo is refused the same way.
    let answer =
        exchange(tp.proxy, b"CONNECT u:hunter2-secret@127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("hunter2"), "{answer}");
    assert!(mock.seen().is_empty());
    let accepted = tokio::time::timeout(Duration::from_millis(200), other.accept()).await;
    assert!(accepted.is_err(), "the other port was dialled");
    assert!(tp.logs().iter().all(|l| !l.contains("hunter2")), "a log line holds the credentials");
}

#[tokio::test]
async fn a_port_that_is_not_a_port_is_refused_never_read_as_port_80() {
    // `Authority` reads `:99999` or `:8o` as no port at all; dialled, that was port 80, with the
    // provider's token for a host that matches on any port.
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = plain_proxy(dir.path(), &mock, "");
    for port in ["99999", "8o", "+80", "0"] {
        for request in [
            get(&format!("http://127.0.0.1:{port}/v1/me")),
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(),
        ] {
            let answer = exchange(tp.proxy, &request).await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{port}: {answer}");
            assert!(answer.contains("port is not a number"), "{port}: {answer}");
        }
    }
    assert!(mock.seen().is_empty());
}

#[tokio::test]
async fn a_host_in_upper_case_with_a_trailing_dot_is_matched_dialled_and_sent_in_normal_form() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    let port = mock.addr.port();
    let config = mock
        .plain_config(&token_file, "")
        .replace(&format!("\"{}\"", mock.authority()), &format!("\"localhost:{port}\""));
    let tp = TokenProxy::start(dir.path(), &config);
    let answer = exchange(tp.proxy, &get(&format!("http://LocalHost.:{port}/normal"))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = mock.last();
    assert_eq!(seen.path, "/normal");
    assert_eq!(seen.authorization(), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(seen.headers.get("host").unwrap(), &format!("localhost:{port}"));
}

#[tokio::test]
async fn denied_networks_are_never_dialled_whatever_the_spelling() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = plain_proxy(dir.path(), &mock, "[egress]\ndeny = [\"127.0.0.0/8\", \"::1\"]\n");
    // The provider (the mock) is denied too: a provider host is no exception.
    let port = mock.addr.port();
    // A host that matches no provider, for blind tunnels.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    for host in ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "localhost", "[::ffff:127.0.0.1]"] {
        let answer = exchange(tp.proxy, &get(&format!("http://{host}:{port}/denied"))).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{host}: {answer}");
        assert!(answer.contains("egress_denied"), "{host}: {answer}");
        let connect = format!("CONNECT {host}:{other_port} HTTP/1.1\r\nHost: {host}:{other_port}\r\n\r\n");
        let answer = exchange(tp.proxy, connect.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "CONNECT {host}: {answer}");
        assert!(answer.contains("egress_denied"), "CONNECT {host}: {answer}");
    }
    assert!(mock.seen().is_empty(), "a denied address was dialled");
    assert_eq!(mock.open_connections(), 0);
    let accepted = tokio::time::timeout(Duration::from_millis(200), other.accept()).await;
    assert!(accepted.is_err(), "a tunnel dialled a denied address");
}

#[tokio::test]
async fn tokenproxys_own_listeners_are_never_reachable_through_it() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = plain_proxy(dir.path(), &mock, "");
    let admin = tp.admin.port();
    for url in [
        format!("http://127.0.0.1:{admin}/tokens"),
        format!("http://localhost:{admin}/metrics"),
        format!("http://0.0.0.0:{admin}/healthz"),
        format!("http://127.0.0.1:{}/loop", tp.proxy.port()),
    ] {
        let answer = exchange(tp.proxy, &get(&url)).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{url}: {answer}");
        assert!(answer.contains("own listeners"), "{url}: {answer}");
    }
    let connect = format!("CONNECT 127.0.0.1:{admin} HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = exchange(tp.proxy, connect.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // A POST that would force a refresh never reached the admin API.
    let post = format!(
        "POST http://127.0.0.1:{admin}/tokens/api/refresh HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nContent-Length: 0\r\n\r\n"
    );
    assert!(exchange(tp.proxy, post.as_bytes()).await.starts_with("HTTP/1.1 403"));
    assert_eq!(tp.token_view("api").await["refresh_count"], 0);
}

/// A TLS client that trusts `ca`, offering `alpn`, through a CONNECT to `host:port`.
async fn intercepted_tls(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    ca: &std::path::Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    intercepted_tls_as(proxy, host, host, port, ca, alpn).await
}

/// [`intercepted_tls`] with the CONNECT naming `connect_host` and TLS verifying `host`.
async fn intercepted_tls_as(
    proxy: SocketAddr,
    connect_host: &str,
    host: &str,
    port: u16,
    ca: &std::path::Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(
            format!("CONNECT {connect_host}:{port} HTTP/1.1\r\nHost: {connect_host}:{port}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap()
}

#[tokio::test]
async fn an_intercepted_client_that_goes_silent_after_the_handshake_is_dropped() {
    let dir = tempdir();
    let pki = test_pki(dir.path(), "mock", &["localhost"]);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    std::fs::write(dir.path().join("api.json"), token_json(TOKEN)).unwrap();
    let limits = "header_read_timeout = \"1s\"\nidle_timeout = \"1s\"";
    let tp = TokenProxy::start(dir.path(), &mock.tls_config("localhost", &pki.ca_pem_path, limits));
    let ca = dir.path().join("ca/ca.pem");
    for alpn in [&[][..], &[&b"http/1.1"[..]][..], &[&b"h2"[..]][..]] {
        let mut tls = intercepted_tls(tp.proxy, "localhost", mock.addr.port(), &ca, alpn).await;
        let started = Instant::now();
        // Silent: the proxy must close within header_read_timeout (1 s), give or take. (An
        // HTTP/2 server speaks first, its SETTINGS: read until the end.)
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut all)).await;
        assert!(read.is_ok(), "ALPN {alpn:?}: a silent client was still connected after 5 s");
        assert!(started.elapsed() >= Duration::from_millis(800), "closed before the deadline");
    }

    // HTTP/2 that served a request and then idles is closed after idle_timeout (1 s).
    let tls = intercepted_tls(tp.proxy, "localhost", mock.addr.port(), &ca, &[b"h2"]).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::get(format!("https://localhost:{}/h2", mock.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    assert_eq!(mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
    let idle_since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was still open after 5 s");
    assert!(idle_since.elapsed() >= Duration::from_millis(800), "closed before idle_timeout");
}

#[tokio::test]
async fn an_intercepted_host_in_odd_spelling_gets_a_leaf_sni_and_dial_in_normal_form() {
    let dir = tempdir();
    let pki = test_pki(dir.path(), "mock", &["localhost"]);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    std::fs::write(dir.path().join("api.json"), token_json(TOKEN)).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.tls_config("localhost", &pki.ca_pem_path, ""));
    // The client verifies the leaf as `localhost`: it was minted for the normal form.
    let port = mock.addr.port();
    let mut tls = intercepted_tls_as(
        tp.proxy,
        "LocalHost.",
        "localhost",
        port,
        &dir.path().join("ca/ca.pem"),
        &[b"http/1.1"],
    )
    .await;
    tls.write_all(
        format!("GET /odd HTTP/1.1\r\nHost: LocalHost.:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    // The upstream was dialled and verified as `localhost` (its certificate names only that).
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(tp.logs().iter().all(|l| !l.contains("LocalHost.")), "a log line has the unnormalised host");
}

/// A plain TCP server that accepts one connection and reports what it saw.
async fn silent_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<(Vec<u8>, Duration)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let mut seen = Vec::new();
        // Never writes; reads until the proxy closes its side (EOF), bounded.
        let _ = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut seen)).await;
        let _ = tx.send((seen, started.elapsed()));
        // Holds the socket open: only the proxy's timeout can free its side.
        tokio::time::sleep(Duration::from_secs(20)).await;
    });
    (addr, rx)
}

async fn open_tunnel(proxy: SocketAddr, to: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

#[tokio::test]
async fn a_forgotten_tunnel_is_closed_after_the_idle_timeout() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = plain_proxy(dir.path(), &mock, "");
    let (server, seen) = silent_server().await;
    let mut client = open_tunnel(tp.proxy, server).await;
    client.write_all(b"hello").await.unwrap();
    let (bytes, after) = seen.await.unwrap();
    assert_eq!(bytes, b"hello");
    assert!(after < Duration::from_secs(5), "the upstream side stayed open {after:?} (idle_timeout is 1 s)");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the client side stayed open");
}

#[tokio::test]
async fn a_half_close_is_passed_on_at_once() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    // A long idle timeout: only the half-close can end the upstream's read.
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "idle_timeout = \"60s\"");
    let (server, seen) = silent_server().await;
    let mut client = open_tunnel(tp.proxy, server).await;
    client.write_all(b"request then FIN").await.unwrap();
    client.shutdown().await.unwrap();
    let (bytes, after) = seen.await.unwrap();
    assert_eq!(bytes, b"request then FIN");
    assert!(after < Duration::from_secs(3), "the half-close took {after:?} to reach the upstream");
}
