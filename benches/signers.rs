//! What each credential kind of SPEC §14 costs to sign: a JWT assertion (RS256 and ES256), and a
//! SigV4 signature over a GET and over a 64 KiB body (hashed, as a held body is).
//!
//!     cargo bench --bench signers

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Map, Value};
use tokenproxy::grants::keys::SigningKey;
use tokenproxy::sigv4::{AwsCredentials, Payload, sign_request};

fn claims() -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("iss".into(), "svc@project.iam.gserviceaccount.com".into());
    claims.insert("aud".into(), "https://oauth2.googleapis.com/token".into());
    claims.insert("scope".into(), "https://www.googleapis.com/auth/cloud-platform".into());
    claims.insert("iat".into(), 1_765_000_000.into());
    claims.insert("exp".into(), 1_765_003_600.into());
    claims
}

fn jwt(c: &mut Criterion) {
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let ec = rcgen::KeyPair::generate().unwrap();
    let claims = claims();
    for (name, pem) in [("jwt_rs256", rsa.serialize_pem()), ("jwt_es256", ec.serialize_pem())] {
        let key = SigningKey::from_pem(pem.as_bytes(), Some("kid-1".into())).unwrap();
        c.bench_function(name, |b| b.iter(|| black_box(key.sign(black_box(&claims)).unwrap())));
    }
}

fn sigv4(c: &mut Criterion) {
    let credentials = AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: Some("session-token".into()),
    };
    let body = vec![b'x'; 64 * 1024];
    let request = |method: &str| {
        http::Request::builder()
            .method(method)
            .uri("https://dynamodb.eu-west-1.amazonaws.com/?Action=ListTables&Limit=10")
            .header("host", "dynamodb.eu-west-1.amazonaws.com")
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", "DynamoDB_20120810.ListTables")
            .body(())
            .unwrap()
    };
    let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_765_000_000);
    for (name, method, payload) in
        [("sigv4_get", "GET", Payload::Bytes(b"")), ("sigv4_post_64k", "POST", Payload::Bytes(&body))]
    {
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut r = request(method);
                sign_request(&mut r, payload, &credentials, "eu-west-1", "dynamodb", time).unwrap();
                black_box(r)
            })
        });
    }
}

criterion_group!(signers, jwt, sigv4);
criterion_main!(signers);
