//! `[providers.NAME.sigv4]` (SPEC §14), validated: where the region, the service and the
//! credentials come from.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::config::{http_url, parse_duration, resolve};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSigV4 {
    #[serde(default)]
    region: String,
    #[serde(default)]
    service: String,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_file: Option<PathBuf>,
    session_token_file: Option<PathBuf>,
    role_arn: Option<String>,
    web_identity_token_file: Option<PathBuf>,
    sts_url: Option<String>,
    #[serde(default = "default_session_name")]
    role_session_name: String,
    #[serde(default = "default_session_duration")]
    session_duration: String,
}

fn default_session_name() -> String {
    "tokenproxy".into()
}
fn default_session_duration() -> String {
    "1h".into()
}

/// How a provider's requests are signed.
#[derive(Debug, Clone)]
pub struct SigV4Config {
    pub region: String,
    pub service: String,
    pub source: CredentialSource,
}

/// Where the signing credentials come from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// A key pair kept in files (a mounted secret), read again when they change.
    Files { access_key_id: PathBuf, secret_access_key: PathBuf, session_token: Option<PathBuf> },
    /// Temporary credentials from STS `AssumeRoleWithWebIdentity`, presenting the token in
    /// `token_file` (a projected service-account token, re-read for every call).
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
        sts_url: Uri,
        session_name: String,
        duration: Duration,
    },
}

/// STS accepts sessions from 15 minutes to 12 hours.
const SESSION_LIMITS: (Duration, Duration) = (Duration::from_secs(900), Duration::from_secs(12 * 3600));

