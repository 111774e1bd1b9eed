//! A caller's `[[callers.NAME.allow]]` rules: which provider, accounts, methods and paths it may
//! use. A request is allowed by the first rule that matches all it sets; when none does, the
//! answer says how far the closest one got.

use http::Method;

use super::Caller;
use super::config::RuleConfig;

/// A rule with `{caller}` filled in.
pub(super) struct Rule {
    provider: Box<str>,
    accounts: Option<Vec<Box<str>>>,
    default_account: Option<Box<str>>,
    methods: Option<Vec<Method>>,
    paths: Option<Vec<Box<str>>>,
}

impl Rule {
    pub(super) fn new(config: &RuleConfig, caller: &str) -> Rule {
        let fill = |s: &String| s.replace("{caller}", caller).into_boxed_str();
        Rule {
            provider: config.provider.as_str().into(),
            accounts: config.accounts.as_ref().map(|a| a.iter().map(fill).collect()),
            default_account: config.default_account.as_ref().map(fill),
            methods: config.methods.clone(),
            paths: config.paths.as_ref().map(|p| p.iter().map(|p| p.as_str().into()).collect()),
        }
    }
}

/// What a request asks of the rules.
pub struct Ask<'a> {
    pub provider: &'a str,
    /// Whether the provider keeps one token per account (accounts matter only then).
    pub multi_account: bool,
    /// The provider's own `default_account`, after the rule's.
    pub provider_default: Option<&'a str>,
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The account the request named (`Tokenproxy-Account`).
    pub named: Option<&'a str>,
}

/// The rule that allowed a request (its index) and the account it uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Allowed {
    pub rule: usize,
    pub account: Option<Box<str>>,
}

/// What the closest rule did not allow, in the order a rule is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Denial {
    Provider,
    Method,
    Path,
    Account,
}

impl Denial {
    pub fn code(self) -> &'static str {
        match self {
            Denial::Provider => "no_rule_for_provider",
            Denial::Method => "method_not_allowed",
            Denial::Path => "path_not_allowed",
            Denial::Account => "account_not_allowed",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Denial::Provider => "no rule of this caller names the provider",
            Denial::Method => "no rule for the provider allows the method",
            Denial::Path => "no rule for the provider allows the method on the path",
            Denial::Account => "no rule for the provider allows the method and path with the account",
        }
    }
}

/// Why no rule allowed a request: what the closest one did not allow, and the account it would
/// have used.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub denial: Denial,
    pub account: Option<Box<str>>,
}

impl Caller {
    /// The first rule that allows `ask`, or what the closest one did not allow.
    pub fn allow(&self, ask: &Ask<'_>) -> Result<Allowed, Refusal> {
        let mut closest = Refusal {
            denial: Denial::Provider,
            account: ask.multi_account.then(|| ask.named.or(ask.provider_default)).flatten().map(Into::into),
        };
        // Whether the path can match a glob at all, found once for every rule that has paths.
        let plain = std::cell::OnceCell::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if *rule.provider != *ask.provider {
                continue;
            }
            let account = match ask.multi_account {
                true => ask.named.or(rule.default_account.as_deref()).or(ask.provider_default),
                false => None,
            };
            let denial = if rule.methods.as_ref().is_some_and(|m| !m.iter().any(|m| m.as_str() == ask.method))
            {
                Denial::Method
            } else if rule.paths.as_ref().is_some_and(|p| {
                !(*plain.get_or_init(|| plain_path(ask.path)) && p.iter().any(|p| glob(p, ask.path)))
            }) {
                Denial::Path
            } else {
                let fits = match (&rule.accounts, account) {
                    _ if !ask.multi_account => true,
                    (None, _) => true,
                    (Some(patterns), Some(account)) => patterns.iter().any(|p| glob(p, account)),
                    (Some(_), None) => false,
                };
                if fits {
                    return Ok(Allowed { rule: i, account: account.map(Into::into) });
                }
                Denial::Account
            };
            if denial > closest.denial {
                closest = Refusal { denial, account: account.map(Into::into) };
            }
        }
        Err(closest)
    }
}

/// A path a glob may judge: no dot segments and no encoded dot, slash or backslash, which an
/// upstream could read as a path other than the one matched.
fn plain_path(path: &str) -> bool {
    let lower = |s: &str| s.to_ascii_lowercase();
    !path.contains('\\')
        && !["%2e", "%2f", "%5c"].iter().any(|enc| lower(path).contains(enc))
        && !path.split('/').any(|segment| segment == "." || segment == "..")
}

