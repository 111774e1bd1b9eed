//! TLS: tokenproxy's own CA and the leaf certificates it shows intercepted clients ([`ca`],
//! [`leaf`]), and the verified client configuration for every connection it opens.

pub mod ca;
pub mod leaf;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The first byte of a TLS handshake record: what tells a client's TLS from plain HTTP.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Installs the process's rustls crypto provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The client configuration for every TLS connection tokenproxy opens: the system's roots plus
/// `[tls] extra_roots`. When the system has no roots (a minimal container), the Mozilla roots
/// bundled with webpki-roots stand in.
pub fn client_config(extra_roots: &[PathBuf]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for path in extra_roots {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("tls.extra_roots: cannot read {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("tls.extra_roots: {} is not PEM", path.display()))?;
        anyhow::ensure!(!certs.is_empty(), "tls.extra_roots: {} holds no certificate", path.display());
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!("tls.extra_roots: a certificate in {} is invalid", path.display())
            })?;
        }
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(Arc::new(config))
}

/// The same roots as [`client_config`], as one PEM bundle, for a client that takes its roots as
/// PEM (the Redis client for `rediss://`): the system's roots plus `[tls] extra_roots`.
pub fn roots_pem(extra_roots: &[PathBuf]) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let mut pem = Vec::new();
    let mut push = |der: &[u8]| {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    };
    for cert in rustls_native_certs::load_native_certs().certs {
        push(&cert);
    }
    for path in extra_roots {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("tls.extra_roots: cannot read {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("tls.extra_roots: {} is not PEM", path.display()))?;
        for cert in certs {
            push(&cert);
        }
    }
    Ok(pem)
}
