//! HTTPS through CONNECT: provider hosts are intercepted with tokenproxy's CA and get the token;
//! other hosts are tunnelled untouched; upstream TLS is verified.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

const TOKEN: &str = "tok-https-5e6f7a8b";

struct Setup {
    _dir: tempfile::TempDir,
    mock: MockApi,
    tp: TokenProxy,
    /// tokenproxy's CA, what clients trust.
    ca_pem: PathBuf,
    /// The mock's own CA.
    mock_ca_pem: PathBuf,
}

/// An HTTPS mock (certificate for `mock_names`, from a test CA) and a proxy whose provider
/// `api` matches `provider_host` (with `{port}` replaced). `trust_mock` puts the mock's CA in
/// `extra_roots`.
async fn setup(mock_names: &[&str], provider_host: &str, trust_mock: bool, extra: &str) -> Setup {
    setup_with_env(mock_names, provider_host, trust_mock, extra, &[]).await
}

/// [`setup`], with environment variables for the proxy (config overrides).
async fn setup_with_env(
    mock_names: &[&str],
    provider_host: &str,
    trust_mock: bool,
    extra: &str,
    env: &[(&str, &str)],
) -> Setup {
    let dir = tempdir();
    let pki = test_pki(dir.path(), "mock", mock_names);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    std::fs::write(dir.path().join("api.json"), token_json(TOKEN)).unwrap();
    let roots = if trust_mock { toml_path(&pki.ca_pem_path) } else { String::new() };
    let config = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
[admin]
listen = "127.0.0.1:0"
[tls]
ca_dir = "ca"
extra_roots = [{roots}]
{extra}
[providers.api]
hosts = ["{host}"]
token_file = "api.json"
"#,
        host = provider_host.replace("{port}", &mock.addr.port().to_string()),
    );
    let tp = TokenProxy::start_with_env(dir.path(), &config, env);
    let ca_pem = dir.path().join("ca").join("ca.pem");
    assert!(ca_pem.exists(), "the CA is created on first start");
    Setup { mock_ca_pem: pki.ca_pem_path, _dir: dir, mock, tp, ca_pem }
}

fn https_url(host: &str, mock: &MockApi, path: &str) -> String {
    format!("https://{host}:{}{path}", mock.addr.port())
}

fn reqwest_trusting(tp: &TokenProxy, ca: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(tp.proxy_url()).unwrap())
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test]
async fn curl_gets_the_token_injected_over_http1_and_http2_and_the_leaf_is_reused() {
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    if !curl_available() {
        return;
    }
    let url = https_url("localhost", &s.mock, "/v1/me");
    let ca = s.ca_pem.to_str().unwrap();
    let (ok, out) =
        curl(&["-x", &s.tp.proxy_url(), "--cacert", ca, "--http1.1", "-w", "\n%{http_version}", &url]).await;
    assert!(ok, "{out}");
    assert!(out.ends_with("\n1.1"), "{out}");
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(s.mock.last().path, "/v1/me");

    // A second connection, over HTTP/2 this time (ALPN offers h2).
    let (ok, out) =
        curl(&["-x", &s.tp.proxy_url(), "--cacert", ca, "--http2", "-w", "\n%{http_version}", &url]).await;
    assert!(ok, "{out}");
    assert!(out.ends_with("\n2"), "curl spoke HTTP/2 to tokenproxy: {out}");
    assert_eq!(s.mock.seen().len(), 2);
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));

    // One leaf for two connections to one host.
    assert_eq!(s.tp.metric("tokenproxy_leaf_certificates_issued_total", &[]).await, 1.0);
    assert_eq!(s.tp.metric("tokenproxy_leaf_cache_hits_total", &[]).await, 1.0);
    assert_eq!(
        s.tp.metric("tokenproxy_requests_total", &[("provider", "api"), ("status", "2xx")]).await,
        2.0
    );
}

