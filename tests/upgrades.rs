//! WebSocket (and other `Upgrade`) requests: to a provider host, plain or intercepted, the
//! handshake carries the token and the two sides are joined after `101`; to any other host a
//! blind tunnel keeps working untouched.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const TOKEN: &str = "tok-ws-7c1d2e3f";

fn python_websockets_available() -> bool {
    client_available(
        "python3 with websockets",
        std::process::Command::new("python3").args(["-c", "import websockets"]),
    )
}

/// Which of Python `websockets`' two clients a test drives.
#[derive(Clone, Copy)]
enum PythonClient {
    /// `websockets.sync`: reads in a thread of its own while the caller writes, on one OpenSSL
    /// connection, so a TLS 1.3 session ticket arriving as it writes its handshake can lose the
    /// handshake (a client bug, whatever the server). tokenproxy's own leaves send no tickets.
    Sync,
    /// `websockets.asyncio`: one task reads and writes, unaffected by when tickets arrive.
    Asyncio,
}

/// A Python `websockets` client that connects through `proxy`, prints the first message (the
/// mock's report of the handshake's Authorization), sends `hello` and prints the echo. Its own
/// timeouts end before the test's, so that a hang fails with the client's own error.
async fn python_websocket(
    client: PythonClient,
    url: &str,
    proxy: &str,
    cafile: &std::path::Path,
) -> (bool, String, String) {
    let cafile = cafile.display().to_string();
    let script = match client {
        PythonClient::Sync => format!(
            r#"
import ssl
from websockets.sync.client import connect
ctx = ssl.create_default_context(cafile={cafile:?})
with connect({url:?}, ssl=ctx, proxy={proxy:?}, open_timeout=20) as ws:
    print(ws.recv(timeout=15))
    ws.send("hello")
    print(ws.recv(timeout=15))
"#
        ),
        PythonClient::Asyncio => format!(
            r#"
import asyncio, ssl
from websockets.asyncio.client import connect
async def main():
    ctx = ssl.create_default_context(cafile={cafile:?})
    async with connect({url:?}, ssl=ctx, proxy={proxy:?}, open_timeout=20) as ws:
        print(await asyncio.wait_for(ws.recv(), 15))
        await ws.send("hello")
        print(await asyncio.wait_for(ws.recv(), 15))
asyncio.run(main())
"#
        ),
    };
    match tokio::time::timeout(std::time::Duration::from_secs(90), python(&script, &[])).await {
        Ok(result) => result,
        Err(_) => panic!("the Python WebSocket client did not finish within 90 s ({url} via {proxy})"),
    }
}

/// An HTTPS mock for `localhost` and a proxy whose provider is `localhost:PORT`; returns
/// tokenproxy's CA and the mock's.
async fn tls_setup(dir: &std::path::Path) -> (MockApi, TokenProxy, std::path::PathBuf, std::path::PathBuf) {
    let pki = test_pki(dir, "mock", &["localhost", "127.0.0.1"]);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    std::fs::write(dir.join("api.json"), token_json(TOKEN)).unwrap();
    let tp = TokenProxy::start(dir, &mock.tls_config("localhost", &pki.ca_pem_path, ""));
    (mock, tp, dir.join("ca").join("ca.pem"), pki.ca_pem_path)
}

#[tokio::test]
async fn python_websockets_through_an_intercepted_provider_host_gets_the_token_in_its_handshake() {
    if !python_websockets_available() {
        return;
    }
    let dir = tempdir();
    let (mock, tp, ca_pem, _) = tls_setup(dir.path()).await;
    let url = format!("wss://localhost:{}/ws", mock.addr.port());
    let (ok, out, err) = python_websocket(PythonClient::Sync, &url, &tp.proxy_url(), &ca_pem).await;
    assert!(ok, "{out}{err}\nproxy log:\n{}", tp.logs().join("\n"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [format!("authorization: Bearer {TOKEN}").as_str(), "hello"], "{err}");
    assert_eq!(mock.last().path, "/ws");
    assert!(
        mock.last().headers.get("upgrade").is_some_and(|v| v == "websocket"),
        "the upgrade reached the provider as an upgrade, not a plain GET"
    );
}

#[tokio::test]
async fn a_websocket_to_an_unmatched_host_still_goes_through_a_blind_tunnel() {
    if !python_websockets_available() {
        return;
    }
    let dir = tempdir();
    let (mock, tp, _, mock_ca) = tls_setup(dir.path()).await;
    // 127.0.0.1:PORT matches no provider: tunnelled, the client sees the mock's own certificate,
    // and the mock's session tickets (rustls's default, like most servers), hence the asyncio
    // client.
    let url = format!("wss://127.0.0.1:{}/ws", mock.addr.port());
    let (ok, out, err) = python_websocket(PythonClient::Asyncio, &url, &tp.proxy_url(), &mock_ca).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["authorization: none", "hello"], "nothing injected");
}

#[tokio::test]
async fn a_plain_http_websocket_upgrade_is_forwarded_with_the_token_and_joined() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "");

    // An absolute-form handshake, as a client configured with HTTP_PROXY sends it; the frames
    // after it are tungstenite's.
    let mut stream = tokio::net::TcpStream::connect(tp.proxy).await.unwrap();
    let target = mock.authority();
    let handshake = format!(
        "GET http://{target}/ws HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");

    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first, Message::text(format!("authorization: Bearer {TOKEN}")));
    ws.send(Message::text("ping through the proxy")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo, Message::text("ping through the proxy"));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn plain_http_inside_a_connect_to_a_provider_host_is_served_under_the_plaintext_rules() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "");
    // A client that always tunnels, speaking plain HTTP inside: the provider allows plaintext.
    let mut stream = tokio::net::TcpStream::connect(tp.proxy).await.unwrap();
    let target = mock.authority();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 200"));
    stream.write_all(format!("GET /inside HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(mock.last().path, "/inside");
    assert_eq!(mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));

    // Python websockets with a ws:// URL tunnels through CONNECT too.
    if python_websockets_available() {
        let script = format!(
            r#"
from websockets.sync.client import connect
with connect("ws://{target}/ws", proxy={proxy:?}, open_timeout=30) as ws:
    print(ws.recv(timeout=20))
    ws.send("plain hello")
    print(ws.recv(timeout=20))
"#,
            proxy = tp.proxy_url()
        );
        let (ok, out, err) = python(&script, &[]).await;
        assert!(ok, "{out}{err}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [format!("authorization: Bearer {TOKEN}").as_str(), "plain hello"]
        );
        assert_eq!(mock.last().method, "GET");
        assert!(!mock.last().headers.contains_key("proxy-authorization"));
    }

    // Without allow_plaintext the token does not travel over plain HTTP, tunnel or not.
    let dir = tempdir();
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    let strict = TokenProxy::start(
        dir.path(),
        &mock.plain_config(&token_file, "").replace("allow_plaintext = true", ""),
    );
    let mut stream = tokio::net::TcpStream::connect(strict.proxy).await.unwrap();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 200"));
    let seen = mock.seen().len();
    stream.write_all(format!("GET /refused HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 403") && head.contains("plaintext_refused"), "{head}");
    assert_eq!(mock.seen().len(), seen, "the request reached the provider");
}
