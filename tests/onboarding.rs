//! Onboarding (SPEC §9): the browser flow through the real proxy's admin listener, driven by a
//! cookie-keeping client, against a mock provider whose authorization endpoint consents or
//! denies and whose token endpoint checks the PKCE verifier and the redirect URI; the device
//! flow through `tokenproxy authorize --device`; `tokenproxy authorize` in browser mode.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use support::*;

struct Setup {
    api: MockApi,
    endpoint: MockTokenEndpoint,
    admin_port: u16,
}

impl Setup {
    async fn new(auth: AuthStyle) -> Setup {
        let api = MockApi::start().await;
        let mut endpoint = MockTokenEndpoint::new(Some(&api));
        endpoint.auth = auth;
        let endpoint = endpoint.start().await;
        Setup { api, endpoint, admin_port: fixed_port() }
    }

    /// The multi-account config, written where `tokenproxy authorize --config` reads it.
    fn write_config(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("tokenproxy.toml");
        std::fs::write(&path, self.config(false, "", "")).unwrap();
        path
    }

    /// A multi-account provider `people` (or single-account `solo` when `single`) with the
    /// browser and device flows on the mock.
    fn config(&self, single: bool, oauth_extra: &str, onboarding_extra: &str) -> String {
        let (name, token_file) =
            if single { ("solo", "tokens/solo.json") } else { ("people", "tokens/{account}.json") };
        let oauth = self.endpoint.oauth_toml(name, "refresh_token");
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{port}"
[onboarding]
state_dir = "state"
{onboarding_extra}
[providers.{name}]
hosts = ["{host}"]
token_file = "{token_file}"
allow_plaintext = true
{oauth}scope = "read write"
authorize_url = "{authorize}"
device_authorization_url = "{device}"
authorize_params = {{ access_type = "offline", prompt = "consent" }}
{oauth_extra}
"#,
            port = self.admin_port,
            host = self.api.authority(),
            authorize = self.endpoint.authorize_url(),
            device = self.endpoint.device_url(),
        )
    }
}

fn query(url: &str) -> std::collections::HashMap<String, String> {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned(),
            )
        })
        .collect()
}

/// Chromium, ChromeDriver and selenium for the tests that drive a real browser.
fn chromium_available() -> bool {
    client_available(
        "chromium with chromedriver and selenium",
        std::process::Command::new("python3").args([
            "-c",
            "import selenium, shutil, sys; sys.exit(not (shutil.which('chromium') and shutil.which('chromedriver')))",
        ]),
    )
}

/// Runs a browser script of `tests/` with `args` (no proxy variables) and returns what it
/// printed (`key value` lines, see [`said_in`]). Fails the test when the script fails.
async fn browser_script(script: &str, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new("python3");
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script)).args(args);
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"] {
        command.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output()).await.unwrap().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{printed}\n{}", String::from_utf8_lossy(&out.stderr));
    printed
}

