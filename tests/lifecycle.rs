//! The token lifecycle: refresh before use, refresh once and retry once on 401, single flight,
//! classified failures, crash-safe writes shared across processes. Each FIELD-NOTES row's test
//! is named after it.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

/// The proxy config for provider `api` on `mock`, with `endpoint`'s `[oauth]` section and
/// `oauth_extra` appended to it.
fn config(
    mock: &MockApi,
    endpoint: &MockTokenEndpoint,
    grant: &str,
    oauth_extra: &str,
    proxy_extra: &str,
) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "10s"
{proxy_extra}
[admin]
listen = "127.0.0.1:0"
[providers.api]
hosts = ["{}"]
token_file = "tokens/api.json"
allow_plaintext = true
{}{oauth_extra}
"#,
        mock.authority(),
        endpoint.oauth_toml("api", grant)
    )
}

fn write_token_file(dir: &Path, value: serde_json::Value) {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    std::fs::write(dir.join("tokens/api.json"), serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

fn read_token_file(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("tokens/api.json")).unwrap())
        .expect("the token file parses")
}

/// The usual arrangement: an API that accepts only tokens the endpoint issued, a token endpoint
/// (adjusted by `tune`) on which refresh token `rt-0` works, the token file `token`, and the proxy.
async fn setup(
    tune: impl FnOnce(&mut MockTokenEndpoint),
    token: serde_json::Value,
    oauth_extra: &str,
    proxy_extra: &str,
) -> (MockApi, MockTokenEndpoint, tempfile::TempDir, TokenProxy) {
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let mut endpoint = MockTokenEndpoint::new(Some(&mock));
    tune(&mut endpoint);
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(dir.path(), token);
    let tp =
        TokenProxy::start(dir.path(), &config(&mock, &endpoint, "refresh_token", oauth_extra, proxy_extra));
    (mock, endpoint, dir, tp)
}

/// An RFC 3339 time `seconds` from now.
fn rfc3339_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// The same in whole seconds, as a person writes it and as /tokens shows it.
fn rfc3339_whole_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.replace_nanosecond(0).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap()
}

async fn post_refresh(tp: &TokenProxy) -> (u16, serde_json::Value) {
    post_refresh_to(tp.admin).await
}

