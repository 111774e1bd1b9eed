//! The token document (SPEC §4): JSON, YAML or raw, how its expiry is resolved, and what a
//! refresh makes of it. Bytes in, bytes out: where they are kept is the store's business.
//!
//! Parsing never puts file content into an error message: a malformed file may hold a token.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::FileFormat;
use crate::oauth::IssuedToken;
use crate::secrets::jwt_exp;

/// Where a token's expiry came from, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpirySource {
    ExpiresAt,
    ExpiresInPlusIssuedAt,
    ExpiresInPlusUpdatedAt,
    JwtExp,
    Unknown,
}

impl ExpirySource {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpirySource::ExpiresAt => "expires_at",
            ExpirySource::ExpiresInPlusIssuedAt => "expires_in+issued_at",
            ExpirySource::ExpiresInPlusUpdatedAt => "expires_in+updated_at",
            ExpirySource::JwtExp => "jwt_exp",
            ExpirySource::Unknown => "unknown",
        }
    }
}

/// A parsed token file.
#[derive(Clone)]
pub struct TokenDocument {
    pub access_token: String,
    pub expires_at: Option<OffsetDateTime>,
    pub expiry_source: ExpirySource,
    /// When the token was issued, if the file says (`issued_at`, else `updated_at`).
    pub issued_at: Option<OffsetDateTime>,
    /// Every field of a JSON or YAML file, in file order, so that a rewrite keeps them.
    pub fields: Map<String, Value>,
}

impl std::fmt::Debug for TokenDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenDocument")
            .field("fingerprint", &crate::secrets::fingerprint(&self.access_token))
            .field("expires_at", &self.expires_at)
            .field("expiry_source", &self.expiry_source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("not valid JSON ({0})")]
    Json(String),
    #[error("not valid YAML ({0})")]
    Yaml(String),
    #[error("the file holds no object with fields")]
    NotAnObject,
    #[error("no \"access_token\" string in the file")]
    NoAccessToken,
    #[error("the file is empty")]
    Empty,
    #[error("field {field:?} is neither RFC 3339 nor Unix seconds")]
    BadTime { field: &'static str },
    #[error("field \"expires_in\" is not a number of seconds")]
    BadExpiresIn,
}

/// Parses a token file's bytes according to its format.
pub fn parse(format: FileFormat, bytes: &[u8]) -> Result<TokenDocument, ParseError> {
    let fields = match format {
        FileFormat::Raw => {
            let token = String::from_utf8_lossy(bytes).trim().to_string();
            if token.is_empty() {
                return Err(ParseError::Empty);
            }
            let (expires_at, expiry_source) = match jwt_exp(&token) {
                Some(exp) => (Some(exp), ExpirySource::JwtExp),
                None => (None, ExpirySource::Unknown),
            };
            return Ok(TokenDocument {
                access_token: token,
                expires_at,
                expiry_source,
                issued_at: None,
                fields: Map::new(),
            });
        }
        // Errors keep only serde's position text, never a snippet of content.
        FileFormat::Json => serde_json::from_slice::<Value>(bytes)
            .map_err(|e| ParseError::Json(format!("line {} column {}", e.line(), e.column())))?,
        FileFormat::Yaml => serde_norway::from_slice::<Value>(bytes).map_err(|e| {
            ParseError::Yaml(match e.location() {
                Some(l) => format!("line {} column {}", l.line(), l.column()),
                None => "unreadable".into(),
            })
        })?,
    };
    let Value::Object(fields) = fields else {
        return Err(ParseError::NotAnObject);
    };
    document_from_fields(fields)
}

