//! tokenproxy's certificate authority: created once in `[tls] ca_dir`, reused on every start.
//!
//! `ca.pem` (0644) is what applications trust; `ca-key.pem` (0600) never leaves the folder, is
//! never logged and never served. An existing CA that does not parse is an error: replacing it
//! silently would break every application that trusts the old one.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::fsutil::{Existing, write_atomically};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long a new CA is valid.
const CA_LIFETIME: Duration = Duration::days(3650);
/// How long a leaf is valid: short, so that a leaked leaf key is worth little.
pub const LEAF_LIFETIME: Duration = Duration::hours(24);
/// Clock skew allowed for between tokenproxy and its clients.
const BACKDATE: Duration = Duration::hours(1);

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_path: PathBuf,
}

/// A leaf certificate chain and its own private key.
pub struct LeafCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: OffsetDateTime,
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, creating it (and the folder) on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<CertificateAuthority> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(dir, &cert_path, &key_path),
            (true, false) => bail!(
                "tls.ca_dir: {} exists without {CA_KEY_FILE}; restore the key, or remove {CA_CERT_FILE} \
                 to create a new CA (applications must then trust the new one)",
                cert_path.display()
            ),
            (false, true) => bail!(
                "tls.ca_dir: {} exists without {CA_CERT_FILE}; restore the certificate, or remove the key \
                 to create a new CA",
                key_path.display()
            ),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<CertificateAuthority> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .with_context(|| format!("tls.ca_dir: cannot read {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(key_path)
            .with_context(|| format!("tls.ca_dir: cannot read {}", key_path.display()))?;
        // The key's parse error is not shown: it could quote key material.
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| anyhow::anyhow!("tls.ca_dir: {} is not a PEM private key", key_path.display()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| anyhow::anyhow!("tls.ca_dir: {} is not a PEM certificate", cert_path.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            anyhow::anyhow!("tls.ca_dir: {} is not a usable CA certificate ({e})", cert_path.display())
        })?;
        Ok(CertificateAuthority { issuer, cert_der, cert_path: cert_path.to_path_buf() })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> anyhow::Result<CertificateAuthority> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("tls.ca_dir: cannot create {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "tokenproxy local CA");
        name.push(DnType::OrganizationName, "tokenproxy");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key).context("signing the CA certificate")?;

        // The key first: a certificate without its key would be useless, the reverse is only
        // incomplete. Each file appears whole or not at all.
        write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600, Existing::Keep)
            .with_context(|| format!("tls.ca_dir: cannot write {}", key_path.display()))?;
        write_atomically(cert_path, cert.pem().as_bytes(), 0o644, Existing::Keep)
            .with_context(|| format!("tls.ca_dir: cannot write {}", cert_path.display()))?;
        tracing::info!(path = %cert_path.display(), "created a new CA; applications must trust this file");
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_path: cert_path.to_path_buf(),
        })
    }

    /// The path of `ca.pem`, the file applications trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Issues a certificate for `host` (a DNS name or an IP address) with a fresh key of its own.
    pub fn issue_leaf(&self, host: &str) -> anyhow::Result<LeafCertificate> {
        let key = KeyPair::generate().context("generating a leaf key")?;
        let mut params = CertificateParams::new(vec![host.to_string()])
            .with_context(|| format!("no certificate can name {host:?}"))?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let cert = params.signed_by(&key, &self.issuer).context("signing a leaf certificate")?;
        Ok(LeafCertificate {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after: params.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_ca_is_created_once_and_reloaded_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = CertificateAuthority::load_or_create(&ca_dir).unwrap();
        let mode = |f: &str| std::fs::metadata(ca_dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        let pem = std::fs::read(first.cert_path()).unwrap();
        let second = CertificateAuthority::load_or_create(&ca_dir).unwrap();
        assert_eq!(std::fs::read(second.cert_path()).unwrap(), pem, "reused, not replaced");
        assert_eq!(first.cert_der, second.cert_der);

        let a = second.issue_leaf("api.example.com").unwrap();
        let b = second.issue_leaf("127.0.0.1").unwrap();
        assert_eq!(a.chain[1], first.cert_der, "the chain ends in the CA");
        assert_ne!(a.key.secret_der(), b.key.secret_der(), "each leaf has its own key");
        let ca_key = std::fs::read_to_string(ca_dir.join(CA_KEY_FILE)).unwrap();
        let ca_key = KeyPair::from_pem(&ca_key).unwrap();
        assert_ne!(a.key.secret_der(), ca_key.serialize_der().as_slice(), "a leaf never uses the CA key");
    }

    #[test]
    fn a_broken_or_half_present_ca_is_an_error_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_CERT_FILE), "not a certificate").unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(err.contains(CA_KEY_FILE), "{err}");
        assert_eq!(std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(), "not a certificate");

        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(err.contains("without ca-key.pem"), "{err}");
    }
}
