//! The forward proxy for plain-HTTP requests: injection rules, egress rules, routes, header
//! hygiene and streaming, through real clients.

mod support;

use std::time::Duration;

use support::*;

const TOKEN: &str = "tok-forward-abc123";

/// A config with one provider `api` for `mock`, plain HTTP allowed, plus `extra` provider TOML.
fn config(dir: &std::path::Path, provider_hosts: &str, provider_extra: &str, extra: &str) -> String {
    let token_file = dir.join("api.json");
    if !token_file.exists() {
        std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    }
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
[admin]
listen = "127.0.0.1:0"
{extra}
[providers.api]
hosts = [{provider_hosts}]
token_file = {token_file}
{provider_extra}
"#,
        token_file = toml_path(&token_file)
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn reqwest_through_the_proxy_gets_the_token_injected() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));

    let r = tp.client().get(mock.url("/v1/items?page=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.authorization(), Some(bearer().as_str()));
    assert_eq!(seen.path, "/v1/items?page=2");
    assert_eq!(seen.headers["host"], mock.authority().as_str());
    assert_eq!(tp.metric("tokenproxy_requests_total", &[("provider", "api"), ("status", "2xx")]).await, 1.0);

    // Keep-alive on the client side: a second request on the same client works too.
    let r = tp.client().post(mock.url("/v1/items")).body("payload").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().body, "payload");
    assert_eq!(mock.last().method, "POST");
}

#[tokio::test]
async fn curl_and_python_requests_get_the_token_injected() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));

    if curl_available() {
        let (ok, body) = curl(&["-x", &tp.proxy_url(), &mock.url("/from-curl")]).await;
        assert!(ok, "curl failed: {body}");
        let seen = mock.last();
        assert_eq!(seen.path, "/from-curl");
        assert_eq!(seen.authorization(), Some(bearer().as_str()));
    }
    if python_requests_available() {
        let script = format!(
            "r = requests.get('{}', proxies={{'http': '{}'}}, timeout=20)\nprint(r.status_code)",
            mock.url("/from-python"),
            tp.proxy_url()
        );
        let (ok, out, err) = python(&script, &[]).await;
        assert!(ok, "python failed: {err}");
        assert_eq!(out.trim(), "200");
        let seen = mock.last();
        assert_eq!(seen.path, "/from-python");
        assert_eq!(seen.authorization(), Some(bearer().as_str()));

        // The same through HTTP_PROXY, as an application would be configured.
        let script = format!("print(requests.get('{}', timeout=20).status_code)", mock.url("/env-proxy"));
        let (ok, out, err) = python(&script, &[("HTTP_PROXY", &tp.proxy_url())]).await;
        assert!(ok, "python failed: {err}");
        assert_eq!(out.trim(), "200");
        assert_eq!(mock.last().path, "/env-proxy");
        assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
    }
}

#[tokio::test]
async fn client_header_override_replaces_and_keep_keeps_the_apps_header() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));
    tp.client().get(mock.url("/")).header("authorization", "Bearer app-own").send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
    let values: Vec<_> = mock.last().headers.get_all("authorization").iter().cloned().collect();
    assert_eq!(values.len(), 1, "exactly one Authorization header upstream");
    drop(tp);

    let dir = tempdir();
    let extra = "allow_plaintext = true\nclient_header = \"keep\"";
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, extra, ""));
    tp.client().get(mock.url("/")).header("authorization", "Bearer app-own").send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some("Bearer app-own"));
    // Without an app header, keep still injects.
    tp.client().get(mock.url("/")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
}

#[tokio::test]
async fn custom_header_and_format() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let extra = "allow_plaintext = true\nheader = \"X-Api-Key\"\nformat = \"key={token};v=1\"";
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, extra, ""));
    tp.client().get(mock.url("/")).send().await.unwrap();
    let seen = mock.last();
    assert_eq!(seen.headers["x-api-key"], format!("key={TOKEN};v=1").as_str());
    assert_eq!(seen.authorization(), None);
}