#[tokio::test]
async fn python_requests_and_reqwest_get_the_token_injected() {
    // An IP-address host: the leaf carries an IP SAN.
    let s = setup(&["127.0.0.1"], "127.0.0.1:{port}", true, "").await;
    let url = https_url("127.0.0.1", &s.mock, "/reqwest");
    let r = reqwest_trusting(&s.tp, &s.ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));

    if python_requests_available() {
        let url = https_url("127.0.0.1", &s.mock, "/python");
        let script = format!(
            "r = requests.get('{url}', proxies={{'https': '{}'}}, verify='{}', timeout=20)\nprint(r.status_code)",
            s.tp.proxy_url(),
            s.ca_pem.display()
        );
        let (ok, out, err) = python(&script, &[]).await;
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "200");
        assert_eq!(s.mock.last().path, "/python");
        assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));

        // As an application is configured: HTTPS_PROXY and REQUESTS_CA_BUNDLE.
        let url = https_url("127.0.0.1", &s.mock, "/python-env");
        let script = format!("print(requests.get('{url}', timeout=20).status_code)");
        let proxy_url = s.tp.proxy_url();
        let env = [("HTTPS_PROXY", proxy_url.as_str()), ("REQUESTS_CA_BUNDLE", s.ca_pem.to_str().unwrap())];
        let (ok, out, err) = python(&script, &env).await;
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "200");
        assert_eq!(s.mock.last().path, "/python-env");
    }
}

const JAVA_CLIENT: &str = r#"
import java.net.InetSocketAddress;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class ProxyClient {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.of(new InetSocketAddress(args[0], Integer.parseInt(args[1]))))
            .build();
        HttpResponse<String> r = client.send(
            HttpRequest.newBuilder(URI.create(args[2])).build(), HttpResponse.BodyHandlers.ofString());
        System.out.println(r.statusCode());
    }
}
"#;

#[tokio::test]
async fn a_java_http_client_gets_the_token_injected() {
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    let java_ok = client_available("javac", Command::new("javac").arg("-version"))
        && client_available("keytool", Command::new("keytool").arg("-help"));
    if !java_ok {
        return;
    }
    let work = tempdir();
    let source = work.path().join("ProxyClient.java");
    std::fs::write(&source, JAVA_CLIENT).unwrap();
    let status = tokio::process::Command::new("javac").arg(&source).status().await.unwrap();
    assert!(status.success());
    // A truststore holding tokenproxy's CA, as a Java deployment would build it.
    let store = work.path().join("trust.p12");
    let status = tokio::process::Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "tokenproxy",
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
        ])
        .arg("-file")
        .arg(&s.ca_pem)
        .arg("-keystore")
        .arg(&store)
        .output()
        .await
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let out = tokio::process::Command::new("java")
        .arg(format!("-Djavax.net.ssl.trustStore={}", store.display()))
        .arg("-Djavax.net.ssl.trustStorePassword=changeit")
        .arg("-cp")
        .arg(work.path())
        .arg("ProxyClient")
        .arg(s.tp.proxy.ip().to_string())
        .arg(s.tp.proxy.port().to_string())
        .arg(https_url("localhost", &s.mock, "/java"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "200");
    assert_eq!(s.mock.last().path, "/java");
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
}

/// Where `.ci/run` installs the Node client libraries (`npm install --prefix target/node-clients`).
fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-clients/node_modules")
}

#[tokio::test]
async fn node_fetch_with_undicis_env_proxy_agent_gets_the_token_injected_as_the_readme_says() {
    let node_ok = client_available(
        "node with undici (npm install --prefix target/node-clients undici@6)",
        Command::new("node")
            .args(["-e", "require('undici').EnvHttpProxyAgent"])
            .env("NODE_PATH", node_modules()),
    );
    if !node_ok {
        return;
    }
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    let url = https_url("localhost", &s.mock, "/node");
    // The README's two lines, then Node's own fetch, configured as an app would be: the proxy
    // variables and NODE_EXTRA_CA_CERTS.
    let script = format!(
        r#"const {{ setGlobalDispatcher, EnvHttpProxyAgent }} = require("undici");
setGlobalDispatcher(new EnvHttpProxyAgent());
fetch("{url}").then(r => console.log(r.status)).catch(e => {{ console.error(e); process.exit(1); }});"#
    );
    let mut command = tokio::process::Command::new("node");
    command.args(["-e", &script]).env("NODE_PATH", node_modules());
    for var in ["http_proxy", "https_proxy", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"] {
        command.env_remove(var);
    }
    let out = command
        .env("HTTPS_PROXY", s.tp.proxy_url())
        .env("HTTP_PROXY", s.tp.proxy_url())
        .env("NODE_EXTRA_CA_CERTS", &s.ca_pem)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "200");
    assert_eq!(s.mock.last().path, "/node");
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
}