/// Resolves a token document from the fields of a JSON or YAML file.
pub fn document_from_fields(fields: Map<String, Value>) -> Result<TokenDocument, ParseError> {
    let access_token = match fields.get("access_token") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err(ParseError::NoAccessToken),
    };
    let issued_at = time_field(&fields, "issued_at")?;
    let updated_at = time_field(&fields, "updated_at")?;
    let (expires_at, expiry_source) = if let Some(at) = time_field(&fields, "expires_at")? {
        (Some(at), ExpirySource::ExpiresAt)
    } else if let Some(secs) = expires_in(&fields)? {
        // An `expires_in` with no timestamp is never read as "from now" (FIELD-NOTES #1).
        match (issued_at, updated_at) {
            (Some(at), _) => (Some(at + secs), ExpirySource::ExpiresInPlusIssuedAt),
            (None, Some(at)) => (Some(at + secs), ExpirySource::ExpiresInPlusUpdatedAt),
            (None, None) => jwt_or_unknown(&access_token),
        }
    } else {
        jwt_or_unknown(&access_token)
    };
    Ok(TokenDocument { access_token, expires_at, expiry_source, issued_at: issued_at.or(updated_at), fields })
}

fn jwt_or_unknown(token: &str) -> (Option<OffsetDateTime>, ExpirySource) {
    match jwt_exp(token) {
        Some(exp) => (Some(exp), ExpirySource::JwtExp),
        None => (None, ExpirySource::Unknown),
    }
}

/// A time field as RFC 3339 text or Unix seconds (a number or a string of digits).
/// When tokenproxy wrote a document (`updated_at`, set at every refresh and connect): what orders
/// two documents of one key in a shared store (SPEC §11). `None` when absent or unreadable.
pub fn updated_at(fields: &Map<String, Value>) -> Option<OffsetDateTime> {
    time_field(fields, "updated_at").ok().flatten()
}

/// Whether a stored document written at `stored` is older than the one held, written at `held`:
/// one without `updated_at` is older than any with it; on a tie the stored one wins.
pub fn is_older(stored: Option<OffsetDateTime>, held: Option<OffsetDateTime>) -> bool {
    match (stored, held) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(stored), Some(held)) => stored < held,
    }
}

fn time_field(
    fields: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<OffsetDateTime>, ParseError> {
    let bad = || ParseError::BadTime { field };
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => unix(n.as_f64().ok_or_else(bad)?).map(Some).ok_or_else(bad),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(secs) => unix(secs).map(Some).ok_or_else(bad),
            Err(_) => OffsetDateTime::parse(s.trim(), &Rfc3339).map(Some).map_err(|_| bad()),
        },
        Some(_) => Err(bad()),
    }
}

fn unix(secs: f64) -> Option<OffsetDateTime> {
    if !secs.is_finite() {
        return None;
    }
    OffsetDateTime::from_unix_timestamp(secs.trunc() as i64).ok()
}

fn expires_in(fields: &Map<String, Value>) -> Result<Option<time::Duration>, ParseError> {
    let secs = match fields.get("expires_in") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match secs {
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(time::Duration::seconds(s as i64))),
        _ => Err(ParseError::BadExpiresIn),
    }
}

/// The fields of the file after a refresh: everything it had, with the new `access_token`,
/// `expires_at`, `updated_at`, and a rotated `refresh_token` when the endpoint sent one.
pub fn refreshed_fields(
    previous: &Map<String, Value>,
    issued: &IssuedToken,
    now: OffsetDateTime,
) -> Map<String, Value> {
    let time = |t: OffsetDateTime| Value::String(t.format(&Rfc3339).unwrap_or_default());
    let mut fields = previous.clone();
    fields.insert("access_token".into(), Value::String(issued.access_token.clone()));
    fields.insert("expires_at".into(), time(issued.expires_at));
    fields.insert("updated_at".into(), time(now));
    if let Some(refresh_token) = &issued.refresh_token {
        fields.insert("refresh_token".into(), Value::String(refresh_token.clone()));
    }
    if let Some(token_type) = &issued.token_type {
        fields.insert("token_type".into(), Value::String(token_type.clone()));
    }
    if let Some(scope) = &issued.scope {
        fields.insert("scope".into(), Value::String(scope.clone()));
    }
    // `expires_in` relative to an old timestamp would now contradict `expires_at`.
    for key in REFRESH_REMOVES {
        fields.remove(key);
    }
    fields
}

