//! Transparent interception (SPEC §12), in a network namespace of the test's own: the test
//! re-runs itself under `unshare --net --mount` (as root), brings up an address besides
//! loopback, points `api.test` and `other.test` at it through a private /etc/hosts, starts the
//! mock servers there, runs tokenproxy as `nobody`, applies exactly the rules `tokenproxy
//! iptables` prints, and sends requests as another user with no proxy settings at all.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const CLIENT_UID: &str = "1000";

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `argv` as the unprivileged client user, with no proxy variables; stdout, or the failure.
fn as_client(argv: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let mut command = Command::new("setpriv");
    command
        .args([&format!("--reuid={CLIENT_UID}"), &format!("--regid={CLIENT_UID}"), "--clear-groups", "--"])
        .args(argv);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn programs_with_no_proxy_settings_get_tokens_through_iptables_redirection() {
    in_own_network_namespace(
        "programs_with_no_proxy_settings_get_tokens_through_iptables_redirection",
        true,
        "unshare iptables setpriv ip curl node",
        inside,
    );
}

async fn inside() {
    // The namespace: loopback, and an address that is not 127/8 for the "remote" servers (on lo:
    // a dummy interface needs a kernel module a container may not have).
    sh("ip link set lo up && ip addr add 10.77.0.1/32 dev lo && ip addr add 10.77.0.2/32 dev lo");
    let dir = tempdir();
    let public = tempdir();
    sh(&format!("chmod 755 {}", public.path().display()));
    std::fs::write(public.path().join("hosts"), "127.0.0.1 localhost\n10.77.0.1 api.test other.test\n")
        .unwrap();
    sh(&format!("mount --bind {} /etc/hosts", public.path().join("hosts").display()));

    // The provider over HTTPS and plain HTTP, and a host that matches no provider, each with a
    // certificate of its own CA.
    let api_pki = test_pki(dir.path(), "api", &["api.test"]);
    let other_pki = test_pki(public.path(), "other", &["other.test"]);
    let api = MockApi::start_on("10.77.0.1:443".parse().unwrap(), Some(api_pki.server_config.clone())).await;
    let api_plain = MockApi::start_on("10.77.0.1:80".parse().unwrap(), None).await;
    let other =
        MockApi::start_on("10.77.0.1:8443".parse().unwrap(), Some(other_pki.server_config.clone())).await;
    let other_plain = MockApi::start_on("10.77.0.1:8080".parse().unwrap(), None).await;
    // A decoy at another address with a certificate that passes for api.test: where a client that
    // was pointed elsewhere (a stale or spoofed DNS answer) was going.
    let decoy =
        MockApi::start_on("10.77.0.2:443".parse().unwrap(), Some(api_pki.server_config.clone())).await;
    for mock in [&api, &api_plain] {
        mock.accept("at-transparent");
    }
    other.accept("none-needed");

    let admin_port = fixed_port();
    std::fs::write(dir.path().join("api.json"), token_json("at-transparent")).unwrap();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
         [tls]\nextra_roots = [{}]\n[transparent]\nlisten = \"127.0.0.1:15001\"\n\
         [providers.api]\nhosts = [\"api.test\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n",
        toml_path(&api_pki.ca_pem_path)
    );
    let proxy = TokenProxy::start_unprivileged(dir.path(), &config);
    std::fs::copy(dir.path().join("data/ca/ca.pem"), public.path().join("tokenproxy-ca.pem")).unwrap();
    let ca = public.path().join("tokenproxy-ca.pem").display().to_string();
    let other_ca = other_pki.ca_pem_path.display().to_string();
    sh(&format!("chmod 644 {ca} {other_ca}"));

    // Exactly the rules `tokenproxy iptables` prints.
    let rules = Command::new(binary())
        .args(["iptables", "--uid", "65534", "--config"])
        .arg(dir.path().join("tokenproxy.toml"))
        .output()
        .unwrap();
    assert!(rules.status.success(), "{}", String::from_utf8_lossy(&rules.stderr));
    let rules = String::from_utf8(rules.stdout).unwrap();
    for rule in rules.lines().filter(|l| l.starts_with("iptables ")) {
        sh(rule);
    }

    let client = move |argv: Vec<String>, env: Vec<(String, String)>| async move {
        tokio::task::spawn_blocking(move || {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            as_client(&argv, &env)
        })
        .await
        .unwrap()
    };
    let curl = |args: &[&str]| -> Vec<String> {
        ["curl", "-sS", "--fail", "--max-time", "15"].iter().chain(args).map(|s| s.to_string()).collect()
    };

    // HTTPS to the provider, trusting only tokenproxy's CA: intercepted and injected.
    client(curl(&["--cacert", &ca, "https://api.test/v1/secure"]), vec![]).await.unwrap();
    assert_eq!(api.last().authorization(), Some("Bearer at-transparent"));
    assert_eq!(api.last().path, "/v1/secure");
    // Plain HTTP to the provider: injected under the plaintext rules.
    client(curl(&["http://api.test/v1/plain"]), vec![]).await.unwrap();
    assert_eq!(api_plain.last().authorization(), Some("Bearer at-transparent"));
    // A host that matches no provider is reached untouched: the client sees its own certificate
    // (it trusts only that host's CA) and no token is added.
    client(curl(&["--cacert", &other_ca, "https://other.test:8443/v1/untouched"]), vec![]).await.unwrap();
    assert_eq!(other.last().authorization(), None);
    // Plain HTTP to a host that matches no provider: relayed byte for byte. A forward proxy
    // would drop Proxy-Authorization (hop-by-hop); the untouched relay delivers it as sent.
    let untouched =
        curl(&["-H", "Proxy-Authorization: Basic dW50b3VjaGVk", "http://other.test:8080/v1/plain-untouched"]);
    client(untouched, vec![]).await.unwrap();
    let seen = other_plain.last();
    assert_eq!(seen.path, "/v1/plain-untouched");
    assert_eq!(seen.authorization(), None);
    assert_eq!(
        seen.headers.get("proxy-authorization").map(|v| v.to_str().unwrap()),
        Some("Basic dW50b3VjaGVk")
    );
    // The upstream is dialled by the SNI name, never at the redirected address: a client sent to
    // the decoy's address for api.test still reaches api.test, and the decoy never sees the token.
    let elsewhere = ["--resolve", "api.test:443:10.77.0.2", "--cacert", &ca, "https://api.test/v1/by-name"];
    client(curl(&elsewhere), vec![]).await.unwrap();
    assert_eq!(api.last().path, "/v1/by-name");
    assert_eq!(api.last().authorization(), Some("Bearer at-transparent"));
    assert!(decoy.seen().is_empty(), "the redirected address got {:?}", decoy.seen().len());
    // Node's built-in fetch, with no proxy agent at all.
    let script = "fetch('https://api.test/v1/node').then(r => { if (!r.ok) process.exit(1); return r.text() }).then(() => process.exit(0), e => { console.error(e); process.exit(2) })";
    let node = client(
        vec!["node".into(), "-e".into(), script.into()],
        vec![("NODE_EXTRA_CA_CERTS".into(), ca.clone())],
    )
    .await;
    assert!(node.is_ok(), "{node:?}");
    assert_eq!(api.last().path, "/v1/node");
    assert_eq!(api.last().authorization(), Some("Bearer at-transparent"));

    // tokenproxy's own upstream calls were not redirected back to it (they reached the mock), and
    // the intercepted requests are counted like any other.
    let requests = proxy.metric("tokenproxy_requests_total", &[("provider", "api"), ("status", "2xx")]).await;
    assert!(requests >= 3.0, "{requests}");
    // A connection whose original destination is tokenproxy's own transparent listener is a loop:
    // closed, and tokenproxy stays up.
    let looped = tokio::net::TcpStream::connect(("127.0.0.1", 15001)).await;
    if let Ok(mut looped) = looped {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), looped.read(&mut byte)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    let (status, _) = proxy.admin_get("/healthz").await;
    assert_eq!(status, http::StatusCode::OK);

    // With [egress] allow_unmatched = false, a connection to a host that matches no provider is
    // closed instead of relayed; the provider is still intercepted.
    let mut proxy = proxy;
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    drop(proxy);
    let strict = config.replace("[transparent]", "[egress]\nallow_unmatched = false\n[transparent]");
    let proxy = TokenProxy::start_unprivileged(dir.path(), &strict);
    let before = other.seen().len();
    let refused = client(curl(&["--cacert", &other_ca, "https://other.test:8443/v1/refused"]), vec![]).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(other.seen().len(), before, "nothing reached the unmatched host");
    client(curl(&["--cacert", &ca, "https://api.test/v1/still"]), vec![]).await.unwrap();
    assert_eq!(api.last().path, "/v1/still");
    drop(proxy);

    // With callers (SPEC §13), redirected connections are told apart by their socket's owner:
    // the client's uid has a rule for some paths of the provider; root has none.
    let with_callers = format!(
        "{config}[callers.app]\nuids = [{CLIENT_UID}]\n[[callers.app.allow]]\nprovider = \"api\"\npaths = [\"/v1/allowed*\"]\n"
    );
    let proxy = TokenProxy::start_unprivileged(dir.path(), &with_callers);
    client(curl(&["--cacert", &ca, "https://api.test/v1/allowed"]), vec![]).await.unwrap();
    assert_eq!(
        (api.last().path.as_str(), api.last().authorization()),
        ("/v1/allowed", Some("Bearer at-transparent"))
    );
    let before = api.seen().len() + api_plain.seen().len();
    for url in ["https://api.test/v1/denied", "http://api.test/v1/denied"] {
        let denied = client(curl(&["--cacert", &ca, url]), vec![]).await;
        assert!(denied.as_ref().is_err_and(|e| e.contains("403")), "{url}: {denied:?}");
    }
    let root = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "15",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://api.test/v1/allowed",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&root.stdout), "407", "a uid no caller has");
    assert_eq!(api.seen().len() + api_plain.seen().len(), before, "a refused request reached the provider");
    drop(proxy);

    // Rules that spare another user than tokenproxy's (`--uid` wrong): tokenproxy's own dial to
    // an unmatched host is redirected back to it. That loop is refused at once, not relayed again
    // (it went round 1,015 times in 0.1 s before), and tokenproxy stays up.
    sh(
        "iptables -t nat -F OUTPUT && iptables -t nat -F TOKENPROXY_OUTPUT && iptables -t nat -X TOKENPROXY_OUTPUT",
    );
    let wrong = Command::new(binary())
        .args(["iptables", "--uid", "4242", "--config"])
        .arg(dir.path().join("tokenproxy.toml"))
        .output()
        .unwrap();
    for rule in String::from_utf8(wrong.stdout).unwrap().lines().filter(|l| l.starts_with("iptables ")) {
        sh(rule);
    }
    let proxy = TokenProxy::start_unprivileged(dir.path(), &config);
    let before = other_plain.seen().len();
    let looped = client(curl(&["http://other.test:8080/v1/looped"]), vec![]).await;
    assert!(looped.is_err(), "{looped:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refusals = proxy.logs().iter().filter(|l| l.contains("redirected back to it")).count();
    assert!((1..=2).contains(&refusals), "{refusals} loop refusals: {:?}", proxy.logs());
    let relayed = proxy.logs().iter().filter(|l| l.contains("relayed untouched")).count();
    assert!(relayed <= 2, "the loop went round {relayed} times");
    assert_eq!(other_plain.seen().len(), before);
    let (status, _) = proxy.admin_get("/healthz").await;
    assert_eq!(status, http::StatusCode::OK);
}
