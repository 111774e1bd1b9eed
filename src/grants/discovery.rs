//! `issuer = "https://…"`: the endpoints from the issuer's metadata (RFC 8414
//! `/.well-known/oauth-authorization-server`, then OpenID Connect Discovery
//! `/.well-known/openid-configuration`), fetched once at start. Endpoints set in the config win.

use http::Uri;
use serde::Deserialize;

/// The endpoints an issuer publishes.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Metadata {
    pub issuer: String,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
}

/// Where each kind of metadata of `issuer` is: RFC 8414 §3 puts the well-known part between the
/// host and the issuer's path; OpenID Connect Discovery §4 appends it.
pub fn metadata_urls(issuer: &Uri) -> [String; 2] {
    let scheme = issuer.scheme_str().unwrap_or("https");
    let authority = issuer.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = issuer.path().trim_end_matches('/');
    [
        format!("{scheme}://{authority}/.well-known/oauth-authorization-server{path}"),
        format!("{scheme}://{authority}{path}/.well-known/openid-configuration"),
    ]
}

/// The issuer's metadata, from the first document that answers and names this issuer (RFC 8414
/// §3.3: a document for another issuer is not used).
pub async fn discover(http: &reqwest::Client, issuer: &Uri) -> Result<Metadata, String> {
    let wanted = issuer.to_string();
    let wanted = wanted.trim_end_matches('/');
    let mut tried = Vec::new();
    for url in metadata_urls(issuer) {
        let answer = match http.get(&url).header("accept", "application/json").send().await {
            Ok(answer) => answer,
            Err(e) => {
                tried.push(format!("{url}: {}", crate::errors::report(&e)));
                continue;
            }
        };
        let status = answer.status();
        if !status.is_success() {
            tried.push(format!("{url}: HTTP {}", status.as_u16()));
            continue;
        }
        match answer.json::<Metadata>().await {
            Ok(metadata) if metadata.issuer.trim_end_matches('/') == wanted => return Ok(metadata),
            Ok(metadata) => tried.push(format!("{url}: names another issuer, {:?}", metadata.issuer)),
            Err(_) => tried.push(format!("{url}: not issuer metadata (JSON with \"issuer\")")),
        }
    }
    Err(tried.join("; "))
}

/// Fills the endpoints each provider with an `issuer` leaves unset, from the issuer's metadata.
/// A provider that still has no token URL, or whose issuer cannot be read (after three tries a
/// second apart), stops the start with the reason.
pub async fn fill_endpoints(
    providers: &mut [crate::config::ProviderConfig],
    client: &crate::oauth::OAuthClient,
) -> anyhow::Result<()> {
    for provider in providers {
        let Some(oauth) = provider.oauth.as_mut() else { continue };
        let Some(issuer) = oauth.grants.issuer.clone() else { continue };
        let mut attempt = 0;
        let metadata = loop {
            attempt += 1;
            match client.discover(&issuer).await {
                Ok(metadata) => break metadata,
                Err(e) if attempt >= 3 => anyhow::bail!(
                    "providers.{}.oauth.issuer {issuer}: no usable metadata ({e}); set token_url (and \
                     authorize_url) in the config instead",
                    provider.name
                ),
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        };
        let keep = |set: &mut Option<Uri>, found: Option<&str>| {
            if set.is_none() {
                *set = endpoint(found);
            }
        };
        keep(&mut oauth.token_url, metadata.token_endpoint.as_deref());
        keep(&mut oauth.authorize_url, metadata.authorization_endpoint.as_deref());
        keep(&mut oauth.device_authorization_url, metadata.device_authorization_endpoint.as_deref());
        if oauth.token_url.is_none() && oauth.grant != crate::config::Grant::GithubApp {
            anyhow::bail!(
                "providers.{}.oauth.issuer {issuer}: the metadata names no token_endpoint",
                provider.name
            );
        }
        tracing::info!(
            provider = %provider.name,
            %issuer,
            token_url = %oauth.token_url.as_ref().map(Uri::to_string).unwrap_or_default(),
            "endpoints discovered from the issuer"
        );
    }
    Ok(())
}

/// `value` as an endpoint: an absolute http(s) URL.
fn endpoint(value: Option<&str>) -> Option<Uri> {
    crate::config::http_url(value?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_8414_inserts_the_well_known_part_and_openid_appends_it() {
        let uri: Uri = "https://login.example.com/tenant-1/v2.0".parse().unwrap();
        assert_eq!(
            metadata_urls(&uri),
            [
                "https://login.example.com/.well-known/oauth-authorization-server/tenant-1/v2.0".to_string(),
                "https://login.example.com/tenant-1/v2.0/.well-known/openid-configuration".to_string(),
            ]
        );
        let bare: Uri = "https://accounts.example.com".parse().unwrap();
        assert_eq!(
            metadata_urls(&bare),
            [
                "https://accounts.example.com/.well-known/oauth-authorization-server".to_string(),
                "https://accounts.example.com/.well-known/openid-configuration".to_string(),
            ]
        );
    }
}
