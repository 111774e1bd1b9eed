//! Encryption at rest (SPEC §11): token files sealed with AES-256-GCM. A plaintext file is read
//! and sealed on its next write; no token value is left in clear; a restart reads the sealed
//! file; the wrong key (or none) is a clear error and the file is never written over; `token
//! show|put` inspect and import tokens through the sealing store.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::*;

const KEY_A: [u8; 32] = [0x11; 32];
const KEY_B: [u8; 32] = [0x22; 32];

fn write_key(dir: &Path, name: &str, key: [u8; 32]) {
    use base64::Engine;
    let path = dir.join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(key) + "\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn config(api: &MockApi, endpoint: &MockTokenEndpoint, key_file: Option<&str>) -> String {
    let store = key_file.map(|k| format!("[store]\nencryption_key_file = \"{k}\"\n")).unwrap_or_default();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{store}\
         [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{}",
        api.authority(),
        endpoint.oauth_toml("api", "refresh_token")
    )
}

fn run(dir: &Path, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let mut child = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(dir.join("tokenproxy.toml"))
        .env_remove("TOKENPROXY_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test]
async fn a_plaintext_file_is_sealed_on_its_next_write_and_read_back_after_a_restart() {
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.rotate = Rotation::Strict;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-start");
    let dir = tempdir();
    write_key(dir.path(), "key", KEY_A);
    // An expired plaintext token: the first thing tokenproxy does is refresh and write it.
    std::fs::write(
        dir.path().join("api.json"),
        r#"{"access_token":"at-plain-expired","refresh_token":"rt-start","expires_at":"2000-01-01T00:00:00Z","custom":"kept"}"#,
    )
    .unwrap();
    let text = config(&api, &endpoint, Some("key"));
    let mut proxy = TokenProxy::start(dir.path(), &text);

    let file = dir.path().join("api.json");
    let sealed = eventually(Duration::from_secs(20), "the refreshed token is written, sealed", || {
        let bytes = std::fs::read_to_string(&file).unwrap_or_default();
        async move { bytes.contains("tokenproxy_sealed").then_some(bytes) }
    })
    .await;
    let response = proxy.client().get(api.url("/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let in_use = api.last().authorization().unwrap().trim_start_matches("Bearer ").to_string();
    assert!(in_use.starts_with("at-"), "{in_use}");
    let envelope: serde_json::Value = serde_json::from_str(&sealed).unwrap();
    assert_eq!(envelope["alg"], "A256GCM");
    for secret in [in_use.as_str(), "rt-1", "rt-start", "custom", "kept"] {
        assert!(!sealed.contains(secret), "{secret:?} in clear in the sealed file:\n{sealed}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // `check` and `token show` say it is sealed, and show fingerprints only.
    let (code, out) = run(dir.path(), &["check"], None);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("sealed (AES-256-GCM)") && out.contains("sealed at rest with AES-256-GCM, key"),
        "{out}"
    );
    let (code, out) = run(dir.path(), &["token", "show", "api"], None);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("sealed (AES-256-GCM, key") && out.contains("other fields") && out.contains("custom"),
        "{out}"
    );
    assert!(!out.contains(&in_use), "show prints no token without --reveal: {out}");
    let (_, revealed) = run(dir.path(), &["token", "show", "api", "--reveal"], None);
    assert!(revealed.contains(&in_use) && revealed.contains("\"custom\": \"kept\""), "{revealed}");

    // A restart reads the sealed file and serves its token without a refresh.
    let calls = endpoint.calls();
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
    let proxy = TokenProxy::start(dir.path(), &text);
    let response = proxy.client().get(api.url("/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(api.last().authorization(), Some(format!("Bearer {in_use}").as_str()));
    assert_eq!(endpoint.calls(), calls, "no refresh after the restart");
}

#[tokio::test]
async fn the_wrong_key_or_none_is_a_clear_error_and_the_sealed_file_is_left_untouched() {
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let dir = tempdir();
    write_key(dir.path(), "key-a", KEY_A);
    write_key(dir.path(), "key-b", KEY_B);
    std::fs::write(dir.path().join("tokenproxy.toml"), config(&api, &endpoint, Some("key-a"))).unwrap();
    let (code, out) = run(dir.path(), &["token", "put", "api"], Some(&token_json("at-sealed")));
    assert_eq!(code, Some(0), "{out}");
    let file = dir.path().join("api.json");
    let sealed = std::fs::read(&file).unwrap();
    assert!(String::from_utf8_lossy(&sealed).contains("tokenproxy_sealed"));

    for (key_file, expected) in
        [(Some("key-b"), "but the configured key is"), (None, "no encryption key is configured")]
    {
        let text = config(&api, &endpoint, key_file);
        std::fs::write(dir.path().join("tokenproxy.toml"), &text).unwrap();
        let (code, out) = run(dir.path(), &["check"], None);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains(expected), "{out}");

        let proxy = TokenProxy::start(dir.path(), &text);
        let view = proxy.token_view("api").await;
        assert!(view["last_error"].as_str().unwrap_or("").contains(expected), "{view}");
        let response = proxy.client().get(api.url("/v1/me")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        // A forced refresh cannot write over it either.
        let _ = reqwest::Client::new()
            .post(format!("http://{}/tokens/api/refresh?force=true", proxy.admin))
            .send()
            .await
            .unwrap();
        let (code, _) = run(dir.path(), &["token", "put", "api"], Some(&token_json("at-overwrite")));
        assert_eq!(code, Some(1), "token put refuses to write over a file sealed with another key");
        assert_eq!(std::fs::read(&file).unwrap(), sealed, "the sealed file is untouched");
        for line in proxy.logs() {
            assert!(!line.contains("at-sealed"), "{line}");
        }
    }
}

#[tokio::test]
async fn token_put_imports_a_token_that_a_running_proxy_uses_and_refuses_bad_input_without_quoting_it() {
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let dir = tempdir();
    write_key(dir.path(), "key", KEY_A);
    let text = config(&api, &endpoint, Some("key"));
    let proxy = TokenProxy::start(dir.path(), &text);
    api.accept("at-imported");
    let (code, out) = run(dir.path(), &["token", "put", "api"], Some(&token_json("at-imported")));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("stored and read back") && out.contains("sealed"), "{out}");
    assert!(!out.contains("at-imported"), "{out}");
    eventually(Duration::from_secs(10), "the running proxy adopts the imported token", || {
        let client = proxy.client();
        let url = api.url("/v1/me");
        async move { (client.get(url).send().await.ok()?.status() == StatusCode::OK).then_some(()) }
    })
    .await;
    assert_eq!(api.last().authorization(), Some("Bearer at-imported"));

    let (code, out) = run(dir.path(), &["token", "put", "api"], Some("{\"access_token\": \"leaky-value\", "));
    assert_eq!(code, Some(1));
    assert!(out.contains("not valid JSON") && !out.contains("leaky-value"), "{out}");
    let (code, out) = run(dir.path(), &["token", "put", "api", "--account", "x"], Some("{}"));
    assert_eq!(code, Some(1));
    assert!(out.contains("drop --account"), "{out}");
    // A token that cannot stand in a header is refused before anything is written (SPEC §5).
    let before = std::fs::read(dir.path().join("api.json")).unwrap();
    let (code, out) =
        run(dir.path(), &["token", "put", "api"], Some(r#"{"access_token": "at-x\r\nX-Injected: 1"}"#));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not allowed in an HTTP header") && !out.contains("X-Injected"), "{out}");
    assert_eq!(std::fs::read(dir.path().join("api.json")).unwrap(), before);
}

/// With encryption configured, a plaintext token file planted over a sealed one is used (it may
/// be a person's deliberate fix) but not silently: a warning in the log and on `/tokens`.
#[tokio::test]
async fn a_plaintext_file_planted_over_a_sealed_one_is_used_with_a_warning() {
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let dir = tempdir();
    write_key(dir.path(), "key-a", KEY_A);
    let text = config(&api, &endpoint, Some("key-a"));
    std::fs::write(dir.path().join("tokenproxy.toml"), &text).unwrap();
    let (code, out) = run(dir.path(), &["token", "put", "api"], Some(&token_json("at-sealed")));
    assert_eq!(code, Some(0), "{out}");
    let proxy = TokenProxy::start(dir.path(), &text);
    let view = proxy.token_view("api").await;
    assert!(view.get("warning").is_none(), "{view}");

    api.accept("at-planted");
    std::fs::write(dir.path().join("api.json"), token_json("at-planted")).unwrap();
    eventually(Duration::from_secs(10), "the planted token in use", || async {
        let r = proxy.client().get(api.url("/v1/me")).send().await.ok()?;
        (r.status() == StatusCode::OK && api.last().authorization() == Some("Bearer at-planted"))
            .then_some(())
    })
    .await;
    let view = proxy.token_view("api").await;
    let warning = view["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("plaintext although encryption at rest is configured"), "{view}");
    assert!(proxy.logs().iter().any(|l| l.contains("in plaintext although encryption")));
    for line in proxy.logs() {
        assert!(!line.contains("at-planted") && !line.contains("at-sealed"), "{line}");
    }
}

#[tokio::test]
async fn a_key_that_cannot_be_used_stops_check_and_run_with_where_it_is_and_never_what_it_holds() {
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let dir = tempdir();
    std::fs::write(dir.path().join("api.json"), r#"{"access_token":"at-kept"}"#).unwrap();
    std::fs::write(dir.path().join("tokenproxy.toml"), config(&api, &endpoint, Some("key"))).unwrap();
    let key = dir.path().join("key");
    let shown = format!("store.encryption_key_file {}", key.display());
    // Missing, then too short to be a key: each is named with the setting and the path.
    for (content, why) in [(None, "No such file"), (Some("secret-but-short"), "not a key")] {
        if let Some(content) = content {
            std::fs::write(&key, content).unwrap();
        }
        for command in [&["check"][..], &["run"][..]] {
            let (code, out) = run(dir.path(), command, None);
            assert_ne!(code, Some(0), "{command:?} went on with an unusable key: {out}");
            assert!(out.contains(&shown) && out.contains(why), "{command:?}: {out}");
            assert!(!out.contains("secret-but-short"), "the key's content was shown: {out}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("api.json")).unwrap(),
        r#"{"access_token":"at-kept"}"#
    );
}
