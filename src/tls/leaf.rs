//! Leaf certificates for intercepted hosts: minted once per host, reused across connections from
//! a bounded cache, renewed before they expire.

use std::sync::Arc;

use quick_cache::sync::Cache;
use time::{Duration, OffsetDateTime};

use super::ca::CertificateAuthority;
use crate::metrics;

/// At most this many hosts' certificates are kept; the least used go first.
const CACHE_CAPACITY: usize = 1024;
/// A cached leaf this close to expiry is replaced by a fresh one.
const RENEW_BEFORE: Duration = Duration::hours(1);
/// What tokenproxy offers an intercepted client.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Clone)]
struct Leaf {
    config: Arc<rustls::ServerConfig>,
    not_after: OffsetDateTime,
}

/// Hands out the TLS server configuration that shows a client a certificate for the host it
/// asked for.
pub struct LeafCache {
    ca: CertificateAuthority,
    cache: Cache<String, Leaf>,
}

impl LeafCache {
    pub fn new(ca: CertificateAuthority) -> LeafCache {
        LeafCache { ca, cache: Cache::new(CACHE_CAPACITY) }
    }

    /// The server configuration for `host`, from the cache when a fresh one is there.
    /// Concurrent misses for one host mint one certificate between them.
    pub async fn server_config(&self, host: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let host = crate::hosts::normalize_host(host).into_owned();
        if let Some(leaf) = self.cache.get(&host) {
            if leaf.not_after - OffsetDateTime::now_utc() > RENEW_BEFORE {
                metrics::leaf_cache_hit();
                return Ok(leaf.config);
            }
            self.cache.remove(&host);
        }
        let leaf = self.cache.get_or_insert_async(&host, async { self.mint(&host) }).await?;
        Ok(leaf.config)
    }

    fn mint(&self, host: &str) -> anyhow::Result<Leaf> {
        let leaf = self.ca.issue_leaf(host)?;
        let mut config =
            rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(leaf.chain, leaf.key)?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        // No TLS 1.3 session tickets. From a sidecar on loopback they reach the client just as
        // it writes its first request, and a client that reads and writes one OpenSSL
        // connection from two threads at once (Python's `websockets` sync client) can lose that
        // request and hang. Resumption would only save a handshake on loopback, and most
        // clients keep their connections anyway.
        config.send_tls13_tickets = 0;
        metrics::leaf_issued();
        tracing::debug!(host, not_after = %leaf.not_after, "issued a leaf certificate");
        Ok(Leaf { config: Arc::new(config), not_after: leaf.not_after })
    }
}
