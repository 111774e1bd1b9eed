//! Who may use the admin API (SPEC §6), and that tokenproxy's own listeners are never reachable
//! through it (SPEC §5): a `Host` that is not the admin API's (DNS rebinding) gets `421`; a peer
//! that is not on loopback gets `401` without `[admin] token_file`'s token, while the probes
//! answer everyone. The peers that are not on loopback live in a network namespace of the
//! test's own, with an address besides 127/8.

mod support;

use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use support::*;

/// An address of the test's own namespace that is not loopback (on `lo`: a dummy interface
/// needs a kernel module a container may not have).
const POD_IP: &str = "10.78.0.1";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_host_that_is_not_the_admin_apis_is_misdirected_except_for_the_probes() {
    let api = MockApi::start().await;
    let dir = tempdir();
    std::fs::write(dir.path().join("api.json"), token_json("at-1")).unwrap();
    let config = api.plain_config(&dir.path().join("api.json"), "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\nhosts = [\"tokenproxy.internal\", \"admin.example:8443\"]\n",
    );
    assert!(config.contains("tokenproxy.internal"));
    let proxy = TokenProxy::start(dir.path(), &config);
    let admin = format!("http://{}", proxy.admin);
    let port = proxy.admin.port();
    let evil = format!("evil.example.net:{port}");
    let send = |method: http::Method, path: &str, host: &str| {
        http()
            .request(method, format!("{admin}{path}"))
            .header("host", host)
            .header("origin", format!("http://{host}"))
            .send()
    };
    for path in ["/tokens", "/connect", "/connect/api", "/tokens/api/refresh"] {
        let method = if path.ends_with("refresh") { http::Method::POST } else { http::Method::GET };
        let r = send(method, path, &evil).await.unwrap();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains("misdirected_host") && !body.contains("at-1"), "{body}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(send(http::Method::GET, path, &evil).await.unwrap().status(), StatusCode::OK, "{path}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "tokenproxy.internal".to_string(),
        format!("TokenProxy.Internal.:{port}"),
        "admin.example:8443".to_string(),
    ] {
        let r = send(http::Method::GET, "/tokens", &host).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{host}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    let r = send(http::Method::GET, "/tokens", &format!("admin.example:{port}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST, "the port of an [admin] hosts entry counts");
}

/// As root, in a network namespace of its own: the admin listener and the proxy on every
/// address, reached at the namespace's non-loopback address (a pod's IP).
#[test]
fn peers_beyond_loopback_need_the_admin_token_and_own_listeners_are_unreachable_at_any_local_address() {
    in_own_network_namespace(
        "peers_beyond_loopback_need_the_admin_token_and_own_listeners_are_unreachable_at_any_local_address",
        false,
        "unshare ip",
        inside,
    );
}

async fn inside() {
    let up = Command::new("sh")
        .args(["-c", &format!("ip link set lo up && ip addr add {POD_IP}/32 dev lo")])
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let dir = tempdir();
    let token = serde_json::json!({"access_token": "at-1", "refresh_token": "rt-start", "expires_at": "2099-01-01T00:00:00Z"});
    std::fs::write(dir.path().join("api.json"), token.to_string()).unwrap();
    endpoint.allow_refresh_token("rt-start");
    std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let admin_port = fixed_port();
    let config = format!(
        "[proxy]\nlisten = \"0.0.0.0:0\"\n[admin]\nlisten = \"0.0.0.0:{admin_port}\"\ntoken_file = \"admin-token\"\n\
         [providers.api]\nhosts = [\"{host}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{oauth}\
         authorize_url = \"{authorize}\"\n",
        host = api.authority(),
        oauth = endpoint.oauth_toml("api", "refresh_token"),
        authorize = endpoint.authorize_url(),
    );
    let proxy = TokenProxy::start(dir.path(), &config);
    let outside = format!("http://{POD_IP}:{admin_port}");

    // A peer in the pod's network, as a kubelet or a neighbour sees it.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http().get(format!("{outside}{path}")).send().await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
    let calls_before = endpoint.calls();
    for (method, path) in [
        (http::Method::GET, "/tokens"),
        (http::Method::GET, "/connect"),
        (http::Method::GET, "/connect/api"),
        (http::Method::POST, "/connect/api"),
        (http::Method::POST, "/tokens/api/refresh"),
    ] {
        let r = http().request(method.clone(), format!("{outside}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let challenges: Vec<_> = r.headers().get_all("www-authenticate").iter().collect();
        assert!(challenges.iter().any(|c| c.to_str().unwrap().starts_with("Basic ")), "{challenges:?}");
        let wrong = http()
            .request(method.clone(), format!("{outside}{path}"))
            .bearer_auth("admin-token-wrong-guess")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{method} {path} with a wrong token");
    }
    assert_eq!(endpoint.calls(), calls_before, "nothing was refreshed");
    assert_eq!(endpoint.authorize_requests().len(), 0, "no flow was started");
    assert!(
        !dir.path().join("data/oauth-state").exists()
            || std::fs::read_dir(dir.path().join("data/oauth-state")).unwrap().count() == 0
    );

    // With the token: as a bearer (scripts), or as a browser's Basic password.
    let r = http().get(format!("{outside}/tokens")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("\"provider\": \"api\""));
    let r = http()
        .get(format!("{outside}/connect"))
        .basic_auth("anyone", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r =
        http().post(format!("{outside}/tokens/api/refresh")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(endpoint.calls(), calls_before + 1);
    // A loopback peer is let in as it is.
    let r = http().get(format!("http://127.0.0.1:{admin_port}/tokens")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Through the proxy, the admin listener is not reachable at the pod's address either, nor
    // the proxy itself; the provider still is.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://127.0.0.1:{}", proxy.proxy.port())).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for target in [format!("{outside}/tokens"), format!("http://{POD_IP}:{}/", proxy.proxy.port())] {
        let r = client.get(&target).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{target}");
        assert_eq!(r.headers()["x-tokenproxy-error"], "egress_denied", "{target}");
    }
    let r = client.get(api.url("/v1/me")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
