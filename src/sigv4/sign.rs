//! AWS Signature Version 4 (SPEC §14 `[providers.NAME.sigv4]`): the request tokenproxy sends
//! upstream is signed instead of carrying a Bearer token. The signing itself is the `aws-sigv4`
//! crate's; this module chooses what is signed: the request as it leaves (the client's own
//! `Authorization` and `X-Amz-*` signing headers removed first), the payload's SHA-256 when the
//! body is held (the replay buffer), `UNSIGNED-PAYLOAD` for a larger body where the service allows
//! it (S3), and S3's single URI encoding.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;

/// The headers a signature is made of (and that a client's own would contradict).
const SIGNING_HEADERS: [&str; 4] =
    ["authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"];

/// A key pair, with the session token of temporary credentials. `Debug` shows the key id only.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// What the signature says of the body.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The whole body, hashed.
    Bytes(&'a [u8]),
    /// `UNSIGNED-PAYLOAD`: a body too large to hold, where the service accepts that (S3).
    Unsigned,
}

/// Whether `service` accepts `UNSIGNED-PAYLOAD` (and wants its URI encoded once, unnormalized).
pub fn is_s3(service: &str) -> bool {
    matches!(service, "s3" | "s3-object-lambda" | "s3express")
}

#[derive(Debug, thiserror::Error)]
#[error("SigV4 signing failed: {0}")]
pub struct SignError(String);

/// Signs `request` in place for `region` and `service` at `time`.
pub fn sign_request<B>(
    request: &mut http::Request<B>,
    payload: Payload<'_>,
    credentials: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<(), SignError> {
    for name in SIGNING_HEADERS {
        request.headers_mut().remove(name);
    }
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    if is_s3(service) {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    let identity = Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        credentials.session_token.clone(),
        None,
        "tokenproxy",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError(e.to_string()))?
        .into();
    let headers: Vec<(&str, &str)> = request
        .headers()
        .iter()
        .filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str(), v)))
        .collect();
    let body = match payload {
        Payload::Bytes(bytes) => SignableBody::Bytes(bytes),
        Payload::Unsigned => SignableBody::UnsignedPayload,
    };
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(request.method().as_str(), uri, headers.into_iter(), body)
        .map_err(|e| SignError(e.to_string()))?;
    let (instructions, _signature) =
        sign(signable, &params).map_err(|e| SignError(e.to_string()))?.into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIALS: fn() -> AwsCredentials = || AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: Some("session-token-example".into()),
    };

    /// botocore (not ours) recomputes the signature from the signed request: its canonical
    /// request, string to sign and signature at the request's own `X-Amz-Date`.
    fn botocore_signature(request: &http::Request<()>, body: &[u8], service: &str) -> Option<String> {
        let available = std::process::Command::new("python3")
            .args(["-c", "import botocore"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            assert_ne!(
                std::env::var("TOKENPROXY_REQUIRE_CLIENTS").as_deref(),
                Ok("1"),
                "python3 with botocore is required (TOKENPROXY_REQUIRE_CLIENTS=1)"
            );
            eprintln!("SKIP: python3 with botocore is not usable here");
            return None;
        }
        let credentials = CREDENTIALS();
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers()
            .iter()
            .filter(|(name, _)| *name != "authorization")
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().into()))
            .collect();
        let input = serde_json::json!({
            "method": request.method().as_str(),
            "url": request.uri().to_string(),
            "headers": headers,
            "body": String::from_utf8_lossy(body),
            "key": credentials.access_key_id,
            "secret": credentials.secret_access_key,
            "token": credentials.session_token,
            "service": service,
            "region": "eu-west-1",
        });
        let script = r#"
import json, sys
from botocore.auth import SigV4Auth, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
i = json.load(sys.stdin)
request = AWSRequest(method=i["method"], url=i["url"], data=i["body"].encode(), headers=i["headers"])
auth_class = S3SigV4Auth if i["service"] == "s3" else SigV4Auth
auth = auth_class(Credentials(i["key"], i["secret"], i["token"]), i["service"], i["region"])
request.context["timestamp"] = i["headers"]["x-amz-date"]
canonical = auth.canonical_request(request)
print(auth.signature(auth.string_to_sign(request, canonical), request))
"#;
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }

    fn signature_of(request: &http::Request<()>) -> String {
        let authorization = request.headers()["authorization"].to_str().unwrap();
        authorization.rsplit_once("Signature=").unwrap().1.to_string()
    }

    #[test]
    fn botocore_recomputes_the_signature_of_a_get_a_post_reserved_characters_and_unsigned_s3() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_765_000_000);
        let cases: [(&str, &str, &[u8], &str, bool); 4] = [
            (
                "GET",
                "https://sqs.eu-west-1.amazonaws.com/?Action=ListQueues&Version=2012-11-05",
                b"",
                "sqs",
                false,
            ),
            ("POST", "https://dynamodb.eu-west-1.amazonaws.com/", br#"{"TableName":"t"}"#, "dynamodb", false),
            (
                "GET",
                "https://bucket.s3.eu-west-1.amazonaws.com/dir/a%20b%2Bc.txt?prefix=x%2Fy&list-type=2&marker=%E2%9C%93",
                b"",
                "s3",
                false,
            ),
            ("PUT", "https://bucket.s3.eu-west-1.amazonaws.com/big.bin", b"", "s3", true),
        ];
        for (method, url, body, service, unsigned) in cases {
            let uri: http::Uri = url.parse().unwrap();
            let mut request = http::Request::builder()
                .method(method)
                .uri(url)
                .header("host", uri.authority().unwrap().as_str())
                .header("content-type", "application/x-amz-json-1.0")
                // The client's own signature: replaced, never kept beside ours.
                .header("authorization", "AWS4-HMAC-SHA256 Credential=CLIENT/…")
                .header("x-amz-date", "19700101T000000Z")
                .body(())
                .unwrap();
            let payload = if unsigned { Payload::Unsigned } else { Payload::Bytes(body) };
            sign_request(&mut request, payload, &CREDENTIALS(), "eu-west-1", service, time).unwrap();
            let headers = request.headers();
            assert_eq!(headers.get_all("authorization").iter().count(), 1);
            assert!(
                headers["authorization"]
                    .to_str()
                    .unwrap()
                    .starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251206/eu-west-1/")
            );
            assert_eq!(headers["x-amz-date"], "20251206T054640Z");
            assert_eq!(headers["x-amz-security-token"], "session-token-example");
            let sha = headers["x-amz-content-sha256"].to_str().unwrap();
            if unsigned {
                assert_eq!(sha, "UNSIGNED-PAYLOAD");
            } else {
                assert_eq!(sha, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body)));
            }
            let Some(expected) = botocore_signature(&request, body, service) else { return };
            assert_eq!(signature_of(&request), expected, "{method} {url}");
        }
    }

    #[test]
    fn credentials_never_show_the_secret() {
        let shown = format!("{:?}", CREDENTIALS());
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains("wJalr") && !shown.contains("session-token")
        );
    }
}
