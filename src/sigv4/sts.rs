//! STS `AssumeRoleWithWebIdentity` (SPEC §14): a web identity token (a projected Kubernetes
//! service-account token, re-read for every call) exchanged for temporary credentials. The call
//! is not signed: the token is the proof. The answer is STS's XML, read with `roxmltree`.

use std::time::Duration;

use http::Uri;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{AwsCredentials, Session};

/// What the call needs, from the provider's config.
pub(super) struct AssumeRole<'a> {
    pub sts_url: &'a Uri,
    pub role_arn: &'a str,
    pub session_name: &'a str,
    pub duration: Duration,
    pub web_identity_token: &'a str,
}

/// Asks STS for a session. The error says what went wrong in words fit for a log and an error
/// body: STS's own code and message, never the token.
pub(super) async fn assume_role(http: &reqwest::Client, ask: AssumeRole<'_>) -> Result<Session, String> {
    let form = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", ask.role_arn),
        ("RoleSessionName", ask.session_name),
        ("DurationSeconds", &ask.duration.as_secs().to_string()),
        ("WebIdentityToken", ask.web_identity_token),
    ];
    let response = http
        .post(ask.sts_url.to_string())
        .form(&form)
        .send()
        .await
        .map_err(|e| format!("STS unreachable: {}", crate::errors::report(&e)))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| format!("reading STS's answer: {e}"))?;
    if !status.is_success() {
        return Err(match sts_error(&body) {
            Some((code, message)) => format!("STS answered {status}: {code}: {message}"),
            None => format!("STS answered {status}"),
        });
    }
    parse_credentials(&body)
}

/// The `<Credentials>` of a successful answer.
fn parse_credentials(body: &str) -> Result<Session, String> {
    let doc = roxmltree::Document::parse(body).map_err(|e| format!("STS's answer is not XML: {e}"))?;
    let field = |name: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name(name) && n.ancestors().any(|a| a.has_tag_name("Credentials")))
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("STS's answer has no Credentials/{name}"))
    };
    let expiration = field("Expiration")?;
    let expires_at = OffsetDateTime::parse(expiration, &Rfc3339)
        .map_err(|_| format!("STS's Expiration {expiration:?} is not a date"))?;
    Ok(Session::new(
        AwsCredentials {
            access_key_id: field("AccessKeyId")?.to_string(),
            secret_access_key: field("SecretAccessKey")?.to_string(),
            session_token: Some(field("SessionToken")?.to_string()),
        },
        Some(expires_at),
    ))
}

/// STS's `<Error><Code>` and `<Message>`.
fn sts_error(body: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(body).ok()?;
    let text = |name: &str| {
        doc.descendants().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).map(|t| t.trim().to_string())
    };
    Some((text("Code")?, text("Message").unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// STS's documented answer (AWS STS API reference, AssumeRoleWithWebIdentity, example).
    const ANSWER: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>amzn1.account.AF6RHO7KZU5XRVQJGXK6HB56KR2A</SubjectFromWebIdentityToken>
    <Audience>client.5498841531868486423.1548@apps.example.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:app1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <SourceIdentity>SourceIdentityValue</SourceIdentity>
    <Provider>www.amazon.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn the_documented_answer_gives_a_session_that_ends_at_its_expiration() {
        let session = parse_credentials(ANSWER).unwrap();
        assert_eq!(session.credentials.access_key_id, "ASgeIAIOSFODNN7EXAMPLE");
        assert_eq!(session.credentials.secret_access_key, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY");
        assert_eq!(
            session.credentials.session_token.as_deref(),
            Some("AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE")
        );
        assert_eq!(session.expires_at.unwrap().unix_timestamp(), 1_414_191_623);
    }

    #[test]
    fn an_answer_without_credentials_or_with_an_error_says_what_is_missing() {
        let missing = ANSWER.replace("<AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>", "");
        assert!(parse_credentials(&missing).err().unwrap().contains("AccessKeyId"));
        let error = r#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>
            <Message>Couldn't retrieve verification key</Message></Error></ErrorResponse>"#;
        assert_eq!(
            sts_error(error),
            Some(("InvalidIdentityToken".into(), "Couldn't retrieve verification key".into()))
        );
        assert!(parse_credentials("not xml").is_err());
    }
}
