//! Callers (SPEC §13): who is asking (proxy credentials, the socket's owner, a JWT), which
//! credential each may use (per-caller rules), revocation without a restart, and an audit line for
//! every decision — with real clients over real sockets: curl and Python `requests` over plain
//! HTTP and intercepted HTTPS, clients running as other uids, JWTs minted by PyJWT with a key of
//! the test's own.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BILLING_SECRET: &str = "s3cr3t-billing-Qx81";
const REPORTS_SECRET: &str = "s3cr3t-reports-Lm27";

fn token_of(account: &str) -> String {
    format!("tok-api-{account}")
}

/// A plain-HTTP mock for the multi-account provider `api` (accounts `billing`, `shop-eu`,
/// `alice`, `agent-a`, `agent-b`), an HTTPS mock for the single-account provider `secure`
/// (intercepted), a route to `api`, `[egress] allow_unmatched`, an audit file, and `callers`.
struct Setup {
    dir: tempfile::TempDir,
    mock: MockApi,
    tls_mock: MockApi,
    tp: TokenProxy,
    ca_pem: PathBuf,
}

impl Setup {
    async fn start(callers: &str) -> Setup {
        let dir = tempdir();
        let mock = MockApi::start().await;
        let pki = test_pki(dir.path(), "mock", &["localhost"]);
        let tls_mock = MockApi::start_tls(pki.server_config.clone()).await;
        let folder = dir.path().join("tokens/api");
        std::fs::create_dir_all(&folder).unwrap();
        for account in ["billing", "shop-eu", "alice", "agent-a", "agent-b", "reports"] {
            std::fs::write(folder.join(format!("{account}.json")), token_json(&token_of(account))).unwrap();
        }
        std::fs::write(dir.path().join("secure.json"), token_json("tok-secure")).unwrap();
        write_secret(dir.path(), "billing.secret", BILLING_SECRET);
        write_secret(dir.path(), "reports.secret", REPORTS_SECRET);
        let config = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
access_log = true
[admin]
listen = "127.0.0.1:0"
[tls]
ca_dir = "ca"
extra_roots = [{roots}]
[egress]
allow_unmatched = true
[audit]
file = "audit.jsonl"
[providers.api]
hosts = ["{plain}"]
token_file = "tokens/api/{{account}}.json"
allow_plaintext = true
[providers.secure]
hosts = ["localhost:{tls_port}"]
token_file = "secure.json"
[[routes]]
listen = "127.0.0.1:0"
provider = "api"
upstream = "http://{plain}"
{callers}
"#,
            roots = toml_path(&pki.ca_pem_path),
            plain = mock.authority(),
            tls_port = tls_mock.addr.port(),
        );
        let tp = TokenProxy::start(dir.path(), &config);
        let ca_pem = dir.path().join("ca/ca.pem");
        Setup { dir, mock, tls_mock, tp, ca_pem }
    }

    fn proxy_as(&self, user: &str, secret: &str) -> String {
        format!("http://{user}:{secret}@{}", self.tp.proxy)
    }

    fn url(&self, path: &str) -> String {
        self.mock.url(path)
    }

    fn tls_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls_mock.addr.port())
    }

    /// Every audit line written so far, once at least `count` are there.
    async fn audit_lines(&self, count: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("audit.jsonl");
        eventually(Duration::from_secs(10), &format!("{count} audit lines"), || async {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<serde_json::Value> =
                text.lines().map(|l| serde_json::from_str(l).expect("an audit line is JSON")).collect();
            (lines.len() >= count).then_some(lines)
        })
        .await
    }

    fn config_path(&self) -> PathBuf {
        self.tp.config_path.clone()
    }
}

fn write_secret(dir: &Path, name: &str, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Two callers with secrets: `billing` may GET `/v1/charges*` and `/whoami` as itself or a
/// `shop-*` account (its own by default) and use `secure`; `reports` may only GET `/whoami` as
/// `reports`, and may not reach hosts that match no provider.
const TWO_SECRET_CALLERS: &str = r#"
[callers.billing]
secret_file = "billing.secret"
[[callers.billing.allow]]
provider = "api"
accounts = ["{caller}", "shop-*"]
default_account = "{caller}"
methods = ["GET"]
paths = ["/v1/charges*", "/whoami"]
[[callers.billing.allow]]
provider = "secure"

[callers.reports]
secret_file = "reports.secret"
egress = false
[[callers.reports.allow]]
provider = "api"
accounts = ["reports"]
default_account = "reports"
methods = ["GET"]
paths = ["/whoami"]
"#;

/// A response as a raw client reads it: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Reads one response with a `Content-Length` body.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Answer {
    let head = read_head(stream).await;
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body)).await.unwrap().unwrap();
    Answer { status, head, body: String::from_utf8_lossy(&body).into_owned() }
}

