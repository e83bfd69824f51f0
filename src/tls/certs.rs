//! A minimal certificate authority: one long-lived CA key pair that issues short server
//! certificates. The proxy keeps its CA under the user's config dir so the kubeconfig's
//! `certificate-authority-data` stays valid across restarts.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use super::TlsError;

pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
}

/// A server certificate and its key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Self, TlsError> {
        // Parse once so a damaged file is reported now, not at the first issue.
        let key = KeyPair::from_pem(&key_pem)?;
        Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(CertificateAuthority { cert_pem, key_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a server certificate for DNS names and IP addresses in `names`.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, TlsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Backdated an hour for clock skew; 397 days is the longest lifetime clients accept.
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(397);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// SHA-256 fingerprint of the first certificate in a PEM string, as colon-separated hex (the
/// form browsers and `openssl x509 -fingerprint -sha256` print).
pub fn fingerprint_sha256(cert_pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let digest = Sha256::digest(der.as_ref());
    Some(
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_is_accepted_by_a_client_trusting_the_ca() {
        let ca = CertificateAuthority::generate("test ca").unwrap();
        let leaf = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        let roots = crate::tls::roots_from_pem(ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(roots.len(), 1);
        crate::tls::server_config(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), &[]).unwrap();
        let reloaded =
            CertificateAuthority::from_pem(ca.cert_pem().into(), ca.key_pem().into()).unwrap();
        reloaded.issue_server(&["localhost"]).unwrap();
        let fp = fingerprint_sha256(ca.cert_pem()).unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1);
    }
}
