//! Intercepted TLS handshake cost: a cold leaf cache (mint a certificate, then handshake) against
//! a warm one (cached certificate, handshake only). In-process over a memory pipe, so the numbers
//! are CPU cost, not network.
//!
//!     cargo bench --bench handshake
//!
//! Prints the median of each and their ratio; compare ratios, not absolute times, on a noisy
//! machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokenproxy::tls::ca::CertificateAuthority;
use tokenproxy::tls::leaf::LeafCache;

const ROUNDS: usize = 300;

async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>, host: &str) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(host.to_string()).unwrap();
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(a);
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, b);
    let (s, c) = tokio::join!(accept, connect);
    s.unwrap();
    c.unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tokenproxy::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let ca_der = CertificateDer::from_pem_file(ca.cert_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).unwrap();
    let client =
        Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth());
    let leaves = LeafCache::new(ca);

    let mut cold = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let host = format!("host{i}.example.com");
        let started = Instant::now();
        let server = leaves.server_config(&host).await.unwrap();
        handshake(server, client.clone(), &host).await;
        cold.push(started.elapsed());
    }
    let mut warm = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let host = "host0.example.com";
        let started = Instant::now();
        let server = leaves.server_config(host).await.unwrap();
        handshake(server, client.clone(), host).await;
        warm.push(started.elapsed());
    }
    let (cold, warm) = (median(cold), median(warm));
    println!("intercepted TLS handshake, median of {ROUNDS}:");
    println!("  cold leaf cache (mint + handshake): {cold:>10.1?}");
    println!("  warm leaf cache (handshake only):   {warm:>10.1?}");
    println!("  cold / warm = {:.2}", cold.as_secs_f64() / warm.as_secs_f64());
}