/// The value of a `key value` line a browser script printed.
fn said_in(printed: &str, key: &str) -> String {
    printed.lines().find_map(|l| l.strip_prefix(&format!("{key} "))).unwrap_or_default().to_string()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn the_browser_flow_connects_an_account_with_pkce_and_the_proxy_uses_its_token_at_once() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let admin = format!("http://{}", proxy.admin);

    // Before: alice has no token; a request for her says how to connect.
    let before = proxy
        .client()
        .get(setup.api.url("/v1/me"))
        .header("tokenproxy-account", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(before.status(), StatusCode::BAD_GATEWAY);
    let body = before.text().await.unwrap();
    assert!(
        body.contains("tokenproxy authorize people --account alice") && body.contains("/connect"),
        "{body}"
    );

    let mut browser = Browser::new();
    let start = browser.get(&format!("{admin}/connect/people?account=alice")).await;
    assert_eq!(start.status(), StatusCode::FOUND);
    let set_cookie = start.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"), "{set_cookie}");
    let authorize = location(&start);
    assert!(authorize.starts_with(&setup.endpoint.authorize_url()), "{authorize}");
    let params = query(&authorize);
    let redirect_uri = format!("http://127.0.0.1:{}/oauth/callback", setup.admin_port);
    assert_eq!(params["response_type"], "code");
    assert_eq!(params["client_id"], setup.endpoint.client_id);
    assert_eq!(params["redirect_uri"], redirect_uri);
    assert_eq!(params["scope"], "read write");
    assert_eq!(params["code_challenge_method"], "S256");
    assert_eq!(params["code_challenge"].len(), 43);
    assert_eq!(params["access_type"], "offline");
    assert_eq!(params["prompt"], "consent");
    let state = params["state"].clone();
    assert!(state.len() >= 43);

    // The pending flow is on disk, named by the state's hash, without the state in it.
    let pending: Vec<_> = std::fs::read_dir(dir.path().join("state")).unwrap().flatten().collect();
    assert_eq!(pending.len(), 1);
    let text = std::fs::read_to_string(pending[0].path()).unwrap();
    assert!(!text.contains(&state) && !pending[0].file_name().to_string_lossy().contains(&state));

    let consent = browser.get(&authorize).await;
    let callback = location(&consent);
    assert!(callback.starts_with(&redirect_uri), "{callback}");
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"), "{page}");
    assert!(page.contains("Connected") && page.contains("account alice"), "{page}");

    // The exchange presented the code, the redirect URI, the verifier and Basic client auth
    // (the mock refuses anything else), and the file holds every field of the answer.
    let form = setup.endpoint.last_form();
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["redirect_uri"], redirect_uri);
    assert_eq!(form["code_verifier"].len(), 43);
    let file = dir.path().join("tokens/alice.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let doc = read_json(&file);
    let access = doc["access_token"].as_str().unwrap().to_string();
    assert!(access.starts_with("at-"));
    assert!(doc["refresh_token"].as_str().unwrap().starts_with("rt-"));
    assert_eq!(doc["token_type"], "Bearer");
    assert_eq!(doc["expires_in"], 3600);
    assert!(doc["expires_at"].is_string() && doc["updated_at"].is_string());

    // Adopted at once: the very next request carries it (no watcher delay to wait out).
    let after = proxy
        .client()
        .get(setup.api.url("/v1/me"))
        .header("tokenproxy-account", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::OK);
    assert_eq!(setup.api.last().authorization(), Some(format!("Bearer {access}").as_str()));
    assert_eq!(
        proxy.metric("tokenproxy_authorizations_total", &[("provider", "people"), ("result", "ok")]).await,
        1.0
    );

    // Used once: the same callback again is refused, and the state folder is empty.
    let (status, result, _) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::BAD_REQUEST, "state_unknown"));
    assert_eq!(std::fs::read_dir(dir.path().join("state")).unwrap().count(), 0);

    // The outcome the command polls.
    let (status, body) = proxy.admin_get("/connect/people/outcome?account=alice").await;
    assert_eq!(status, StatusCode::OK);
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["result"], "ok");
    assert_eq!(outcome["fingerprint"], fingerprint(&access));

    // No log line holds the code, the state, a token or the account's name.
    for line in proxy.logs() {
        for secret in [state.as_str(), access.as_str(), "code-", "alice", params["code_challenge"].as_str()] {
            assert!(!line.contains(secret), "{secret:?} in log line {line}");
        }
    }
}

