//! The onboarding paths, served by the admin listener and by `tokenproxy authorize` when no
//! proxy is running: `GET /connect`, `GET /connect/{provider}?account=`,
//! `POST /connect/{provider}`, `GET /connect/{provider}/outcome?flow=` and `GET /oauth/callback`.

use askama::Template;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use super::page::{ConfirmPage, ResultPage};
use super::{Onboarding, StartError};
use crate::body::ProxyBody;
use crate::hosts::{is_loopback_host, split_host_port};
use crate::query::Query;

/// The cookie that binds a flow to the browser that started it.
pub const FLOW_COOKIE: &str = "tokenproxy_flow";

/// The header that names a callback's result, for scripts and tests (the page says it in words).
pub const RESULT_HEADER: &str = "x-tokenproxy-authorization";

/// The largest form a flow's start accepts (an account name and a flow id).
const MAX_FORM: usize = 8 * 1024;

/// Whether `path` is one of onboarding's.
pub fn is_onboarding_path(path: &str) -> bool {
    path == "/connect" || path.starts_with("/connect/") || path == "/oauth/callback"
}

/// Whether a request may start a flow or change state (SPEC §6): not a cross-site or same-site
/// request (`Sec-Fetch-Site`), and no `Origin` other than the admin API's own. A request with
/// neither header is a command-line client's, or a link opened directly.
pub fn same_origin_or_direct(headers: &http::HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"none" | b"same-origin")
    {
        return Err(format!(
            "a {} request cannot start an authorization or change state here",
            site.to_str().unwrap_or("foreign")
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin = origin.to_str().unwrap_or("null");
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    match origin_host {
        Some(authority) if !host.is_empty() && authority.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(format!("Origin {origin:?} is not this admin API ({host})")),
    }
}

impl Onboarding {
    /// Answers a request for one of onboarding's paths ([`is_onboarding_path`]).
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let query = Query::parse(parts.uri.query());
        let param = |name: &str| query.get(name).map(str::to_string);
        let form = match parts.method {
            Method::GET | Method::HEAD => None,
            Method::POST if path.starts_with("/connect/") => {
                if let Err(why) = same_origin_or_direct(&parts.headers) {
                    return html(StatusCode::FORBIDDEN, ResultPage::refused(why).render());
                }
                let limited = http_body_util::Limited::new(body, MAX_FORM);
                match http_body_util::BodyExt::collect(limited).await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        Some(Query::of_bytes(&bytes))
                    }
                    Err(_) => {
                        return plain(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "the form is larger than a flow's start needs\n",
                        );
                    }
                }
            }
            _ => {
                return plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "the onboarding pages answer GET, and POST /connect/{provider} from the /connect page\n",
                );
            }
        };
        if path == "/connect" {
            return html(StatusCode::OK, self.page().await.render());
        }
        if path == "/oauth/callback" {
            let outcome = self.callback(&query, &cookies(&parts.headers)).await;
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
            return response;
        }
        let rest = path.strip_prefix("/connect/").unwrap_or_default();
        let decoded = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        if let Some(provider) = rest.strip_suffix("/outcome") {
            let provider = decoded(provider);
            let outcome = match param("flow") {
                Some(flow) => self.outcome_of_flow(&flow),
                None => self.last_outcome(&provider, query.account().as_deref()),
            };
            return match outcome {
                Some(outcome) => crate::body::json(StatusCode::OK, &*outcome),
                None => crate::body::json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no_outcome", "reason": "no such authorization has finished since the start"}),
                ),
            };
        }
        let provider = decoded(rest);
        // A name typed into the form is taken as typed (a space in it is refused); a link's
        // account is read as the admin API reads it (a `+` left unencoded stays a `+`).
        let (account, flow) = match &form {
            Some(fields) => (
                fields.get("account").filter(|a| !a.is_empty()).map(str::to_string),
                fields.get("flow").map(str::to_string),
            ),
            None => (query.account(), param("flow")),
        };
        if self.providers().get(&provider).is_none() {
            let refused = ResultPage::refused(StartError::UnknownProvider(provider).to_string());
            return html(StatusCode::NOT_FOUND, refused.render());
        }
        if form.is_none() && same_origin_or_direct(&parts.headers).is_err() {
            // A navigation from another site (login CSRF): nothing is started and nothing
            // written; the person sees what would be connected and decides with a click.
            return html(
                StatusCode::OK,
                ConfirmPage::new(&provider, account.as_deref(), flow.as_deref()).render(),
            );
        }
        self.start_response(&parts, &provider, account.as_deref(), flow.as_deref()).await
    }

    /// Starts a flow: a `302` to the provider with the flow's cookie set.
    async fn start_response(
        &self,
        parts: &http::request::Parts,
        provider: &str,
        account: Option<&str>,
        flow: Option<&str>,
    ) -> Response<ProxyBody> {
        // The callback must reach this browser's cookie: start on the redirect_uri's own host
        // (a person who opened http://localhost:9090 while the callback is 127.0.0.1:9090). Only
        // for a loopback callback: behind a reverse proxy the Host seen here is not the browser's.
        if let Some(oauth) = self.providers().get(provider).and_then(|p| p.oauth())
            && let Ok(redirect) = oauth.redirect_uri.parse::<http::Uri>()
            && redirect.path() == "/oauth/callback"
            && let (Some(want), Some(host)) = (redirect.authority(), parts.headers.get(header::HOST))
            && is_loopback_host(want.host())
            && host
                .to_str()
                .ok()
                .and_then(|h| split_host_port(h).ok())
                .is_some_and(|(name, _)| is_loopback_host(name))
            && !host.as_bytes().eq_ignore_ascii_case(want.as_str().as_bytes())
        {
            let mut target = format!(
                "{}://{}/connect/{}",
                redirect.scheme_str().unwrap_or("http"),
                want,
                super::encode(provider)
            );
            let mut separator = '?';
            for (key, value) in [("account", account), ("flow", flow)] {
                if let Some(value) = value {
                    target += &format!("{separator}{key}={}", super::encode(value));
                    separator = '&';
                }
            }
            return redirect_to(&target, None);
        }
        let browser = crate::secrets::random_token();
        match self.start(provider, account, flow, &browser).await {
            Ok(started) => {
                let set_cookie = format!(
                    "{}={browser}; Path={}; HttpOnly; SameSite=Lax; Max-Age={}",
                    started.cookie_name,
                    started.cookie_path,
                    self.flows.ttl.as_secs()
                );
                redirect_to(&started.authorize_url, Some(set_cookie))
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

/// Every cookie the request carries, as (name, value).
fn cookies(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (!value.is_empty()).then(|| (name.to_string(), value.to_string()))
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