#[tokio::test]
async fn unmatched_hosts_pass_untouched_or_are_refused() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    // The provider is "localhost:PORT"; requests to 127.0.0.1:PORT match no provider.
    let hosts = format!("\"localhost:{}\"", mock.addr.port());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));
    let r = tp
        .client()
        .get(mock.url("/unmatched"))
        .header("authorization", "Bearer app-own")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.authorization(), Some("Bearer app-own"));
    assert!(!seen.headers.contains_key("proxy-authorization"), "Proxy-Authorization must not be forwarded");
    tp.client().get(mock.url("/unmatched-2")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), None);
    assert_eq!(tp.metric("tokenproxy_requests_total", &[("provider", "none"), ("status", "2xx")]).await, 2.0);
    drop(tp);

    let dir = tempdir();
    let tp = TokenProxy::start(
        dir.path(),
        &config(dir.path(), &hosts, "allow_plaintext = true", "[egress]\nallow_unmatched = false"),
    );
    let before = mock.seen().len();
    let r = tp.client().get(mock.url("/denied")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-tokenproxy-error"], "egress_denied");
    assert!(r.text().await.unwrap().contains("allow_unmatched"));
    assert_eq!(mock.seen().len(), before, "a denied request never reaches the upstream");
    // The provider's own host still works.
    let r = tp.client().get(format!("http://localhost:{}/ok", mock.addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
}

#[tokio::test]
async fn plain_http_to_a_provider_is_refused_without_allow_plaintext() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "", ""));
    let r = tp.client().get(mock.url("/secret")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-tokenproxy-error"], "plaintext_refused");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("allow_plaintext") && body.contains("upstream_scheme"),
        "reason names the fix: {body}"
    );
    assert!(!body.contains(TOKEN));
    assert!(mock.seen().is_empty(), "no request, so no token, left the process");
}

#[tokio::test]
async fn upstream_scheme_https_upgrades_a_plain_request_to_verified_tls() {
    let dir = tempdir();
    let pki = test_pki(dir.path(), "upstream", &["localhost", "127.0.0.1"]);
    let mock = MockApi::start_tls(pki.server_config.clone()).await;
    let hosts = format!("\"localhost:{}\"", mock.addr.port());
    let extra_tls = format!("[tls]\nextra_roots = [{}]", toml_path(&pki.ca_pem_path));
    let tp =
        TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "upstream_scheme = \"https\"", &extra_tls));
    // The app speaks plain HTTP to the proxy; the proxy speaks TLS to the upstream.
    let r = tp.client().get(format!("http://localhost:{}/tls", mock.addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
    assert_eq!(mock.last().path, "/tls");

    // Without the test CA in extra_roots, the upstream is not trusted: 502, and no token sent.
    drop(tp);
    let seen_before = mock.seen().len();
    let dir2 = tempdir();
    let tp = TokenProxy::start(dir2.path(), &config(dir2.path(), &hosts, "upstream_scheme = \"https\"", ""));
    let r = tp.client().get(format!("http://localhost:{}/tls", mock.addr.port())).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("certificate"), "the reason names the certificate problem: {body}");
    assert_eq!(mock.seen().len(), seen_before);
}

#[tokio::test]
async fn routes_send_everything_to_their_upstream_with_the_token() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = "\"api.invalid\"".to_string();
    let routes = format!(
        "[[routes]]\nlisten = \"127.0.0.1:0\"\nprovider = \"api\"\nupstream = \"http://{}/base\"",
        mock.authority()
    );
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", &routes));
    // A plain client with no proxy: the route listener is its base URL.
    let r = reqwest::get(format!("http://{}/v1/me?x=1", tp.routes[0])).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.last();
    assert_eq!(seen.path, "/base/v1/me?x=1");
    assert_eq!(seen.authorization(), Some(bearer().as_str()));
    assert_eq!(seen.headers["host"], mock.authority().as_str(), "Host is the upstream's");
    if curl_available() {
        let (ok, _) = curl(&[&format!("http://{}/curl", tp.routes[0])]).await;
        assert!(ok);
        assert_eq!(mock.last().path, "/base/curl");
        assert_eq!(mock.last().authorization(), Some(bearer().as_str()));
    }
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));
    let r = tp.client().get(mock.url("/redirect")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "http://127.0.0.1:1/elsewhere");
    assert_eq!(mock.seen().len(), 1, "the proxy made exactly one upstream request");
}