#[tokio::test]
async fn a_reconnect_replaces_a_revoked_token_and_clears_needs_reauth_and_pkce_can_be_off() {
    let setup = Setup::new(AuthStyle::Post).await;
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    std::fs::write(
        dir.path().join("tokens/solo.json"),
        r#"{"access_token":"old-dead","refresh_token":"revoked","expires_at":"2000-01-01T00:00:00Z","custom":"kept?"}"#,
    )
    .unwrap();
    let proxy = TokenProxy::start(dir.path(), &setup.config(true, "pkce = false", ""));
    // The revoked refresh token puts the provider into needs_reauth.
    let (_, _) = proxy.admin_get("/readyz").await;
    let refused = reqwest::Client::new()
        .post(format!("http://{}/tokens/solo/refresh", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.token_view("solo").await["state"], "needs_reauth");

    let mut browser = Browser::new();
    let callback = browser.consent(&format!("http://{}/connect/solo", proxy.admin)).await;
    let authorize = &setup.endpoint.authorize_requests()[0];
    assert!(!authorize.contains_key("code_challenge") && !authorize.contains_key("code_challenge_method"));
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"), "{page}");
    let form = setup.endpoint.last_form();
    assert!(!form.contains_key("code_verifier"), "no verifier without a challenge");
    assert_eq!(form["client_secret"], setup.endpoint.client_secret, "client_auth = post");

    let view = proxy.token_view("solo").await;
    assert_eq!(view["state"], "valid", "{view}");
    let doc = read_json(&dir.path().join("tokens/solo.json"));
    assert_ne!(doc["access_token"], "old-dead");
    assert!(doc.get("custom").is_none(), "a reconnect replaces the file: {doc}");
    assert_eq!(view["fingerprint"], fingerprint(doc["access_token"].as_str().unwrap()));
    let (status, _) = proxy.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn every_failure_has_its_own_answer_and_nothing_says_connected() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", "state_ttl = \"1s\""));
    let admin = format!("http://{}", proxy.admin);
    let count = |result: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric("tokenproxy_authorizations_total", &[("provider", "people"), ("result", result)])
                .await
        }
    };

    // The person says no.
    setup.endpoint.set_consent(Consent::Deny);
    let mut browser = Browser::new();
    let callback = browser.consent(&format!("{admin}/connect/people?account=bob")).await;
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::FORBIDDEN, "access_denied"));
    assert!(page.contains("Not connected") && !page.contains(">Connected<"), "{page}");
    assert_eq!(count("access_denied").await, 1.0);
    setup.endpoint.set_consent(Consent::Allow);

    // A callback from another browser (no cookie) is refused and does not use the flow up.
    let callback = browser.consent(&format!("{admin}/connect/people?account=bob")).await;
    let (status, result, _) = Browser::new().finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::BAD_REQUEST, "state_unknown"));
    // A state never issued.
    let (_, result, _) = browser.finish(&format!("{admin}/oauth/callback?code=x&state=made-up")).await;
    assert_eq!(result, "state_unknown");
    let unknown = proxy.metric("tokenproxy_authorizations_total", &[("result", "state_unknown")]).await;
    assert_eq!(unknown, 2.0);
    // The right browser still finishes the first flow, were it not for the 1 s state_ttl.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::GONE, "state_expired"), "{page}");
    assert_eq!(count("state_expired").await, 1.0);

    // The token endpoint refuses the client.
    setup.endpoint.script(&[(401, r#"{"error":"invalid_client"}"#)]);
    let callback = browser.consent(&format!("{admin}/connect/people?account=bob")).await;
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::BAD_GATEWAY, "exchange_failed"));
    assert!(page.contains("exchange_failed: invalid_client"), "{page}");
    assert_eq!(count("exchange_failed").await, 1.0);
    assert!(!dir.path().join("tokens/bob.json").exists());

    // The token cannot be written: the token folder is not writable (as root, whom permissions
    // do not stop, the folder's place is taken by a file).
    let tokens = dir.path().join("tokens");
    if running_as_root() {
        std::fs::write(&tokens, "not a folder").unwrap();
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&tokens).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let callback = browser.consent(&format!("{admin}/connect/people?account=bob")).await;
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "write_failed"), "{page}");
    assert!(page.contains(&tokens.display().to_string()) && page.contains("os error"), "{page}");
    assert!(!page.contains(">Connected<"));
    assert_eq!(count("write_failed").await, 1.0);
    assert_eq!(count("ok").await, 0.0);
    let (_, outcome) = proxy.admin_get("/connect/people/outcome?account=bob").await;
    assert!(outcome.contains("write_failed"), "{outcome}");

    // Bad starts are plain refusals, not flows.
    let unknown = browser.get(&format!("{admin}/connect/nope")).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let no_account = browser.get(&format!("{admin}/connect/people")).await;
    assert_eq!(no_account.status(), StatusCode::BAD_REQUEST);
    let bad_account = browser.get(&format!("{admin}/connect/people?account=..%2Fetc")).await;
    assert_eq!(bad_account.status(), StatusCode::BAD_REQUEST);
}