fn basic(user: &str, secret: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
}

/// One request on a new connection to `addr`, written as given (`{crlf}`-free lines joined).
async fn raw(addr: SocketAddr, lines: &[&str]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{}\r\nConnection: close\r\n\r\n", lines.join("\r\n"));
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(&mut stream).await
}

/// A TLS connection to the intercepted `host:port` through a CONNECT carrying `credentials`.
async fn tunnel(
    proxy: SocketAddr,
    port: u16,
    credentials: &str,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let connect = format!(
        "CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: {credentials}\r\n\r\n"
    );
    stream.write_all(connect.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost".to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap()
}

async fn get_in_tunnel<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    port: u16,
    path: &str,
) -> Answer {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

/// curl through the proxy as given by `proxy` (which may hold credentials); returns the status
/// and the body (curl's own `-w` prints the status last).
async fn curl_status(proxy: &str, extra: &[&str], url: &str) -> (u16, String) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--max-time", "20", "-x", proxy, "-w", "\n%{http_code}"]).args(extra).arg(url);
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        command.env_remove(var);
    }
    let out = command.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_name_the_caller_for_curl_and_python_over_http_and_intercepted_https() {
    if !curl_available() || !python_requests_available() {
        return;
    }
    let s = Setup::start(TWO_SECRET_CALLERS).await;
    let billing = s.proxy_as("billing", BILLING_SECRET);

    // curl, plain HTTP: the caller's own account by default, a shop account when named.
    let (status, body) = curl_status(&billing, &[], &s.url("/whoami")).await;
    assert_eq!((status, body.as_str()), (200, format!("Bearer {}", token_of("billing")).as_str()));
    let (status, body) =
        curl_status(&billing, &["-H", "Tokenproxy-Account: shop-eu"], &s.url("/whoami")).await;
    assert_eq!((status, body.as_str()), (200, format!("Bearer {}", token_of("shop-eu")).as_str()));
    // curl, intercepted HTTPS, the credentials on the CONNECT.
    let ca = s.ca_pem.to_str().unwrap();
    let (status, body) = curl_status(&billing, &["--cacert", ca], &s.tls_url("/whoami")).await;
    assert_eq!((status, body.as_str()), (200, "Bearer tok-secure"));

    // Python requests, both schemes, the caller's credentials in the proxy URL.
    let reports = s.proxy_as("reports", REPORTS_SECRET);
    let script = format!(
        "r = requests.get('{}', timeout=20)\nprint(r.status_code, r.text)\n\
         r = requests.get('{}', timeout=20, verify='{ca}')\nprint(r.status_code, r.text)\n",
        s.url("/whoami"),
        s.tls_url("/whoami"),
    );
    let env = [("HTTP_PROXY", billing.as_str()), ("HTTPS_PROXY", billing.as_str())];
    let (ok, out, err) = python(&script, &env).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("200 Bearer {}\n200 Bearer tok-secure\n", token_of("billing")));
    let env = [("HTTP_PROXY", reports.as_str()), ("HTTPS_PROXY", reports.as_str())];
    let (ok, out, err) = python(&script, &env).await;
    assert!(ok, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(format!("200 Bearer {}", token_of("reports")).as_str()));
    // reports has no rule for `secure`: its tunnel is admitted, its request refused.
    let refused = lines.next().unwrap();
    assert!(refused.starts_with("403 ") && refused.contains("no_rule_for_provider"), "{refused}");

    let before = s.mock.seen().len() + s.tls_mock.seen().len();
    // No credentials, a wrong secret, an unknown name, another caller's secret: 407, on a plain
    // request and on a CONNECT, and nothing reaches a provider.
    for proxy in [
        format!("http://{}", s.tp.proxy),
        s.proxy_as("billing", "wrong-secret-000"),
        s.proxy_as("nobody", BILLING_SECRET),
        s.proxy_as("billing", REPORTS_SECRET),
    ] {
        let (status, body) = curl_status(&proxy, &[], &s.url("/whoami")).await;
        assert_eq!(status, 407, "{proxy}: {body}");
        assert!(body.contains("caller_unknown"), "{body}");
        let (status, _) = curl_status(&proxy, &["--cacert", ca], &s.tls_url("/whoami")).await;
        assert_ne!(status, 200, "{proxy}: a CONNECT without a caller is refused");
    }
    let refused = raw(
        s.tp.proxy,
        &[&format!("GET {} HTTP/1.1", s.url("/whoami")), &format!("Host: {}", s.mock.authority())],
    )
    .await;
    assert_eq!(refused.status, 407);
    assert_eq!(refused.header("proxy-authenticate").as_deref(), Some("Basic realm=\"tokenproxy\""));
    assert_eq!(refused.header("x-tokenproxy-error").as_deref(), Some("caller_unknown"));
    let port = s.tls_mock.addr.port();
    let connect = raw(
        s.tp.proxy,
        &[
            &format!("CONNECT localhost:{port} HTTP/1.1"),
            &format!("Proxy-Authorization: {}", basic("billing", "nope-nope")),
        ],
    )
    .await;
    assert_eq!(connect.status, 407, "{}", connect.head);
    assert_eq!(connect.header("x-tokenproxy-error").as_deref(), Some("caller_unknown"));
    assert_eq!(s.mock.seen().len() + s.tls_mock.seen().len(), before, "a refused request reached a provider");
    // Proxy credentials never travel upstream.
    assert!(
        s.mock
            .seen()
            .iter()
            .chain(&s.tls_mock.seen())
            .all(|r| !r.headers.contains_key("proxy-authorization"))
    );
    // No secret in any log line.
    for line in s.tp.logs() {
        for secret in [BILLING_SECRET, REPORTS_SECRET, "tok-api-", "tok-secure"] {
            assert!(!line.contains(secret), "a log line holds {secret:?}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_and_account_rules_each_allow_one_request_and_refuse_the_next() {
    let s = Setup::start(TWO_SECRET_CALLERS).await;
    let auth = basic("billing", BILLING_SECRET);
    let target = |path: &str| format!("GET {} HTTP/1.1", s.url(path));
    let host = format!("Host: {}", s.mock.authority());
    let pa = format!("Proxy-Authorization: {auth}");

    let cases: [(&str, Vec<String>, u16, &str); 8] = [
        ("a path the rule allows", vec![target("/v1/charges/ch_1")], 200, ""),
        ("a path it does not", vec![target("/v1/refunds/re_1")], 403, "path_not_allowed"),
        (
            "a dot segment out of the allowed path",
            vec![target("/v1/charges/../refunds")],
            403,
            "path_not_allowed",
        ),
        ("an encoded one", vec![target("/v1/charges/%2e%2e/refunds")], 403, "path_not_allowed"),
        ("a method the rule allows", vec![target("/whoami")], 200, ""),
        (
            "a method it does not",
            vec![format!("DELETE {} HTTP/1.1", s.url("/whoami"))],
            403,
            "method_not_allowed",
        ),
        (
            "an account the rule allows",
            vec![target("/whoami"), "Tokenproxy-Account: shop-eu".into()],
            200,
            "",
        ),
        (
            "an account it does not",
            vec![target("/whoami"), "Tokenproxy-Account: alice".into()],
            403,
            "account_not_allowed",
        ),
    ];
    for (what, lines, status, not_allowed) in cases {
        let before = s.mock.seen().len();
        let mut all: Vec<&str> = lines.iter().map(String::as_str).collect();
        all.extend([host.as_str(), pa.as_str()]);
        let answer = raw(s.tp.proxy, &all).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.body);
        if status == 403 {
            assert_eq!(answer.header("x-tokenproxy-error").as_deref(), Some("forbidden"), "{what}");
            let body = answer.json();
            assert_eq!(body["caller"], "billing", "{what}");
            assert_eq!(body["provider"], "api", "{what}");
            assert_eq!(body["not_allowed"], not_allowed, "{what}");
            let account = if what.starts_with("an account") { "alice" } else { "billing" };
            assert_eq!(body["account"], account, "{what}: {body}");
            assert_eq!(s.mock.seen().len(), before, "{what}: a refused request reached the provider");
        } else {
            assert_eq!(s.mock.seen().len(), before + 1, "{what}");
        }
    }
    // A body goes through the other codec: the same rules.
    let post = raw(
        s.tp.proxy,
        &[&format!("POST {} HTTP/1.1", s.url("/v1/charges")), &host, &pa, "Content-Length: 2", "", "{}"],
    )
    .await;
    assert_eq!(post.status, 403, "{}", post.body);
    assert_eq!(post.json()["not_allowed"], "method_not_allowed");

    // Inside an intercepted tunnel, and on an upgrade's handshake: decided per request.
    let reports_tunnel = raw(
        s.tp.proxy,
        &[
            &format!("CONNECT localhost:{} HTTP/1.1", s.tls_mock.addr.port()),
            &format!("Proxy-Authorization: {}", basic("reports", REPORTS_SECRET)),
        ],
    )
    .await;
    assert_eq!(reports_tunnel.status, 200, "a caller is admitted to a tunnel; its requests are decided");
    let mut tls =
        tunnel(s.tp.proxy, s.tls_mock.addr.port(), &basic("reports", REPORTS_SECRET), &s.ca_pem).await;
    let answer = get_in_tunnel(&mut tls, s.tls_mock.addr.port(), "/whoami").await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.json()["not_allowed"], "no_rule_for_provider");
    assert!(s.tls_mock.seen().is_empty());
    let upgrade = raw(
        s.tp.proxy,
        &[
            &format!("GET {} HTTP/1.1", s.url("/ws")),
            &host,
            &pa,
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ],
    )
    .await;
    assert_eq!(upgrade.status, 403, "an upgrade's handshake is decided like any request");
    assert_eq!(upgrade.json()["not_allowed"], "path_not_allowed");

    // Hosts of no provider: under [egress], and not for a caller with egress = false.
    let elsewhere = MockApi::start().await;
    let unmatched = |who: &str, secret: &str| {
        let pa = format!("Proxy-Authorization: {}", basic(who, secret));
        let target = format!("GET {} HTTP/1.1", elsewhere.url("/x"));
        let host = format!("Host: {}", elsewhere.authority());
        async move { raw(s.tp.proxy, &[&target, &host, &pa]).await }
    };
    assert_eq!(unmatched("billing", BILLING_SECRET).await.status, 200);
    let refused = unmatched("reports", REPORTS_SECRET).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["not_allowed"], "egress");
    let connect = raw(
        s.tp.proxy,
        &[
            &format!("CONNECT {} HTTP/1.1", elsewhere.authority()),
            &format!("Proxy-Authorization: {}", basic("reports", REPORTS_SECRET)),
        ],
    )
    .await;
    assert_eq!(connect.status, 403, "an opaque tunnel is egress too");
    assert_eq!(elsewhere.seen().len(), 1);

    // A route answers 401 to a request that belongs to no caller, and serves a caller's.
    let route = s.tp.routes[0];
    let answer = raw(route, &["GET /whoami HTTP/1.1", "Host: api"]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.header("x-tokenproxy-error").as_deref(), Some("caller_unknown"));
    let answer = raw(route, &["GET /whoami HTTP/1.1", "Host: api", &pa]).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, format!("Bearer {}", token_of("billing")).as_str())
    );

    let metrics = |caller: &'static str, decision: &'static str| {
        let tp = &s.tp;
        async move { tp.metric("tokenproxy_decisions_total", &[("caller", caller), ("decision", decision)]).await }
    };
    assert!(metrics("billing", "allow").await >= 4.0);
    assert!(metrics("billing", "deny").await >= 6.0);
    assert!(metrics("reports", "deny").await >= 3.0);
    assert!(metrics("(unknown)", "deny").await >= 1.0);
}

