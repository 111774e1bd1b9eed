//! `tokenproxy demo`: the whole story on loopback, with no credentials.
//!
//! One in-process server plays a provider: an API that accepts only the tokens it issued and has
//! not revoked, and its OAuth token endpoint (rotating refresh tokens). tokenproxy runs in front
//! of it with a token file in a temporary folder, and the demo sends calls through it: a fresh
//! token, an expired one, one the provider revoked, and an HTTPS call that tokenproxy intercepts
//! (the provider also serves TLS, from a throw-away CA that tokenproxy is told to trust), and
//! connects the provider through `/connect` and the provider's consent page (SPEC §9). Then it
//! keeps serving for `curl -x` and a person's browser.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app;
use crate::config::Config;
use crate::secrets::fingerprint;
use crate::tls::ca::CertificateAuthority;
use crate::tls::leaf::LeafCache;

const CLIENT_ID: &str = "demo-client";
const CLIENT_SECRET: &str = "demo-client-secret";

/// What the demo provider remembers.
#[derive(Default)]
struct ProviderState {
    valid_access: HashSet<String>,
    valid_refresh: HashSet<String>,
    issued: u32,
    token_calls: u32,
    /// (status, fingerprint of the token) of every API call.
    api_calls: Vec<(u16, String)>,
    /// Authorization codes issued by the consent page: the PKCE challenge and redirect URI their
    /// exchange must match.
    codes: HashMap<String, (Option<String>, String)>,
}

#[derive(Clone, Default)]
struct DemoProvider {
    state: Arc<Mutex<ProviderState>>,
}

impl DemoProvider {
    fn state(&self) -> std::sync::MutexGuard<'_, ProviderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A random-looking token value: the demo's tokens are throwaway, but still not guessable
    /// from the output, which shows fingerprints only.
    fn mint(&self, kind: &str) -> String {
        let n = crate::tokens::refresh::jitter(Duration::from_secs(1 << 30)).as_nanos();
        format!("demo-{kind}-{n:x}")
    }

