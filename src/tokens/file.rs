//! The token file (SPEC §4): JSON, YAML or raw, and how its expiry is resolved.
//!
//! Parsing never puts file content into an error message: a malformed file may hold a token.

use std::path::Path;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::FileFormat;
use crate::secrets::jwt_exp;

/// A token file larger than this is refused as unparsable: no token document is near it, and
/// holding and hashing such a file on every poll would cost memory and time for nothing.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why a token file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the file is larger than {} KiB; refused", MAX_FILE_BYTES / 1024)]
    TooLarge,
}

/// Reads a token file, refusing one over [`MAX_FILE_BYTES`] (whatever its metadata claims).
pub fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

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
}