#[tokio::test]
async fn unmatched_hosts_are_tunnelled_untouched_or_refused() {
    // The provider is localhost:PORT; 127.0.0.1:PORT matches nothing and is tunnelled.
    let s = setup(&["localhost", "127.0.0.1"], "localhost:{port}", true, "").await;
    let url = https_url("127.0.0.1", &s.mock, "/tunnel");
    // Trusting only the mock's CA: success proves the client saw the mock's own certificate.
    let r = reqwest_trusting(&s.tp, &s.mock_ca_pem)
        .get(&url)
        .header("authorization", "Bearer app-own")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.mock.last().authorization(), Some("Bearer app-own"));
    let r = reqwest_trusting(&s.tp, &s.mock_ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.mock.last().authorization(), None, "nothing injected into a tunnel");
    if curl_available() {
        let ca = s.mock_ca_pem.to_str().unwrap();
        let (ok, out) = curl(&["-x", &s.tp.proxy_url(), "--cacert", ca, &url]).await;
        assert!(ok, "{out}");
        assert_eq!(s.mock.last().authorization(), None);
    }

    let s = setup(&["localhost", "127.0.0.1"], "localhost:{port}", true, "[egress]\nallow_unmatched = false")
        .await;
    let proxy = s.tp.proxy;
    let target = format!("127.0.0.1:{}", s.mock.addr.port());
    let answer = tokio::task::spawn_blocking(move || {
        raw(proxy, format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(), None)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("egress_denied"), "{answer}");
    assert!(s.mock.seen().is_empty());
}

