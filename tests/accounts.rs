//! Accounts (SPEC §8): one provider, one token per account, chosen per request by the
//! `Tokenproxy-Account` header, the proxy credentials' user name, or `default_account` — over
//! plain HTTP, intercepted HTTPS and routes, with real clients.

mod support;

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use support::*;

/// Account names that appear nowhere else, so that a log line holding one is found.
const ALICE: &str = "alice.k7q@example.com";
const BOB: &str = "bob-w3x";

fn token_of(provider: &str, account: &str) -> String {
    format!("tok-{provider}-{}", tokenproxy::secrets::fingerprint(account))
}

/// Writes `dir/tokens/<provider>/<account>.json` for each account.
fn write_accounts(dir: &Path, provider: &str, accounts: &[&str]) {
    let folder = dir.join("tokens").join(provider);
    std::fs::create_dir_all(&folder).unwrap();
    for account in accounts {
        std::fs::write(folder.join(format!("{account}.json")), token_json(&token_of(provider, account)))
            .unwrap();
    }
}

/// A multi-account provider `api` for a plain-HTTP mock; `provider_extra` goes into its section,
/// `extra` after it.
fn plain_config(mock: &MockApi, provider_extra: &str, extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
[admin]
listen = "127.0.0.1:0"
[providers.api]
hosts = ["{}"]
token_file = "tokens/api/{{account}}.json"
allow_plaintext = true
{provider_extra}
{extra}
"#,
        mock.authority()
    )
}

