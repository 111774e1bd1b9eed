//! Builders for integration tests: a mock provider API on loopback (plain or TLS), the real
//! tokenproxy binary on ephemeral ports, real clients, and bounded waiting.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub type Body = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `check` until it returns `Some`, for at most `patience`; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up after {patience:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Mock provider API
// ---------------------------------------------------------------------------------------------

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The HTTP version it came in (the mock offers h2 and http/1.1 over TLS).
    pub version: http::Version,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn authorization(&self) -> Option<&str> {
        self.headers.get("authorization").and_then(|v| v.to_str().ok())
    }
}

/// A mock upstream on 127.0.0.1. It records every request, and answers by path:
/// - `/status/NNN`: that status;
/// - `/redirect`: 302 to `http://127.0.0.1:1/elsewhere`;
/// - `/slow`: 200 after one second;
/// - `/whoami`: 200 with the request's `Authorization` value (or `none`) as the body;
/// - `/stream`: sends `first\n`, waits until [`MockApi::release`] (at most 10 s), then `second\n`;
/// - `/ws` with a WebSocket handshake: `101`, then a WebSocket that first sends
///   `authorization: <the handshake's Authorization header>` and then echoes every message;
/// - anything else: 200 with a JSON echo of method, path and header names.
#[derive(Clone)]
pub struct MockApi {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<Notify>,
    /// When set, only `Bearer <one of these>` is accepted; anything else gets 401.
    accepted: Arc<Mutex<Option<std::collections::HashSet<String>>>>,
    /// Connections accepted and not yet closed by either side.
    open: Arc<AtomicUsize>,
}

impl MockApi {
    pub async fn start() -> MockApi {
        Self::start_with(None).await
    }

    /// A mock behind TLS with the given server config.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> MockApi {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> MockApi {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tls).await
    }

    /// On a given address (a test's own network namespace has addresses besides loopback).
    pub async fn start_on(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> MockApi {
        let listener = TcpListener::bind(addr).await.unwrap();
        let mock = MockApi {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            release: Arc::new(Notify::new()),
            accepted: Arc::default(),
            open: Arc::default(),
        };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let served = mock.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let mock = served.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    mock.open.fetch_add(1, Ordering::SeqCst);
                    let open = mock.open.clone();
                    let service = service_fn(move |req| {
                        let mock = mock.clone();
                        async move { Ok::<_, Infallible>(mock.answer(req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ =
                                builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ =
                                    builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        mock
    }

    /// A config with one provider `api` for this mock over plain HTTP, both listeners on ephemeral
    /// loopback ports; `extra_proxy` is added to `[proxy]`.
    pub fn plain_config(&self, token_file: &Path, extra_proxy: &str) -> String {
        plain_config(&self.authority(), token_file, extra_proxy)
    }

    /// A config with one provider `api` for this mock behind TLS, matched as `host:PORT`, with the
    /// mock's CA (`mock_ca`) in `extra_roots`, tokenproxy's CA in `ca` and the token in
    /// `api.json` (both relative to the config's folder); `extra_proxy` is added to `[proxy]`.
    pub fn tls_config(&self, host: &str, mock_ca: &Path, extra_proxy: &str) -> String {
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
{extra_proxy}
[admin]
listen = "127.0.0.1:0"
[tls]
ca_dir = "ca"
extra_roots = [{roots}]
[providers.api]
hosts = ["{host}:{port}"]
token_file = "api.json"
"#,
            roots = toml_path(mock_ca),
            port = self.addr.port(),
        )
    }

    /// `127.0.0.1:PORT`
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many connections to the mock are open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the mock received no request")
    }

    /// From now on only these tokens (and those added by [`MockApi::accept`]) are accepted.
    pub fn accept_only(&self, tokens: &[&str]) {
        *self.accepted.lock().unwrap() = Some(tokens.iter().map(|t| t.to_string()).collect());
    }

    pub fn accept(&self, token: &str) {
        if let Some(set) = self.accepted.lock().unwrap().as_mut() {
            set.insert(token.to_string());
        }
    }

    /// Lets a `/stream` response finish.
    pub fn release(&self) {
        self.release.notify_waiters();
        self.release.notify_one();
    }

    async fn answer(&self, mut req: Request<Incoming>) -> Response<Body> {
        let websocket = req.uri().path() == "/ws" && req.headers().contains_key("sec-websocket-key");
        let on_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let path = parts.uri.path().to_string();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            version: parts.version,
            path: parts.uri.path_and_query().map_or(path.clone(), |p| p.to_string()),
            headers: parts.headers.clone(),
            body,
        });
        if let Some(accepted) = self.accepted.lock().unwrap().as_ref() {
            let token = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !token.is_some_and(|t| accepted.contains(t)) {
                return respond(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_token"}"#.into());
            }
        }
        if let Some(on_upgrade) = on_upgrade {
            return websocket_echo(&parts.headers, on_upgrade);
        }
        if let Some(code) = path.strip_prefix("/status/") {
            let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            return respond(status, format!("status {code}\n"));
        }
        match path.as_str() {
            // Which token arrived, for tests that must tell accounts' tokens apart per response.
            "/whoami" => {
                let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("none");
                respond(StatusCode::OK, auth.to_string())
            }
            "/redirect" => {
                let mut r = respond(StatusCode::FOUND, "moved\n".into());
                r.headers_mut().insert("location", "http://127.0.0.1:1/elsewhere".parse().unwrap());
                r
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                respond(StatusCode::OK, "slow done\n".into())
            }
            "/stream" => {
                let release = self.release.clone();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first\n")))).await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), release.notified()).await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"second\n")))).await;
                });
                let stream = tokio_stream_from(rx);
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
            _ => {
                let names: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
                respond(
                    StatusCode::OK,
                    serde_json::json!({"method": parts.method.as_str(), "path": path, "headers": names})
                        .to_string(),
                )
            }
        }
    }
}

/// Answers a WebSocket handshake with `101` and serves the echo described on [`MockApi`].
fn websocket_echo(headers: &http::HeaderMap, on_upgrade: hyper::upgrade::OnUpgrade) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    let key = headers.get("sec-websocket-key").unwrap().as_bytes();
    let authorization =
        headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                .await;
        if ws.send(Message::text(format!("authorization: {authorization}"))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                // Answer the close handshake before the connection goes.
                let _ = ws.close(None).await;
                break;
            }
            if ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, String::new());
    let h = r.headers_mut();
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("sec-websocket-accept", derive_accept_key(key).parse().unwrap());
    r
}