/// The refresh token a document holds.
pub fn refresh_token(fields: &Map<String, Value>) -> Option<Box<str>> {
    fields.get("refresh_token").and_then(Value::as_str).map(Into::into)
}

/// The fields a refresh owns, and those it removes.
const REFRESH_OWNED: [&str; 6] =
    ["access_token", "refresh_token", "expires_at", "updated_at", "token_type", "scope"];
const REFRESH_REMOVES: [&str; 3] = ["expires_in", "issued_at", RESTORED_AT];

/// Set on a document a replica wrote back after the shared store lost data: for a moment after
/// it, refreshes wait for the other replicas to write back anything newer they hold (SPEC §11).
/// A refresh removes it.
pub const RESTORED_AT: &str = "restored_at";

/// `file`'s fields with a refresh's own fields (from `refreshed`) laid on top: a person's edit
/// to other fields is kept, the refresh's tokens and times win.
pub fn overlay_refresh(file: &Map<String, Value>, refreshed: &Map<String, Value>) -> Map<String, Value> {
    let mut fields = file.clone();
    for key in REFRESH_OWNED {
        if let Some(value) = refreshed.get(key) {
            fields.insert(key.into(), value.clone());
        }
    }
    for key in REFRESH_REMOVES {
        fields.remove(key);
    }
    fields
}

