//! `[callers.NAME]`, its `[[callers.NAME.allow]]` rules and `[audit]` (SPEC §13): the TOML keys,
//! and the checks that make a caller's config one that can be enforced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use http::Method;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCaller {
    #[serde(default)]
    secret_file: Option<String>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    jwt: Option<RawJwt>,
    #[serde(default = "yes")]
    egress: bool,
    #[serde(default)]
    allow: Vec<RawRule>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    jwks_file: String,
    issuer: String,
    audience: String,
    #[serde(default)]
    subject: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    provider: String,
    #[serde(default)]
    accounts: Option<Vec<String>>,
    #[serde(default)]
    default_account: Option<String>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAudit {
    file: String,
}

/// A caller as configured: how it proves who it is, and what it may use.
#[derive(Debug, Clone, PartialEq)]
pub struct CallerConfig {
    pub name: String,
    /// Proxy credentials `NAME:SECRET`; the secret is this file's content, read at every reload.
    pub secret_file: Option<PathBuf>,
    /// Owners of the client's socket.
    pub uids: Vec<u32>,
    pub jwt: Option<JwtConfig>,
    /// Whether it may reach hosts that match no provider (under `[egress]`).
    pub egress: bool,
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// The `sub` claim it must carry; any when unset.
    pub subject: Option<String>,
}

/// One `[[callers.NAME.allow]]`: a request is allowed when every part it sets matches.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleConfig {
    pub provider: String,
    /// Account names and globs (`*`), `{caller}` standing for the caller's name; `None`: any.
    pub accounts: Option<Vec<String>>,
    pub default_account: Option<String>,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    /// Path globs (`*` matches any run of characters, `/` included); `None`: any path.
    pub paths: Option<Vec<String>>,
}

impl CallerConfig {
    /// The identities it has, for `check` and the log.
    pub fn identities(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(file) = &self.secret_file {
            out.push(format!("proxy credentials (secret in {})", file.display()));
        }
        if !self.uids.is_empty() {
            let uids: Vec<String> = self.uids.iter().map(u32::to_string).collect();
            out.push(format!("socket owner uid {}", uids.join(", ")));
        }
        if let Some(jwt) = &self.jwt {
            out.push(format!(
                "JWT from {} for {}{} (keys in {})",
                jwt.issuer,
                jwt.audience,
                jwt.subject.as_ref().map(|s| format!(", subject {s}")).unwrap_or_default(),
                jwt.jwks_file.display()
            ));
        }
        out
    }
}

impl std::fmt::Display for RuleConfig {
    /// One line, as `check` lists it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &Option<Vec<String>>| v.as_ref().map_or("any".to_string(), |v| v.join(", "));
        let methods = self.methods.as_ref().map(|m| m.iter().map(|m| m.to_string()).collect());
        write!(
            f,
            "provider {}, accounts {}, methods {}, paths {}",
            self.provider,
            list(&self.accounts),
            list(&methods),
            list(&self.paths)
        )?;
        if let Some(default) = &self.default_account {
            write!(f, ", default account {default}")?;
        }
        Ok(())
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

pub(crate) fn validate_audit(raw: &RawAudit, base: &Path) -> Option<AuditTarget> {
    match raw.file.trim() {
        "" => None,
        "-" => Some(AuditTarget::Stdout),
        file => Some(AuditTarget::File(crate::config::resolve(base, Path::new(file)))),
    }
}

/// The callers of a config, every problem pushed to `p`. `providers` are the configured
/// providers' names.
pub(crate) fn validate_callers(
    raw: BTreeMap<String, RawCaller>,
    providers: &[&str],
    base: &Path,
    p: &mut Vec<String>,
) -> Vec<CallerConfig> {
    let mut callers = Vec::new();
    let mut uid_owner: BTreeMap<u32, String> = BTreeMap::new();
    for (name, rc) in raw {
        let what = format!("callers.{name}");
        // The name is the proxy credentials' user name and `{caller}` in account names.
        if crate::accounts::check(&name).is_err() {
            p.push(format!(
                "{what}: a caller name is 1-128 characters from A-Z a-z 0-9 . _ @ + - (it is a proxy user name and may stand for an account)"
            ));
            continue;
        }
        if rc.secret_file.is_none() && rc.uids.is_empty() && rc.jwt.is_none() {
            p.push(format!(
                "{what} has no identity: give it a secret_file, uids or jwt, or no request can be its"
            ));
        }
        for uid in &rc.uids {
            if let Some(other) = uid_owner.insert(*uid, name.clone()) {
                p.push(format!("{what}.uids: uid {uid} is also caller {other:?}'s: a socket has one owner"));
            }
        }
        let secret_file = rc.secret_file.map(|f| crate::config::resolve(base, Path::new(&f)));
        let jwt = rc.jwt.and_then(|j| {
            if j.issuer.trim().is_empty() || j.audience.trim().is_empty() {
                p.push(format!("{what}.jwt: issuer and audience must not be empty"));
                return None;
            }
            Some(JwtConfig {
                jwks_file: crate::config::resolve(base, Path::new(&j.jwks_file)),
                issuer: j.issuer,
                audience: j.audience,
                subject: j.subject.filter(|s| !s.is_empty()),
            })
        });
        let mut rules = Vec::new();
        for (i, rr) in rc.allow.into_iter().enumerate() {
            if let Some(rule) = validate_rule(&format!("{what}.allow[{i}]"), &name, rr, providers, p) {
                rules.push(rule);
            }
        }
        callers.push(CallerConfig { name, secret_file, uids: rc.uids, jwt, egress: rc.egress, rules });
    }
    callers
}

fn validate_rule(
    what: &str,
    caller: &str,
    rr: RawRule,
    providers: &[&str],
    p: &mut Vec<String>,
) -> Option<RuleConfig> {
    let before = p.len();
    if !providers.contains(&rr.provider.as_str()) {
        p.push(format!("{what}.provider: no provider named {:?}", rr.provider));
    }
    let as_account = |pattern: &str| pattern.replace("{caller}", caller);
    for pattern in rr.accounts.iter().flatten() {
        let probe = as_account(pattern).replace('*', "x");
        if crate::accounts::check(&probe).is_err() {
            p.push(format!(
                "{what}.accounts: {pattern:?} is not an account name or glob (A-Z a-z 0-9 . _ @ + -, * and {{caller}})"
            ));
        }
    }
    if let Some(default) = &rr.default_account
        && crate::accounts::check(&as_account(default)).is_err()
    {
        p.push(format!("{what}.default_account: {default:?} is not an account name"));
    }
    let methods = rr.methods.map(|methods| {
        methods
            .iter()
            .filter_map(|m| match Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
                Ok(method) => Some(method),
                Err(_) => {
                    p.push(format!("{what}.methods: {m:?} is not an HTTP method"));
                    None
                }
            })
            .collect()
    });
    for path in rr.paths.iter().flatten() {
        if !path.starts_with('/') && !path.starts_with('*') {
            p.push(format!("{what}.paths: {path:?} must start with / (or *)"));
        }
        if path.contains('?') {
            p.push(format!("{what}.paths: {path:?} holds a '?': paths are matched without the query"));
        }
    }
    (p.len() == before).then_some(RuleConfig {
        provider: rr.provider,
        accounts: rr.accounts,
        default_account: rr.default_account,
        methods,
        paths: rr.paths,
    })
}
