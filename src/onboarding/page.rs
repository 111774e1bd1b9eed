//! The `/connect` page and the callback's result page (SPEC §9), rendered by askama from
//! `templates/`: compiled templates that escape every value by default, so no account name or
//! error text reaches the page as markup. Self-contained: inline CSS and script, nothing fetched.

use std::sync::Arc;

use askama::Template;
use time::OffsetDateTime;

use super::{Onboarding, Outcome};
use crate::cli::human_seconds;
use crate::tokens::{Provider, TokenView};

/// At most this many accounts of a provider are listed on the page.
const PAGE_LISTS_ACCOUNTS: usize = 200;

#[derive(Template)]
#[template(path = "connect.html")]
pub struct ConnectPage {
    pub providers: Vec<ProviderCard>,
}

pub struct ProviderCard {
    pub name: String,
    pub hosts: String,
    pub multi: bool,
    pub connectable: bool,
    pub not_connectable: Option<String>,
    pub rows: Vec<AccountRow>,
    pub more: usize,
}

pub struct AccountRow {
    pub account: Option<String>,
    pub state: &'static str,
    pub connected: bool,
    pub expires_unix: Option<i64>,
    pub expires_text: String,
    pub last_refresh_at: Option<String>,
    pub last_refresh_result: String,
    pub last_error: Option<String>,
    pub fingerprint: Option<String>,
    pub last_authorization: Option<Arc<Outcome>>,
}

#[derive(Template)]
#[template(path = "result.html")]
pub struct ResultPage {
    pub ok: bool,
    pub result: &'static str,
    pub title: String,
    pub sentence: String,
    pub who: Option<String>,
    pub detail: Option<String>,
    pub action: Option<String>,
}

/// What a cross-site link to a flow's start shows instead of starting it (SPEC §6).
#[derive(Template)]
#[template(path = "confirm.html")]
pub struct ConfirmPage {
    pub provider: String,
    pub account: Option<String>,
    pub flow: Option<String>,
}

impl ConfirmPage {
    pub fn new(provider: &str, account: Option<&str>, flow: Option<&str>) -> ConfirmPage {
        ConfirmPage {
            provider: provider.to_string(),
            account: account.map(str::to_string),
            flow: flow.filter(|f| super::is_flow_id(f)).map(str::to_string),
        }
    }
}

impl ResultPage {
    pub fn of(outcome: &Outcome) -> ResultPage {
        let who = (outcome.provider != "none").then(|| match &outcome.account {
            Some(account) => format!("Provider {}, account {account}.", outcome.provider),
            None => format!("Provider {}.", outcome.provider),
        });
        ResultPage {
            ok: outcome.is_ok(),
            result: outcome.result,
            title: if outcome.is_ok() { "Connected".into() } else { "Not connected".into() },
            sentence: outcome.sentence.clone(),
            who,
            detail: outcome
                .error
                .clone()
                .or_else(|| outcome.fingerprint.as_ref().map(|f| format!("token fingerprint {f}"))),
            action: outcome.action.clone(),
        }
    }

    /// A request that could not start a flow.
    pub fn refused(sentence: String) -> ResultPage {
        ResultPage {
            ok: false,
            result: "refused",
            title: "Cannot connect".into(),
            sentence,
            who: None,
            detail: None,
            action: Some("Check the provider's [oauth] settings in the config, or the account name.".into()),
        }
    }
}

impl Onboarding {
    /// The `/connect` page's content: every provider, and every account it has loaded or stored.
    pub async fn page(&self) -> ConnectPage {
        let now = OffsetDateTime::now_utc();
        let mut providers = Vec::new();
        for provider in self.providers().iter() {
            providers.push(self.card(provider, now).await);
        }
        ConnectPage { providers }
    }

    async fn card(&self, provider: &Provider, now: OffsetDateTime) -> ProviderCard {
        let browser = self.target(provider.name(), Some("x"), true);
        let (connectable, not_connectable) = match browser {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let mut views: Vec<TokenView> =
            provider.credentials().iter().map(|c| provider.view(c, now)).collect();
        let mut more = 0;
        if provider.is_multi_account() {
            // Accounts stored but not in use since the start are listed too.
            if let Ok(stored) = provider.account_names_stored().await {
                for name in stored {
                    if views.iter().any(|v| v.account.as_deref() == Some(name.as_str())) {
                        continue;
                    }
                    if views.len() >= PAGE_LISTS_ACCOUNTS {
                        more += 1;
                        continue;
                    }
                    let credential = provider.read_account(&name).await;
                    views.push(provider.view(&credential, now));
                }
            }
            views.sort_by(|a, b| a.account.cmp(&b.account));
        }
        let rows = views
            .into_iter()
            .map(|v| {
                let expires_unix = v.expires_in_s.map(|s| now.unix_timestamp() + s);
                AccountRow {
                    last_authorization: self.last_outcome(provider.name(), v.account.as_deref()),
                    account: v.account,
                    state: v.state.as_str(),
                    connected: v.fingerprint.is_some(),
                    expires_unix,
                    expires_text: v
                        .expires_in_s
                        .map(|s| format!("expires {}", human_seconds(s)))
                        .unwrap_or_default(),
                    last_refresh_at: v.last_refresh_at,
                    last_refresh_result: v.last_refresh_result.unwrap_or_default(),
                    last_error: v.last_error,
                    fingerprint: v.fingerprint,
                }
            })
            .collect();
        ProviderCard {
            name: provider.name().to_string(),
            hosts: provider.config.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "),
            multi: provider.is_multi_account(),
            connectable,
            not_connectable,
            rows,
            more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_and_errors_are_escaped() {
        let page = ResultPage {
            ok: false,
            result: "exchange_failed",
            title: "Not connected".into(),
            sentence: "<script>alert(1)</script>".into(),
            who: Some("account <b>x</b>".into()),
            detail: Some("a\"b".into()),
            action: None,
        };
        let html = page.render().unwrap();
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("alert(1)"), "the text is there, as text");
        assert!(!html.contains("<b>x</b>"));
    }
}