    /// Serves plain HTTP, or HTTPS with `tls`.
    async fn serve(self, listener: tokio::net::TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let provider = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let provider = provider.clone();
                    async move { Ok::<_, Infallible>(provider.answer(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match acceptor {
                    None => builder.serve_connection(TokioIo::new(stream), service).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                };
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path().starts_with("/oauth/authorize") {
            return self.consent(req.uri().path(), req.uri().query().unwrap_or(""));
        }
        if req.uri().path() == "/oauth/token" {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return self.token_endpoint(&String::from_utf8_lossy(&body));
        }
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let mut state = self.state();
        let ok = state.valid_access.contains(&token);
        let status = if ok { 200 } else { 401 };
        state.api_calls.push((status, fingerprint(&token)));
        if ok {
            reply(
                200,
                json!({"hello": "from the demo provider", "your_token_fingerprint": fingerprint(&token)}),
            )
        } else {
            reply(401, json!({"error": "invalid_token"}))
        }
    }

    /// The provider's consent page (`/oauth/authorize`), whose Allow and Deny links go to
    /// `/oauth/authorize/decide`, which sends the browser back with a code or `access_denied`.
    fn consent(&self, path: &str, query: &str) -> Response<Full<Bytes>> {
        let q = form_fields(query);
        let Some(redirect) =
            q.get("redirect_uri").filter(|_| q.get("client_id").map(String::as_str) == Some(CLIENT_ID))
        else {
            return reply(400, json!({"error": "invalid_request"}));
        };
        if path == "/oauth/authorize" {
            let html = format!(
                "<!doctype html><meta name=viewport content=\"width=device-width\"><title>Demo provider</title>\
                 <body style=\"font-family:system-ui;max-width:30rem;margin:3rem auto;padding:0 1rem\">\
                 <h1>Demo provider</h1><p>Allow <b>tokenproxy demo</b> to call the demo API for you?</p>\
                 <p><a id=allow href=\"/oauth/authorize/decide?allow=1&{query}\">Allow</a> &nbsp; \
                 <a id=deny href=\"/oauth/authorize/decide?allow=0&{query}\">Deny</a></p>"
            );
            let mut response = Response::new(Full::new(Bytes::from(html)));
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("text/html"));
            return response;
        }
        let state = crate::onboarding::encode(q.get("state").map(String::as_str).unwrap_or(""));
        let back = if q.get("allow").map(String::as_str) == Some("1") {
            let code = self.mint("code");
            let challenge = q.get("code_challenge").cloned();
            self.state().codes.insert(code.clone(), (challenge, redirect.clone()));
            format!("{redirect}?code={code}&state={state}")
        } else {
            format!("{redirect}?error=access_denied&state={state}")
        };
        let mut response = reply(302, json!({}));
        if let Ok(location) = http::HeaderValue::from_str(&back) {
            response.headers_mut().insert("location", location);
        }
        response
    }

    fn token_endpoint(&self, body: &str) -> Response<Full<Bytes>> {
        let form = form_fields(body);
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let mut state = self.state();
        state.token_calls += 1;
        let granted = match field("grant_type") {
            "refresh_token" => state.valid_refresh.remove(field("refresh_token")),
            "authorization_code" => match state.codes.remove(field("code")) {
                Some((challenge, redirect)) => {
                    let verified = challenge.is_none_or(|c| {
                        crate::onboarding::pending::code_challenge(field("code_verifier")) == c
                    });
                    verified && redirect == field("redirect_uri")
                }
                None => false,
            },
            _ => false,
        };
        if !granted {
            return reply(400, json!({"error": "invalid_grant"}));
        }
        state.issued += 1;
        let (access, refresh) = (self.mint("access"), self.mint("refresh"));
        state.valid_access.insert(access.clone());
        state.valid_refresh.insert(refresh.clone());
        reply(
            200,
            json!({"access_token": access, "refresh_token": refresh, "expires_in": 3600, "token_type": "Bearer"}),
        )
    }
}

/// `a=1&b=x%20y` as fields.
fn form_fields(text: &str) -> HashMap<String, String> {
    crate::query::Query::parse(Some(text)).into_pairs().into_iter().collect()
}

fn reply(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    response
}

/// `preferred` when it is free, else a free port: the demo should not fail because 8080 is taken
/// (and the admin listener needs a port of its own: the callback URL names it).
fn free_or_any(preferred: &str) -> String {
    match std::net::TcpListener::bind(preferred).or_else(|_| std::net::TcpListener::bind("127.0.0.1:0")) {
        Ok(listener) => listener.local_addr().map_or_else(|_| "127.0.0.1:0".into(), |a| a.to_string()),
        Err(_) => "127.0.0.1:0".to_string(),
    }
}

fn write_token_file(
    path: &std::path::Path,
    access: &str,
    refresh: &str,
    expires_at: OffsetDateTime,
) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let doc = json!({
        "access_token": access,
        "token_type": "Bearer",
        "refresh_token": refresh,
        "expires_at": expires_at.format(&Rfc3339)?,
        "updated_at": now.format(&Rfc3339)?,
    });
    crate::fsutil::write_atomically(
        path,
        serde_json::to_string_pretty(&doc)?.as_bytes(),
        0o600,
        crate::fsutil::Existing::Replace,
    )?;
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tokenproxy-demo-")
        .tempdir()
        .context("creating a temporary folder")?;
    let provider = DemoProvider::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let provider_addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(provider.clone().serve(listener, None));
    // The same provider over HTTPS as `localhost`, with a certificate from a throw-away CA: made
    // by the code that makes tokenproxy's own CA, in its own folder.
    crate::tls::install_crypto_provider();
    let provider_ca = CertificateAuthority::load_or_create(&dir.path().join("provider-ca"))?;
    let provider_ca_pem = provider_ca.cert_path().to_path_buf();
    let provider_tls = LeafCache::new(provider_ca).server_config("localhost").await?;
    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tls_port = tls_listener.local_addr()?.port();
    tokio::spawn(provider.clone().serve(tls_listener, Some(provider_tls)));

    // A token file as an app's login flow would have left it.
    let (access, refresh) = (provider.mint("access"), provider.mint("refresh"));
    {
        let mut state = provider.state();
        state.valid_access.insert(access.clone());
        state.valid_refresh.insert(refresh.clone());
    }
    let token_file = dir.path().join("demo.json");
    let now = OffsetDateTime::now_utc();
    write_token_file(&token_file, &access, &refresh, now + time::Duration::hours(1))?;

    let config_path = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[proxy]
listen = "{proxy}"
[admin]
listen = "{admin}"
[tls]
ca_dir = "ca"
extra_roots = ["provider-ca/ca.pem"]   # the demo provider's throw-away CA
[providers.demo]
hosts = ["{provider_addr}", "localhost:{port}", "localhost:{tls_port}"]
token_file = "demo.json"
allow_plaintext = true   # the demo provider is on loopback
[providers.demo.oauth]
token_url = "http://{provider_addr}/oauth/token"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
refresh_before = "1m"
authorize_url = "http://{provider_addr}/oauth/authorize"   # the demo provider's consent page
"#,
            proxy = free_or_any("127.0.0.1:8080"),
            admin = free_or_any("127.0.0.1:9090"),
            port = provider_addr.port(),
        ),
    )?;
    let config = Config::load(&config_path)?;
    let running = app::start(config).await?;
    let api_url = format!("http://{provider_addr}/v1/me");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", running.proxy_addr))?)
        .timeout(Duration::from_secs(20))
        .build()?;
    let demo = running.providers.get("demo").context("the demo provider")?.clone();

    println!("tokenproxy demo: a provider API and its token endpoint on http://{provider_addr},");
    println!(
        "tokenproxy on http://{} (admin http://{}), token file {}",
        running.proxy_addr,
        running.admin_addr,
        token_file.display()
    );
    println!("Tokens are shown by fingerprint (first 8 hex digits of their SHA-256), never in full.\n");

    // 1. A fresh token, injected.
    let r = client.get(&api_url).send().await?;
    println!("1. A fresh token from the token file is injected");
    println!("   GET {api_url} through the proxy -> {}", r.status());
    println!(
        "   the provider saw token {} (the file's token is {})\n",
        last_fingerprint(&provider),
        fingerprint(&access)
    );

    // 2. An expired token: refreshed before use.
    let expired = provider.mint("access");
    write_token_file(&token_file, &expired, &refresh, now - time::Duration::minutes(5))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while demo
        .single()
        .expect("the demo provider has one account")
        .current()
        .is_some_and(|t| t.fingerprint == fingerprint(&access))
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client.get(&api_url).send().await?;
    // Each value is read on its own: two guards alive in one statement would deadlock.
    let token_calls = provider.state().token_calls;
    let seen = last_fingerprint(&provider);
    println!("2. Someone writes an expired token into the file ({})", fingerprint(&expired));
    println!(
        "   tokenproxy sees the change, refreshes before use, and writes the new token back to the file"
    );
    println!(
        "   GET -> {}; token endpoint calls: {token_calls}; the provider saw token {seen}\n",
        r.status()
    );

    // 3. The provider revokes the token: 401, refresh, retry, transparently.
    let revoked = demo
        .single()
        .expect("the demo provider has one account")
        .current()
        .map(|t| t.fingerprint.clone())
        .unwrap_or_default();
    provider.state().valid_access.clear();
    let r = client.get(&api_url).send().await?;
    let calls = provider.state().api_calls.clone();
    println!("3. The provider revokes token {revoked} without telling anyone");
    if let [.., (s1, f1), (s2, f2)] = calls.as_slice() {
        println!(
            "   the provider answered {s1} to token {f1}; tokenproxy refreshed once and retried: {s2} with {f2}"
        );
    }
    println!("   the application saw only: {}\n", r.status());

    // 4. HTTPS: the application calls https:// through the proxy and trusts tokenproxy's CA.
    let ca_pem = std::fs::canonicalize(dir.path().join("ca").join("ca.pem"))?;
    let https_url = format!("https://localhost:{tls_port}/v1/me");
    let https_client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://{}", running.proxy_addr))?)
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&ca_pem)?)?])
        .timeout(Duration::from_secs(20))
        .build()?;
    let r = https_client.get(&https_url).send().await?;
    println!("4. An HTTPS call: CONNECT, then TLS with a certificate tokenproxy made for localhost");
    println!("   GET {https_url} through the proxy -> {}", r.status());
    println!(
        "   the provider saw token {}; the application trusted only {} (the provider's own CA is {})\n",
        last_fingerprint(&provider),
        ca_pem.display(),
        provider_ca_pem.display()
    );

    // 5. A person connects the provider through /connect: here the demo plays the browser.
    let connect_url = format!("http://{}/connect/demo", running.admin_addr);
    let (status, result) = click_through_consent(&connect_url).await?;
    println!("5. A person connects the provider in a browser, starting at {connect_url}");
    println!("   /connect sent the browser to the provider's consent page, the demo clicked Allow,");
    println!(
        "   and the callback answered {status} ({result}): the token in use is now {}, written to the file\n",
        demo.single().and_then(|c| c.current()).map(|t| t.fingerprint.clone()).unwrap_or_default()
    );

    let view =
        demo.view(demo.single().expect("the demo provider has one account"), OffsetDateTime::now_utc());
    let token_calls = provider.state().token_calls;
    println!(
        "Now: state {}, {}, {}, token endpoint called {} ({:.1}s so far).",
        view.state.as_str(),
        plural(view.refresh_count, "refresh", "refreshes"),
        plural(view.retry_count, "retry", "retries"),
        plural(u64::from(token_calls), "time", "times"),
        started.elapsed().as_secs_f64()
    );
    println!("\nWhere to look:");
    println!("  curl http://{}/tokens", running.admin_addr);
    println!("  curl -s http://{}/metrics | grep tokenproxy_", running.admin_addr);
    println!("Try it yourself:");
    println!("  curl -x http://{} {api_url}", running.proxy_addr);
    println!("  curl --cacert {} -x http://{} {https_url}", ca_pem.display(), running.proxy_addr);
    println!(
        "  open http://{}/connect in a browser and connect again (the consent page has Allow and Deny)",
        running.admin_addr
    );
    println!("Ctrl-C to stop.");
    running.serve_until_signal().await?;
    drop(dir);
    Ok(())
}

/// What a person's browser does with the /connect link: follows it to the consent page, clicks
/// Allow, and goes back to the callback with its cookie. Returns the callback's status and result.
async fn click_through_consent(connect_url: &str) -> anyhow::Result<(StatusCode, String)> {
    let browser = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()?;
    let location = |r: &reqwest::Response| -> anyhow::Result<String> {
        let value = r.headers().get("location").context("a redirect")?;
        Ok(value.to_str()?.to_string())
    };
    let start = browser.get(connect_url).send().await?;
    let cookie = start.headers().get("set-cookie").context("the flow's cookie")?.to_str()?;
    let cookie = cookie.split(';').next().unwrap_or_default().to_string();
    let allow = location(&start)?.replacen("/oauth/authorize?", "/oauth/authorize/decide?allow=1&", 1);
    let callback = location(&browser.get(&allow).send().await?)?;
    let done = browser.get(&callback).header("cookie", cookie).send().await?;
    let result = done
        .headers()
        .get(crate::onboarding::http::RESULT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    Ok((done.status(), result))
}

/// "1 retry", "2 retries".
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn last_fingerprint(provider: &DemoProvider) -> String {
    provider.state().api_calls.last().map(|(_, f)| f.clone()).unwrap_or_default()
}
