//! SPEC §14: credentials no person consents to, checked by verifiers we did not write. The token
//! endpoint is `tests/grants_endpoint.py` (pyjwt and cryptography): it makes the keys, verifies
//! every assertion tokenproxy signs and refuses anything else; the provider API is the usual
//! in-process mock, which answers with the Authorization header it received.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// The Python token endpoint, killed when dropped.
struct Endpoint {
    child: tokio::process::Child,
    port: u16,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Endpoint {
    async fn start(dir: &Path) -> Option<Endpoint> {
        if !client_available(
            "python3 with pyjwt and cryptography",
            std::process::Command::new("python3").args(["-c", "import jwt, cryptography"]),
        ) {
            return None;
        }
        let (child, line) = start_python_helper("grants_endpoint.py", &[dir.as_os_str()]).await;
        let port = line.trim().parse().expect("it prints its port");
        Some(Endpoint { child, port })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the endpoint decided about every request so far.
    async fn log(&self) -> Vec<Value> {
        reqwest::get(self.url("/log")).await.unwrap().json().await.unwrap()
    }

    /// The endpoint's verdict on the request that issued `token`.
    async fn issued(&self, token: &str) -> Value {
        let log = self.log().await;
        log.into_iter().find(|e| e["token"] == token).unwrap_or_else(|| panic!("{token} was not issued here"))
    }
}

/// One provider per kind, each with its own mock API (a provider is chosen by host).
struct Setup {
    dir: tempfile::TempDir,
    endpoint: Endpoint,
    apis: std::collections::HashMap<&'static str, MockApi>,
    tp: TokenProxy,
}

const KINDS: [&str; 11] =
    ["sa", "dwd", "rsa1", "ec1", "ec8", "stranger", "pkjwt", "wif", "sts", "gh", "disc"];

async fn setup() -> Option<Setup> {
    let dir = tempdir();
    let endpoint = Endpoint::start(dir.path()).await?;
    let mut apis = std::collections::HashMap::new();
    for kind in KINDS {
        apis.insert(kind, MockApi::start().await);
    }
    let token = endpoint.url("/token");
    let host = |kind: &str| apis[kind].authority();
    let config = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream_timeout = "5s"
[admin]
listen = "127.0.0.1:0"

# A Google service account: everything from its JSON key.
[providers.sa]
hosts = ["{sa}"]
token_file = "tokens/sa.json"
allow_plaintext = true
[providers.sa.oauth]
grant = "jwt_bearer"
service_account_file = "service_account.json"
scope = "https://www.googleapis.com/auth/cloud-platform"

# Domain-wide delegation: the account is the user the token acts for.
[providers.dwd]
hosts = ["{dwd}"]
token_file = "tokens/dwd/{{account}}.json"
default_account = "alice@example.com"
allow_plaintext = true
[providers.dwd.oauth]
grant = "jwt_bearer"
service_account_file = "service_account.json"
scope = "https://www.googleapis.com/auth/gmail.readonly"

[providers.rsa1]
hosts = ["{rsa1}"]
token_file = "tokens/rsa1.json"
allow_plaintext = true
[providers.rsa1.oauth]
grant = "jwt_bearer"
token_url = "{token}"
client_id = "svc-rsa1"
private_key_file = "rsa_pkcs1.pem"
key_id = "k-rsa1"
assertion_ttl = "30m"
assertion_claims = {{ tenant = "t-1" }}

[providers.ec1]
hosts = ["{ec1}"]
token_file = "tokens/ec1.json"
allow_plaintext = true
[providers.ec1.oauth]
grant = "jwt_bearer"
token_url = "{token}"
client_id = "svc-ec1"
private_key_file = "ec_sec1.pem"

[providers.ec8]
hosts = ["{ec8}"]
token_file = "tokens/ec8.json"
allow_plaintext = true
[providers.ec8.oauth]
grant = "jwt_bearer"
token_url = "{token}"
client_id = "svc-ec8"
private_key_file = "ec_pkcs8.pem"

# Signs with a key the endpoint does not trust for this client.
[providers.stranger]
hosts = ["{stranger}"]
token_file = "tokens/stranger.json"
allow_plaintext = true
[providers.stranger.oauth]
grant = "jwt_bearer"
token_url = "{token}"
client_id = "svc-stranger"
private_key_file = "stranger.pem"

[providers.pkjwt]
hosts = ["{pkjwt}"]
token_file = "tokens/pkjwt.json"
allow_plaintext = true
[providers.pkjwt.oauth]
grant = "client_credentials"
client_auth = "private_key_jwt"
token_url = "{token}"
client_id = "client-pk"
private_key_file = "rsa_pkcs8.pem"

[providers.wif]
hosts = ["{wif}"]
token_file = "tokens/wif.json"
allow_plaintext = true
[providers.wif.oauth]
grant = "client_credentials"
client_auth = "client_assertion_file"
client_assertion_file = "projected.jwt"
token_url = "{token}"
client_id = "azure-client"
scope = "https://graph.example/.default"

[providers.sts]
hosts = ["{sts}"]
token_file = "tokens/sts.json"
allow_plaintext = true
[providers.sts.oauth]
grant = "token_exchange"
token_url = "{token}"
subject_token_file = "subject.jwt"
audience = "//iam.example/pools/p/providers/k8s"
resource = "https://storage.example"
requested_token_type = "urn:ietf:params:oauth:token-type:access_token"
scope = "storage.read"

[providers.gh]
hosts = ["{gh}"]
token_file = "tokens/gh/{{account}}.json"
default_account = "777"
allow_plaintext = true
[providers.gh.oauth]
grant = "github_app"
app_id = "4242"
private_key_file = "rsa_pkcs1.pem"
api_url = "{api}"

[providers.disc]
hosts = ["{disc}"]
token_file = "tokens/disc.json"
allow_plaintext = true
[providers.disc.oauth]
grant = "client_credentials"
issuer = "{rfc8414}"
client_id = "disc-client"
client_secret = "disc-secret"
"#,
        sa = host("sa"),
        dwd = host("dwd"),
        rsa1 = host("rsa1"),
        ec1 = host("ec1"),
        ec8 = host("ec8"),
        stranger = host("stranger"),
        pkjwt = host("pkjwt"),
        wif = host("wif"),
        sts = host("sts"),
        gh = host("gh"),
        disc = host("disc"),
        api = endpoint.url(""),
        rfc8414 = endpoint.url("/rfc8414"),
    );
    let tp = TokenProxy::start(dir.path(), &config);
    Some(Setup { dir, endpoint, apis, tp })
}

impl Setup {
    /// The token the provider API received for a request of `kind`, with `account` if given.
    async fn bearer(&self, kind: &str, account: Option<&str>) -> (u16, String) {
        let mut request = self.tp.client().get(self.apis[kind].url("/whoami"));
        if let Some(account) = account {
            request = request.header("Tokenproxy-Account", account);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn token_of(&self, kind: &str, account: Option<&str>) -> String {
        let (status, body) = self.bearer(kind, account).await;
        assert_eq!(status, 200, "{kind}: {body}");
        body.strip_prefix("Bearer ").unwrap_or_else(|| panic!("{kind}: {body}")).to_string()
    }

    async fn refresh(&self, provider: &str) -> (u16, Value) {
        let url = format!("http://{}/tokens/{provider}/refresh", self.tp.admin);
        let response = reqwest::Client::new().post(url).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_sign_assertions_the_token_endpoint_verifies_with_pyjwt() {
    let Some(s) = setup().await else { return };

    // Google's shape: iss and sub the client_email, aud the token_uri, the key id, the scope.
    let token = s.token_of("sa", None).await;
    let seen = s.endpoint.issued(&token).await;
    assert_eq!(seen["grant"], "jwt_bearer");
    assert_eq!(seen["iss"], "sa@proj.iam.gserviceaccount.com");
    assert_eq!(seen["sub"], "sa@proj.iam.gserviceaccount.com");
    assert_eq!(seen["kid"], "google-kid-1");
    assert_eq!(seen["alg"], "RS256");
    assert_eq!(seen["scope"], "https://www.googleapis.com/auth/cloud-platform");
    assert_eq!(seen["claims"]["aud"], s.endpoint.url("/token"));
    let life = seen["claims"]["exp"].as_u64().unwrap() - seen["claims"]["iat"].as_u64().unwrap();
    assert_eq!(life, 3600, "assertion_ttl's default");
    assert_eq!(seen["form"], serde_json::json!({}), "no client authentication and no form scope");

    // Domain-wide delegation: one token per user, each with its own sub.
    let alice = s.token_of("dwd", None).await;
    let bob = s.token_of("dwd", Some("bob@example.com")).await;
    assert_ne!(alice, bob);
    assert_eq!(s.endpoint.issued(&alice).await["sub"], "alice@example.com");
    assert_eq!(s.endpoint.issued(&bob).await["sub"], "bob@example.com");

    // PKCS#1 RSA with a key id, an assertion_ttl and an extra claim; SEC1 and PKCS#8 EC.
    let rsa1 = s.endpoint.issued(&s.token_of("rsa1", None).await).await;
    assert_eq!((rsa1["alg"].as_str(), rsa1["kid"].as_str()), (Some("RS256"), Some("k-rsa1")));
    assert_eq!((rsa1["iss"].as_str(), rsa1["sub"].as_str()), (Some("svc-rsa1"), Some("svc-rsa1")));
    assert_eq!(rsa1["claims"]["tenant"], "t-1");
    let life = rsa1["claims"]["exp"].as_u64().unwrap() - rsa1["claims"]["iat"].as_u64().unwrap();
    assert_eq!(life, 1800);
    for kind in ["ec1", "ec8"] {
        let seen = s.endpoint.issued(&s.token_of(kind, None).await).await;
        assert_eq!(seen["alg"], "ES256", "{kind}");
        assert_eq!(seen["iss"], format!("svc-{kind}"));
        assert!(seen["kid"].is_null());
    }

    // A 401 for a minted token: one new assertion, one new token, the request sent again; and
    // /tokens shows it like any other token.
    let first = s.token_of("ec1", None).await;
    let n: u64 = first.rsplit('-').next().unwrap().parse().unwrap();
    // The endpoint numbers each client's tokens: the next one is known.
    let next = format!("at-svc-ec1-{}", n + 1);
    s.apis["ec1"].accept_only(&[&next]);
    let retried = s.token_of("ec1", None).await;
    assert_eq!(retried, next, "after {first}");
    assert_eq!(s.endpoint.issued(&retried).await["alg"], "ES256", "a fresh assertion the endpoint verified");
    let view = s.tp.token_view("ec1").await;
    assert_eq!(view["state"], "valid", "{view}");
    assert_eq!(view["fingerprint"], tokenproxy::secrets::fingerprint(&retried), "{view}");

    // A key the endpoint does not trust: refused there, 502 here, and nothing of the key shown.
    let (status, body) = s.bearer("stranger", None).await;
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert!(body["reason"].as_str().unwrap().starts_with("invalid_grant"), "{body}");
    assert!(body["action"].as_str().unwrap().contains("refused the jwt_bearer grant"), "{body}");
    let refused = s.endpoint.log().await.into_iter().filter(|e| e["ok"] == false).count();
    assert!(refused >= 1);

    let key = std::fs::read_to_string(s.dir.path().join("stranger.pem")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    let sa_key: Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("service_account.json")).unwrap())
            .unwrap();
    let sa_line = sa_key["private_key"].as_str().unwrap().lines().nth(1).unwrap().to_string();
    let (_, tokens) = s.tp.admin_get("/tokens").await;
    for text in s.tp.logs().iter().chain([tokens].iter()) {
        assert!(!text.contains(key_line) && !text.contains(&sa_line), "a key in: {text}");
        assert!(!text.contains("eyJ"), "a JWT in: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_assertions_signed_or_read_from_a_rotating_file_and_token_exchange() {
    let Some(s) = setup().await else { return };

    // private_key_jwt: a fresh, short-lived assertion (unique jti) for every token request.
    let first = s.token_of("pkjwt", None).await;
    let (status, _) = s.refresh("pkjwt").await;
    assert_eq!(status, 200);
    let second = s.token_of("pkjwt", None).await;
    assert_ne!(first, second);
    let (a, b) = (s.endpoint.issued(&first).await, s.endpoint.issued(&second).await);
    for seen in [&a, &b] {
        assert_eq!(seen["client"], "client-pk");
        let claims = &seen["claims"];
        assert_eq!(claims["aud"], s.endpoint.url("/token"));
        assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 300);
    }
    assert_ne!(a["claims"]["jti"], b["claims"]["jti"]);

    // client_assertion_file: re-read on every token request. The file is replaced (as the
    // kubelet does) between two requests; the second carries the new content.
    let first = s.token_of("wif", None).await;
    assert_eq!(s.endpoint.issued(&first).await["claims"]["n"], 1);
    std::fs::rename(s.dir.path().join("projected-2.jwt"), s.dir.path().join("projected.jwt")).unwrap();
    let (status, _) = s.refresh("wif").await;
    assert_eq!(status, 200);
    let second = s.token_of("wif", None).await;
    let seen = s.endpoint.issued(&second).await;
    assert_eq!(seen["claims"]["n"], 2, "the rewritten assertion file was sent");
    assert_eq!(seen["claims"]["sub"], "system:serviceaccount:shop:api");

    // RFC 8693: the subject token from its file, and every form field the config names.
    let token = s.token_of("sts", None).await;
    let seen = s.endpoint.issued(&token).await;
    assert_eq!(seen["grant"], "token_exchange");
    assert_eq!(
        (seen["subject"].as_str(), seen["n"].as_u64()),
        (Some("system:serviceaccount:shop:etl"), Some(1))
    );
    assert_eq!(
        seen["form"],
        serde_json::json!({
            "audience": "//iam.example/pools/p/providers/k8s",
            "resource": "https://storage.example",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": "storage.read",
            "client_id": null,
        })
    );
    std::fs::rename(s.dir.path().join("subject-2.jwt"), s.dir.path().join("subject.jwt")).unwrap();
    assert_eq!(s.refresh("sts").await.0, 200);
    let seen = s.endpoint.issued(&s.token_of("sts", None).await).await;
    assert_eq!(seen["n"], 2, "the subject token is read again for each exchange");

    // An assertion file that is gone: a clear error, the last good token kept in use.
    let before = s.token_of("wif", None).await;
    std::fs::remove_file(s.dir.path().join("projected.jwt")).unwrap();
    let (status, body) = s.refresh("wif").await;
    assert_eq!(status, 502, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("client_assertion_file") && reason.contains("projected.jwt"), "{reason}");
    assert_eq!(s.token_of("wif", None).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_app_installation_tokens_and_endpoints_discovered_from_the_issuer() {
    let Some(s) = setup().await else { return };

    // One token per installation (the account), from the app JWT the endpoint checked.
    let default = s.token_of("gh", None).await;
    assert!(default.starts_with("ghs_777_"), "{default}");
    let other = s.token_of("gh", Some("888")).await;
    assert!(other.starts_with("ghs_888_"), "{other}");
    let seen = s.endpoint.issued(&default).await;
    assert_eq!(seen["app"], "4242");
    assert!(seen["life"].as_u64().unwrap() <= 600, "{seen}");
    // Stored like any token, with GitHub's expiry.
    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("tokens/gh/777.json")).unwrap())
            .unwrap();
    assert_eq!(stored["access_token"], default.as_str());
    assert!(stored["expires_at"].as_str().is_some());
    // An installation GitHub does not know: 502 with the reason, nothing injected.
    let (status, body) = s.bearer("gh", Some("404")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("installation 404"), "{body}");
    // An account that is no installation id never reaches GitHub.
    let calls = s.endpoint.log().await.len();
    let (status, body) = s.bearer("gh", Some("alice")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("installation id"), "{body}");
    assert_eq!(s.endpoint.log().await.len(), calls);

    // issuer: the token URL came from the RFC 8414 metadata.
    let token = s.token_of("disc", None).await;
    assert!(token.starts_with("at-disc-client-"), "{token}");
    assert!(s.tp.logs().iter().any(|l| l.contains("endpoints discovered from the issuer")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openid_issuer_is_discovered_and_an_issuer_that_names_another_is_refused_at_start() {
    let dir = tempdir();
    let Some(endpoint) = Endpoint::start(dir.path()).await else { return };
    let api = MockApi::start().await;
    let config = |issuer: &str| {
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[providers.disc]
hosts = ["{host}"]
token_file = "disc.json"
allow_plaintext = true
[providers.disc.oauth]
grant = "client_credentials"
issuer = "{issuer}"
client_id = "disc-client"
client_secret = "disc-secret"
"#,
            host = api.authority()
        )
    };
    // Only the OpenID document exists for this issuer: RFC 8414's answers 404 first.
    let tp = TokenProxy::start(dir.path(), &config(&endpoint.url("/oidc")));
    let response = tp.client().get(api.url("/whoami")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().starts_with("Bearer at-disc-client-"));
    drop(tp);

    // Metadata that names another issuer is not used (RFC 8414 §3.3): the start stops, saying why.
    let out = tokio::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(write_config(dir.path(), &config(&endpoint.url("/impostor"))))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("names another issuer"), "{stderr}");
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("impostor.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn check(config: &Path) -> (bool, String) {
    let out = tokio::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_each_key_signs_with_and_flags_bad_or_loose_keys_without_showing_them() {
    let Some(s) = setup().await else { return };
    let key_dir = s.dir.path();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(key_dir.join("ec_sec1.pem"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let (ok, text) = check(&s.tp.config_path).await;
    assert!(ok, "{text}");
    for expected in [
        "providers.rsa1: grant jwt_bearer, signs with RS256 (RSA 2048 bits), kid \"k-rsa1\"",
        "providers.ec1: grant jwt_bearer, signs with ES256 (EC P-256), no kid",
        "providers.ec8: grant jwt_bearer, signs with ES256 (EC P-256), no kid",
        "providers.sa: grant jwt_bearer, signs with RS256 (RSA 2048 bits), kid \"google-kid-1\"",
        "providers.pkjwt: grant client_credentials, signs with RS256 (RSA 2048 bits), no kid",
        "providers.wif: grant client_credentials, client assertion read from",
        "providers.sts: grant token_exchange, client_auth none, subject token read from",
        "providers.gh: grant github_app, signs with RS256",
        "endpoints not set are discovered from",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    assert!(text.contains("warning: providers.ec1 private key"), "{text}");
    assert!(text.contains("readable by everyone"), "{text}");

    // A key that is no key, and a grant without one: config problems that name the file and
    // never its content.
    std::fs::write(
        key_dir.join("garbage.pem"),
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(&s.tp.config_path)
        .unwrap()
        .replace("private_key_file = \"ec_pkcs8.pem\"", "private_key_file = \"garbage.pem\"")
        .replace("subject_token_file = \"subject.jwt\"\n", "")
        .replace("app_id = \"4242\"\n", "");
    let broken = key_dir.join("broken.toml");
    std::fs::write(&broken, config).unwrap();
    let (ok, text) = check(&broken).await;
    assert!(!ok, "{text}");
    assert!(text.contains("garbage.pem") && text.contains("neither RSA"), "{text}");
    assert!(!text.contains("bm90IGEga2V5"), "the key's content is shown: {text}");
    assert!(text.contains("grant = \"token_exchange\" needs subject_token_file"), "{text}");
    assert!(text.contains("grant = \"github_app\" needs app_id"), "{text}");
}

/// Discovery fills only what the config leaves unset: a token_url written in the config wins,
/// the authorization endpoint comes from the metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_set_in_the_config_win_over_the_issuers_metadata() {
    let dir = tempdir();
    let Some(endpoint) = Endpoint::start(dir.path()).await else { return };
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[providers.p]\nhosts = [\"api.example.com\"]\ntoken_file = \"p.json\"\n[providers.p.oauth]\n\
             issuer = \"{}\"\ntoken_url = \"https://mine.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            endpoint.url("/oidc")
        ),
    )
    .unwrap();
    let mut config = tokenproxy::config::Config::load(&path).unwrap();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tls = tokenproxy::tls::client_config(&[]).unwrap();
    let client = tokenproxy::oauth::OAuthClient::new(tls, Duration::from_secs(5)).unwrap();
    tokenproxy::grants::discovery::fill_endpoints(&mut config.providers, &client).await.unwrap();
    let oauth = config.providers[0].oauth.as_ref().unwrap();
    assert_eq!(oauth.token_url.as_ref().unwrap().to_string(), "https://mine.example/token");
    assert_eq!(oauth.authorize_url.as_ref().unwrap().to_string(), endpoint.url("/authorize"));
    assert!(oauth.device_authorization_url.is_none(), "the metadata names none");
}

/// The same grant through intercepted HTTPS with its tokens in Redis (SPEC §11, §14): per-account
/// `sub`, the token in the shared store, and a 401 that brings one new assertion and one retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_through_intercepted_https_on_the_redis_store_retries_a_401_once() {
    let dir = tempdir();
    if !redis_available() {
        return;
    }
    let Some(endpoint) = Endpoint::start(dir.path()).await else { return };
    let redis = RedisServer::start(dir.path());
    let pki = test_pki(dir.path(), "api", &["localhost"]);
    let api = MockApi::start_tls(pki.server_config.clone()).await;
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
[store]
kind = "redis"
url = "{redis}"
[providers.dwd]
hosts = ["localhost:{port}"]
token_file = "tokens/dwd/{{account}}.json"
default_account = "alice@example.com"
[providers.dwd.oauth]
grant = "jwt_bearer"
service_account_file = "service_account.json"
token_url = "{token_url}"
scope = "https://www.googleapis.com/auth/gmail.readonly"
"#,
        roots = toml_path(&pki.ca_pem_path),
        redis = redis.url(),
        port = api.addr.port(),
        token_url = endpoint.url("/token"),
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let client = tp.intercepting_client();
    let url = format!("https://localhost:{}/whoami", api.addr.port());
    let token_of = |account: &'static str| {
        let request = client.get(&url).header("Tokenproxy-Account", account);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.text().await.unwrap();
            body.strip_prefix("Bearer ").unwrap_or_else(|| panic!("{body}")).to_string()
        }
    };
    let alice = token_of("alice@example.com").await;
    let bob = token_of("bob@example.com").await;
    assert_ne!(alice, bob);
    assert_eq!(endpoint.issued(&alice).await["sub"], "alice@example.com");
    assert_eq!(endpoint.issued(&bob).await["sub"], "bob@example.com");
    assert!(std::fs::read_dir(dir.path().join("tokens")).is_err(), "no token file: the store is Redis");
    let stored = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan", "--pattern", "tokenproxy*"])
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&stored.stdout).into_owned();
    assert!(keys.contains("alice@example.com") && keys.contains("bob@example.com"), "{keys}");

    // The provider calls Alice's token dead: one new assertion and token, the request sent again.
    // The endpoint numbers the service account's tokens: the next one is known.
    let number = |t: &str| t.rsplit('-').next().unwrap().parse::<u64>().unwrap();
    let prefix = alice.rsplit_once('-').unwrap().0;
    let next = format!("{prefix}-{}", number(&alice).max(number(&bob)) + 1);
    api.accept_only(&[&next, &bob]);
    let retried = token_of("alice@example.com").await;
    assert_eq!(retried, next, "after {alice} and {bob}");
    assert_eq!(endpoint.issued(&retried).await["sub"], "alice@example.com");
    let whoami: Vec<_> = api.seen().into_iter().filter(|s| s.path == "/whoami").collect();
    assert_eq!(whoami.len(), 4, "two first requests, the refused one and its one retry");
    assert_eq!(token_of("bob@example.com").await, bob, "Bob's token was not touched");
}

/// Every other grant the same way (SPEC §14: "each grant is one implementation behind" the token
/// endpoint seam, so each gets the lifecycle): through intercepted HTTPS, tokens in Redis, and a
/// 401 for a minted token brings exactly one new token from the endpoint and one retry. GitHub
/// installations are accounts: the one called dead is replaced, the other is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_through_intercepted_https_on_the_redis_store_retries_a_401_with_one_new_token() {
    let dir = tempdir();
    if !redis_available() {
        return;
    }
    let Some(endpoint) = Endpoint::start(dir.path()).await else { return };
    let redis = RedisServer::start(dir.path());
    let pki = test_pki(dir.path(), "api", &["localhost"]);
    const GRANTS: [&str; 5] = ["ec1", "pkjwt", "wif", "sts", "gh"];
    let mut apis = std::collections::HashMap::new();
    for kind in GRANTS {
        apis.insert(kind, MockApi::start_tls(pki.server_config.clone()).await);
    }
    let port = |kind: &str| apis[kind].addr.port();
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
[store]
kind = "redis"
url = "{redis}"

[providers.ec1]
hosts = ["localhost:{ec1}"]
token_file = "tokens/ec1.json"
[providers.ec1.oauth]
grant = "jwt_bearer"
token_url = "{token}"
client_id = "svc-ec1"
private_key_file = "ec_sec1.pem"

[providers.pkjwt]
hosts = ["localhost:{pkjwt}"]
token_file = "tokens/pkjwt.json"
[providers.pkjwt.oauth]
grant = "client_credentials"
client_auth = "private_key_jwt"
token_url = "{token}"
client_id = "client-pk"
private_key_file = "rsa_pkcs8.pem"

[providers.wif]
hosts = ["localhost:{wif}"]
token_file = "tokens/wif.json"
[providers.wif.oauth]
grant = "client_credentials"
client_auth = "client_assertion_file"
client_assertion_file = "projected.jwt"
token_url = "{token}"
client_id = "azure-client"

[providers.sts]
hosts = ["localhost:{sts}"]
token_file = "tokens/sts.json"
[providers.sts.oauth]
grant = "token_exchange"
token_url = "{token}"
subject_token_file = "subject.jwt"
audience = "//iam.example/pools/p/providers/k8s"

[providers.gh]
hosts = ["localhost:{gh}"]
token_file = "tokens/gh/{{account}}.json"
default_account = "777"
[providers.gh.oauth]
grant = "github_app"
app_id = "4242"
private_key_file = "rsa_pkcs1.pem"
api_url = "{api}"
"#,
        roots = toml_path(&pki.ca_pem_path),
        redis = redis.url(),
        token = endpoint.url("/token"),
        api = endpoint.url(""),
        ec1 = port("ec1"),
        pkjwt = port("pkjwt"),
        wif = port("wif"),
        sts = port("sts"),
        gh = port("gh"),
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let client = tp.intercepting_client();
    let token_of = |kind: &str, account: Option<&str>| {
        let mut request = client.get(format!("https://localhost:{}/whoami", port(kind)));
        if let Some(account) = account {
            request = request.header("Tokenproxy-Account", account);
        }
        let kind = kind.to_string();
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_eq!(status, 200, "{kind}: {body}");
            body.strip_prefix("Bearer ").unwrap_or_else(|| panic!("{kind}: {body}")).to_string()
        }
    };
    // The endpoint numbers each client's tokens (at-client-pk-1, ghs_777_1): the next is known.
    let split = |token: &str| {
        let at = token.rfind(['-', '_']).unwrap();
        (token[..=at].to_string(), token[at + 1..].parse::<u64>().unwrap())
    };
    let issued_with = |prefix: String| {
        let log = endpoint.log();
        async move {
            log.await
                .iter()
                .filter(|e| e["ok"] == true && e["token"].as_str().is_some_and(|t| t.starts_with(&prefix)))
                .count()
        }
    };
    let whoami = |kind: &str| apis[kind].seen().into_iter().filter(|s| s.path == "/whoami").count();

    let other_installation = token_of("gh", Some("888")).await;
    for kind in GRANTS {
        let first = token_of(kind, None).await;
        let (prefix, n) = split(&first);
        let issued = issued_with(prefix.clone()).await;
        let sent = whoami(kind);
        let next = format!("{prefix}{}", n + 1);
        apis[kind].accept_only(&[&next, &other_installation]);

        let retried = token_of(kind, None).await;
        assert_eq!(retried, next, "{kind}: after {first}");
        assert_eq!(issued_with(prefix).await, issued + 1, "{kind}: exactly one new token");
        assert_eq!(whoami(kind), sent + 2, "{kind}: the refused request and its one retry");
        assert_eq!(token_of(kind, None).await, next, "{kind}: the new token stays in use");
    }
    assert_eq!(token_of("gh", Some("888")).await, other_installation, "the other installation is untouched");

    // Single flight: twelve requests at once for an installation with no token yet, one token.
    apis["gh"].accept("ghs_999_1");
    let first_requests = (0..12).map(|_| token_of("gh", Some("999")));
    let tokens = futures_util::future::join_all(first_requests).await;
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    assert_eq!(issued_with("ghs_999_".to_string()).await, 1, "one token request for twelve callers");

    assert!(std::fs::read_dir(dir.path().join("tokens")).is_err(), "no token file: the store is Redis");
    let stored = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan", "--pattern", "tokenproxy*"])
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&stored.stdout).into_owned();
    for kind in GRANTS {
        assert!(keys.contains(kind), "{kind} not in Redis: {keys}");
    }
    assert!(keys.contains("777") && keys.contains("888"), "{keys}");
}