/// `*` matches any run of characters (`/` too); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else { return rest.is_empty() };
    for part in parts {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_anything_and_the_rest_exactly() {
        assert!(glob("/v1/charges*", "/v1/charges"));
        assert!(glob("/v1/charges*", "/v1/charges/ch_1/refunds"));
        assert!(!glob("/v1/charges*", "/v1/refunds"));
        assert!(glob("shop-*", "shop-eu"));
        assert!(!glob("shop-*", "shop"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("/a/*/c", "/a/b/c"));
        assert!(!glob("ab*ba", "aba"), "the prefix and suffix may not overlap");
    }

    #[test]
    fn paths_that_an_upstream_could_read_otherwise_match_no_glob() {
        for bad in ["/v1/charges/../admin", "/v1/./x", "/v1/charges%2F..%2Fadmin", "/v1/%2e%2e/x", "/v1\\x"] {
            assert!(!plain_path(bad), "{bad}");
        }
        assert!(plain_path("/v1/charges/ch_1.json"));
        assert!(plain_path("/"));
    }

    fn caller(rules: &[RuleConfig]) -> Caller {
        let (table, problems) = super::super::Table::build(&[super::super::config::CallerConfig {
            name: "billing".into(),
            secret_file: None,
            uids: vec![4242],
            jwt: None,
            egress: true,
            rules: rules.to_vec(),
        }]);
        assert!(problems.is_empty());
        let caller = table.by_name.get("billing").unwrap().clone();
        drop(table);
        std::sync::Arc::try_unwrap(caller).ok().unwrap()
    }

    fn rule(provider: &str) -> RuleConfig {
        RuleConfig {
            provider: provider.into(),
            accounts: None,
            default_account: None,
            methods: None,
            paths: None,
        }
    }

    fn ask<'a>(method: &'a str, path: &'a str, named: Option<&'a str>) -> Ask<'a> {
        Ask { provider: "stripe", multi_account: true, provider_default: None, method, path, named }
    }

    #[test]
    fn the_first_rule_that_matches_allows_and_the_closest_says_why_not() {
        let c = caller(&[
            RuleConfig {
                methods: Some(vec![Method::GET]),
                paths: Some(vec!["/v1/charges*".into()]),
                ..rule("stripe")
            },
            RuleConfig {
                accounts: Some(vec!["{caller}".into(), "shop-*".into()]),
                default_account: Some("{caller}".into()),
                methods: Some(vec![Method::POST]),
                ..rule("stripe")
            },
        ]);
        assert_eq!(
            c.allow(&ask("GET", "/v1/charges/1", Some("x"))),
            Ok(Allowed { rule: 0, account: Some("x".into()) })
        );
        assert_eq!(
            c.allow(&ask("POST", "/v1/x", None)),
            Ok(Allowed { rule: 1, account: Some("billing".into()) })
        );
        assert_eq!(c.allow(&ask("POST", "/v1/x", Some("shop-eu"))).map(|a| a.rule), Ok(1));
        let refused =
            |denial, account: Option<&str>| Err(Refusal { denial, account: account.map(Into::into) });
        assert_eq!(c.allow(&ask("POST", "/v1/x", Some("alice"))), refused(Denial::Account, Some("alice")));
        assert_eq!(c.allow(&ask("DELETE", "/v1/x", None)), refused(Denial::Method, None));
        assert_eq!(c.allow(&ask("PUT", "/v1/x", None)), refused(Denial::Method, None));
        assert_eq!(c.allow(&ask("GET", "/v1/refunds", None)), refused(Denial::Path, None));
        assert_eq!(c.allow(&ask("GET", "/v1/charges/../refunds", None)), refused(Denial::Path, None));
        let other = Ask { provider: "github", ..ask("GET", "/", None) };
        assert_eq!(c.allow(&other), refused(Denial::Provider, None));
    }

    #[test]
    fn a_single_account_provider_ignores_accounts_and_methods_compare_exactly() {
        let c = caller(&[RuleConfig {
            accounts: Some(vec!["nobody".into()]),
            methods: Some(vec![Method::GET]),
            ..rule("stripe")
        }]);
        let single = Ask { multi_account: false, ..ask("GET", "/", Some("alice")) };
        assert_eq!(c.allow(&single), Ok(Allowed { rule: 0, account: None }));
        let lower = Ask { multi_account: false, ..ask("get", "/", None) };
        assert_eq!(c.allow(&lower), Err(Refusal { denial: Denial::Method, account: None }));
    }
}