fn respond(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r
}

/// An mpsc receiver as a stream of frames, without pulling in tokio-stream.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---------------------------------------------------------------------------------------------
// TLS for mocks
// ---------------------------------------------------------------------------------------------

/// A test CA and a server certificate it signed.
pub struct TestPki {
    pub ca_pem_path: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Makes a CA, writes its PEM to `dir/<name>-ca.pem`, and signs a leaf for `names`.
pub fn test_pki(dir: &Path, name: &str, names: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let ca_pem_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_pem_path, ca_cert.pem()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let mut server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestPki { ca_pem_path, server_config: Arc::new(server_config) }
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

/// A running `tokenproxy run`, killed on drop. Its stderr log lines (JSON) are collected.
pub struct TokenProxy {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// `[[routes]]` listeners in config order.
    pub routes: Vec<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tokenproxy")
}

impl TokenProxy {
    /// Writes `config` (whose listeners should be `127.0.0.1:0`) to `dir/tokenproxy.toml` and
    /// starts the binary on it.
    pub fn start(dir: &Path, config: &str) -> TokenProxy {
        Self::start_with_env(dir, config, &[])
    }

    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> TokenProxy {
        Self::start_command(dir, config, env, Command::new(binary()))
    }

    /// Starts the proxy with at most `fds` open file descriptors (`prlimit`, from util-linux).
    pub fn start_with_fd_limit(dir: &Path, config: &str, fds: u32) -> TokenProxy {
        let mut command = Command::new("prlimit");
        command.arg(format!("--nofile={fds}:{fds}")).arg("--").arg(binary());
        Self::start_command(dir, config, &[], command)
    }

    /// The proxy's resident memory now, from /proc, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Starts the proxy allowed onto CPU 0 only (`taskset`, from util-linux).
    pub fn start_on_one_cpu(dir: &Path, config: &str) -> TokenProxy {
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]).arg(binary());
        Self::start_command(dir, config, &[], command)
    }

    /// Starts the proxy as an unprivileged user (`nobody`, via setpriv) when the tests run as
    /// root, so that file permissions apply to it; `dir` is handed over to that user.
    pub fn start_unprivileged(dir: &Path, config: &str) -> TokenProxy {
        if !running_as_root() {
            return Self::start(dir, config);
        }
        chown_tree(dir, NOBODY);
        let mut command = Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(binary());
        Self::start_command(dir, config, &[], command)
    }

    /// Starts the proxy in `dir` as a newcomer does: `config` at the default path
    /// `config/tokenproxy.toml`, found relative to the working folder (no `--config`).
    pub fn start_at_default_path(dir: &Path, config: &str) -> TokenProxy {
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let mut command = Command::new(binary());
        command.current_dir(dir);
        Self::start_command_with(dir, "config/tokenproxy.toml", config, &[], command, false)
    }

    fn start_command(dir: &Path, config: &str, env: &[(&str, &str)], command: Command) -> TokenProxy {
        Self::start_command_with(dir, "tokenproxy.toml", config, env, command, true)
    }

