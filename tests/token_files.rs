//! The token file is the source of truth: expiry sources, hand edits of every kind picked up
//! without a restart, and a broken file never replacing a good token.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use support::*;

/// Hand edits must show up on the next request within this time.
const PICKUP: Duration = Duration::from_secs(2);

/// Waits until a request through the proxy carries `Bearer <token>`.
async fn wait_for_token(tp: &TokenProxy, mock: &MockApi, token: &str) {
    let expected = format!("Bearer {token}");
    let client = tp.client();
    eventually(PICKUP, &format!("requests to carry the token {token:?}"), || {
        let client = client.clone();
        let mock = mock.clone();
        let expected = expected.clone();
        async move {
            client.get(mock.url("/probe")).send().await.ok()?;
            (mock.last().authorization() == Some(expected.as_str())).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn file_edits_are_picked_up_by_rename_in_place_rewrite_and_delete_recreate() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let token_file = dir.path().join("tokens").join("api.json");
    std::fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    std::fs::write(&token_file, token_json("first")).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.plain_config(&token_file, ""));
    wait_for_token(&tp, &mock, "first").await;

    // Atomic rename over the file, as editors and tokenproxy itself do.
    let tmp = token_file.with_extension("tmp");
    std::fs::write(&tmp, token_json("renamed")).unwrap();
    std::fs::rename(&tmp, &token_file).unwrap();
    wait_for_token(&tp, &mock, "renamed").await;

    // In-place rewrite (truncate and write), as `echo > file` does.
    std::fs::write(&token_file, token_json("in-place")).unwrap();
    wait_for_token(&tp, &mock, "in-place").await;

    // Deletion, then re-creation: the last good token serves meanwhile.
    std::fs::remove_file(&token_file).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tp.client().get(mock.url("/during-delete")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some("Bearer in-place"));
    std::fs::write(&token_file, token_json("recreated")).unwrap();
    wait_for_token(&tp, &mock, "recreated").await;

    let reloads = tp.metric("tokenproxy_token_reloads_total", &[("provider", "api"), ("result", "ok")]).await;
    assert!(reloads >= 4.0, "each change counted as a reload, saw {reloads}");
}

#[tokio::test]
async fn a_kubernetes_style_data_symlink_swap_is_picked_up() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let volume = dir.path().join("secret");
    std::fs::create_dir_all(&volume).unwrap();
    // The layout of a Kubernetes secret volume: token.json -> ..data/token.json,
    // ..data -> ..<timestamp>/
    let write_version = |name: &str, token: &str| -> PathBuf {
        let version = volume.join(name);
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("token.json"), token_json(token)).unwrap();
        version
    };
    write_version("..2026_11_22_v1", "k8s-v1");
    std::os::unix::fs::symlink("..2026_11_22_v1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token.json", volume.join("token.json")).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.plain_config(&volume.join("token.json"), ""));
    wait_for_token(&tp, &mock, "k8s-v1").await;

    // The kubelet's update: a new folder, a new ..data_tmp link, renamed over ..data.
    write_version("..2026_11_22_v2", "k8s-v2");
    std::os::unix::fs::symlink("..2026_11_22_v2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join("..2026_11_22_v1")).unwrap();
    wait_for_token(&tp, &mock, "k8s-v2").await;

    // And once more, proving the watch survived the first swap.
    write_version("..2026_11_22_v3", "k8s-v3");
    std::os::unix::fs::symlink("..2026_11_22_v3", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    wait_for_token(&tp, &mock, "k8s-v3").await;
}

#[tokio::test]
async fn an_unparsable_file_keeps_the_last_good_token_and_reports_the_error() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json("good-token")).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.plain_config(&token_file, ""));
    wait_for_token(&tp, &mock, "good-token").await;

    std::fs::write(&token_file, r#"{"access_token": "half-written-secret", "#).unwrap();
    let view = eventually(PICKUP, "/tokens to show the parse error", || async {
        let view = tp.token_view("api").await;
        (!view["last_error"].is_null()).then_some(view)
    })
    .await;
    let error = view["last_error"].as_str().unwrap();
    assert!(error.contains("cannot be parsed"), "{error}");
    assert!(!error.contains("half-written-secret"));
    assert_eq!(view["state"], "valid", "the last good token is still usable");
    assert_eq!(view["fingerprint"], tokenproxy::secrets::fingerprint("good-token"));
    assert_eq!(
        tp.metric("tokenproxy_token_reloads_total", &[("provider", "api"), ("result", "parse_error")]).await,
        1.0
    );
    tp.client().get(mock.url("/still")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some("Bearer good-token"));

    // Fixing the file clears the error.
    std::fs::write(&token_file, token_json("fixed-token")).unwrap();
    wait_for_token(&tp, &mock, "fixed-token").await;
    assert!(tp.token_view("api").await["last_error"].is_null());
}