/// What the mock's `/whoami` answered.
async fn whoami(client: &reqwest::Client, url: &str, account_header: Option<&str>) -> (u16, String) {
    let mut request = client.get(url);
    if let Some(account) = account_header {
        request = request.header("Tokenproxy-Account", account);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn client_as(tp: &TokenProxy, user: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(tp.proxy_url()).unwrap().basic_auth(user, ""))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// No log line holds an account name or one of `secrets`.
fn assert_logs_name_no_account(tp: &TokenProxy, secrets: &[&str]) {
    for line in tp.logs() {
        for secret in [ALICE, BOB, "carol"].iter().chain(secrets) {
            assert!(!line.contains(secret), "a log line holds {secret:?}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_get_their_own_tokens_under_500_interleaved_requests() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE, BOB]);
    let tp = TokenProxy::start(dir.path(), &plain_config(&mock, "", ""));
    let url = mock.url("/whoami");
    let by_header = tp.client();
    let (as_alice, as_bob) = (client_as(&tp, ALICE), client_as(&tp, BOB));

    let results: Vec<(usize, u16, String)> = futures_util::stream::iter(0..500)
        .map(|i| {
            let (by_header, as_alice, as_bob, url) = (&by_header, &as_alice, &as_bob, &url);
            async move {
                let (status, body) = match i % 4 {
                    0 => whoami(by_header, url, Some(ALICE)).await,
                    1 => whoami(by_header, url, Some(BOB)).await,
                    2 => whoami(as_alice, url, None).await,
                    _ => whoami(as_bob, url, None).await,
                };
                (i, status, body)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(results.len(), 500);
    for (i, status, body) in results {
        let account = if i % 2 == 0 { ALICE } else { BOB };
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(
            body,
            format!("Bearer {}", token_of("api", account)),
            "request {i} carried another account's token"
        );
    }
    // Neither way of naming the account travels on.
    assert!(mock.seen().iter().all(|s| !s.headers.contains_key("tokenproxy-account")));
    assert!(mock.seen().iter().all(|s| !s.headers.contains_key("proxy-authorization")));

    // The admin API shows each account by name; metrics count them and never name them.
    let (status, body) = tp.admin_get("/tokens?provider=api").await;
    assert_eq!(status, 200);
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let accounts: Vec<&str> = views.iter().map(|v| v["account"].as_str().unwrap()).collect();
    assert_eq!(accounts, [ALICE, BOB]);
    for v in &views {
        assert_eq!(v["state"], "valid");
        let token = token_of("api", v["account"].as_str().unwrap());
        assert_eq!(v["fingerprint"], tokenproxy::secrets::fingerprint(&token));
        assert!(!body.contains(&token));
    }
    assert_eq!(tp.metric("tokenproxy_accounts", &[("provider", "api"), ("state", "valid")]).await, 2.0);
    assert_eq!(tp.metric("tokenproxy_accounts", &[("provider", "api"), ("state", "missing")]).await, 0.0);
    let (_, metrics) = tp.admin_get("/metrics").await;
    assert!(!metrics.contains(ALICE) && !metrics.contains(BOB), "an account name became a label");
    assert_eq!(tp.admin_get("/tokens?provider=nope").await.0, 404);
    assert_logs_name_no_account(&tp, &[&token_of("api", ALICE), &token_of("api", BOB)]);
}

/// Two multi-account providers: `plain` (plain HTTP) and `secure` (HTTPS, intercepted), a route
/// to `plain`, and tokenproxy's CA.
struct Both {
    dir: tempfile::TempDir,
    plain: MockApi,
    secure: MockApi,
    tp: TokenProxy,
}

impl Both {
    async fn start() -> Both {
        let dir = tempdir();
        let pki = test_pki(dir.path(), "mock", &["localhost"]);
        let secure = MockApi::start_tls(pki.server_config.clone()).await;
        let plain = MockApi::start().await;
        write_accounts(dir.path(), "plain", &[ALICE, BOB]);
        write_accounts(dir.path(), "secure", &[ALICE, BOB]);
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
[providers.plain]
hosts = ["{plain}"]
token_file = "tokens/plain/{{account}}.json"
allow_plaintext = true
[providers.secure]
hosts = ["localhost:{secure_port}"]
token_file = "tokens/secure/{{account}}.json"
[[routes]]
listen = "127.0.0.1:0"
provider = "plain"
upstream = "http://{plain}"
"#,
            roots = toml_path(&pki.ca_pem_path),
            plain = plain.authority(),
            secure_port = secure.addr.port(),
        );
        let tp = TokenProxy::start(dir.path(), &config);
        Both { dir, plain, secure, tp }
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca/ca.pem").display().to_string()
    }

    fn secure_url(&self) -> String {
        format!("https://localhost:{}/whoami", self.secure.addr.port())
    }

    /// `http://USER@proxy`, as curl takes it.
    fn proxy_as(&self, user: &str) -> String {
        format!("http://{}@{}", user.replace('@', "%40"), self.tp.proxy)
    }

    /// `http://USER:@proxy`: Python `requests` sends proxy credentials only when the URL has a
    /// password part, even an empty one.
    fn proxy_as_for_python(&self, user: &str) -> String {
        format!("http://{}:@{}", user.replace('@', "%40"), self.tp.proxy)
    }
}

fn bearer(provider: &str, account: &str) -> String {
    format!("Bearer {}", token_of(provider, account))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_names_the_account_as_proxy_user_or_header_over_plain_http_and_intercepted_https() {
    let s = Both::start().await;
    if !curl_available() {
        return;
    }
    let plain_url = s.plain.url("/whoami");
    let (secure_url, ca, proxy) = (s.secure_url(), s.ca(), s.tp.proxy_url());
    let cases: [(&[&str], String); 5] = [
        (&["-x", &s.proxy_as(ALICE), &plain_url], bearer("plain", ALICE)),
        (&["-x", &proxy, "-H", &format!("Tokenproxy-Account: {BOB}"), &plain_url], bearer("plain", BOB)),
        (&["-x", &s.proxy_as(ALICE), "--cacert", &ca, &secure_url], bearer("secure", ALICE)),
        (
            &["-x", &proxy, "--cacert", &ca, "-H", &format!("Tokenproxy-Account: {BOB}"), &secure_url],
            bearer("secure", BOB),
        ),
        // The header comes first in the selection order.
        (
            &[
                "-x",
                &s.proxy_as(ALICE),
                "--cacert",
                &ca,
                "-H",
                &format!("Tokenproxy-Account: {BOB}"),
                &secure_url,
            ],
            bearer("secure", BOB),
        ),
    ];
    for (args, expected) in cases {
        let (ok, out) = curl(args).await;
        assert!(ok, "curl {args:?}: {out}");
        assert_eq!(out, expected, "curl {args:?}");
    }
    assert!(s.secure.seen().iter().all(|r| !r.headers.contains_key("tokenproxy-account")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_names_the_account_in_its_proxy_urls() {
    let s = Both::start().await;
    if !python_requests_available() {
        return;
    }
    let script = format!(
        "proxies = {{'http': '{alice}', 'https': '{bob}'}}\n\
         print(requests.get('{plain}', proxies=proxies, timeout=20).text)\n\
         print(requests.get('{secure}', proxies=proxies, verify='{ca}', timeout=20).text)",
        alice = s.proxy_as_for_python(ALICE),
        bob = s.proxy_as_for_python(BOB),
        plain = s.plain.url("/whoami"),
        secure = s.secure_url(),
        ca = s.ca(),
    );
    let (ok, out, err) = python(&script, &[]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [bearer("plain", ALICE), bearer("secure", BOB)]);

    // As an application is configured: the proxy variables with the account in them.
    let script = format!("print(requests.get('{}', timeout=20).text)", s.secure_url());
    let (proxy, ca) = (s.proxy_as_for_python(ALICE), s.ca());
    let env = [("HTTPS_PROXY", proxy.as_str()), ("REQUESTS_CA_BUNDLE", ca.as_str())];
    let (ok, out, err) = python(&script, &env).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), bearer("secure", ALICE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_names_no_account_gets_407_on_the_forward_port_and_400_in_a_tunnel_or_on_a_route() {
    let s = Both::start().await;
    // Forward port: 407 asks for proxy credentials, which can name the account.
    let r = s.tp.client().get(s.plain.url("/whoami")).send().await.unwrap();
    assert_eq!(r.status(), 407);
    assert_eq!(r.headers()["proxy-authenticate"], "Basic realm=\"tokenproxy\"");
    assert_eq!(r.headers()["x-tokenproxy-error"], "account_required");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "account_required");
    let action = body["action"].as_str().unwrap();
    assert!(action.contains("Tokenproxy-Account"), "{body}");
    // The proxy URL it suggests works in Python requests as written: with the colon (without
    // it, requests sends no credentials at all).
    assert!(action.contains("http://ACCOUNT:@HOST:PORT") && !action.contains("ACCOUNT@"), "{action}");
    if python_requests_available() {
        let proxy_url = action.split("HTTP_PROXY=").nth(1).unwrap().split(',').next().unwrap();
        let proxy_url = proxy_url.replace("ACCOUNT", ALICE).replace("HOST:PORT", &s.tp.proxy.to_string());
        let script = format!(
            "r = requests.get({url:?}, proxies={{'http': {proxy_url:?}}}, timeout=20)\nprint(r.status_code, r.text)",
            url = s.plain.url("/whoami")
        );
        let (ok, out, err) = python(&script, &[]).await;
        assert!(ok, "{out}{err}");
        assert_eq!(out.trim(), format!("200 {}", bearer("plain", ALICE)), "{proxy_url}");
    }

    // Inside a tunnel: the CONNECT itself is never refused for lack of an account; the request
    // in it gets 400.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(s.ca()).unwrap()).unwrap();
    let tunnel = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(s.tp.proxy_url()).unwrap())
        .tls_certs_only([ca.clone()])
        .build()
        .unwrap();
    let r = tunnel.get(s.secure_url()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-tokenproxy-error"], "account_required");
    assert!(r.headers().get("proxy-authenticate").is_none());
    // The same tunnel's client naming the account in the header is served.
    let (status, body) = whoami(&tunnel, &s.secure_url(), Some(ALICE)).await;
    assert_eq!((status, body), (200, bearer("secure", ALICE)));

    // A route: 400, and the header works there too.
    let route = format!("http://{}/whoami", s.tp.routes[0]);
    let plain_client = reqwest::Client::new();
    let r = plain_client.get(&route).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-tokenproxy-error"], "account_required");
    assert_eq!(whoami(&plain_client, &route, Some(BOB)).await, (200, bearer("plain", BOB)));
    assert!(
        s.plain.seen().iter().all(|r| r.authorization().is_some()),
        "no request went out without a token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_account_serves_requests_that_name_none_and_is_loaded_at_start() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE, BOB]);
    let tp = TokenProxy::start(dir.path(), &plain_config(&mock, &format!("default_account = \"{BOB}\""), ""));
    // Loaded at start: on /tokens before any request; alice is not loaded until she is used.
    let view = tp.token_view("api").await;
    assert_eq!(view["account"], BOB);
    assert_eq!(view["state"], "valid");
    assert_eq!(whoami(&tp.client(), &mock.url("/whoami"), None).await, (200, bearer("api", BOB)));
    assert_eq!(whoami(&tp.client(), &mock.url("/whoami"), Some(ALICE)).await, (200, bearer("api", ALICE)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_account_names_are_refused_and_nothing_outside_the_folder_is_opened() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE]);
    // What `../secret` would open if a name reached the file system unchecked.
    std::fs::write(dir.path().join("tokens/secret.json"), token_json("tok-outside-the-folder")).unwrap();
    let tp = TokenProxy::start(dir.path(), &plain_config(&mock, "", ""));
    let listing = |d: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let (folder, parent) = (dir.path().join("tokens/api"), dir.path().join("tokens"));
    let before = (listing(&folder), listing(&parent));
    let long = "x".repeat(129);
    let bad = ["../secret", "..", ".secret", "a/b", "a\\b", &long, "", "%2e%2e%2fsecret", "{account}", "a b"];
    for name in bad {
        for by_user in [false, true] {
            let r = if by_user {
                client_as(&tp, name).get(mock.url("/whoami")).send().await.unwrap()
            } else {
                tp.client().get(mock.url("/whoami")).header("Tokenproxy-Account", name).send().await.unwrap()
            };
            // An empty user name names no account (407); every other bad name is refused.
            if by_user && name.is_empty() {
                assert_eq!(r.status(), 407);
                continue;
            }
            assert_eq!(r.status(), 400, "{name:?} (proxy user: {by_user})");
            assert_eq!(r.headers()["x-tokenproxy-error"], "bad_account");
            let body = r.text().await.unwrap();
            assert!(name.len() < 3 || !body.contains(name), "the refusal repeats the name: {body}");
        }
    }
    // Bytes that are not text at all.
    let r = tp
        .client()
        .get(mock.url("/whoami"))
        .header("Tokenproxy-Account", reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(mock.seen().is_empty(), "a refused request reached the upstream");
    assert_eq!((listing(&folder), listing(&parent)), before, "a file was created for a bad name");
    assert_eq!(tp.admin_get("/tokens").await.1.matches("\"account\"").count(), 0, "a bad name was loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_a_token_file_gets_502_naming_authorize_and_works_once_the_file_exists() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    write_accounts(dir.path(), "api", &[ALICE]);
    let tp =
        TokenProxy::start(dir.path(), &plain_config(&mock, "", &endpoint.oauth_toml("api", "refresh_token")));
    let r = tp.client().get(mock.url("/whoami")).header("Tokenproxy-Account", "carol").send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["account"], "carol");
    let action = body["action"].as_str().unwrap();
    assert!(action.contains("tokenproxy authorize api --account carol"), "{action}");
    assert!(action.contains("/connect"), "{action}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("has no token yet") && !reason.contains("invalid_grant"), "{reason}");
    assert_eq!(endpoint.calls(), 0, "nothing to refresh without a refresh token");
    assert!(mock.seen().is_empty());
    // Names that requests make up do not pile up: carol is not kept, and no lock file was made.
    assert!(!tp.admin_get("/tokens").await.1.contains("carol"));
    assert!(!dir.path().join("tokens/api/carol.json.lock").exists());

    // A person writes carol's token (as `tokenproxy authorize` will): used without a restart.
    write_accounts(dir.path(), "api", &["carol"]);
    assert_eq!(
        whoami(&tp.client(), &mock.url("/whoami"), Some("carol")).await,
        (200, bearer("api", "carol"))
    );
    assert_logs_name_no_account(&tp, &[&token_of("api", "carol")]);
}

/// A multi-account provider with a token endpoint: each account's file holds its own refresh
/// token `rt-<account>`, which the endpoint accepts.
async fn with_refresh(
    expires_in_s: i64,
    provider_extra: &str,
) -> (tempfile::TempDir, MockApi, MockTokenEndpoint, TokenProxy) {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    let folder = dir.path().join("tokens/api");
    std::fs::create_dir_all(&folder).unwrap();
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(expires_in_s);
    let expires = expires.format(&time::format_description::well_known::Rfc3339).unwrap();
    for account in [ALICE, BOB] {
        let doc = serde_json::json!({
            "access_token": token_of("api", account),
            "refresh_token": format!("rt-{}", tokenproxy::secrets::fingerprint(account)),
            "expires_at": expires,
        });
        std::fs::write(folder.join(format!("{account}.json")), doc.to_string()).unwrap();
        endpoint.allow_refresh_token(&format!("rt-{}", tokenproxy::secrets::fingerprint(account)));
    }
    mock.accept_only(&[&token_of("api", ALICE), &token_of("api", BOB)]);
    let tp = TokenProxy::start(
        dir.path(),
        &plain_config(&mock, provider_extra, &endpoint.oauth_toml("api", "refresh_token")),
    );
    (dir, mock, endpoint, tp)
}

fn file_token(dir: &Path, account: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("tokens/api/{account}.json"))).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["access_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_for_one_account_refreshes_only_that_account() {
    let (dir, mock, endpoint, tp) = with_refresh(3600, "").await;
    let url = mock.url("/whoami");
    assert_eq!(whoami(&tp.client(), &url, Some(BOB)).await, (200, bearer("api", BOB)));
    // The provider revokes alice's access token.
    mock.accept_only(&[&token_of("api", BOB)]);
    let (status, body) = whoami(&tp.client(), &url, Some(ALICE)).await;
    assert_eq!(status, 200, "refreshed and retried: {body}");
    let fresh = body.strip_prefix("Bearer ").unwrap().to_string();
    assert_ne!(fresh, token_of("api", ALICE));
    assert_eq!(endpoint.calls(), 1);
    assert_eq!(
        endpoint.last_form()["refresh_token"],
        format!("rt-{}", tokenproxy::secrets::fingerprint(ALICE))
    );
    // On disk: alice's file holds the new token, bob's is untouched.
    assert_eq!(file_token(dir.path(), ALICE), fresh);
    assert_eq!(file_token(dir.path(), BOB), token_of("api", BOB));
    assert_eq!(whoami(&tp.client(), &url, Some(BOB)).await, (200, bearer("api", BOB)));

    let (_, body) = tp.admin_get("/tokens?provider=api").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let view = |account: &str| views.iter().find(|v| v["account"] == account).unwrap().clone();
    assert_eq!(
        (view(ALICE)["refresh_count"].as_u64(), view(ALICE)["retry_count"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!((view(BOB)["refresh_count"].as_u64(), view(BOB)["retry_count"].as_u64()), (Some(0), Some(0)));
    assert_logs_name_no_account(&tp, &[&fresh, &token_of("api", ALICE), &token_of("api", BOB)]);
    // Each line names the account once (the 401 line said it twice).
    let rejected: Vec<String> =
        tp.logs().into_iter().filter(|l| l.contains("upstream rejected the token")).collect();
    assert!(!rejected.is_empty());
    for line in tp.logs() {
        assert!(line.matches("\"account\":").count() <= 1, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_account_leaves_readyz_at_200_but_a_wrong_client_makes_the_provider_unready() {
    let (_dir, mock, endpoint, tp) = with_refresh(3600, "").await;
    for account in [ALICE, BOB] {
        assert_eq!(whoami(&tp.client(), &mock.url("/whoami"), Some(account)).await.0, 200);
    }
    // Alice revokes access: her manual refresh fails with invalid_grant.
    endpoint.script(&[(400, r#"{"error":"invalid_grant"}"#)]);
    let post = |query: &str| {
        let url = format!("http://{}/tokens/api/refresh{query}", tp.admin);
        async move { reqwest::Client::new().post(url).send().await.unwrap() }
    };
    let r = post(&format!("?account={}", ALICE.replace('@', "%40"))).await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["action"].as_str().unwrap().contains(&format!("--account {ALICE}")), "{body}");
    let (_, body) = tp.admin_get("/tokens?provider=api").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(views.iter().find(|v| v["account"] == ALICE).unwrap()["state"], "needs_reauth");
    assert_eq!(tp.admin_get("/readyz").await.0, 200, "one user's revocation took the pod out of service");
    assert_eq!(
        tp.metric("tokenproxy_accounts", &[("provider", "api"), ("state", "needs_reauth")]).await,
        1.0
    );

    // Without an account, a manual refresh of a multi-account provider is a 400.
    let r = post("").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-tokenproxy-error"], "account_required");

    // A wrong client secret is every account's problem: the provider is not ready.
    endpoint.script(&[(401, r#"{"error":"invalid_client"}"#)]);
    assert_eq!(post(&format!("?account={BOB}")).await.status(), 502);
    let (status, body) = tp.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"api\"") && body.contains("invalid_client"), "{body}");
    // It recovers with the next successful refresh.
    assert_eq!(post(&format!("?account={BOB}&force=true")).await.status(), 200);
    assert_eq!(tp.admin_get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_accounts_are_not_refreshed_on_a_timer_and_an_account_in_use_is_kept_fresh() {
    // Both tokens are inside the 5-minute refresh margin from the start; bob is loaded at start
    // (the default account) and never used.
    let (dir, mock, endpoint, tp) = with_refresh(120, &format!("default_account = \"{BOB}\"")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(endpoint.calls(), 0, "an idle account was refreshed on a timer");
    assert_eq!(tp.token_view("api").await["state"], "expiring");

    // Alice's request is served at once with her current token, and starts one refresh.
    let url = mock.url("/whoami");
    assert_eq!(whoami(&tp.client(), &url, Some(ALICE)).await, (200, bearer("api", ALICE)));
    eventually(Duration::from_secs(10), "alice's token refreshed ahead of expiry", || async {
        (file_token(dir.path(), ALICE) != token_of("api", ALICE)).then_some(())
    })
    .await;
    let fresh = file_token(dir.path(), ALICE);
    eventually(Duration::from_secs(5), "the next request carries the fresh token", || async {
        (whoami(&tp.client(), &url, Some(ALICE)).await.1 == format!("Bearer {fresh}")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(endpoint.calls(), 1, "one refresh, for the account in use");
    assert_eq!(file_token(dir.path(), BOB), token_of("api", BOB));
    assert_eq!(
        tp.metric(
            "tokenproxy_refreshes_total",
            &[("provider", "api"), ("trigger", "proactive"), ("result", "ok")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_file_changed_on_disk_is_used_without_a_restart() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE, BOB]);
    let tp = TokenProxy::start(dir.path(), &plain_config(&mock, "", ""));
    let url = mock.url("/whoami");
    assert_eq!(whoami(&tp.client(), &url, Some(ALICE)).await, (200, bearer("api", ALICE)));
    // Rewritten in place, as a person or another tool might.
    std::fs::write(dir.path().join(format!("tokens/api/{ALICE}.json")), token_json("tok-alice-rotated"))
        .unwrap();
    eventually(Duration::from_secs(10), "the rewritten file in use", || async {
        (whoami(&tp.client(), &url, Some(ALICE)).await.1 == "Bearer tok-alice-rotated").then_some(())
    })
    .await;
    assert_eq!(whoami(&tp.client(), &url, Some(BOB)).await, (200, bearer("api", BOB)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_account_provider_ignores_account_names_and_shows_a_null_account() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = proxy_with_token(dir.path(), &mock, "tok-single", "");
    let r = tp
        .client()
        .get(mock.url("/whoami"))
        .header("Tokenproxy-Account", "../anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Bearer tok-single");
    assert!(!mock.last().headers.contains_key("tokenproxy-account"));
    let view = tp.token_view("api").await;
    assert!(view["account"].is_null(), "{view}");
    assert_eq!(tp.metric("tokenproxy_accounts", &[("provider", "api"), ("state", "valid")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_status_show_accounts() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE, BOB]);
    let config = plain_config(&mock, "", "");
    std::fs::write(dir.path().join("tokenproxy.toml"), &config).unwrap();
    let check = || {
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(dir.path().join("tokenproxy.toml"))
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("2 accounts (2 valid)"), "{out}");
    assert!(out.lines().any(|l| l.contains(ALICE) && l.contains("valid")), "{out}");
    assert!(out.lines().any(|l| l.contains(BOB) && l.contains("valid")), "{out}");
    // A broken account file is a problem that names the account.
    std::fs::write(dir.path().join("tokens/api/carol.json"), "{not json").unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().any(|l| l.starts_with("problem: providers.api account carol")), "{out}");
    std::fs::remove_file(dir.path().join("tokens/api/carol.json")).unwrap();
    // An account's file that others can read is warned about, like a provider's token file.
    use std::os::unix::fs::PermissionsExt;
    let bob_file = dir.path().join(format!("tokens/api/{BOB}.json"));
    let alice_file = dir.path().join(format!("tokens/api/{ALICE}.json"));
    std::fs::set_permissions(&alice_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&bob_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("warning: providers.api account token file")
            && l.contains(&format!("{BOB}.json is readable by everyone"))),
        "{out}"
    );
    assert!(!out.contains(&format!("{ALICE}.json is readable")), "{out}");
    std::fs::set_permissions(&bob_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let tp = TokenProxy::start(dir.path(), &config);
    assert_eq!(whoami(&tp.client(), &mock.url("/whoami"), Some(ALICE)).await.0, 200);
    let admin = format!("http://{}", tp.admin);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary()).args(["status", "--admin", &admin]).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.lines().next().unwrap().contains("ACCOUNT"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("api") && l.contains(ALICE) && l.contains("valid")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_outside_the_file_name_or_a_default_without_accounts_is_a_config_error() {
    let dir = tempdir();
    let cases = [
        ("token_file = \"tokens/{account}/api.json\"", "{account} may appear once, in the file name only"),
        ("token_file = \"{account}-{account}.json\"", "{account} may appear once"),
        (
            "token_file = \"api.json\"\ndefault_account = \"alice\"",
            "only a multi-account provider has accounts",
        ),
        (
            "token_file = \"t/{account}.json\"\ndefault_account = \"../x\"",
            "default_account: an account name cannot start with '.'",
        ),
    ];
    for (provider, expected) in cases {
        let config = format!("[providers.api]\nhosts = [\"api.invalid\"]\n{provider}\n");
        std::fs::write(dir.path().join("bad.toml"), config).unwrap();
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(dir.path().join("bad.toml"))
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{provider}: {text}");
        assert!(text.contains(expected), "{provider}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_account_by_its_fingerprint() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE]);
    let tp = TokenProxy::start_with_env(
        dir.path(),
        &plain_config(&mock, "", ""),
        &[("TOKENPROXY_PROXY__ACCESS_LOG", "true")],
    );
    assert_eq!(whoami(&tp.client(), &mock.url("/whoami"), Some(ALICE)).await.0, 200);
    let fingerprint = tokenproxy::secrets::fingerprint(ALICE);
    let line = eventually(Duration::from_secs(5), "the access log line", || async {
        tp.logs().into_iter().find(|l| l.contains("tokenproxy::access"))
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["account"], fingerprint.as_str(), "{line}");
    assert_logs_name_no_account(&tp, &[&token_of("api", ALICE)]);
}

/// A fenced block of the README: the first one of `language` after `marker`.
fn readme_block(marker: &str, language: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = &readme[readme.find(marker).unwrap_or_else(|| panic!("README lost {marker:?}"))..];
    let start = after.find(&format!("```{language}\n")).unwrap() + language.len() + 4;
    after[start..][..after[start..].find("```").unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_multi_user_backends_in_python_and_node_work_as_written() {
    let s = Both::start().await;
    let api = format!("https://localhost:{}", s.secure.addr.port());
    let adapt = |code: String| {
        code.replace("https://api.spotify.com", &api)
            .replace("http://127.0.0.1:8080", &s.tp.proxy_url())
            .replace("data/ca/ca.pem", &s.ca())
    };
    let tokens_seen = |s: &Both| -> Vec<String> {
        s.secure.seen().iter().filter_map(|r| r.authorization().map(str::to_string)).collect()
    };

    if python_requests_available() {
        let script = adapt(readme_block("A multi-user backend in Python", "python"))
            + &format!("\nfor user in ['{ALICE}', '{BOB}']:\n    print(top_tracks(user).status_code)\n");
        let (ok, out, err) = python(&script, &[]).await;
        assert!(ok, "{err}");
        assert_eq!(out.lines().collect::<Vec<_>>(), ["200", "200"]);
        assert_eq!(tokens_seen(&s), [bearer("secure", ALICE), bearer("secure", BOB)]);
    }

    let node_modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-clients/node_modules");
    let node_ok = client_available(
        "node with undici (npm install --prefix target/node-clients undici@6)",
        std::process::Command::new("node")
            .args(["-e", "require('undici').ProxyAgent"])
            .env("NODE_PATH", &node_modules),
    );
    if node_ok {
        let before = tokens_seen(&s).len();
        let script = adapt(readme_block("And in Node.js", "js"))
            + &format!(
                "\n(async () => {{ for (const u of ['{BOB}', '{ALICE}']) console.log((await topTracks(u)).path); }})()\
                 .catch(e => {{ console.error(e); process.exit(1); }});\n"
            );
        let out = tokio::process::Command::new("node")
            .args(["-e", &script])
            .env("NODE_PATH", &node_modules)
            .env("NODE_EXTRA_CA_CERTS", s.ca())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout.lines().collect::<Vec<_>>(), ["/v1/me/top/tracks", "/v1/me/top/tracks"]);
        assert_eq!(tokens_seen(&s)[before..], [bearer("secure", BOB), bearer("secure", ALICE)]);
    }
}

/// Two `Tokenproxy-Account` headers that differ are `400 bad_account` on every path (SPEC §5):
/// the hand-written relay (a bodiless GET) and hyper's (a POST with a body) decide alike, and
/// the same name twice is that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_account_headers_are_refused_on_every_path() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    write_accounts(dir.path(), "api", &[ALICE, BOB]);
    let tp = TokenProxy::start(dir.path(), &plain_config(&mock, "", ""));
    for post in [false, true] {
        for order in [[ALICE, BOB], [BOB, ALICE]] {
            let mut headers = reqwest::header::HeaderMap::new();
            for account in order {
                headers.append("tokenproxy-account", account.parse().unwrap());
            }
            let request = if post {
                tp.client().post(mock.url("/whoami")).body("a body")
            } else {
                tp.client().get(mock.url("/whoami"))
            };
            let r = request.headers(headers).send().await.unwrap();
            assert_eq!(r.status(), 400, "post: {post}, {order:?}");
            assert_eq!(r.headers()["x-tokenproxy-error"], "bad_account");
        }
        let mut same = reqwest::header::HeaderMap::new();
        same.append("tokenproxy-account", BOB.parse().unwrap());
        same.append("tokenproxy-account", BOB.parse().unwrap());
        let request = if post {
            tp.client().post(mock.url("/whoami")).body("x")
        } else {
            tp.client().get(mock.url("/whoami"))
        };
        let r = request.headers(same).send().await.unwrap();
        assert_eq!(r.status(), 200, "post: {post}");
        assert_eq!(mock.last().authorization(), Some(format!("Bearer {}", token_of("api", BOB)).as_str()));
    }
    assert_eq!(mock.seen().len(), 2, "only the two requests that named one account reached the upstream");
}

/// An account whose stored document cannot be used (not JSON, a token that cannot stand in a
/// header) is said to be exactly that, on the 502 and on `/tokens`, where it stays listed; it is
/// not "invalid_grant: no token file yet" (the refresh token was never refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_whose_stored_document_cannot_be_used_says_what_is_wrong() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    write_accounts(dir.path(), "api", &[ALICE]);
    let folder = dir.path().join("tokens/api");
    std::fs::write(folder.join("carol.json"), "{\"access_token\": \"at-cut-off").unwrap();
    std::fs::write(folder.join("dave.json"), r#"{"access_token": "at-bad\u0001token"}"#).unwrap();
    let tp =
        TokenProxy::start(dir.path(), &plain_config(&mock, "", &endpoint.oauth_toml("api", "refresh_token")));
    for (account, said) in [("carol", "not valid JSON"), ("dave", "not allowed in an HTTP header")] {
        let r =
            tp.client().get(mock.url("/whoami")).header("Tokenproxy-Account", account).send().await.unwrap();
        assert_eq!(r.status(), 502, "{account}");
        let body: serde_json::Value = r.json().await.unwrap();
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains(said) && !reason.contains("invalid_grant"), "{account}: {reason}");
        assert!(!reason.contains("at-cut-off") && !reason.contains("at-bad"), "{reason}");
        let (_, tokens) = tp.admin_get("/tokens?provider=api").await;
        let views: Vec<serde_json::Value> = serde_json::from_str(&tokens).unwrap();
        let view = views
            .iter()
            .find(|v| v["account"] == account)
            .unwrap_or_else(|| panic!("{account} is not listed: {tokens}"));
        assert_eq!(view["state"], "error", "{view}");
        assert!(view["last_error"].as_str().unwrap().contains(said), "{view}");
    }
    assert_eq!(endpoint.calls(), 0);
}

/// A `client_credentials` provider with accounts (a grant that needs no person): a name whose
/// first token call fails is not kept, leaves no file, and for a minute costs no further token
/// call however often it is asked for; a name whose call succeeds is an account like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_accounts_of_a_client_credentials_provider_cost_one_call_and_leave_nothing() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    let tp = TokenProxy::start(
        dir.path(),
        &plain_config(&mock, "", &endpoint.oauth_toml("api", "client_credentials")),
    );
    const NAMES: usize = 40;
    let refusal = r#"{"error":"invalid_scope","error_description":"no such tenant"}"#;
    endpoint.script(&vec![(400, refusal); NAMES]);
    for round in 0..3 {
        for i in 0..NAMES {
            let r = tp
                .client()
                .get(mock.url("/whoami"))
                .header("Tokenproxy-Account", format!("made-up-{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 502, "round {round}, name {i}");
        }
    }
    assert_eq!(endpoint.calls(), NAMES, "one token call per made-up name, not one per request");
    let folder = dir.path().join("tokens/api");
    let files: Vec<_> =
        std::fs::read_dir(&folder).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(files.is_empty(), "files left behind: {files:?}");
    assert!(!tp.admin_get("/tokens").await.1.contains("made-up"), "a made-up name is kept");
    // A name whose token call succeeds is kept, with its file.
    let (status, body) = whoami(&tp.client(), &mock.url("/whoami"), Some("tenant-a")).await;
    assert_eq!(status, 200, "{body}");
    assert!(folder.join("tenant-a.json").exists());
    assert!(tp.admin_get("/tokens").await.1.contains("tenant-a"));
}