/// The uid a client runs as, through `setpriv` (CI runs as root).
async fn curl_as_uid(uid: u32, proxy: &str, url: &str) -> (u16, String) {
    let out = tokio::process::Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", "--"])
        .args(["curl", "-sS", "--max-time", "20", "--noproxy", "", "-x", proxy, "-w", "\n%{http_code}", url])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_running_as_two_uids_are_told_apart_with_no_proxy_credentials() {
    if !running_as_root() {
        if std::env::var("TOKENPROXY_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("this test runs clients as other uids and needs root (TOKENPROXY_REQUIRE_CLIENTS=1)");
        }
        return skip("clients as other uids need root");
    }
    if !curl_available()
        || !client_available("setpriv", std::process::Command::new("setpriv").arg("--version"))
    {
        return;
    }
    let s = Setup::start(
        r#"
[callers.billing]
uids = [41001]
[[callers.billing.allow]]
provider = "api"
accounts = ["{caller}"]
default_account = "{caller}"
[callers.reports]
uids = [41002]
[[callers.reports.allow]]
provider = "api"
default_account = "{caller}"
methods = ["GET"]
paths = ["/whoami"]
"#,
    )
    .await;
    let proxy = s.tp.proxy_url();
    let url = s.url("/whoami");
    assert_eq!(curl_as_uid(41001, &proxy, &url).await, (200, format!("Bearer {}", token_of("billing"))));
    assert_eq!(curl_as_uid(41002, &proxy, &url).await, (200, format!("Bearer {}", token_of("reports"))));
    // The same client, as a uid no caller has: refused.
    let (status, body) = curl_as_uid(41003, &proxy, &url).await;
    assert_eq!(status, 407, "{body}");
    // billing may not act as reports' account; reports may not use another path.
    let (status, _) = curl_as_uid(41002, &proxy, &s.url("/v1/charges")).await;
    assert_eq!(status, 403);
    // And this process (root) is no caller either.
    let (status, _) = curl_status(&proxy, &[], &url).await;
    assert_eq!(status, 407);

    let lines = s.audit_lines(5).await;
    // The relay writes a line once its answer is sent, so lines of back-to-back requests may
    // come in either order: compared as a set of (caller, path, status).
    let mut seen: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| {
            let caller = l["caller"].as_str().unwrap_or("-").to_string();
            (caller, l["path"].as_str().unwrap().to_string(), l["status"].as_u64().unwrap())
        })
        .collect();
    seen.sort();
    let expected = [
        ("-", "/whoami", 407),
        ("-", "/whoami", 407),
        ("billing", "/whoami", 200),
        ("reports", "/v1/charges", 403),
        ("reports", "/whoami", 200),
    ];
    let expected: Vec<(String, String, u64)> =
        expected.iter().map(|(c, p, s)| (c.to_string(), p.to_string(), *s)).collect();
    assert_eq!(seen, expected, "{lines:?}");
}