    fn start_command_with(
        dir: &Path,
        name: &str,
        config: &str,
        env: &[(&str, &str)],
        mut command: Command,
        config_flag: bool,
    ) -> TokenProxy {
        let config_path = dir.join(name);
        std::fs::write(&config_path, config).unwrap();
        if running_as_root() && command.get_program() == "setpriv" {
            chown_tree(dir, NOBODY);
        }
        command.args(["--log-format", "json", "run"]);
        if config_flag {
            command.arg("--config").arg(&config_path);
        }
        command
            .env("RUST_LOG", "info,tokenproxy=debug")
            .env_remove("TOKENPROXY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start tokenproxy");
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let routes_expected = config.matches("[[routes]]").count();
        let (mut proxy, mut admin, mut routes) = (None, None, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(20);
        while proxy.is_none() || admin.is_none() || routes.len() < routes_expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "tokenproxy did not report its listeners; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                ),
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["message"] != "listening" {
                continue;
            }
            let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
            match v["listener"].as_str() {
                Some("proxy") => proxy = Some(addr),
                Some("admin") => admin = Some(addr),
                Some("route") => routes.push(addr),
                _ => {}
            }
        }
        TokenProxy {
            child: Some(child),
            dir: dir.to_path_buf(),
            config_path,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
            routes,
            logs,
        }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// A reqwest client that sends everything through this proxy.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.proxy_url()).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    /// [`TokenProxy::client`] trusting the CA it made in `ca/` of its folder (`ca_dir = "ca"`),
    /// for intercepted HTTPS.
    pub fn intercepting_client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.dir.join("ca/ca.pem")).unwrap();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.proxy_url()).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    /// `POST path` on the admin listener (20 s timeout: a refresh may wait for its lock).
    pub async fn admin_post(&self, path: &str) -> (StatusCode, String) {
        let r = reqwest::Client::new()
            .post(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// The `/tokens` object of one provider.
    pub async fn token_view(&self, provider: &str) -> serde_json::Value {
        let (_, body) = self.admin_get("/tokens").await;
        let all: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        all.into_iter().find(|v| v["provider"] == provider).expect("provider on /tokens")
    }

    /// The value of the metric line `name{labels}`, where every `k="v"` in `labels` appears.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        metric_value(&body, name, labels)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status();
        assert!(status.unwrap().success());
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "tokenproxy did not exit within {patience:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TokenProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const NOBODY: u32 = 65534;

/// Whether this process runs as root (which file permissions do not stop).
/// Set in the copy of a test that runs inside a network namespace of its own.
const IN_OWN_NETNS: &str = "TOKENPROXY_TEST_IN_NETNS";

/// Runs `inside` in a network namespace of the test's own (and a mount namespace with `mount`):
/// the test re-runs itself, as test `test`, under `unshare`, as root. Without root, or without
/// the commands `tools` names (a `sh -c` probe), the test skips with a reason, or fails under
/// `TOKENPROXY_REQUIRE_CLIENTS=1`.
pub fn in_own_network_namespace<F: std::future::Future<Output = ()>>(
    test: &str,
    mount: bool,
    tools: &str,
    inside: impl FnOnce() -> F,
) {
    if std::env::var(IN_OWN_NETNS).is_ok() {
        return tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(inside());
    }
    if !running_as_root() {
        if std::env::var("TOKENPROXY_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("{test} needs root for a network namespace (TOKENPROXY_REQUIRE_CLIENTS=1)");
        }
        skip(&format!("{test} needs root for a network namespace"));
        return;
    }
    let probe: Vec<String> = tools.split_whitespace().map(|t| format!("command -v {t}")).collect();
    if !client_available(tools, Command::new("sh").args(["-c", &probe.join(" && ")])) {
        return;
    }
    let namespaces: &[&str] = if mount { &["--net", "--mount", "--"] } else { &["--net", "--"] };
    let out = Command::new("unshare")
        .args(namespaces)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(IN_OWN_NETNS, "1")
        .output()
        .unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && printed.contains("1 passed"), "{printed}");
}

/// A loopback port for a listener that must have a fixed number (a callback URL names it),
/// free now, chosen below the kernel's ephemeral range (32768 and up): a port taken from that
/// range and released is soon handed to another test's connection or `:0` listener, which on a
/// busy machine then holds it when the proxy binds (seen under load: "address already in use").
pub fn fixed_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

fn chown_tree(path: &Path, uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}

/// Finds `name{...}` with all `labels` in Prometheus text and returns its value (0 if absent).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A token file in JSON with the given access token, expiring far in the future.
pub fn token_json(token: &str) -> String {
    serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_at": "2099-01-01T00:00:00Z",
        "updated_at": "2026-11-22T00:00:00Z",
    })
    .to_string()
}

/// A TOML basic string for a path.
pub fn toml_path(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap()
}

/// A fresh temporary folder, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Writes `token` to `dir/api.json` and starts a proxy on [`MockApi::plain_config`] for `mock`.
pub fn proxy_with_token(dir: &Path, mock: &MockApi, token: &str, extra_proxy: &str) -> TokenProxy {
    let token_file = dir.join("api.json");
    std::fs::write(&token_file, token_json(token)).unwrap();
    TokenProxy::start(dir, &mock.plain_config(&token_file, extra_proxy))
}

/// Reads an HTTP response head byte by byte (so that nothing after it is consumed), bounded.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
        match read {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => panic!("the connection ended inside a response head: {}", String::from_utf8_lossy(&head)),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

/// Whether an external client can be used. Without it the test prints why and skips, unless
/// `TOKENPROXY_REQUIRE_CLIENTS=1`, when its absence fails the test.
pub fn client_available(name: &str, probe: &mut Command) -> bool {
    let ok = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("TOKENPROXY_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("{name} is required (TOKENPROXY_REQUIRE_CLIENTS=1) but not usable here");
        }
        skip(&format!(
            "{name} is not usable on this machine; set TOKENPROXY_REQUIRE_CLIENTS=1 to fail instead"
        ));
    }
    ok
}

/// Starts `python3 tests/SCRIPT ARGS...` (killed when dropped) and returns it with the first
/// line it prints: how each helper script says where it listens.
pub async fn start_python_helper(script: &str, args: &[&std::ffi::OsStr]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script))
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await;
    let line = first
        .unwrap_or_else(|_| panic!("{script} started"))
        .unwrap()
        .unwrap_or_else(|| panic!("{script} printed a line"));
    (child, line)
}

/// Says that a test skips, in `cargo test`'s normal output: the harness captures what `eprintln!`
/// prints (shown only with `--nocapture`), but not a write to the process's standard error.
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIP: {why}");
}

pub fn curl_available() -> bool {
    client_available("curl", Command::new("curl").arg("--version"))
}

pub fn python_requests_available() -> bool {
    client_available("python3 with requests", Command::new("python3").args(["-c", "import requests"]))
}

/// Runs curl with `args`, with proxy variables from the environment removed so that only `-x`
/// counts, and `--fail-with-body` so that an HTTP error status is a failure. Async, so that the
/// in-process mocks keep running while it waits. Returns (success, stdout + stderr).
pub async fn curl(args: &[&str]) -> (bool, String) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--fail-with-body", "--max-time", "20"]).args(args);
    for var in PROXY_VARIABLES {
        command.env_remove(var);
    }
    let out = command.output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const PROXY_VARIABLES: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// Runs a Python snippet with `requests` imported; `env` is added to an environment cleaned of