/// `POST /tokens/api/refresh` on the admin listener at `admin` (for a task of its own).
async fn post_refresh_to(admin: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{admin}/tokens/api/refresh"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn field_note_1_expires_in_without_a_timestamp_heals_on_the_first_call() {
    // A dead token whose expiry is "unknown": expires_in with no timestamp.
    let token = serde_json::json!({"access_token": "dead-token", "refresh_token": "rt-0", "expires_in": 10800, "custom": "kept"});
    let (mock, endpoint, dir, tp) = setup(|e| e.rotate = Rotation::Strict, token, "", "").await;
    assert_eq!(tp.token_view("api").await["expiry_source"], "unknown");
    assert_eq!(endpoint.calls(), 0, "an unknown expiry is not treated as expired");

    let r = tp.client().get(mock.url("/v1/me")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the app never sees the 401");
    assert_eq!(endpoint.calls(), 1);
    assert_eq!(mock.last().authorization(), Some("Bearer at-1"));

    let file = read_token_file(dir.path());
    assert_eq!(file["access_token"], "at-1");
    assert_eq!(file["refresh_token"], "rt-1", "the rotated refresh token is stored");
    assert_eq!(file["custom"], "kept", "every other field is kept");
    assert!(file["expires_at"].is_string() && file["updated_at"].is_string(), "{file}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("tokens/api.json")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let view = tp.token_view("api").await;
    assert_eq!(view["expiry_source"], "expires_at");
    assert_eq!(view["retry_count"], 1);
    assert_eq!(view["last_refresh_result"], "ok");

    let unauthorized = [("provider", "api")];
    assert_eq!(tp.metric("tokenproxy_upstream_unauthorized_total", &unauthorized).await, 1.0);
    // tokenproxy's own write is not read back as a change: no reload storm.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reloads = [("provider", "api"), ("result", "ok")];
    assert_eq!(tp.metric("tokenproxy_token_reloads_total", &reloads).await, 1.0, "only the initial load");
    assert_eq!(tp.metric("tokenproxy_retries_total", &[("provider", "api"), ("result", "ok")]).await, 1.0);
    let refreshes = [("provider", "api"), ("trigger", "unauthorized"), ("result", "ok")];
    assert_eq!(tp.metric("tokenproxy_refreshes_total", &refreshes).await, 1.0);
}

#[tokio::test]
async fn an_expired_token_at_start_is_refreshed_and_a_restart_with_a_fresh_one_refreshes_nothing() {
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "old", "refresh_token": "rt-0", "expires_at": "2020-01-01T00:00:00Z"}),
    );
    let cfg = config(&mock, &endpoint, "refresh_token", "", "");
    let tp = TokenProxy::start(dir.path(), &cfg);
    let refreshes = [("provider", "api"), ("trigger", "startup"), ("result", "ok")];
    eventually(Duration::from_secs(5), "a startup refresh", || async {
        (tp.metric("tokenproxy_refreshes_total", &refreshes).await == 1.0).then_some(())
    })
    .await;
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(endpoint.calls(), 1);
    drop(tp);

    // FIELD-NOTES #8: a restart finds the refreshed token on disk and uses it.
    let tp = TokenProxy::start(dir.path(), &cfg);
    let r = tp.client().get(mock.url("/after-restart")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().authorization(), Some("Bearer at-1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(endpoint.calls(), 1, "a restart with a future expires_at refreshes nothing");
    assert_eq!(tp.token_view("api").await["state"], "valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_note_7_two_hundred_concurrent_401s_cause_exactly_one_refresh() {
    let token = serde_json::json!({"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"});
    let (mock, endpoint, _dir, tp) = setup(|e| e.delay = Duration::from_millis(300), token, "", "").await;
    let client = tp.client();
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let url = mock.url(&format!("/item/{i}"));
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut ok = 0;
    for request in requests {
        if request.await.unwrap().unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 200, "every request succeeded after the shared refresh");
    assert_eq!(endpoint.calls(), 1, "one token-endpoint call for 200 concurrent 401s");
    println!("token-endpoint calls for 200 concurrent 401s: {}", endpoint.calls());
}

#[tokio::test]
async fn a_10kb_post_is_replayed_identically_and_a_body_over_the_limit_is_not() {
    let token = serde_json::json!({"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"});
    let (mock, _endpoint, _dir, tp) = setup(|_| {}, token, "", "max_replay_body = 16384").await;
    let body: Vec<u8> = (0..10_240u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = tp.client().post(mock.url("/upload")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = mock.seen();
    assert_eq!(seen.len(), 2, "the original and one retry");
    assert_eq!(seen[0].authorization(), Some("Bearer revoked"));
    assert_eq!(seen[1].authorization(), Some("Bearer at-1"));
    assert_eq!(&seen[1].body[..], &body[..], "the retry resent the body byte for byte");

    // Over the limit: streamed once, never buffered for a retry; the app sees the 401.
    mock.accept_only(&[]);
    let big = vec![b'x'; 20_000];
    let r = tp.client().post(mock.url("/big")).body(big).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(mock.last().body.len(), 20_000);
    let not_replayable = [("provider", "api"), ("result", "not_replayable")];
    assert_eq!(tp.metric("tokenproxy_retries_total", &not_replayable).await, 1.0);
}

#[tokio::test]
async fn field_note_10_each_client_auth_style_and_a_wrapped_response() {
    for (auth, wrap) in [
        (AuthStyle::Basic, None),
        (AuthStyle::Post, None),
        (AuthStyle::None, None),
        (AuthStyle::Post, Some("body")),
    ] {
        let mock = MockApi::start().await;
        mock.accept_only(&[]);
        let mut endpoint = MockTokenEndpoint::new(Some(&mock));
        endpoint.auth = auth;
        endpoint.wrap = wrap;
        let mut extra = String::new();
        if wrap.is_some() {
            // Withings: an extra form field and a wrapped token.
            endpoint.required = vec![("action", "requesttoken")];
            extra = "response_pointer = \"/body\"\nextra_params = { action = \"requesttoken\" }\n".into();
        }
        let endpoint = endpoint.start().await;
        endpoint.allow_refresh_token("rt-0");
        let dir = tempdir();
        write_token_file(
            dir.path(),
            serde_json::json!({"access_token": "stale", "refresh_token": "rt-0", "expires_at": "2020-01-01T00:00:00Z"}),
        );
        let tp = TokenProxy::start(dir.path(), &config(&mock, &endpoint, "refresh_token", &extra, ""));
        let r = tp.client().get(mock.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{auth:?} {wrap:?}: {}", tp.logs().join("\n"));
        assert_eq!(mock.last().authorization(), Some("Bearer at-1"), "{auth:?}");
        if wrap.is_some() {
            assert_eq!(endpoint.last_form().get("action").map(String::as_str), Some("requesttoken"));
        }
    }
}

#[tokio::test]
async fn client_credentials_with_no_token_file_creates_it_privately() {
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    let dir = tempdir();
    let extra = "scope = \"read write\"\n";
    let tp = TokenProxy::start(dir.path(), &config(&mock, &endpoint, "client_credentials", extra, ""));
    let r = tp.client().get(mock.url("/cc")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(endpoint.last_form().get("grant_type").map(String::as_str), Some("client_credentials"));
    assert_eq!(endpoint.last_form().get("scope").map(String::as_str), Some("read write"));
    let file = read_token_file(dir.path());
    assert_eq!(file["access_token"], mock.last().authorization().unwrap().trim_start_matches("Bearer "));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("tokens/api.json")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn field_note_5_transient_failures_back_off_and_succeed() {
    let token = serde_json::json!({"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"});
    let (mock, endpoint, _dir, tp) = setup(|_| {}, token, "", "").await;
    endpoint.script(&[(503, "{}"), (503, "{}")]);
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(endpoint.calls(), 3, "503, 503, then 200");
    assert_eq!(tp.token_view("api").await["state"], "valid");
}

#[tokio::test]
async fn field_note_5_invalid_grant_stops_until_the_file_is_replaced() {
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    // rt-revoked is not a working refresh token.
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "revoked", "refresh_token": "rt-revoked", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    let tp = TokenProxy::start(dir.path(), &config(&mock, &endpoint, "refresh_token", "", ""));
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the refresh failed, so the app sees the original 401");
    assert_eq!(endpoint.invalid_grants(), 1);
    let view = tp.token_view("api").await;
    assert_eq!(view["state"], "needs_reauth", "{view}");
    assert_eq!(tp.admin_get("/readyz").await.0, 503);
    // No retry storm: more requests, no more calls.
    for _ in 0..5 {
        tp.client().get(mock.url("/again")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(endpoint.calls(), 1, "needs_reauth makes no further automatic attempts");
    let refresh_failed = [("provider", "api"), ("result", "refresh_failed")];
    assert!(tp.metric("tokenproxy_retries_total", &refresh_failed).await >= 1.0);
    let (status, body) = post_refresh(&tp).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "token_unavailable");
    assert!(body["action"].as_str().unwrap().contains("re-authorize"), "{body}");

    // A person re-authorizes: a new refresh token in the file.
    endpoint.allow_refresh_token("rt-new");
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "still-revoked", "refresh_token": "rt-new", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    eventually(Duration::from_secs(3), "the new file to be read", || async {
        (tp.token_view("api").await["state"] == "valid").then_some(())
    })
    .await;
    let r = tp.client().get(mock.url("/recovered")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(tp.admin_get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_note_7_two_processes_sharing_a_file_never_spend_a_refresh_token_twice() {
    let mock = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&mock));
    endpoint.rotate = Rotation::Strict;
    endpoint.delay = Duration::from_millis(20);
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "start", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    let cfg = config(&mock, &endpoint, "refresh_token", "", "");
    // Two processes, one token file; each its own config copy (the same token file path).
    let dir_a = dir.path().join("a");
    let dir_b = dir.path().join("b");
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::symlink(dir.path().join("tokens"), d.join("tokens")).unwrap();
    }
    let a = TokenProxy::start(&dir_a, &cfg);
    let b = TokenProxy::start(&dir_b, &cfg);
    let mut handles = Vec::new();
    for i in 0..40 {
        let admin = if i % 2 == 0 { a.admin } else { b.admin };
        handles.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("http://{admin}/tokens/api/refresh"))
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap(), 200);
    }
    println!(
        "two processes, 40 forced refreshes: {} token-endpoint calls, {} invalid_grant",
        endpoint.calls(),
        endpoint.invalid_grants()
    );
    assert_eq!(endpoint.invalid_grants(), 0, "no refresh token was spent twice");
    let file = read_token_file(dir.path());
    assert!(endpoint.refresh_token_works(file["refresh_token"].as_str().unwrap()), "{file}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_safety_sigkill_during_refreshes_leaves_a_whole_file_with_a_working_refresh_token() {
    let mock = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&mock));
    endpoint.rotate = Rotation::Grace;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "start", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    let cfg = config(&mock, &endpoint, "refresh_token", "", "");
    for round in 0..30u64 {
        let mut tp = TokenProxy::start(dir.path(), &cfg);
        let admin = tp.admin;
        let _refresh = tokio::spawn(async move {
            let _ = reqwest::Client::new().post(format!("http://{admin}/tokens/api/refresh")).send().await;
        });
        let delay = tokenproxy::tokens::refresh::jitter(Duration::from_millis(50));
        tokio::time::sleep(delay).await;
        tp.signal("KILL");
        tokio::task::block_in_place(|| tp.wait_exit(Duration::from_secs(5)));
        let file = read_token_file(dir.path());
        let refresh_token = file["refresh_token"].as_str().expect("a refresh token");
        assert!(endpoint.refresh_token_works(refresh_token), "round {round}: {file}");
        let leftovers = std::fs::read_dir(dir.path().join("tokens"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert!(leftovers <= 1, "round {round}: temporary files pile up");
    }
    println!("30 SIGKILL rounds: {} refreshes reached the endpoint", endpoint.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_note_9_no_refresh_token_or_client_secret_in_logs_admin_or_error_bodies() {
    let token = serde_json::json!({"access_token": "at-initial-secret", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"});
    let (mock, endpoint, dir, tp) = setup(|e| e.rotate = Rotation::Strict, token, "", "").await;
    let mut seen = String::new();
    seen += &tp.client().get(mock.url("/a")).send().await.unwrap().text().await.unwrap();
    seen += &post_refresh(&tp).await.1.to_string();
    // Now make the refresh fail and collect the error body too.
    endpoint.script(&[(400, r#"{"error":"invalid_grant"}"#)]);
    seen += &post_refresh(&tp).await.1.to_string();
    mock.accept_only(&[]);
    seen += &tp.client().get(mock.url("/b")).send().await.unwrap().text().await.unwrap();
    for path in ["/tokens", "/metrics", "/readyz"] {
        seen += &tp.admin_get(path).await.1;
    }
    seen += &tp.logs().join("\n");
    let file = read_token_file(dir.path());
    let secrets = [
        "at-initial-secret",
        "rt-0",
        "rt-1",
        "rt-2",
        file["access_token"].as_str().unwrap(),
        file["refresh_token"].as_str().unwrap(),
        &endpoint.client_secret,
    ];
    for secret in secrets {
        assert!(
            !seen.contains(&format!("\"{secret}"))
                && !seen.contains(&format!("={secret}"))
                && !seen.contains(&format!(" {secret}")),
            "{secret} leaked"
        );
        assert!(!seen.contains(secret) || secret.len() < 6, "{secret} leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_note_3_an_unwritable_token_folder_still_serves_and_shows_the_write_error() {
    use std::os::unix::fs::PermissionsExt;
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let mut endpoint = MockTokenEndpoint::new(Some(&mock));
    endpoint.rotate = Rotation::Strict;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    let original = std::fs::read(dir.path().join("tokens/api.json")).unwrap();
    let tp = TokenProxy::start_unprivileged(dir.path(), &config(&mock, &endpoint, "refresh_token", "", ""));
    // The folder becomes read-only under the running proxy.
    std::fs::set_permissions(dir.path().join("tokens"), std::fs::Permissions::from_mode(0o555)).unwrap();

    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200, "traffic goes on with the refreshed token in memory");
    assert_eq!(mock.last().authorization(), Some("Bearer at-1"));
    let view = tp.token_view("api").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("could not be written"), "{view}");
    assert_eq!(
        std::fs::read(dir.path().join("tokens/api.json")).unwrap(),
        original,
        "the old file is intact"
    );
    let writes = [("provider", "api"), ("result", "error")];
    assert_eq!(tp.metric("tokenproxy_token_writes_total", &writes).await, 1.0);

    // The rotated refresh token lives in memory only, and the next refresh spends it (the one in
    // the file is spent: using it would be invalid_grant).
    let (status, body) = post_refresh(&tp).await;
    assert_eq!(status, 200, "{body}");
    assert!(!endpoint.refresh_token_works("rt-1") && endpoint.refresh_token_works("rt-2"));
    // Once the folder is writable again, the next refresh lands in the file, whole.
    std::fs::set_permissions(dir.path().join("tokens"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (status, body) = post_refresh(&tp).await;
    assert_eq!(status, 200, "{body}");
    let file = read_token_file(dir.path());
    assert_eq!((file["access_token"].as_str(), file["refresh_token"].as_str()), (Some("at-3"), Some("rt-3")));
    assert!(tp.token_view("api").await["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_note_6_a_token_expiring_during_a_long_stream_does_not_break_the_next_call() {
    let token = serde_json::json!({"access_token": "short-lived", "refresh_token": "rt-0", "expires_at": rfc3339_in(2)});
    let (mock, endpoint, _dir, tp) = setup(|_| {}, token, "refresh_before = \"1s\"\n", "").await;
    mock.accept_only(&["short-lived"]);
    let mut stream = tp.client().get(mock.url("/stream")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.chunk().await.unwrap().as_deref(), Some(&b"first\n"[..]));
    // The token expires (and the provider stops accepting it) while the stream is open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mock.accept_only(&[]);
    mock.accept(&format!("at-{}", endpoint.calls().max(1)));
    mock.release();
    assert_eq!(stream.bytes().await.unwrap(), "second\n");
    let r = tp.client().get(mock.url("/next")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the next call carries a fresh token");
    assert_ne!(mock.last().authorization(), Some("Bearer short-lived"));
}

#[tokio::test]
async fn a_token_is_refreshed_in_the_background_before_it_expires() {
    let soon = rfc3339_in(4);
    let token = serde_json::json!({"access_token": "soon", "refresh_token": "rt-0", "expires_at": soon});
    let (_mock, _endpoint, dir, tp) = setup(|_| {}, token, "refresh_before = \"3s\"\n", "").await;
    assert_eq!(tp.token_view("api").await["state"], "valid");
    // No request is made: the refresh happens on its own, before expiry.
    let proactive = [("provider", "api"), ("trigger", "proactive"), ("result", "ok")];
    eventually(Duration::from_secs(4), "a proactive refresh", || async {
        (tp.metric("tokenproxy_refreshes_total", &proactive).await == 1.0).then_some(())
    })
    .await;
    assert!(
        time::OffsetDateTime::now_utc()
            < time::OffsetDateTime::parse(&soon, &time::format_description::well_known::Rfc3339).unwrap()
    );
    assert_eq!(read_token_file(dir.path())["access_token"], "at-1");
}

#[tokio::test]
async fn an_expired_token_that_cannot_be_refreshed_is_a_502_with_the_reason() {
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    endpoint.allow_refresh_token("rt-0");
    // Every attempt fails with 500, quickly.
    endpoint.script(&[(500, "{}"); 20]);
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "expired", "refresh_token": "rt-0", "expires_at": "2020-01-01T00:00:00Z"}),
    );
    let tp = TokenProxy::start(
        dir.path(),
        &config(&mock, &endpoint, "refresh_token", "", "")
            .replace("upstream_timeout = \"10s\"", "upstream_timeout = \"2s\""),
    );
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenproxy-error"], "token_unavailable");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["provider"], "api");
    assert!(body["reason"].as_str().unwrap().contains("server_error"), "{body}");
    assert!(body["action"].as_str().is_some());
    assert!(mock.seen().is_empty(), "an expired token is not sent");
    let view = tp.token_view("api").await;
    assert_eq!(view["last_refresh_result"], "server_error", "{view}");
}

#[tokio::test]
async fn a_refresh_never_writes_over_a_file_that_does_not_parse_and_lands_once_it_does() {
    let (mock, endpoint, dir, tp) = setup(
        |e| e.rotate = Rotation::Strict,
        serde_json::json!({"access_token": "at-dead", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400)}),
        "",
        "",
    )
    .await;
    // A person's half-written edit, seen by the proxy before the 401 arrives.
    let garbage = r#"{"access_token": "at-dead", "refresh_token": "rt-0", "note": "#;
    std::fs::write(dir.path().join("tokens/api.json"), garbage).unwrap();
    eventually(Duration::from_secs(10), "the parse error on /tokens", || async {
        let view = tp.token_view("api").await;
        view["last_error"].as_str().is_some_and(|e| e.contains("cannot be parsed")).then_some(())
    })
    .await;

    // The 401 is healed from memory: refreshed, retried, served.
    let r = tp.client().get(mock.url("/heal")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().authorization(), Some("Bearer at-1"));
    assert_eq!(endpoint.calls(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tokens/api.json")).unwrap(),
        garbage,
        "the edit was overwritten"
    );
    let view = tp.token_view("api").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("kept in memory") && error.contains("once the file parses again"), "{view}");

    // The person finishes the edit (from the old content): the refresh lands on top of it, the
    // rotated refresh token included, and the edit is kept.
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "at-dead", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400), "note": "kept"}),
    );
    let file =
        eventually(Duration::from_secs(10), "the refreshed token written into the fixed file", || async {
            let file: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.path().join("tokens/api.json")).ok()?).ok()?;
            (file["access_token"] == "at-1").then_some(file)
        })
        .await;
    assert_eq!(file["refresh_token"], "rt-1", "the rotated refresh token was lost");
    assert_eq!(file["note"], "kept", "the person's edit was lost");
    assert!(endpoint.refresh_token_works("rt-1"));
    tp.client().get(mock.url("/after")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some("Bearer at-1"));
    assert!(tp.token_view("api").await["last_error"].is_null());
    assert_eq!(endpoint.calls(), 1);
}

#[tokio::test]
async fn concurrent_manual_refreshes_share_one_call_and_respect_backoff_unless_forced() {
    let (_mock, endpoint, _dir, tp) = setup(
        |e| {
            e.rotate = Rotation::Strict;
            e.delay = Duration::from_millis(300);
        },
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400)}),
        "",
        "",
    )
    .await;
    let posts = (0..50).map(|_| post_refresh(&tp));
    let answers = futures_util::future::join_all(posts).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert_eq!(endpoint.calls(), 1, "50 concurrent POSTs spent {} refresh tokens", endpoint.calls());
    assert_eq!(endpoint.invalid_grants(), 0);

    // A rate-limited endpoint: the next POST waits out Retry-After instead of calling again.
    endpoint.script(&[(429, r#"{"error":"slow_down"}"#)]);
    let (status, body) = post_refresh(&tp).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(endpoint.calls(), 2);
    let (status, body) = post_refresh(&tp).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("backing off"), "{body}");
    assert_eq!(endpoint.calls(), 2, "a POST during the backoff called the endpoint");
    // Forced: the person knows better.
    let r = reqwest::Client::new()
        .post(format!("http://{}/tokens/api/refresh?force=true", tp.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(endpoint.calls(), 3);
}

#[tokio::test]
async fn a_state_changing_admin_request_from_another_origin_is_refused() {
    let (_mock, endpoint, _dir, tp) = setup(
        |_| {},
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400)}),
        "",
        "",
    )
    .await;
    let post = |origin: Option<String>, site: Option<&'static str>| {
        let mut request = reqwest::Client::new().post(format!("http://{}/tokens/api/refresh", tp.admin));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(site) = site {
            request = request.header("sec-fetch-site", site);
        }
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    for (origin, site) in [
        (Some("http://evil.example".to_string()), None),
        (Some("null".to_string()), None),
        (Some(format!("http://127.0.0.1:{}.evil.example", tp.admin.port())), None),
        (None, Some("cross-site")),
    ] {
        let (status, body) = post(origin.clone(), site).await;
        assert_eq!(status, 403, "{origin:?} {site:?}: {body}");
        assert!(body.contains("cross_origin"), "{body}");
    }
    assert_eq!(endpoint.calls(), 0);
    let (status, body) = post(Some(format!("http://{}", tp.admin)), Some("same-origin")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(endpoint.calls(), 1);
}

#[tokio::test]
async fn a_symlinked_token_file_is_written_through_to_its_target_with_the_lock_beside_it() {
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let mut endpoint = MockTokenEndpoint::new(Some(&mock));
    endpoint.rotate = Rotation::Strict;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    let target = shared.join("real.json");
    std::fs::write(
        &target,
        serde_json::json!({"access_token": "at-dead", "refresh_token": "rt-0"}).to_string(),
    )
    .unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("tokens/api.json")).unwrap();
    let tp = TokenProxy::start(dir.path(), &config(&mock, &endpoint, "refresh_token", "", ""));

    let r = tp.client().get(mock.url("/through")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let link = dir.path().join("tokens/api.json");
    assert!(
        std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
        "the link was replaced by a file"
    );
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&target).unwrap()).unwrap();
    assert_eq!(written["access_token"], "at-1");
    assert_eq!(written["refresh_token"], "rt-1", "the target keeps a spent refresh token");
    assert!(shared.join("real.json.lock").exists(), "the lock is beside the target");
    assert!(!dir.path().join("tokens/api.json.lock").exists());
}

#[tokio::test]
async fn a_needs_reauth_502_names_its_class_once() {
    let mock = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "expired", "refresh_token": "rt-revoked", "expires_at": "2020-01-01T00:00:00Z"}),
    );
    let tp = TokenProxy::start(dir.path(), &config(&mock, &endpoint, "refresh_token", "", ""));
    eventually(Duration::from_secs(5), "needs_reauth after the startup refresh", || async {
        (tp.token_view("api").await["state"] == "needs_reauth").then_some(())
    })
    .await;
    // This request meets the remembered invalid_grant, not the endpoint.
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("invalid_grant: HTTP 400"),
        "the class once, then what the endpoint said: {reason}"
    );
    assert!(!reason.contains("invalid_grant: invalid_grant"), "{reason}");
    assert_eq!(endpoint.calls(), 1);
}

#[tokio::test]
async fn an_unreadable_token_file_is_a_store_failure_not_an_endpoint_failure() {
    use std::os::unix::fs::PermissionsExt;
    let mock = MockApi::start().await;
    mock.accept_only(&[]);
    let endpoint = MockTokenEndpoint::new(Some(&mock)).start().await;
    endpoint.allow_refresh_token("rt-0");
    let dir = tempdir();
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "revoked", "refresh_token": "rt-0", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    // As an unprivileged user, so that permissions apply.
    let tp = TokenProxy::start_unprivileged(dir.path(), &config(&mock, &endpoint, "refresh_token", "", ""));
    std::fs::set_permissions(dir.path().join("tokens/api.json"), std::fs::Permissions::from_mode(0o000))
        .unwrap();

    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 401, "no refresh, so the original answer");
    let view = tp.token_view("api").await;
    assert_eq!(view["last_refresh_result"], "store_unavailable", "{view}");
    assert_eq!(endpoint.calls(), 0, "a refresh token was spent although its result could not be recorded");
    let store_failures = [("provider", "api"), ("result", "store_unavailable")];
    assert!(tp.metric("tokenproxy_refreshes_total", &store_failures).await >= 1.0);
}

/// A refresh asked for while another process holds the store's lock waits for it. A person who
/// meanwhile rewrites the file with the same access token (a new expiry, a note) has not given it
/// a new token: the refresh still goes to the endpoint, and lands on top of the edit.
#[tokio::test]
async fn an_edit_with_the_same_token_while_a_refresh_waits_for_the_lock_does_not_cancel_it() {
    let (_mock, endpoint, dir, tp) = setup(
        |e| e.rotate = Rotation::Strict,
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400)}),
        "",
        "",
    )
    .await;
    // Another process's refresh holds the lock.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("tokens/api.json.lock"))
        .unwrap();
    lock.lock().unwrap();
    let refresh = tokio::spawn(post_refresh_to(tp.admin));
    eventually(Duration::from_secs(5), "the refresh waiting for the lock", || async {
        (tp.token_view("api").await["state"] == "refreshing").then_some(())
    })
    .await;
    let later = rfc3339_whole_in(2 * 86_400);
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": later, "note": "kept"}),
    );
    // The proxy has read the edit before the lock is free.
    eventually(Duration::from_secs(5), "the edit read", || async {
        (tp.token_view("api").await["expires_at"] == later.as_str()).then_some(())
    })
    .await;
    lock.unlock().unwrap();
    assert_eq!(refresh.await.unwrap().0, 200);
    assert_eq!(endpoint.calls(), 1, "the refresh was asked for and must reach the endpoint");
    let file = read_token_file(dir.path());
    assert_eq!(file["note"], "kept", "{file}");
    assert_eq!((file["access_token"].as_str(), file["refresh_token"].as_str()), (Some("at-1"), Some("rt-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_edit_during_a_refresh_in_flight_is_kept_and_the_refresh_lands_on_top_of_it() {
    let (_mock, endpoint, dir, tp) = setup(
        |e| {
            e.rotate = Rotation::Strict;
            // Held until the edit is on disk: with a fixed delay, a loaded machine could see the
            // refresh in flight only just before it landed, and the edit then wrote over it.
            e.hold = true;
        },
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400)}),
        "",
        "",
    )
    .await;
    let refresh = tokio::spawn(post_refresh_to(tp.admin));
    eventually(Duration::from_secs(5), "the refresh in flight", || async {
        (tp.token_view("api").await["state"] == "refreshing").then_some(())
    })
    .await;
    // A person adds a field while the token endpoint is answering; the proxy reads the edit.
    write_token_file(
        dir.path(),
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400), "note": "kept"}),
    );
    endpoint.release();
    assert_eq!(refresh.await.unwrap().0, 200);
    let file = read_token_file(dir.path());
    assert_eq!(file["note"], "kept", "the refresh wrote over the person's edit: {file}");
    assert_eq!((file["access_token"].as_str(), file["refresh_token"].as_str()), (Some("at-1"), Some("rt-1")));
    assert_eq!(endpoint.calls(), 1);
    // And the proxy, having written it, does not count its own write as a change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = tp.token_view("api").await;
    assert_eq!(view["fingerprint"], tokenproxy::secrets::fingerprint("at-1"), "{view}");
}

/// A refresh whose document the store refuses (over 1 MiB) leaves the token file as it was
/// (SPEC §5): the refused write is said on /tokens, and nothing of the file is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_document_the_store_refuses_leaves_the_token_file_as_it_was() {
    let (_mock, endpoint, dir, tp) = setup(
        |_| {},
        serde_json::json!({"access_token": "at-old", "refresh_token": "rt-0", "expires_at": rfc3339_in(86_400), "note": "kept"}),
        "",
        "",
    )
    .await;
    let before = std::fs::read(dir.path().join("tokens/api.json")).unwrap();
    // A refresh writes the token fields only, so it is the access token itself that is huge.
    let huge = format!(r#"{{"access_token":"at-huge-{}","expires_in":3600}}"#, "x".repeat(2 << 20));
    endpoint.script(&[(200, huge.as_str())]);
    let (status, _) = post_refresh(&tp).await;
    assert_eq!(status, 200, "the token itself is usable");
    assert_eq!(std::fs::read(dir.path().join("tokens/api.json")).unwrap(), before, "the file was replaced");
    let view = tp.token_view("api").await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refused, the stored token is kept"), "{view}");
}