/// Serialises `fields` in the file's format.
pub fn encode(format: FileFormat, fields: &Map<String, Value>) -> std::io::Result<Vec<u8>> {
    let value = Value::Object(fields.clone());
    match format {
        FileFormat::Json => {
            let mut bytes = serde_json::to_vec_pretty(&value).map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            Ok(bytes)
        }
        FileFormat::Yaml => {
            serde_norway::to_string(&value).map(String::into_bytes).map_err(std::io::Error::other)
        }
        FileFormat::Raw => Err(std::io::Error::other("a raw token file is only read, never written")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::path::Path;

    fn json(s: &str) -> Result<TokenDocument, ParseError> {
        parse(FileFormat::Json, s.as_bytes())
    }

    pub(crate) fn jwt_with_exp(exp: i64) -> String {
        let e = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.sig", e(r#"{"alg":"none"}"#), e(&format!(r#"{{"exp":{exp}}}"#)))
    }

    #[test]
    fn expires_at_wins_in_either_form() {
        let d = json(r#"{"access_token":"t","expires_at":"2026-11-22T12:00:00Z","expires_in":5}"#).unwrap();
        assert_eq!(d.expiry_source, ExpirySource::ExpiresAt);
        assert_eq!(d.expires_at.unwrap().unix_timestamp(), 1_795_348_800);
        let d = json(r#"{"access_token":"t","expires_at":1795348800}"#).unwrap();
        assert_eq!(d.expires_at.unwrap().unix_timestamp(), 1_795_348_800);
    }

    #[test]
    fn expires_in_needs_a_timestamp() {
        let d =
            json(r#"{"access_token":"t","expires_in":3600,"updated_at":"2026-11-22T11:00:00Z"}"#).unwrap();
        assert_eq!(d.expiry_source, ExpirySource::ExpiresInPlusUpdatedAt);
        assert_eq!(d.expires_at.unwrap().unix_timestamp(), 1_795_348_800);
        let d = json(r#"{"access_token":"t","expires_in":3600,"issued_at":1795345200}"#).unwrap();
        assert_eq!(d.expiry_source, ExpirySource::ExpiresInPlusIssuedAt);
        // FIELD-NOTES #1: expires_in alone is never "from now".
        let d = json(r#"{"access_token":"t","expires_in":10800}"#).unwrap();
        assert_eq!(d.expiry_source, ExpirySource::Unknown);
        assert_eq!(d.expires_at, None);
    }

    #[test]
    fn jwt_exp_is_the_last_resort() {
        let token = jwt_with_exp(1_795_348_800);
        let d = json(&format!(r#"{{"access_token":"{token}","expires_in":60}}"#)).unwrap();
        assert_eq!(d.expiry_source, ExpirySource::JwtExp);
        assert_eq!(d.expires_at.unwrap().unix_timestamp(), 1_795_348_800);
        let raw = parse(FileFormat::Raw, format!("  {token}\n").as_bytes()).unwrap();
        assert_eq!(raw.expiry_source, ExpirySource::JwtExp);
        assert_eq!(raw.access_token, token);
    }

    #[test]
    fn yaml_and_raw_files() {
        let d = parse(FileFormat::Yaml, b"access_token: abc\nexpires_at: '2026-11-22T12:00:00Z'\nextra: 1\n")
            .unwrap();
        assert_eq!(d.access_token, "abc");
        assert_eq!(d.fields.get("extra"), Some(&Value::from(1)));
        let d = parse(FileFormat::Raw, b"ghp_plain\n").unwrap();
        assert_eq!(d.expiry_source, ExpirySource::Unknown);
        assert_eq!(FileFormat::of(Path::new("a/t.YML")), FileFormat::Yaml);
        assert_eq!(FileFormat::of(Path::new("a/token")), FileFormat::Raw);
    }

    #[test]
    fn malformed_files_name_the_problem_without_content() {
        let err = json(r#"{"access_token":"secret-value","#).unwrap_err();
        assert!(matches!(err, ParseError::Json(_)));
        assert!(!err.to_string().contains("secret-value"));
        assert_eq!(json(r#"{"token":"x"}"#).unwrap_err(), ParseError::NoAccessToken);
        assert_eq!(json(r#"["x"]"#).unwrap_err(), ParseError::NotAnObject);
        assert_eq!(
            json(r#"{"access_token":"x","expires_at":"tomorrow"}"#).unwrap_err(),
            ParseError::BadTime { field: "expires_at" }
        );
        assert_eq!(parse(FileFormat::Raw, b" \n").unwrap_err(), ParseError::Empty);
        let err = parse(FileFormat::Yaml, b"access_token: [secret-value").unwrap_err();
        assert!(!err.to_string().contains("secret-value"));
    }

    #[test]
    fn a_refresh_keeps_every_other_field_and_keeps_an_unrotated_refresh_token() {
        let previous: Map<String, Value> = serde_json::from_str(
            r#"{"access_token":"old","refresh_token":"r1","custom":{"a":1},"expires_in":60,"updated_at":"x"}"#,
        )
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = IssuedToken {
            access_token: "new".into(),
            refresh_token: None,
            expires_at: now + time::Duration::hours(1),
            token_type: None,
            scope: None,
            fields: Map::new(),
        };
        let fields = refreshed_fields(&previous, &issued, now);
        assert_eq!(fields["access_token"], "new");
        assert_eq!(fields["refresh_token"], "r1");
        assert_eq!(fields["custom"], serde_json::json!({"a": 1}));
        assert!(!fields.contains_key("expires_in"));
        let doc = document_from_fields(fields).unwrap();
        assert_eq!(doc.expiry_source, ExpirySource::ExpiresAt);
    }

    #[test]
    fn a_yaml_token_file_round_trips_with_every_field() {
        let fields: Map<String, Value> = serde_json::from_str(
            r#"{"access_token":"a: b # not a comment","refresh_token":"r","expires_at":"2099-01-01T00:00:00Z","userid":12345,"nested":{"k":[1,"two"]}}"#,
        )
        .unwrap();
        let bytes = encode(FileFormat::Yaml, &fields).unwrap();
        let doc = parse(FileFormat::Yaml, &bytes).unwrap();
        assert_eq!(doc.fields, fields);
        assert_eq!(doc.access_token, "a: b # not a comment");
    }
}