/// proxy variables. Returns (success, stdout, stderr).
pub async fn python(script: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = tokio::process::Command::new("python3");
    command.args(["-c", &format!("import requests, sys\n{script}")]);
    for var in PROXY_VARIABLES {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Mock token endpoint
// ---------------------------------------------------------------------------------------------

/// How the mock insists clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    Basic,
    Post,
    None,
}

#[derive(Default)]
struct TokenState {
    calls: usize,
    /// Requests received, counted before `hold` keeps them waiting.
    arrivals: usize,
    invalid_grants: usize,
    issued: usize,
    /// Refresh tokens that work.
    valid_refresh: std::collections::HashSet<String>,
    /// Scripted answers, used before normal behaviour: (status, JSON body).
    script: std::collections::VecDeque<(u16, String)>,
    forms: Vec<std::collections::HashMap<String, String>>,
    /// Authorization codes not yet exchanged.
    codes: std::collections::HashMap<String, IssuedCode>,
    /// The query of every authorization request.
    authorize_requests: Vec<std::collections::HashMap<String, String>>,
    /// How the person answers the consent screen.
    consent: Consent,
    /// The device flow's answers to each poll, in order; then "approve".
    device_answers: std::collections::VecDeque<&'static str>,
    /// When each device poll arrived.
    device_polls: Vec<Instant>,
}

/// A code the mock's authorization endpoint issued, with what its exchange must present.
#[derive(Clone)]
struct IssuedCode {
    redirect_uri: String,
    challenge: Option<String>,
}

/// What the mock's consent screen does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consent {
    /// Redirects straight back with a code.
    #[default]
    Allow,
    /// Redirects back with `error=access_denied`.
    Deny,
    /// Shows a page with "Allow" and "Deny" buttons (a real browser clicks one).
    Page,
}

/// A token endpoint on 127.0.0.1 that issues `at-N` / `rt-N` tokens and registers each access
/// token with the mock API it serves.
#[derive(Clone)]
pub struct MockTokenEndpoint {
    pub addr: SocketAddr,
    state: Arc<Mutex<TokenState>>,
    pub client_id: String,
    pub client_secret: String,
    pub auth: AuthStyle,
    /// Issue a new refresh token with each refresh; the presented one stops working (`strict`) or
    /// keeps working until the new one is used (`grace`, as providers with a reuse interval do).
    pub rotate: Rotation,
    pub expires_in: Option<u64>,
    /// A JSON pointer-like wrapping: `Some("body")` answers `{"status":0,"body":{…}}`.
    pub wrap: Option<&'static str>,
    /// Form fields that must be present.
    pub required: Vec<(&'static str, &'static str)>,
    pub delay: Duration,
    /// Hold every answer until [`MockTokenEndpoint::release`] (at most 10 s): a refresh that is
    /// certainly still in flight, whatever the machine's load.
    pub hold: bool,
    gate: Arc<Notify>,
    api: Option<MockApi>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    None,
    Strict,
    Grace,
}

impl MockTokenEndpoint {
    pub fn new(api: Option<&MockApi>) -> MockTokenEndpoint {
        MockTokenEndpoint {
            addr: "127.0.0.1:0".parse().unwrap(),
            state: Arc::default(),
            client_id: "client-abc".into(),
            client_secret: "cs-very-secret-client-secret".into(),
            auth: AuthStyle::Basic,
            rotate: Rotation::None,
            expires_in: Some(3600),
            wrap: None,
            required: Vec::new(),
            delay: Duration::ZERO,
            hold: false,
            gate: Arc::new(Notify::new()),
            api: api.cloned(),
        }
    }

    pub async fn start(mut self) -> MockTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let served = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let endpoint = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let endpoint = endpoint.clone();
                        async move { Ok::<_, Infallible>(endpoint.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self
    }

    pub fn url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// Lets held answers go (see `hold`).
    pub fn release(&self) {
        self.gate.notify_waiters();
        self.gate.notify_one();
    }

    /// Makes `token` a working refresh token.
    pub fn allow_refresh_token(&self, token: &str) {
        self.state.lock().unwrap().valid_refresh.insert(token.to_string());
    }

    pub fn refresh_token_works(&self, token: &str) -> bool {
        self.state.lock().unwrap().valid_refresh.contains(token)
    }

    /// The next answers, before normal behaviour resumes (a `429` carries `Retry-After: 30`).
    pub fn script(&self, answers: &[(u16, &str)]) {
        let mut state = self.state.lock().unwrap();
        state.script.extend(answers.iter().map(|(s, b)| (*s, b.to_string())));
    }

    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().calls
    }

    /// Requests received so far, including any that `hold` keeps unanswered.
    pub fn arrivals(&self) -> usize {
        self.state.lock().unwrap().arrivals
    }

    pub fn invalid_grants(&self) -> usize {
        self.state.lock().unwrap().invalid_grants
    }

    pub fn last_form(&self) -> std::collections::HashMap<String, String> {
        self.state.lock().unwrap().forms.last().cloned().unwrap_or_default()
    }

    /// The `[providers.NAME.oauth]` TOML for this endpoint.
    pub fn oauth_toml(&self, provider: &str, grant: &str) -> String {
        let auth = match self.auth {
            AuthStyle::Basic => "basic",
            AuthStyle::Post => "post",
            AuthStyle::None => "none",
        };
        let secret = match self.auth {
            AuthStyle::None => String::new(),
            _ => format!("client_secret = \"{}\"\n", self.client_secret),
        };
        format!(
            "[providers.{provider}.oauth]\ntoken_url = \"{}\"\ngrant = \"{grant}\"\nclient_id = \"{}\"\n{secret}client_auth = \"{auth}\"\n",
            self.url(),
            self.client_id
        )
    }

