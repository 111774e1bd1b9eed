//! Bad input, shutdown, secrecy and start-up failures: every failure path is an answer, and the
//! process stays up (or exits with a one-line reason when it cannot start).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const TOKEN: &str = "tok-robust-very-secret-9f8e7d";

fn config(dir: &std::path::Path, mock: &MockApi, extra_proxy: &str) -> String {
    let token_file = dir.join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    mock.plain_config(&token_file, extra_proxy)
}

/// Sends raw bytes on a fresh connection and returns what comes back before the server closes or
/// `patience` passes.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], patience: Duration) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(patience)).unwrap();
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn good_request_works(tp: &TokenProxy, mock: &MockApi) {
    let r = tp.client().get(mock.url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.last().authorization(), Some(format!("Bearer {TOKEN}").as_str()));
}

#[tokio::test]
async fn bad_input_gets_an_answer_and_the_proxy_keeps_serving() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &mock, "header_read_timeout = \"1s\""));
    let addr = tp.proxy;

    // A garbage request line.
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, b"THIS IS NOT HTTP\r\n\r\n", Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    good_request_works(&tp, &mock).await;

    // A request head over the limit.
    let big = format!("GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", mock.url("/"), "a".repeat(200_000));
    let answer =
        tokio::task::spawn_blocking(move || raw_exchange(addr, big.as_bytes(), Duration::from_secs(5)))
            .await
            .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    good_request_works(&tp, &mock).await;

    // A client that stalls in the middle of its head is dropped after header_read_timeout.
    let url = mock.url("/");
    let (elapsed, answer) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let partial = format!("GET {url} HTTP/1.1\r\nHost: x\r\n");
        let answer = raw_exchange(addr, partial.as_bytes(), Duration::from_secs(8));
        (started.elapsed(), answer)
    })
    .await
    .unwrap();
    assert!(
        elapsed < Duration::from_secs(6),
        "closed by the proxy, not by our own read timeout: {elapsed:?}"
    );
    assert!(!answer.contains("200"), "{answer:?}");
    good_request_works(&tp, &mock).await;

    // An origin-form request: 400 saying how to use the proxy.
    let r = reqwest::get(format!("http://{}/v1/items", tp.proxy)).await.unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("HTTP_PROXY") && body.contains("routes"), "{body}");
    good_request_works(&tp, &mock).await;

    // Unknown admin paths and methods.
    let (status, _) = tp.admin_get("/nope").await;
    assert_eq!(status, 404);
    let r = reqwest::Client::new().post(format!("http://{}/tokens", tp.admin)).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let mut tp = TokenProxy::start(dir.path(), &config(dir.path(), &mock, ""));
    let client = tp.client();
    let url = mock.url("/slow");
    let in_flight = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    // Wait until the upstream has the request, then ask the proxy to stop.
    eventually(Duration::from_secs(5), "the slow request to reach the mock", || async {
        mock.seen().iter().any(|s| s.path == "/slow").then_some(())
    })
    .await;
    tp.signal("TERM");
    let status = in_flight.await.unwrap().expect("the request in flight was answered");
    assert_eq!(status, 200);
    let code = tokio::task::block_in_place(|| tp.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
    assert!(tp.logs().iter().any(|l| l.contains("SIGTERM")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_value_reaches_a_log_line_or_an_admin_answer() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &mock, ""));
    let token_file = dir.path().join("api.json");
    // Exercise every path that logs: requests, errors, reloads, a broken file.
    tp.client().get(mock.url("/a")).send().await.unwrap();
    tp.client().get(mock.url("/status/500")).send().await.unwrap();
    std::fs::write(&token_file, format!(r#"{{"access_token": "{TOKEN}-broken"#)).unwrap();
    eventually(Duration::from_secs(3), "the parse error", || async {
        (!tp.token_view("api").await["last_error"].is_null()).then_some(())
    })
    .await;
    let second = "tok-robust-second-secret-1a2b3c";
    std::fs::write(&token_file, token_json(second)).unwrap();
    eventually(Duration::from_secs(3), "the second token", || async {
        (tp.token_view("api").await["fingerprint"] == tokenproxy::secrets::fingerprint(second)).then_some(())
    })
    .await;
    tp.client().get(mock.url("/b")).send().await.unwrap();
    assert_eq!(mock.last().authorization(), Some(format!("Bearer {second}").as_str()));

    let mut answers = tp.logs().join("\n");
    for path in ["/tokens", "/metrics", "/readyz", "/healthz"] {
        answers += &tp.admin_get(path).await.1;
    }
    assert!(answers.contains(&tokenproxy::secrets::fingerprint(second)), "fingerprints are shown");
    for secret in [TOKEN, second, "tok-robust"] {
        assert!(!answers.contains(secret), "a token value leaked into logs or admin answers");
    }
}

#[tokio::test]
async fn readiness_follows_the_token_file() {
    let mock = MockApi::start().await;
    let dir = tempdir();
    let tp = TokenProxy::start(dir.path(), &config(dir.path(), &mock, ""));
    let (status, _) = tp.admin_get("/readyz").await;
    assert_eq!(status, 200);

    // A provider whose file is missing: not ready, and requests get the 502 token_unavailable.
    let dir = tempdir();
    let cfg = config(dir.path(), &mock, "").replace("api.json", "missing.json");
    let tp = TokenProxy::start(dir.path(), &cfg);
    let (status, body) = tp.admin_get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("\"api\"") && body.contains("missing"), "{body}");
    let r = tp.client().get(mock.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-tokenproxy-error"], "token_unavailable");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["provider"], "api");
    assert!(body["reason"].as_str().unwrap().contains("missing.json"));
    assert!(body["action"].as_str().unwrap().contains("missing.json"));

    // Writing the file makes it ready without a restart.
    std::fs::write(dir.path().join("missing.json"), token_json(TOKEN)).unwrap();
    eventually(Duration::from_secs(3), "readiness", || async {
        (tp.admin_get("/readyz").await.0 == 200).then_some(())
    })
    .await;
}

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary());
    command.args(args).env_remove("TOKENPROXY_CONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child =
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tokenproxy {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_config_with_unknown_keys_or_bad_values_is_rejected_with_every_problem_named() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[proxy]\nlisten = \"127.0.0.1:0\"\nlisten_port = 1\n").unwrap();
    let p = path.to_str().unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("proxy.listen_port") && stdout.contains("bad.toml"), "{stdout}");

    let (code, _, stderr) = run_binary(&["run", "--config", p], &[]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim().lines().count(), 1, "one-line reason: {stderr}");
    assert!(stderr.contains("proxy.listen_port"), "{stderr}");

    std::fs::write(
        &path,
        "[proxy]\nlisten = \"nowhere\"\nupstream_timeout = \"soon\"\nidle_timeout = \"0s\"\nmax_connections = 0\n\
         [egress]\ndeny = [\"10.0.0.0/33\"]\n\
         [providers.a]\nhosts = [\"a.*.com\"]\ntoken_file = \"a.json\"\nformat = \"Bearer\"\n",
    )
    .unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1));
    for key in [
        "proxy.listen",
        "proxy.upstream_timeout",
        "proxy.idle_timeout",
        "proxy.max_connections",
        "egress.deny: \"10.0.0.0/33\"",
        "providers.a.hosts",
        "providers.a.format",
    ] {
        assert!(stdout.contains(key), "{key} named in: {stdout}");
    }

    // [oauth] mistakes: a raw token file cannot hold a refresh token; one secret source only.
    std::fs::write(
        &path,
        "[providers.a]\nhosts = [\"a.com\"]\ntoken_file = \"a.token\"\n\
         [providers.a.oauth]\ntoken_url = \"not a url\"\nclient_id = \"x\"\n\
         client_secret = \"s\"\nclient_secret_env = \"S\"\n",
    )
    .unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1));
    for key in ["providers.a.token_file", "providers.a.oauth.token_url", "only one of"] {
        assert!(stdout.contains(key), "{key} named in: {stdout}");
    }
    assert!(!stdout.contains("\"s\""), "the inline secret is not echoed: {stdout}");

    let (code, _, stderr) = run_binary(&["run", "--config", "/nonexistent/tokenproxy.toml"], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn environment_overrides_apply_and_name_themselves_when_wrong() {
    let dir = tempdir();
    let path = dir.path().join("tp.toml");
    std::fs::write(dir.path().join("a.json"), token_json("x")).unwrap();
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[providers.a]\nhosts = [\"a.com\"]\ntoken_file = \"missing.json\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    // The file's token_file is missing; the environment points it at a real one (relative to the
    // config file's folder).
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let (code, stdout, _) =
        run_binary(&["check", "--config", p], &[("TOKENPROXY_PROVIDERS__A__TOKEN_FILE", "a.json")]);
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) =
        run_binary(&["check"], &[("TOKENPROXY_CONFIG", p), ("TOKENPROXY_PROXY__LISTEN", "bad")]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("proxy.listen"), "{stdout}");
}

#[test]
fn a_port_in_use_stops_the_start_with_a_one_line_reason() {
    let dir = tempdir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let path = dir.path().join("tp.toml");
    std::fs::write(&path, format!("[proxy]\nlisten = \"{}\"\n", taken.local_addr().unwrap())).unwrap();
    let (code, _, stderr) = run_binary(&["--config", path.to_str().unwrap()], &[("RUST_LOG", "off")]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("proxy.listen") && stderr.contains(&taken.local_addr().unwrap().to_string()),
        "{stderr}"
    );
}

#[test]
fn check_fails_for_a_missing_token_file_that_only_a_person_can_provide() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let provider = |name: &str, grant: &str| {
        format!(
            "[providers.{name}]\nhosts = [\"{name}.example.com\"]\ntoken_file = \"tokens/{name}.json\"\n\
             [providers.{name}.oauth]\ntoken_url = \"https://auth.example.com/token\"\ngrant = \"{grant}\"\n\
             client_id = \"c\"\nclient_secret_file = \"secret\"\n"
        )
    };
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    std::fs::set_permissions(dir.path().join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.path().join("tokenproxy.toml");
    let p = path.to_str().unwrap();

    // A client_credentials provider creates its own file: valid.
    std::fs::write(&path, provider("machine", "client_credentials")).unwrap();
    let (code, out, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(0), "{out}");

    // A refresh_token provider cannot serve a request without its file: a problem, named.
    std::fs::write(&path, provider("machine", "client_credentials") + &provider("person", "refresh_token"))
        .unwrap();
    let (code, out, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1), "{out}");
    let problem = out.lines().find(|l| l.starts_with("problem:")).unwrap_or_default();
    assert!(problem.contains("providers.person") && problem.contains("person.json"), "{out}");
    assert!(!out.contains("providers.machine: token file"), "{out}");

    // A secret file others can read: a warning, not a failure.
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    std::fs::write(dir.path().join("tokens/person.json"), token_json("t")).unwrap();
    std::fs::set_permissions(dir.path().join("tokens/person.json"), std::fs::Permissions::from_mode(0o600))
        .unwrap();
    std::fs::set_permissions(dir.path().join("secret"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(0), "{out}");
    let warning = out.lines().find(|l| l.starts_with("warning:")).unwrap_or_default();
    assert!(warning.contains("client secret file") && warning.contains("readable by everyone"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("warning:")).count(), 1, "only the loose file: {out}");
}

/// `tokenproxy check` lists every problem of a config at once (an unknown key and a value of the
/// wrong type do not hide the rest), and a client secret that cannot be read is one.
#[test]
fn check_lists_every_problem_at_once_and_a_missing_client_secret_is_one() {
    let dir = tempdir();
    let path = dir.path().join("tokenproxy.toml");
    let p = path.to_str().unwrap();
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"nope\"\nbogus = 1\nmax_connections = \"many\"\n\
         [providers.\"a:x\"]\nhosts = [\"a.example.com\"]\ntoken_file = \"a.json\"\n\
         [providers.b]\nhosts = []\ntoken_file = \"b.json\"\n",
    )
    .unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1), "{stdout}");
    for said in
        ["proxy.bogus", "proxy.max_connections", "proxy.listen", "provider name \"a:x\"", "providers.b.hosts"]
    {
        assert!(stdout.contains(said), "{said} is not listed: {stdout}");
    }
    assert_eq!(stdout.lines().filter(|l| l.starts_with("problem:")).count(), 5, "{stdout}");

    std::fs::write(
        &path,
        "[providers.c]\nhosts = [\"c.example.com\"]\ntoken_file = \"c.json\"\n[providers.c.oauth]\n\
         token_url = \"https://auth.example.com/token\"\ngrant = \"client_credentials\"\nclient_id = \"c\"\n\
         client_secret_file = \"no-such-secret\"\n",
    )
    .unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("client_secret_file") && stdout.contains("no-such-secret"), "{stdout}");
    std::fs::write(dir.path().join("no-such-secret"), "s3cret-value\n").unwrap();
    let (code, stdout, _) = run_binary(&["check", "--config", p], &[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(!stdout.contains("s3cret-value"));
}