#[tokio::test]
async fn an_upstream_with_a_wrong_or_untrusted_certificate_is_a_502_and_gets_no_token() {
    // The mock's certificate names only "localhost"; the provider is reached as 127.0.0.1.
    let s = setup(&["localhost"], "127.0.0.1:{port}", true, "").await;
    let url = https_url("127.0.0.1", &s.mock, "/wrong-name");
    let r = reqwest_trusting(&s.tp, &s.ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("certificate"), "{body}");
    assert!(!body.contains(TOKEN));

    // The right name but a CA nobody told tokenproxy to trust.
    let s2 = setup(&["localhost"], "localhost:{port}", false, "").await;
    let url = https_url("localhost", &s2.mock, "/untrusted");
    let r = reqwest_trusting(&s2.tp, &s2.ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenproxy-error"], "upstream_unreachable");
    assert!(r.text().await.unwrap().contains("certificate"));

    assert!(s.mock.seen().is_empty() && s2.mock.seen().is_empty(), "the token was never sent");
}

#[tokio::test]
async fn a_401_passes_through_an_intercepted_connection() {
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    let url = https_url("localhost", &s.mock, "/status/401");
    let r = reqwest_trusting(&s.tp, &s.ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
}

/// Writes `bytes`, optionally waits for the CONNECT answer and writes `then`, and returns what
/// the proxy sent back before closing (or 5 s passed).
fn raw(addr: std::net::SocketAddr, bytes: &[u8], then: Option<&[u8]>) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    if let Some(then) = then {
        let n = stream.read(&mut buf).unwrap();
        out.extend_from_slice(&buf[..n]);
        let _ = stream.write_all(then);
    }
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_malformed_connect_or_a_garbage_handshake_gets_an_error_and_the_proxy_keeps_serving() {
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    let proxy = s.tp.proxy;
    let answer = tokio::task::spawn_blocking(move || {
        raw(proxy, b"CONNECT no-port-here HTTP/1.1\r\nHost: no-port-here\r\n\r\n", None)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let target = format!("localhost:{}", s.mock.addr.port());
    let answer = tokio::task::spawn_blocking(move || {
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        raw(proxy, connect.as_bytes(), Some(b"this is not a TLS ClientHello\r\n\r\n"))
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(s.mock.seen().is_empty());

    // Still serving.
    let url = https_url("localhost", &s.mock, "/after");
    let r = reqwest_trusting(&s.tp, &s.ca_pem).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
}

#[test]
fn the_ca_command_prints_the_path_and_an_unusable_ca_dir_stops_the_start() {
    let dir = tempdir();
    let config = dir.path().join("tp.toml");
    std::fs::write(&config, "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nca_dir = \"state/ca\"\n")
        .unwrap();
    let out = Command::new(binary()).args(["ca", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let expected = std::fs::canonicalize(dir.path().join("state/ca/ca.pem")).unwrap();
    assert_eq!(printed, expected.display().to_string());
    let pem = std::fs::read(&expected).unwrap();
    // Run again: the same CA, not a new one.
    let out = Command::new(binary()).args(["ca", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read(&expected).unwrap(), pem);

    // A ca_dir that cannot be created (its parent is a file): a one-line reason, exit 1.
    std::fs::write(dir.path().join("blocker"), "a file, not a folder").unwrap();
    std::fs::write(&config, "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nca_dir = \"blocker/ca\"\n")
        .unwrap();
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tls.ca_dir") && stderr.contains("blocker"), "{stderr}");

    // A CA that does not parse is an error and is left as it was.
    std::fs::create_dir_all(dir.path().join("broken")).unwrap();
    std::fs::write(dir.path().join("broken/ca.pem"), "garbage").unwrap();
    std::fs::write(dir.path().join("broken/ca-key.pem"), "garbage").unwrap();
    std::fs::write(
        &config,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nca_dir = \"broken\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(dir.path().join("broken/ca.pem")).unwrap(), "garbage");
}

#[tokio::test]
async fn a_401_over_an_intercepted_connection_is_refreshed_and_retried() {
    let dir = tempdir();
    let pki = test_pki(dir.path(), "mock", &["localhost"]);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    mock.accept_only(&[]);
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    endpoint.allow_refresh_token("rt-0");
    std::fs::write(
        dir.path().join("api.json"),
        r#"{"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nca_dir = \"ca\"\nextra_roots = [{}]\n\
         [providers.api]\nhosts = [\"localhost:{}\"]\ntoken_file = \"api.json\"\n{}",
        toml_path(&pki.ca_pem_path),
        mock.addr.port(),
        endpoint.oauth_toml("api", "refresh_token")
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let url = https_url("localhost", &mock, "/v1/me");
    let r =
        reqwest_trusting(&tp, &dir.path().join("ca/ca.pem")).post(&url).body("payload").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].authorization(), Some("Bearer revoked"));
    assert_eq!(seen[1].authorization(), Some("Bearer at-1"));
    assert_eq!(seen[1].body, "payload");
    assert_eq!(endpoint.calls(), 1);
}

/// Counts the TLS 1.3 session tickets a server sends: rustls hands each one to the store.
#[derive(Debug)]
struct TicketCounter {
    cache: rustls::client::ClientSessionMemoryCache,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for TicketCounter {
    fn set_kx_hint(&self, name: rustls_pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.cache.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.cache.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.cache.set_tls12_session(name, value)
    }
    fn tls12_session(
        &self,
        name: &rustls_pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.cache.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &rustls_pki_types::ServerName<'static>) {
        self.cache.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(
        &self,
        name: rustls_pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(
        &self,
        name: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.cache.take_tls13_ticket(name)
    }
}

/// One `GET /tickets` over TLS to `localhost` on `stream`, trusting `ca`; returns the answer and
/// how many session tickets arrived before it.
async fn tickets_before_the_answer(stream: tokio::net::TcpStream, ca: &Path) -> (String, usize) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let counter = std::sync::Arc::new(TicketCounter {
        cache: rustls::client::ClientSessionMemoryCache::new(8),
        tickets: Default::default(),
    });
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.resumption = rustls::client::Resumption::store(counter.clone());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut tls = connector.connect(name, stream).await.unwrap();
    tls.write_all(b"GET /tickets HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await.unwrap().unwrap();
    (String::from_utf8_lossy(&answer).into_owned(), counter.tickets.load(std::sync::atomic::Ordering::SeqCst))
}

/// A server's TLS 1.3 session tickets arrive just as a client writes its first request. Python's
/// `websockets` sync client reads (a thread of its own) and writes (the caller) one OpenSSL
/// connection at once, and a ticket landing in that moment can lose the request: the handshake
/// then hangs. From a sidecar on loopback the tickets land exactly then, so tokenproxy sends none.
#[tokio::test]
async fn an_intercepted_connection_gets_no_session_tickets() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&["localhost"], "localhost:{port}", true, "").await;
    // The counter works: the mock, with rustls's defaults, sends its tickets before answering.
    let direct = tokio::net::TcpStream::connect(s.mock.addr).await.unwrap();
    let (answer, tickets) = tickets_before_the_answer(direct, &s.mock_ca_pem).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(tickets > 0, "a default rustls server sends session tickets");

    let mut through = tokio::net::TcpStream::connect(s.tp.proxy).await.unwrap();
    let target = format!("localhost:{}", s.mock.addr.port());
    through
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut through).await.starts_with("HTTP/1.1 200"));
    let (answer, tickets) = tickets_before_the_answer(through, &s.ca_pem).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()), "intercepted");
    assert_eq!(tickets, 0, "tokenproxy's leaf sent TLS 1.3 session tickets");
}

/// CONNECT to `localhost:port` through the proxy, then TLS trusting `ca`, offering HTTP/1.1.
async fn intercepted(
    tp: &TokenProxy,
    port: u16,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(tp.proxy).await.unwrap();
    let connect = format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    stream.write_all(connect.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, stream).await.unwrap()
}

/// Sends `request` and reads one answer with a `Content-Length` body: (head, body).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let head = read_head(stream).await;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body)).await.unwrap().unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Inside an intercepted tunnel, requests without a body are relayed by hand over HTTP/1.1 and
/// verified TLS (the mock offers h2 as well: hyper's client would take it), on an upstream
/// connection kept between client connections; the first request with a body is handed to
/// hyper's path with the bytes read, and hyper serves the rest of the connection. Every request
/// carries the token either way.
#[tokio::test]
async fn intercepted_http1_is_relayed_by_hand_and_a_body_hands_the_connection_to_hyper() {
    // One worker: upstream connections are pooled per worker thread.
    let s =
        setup_with_env(&["localhost"], "localhost:{port}", true, "", &[("TOKENPROXY_PROXY__WORKERS", "1")])
            .await;
    let port = s.mock.addr.port();
    let bearer = format!("Bearer {TOKEN}");

    let mut tls = intercepted(&s.tp, port, &s.ca_pem).await;
    for (path, connection) in [("/relayed/1", "keep-alive"), ("/relayed/2?q=a%20b", "close")] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: elsewhere.test\r\nAuthorization: Bearer mine\r\nConnection: {connection}\r\n\r\n"
        );
        let (head, _) = exchange(&mut tls, &request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // Closed after the answer, with a close_notify (a clean end, not an error), and only once the
    // upstream connection is back in the pool.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest),
    );
    assert_eq!(end.await.unwrap().unwrap(), 0);
    // A second client connection: the upstream connection the first one used is reused.
    let mut tls = intercepted(&s.tp, port, &s.ca_pem).await;
    let (head, _) = exchange(&mut tls, "GET /relayed/3 HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        s.mock.open_connections(),
        1,
        "one upstream connection for three requests on two client connections"
    );
    // A body: hyper's path from here on, the same connection.
    let (head, _) =
        exchange(&mut tls, "POST /handed/1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
            .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = exchange(&mut tls, "GET /handed/2 HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let seen = s.mock.seen();
    let summary: Vec<_> = seen.iter().map(|r| (r.path.as_str(), r.version, r.authorization())).collect();
    use http::Version;
    assert_eq!(
        summary,
        [
            ("/relayed/1", Version::HTTP_11, Some(bearer.as_str())),
            ("/relayed/2?q=a%20b", Version::HTTP_11, Some(bearer.as_str())),
            ("/relayed/3", Version::HTTP_11, Some(bearer.as_str())),
            ("/handed/1", Version::HTTP_2, Some(bearer.as_str())),
            ("/handed/2", Version::HTTP_2, Some(bearer.as_str())),
        ]
    );
    // `Host` from the tunnel's target, whatever the request said.
    assert_eq!(seen[0].headers["host"], format!("localhost:{port}").as_str());
    assert_eq!(&seen[3].body[..], b"hello");
    assert_eq!(
        s.tp.metric("tokenproxy_requests_total", &[("provider", "api"), ("status", "2xx")]).await,
        5.0
    );
}

/// An HTTPS upstream that answers one request per connection and then closes it, without saying
/// so (no `Connection: close`): an upstream whose keep-alive timeout ran out. It answers with the
/// request's `Authorization` value, and counts connections.
async fn one_answer_per_connection(
    tls: std::sync::Arc<rustls::ServerConfig>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization:"))
                    .map_or("none".to_string(), |v| v.trim().to_string());
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{auth}", auth.len());
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, accepted)
}

/// The relay's TLS upstream connections: one the upstream closed while it was idle in the pool is
/// never used for an answer (it is noticed, or the idempotent request goes once more on a new
/// connection), and a chunked answer is streamed through the tunnel as it comes.
#[tokio::test]
async fn an_upstream_connection_closed_in_the_pool_is_replaced_and_chunks_stream_through_the_tunnel() {
    let s =
        setup_with_env(&["localhost"], "localhost:{port}", true, "", &[("TOKENPROXY_PROXY__WORKERS", "1")])
            .await;
    let port = s.mock.addr.port();

    // A chunked answer: its first chunk reaches the client before the upstream sends the rest.
    let mut tls = intercepted(&s.tp, port, &s.ca_pem).await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        tls.flush().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The mock holds the rest for 10 s unless released: the first chunk must come well before.
        for needle in [&b"first\n"[..], &b"\r\n0\r\n\r\n"[..]] {
            while !seen.windows(needle.len()).any(|w| w == needle) {
                let n =
                    tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0, "the answer ended early: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
            let first = needle == b"first\n";
            assert!(
                !first || !String::from_utf8_lossy(&seen).contains("second"),
                "the rest came before the release"
            );
            s.mock.release();
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("second\n"), "{text}");
    }
    assert_eq!(s.mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
    drop(tls);

    // An upstream that closes every connection after one answer, behind a second provider.
    let dir = tempdir();
    let pki = test_pki(dir.path(), "closing", &["localhost"]);
    let mut server_config = (*pki.server_config).clone();
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (closing_port, connections) = one_answer_per_connection(std::sync::Arc::new(server_config)).await;
    std::fs::write(dir.path().join("api.json"), token_json(TOKEN)).unwrap();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream_timeout = \"5s\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [tls]\nca_dir = \"ca\"\nextra_roots = [{}]\n[providers.api]\nhosts = [\"localhost:{closing_port}\"]\ntoken_file = \"api.json\"\n",
        toml_path(&pki.ca_pem_path)
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let ca = dir.path().join("ca").join("ca.pem");
    for round in 0..3 {
        // Two requests on one client connection, then a new client connection: each request
        // finds the connection the last one used closed by the upstream.
        let mut tls = intercepted(&tp, closing_port, &ca).await;
        for request in 0..2 {
            let (head, body) = exchange(&mut tls, "GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200"), "round {round}, request {request}: {head}");
            assert_eq!(body, format!("bearer {}", TOKEN.to_ascii_lowercase()));
        }
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        6,
        "one upstream connection per answer"
    );
    assert_eq!(tp.metric("tokenproxy_requests_total", &[("provider", "api"), ("status", "2xx")]).await, 6.0);
}