fn jwt_with_exp(exp: i64) -> String {
    let e = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!("{}.{}.sig", e(r#"{"alg":"none"}"#), e(&format!(r#"{{"exp":{exp}}}"#)))
}

#[tokio::test]
async fn every_expiry_source_is_reported_on_tokens_and_by_check() {
    let dir = tempdir();
    let d = dir.path();
    let files = [
        ("at", "at.json", r#"{"access_token":"a","expires_at":"2099-01-01T00:00:00Z"}"#.to_string()),
        (
            "inplusupdated",
            "in.yaml",
            "access_token: b\nexpires_in: 3600\nupdated_at: '2099-01-01T00:00:00Z'\n".to_string(),
        ),
        ("jwt", "jwt.txt", jwt_with_exp(4_070_908_800)),
        // FIELD-NOTES #1: expires_in with no timestamp is unknown, never "from now".
        ("unknown", "unknown.json", r#"{"access_token":"d","expires_in":10800}"#.to_string()),
    ];
    let mut config = String::from("[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    for (name, file, content) in &files {
        std::fs::write(d.join(file), content).unwrap();
        config += &format!("[providers.{name}]\nhosts = [\"{name}.invalid\"]\ntoken_file = \"{file}\"\n");
    }
    let tp = TokenProxy::start(d, &config);
    let expected = [
        ("at", "expires_at", Some("2099-01-01T00:00:00Z")),
        ("inplusupdated", "expires_in+updated_at", Some("2099-01-01T01:00:00Z")),
        ("jwt", "jwt_exp", Some("2099-01-01T00:00:00Z")),
        ("unknown", "unknown", None),
    ];
    for (provider, source, expires_at) in expected {
        let view = tp.token_view(provider).await;
        assert_eq!(view["expiry_source"], source, "{provider}: {view}");
        assert_eq!(view["expires_at"].as_str(), expires_at, "{provider}: {view}");
        assert_eq!(view["state"], "valid", "{provider}: {view}");
    }

    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&tp.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for (provider, source, _) in expected {
        let line = stdout.lines().find(|l| l.starts_with(provider)).expect("a line per provider");
        assert!(line.contains(&format!("source={source}")), "{line}");
    }
}

/// Read syscalls the process has made so far.
fn read_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscr: ")).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn an_idle_proxy_does_not_keep_re_reading_its_token_files() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json("idle")).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.plain_config(&token_file, ""));
    wait_for_token(&tp, &mock, "idle").await;
    // Something else happens in the folder: one re-read, and that should be the end of it.
    std::fs::write(dir.path().join("unrelated.txt"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Reading the file is itself an event in the watched folder; a watcher that acted on it
    // would re-read the file ten times a second forever.
    let before = read_syscalls(tp.pid());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reads = read_syscalls(tp.pid()) - before;
    assert!(reads < 15, "{reads} read syscalls in 1.5 s of idling");
}

#[tokio::test]
async fn a_token_file_over_the_size_limit_is_refused_as_a_parse_error() {
    use std::os::unix::fs::PermissionsExt;
    let mock = MockApi::start().await;
    let dir = tempdir();
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json("small-token")).unwrap();
    // Readable by others: a warning in the log at start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tp = TokenProxy::start(dir.path(), &mock.plain_config(&token_file, ""));
    wait_for_token(&tp, &mock, "small-token").await;
    assert!(
        tp.logs().iter().any(|l| l.contains("api.json is readable by everyone")),
        "no warning about a token file others can read"
    );

    // Valid JSON, but 2 MiB of it.
    let padding = "x".repeat(2 * 1024 * 1024);
    let big = serde_json::json!({"access_token": "big-token", "padding": padding}).to_string();
    std::fs::write(&token_file, big).unwrap();
    let view = eventually(PICKUP, "/tokens to show the size error", || async {
        let view = tp.token_view("api").await;
        (!view["last_error"].is_null()).then_some(view)
    })
    .await;
    assert!(view["last_error"].as_str().unwrap().contains("larger than 1024 KiB"), "{view}");
    assert_eq!(
        tp.metric("tokenproxy_token_reloads_total", &[("provider", "api"), ("result", "parse_error")]).await,
        1.0
    );
    tp.client().get(mock.url("/still")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some("Bearer small-token"), "the last good token stays");
}

/// A newcomer's setup: `config/tokenproxy.toml` found by default, relative to the working folder,
/// with a relative token file. An edit is read because the watcher reported it (the log says
/// which source read it), not by the 5-second safety-net poll.
#[tokio::test]
async fn edits_are_seen_by_the_watcher_with_the_default_relative_config_path() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("config/tokens")).unwrap();
    std::fs::write(dir.path().join("config/tokens/api.json"), token_json("first")).unwrap();
    let config = mock.plain_config(std::path::Path::new("tokens/api.json"), "");
    assert!(config.contains("token_file = \"tokens/api.json\""), "{config}");
    let tp = TokenProxy::start_at_default_path(dir.path(), &config);
    wait_for_token(&tp, &mock, "first").await;
    let event_reads = |tp: &TokenProxy| {
        tp.logs().iter().filter(|l| l.contains("reading changed tokens") && l.contains("\"event\"")).count()
    };
    let before = event_reads(&tp);
    std::fs::write(dir.path().join("config/tokens/api.json"), token_json("edited")).unwrap();
    wait_for_token(&tp, &mock, "edited").await;
    eventually(Duration::from_secs(2), "the watcher to report the edit", || async {
        (event_reads(&tp) > before).then_some(())
    })
    .await;
}