#[tokio::test]
async fn a_slowly_streamed_response_reaches_the_client_before_it_ends() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &hosts, "allow_plaintext = true", ""));
    let mut r = tp.client().get(mock.url("/stream")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The mock holds the rest of the body until released: the first chunk can only arrive now
    // if the proxy streams.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await;
    let first = first.expect("first chunk arrived while the upstream was still sending").unwrap();
    assert_eq!(first.as_deref(), Some(&b"first\n"[..]));
    mock.release();
    let rest = r.bytes().await.unwrap();
    assert_eq!(&rest[..], b"second\n");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_naming_the_host() {
    let dir = tempdir();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), "\"api.invalid\"", "", ""));
    let r = tp.client().get(format!("http://{closed}/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenproxy-error"], "upstream_unreachable");
    let body = r.text().await.unwrap();
    assert!(body.contains(&closed.to_string()), "names the host: {body}");
    // The proxy is still up.
    let (status, _) = tp.admin_get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_burst_leaves_at_most_max_idle_per_host_upstream_connections_open() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let hosts = format!("{:?}", mock.authority());
    let config = config(dir.path(), &hosts, "allow_plaintext = true", "");
    // One worker: idle connections are kept per worker thread.
    let tp = TokenProxy::start_with_env(
        dir.path(),
        &config,
        &[("TOKENPROXY_PROXY__MAX_IDLE_PER_HOST", "2"), ("TOKENPROXY_PROXY__WORKERS", "1")],
    );

    // Eight requests that overlap (each takes a second upstream) need eight upstream connections.
    let client = tp.client();
    let burst = (0..8).map(|_| {
        let client = client.clone();
        let url = mock.url("/slow");
        async move { client.get(url).send().await.map(|r| r.status()) }
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(mock.seen().len(), 8);
    // Afterwards only two stay open for reuse; the others are closed, not kept forever.
    eventually(Duration::from_secs(5), "idle upstream connections down to 2", || async {
        (mock.open_connections() == 2).then_some(())
    })
    .await;
    // And the two kept are reused: a sequential request opens no new one.
    let r = client.get(mock.url("/again")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.open_connections(), 2);
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_no_secret() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "access_log = true");
    let r = tp.client().get(mock.url("/users/42?api_key=query-secret-value")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = tp.client().get("http://127.0.0.1:1/nowhere").send().await.unwrap();
    assert_eq!(r.status(), 502);

    let lines = eventually(Duration::from_secs(5), "two access log lines", || async {
        let lines: Vec<serde_json::Value> = tp
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tokenproxy::access")
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    let served = &lines[0];
    assert_eq!(served["method"], "GET");
    assert_eq!(served["host"], mock.authority());
    assert_eq!(served["path"], "/users/42", "the query string was logged");
    assert_eq!(served["status"], 200);
    assert_eq!(served["provider"], "api");
    assert_eq!(served["retried"], false);
    assert!(served["duration_us"].as_u64().is_some());
    assert_eq!(lines[1]["status"], 502);
    assert_eq!(lines[1]["provider"], "none");
    for line in tp.logs() {
        assert!(!line.contains("query-secret-value") && !line.contains(TOKEN), "a secret in the log: {line}");
    }

    // Off by default: no access lines.
    let dir = tempdir();
    let quiet = proxy_with_token(dir.path(), &mock, TOKEN, "");
    quiet.client().get(mock.url("/quiet")).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(quiet.logs().iter().all(|l| !l.contains("tokenproxy::access")));
}