    /// The authorization endpoint's URL.
    pub fn authorize_url(&self) -> String {
        format!("http://{}/oauth/authorize", self.addr)
    }

    /// The device authorization endpoint's URL.
    pub fn device_url(&self) -> String {
        format!("http://{}/oauth/device", self.addr)
    }

    pub fn set_consent(&self, consent: Consent) {
        self.state.lock().unwrap().consent = consent;
    }

    /// The next device polls' answers: "pending", "slow_down", "deny", "expired" (then "approve").
    pub fn device_answers(&self, answers: &[&'static str]) {
        self.state.lock().unwrap().device_answers.extend(answers.iter().copied());
    }

    pub fn device_polls(&self) -> Vec<Instant> {
        self.state.lock().unwrap().device_polls.clone()
    }

    /// The query parameters of every authorization request so far.
    pub fn authorize_requests(&self) -> Vec<std::collections::HashMap<String, String>> {
        self.state.lock().unwrap().authorize_requests.clone()
    }

    /// The forms of every token request so far.
    pub fn forms(&self) -> Vec<std::collections::HashMap<String, String>> {
        self.state.lock().unwrap().forms.clone()
    }

    /// `GET /oauth/authorize`: checks the client and the redirect URI, then answers as the
    /// consent setting says; `GET /oauth/authorize/decide?…&allow=1` is the consent page's button.
    fn authorize(&self, path: &str, query: &str) -> Response<Body> {
        let q = parse_form(query);
        let mut state = self.state.lock().unwrap();
        if path == "/oauth/authorize" {
            state.authorize_requests.push(q.clone());
        }
        if q.get("client_id") != Some(&self.client_id)
            || q.get("response_type").map(String::as_str) != Some("code")
        {
            return respond(StatusCode::BAD_REQUEST, "unknown client or response_type".into());
        }
        let Some(redirect) = q.get("redirect_uri").cloned() else {
            return respond(StatusCode::BAD_REQUEST, "no redirect_uri".into());
        };
        let consent = match (path, q.get("allow").map(String::as_str)) {
            ("/oauth/authorize/decide", Some("1")) => Consent::Allow,
            ("/oauth/authorize/decide", _) => Consent::Deny,
            _ => state.consent,
        };
        let back = |extra: String| {
            let mut r = respond(StatusCode::FOUND, String::new());
            let state_param =
                q.get("state").map(|s| format!("&state={}", encode_component(s))).unwrap_or_default();
            r.headers_mut().insert("location", format!("{redirect}?{extra}{state_param}").parse().unwrap());
            r
        };
        match consent {
            Consent::Deny => back("error=access_denied&error_description=The+user+denied+access".into()),
            Consent::Allow => {
                state.issued += 1;
                let code = format!("code-{}", state.issued);
                let challenge = match q.get("code_challenge_method").map(String::as_str) {
                    Some("S256") => q.get("code_challenge").cloned(),
                    _ => None,
                };
                state.codes.insert(code.clone(), IssuedCode { redirect_uri: redirect.clone(), challenge });
                back(format!("code={code}"))
            }
            Consent::Page => {
                let mut r = respond(
                    StatusCode::OK,
                    format!(
                        "<!doctype html><title>Mock consent</title><h1>Allow tokenproxy-test to act for you?</h1>\
                         <a id=\"allow\" href=\"/oauth/authorize/decide?{query}&allow=1\">Allow</a> \
                         <a id=\"deny\" href=\"/oauth/authorize/decide?{query}&allow=0\">Deny</a>"
                    ),
                );
                r.headers_mut().insert("content-type", "text/html".parse().unwrap());
                r
            }
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path.starts_with("/oauth/authorize") {
            return self.authorize(&path, req.uri().query().unwrap_or(""));
        }
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let form = parse_form(&String::from_utf8_lossy(&body));
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.state.lock().unwrap().arrivals += 1;
        if self.hold {
            let _ = tokio::time::timeout(Duration::from_secs(10), self.gate.notified()).await;
        }
        let json = |status: u16, body: String| {
            let mut r = respond(StatusCode::from_u16(status).unwrap(), body);
            r.headers_mut().insert("content-type", "application/json".parse().unwrap());
            r
        };
        let mut state = self.state.lock().unwrap();
        state.calls += 1;
        state.forms.push(form.clone());
        if let Some((status, body)) = state.script.pop_front() {
            if body.contains("invalid_grant") {
                state.invalid_grants += 1;
            }
            let mut answer = json(status, body);
            if status == 429 {
                // A rate limiter says when to come back.
                answer.headers_mut().insert("retry-after", "30".parse().unwrap());
            }
            return answer;
        }
        // Client authentication, exactly the configured style.
        let basic = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "));
        let expected_basic = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.client_id, self.client_secret))
        };
        let authenticated = match self.auth {
            AuthStyle::Basic => basic == Some(expected_basic.as_str()) && !form.contains_key("client_secret"),
            AuthStyle::Post => {
                basic.is_none()
                    && form.get("client_id") == Some(&self.client_id)
                    && form.get("client_secret") == Some(&self.client_secret)
            }
            AuthStyle::None => {
                basic.is_none()
                    && form.get("client_id") == Some(&self.client_id)
                    && !form.contains_key("client_secret")
            }
        };
        if !authenticated {
            return json(401, r#"{"error":"invalid_client"}"#.into());
        }
        for (k, v) in &self.required {
            if form.get(*k).map(String::as_str) != Some(*v) {
                return json(
                    400,
                    format!(r#"{{"error":"invalid_request","error_description":"missing {k}"}}"#),
                );
            }
        }
        let mut new_refresh = None;
        if path == "/oauth/device" {
            state.issued += 1;
            let body = serde_json::json!({
                "device_code": format!("dc-{}", state.issued),
                "user_code": "WDJB-MJHT",
                "verification_uri": format!("http://{}/device", self.addr),
                "verification_uri_complete": format!("http://{}/device?user_code=WDJB-MJHT", self.addr),
                "expires_in": 30,
                "interval": 1,
            });
            return json(200, body.to_string());
        }
        match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => {
                let code = form.get("code").cloned().unwrap_or_default();
                let Some(issued) = state.codes.remove(&code) else {
                    return json(
                        400,
                        r#"{"error":"invalid_grant","error_description":"unknown or used code"}"#.into(),
                    );
                };
                if form.get("redirect_uri") != Some(&issued.redirect_uri) {
                    return json(
                        400,
                        r#"{"error":"invalid_grant","error_description":"redirect_uri mismatch"}"#.into(),
                    );
                }
                let verified = match (&issued.challenge, form.get("code_verifier")) {
                    (Some(challenge), Some(verifier)) => {
                        use base64::Engine;
                        use sha2::Digest;
                        let digest = sha2::Sha256::digest(verifier.as_bytes());
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == challenge
                    }
                    (None, None) => true,
                    _ => false,
                };
                if !verified {
                    return json(
                        400,
                        r#"{"error":"invalid_grant","error_description":"PKCE verification failed"}"#.into(),
                    );
                }
                let next = format!("rt-{}", state.issued + 1);
                state.valid_refresh.insert(next.clone());
                new_refresh = Some(next);
            }
            Some("urn:ietf:params:oauth:grant-type:device_code") => {
                state.device_polls.push(Instant::now());
                match state.device_answers.pop_front().unwrap_or("approve") {
                    "pending" => return json(400, r#"{"error":"authorization_pending"}"#.into()),
                    "slow_down" => return json(400, r#"{"error":"slow_down"}"#.into()),
                    "deny" => return json(400, r#"{"error":"access_denied"}"#.into()),
                    "expired" => return json(400, r#"{"error":"expired_token"}"#.into()),
                    _ => {}
                }
                let next = format!("rt-{}", state.issued + 1);
                state.valid_refresh.insert(next.clone());
                new_refresh = Some(next);
            }
            Some("refresh_token") => {
                let presented = form.get("refresh_token").cloned().unwrap_or_default();
                if !state.valid_refresh.contains(&presented) {
                    state.invalid_grants += 1;
                    return json(
                        400,
                        r#"{"error":"invalid_grant","error_description":"refresh token is not valid"}"#
                            .into(),
                    );
                }
                if self.rotate != Rotation::None {
                    let n = state.issued + 1;
                    let next = format!("rt-{n}");
                    state.valid_refresh.insert(next.clone());
                    // Strict: the presented token is spent. Grace: tokens older than the
                    // presented one are spent, the presented one works until its successor is used.
                    if self.rotate == Rotation::Strict {
                        state.valid_refresh.remove(&presented);
                    } else {
                        let older: Vec<String> = state
                            .valid_refresh
                            .iter()
                            .filter(|t| {
                                *t != &presented && *t != &next && rt_number(t) < rt_number(&presented)
                            })
                            .cloned()
                            .collect();
                        for t in older {
                            state.valid_refresh.remove(&t);
                        }
                    }
                    new_refresh = Some(next);
                }
            }
            Some("client_credentials") => {}
            _ => return json(400, r#"{"error":"unsupported_grant_type"}"#.into()),
        }
        state.issued += 1;
        let access = format!("at-{}", state.issued);
        drop(state);
        if let Some(api) = &self.api {
            api.accept(&access);
        }
        let mut token = serde_json::json!({"access_token": access, "token_type": "Bearer"});
        if let Some(e) = self.expires_in {
            token["expires_in"] = e.into();
        }
        if let Some(r) = new_refresh {
            token["refresh_token"] = r.into();
        }
        let body = match self.wrap {
            Some(key) => serde_json::json!({"status": 0, key: token}),
            None => token,
        };
        json(200, body.to_string())
    }
}

/// Percent-encodes a query component.
pub fn encode_component(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn rt_number(token: &str) -> i64 {
    token.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(-1)
}

fn parse_form(body: &str) -> std::collections::HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(b)) => {
                    out.push(b);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A browser for the onboarding flow
// ---------------------------------------------------------------------------------------------

/// A browser stand-in: follows no redirects by itself and keeps the one cookie it is given.
pub struct Browser {
    http: reqwest::Client,
    pub cookie: Option<String>,
}

impl Browser {
    pub fn new() -> Browser {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            // A fresh connection each time: the restart test's proxy goes away between requests.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        Browser { http, cookie: None }
    }

    pub async fn get(&mut self, url: &str) -> reqwest::Response {
        let mut request = self.http.get(url);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        if let Some(set) = response.headers().get("set-cookie") {
            let set = set.to_str().unwrap().to_string();
            self.cookie = Some(set.split(';').next().unwrap().to_string());
        }
        response
    }

    /// Opens `/connect/...` and the provider's consent: the callback URL the provider sends the
    /// browser to.
    pub async fn consent(&mut self, start_url: &str) -> String {
        let start = self.get(start_url).await;
        assert_eq!(start.status(), StatusCode::FOUND, "{start_url}");
        let authorize = location(&start);
        let consent = self.get(&authorize).await;
        assert_eq!(consent.status(), StatusCode::FOUND, "the mock's consent redirects back");
        location(&consent)
    }

    /// Opens the callback: status, result header, page.
    pub async fn finish(&mut self, callback: &str) -> (StatusCode, String, String) {
        let response = self.get(callback).await;
        let status = response.status();
        let result = response
            .headers()
            .get("x-tokenproxy-authorization")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, result, response.text().await.unwrap())
    }
}

pub fn location(response: &reqwest::Response) -> String {
    response.headers().get("location").expect("a Location").to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// A real Redis on loopback, for the shared store
// ---------------------------------------------------------------------------------------------

/// `redis-server` on a free loopback port, appending to a file in `dir` so that a restart keeps
/// its data; stopped when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

pub fn redis_available() -> bool {
    client_available(
        "redis-server and redis-cli",
        Command::new("sh").args(["-c", "redis-server --version && redis-cli --version"]),
    )
}

impl RedisServer {
    pub fn start(dir: &Path) -> RedisServer {
        Self::start_with(dir, &[])
    }

    /// With extra `redis-server` arguments (e.g. `--requirepass`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> RedisServer {
        let port = fixed_port();
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut server = RedisServer { child: None, port, dir: dir.to_path_buf(), extra };
        server.restart();
        server
    }

    /// Starts it (again) on the same port with the same data.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        // A server that wants a password answers -NOAUTH: it is up all the same.
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && (&answer == b"+PONG\r\n" || answer.starts_with(b"-NOAUTH"))
    }

    /// Stops it (SIGKILL: as abruptly as a crash or a partition).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it and deletes its data: it comes back empty.
    pub fn stop_and_wipe(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }

    /// From its next start on, a replica of the node on `primary` (as a node whose config the
    /// sentinels rewrote would start).
    pub fn replicate(&mut self, primary: u16) {
        if let Some(at) = self.extra.iter().position(|a| a == "--replicaof") {
            self.extra.drain(at..at + 3);
        }
        self.extra.extend(["--replicaof".into(), "127.0.0.1".into(), primary.to_string()]);
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a node that freezes and comes back.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// Every value Redis holds, as `redis-cli --scan` plus a read of each key would show it.
    pub fn dump(&self) -> String {
        let keys = Command::new("redis-cli").args(["-p", &self.port.to_string(), "--scan"]).output().unwrap();
        let mut out = String::new();
        for key in String::from_utf8_lossy(&keys.stdout).lines() {
            let value = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "--no-raw", "HGETALL", key])
                .output()
                .unwrap();
            out += &format!("{key}: {}\n", String::from_utf8_lossy(&value.stdout));
            let plain =
                Command::new("redis-cli").args(["-p", &self.port.to_string(), "GET", key]).output().unwrap();
            out += &String::from_utf8_lossy(&plain.stdout);
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A frozen process does not die of SIGKILL until it runs again: thaw it first.
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        self.stop();
    }
}

/// A primary, its replicas and three `redis-server --sentinel` processes (quorum 2) that
/// monitor it as `tp`, each in its own folder under `dir`, all on loopback.
pub struct SentinelSetup {
    /// The data nodes: [0] is the first primary.
    pub nodes: Vec<RedisServer>,
    pub sentinels: Vec<(Child, u16)>,
    /// With TLS: each node's TLS port (what the sentinels monitor and name), and each
    /// sentinel's; the plain ports stay open for the test's own `redis-cli`.
    tls_ports: Vec<u16>,
    sentinel_tls_ports: Vec<u16>,
}

/// A CA and a server certificate for `127.0.0.1` and `localhost` (sentinels name nodes by IP),
/// as files for `redis-server --tls-*`.
pub struct RedisTls {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl RedisTls {
    pub fn generate(dir: &Path) -> RedisTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Names of their own: OpenSSL (Redis replication, sentinels) takes a certificate whose
        // issuer is its own subject for a self-signed one.
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tokenproxy test Redis CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let mut leaf_params = CertificateParams::new(names).unwrap();
        leaf_params.distinguished_name.push(rcgen::DnType::CommonName, "redis");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let tls = RedisTls {
            ca: dir.join("redis-ca.pem"),
            cert: dir.join("redis.pem"),
            key: dir.join("redis-key.pem"),
        };
        std::fs::write(&tls.ca, ca.pem()).unwrap();
        std::fs::write(&tls.cert, leaf.pem()).unwrap();
        std::fs::write(&tls.key, leaf_key.serialize_pem()).unwrap();
        tls
    }

    /// `redis-server` arguments for TLS on `port`, replication over TLS included.
    pub fn args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--tls-port".into(), port.to_string()].into();
        for (flag, path) in
            [("--tls-cert-file", &self.cert), ("--tls-key-file", &self.key), ("--tls-ca-cert-file", &self.ca)]
        {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        args.extend(["--tls-auth-clients", "no", "--tls-replication", "yes"].map(String::from));
        args
    }
}

pub const MASTER_NAME: &str = "tp";
/// The data nodes' password (`requirepass`, and `masterauth` for replication).
pub const NODE_PASSWORD: &str = "node-pw-5d1c";
/// The sentinels' own password, another one.
pub const SENTINEL_PASSWORD: &str = "sentinel-pw-77ae";

impl SentinelSetup {
    /// `down_after`: how long a node may not answer before the sentinels fail it over.
    pub fn start(dir: &Path, replicas: usize, down_after: Duration) -> SentinelSetup {
        Self::start_with(dir, replicas, down_after, None)
    }

    /// Nodes and sentinels that speak TLS to each other and to tokenproxy.
    pub fn start_tls(dir: &Path, replicas: usize, down_after: Duration, tls: &RedisTls) -> SentinelSetup {
        Self::start_with(dir, replicas, down_after, Some(tls))
    }

    fn start_with(
        dir: &Path,
        replicas: usize,
        down_after: Duration,
        tls: Option<&RedisTls>,
    ) -> SentinelSetup {
        let mkdir = |name: String| {
            let path = dir.join(name);
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let tls_ports: Vec<u16> = match tls {
            Some(_) => (0..=replicas).map(|_| fixed_port()).collect(),
            None => Vec::new(),
        };
        let node_args = |i: usize| {
            let mut args: Vec<String> =
                ["--requirepass", NODE_PASSWORD, "--masterauth", NODE_PASSWORD].map(String::from).into();
            if let Some(tls) = tls {
                args.extend(tls.args(tls_ports[i]));
            }
            args
        };
        let primary = RedisServer::start_with(&mkdir("node-0".into()), &as_args(&node_args(0)));
        // What replicas replicate from and the sentinels monitor: the TLS port with TLS.
        let replica_of = tls_ports.first().copied().unwrap_or(primary.port).to_string();
        let mut nodes = vec![primary];
        for i in 1..=replicas {
            let args =
                [node_args(i), ["--replicaof", "127.0.0.1", &replica_of].map(String::from).into()].concat();
            nodes.push(RedisServer::start_with(&mkdir(format!("node-{i}")), &as_args(&args)));
        }
        let mut sentinels = Vec::new();
        let mut sentinel_tls_ports = Vec::new();
        for i in 0..3 {
            let folder = mkdir(format!("sentinel-{i}"));
            let port = fixed_port();
            let conf = folder.join("sentinel.conf");
            let tls_lines = match tls {
                Some(tls) => {
                    let tls_port = fixed_port();
                    sentinel_tls_ports.push(tls_port);
                    format!(
                        "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                         tls-auth-clients no\ntls-replication yes\n",
                        tls.cert.display(),
                        tls.key.display(),
                        tls.ca.display()
                    )
                }
                None => String::new(),
            };
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nrequirepass {SENTINEL_PASSWORD}\n{tls_lines}\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {replica_of} 2\n\
                     sentinel auth-pass {MASTER_NAME} {NODE_PASSWORD}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} {}\n\
                     sentinel failover-timeout {MASTER_NAME} 4000\n\
                     sentinel parallel-syncs {MASTER_NAME} 2\n",
                    folder.display(),
                    down_after.as_millis()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            sentinels.push((child, port));
        }
        let setup = SentinelSetup { nodes, sentinels, tls_ports, sentinel_tls_ports };
        // Ready: every sentinel names the primary and has seen every replica.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = setup.sentinels.iter().all(|(_, port)| {
                setup.primary_by(*port) == Some(setup.nodes[0].port)
                    && sentinel_cli(*port, &["sentinel", "replicas", MASTER_NAME]).matches("name").count()
                        >= replicas
            });
            if ready {
                return setup;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not see the primary and its replicas in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sentinels = [...]` for a config.
    pub fn toml_list(&self) -> String {
        let ports: Vec<u16> = match self.sentinel_tls_ports.is_empty() {
            true => self.sentinels.iter().map(|(_, port)| *port).collect(),
            false => self.sentinel_tls_ports.clone(),
        };
        let list: Vec<String> = ports.iter().map(|port| format!("\"127.0.0.1:{port}\"")).collect();
        format!("[{}]", list.join(", "))
    }

    /// The primary's port as the sentinel on `port` names it.
    pub fn primary_by(&self, port: u16) -> Option<u16> {
        let answer = sentinel_cli(port, &["sentinel", "get-master-addr-by-name", MASTER_NAME]);
        let named: u16 = answer.lines().nth(1)?.trim().parse().ok()?;
        // With TLS the sentinels name the TLS port: the node's (plain) port for the test.
        Some(match self.tls_ports.iter().position(|p| *p == named) {
            Some(i) => self.nodes[i].port,
            None => named,
        })
    }

    /// The primary's port, once a majority of sentinels agree on it.
    pub fn primary(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self.sentinels.iter().map(|(_, port)| self.primary_by(*port)).collect();
        named.iter().flatten().find(|p| named.iter().filter(|q| q == &&Some(**p)).count() >= 2).copied()
    }

    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of the setup")
    }

    /// The keys the node on `port` holds.
    pub fn keys(&self, port: u16) -> String {
        cli(port, NODE_PASSWORD, &["--scan"])
    }

    /// Waits until `count` replicas replicate from the node on `primary` (state online).
    pub fn wait_replicas(&self, primary: u16, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let info = cli(primary, NODE_PASSWORD, &["info", "replication"]);
            if info.matches("state=online").count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{primary} has not {count} replicas online within {within:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the sentinels name a primary other than `old`; returns it.
    pub fn wait_for_failover(&self, old: u16, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(primary) = self.primary().filter(|p| *p != old) {
                return primary;
            }
            assert!(Instant::now() < deadline, "no failover away from {old} within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sentinel_cli(port: u16, args: &[&str]) -> String {
    cli(port, SENTINEL_PASSWORD, args)
}

fn cli(port: u16, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--no-auth-warning", "-a", password])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `&str`s for `RedisServer::start_with`.
pub fn as_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for (child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A config with one provider `api` for the upstream at `authority` (`127.0.0.1:PORT`) over
/// plain HTTP, both listeners on ephemeral loopback ports; `extra_proxy` is added to `[proxy]`.
pub fn plain_config(authority: &str, token_file: &Path, extra_proxy: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
{extra_proxy}
[admin]
listen = "127.0.0.1:0"
[providers.api]
hosts = ["{}"]
token_file = {}
allow_plaintext = true
"#,
        authority,
        toml_path(token_file)
    )
}