/// A person who opens the page as `localhost` while the callback is `127.0.0.1` would lose the
/// cookie between the two: the start moves to the callback's host first.
#[tokio::test]
async fn a_flow_starts_on_the_callbacks_host_so_the_cookie_reaches_it() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let _proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let mut browser = Browser::new();
    let moved =
        browser.get(&format!("http://localhost:{}/connect/people?account=kim", setup.admin_port)).await;
    assert_eq!(moved.status(), StatusCode::FOUND);
    assert!(moved.headers().get("set-cookie").is_none(), "no cookie for the wrong host");
    assert_eq!(location(&moved), format!("http://127.0.0.1:{}/connect/people?account=kim", setup.admin_port));
    let callback = browser.consent(&location(&moved)).await;
    let (_, result, _) = browser.finish(&callback).await;
    assert_eq!(result, "ok");
}

#[tokio::test]
async fn a_flow_started_before_a_restart_finishes_after_it() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let config = setup.config(false, "", "");
    let mut proxy = TokenProxy::start(dir.path(), &config);
    let mut browser = Browser::new();
    let callback = browser.consent(&format!("http://{}/connect/people?account=carol", proxy.admin)).await;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);

    let proxy = TokenProxy::start(dir.path(), &config);
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"), "{page}");
    let view = proxy.token_view("people").await;
    assert_eq!(
        (&view["account"], &view["state"]),
        (&serde_json::json!("carol"), &serde_json::json!("valid"))
    );
}

