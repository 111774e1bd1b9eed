//! A loopback echo server for trying tokenproxy by hand.
//!
//! `cargo run --example echo [PORT]` (default 8765) answers every request with a JSON object of
//! the method, the path, the header names it received and the fingerprint (first 8 hex digits of
//! the SHA-256) of any `Authorization` value, so that you can see a token arrive without seeing
//! the token.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()),
        "headers": req.headers().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        "authorization_scheme": authorization.and_then(|a| a.split_whitespace().next()),
        "authorization_fingerprint": authorization
            .map(|a| a.split_whitespace().last().unwrap_or(a))
            .map(tokenproxy::secrets::fingerprint),
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8765);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("echo server on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(echo)).await;
        });
    }
}