/// Keys and tokens made by PyJWT (not by tokenproxy's JWT library): a JWKS with the good key, a
/// JWKS with another key, and tokens for `agent-a` and `agent-b`.
struct Jwts {
    jwks: String,
    other_jwks: String,
    tokens: serde_json::Value,
}

async fn mint_jwts() -> Option<Jwts> {
    if !client_available(
        "python3 with pyjwt and cryptography",
        std::process::Command::new("python3").args(["-c", "import jwt, cryptography"]),
    ) {
        return None;
    }
    let script = r#"
import json, time, jwt
from cryptography.hazmat.primitives.asymmetric import rsa, ec
good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
other = ec.generate_private_key(ec.SECP256R1())
def jwks(key, kid, alg):
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    jwk.update(kid=kid, alg=alg, use="sig")
    return json.dumps({"keys": [jwk]})
now = int(time.time())
def tok(key, kid, alg, **claims):
    base = {"iss": "https://issuer.test", "aud": "tokenproxy", "iat": now, "exp": now + 3600}
    base.update(claims)
    return jwt.encode(base, key, algorithm=alg, headers={"kid": kid})
print(json.dumps({
  "jwks": jwks(good, "k1", "RS256"),
  "other_jwks": jwks(other, "k2", "ES256"),
  "tokens": {
    "a": tok(good, "k1", "RS256", sub="agent-a"),
    "b": tok(good, "k1", "RS256", sub="agent-b"),
    "expired": tok(good, "k1", "RS256", sub="agent-a", exp=now - 3600, iat=now - 7200),
    "not_yet": tok(good, "k1", "RS256", sub="agent-a", nbf=now + 3600),
    "wrong_audience": tok(good, "k1", "RS256", sub="agent-a", aud="someone-else"),
    "wrong_issuer": tok(good, "k1", "RS256", sub="agent-a", iss="https://evil.test"),
    "wrong_key": tok(other, "k1", "ES256", sub="agent-a"),
    "other_key": tok(other, "k2", "ES256", sub="agent-a"),
    "hmac": jwt.encode({"iss": "https://issuer.test", "aud": "tokenproxy", "sub": "agent-a", "exp": now + 3600}, "k" * 32, algorithm="HS256"),
  },
}))
"#;
    let out = tokio::process::Command::new("python3").args(["-c", script]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(Jwts {
        jwks: all["jwks"].as_str().unwrap().to_string(),
        other_jwks: all["other_jwks"].as_str().unwrap().to_string(),
        tokens: all["tokens"].clone(),
    })
}

const JWT_AGENTS: &str = r#"
[callers.agent-a]
jwt = { jwks_file = "jwks.json", issuer = "https://issuer.test", audience = "tokenproxy", subject = "agent-a" }
[[callers.agent-a.allow]]
provider = "api"
accounts = ["{caller}"]
default_account = "{caller}"
[callers.agent-b]
jwt = { jwks_file = "jwks.json", issuer = "https://issuer.test", audience = "tokenproxy", subject = "agent-b" }
[[callers.agent-b.allow]]
provider = "api"
accounts = ["{caller}"]
default_account = "{caller}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_jwts_each_get_their_own_account_and_bad_tokens_are_refused() {
    let Some(jwts) = mint_jwts().await else { return };
    if !curl_available() || !python_requests_available() {
        return;
    }
    // Started with no callers; the agents are added to the running proxy, JWKS first.
    let s = Setup::start("").await;
    std::fs::write(s.dir.path().join("jwks.json"), &jwts.jwks).unwrap();
    let config = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(s.config_path(), format!("{config}\n{JWT_AGENTS}")).unwrap();
    let token = |name: &str| jwts.tokens[name].as_str().unwrap().to_string();
    let url = s.url("/whoami");
    let bearer = |t: String| {
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(s.tp.proxy_url())
                    .unwrap()
                    .custom_http_auth(format!("Bearer {t}").parse().unwrap()),
            )
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    let a = bearer(token("a"));
    let who = |client: reqwest::Client, header: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut request = client.get(&url);
            if let Some(account) = header {
                request = request.header("Tokenproxy-Account", account);
            }
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    eventually(Duration::from_secs(15), "the agents to be configured", || async {
        (who(a.clone(), None).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(who(a.clone(), None).await, (200, format!("Bearer {}", token_of("agent-a"))));
    // Another agent's account: not for agent-a.
    let (status, body) = who(a.clone(), Some("agent-b")).await;
    assert_eq!(status, 403, "{body}");
    // The JWT as the proxy password, with curl and with Python requests.
    let as_password = format!("http://jwt:{}@{}", token("b"), s.tp.proxy);
    assert_eq!(curl_status(&as_password, &[], &url).await, (200, format!("Bearer {}", token_of("agent-b"))));
    let (ok, out, err) = python(
        &format!("r = requests.get('{url}', timeout=20)\nprint(r.status_code, r.text)"),
        &[("HTTP_PROXY", as_password.as_str())],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("200 Bearer {}", token_of("agent-b")));
    // Agent-a's token presented under agent-b's name: refused.
    let misnamed = format!("http://agent-b:{}@{}", token("a"), s.tp.proxy);
    assert_eq!(curl_status(&misnamed, &[], &url).await.0, 407);

    let before = s.mock.seen().len();
    for bad in ["expired", "not_yet", "wrong_audience", "wrong_issuer", "wrong_key", "other_key", "hmac"] {
        let (status, body) = who(bearer(token(bad)), None).await;
        assert_eq!(status, 407, "a {bad} token: {body}");
        assert!(body.contains("caller_unknown"), "{body}");
    }
    assert_eq!(s.mock.seen().len(), before, "a refused JWT's request reached the provider");

    // The issuer rotates its keys: the old key's tokens are refused within a second, the new
    // key's accepted.
    std::fs::write(s.dir.path().join("jwks.json"), &jwts.other_jwks).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(who(a.clone(), None).await.0, 407, "a token of a key no longer in the JWKS");
    assert_eq!(who(bearer(token("other_key")), None).await.0, 200);

    // No JWT in any log or audit line.
    let audit = std::fs::read_to_string(s.dir.path().join("audit.jsonl")).unwrap();
    for line in s.tp.logs().iter().chain(audit.lines().map(str::to_string).collect::<Vec<_>>().iter()) {
        for t in ["a", "b", "expired", "other_key"] {
            let sig = token(t).rsplit('.').next().unwrap().to_string();
            assert!(!line.contains(&sig), "a log line holds a JWT: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_or_a_rule_removed_while_a_tunnel_is_open_refuses_its_next_request_within_a_second()
{
    let s = Setup::start(TWO_SECRET_CALLERS).await;
    let port = s.tls_mock.addr.port();
    let mut tls = tunnel(s.tp.proxy, port, &basic("billing", BILLING_SECRET), &s.ca_pem).await;
    let answer = get_in_tunnel(&mut tls, port, "/whoami").await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "Bearer tok-secure"));
    let mut second = tunnel(s.tp.proxy, port, &basic("billing", BILLING_SECRET), &s.ca_pem).await;
    assert_eq!(get_in_tunnel(&mut second, port, "/whoami").await.status, 200);

    // The secret is rotated: the tunnel that holds the old one is refused on its next request.
    write_secret(s.dir.path(), "billing.secret", "rotated-secret-Zk90");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = s.tls_mock.seen().len();
    let answer = get_in_tunnel(&mut tls, port, "/whoami").await;
    assert_eq!(answer.status, 407, "{}", answer.body);
    assert_eq!(answer.header("x-tokenproxy-error").as_deref(), Some("caller_unknown"));
    assert_eq!(s.tls_mock.seen().len(), seen);

    // A tunnel opened with the new secret works; then its rule is removed from the config.
    let mut fresh = tunnel(s.tp.proxy, port, &basic("billing", "rotated-secret-Zk90"), &s.ca_pem).await;
    assert_eq!(get_in_tunnel(&mut fresh, port, "/whoami").await.status, 200);
    let config = std::fs::read_to_string(s.config_path()).unwrap();
    let without = config.replace("[[callers.billing.allow]]\nprovider = \"secure\"\n", "");
    assert_ne!(config, without);
    std::fs::write(s.config_path(), without).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answer = get_in_tunnel(&mut fresh, port, "/whoami").await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.json()["not_allowed"], "no_rule_for_provider");

    // An opaque tunnel to a host of no provider has no request to refuse: it is closed when a
    // reload takes its caller's egress away.
    let elsewhere = MockApi::start().await;
    let mut opaque = TcpStream::connect(s.tp.proxy).await.unwrap();
    let connect = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {1}\r\n\r\n",
        elsewhere.authority(),
        basic("billing", "rotated-secret-Zk90")
    );
    opaque.write_all(connect.as_bytes()).await.unwrap();
    assert!(read_head(&mut opaque).await.starts_with("HTTP/1.1 200"));
    let inside = format!("GET /whoami HTTP/1.1\r\nHost: {}\r\n\r\n", elsewhere.authority());
    opaque.write_all(inside.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut opaque).await.status, 200);
    let config = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(
        s.config_path(),
        config.replace("[callers.billing]\n", "[callers.billing]\negress = false\n"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), opaque.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the tunnel is closed: {closed:?}");
    assert_eq!(elsewhere.seen().len(), 1);

    // A config edit that does not load keeps the callers in force (and says so in the log).
    std::fs::write(s.config_path(), "[callers.billing\nbroken").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ok = raw(
        s.tp.proxy,
        &[
            &format!("GET {} HTTP/1.1", s.url("/whoami")),
            &format!("Host: {}", s.mock.authority()),
            &format!("Proxy-Authorization: {}", basic("billing", "rotated-secret-Zk90")),
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(s.tp.logs().iter().any(|l| l.contains("does not load")), "the broken edit is reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_has_an_audit_line_with_the_specs_fields_also_after_the_file_is_rotated() {
    let s = Setup::start(TWO_SECRET_CALLERS).await;
    let pa = format!("Proxy-Authorization: {}", basic("billing", BILLING_SECRET));
    let host = format!("Host: {}", s.mock.authority());
    let allowed = raw(
        s.tp.proxy,
        &[&format!("GET {} HTTP/1.1", s.url("/v1/charges/ch_9?api_key=QUERYSECRET")), &host, &pa],
    )
    .await;
    assert_eq!(allowed.status, 200);
    let denied = raw(
        s.tp.proxy,
        &[&format!("GET {} HTTP/1.1", s.url("/whoami")), &host, &pa, "Tokenproxy-Account: alice"],
    )
    .await;
    assert_eq!(denied.status, 403);
    let unknown = raw(s.tp.proxy, &[&format!("GET {} HTTP/1.1", s.url("/whoami")), &host]).await;
    assert_eq!(unknown.status, 407);

    let lines = s.audit_lines(3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let fingerprint = |a: &str| tokenproxy::secrets::fingerprint(a);
    let keys = [
        "time",
        "caller",
        "provider",
        "account",
        "method",
        "host",
        "path",
        "decision",
        "rule",
        "status",
        "retried",
        "duration_us",
        "listener",
    ];
    for line in &lines {
        let object = line.as_object().unwrap();
        for key in keys {
            assert!(object.contains_key(key), "{key} missing: {line}");
        }
        assert_eq!(object.len(), keys.len(), "{line}");
        assert_eq!(line["host"], s.mock.authority());
        assert_eq!(line["listener"], "proxy");
        assert_eq!(line["retried"], false);
        assert!(line["duration_us"].as_u64().is_some());
        assert!(
            time::OffsetDateTime::parse(
                line["time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
    }
    // In the order of their status, not of their writing (see the uid test).
    let by_status = |status: u64| lines.iter().find(|l| l["status"] == status).unwrap();
    let (allow, deny, none) = (by_status(200), by_status(403), by_status(407));
    assert_eq!(allow["caller"], "billing");
    assert_eq!(allow["provider"], "api");
    assert_eq!(allow["account"], fingerprint("billing"));
    assert_eq!((allow["method"].as_str(), allow["path"].as_str()), (Some("GET"), Some("/v1/charges/ch_9")));
    assert_eq!(
        (allow["decision"].as_str(), allow["rule"].as_u64(), allow["status"].as_u64()),
        (Some("allow"), Some(0), Some(200))
    );
    assert_eq!(deny["caller"], "billing");
    assert_eq!(deny["account"], fingerprint("alice"));
    assert_eq!(
        (deny["decision"].as_str(), deny["rule"].as_str(), deny["status"].as_u64()),
        (Some("deny"), Some("account_not_allowed"), Some(403))
    );
    assert!(none["caller"].is_null());
    assert_eq!(
        (none["decision"].as_str(), none["rule"].as_str(), none["status"].as_u64()),
        (Some("deny"), Some("no_identity"), Some(407))
    );

    // Rotation: the file is moved away; the next lines go to a new file at the path.
    let path = s.dir.path().join("audit.jsonl");
    std::fs::rename(&path, s.dir.path().join("audit.jsonl.1")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = raw(s.tp.proxy, &[&format!("GET {} HTTP/1.1", s.url("/whoami")), &host, &pa]).await;
    assert_eq!(again.status, 200);
    let lines = s.audit_lines(1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0]["caller"].as_str(), lines[0]["path"].as_str()), (Some("billing"), Some("/whoami")));
    let rotated = std::fs::read_to_string(s.dir.path().join("audit.jsonl.1")).unwrap();
    assert_eq!(rotated.lines().count(), 3, "the moved file keeps its lines and gets no more");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // No secret, token or query anywhere.
    for line in s.tp.logs().iter().chain(rotated.lines().map(str::to_string).collect::<Vec<_>>().iter()) {
        for secret in ["QUERYSECRET", BILLING_SECRET, "tok-api-", "api_key"] {
            assert!(!line.contains(secret), "a line holds {secret:?}: {line}");
        }
    }

    // A burst, then SIGTERM at once: the exit writes every line still waiting for the writer.
    let mut s = s;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(s.proxy_as("billing", BILLING_SECRET)).unwrap())
        .build()
        .unwrap();
    const BURST: usize = 300;
    for i in 0..BURST {
        let r = client.get(s.url(&format!("/v1/charges/burst-{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    s.tp.signal("TERM");
    assert_eq!(s.tp.wait_exit(Duration::from_secs(20)), Some(0), "a clean exit");
    let text = std::fs::read_to_string(&path).unwrap();
    let burst = text.lines().filter(|l| l.contains("/v1/charges/burst-")).count();
    assert_eq!(burst, BURST, "every line of the burst is in the file at exit");
}

#[tokio::test]
async fn a_failing_audit_write_is_counted_and_never_fails_a_request() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    std::fs::write(dir.path().join("api.json"), token_json("tok-full")).unwrap();
    // /dev/full takes every open and refuses every write (ENOSPC): a full disk.
    let config =
        format!("{}\n[audit]\nfile = \"/dev/full\"\n", mock.plain_config(&dir.path().join("api.json"), ""));
    let tp = TokenProxy::start(dir.path(), &config);
    for _ in 0..5 {
        let r = tp.client().get(mock.url("/whoami")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "Bearer tok-full");
    }
    eventually(Duration::from_secs(10), "the failed audit writes to be counted", || async {
        (tp.metric("tokenproxy_audit_failures_total", &[("reason", "write")]).await >= 5.0).then_some(())
    })
    .await;
    assert!(tp.logs().iter().any(|l| l.contains("audit lines are being lost")));
}

#[tokio::test]
async fn check_lists_callers_and_flags_unknown_providers_callers_without_identity_and_loose_files() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    std::fs::write(dir.path().join("api.json"), token_json("tok")).unwrap();
    write_secret(dir.path(), "good.secret", "a-good-secret-123");
    let base = mock.plain_config(&dir.path().join("api.json"), "");
    let check = |config: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, config).unwrap();
        let out =
            std::process::Command::new(binary()).args(["check", "--config"]).arg(&path).output().unwrap();
        (
            out.status.code(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let good = format!(
        "{base}\n[callers.billing]\nsecret_file = \"good.secret\"\nuids = [1001]\n[[callers.billing.allow]]\nprovider = \"api\"\nmethods = [\"GET\"]\npaths = [\"/v1/*\"]\n"
    );
    let (code, out) = check(&good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("billing"), "{out}");
    assert!(out.contains("socket owner uid 1001"), "{out}");
    assert!(out.contains("provider api, accounts any, methods GET, paths /v1/*"), "{out}");
    assert!(!out.contains("a-good-secret-123"), "check shows no secret: {out}");

    let bad = format!(
        "{base}\n[callers.lost]\n[[callers.lost.allow]]\nprovider = \"nope\"\n[callers.other]\nuids = [7]\n"
    );
    let (code, out) = check(&bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("callers.lost has no identity"), "{out}");
    assert!(out.contains("callers.lost.allow[0].provider: no provider named \"nope\""), "{out}");

    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("good.secret"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let (code, out) = check(&good);
    assert_eq!(code, Some(0), "a loose file is a warning: {out}");
    assert!(out.contains("callers.billing secret file") && out.contains("readable by everyone"), "{out}");
}