#[tokio::test]
async fn the_connect_page_lists_accounts_and_escapes_what_it_shows() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    std::fs::write(dir.path().join("tokens/dave.json"), token_json("at-dave")).unwrap();
    // A file that does not parse: its error text reaches the page, escaped.
    std::fs::write(
        dir.path().join("tokens/eve.json"),
        "{\"access_token\": \"<script>x</script>\", \"expires_at\": \"<b>\"}",
    )
    .unwrap();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let (status, page) = proxy.admin_get("/connect").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("data-account=\"dave\"") && page.contains("data-account=\"eve\""), "{page}");
    assert!(page.contains(r#"action="/connect/people""#) && page.contains(r#"name="account" value="dave""#));
    assert!(page.contains(r#"method="post""#) && page.contains("Reconnect"), "{page}");
    assert!(page.contains("name=\"account\""), "an account-name field for a multi-account provider");
    assert!(!page.contains("<script>x") && !page.contains("<b>"), "{page}");
    for external in ["http://", "https://", "//cdn"] {
        let outside: Vec<&str> = page
            .match_indices(external)
            .map(|(i, _)| &page[i.saturating_sub(30)..(i + 40).min(page.len())])
            .collect();
        assert!(outside.is_empty(), "the page refers to something outside it: {outside:?}");
    }
}

/// The page in a real browser at phone width: type an account name, click Connect, click Allow
/// on the mock's consent page, read the result, go back and see the account connected with a
/// live countdown. Screenshots are saved under `target/screenshots/` for review.
#[tokio::test]
async fn the_connect_page_works_in_a_real_headless_browser() {
    if !chromium_available() {
        return;
    }
    let setup = Setup::new(AuthStyle::Basic).await;
    setup.endpoint.set_consent(Consent::Page);
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let admin = format!("http://{}", proxy.admin);
    let printed =
        browser_script("connect_browser.py", &[&admin, "people", "zoe@example.com", shots.to_str().unwrap()])
            .await;
    let said = |key: &str| said_in(&printed, key);
    assert_eq!(said("result"), "ok", "{printed}");
    assert!(said("sentence").starts_with("Connected"), "{printed}");
    assert_eq!(said("state"), "valid", "{printed}");
    assert_eq!(said("button"), "Reconnect", "{printed}");
    let countdown = said("countdown");
    let (first, later) = countdown.split_once(" | ").unwrap();
    assert!(first.starts_with("expires in") && first != later, "the countdown moves: {countdown}");
    assert_eq!(said("overflows"), "False", "the page fits a phone's width");
    for shot in ["connect-result.png", "connect-page.png"] {
        assert!(std::fs::metadata(shots.join(shot)).unwrap().len() > 1000, "{shot}");
    }
    // The account is connected for real: a request for it carries its token.
    let response = proxy
        .client()
        .get(setup.api.url("/v1/me"))
        .header("tokenproxy-account", "zoe@example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Python `requests` as the cookie-keeping client a script would use: a Session follows the
/// redirects through /connect, the consent and the callback with its cookie jar.
#[tokio::test]
async fn python_requests_session_follows_the_whole_flow() {
    if !python_requests_available() {
        return;
    }
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let script = format!(
        r#"
s = requests.Session()
s.trust_env = False
r = s.get("http://{admin}/connect/people?account=yan", timeout=20)
print(r.status_code, r.headers.get("x-tokenproxy-authorization"), len(r.history))
"#,
        admin = proxy.admin
    );
    let (ok, out, err) = python(&script, &[]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out.trim(), "200 ok 2", "/connect and the consent redirected, the callback answered");
    assert!(read_json(&dir.path().join("tokens/yan.json"))["access_token"].is_string());
}

/// `tokenproxy authorize` with the proxy not running: it serves the callback itself, prints the
/// link and the countdown, and exits 0 once the file is written and read back.
#[tokio::test]
async fn the_authorize_command_serves_the_callback_itself_when_no_proxy_runs() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let config_path = setup.write_config(dir.path());
    let mut command = authorize_command(&config_path, &["people", "--account", "frank"]);
    let mut child = command.spawn().unwrap();
    let mut lines = output_lines(child.stdout.take().unwrap());
    let url = lines.link().await;
    let mut browser = Browser::new();
    let callback = browser.consent(url.trim()).await;
    let (status, result, _) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"));
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let printed = lines.rest();
    assert!(code.success(), "{printed}");
    assert!(printed.contains("waiting — 60 min left"), "{printed}");
    assert!(printed.contains("connected: The token is stored") && printed.contains("read back"), "{printed}");
    assert!(read_json(&dir.path().join("tokens/frank.json"))["access_token"].is_string());
}

/// With the proxy running, the command uses the proxy's flow, and reports a failure with its
/// step and what to do (exit 1).
#[tokio::test]
async fn the_authorize_command_uses_the_running_proxy_and_names_the_failed_step() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    setup.endpoint.set_consent(Consent::Deny);
    let mut child = authorize_command(&proxy.config_path, &["people", "--account", "gina"]).spawn().unwrap();
    let mut lines = output_lines(child.stdout.take().unwrap());
    let url = lines.link().await;
    assert!(url.contains(&format!("127.0.0.1:{}/connect/people?flow=", setup.admin_port)), "{url}");
    assert!(url.trim().ends_with("&account=gina"), "{url}");
    let mut browser = Browser::new();
    let callback = browser.consent(url.trim()).await;
    let (_, result, _) = browser.finish(&callback).await;
    assert_eq!(result, "access_denied");
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let printed = lines.rest();
    assert_eq!(code.code(), Some(1), "{printed}");
    assert!(printed.contains("failed: access_denied") && printed.contains("what to do:"), "{printed}");
}

#[tokio::test]
async fn the_device_flow_waits_through_pending_and_slow_down_then_connects() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let config_path = setup.write_config(dir.path());
    setup.endpoint.device_answers(&["pending", "slow_down", "pending"]);
    let out = run_to_end(authorize_command(&config_path, &["people", "--account", "hal", "--device"])).await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("WDJB-MJHT") && printed.contains("/device"), "{printed}");
    assert!(printed.contains("slow down"), "{printed}");
    let polls = setup.endpoint.device_polls();
    assert_eq!(polls.len(), 4);
    let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1] - w[0]).collect();
    // interval 1 s; after slow_down 6 s.
    assert!(gaps[0] >= Duration::from_millis(900), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(5900), "slow_down adds 5 s: {gaps:?}");
    let form = setup.endpoint.last_form();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:device_code");
    assert!(read_json(&dir.path().join("tokens/hal.json"))["refresh_token"].is_string());
}

#[tokio::test]
async fn the_device_flow_reports_denial_and_expiry() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let config_path = setup.write_config(dir.path());
    for (answer, step) in [("deny", "failed: access_denied"), ("expired", "failed: state_expired")] {
        setup.endpoint.device_answers(&[answer]);
        let out =
            run_to_end(authorize_command(&config_path, &["people", "--account", "ivy", "--device"])).await;
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{printed}");
        assert!(printed.contains(step) && printed.contains("what to do:"), "{printed}");
    }
    assert!(!dir.path().join("tokens/ivy.json").exists());
}

