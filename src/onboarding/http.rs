//! The onboarding paths, served by the admin listener and by `tokenproxy authorize` when no
//! proxy is running: `GET /connect`, `GET /connect/{provider}?account=`,
//! `GET /connect/{provider}/outcome?account=` and `GET /oauth/callback`.

use askama::Template;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use super::page::ResultPage;
use super::{Onboarding, StartError, pending};
use crate::body::ProxyBody;

/// The cookie that binds a flow to the browser that started it.
pub const FLOW_COOKIE: &str = "tokenproxy_flow";

/// The header that names a callback's result, for scripts and tests (the page says it in words).
pub const RESULT_HEADER: &str = "x-tokenproxy-authorization";

impl Onboarding {
    /// Answers `req` when its path is one of onboarding's; `None` otherwise.
    pub async fn handle<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        let path = req.uri().path();
        let is_ours = path == "/connect" || path.starts_with("/connect/") || path == "/oauth/callback";
        if !is_ours {
            return None;
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Some(plain(StatusCode::METHOD_NOT_ALLOWED, "the onboarding pages answer GET only\n"));
        }
        let query = parse_query(req.uri().query());
        let cookie = flow_cookie(req);
        if path == "/connect" {
            return Some(html(StatusCode::OK, self.page().await.render()));
        }
        if path == "/oauth/callback" {
            let outcome = self.callback(&query, cookie.as_deref()).await;
            let status = match outcome.result {
                "ok" => StatusCode::OK,
                "access_denied" => StatusCode::FORBIDDEN,
                "state_unknown" => StatusCode::BAD_REQUEST,
                "state_expired" => StatusCode::GONE,
                "exchange_failed" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let mut response = html(status, ResultPage::of(&outcome).render());
            response.headers_mut().insert(RESULT_HEADER, HeaderValue::from_static(outcome.result));
            return Some(response);
        }
        let rest = path.strip_prefix("/connect/").unwrap_or_default();
        let decoded = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        // Account names may hold '+': only %2B-style escapes are decoded (as the admin API does).
        let account = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("account=").map(decoded)));
        if let Some(provider) = rest.strip_suffix("/outcome") {
            let provider = decoded(provider);
            return Some(match self.last_outcome(&provider, account.as_deref()) {
                Some(outcome) => crate::body::json(StatusCode::OK, &*outcome),
                None => crate::body::json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no_outcome", "reason": "no authorization of this provider and account has finished since the start"}),
                ),
            });
        }
        let provider = decoded(rest);
        Some(self.start_response(req, &provider, account.as_deref(), cookie))
    }

    /// `GET /connect/{provider}`: a `302` to the provider with the flow's cookie set.
    fn start_response<B>(
        &self,
        req: &Request<B>,
        provider: &str,
        account: Option<&str>,
        cookie: Option<String>,
    ) -> Response<ProxyBody> {
        // The callback must reach this browser's cookie: start on the redirect_uri's own host
        // (a person who opened http://localhost:9090 while the callback is 127.0.0.1:9090). Only
        // for a loopback callback: behind a reverse proxy the Host seen here is not the browser's.
        if let Some(oauth) = self.providers().get(provider).and_then(|p| p.oauth())
            && let Ok(redirect) = oauth.redirect_uri.parse::<http::Uri>()
            && redirect.path() == "/oauth/callback"
            && let (Some(want), Some(host)) = (redirect.authority(), req.headers().get(header::HOST))
            && is_loopback(want.host())
            && host.to_str().is_ok_and(|h| is_loopback(h.rsplit_once(':').map_or(h, |(name, _)| name)))
            && !host.as_bytes().eq_ignore_ascii_case(want.as_str().as_bytes())
        {
            let target = format!(
                "{}://{}{}",
                redirect.scheme_str().unwrap_or("http"),
                want,
                req.uri().path_and_query().map_or("/connect", |pq| pq.as_str())
            );
            return redirect_to(&target, None);
        }
        let (cookie, new_cookie) = match cookie {
            Some(cookie) => (cookie, None),
            None => {
                let fresh = pending::random_token();
                (fresh.clone(), Some(fresh))
            }
        };
        match self.start(provider, account, &cookie) {
            Ok(started) => {
                let set_cookie = new_cookie.map(|value| {
                    format!(
                        "{FLOW_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
                        self.flows.ttl.as_secs()
                    )
                });
                redirect_to(&started.authorize_url, set_cookie)
            }
            Err(e) => {
                let status = match e {
                    StartError::UnknownProvider(_) => StatusCode::NOT_FOUND,
                    StartError::NotConnectable(_) | StartError::Account(_) => StatusCode::BAD_REQUEST,
                    StartError::StateDir(_) => StatusCode::INTERNAL_SERVER_ERROR,
                };
                tracing::warn!(provider, error = %e, "authorization not started");
                html(status, ResultPage::refused(e.to_string()).render())
            }
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn flow_cookie<B>(req: &Request<B>) -> Option<String> {
    req.headers().get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == FLOW_COOKIE && !value.is_empty()).then(|| value.to_string())
        })
    })
}

/// A query string as form fields (`+` is a space), percent-decoded.
pub fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let decode =
        |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn redirect_to(location: &str, set_cookie: Option<String>) -> Response<ProxyBody> {
    let mut response = plain(StatusCode::FOUND, "");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if let Some(value) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    crate::body::response(status, text, "text/plain; charset=utf-8")
}

fn html(status: StatusCode, rendered: askama::Result<String>) -> Response<ProxyBody> {
    match rendered {
        Ok(page) => {
            let mut response = crate::body::response(status, page, "text/html; charset=utf-8");
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // Nothing on the page comes from elsewhere, and nothing else may frame it.
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
                ),
            );
            headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "page could not be rendered");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered\n")
        }
    }
}