pub(crate) fn validate(
    what: &str,
    raw: RawSigV4,
    base: &std::path::Path,
    p: &mut Vec<String>,
) -> Option<SigV4Config> {
    let before = p.len();
    let what = format!("{what}.sigv4");
    let valid_name = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_name(&raw.region) {
        p.push(format!("{what}.region: needed, like \"eu-west-1\" (got {:?})", raw.region));
    }
    if !valid_name(&raw.service) {
        p.push(format!(
            "{what}.service: needed, the signing name like \"s3\" or \"sqs\" (got {:?})",
            raw.service
        ));
    }
    let files = raw.access_key_id_file.is_some()
        || raw.secret_access_key_file.is_some()
        || raw.session_token_file.is_some();
    let web = raw.role_arn.is_some() || raw.web_identity_token_file.is_some() || raw.sts_url.is_some();
    let source = match (files, web) {
        (true, true) => {
            p.push(format!(
                "{what}: give either access_key_id_file and secret_access_key_file, or role_arn and \
                 web_identity_token_file, not both"
            ));
            None
        }
        (false, false) => {
            p.push(format!(
                "{what}: no credentials: set access_key_id_file and secret_access_key_file, or role_arn \
                 and web_identity_token_file"
            ));
            None
        }
        (true, false) => match (raw.access_key_id_file, raw.secret_access_key_file) {
            (Some(id), Some(secret)) => Some(CredentialSource::Files {
                access_key_id: resolve(base, &id),
                secret_access_key: resolve(base, &secret),
                session_token: raw.session_token_file.map(|f| resolve(base, &f)),
            }),
            _ => {
                p.push(format!("{what}: access_key_id_file and secret_access_key_file go together"));
                None
            }
        },
        (false, true) => {
            let sts = raw.sts_url.unwrap_or_else(|| format!("https://sts.{}.amazonaws.com/", raw.region));
            let sts_url = http_url(&sts);
            if sts_url.is_none() {
                p.push(format!("{what}.sts_url: {sts:?} is not an http(s) URL"));
            }
            let duration = parse_duration(&format!("{what}.session_duration"), &raw.session_duration, p);
            if !duration.is_zero() && !(SESSION_LIMITS.0..=SESSION_LIMITS.1).contains(&duration) {
                p.push(format!("{what}.session_duration: STS allows 15m to 12h"));
            }
            let role_ok = raw.role_arn.as_deref().is_some_and(|r| r.starts_with("arn:"));
            if !role_ok {
                p.push(format!("{what}.role_arn: needed with web_identity_token_file, like \"arn:aws:iam::123456789012:role/app\""));
            }
            if raw.web_identity_token_file.is_none() {
                p.push(format!("{what}.web_identity_token_file: needed with role_arn"));
            }
            match (raw.role_arn, raw.web_identity_token_file, sts_url) {
                (Some(role_arn), Some(file), Some(sts_url)) if role_ok => {
                    Some(CredentialSource::WebIdentity {
                        role_arn,
                        token_file: resolve(base, &file),
                        sts_url,
                        session_name: raw.role_session_name,
                        duration,
                    })
                }
                _ => None,
            }
        }
    };
    (p.len() == before).then_some(())?;
    Some(SigV4Config { region: raw.region, service: raw.service, source: source? })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    /// The problems of a config whose one provider is `provider` (its keys after `hosts`).
    fn problems(dir: &std::path::Path, provider: &str) -> Vec<String> {
        let path = dir.join("tokenproxy.toml");
        std::fs::write(
            &path,
            format!("[providers.aws]\nhosts = [\"sqs.eu-west-1.amazonaws.com\"]\n{provider}"),
        )
        .unwrap();
        match Config::load(&path) {
            Ok(_) => vec![],
            Err(e) => e.problems,
        }
    }

    #[test]
    fn a_signing_provider_names_what_it_lacks_and_what_it_cannot_have() {
        let dir = tempfile::tempdir().unwrap();
        let has = |provider: &str, wanted: &str| {
            let found = problems(dir.path(), provider);
            assert!(found.iter().any(|p| p.contains(wanted)), "{wanted:?} not in {found:?}");
        };
        let files = "[providers.aws.sigv4]\nregion = \"eu-west-1\"\nservice = \"sqs\"\n\
                     access_key_id_file = \"id\"\nsecret_access_key_file = \"secret\"\n";
        let web = "[providers.aws.sigv4]\nregion = \"eu-west-1\"\nservice = \"sqs\"\n\
                   role_arn = \"arn:aws:iam::1:role/r\"\nweb_identity_token_file = \"t.jwt\"\n";
        assert_eq!(problems(dir.path(), files), Vec::<String>::new());
        assert_eq!(problems(dir.path(), web), Vec::<String>::new());
        let loaded = {
            std::fs::write(
                dir.path().join("tokenproxy.toml"),
                format!("[providers.aws]\nhosts = [\"h\"]\n{web}"),
            )
            .unwrap();
            Config::load(&dir.path().join("tokenproxy.toml")).unwrap()
        };
        match &loaded.providers[0].sigv4.as_ref().unwrap().source {
            super::CredentialSource::WebIdentity { sts_url, duration, session_name, .. } => {
                assert_eq!(
                    sts_url.to_string(),
                    "https://sts.eu-west-1.amazonaws.com/",
                    "the region's own STS"
                );
                assert_eq!((duration.as_secs(), session_name.as_str()), (3600, "tokenproxy"));
            }
            other => panic!("{other:?}"),
        }
        has("", "token_file: needed");
        has(&format!("token_file = \"t.json\"\n{files}"), "keeps no token file");
        has(&format!("{files}[providers.aws.oauth]\ntoken_url = \"https://t/\"\n"), "has no [oauth]");
        has("[providers.aws.sigv4]\nregion = \"eu-west-1\"\nservice = \"sqs\"\n", "no credentials");
        has(&format!("{files}role_arn = \"arn:aws:iam::1:role/r\"\n"), "not both");
        has(&files.replace("secret_access_key_file = \"secret\"\n", ""), "go together");
        has(&files.replace("region = \"eu-west-1\"\n", ""), "region: needed");
        has(&files.replace("service = \"sqs\"", "service = \"s3/x\""), "service: needed");
        has(&web.replace("role_arn = \"arn:aws:iam::1:role/r\"\n", ""), "role_arn: needed");
        has(&format!("{web}session_duration = \"5m\"\n"), "15m to 12h");
        has(&format!("{web}sts_url = \"ftp://x\"\n"), "sts_url");
        has(&format!("{files}bogus = 1\n"), "bogus");
    }
}
