//! Where a provider's tokens come from: the seam between the refresher, which decides when a
//! token is asked for and what happens to the answer, and the exchange with a token endpoint.
//! [`crate::oauth::OAuthClient`] is the implementation for the OAuth grants; the refresher's unit
//! tests use a scripted one.

use std::future::Future;
use std::pin::Pin;

use crate::config::OAuthConfig;
use crate::oauth::{IssuedToken, OAuthClient, RefreshError};

pub type Issuing<'a> = Pin<Box<dyn Future<Output = Result<IssuedToken, RefreshError>> + Send + 'a>>;

pub trait TokenEndpoint: Send + Sync {
    /// One token request with the provider's grant, for `account` (of a multi-account
    /// provider); `refresh_token` is the one held now (for the `refresh_token` grant). A failure
    /// is classed ([`crate::oauth::RefreshErrorKind`]): the class decides whether the refresher
    /// retries, backs off or stops.
    fn issue<'a>(
        &'a self,
        oauth: &'a OAuthConfig,
        account: Option<&'a str>,
        refresh_token: Option<&'a str>,
    ) -> Issuing<'a>;
}

impl TokenEndpoint for OAuthClient {
    fn issue<'a>(
        &'a self,
        oauth: &'a OAuthConfig,
        account: Option<&'a str>,
        refresh_token: Option<&'a str>,
    ) -> Issuing<'a> {
        Box::pin(self.request_token(oauth, account, refresh_token))
    }
}