fn authorize_command(config: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(binary());
    command
        .arg("authorize")
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TOKENPROXY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end off the test's runtime (which serves the mock provider meanwhile).
async fn run_to_end(mut command: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

/// A child's stdout, read line by line on a thread.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

fn output_lines(stdout: std::process::ChildStdout) -> Lines {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Lines { rx, seen: Vec::new() }
}

impl Lines {
    /// The link the command prints for the person to open.
    async fn link(&mut self) -> String {
        eventually(Duration::from_secs(20), "the command prints the link", || {
            let found = self.try_next().filter(|l| l.trim_start().starts_with("http://"));
            async move { found }
        })
        .await
    }

    fn try_next(&mut self) -> Option<String> {
        let line = self.rx.try_recv().ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Everything printed, once the child has exited.
    fn rest(&mut self) -> String {
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

fn fingerprint(token: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(token.as_bytes())[..4])
}

/// Login CSRF (SPEC §6): a page on another site that sends a person's browser to a flow's start
/// must not reach the provider or write any state; the person sees what would be connected and
/// a button that makes the same-origin POST. A same-origin POST and a direct link start flows.
#[tokio::test]
async fn a_cross_site_navigation_to_a_flow_start_reaches_no_provider_and_writes_no_state() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let admin = format!("http://{}", proxy.admin);
    let state_dir = dir.path().join("state");
    let pending = || std::fs::read_dir(&state_dir).map(|d| d.count()).unwrap_or(0);
    let http =
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let start = format!("{admin}/connect/people?account=eve");
    for (header, value) in [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
        ("origin", "http://evil.example.net"),
    ] {
        let r = http.get(&start).header(header, value).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{header}: {value}");
        assert!(r.headers().get("set-cookie").is_none(), "{header}: {value}");
        let page = r.text().await.unwrap();
        assert!(page.contains(r#"data-result="confirm""#) && page.contains(r#"method="post""#), "{page}");
        assert!(page.contains(r#"name="account" value="eve""#), "{page}");
        // A cross-site POST (the form a page on another site submits) is refused outright.
        let r = http
            .post(format!("{admin}/connect/people"))
            .header(header, value)
            .form(&[("account", "eve")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{header}: {value}");
    }
    assert_eq!(setup.endpoint.authorize_requests().len(), 0, "nothing reached the provider");
    assert_eq!(pending(), 0, "no state was written");

    // The /connect page's own POST, and a link opened directly, start flows.
    let r = http
        .post(format!("{admin}/connect/people"))
        .header("sec-fetch-site", "same-origin")
        .header("origin", &admin)
        .form(&[("account", "eve")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(location(&r).starts_with(&setup.endpoint.authorize_url()));
    let cookie = r.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(
        cookie.contains("Path=/oauth/callback")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let r = http.get(&start).header("sec-fetch-site", "none").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(location(&r).split('?').next(), Some(setup.endpoint.authorize_url().as_str()));
    assert_eq!(pending(), 2);
}

/// The same attack in a real Chromium: a page on another origin navigates to the start link and
/// submits a form to it; neither reaches the provider. Clicking Connect on the page that the
/// navigation showed does (the person decided).
#[tokio::test]
async fn chromium_on_a_foreign_page_cannot_start_a_flow_but_the_person_can() {
    if !chromium_available() {
        return;
    }
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let admin = format!("http://{}", proxy.admin);
    let printed = browser_script("csrf_browser.py", &[&admin, "people", "eve"]).await;
    let said = |key: &str| said_in(&printed, key);
    assert_eq!(said("navigation"), "confirm", "{printed}");
    assert_eq!(said("form"), "refused", "{printed}");
    assert_eq!(said("clicked"), "ok", "{printed}");
    let authorizations = setup.endpoint.authorize_requests();
    assert_eq!(authorizations.len(), 1, "only the person's click reached the provider");
    assert!(read_json(&dir.path().join("tokens/eve.json"))["access_token"].is_string());
}

/// `tokenproxy authorize` waits for its own flow: another flow of the same provider and account
/// that ends first (here denied) is not taken for its outcome.
#[tokio::test]
async fn the_authorize_command_reports_its_own_flow_and_not_another_of_the_same_account() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", ""));
    let mut child = authorize_command(&proxy.config_path, &["people", "--account", "hana"]).spawn().unwrap();
    let mut lines = output_lines(child.stdout.take().unwrap());
    let url = lines.link().await;
    // Someone else's flow for hana, started from the page, is denied first.
    setup.endpoint.set_consent(Consent::Deny);
    let mut other = Browser::new();
    let callback = other.consent(&format!("http://{}/connect/people?account=hana", proxy.admin)).await;
    assert_eq!(other.finish(&callback).await.1, "access_denied");
    tokio::time::sleep(Duration::from_millis(1500)).await; // longer than the command's poll
    setup.endpoint.set_consent(Consent::Allow);
    let mut browser = Browser::new();
    let callback = browser.consent(url.trim()).await;
    assert_eq!(browser.finish(&callback).await.1, "ok");
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let printed = lines.rest();
    assert!(code.success(), "{printed}");
    assert!(!printed.contains("access_denied"), "{printed}");
}

/// A reconnect whose token the store refuses (a 3 MiB answer, an access token with CR LF) is
/// `write_failed` and leaves the account's good token file as it was, in use and after a restart
/// (SPEC §5).
#[tokio::test]
async fn a_refused_reconnect_leaves_the_good_token_file_as_it_was() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let config = setup.config(false, "", "");
    let mut proxy = TokenProxy::start(dir.path(), &config);
    let admin = format!("http://{}", proxy.admin);
    let mut browser = Browser::new();
    let callback = browser.consent(&format!("{admin}/connect/people?account=ivy")).await;
    assert_eq!(browser.finish(&callback).await.1, "ok");
    let file = dir.path().join("tokens/ivy.json");
    let good = std::fs::read(&file).unwrap();
    let huge =
        format!(r#"{{"access_token":"at-huge","expires_in":3600,"padding":"{}"}}"#, "x".repeat(3 << 20));
    let crlf = r#"{"access_token":"at-bad\r\nX-Injected: 1","expires_in":3600}"#;
    for answer in [huge.as_str(), crlf] {
        setup.endpoint.script(&[(200, answer)]);
        let callback = browser.consent(&format!("{admin}/connect/people?account=ivy")).await;
        let (status, result, page) = browser.finish(&callback).await;
        assert_eq!((status, result.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "write_failed"), "{page}");
        assert!(page.contains("refused, the stored token is kept"), "{page}");
        assert_eq!(std::fs::read(&file).unwrap(), good, "the good file was replaced");
    }
    let view = proxy.token_view("people").await;
    assert_eq!(view["state"], "valid", "{view}");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
    let proxy = TokenProxy::start(dir.path(), &config);
    let r =
        proxy.client().get(setup.api.url("/v1/me")).header("tokenproxy-account", "ivy").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the account still works after a restart");
}

/// `[onboarding] max_pending` caps the flows waiting for their callback (SPEC §6): beyond it the
/// oldest is dropped, so its callback is `state_unknown`, and the newest still finish.
#[tokio::test]
async fn beyond_max_pending_the_oldest_flow_is_dropped() {
    let setup = Setup::new(AuthStyle::Basic).await;
    let dir = tempdir();
    let proxy = TokenProxy::start(dir.path(), &setup.config(false, "", "max_pending = 3"));
    let mut callbacks = Vec::new();
    for i in 0..5 {
        let mut browser = Browser::new();
        let callback =
            browser.consent(&format!("http://{}/connect/people?account=cap{i}", proxy.admin)).await;
        callbacks.push((browser, callback));
    }
    assert_eq!(std::fs::read_dir(dir.path().join("state")).unwrap().count(), 3);
    let (mut oldest, callback) = callbacks.remove(0);
    assert_eq!(oldest.finish(&callback).await.1, "state_unknown");
    let (mut newest, callback) = callbacks.pop().unwrap();
    assert_eq!(newest.finish(&callback).await.1, "ok");
}
