//! What Key Vault returns, in the PEM files the CSI driver writes: a key's public half (a JWK)
//! as a SubjectPublicKeyInfo, and a certificate's PKCS#12 bundle as the private key followed by
//! the certificate chain. The DER here is the handful of shapes those need, written by hand so
//! no ASN.1 library is pulled in for two structures; the PEM armour is the `pem` crate's.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use crate::secret::Secret;

/// rsaEncryption (1.2.840.113549.1.1.1).
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-ecPublicKey (1.2.840.10045.2.1).
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (1.2.840.10045.3.1.7).
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// secp384r1 (1.3.132.0.34).
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// secp521r1 (1.3.132.0.35).
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];

/// Why a key or a PKCS#12 bundle from Key Vault cannot be turned into PEM. Values are never
/// quoted, only field names.
/// Why base64 does not decode, without the offending symbol: `base64::DecodeError` quotes
/// it ("Invalid symbol 61, offset 3"), a byte of a secret in an Event, status or gRPC error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Base64Error {
    #[error("not a base64 symbol at offset {0}")]
    Symbol(usize),
    #[error("invalid length")]
    Length,
    #[error("invalid padding")]
    Padding,
}

impl From<base64::DecodeError> for Base64Error {
    fn from(e: base64::DecodeError) -> Base64Error {
        match e {
            base64::DecodeError::InvalidByte(offset, _)
            | base64::DecodeError::InvalidLastSymbol(offset, _) => Base64Error::Symbol(offset),
            base64::DecodeError::InvalidLength(_) => Base64Error::Length,
            base64::DecodeError::InvalidPadding => Base64Error::Padding,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("the {kty} key has no '{field}'")]
    MissingField { kty: String, field: &'static str },
    #[error("the key's '{field}' is not base64url")]
    NotBase64Url {
        field: &'static str,
        #[source]
        source: Base64Error,
    },
    #[error("the EC key's curve {0:?} is not supported; P-256, P-384 and P-521 are")]
    UnsupportedCurve(Option<String>),
    #[error("the EC key's coordinates are longer than its curve allows")]
    CoordinatesTooLong,
    #[error("key type {0:?} has no public key to export (symmetric keys never leave Key Vault)")]
    NoPublicKey(String),
    #[error("PKCS#12 content is not base64")]
    Pkcs12Base64(#[source] Base64Error),
    #[error("the PKCS#12 (PFX) content cannot be read")]
    Pkcs12(#[source] p12_keystore::error::Error),
    #[error("the PKCS#12 (PFX) content holds no private key")]
    NoPrivateKey,
}

/// The public fields of a Key Vault JSON Web Key.
#[derive(Debug, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
}

/// The key's public half as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as the CSI provider
/// writes keys.
pub fn jwk_to_pem(jwk: &Jwk) -> Result<String, PemError> {
    let field = |value: &Option<String>, field: &'static str| -> Result<Vec<u8>, PemError> {
        let text = value.as_deref().ok_or_else(|| PemError::MissingField {
            kty: jwk.kty.clone(),
            field,
        })?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| PemError::NotBase64Url {
                field,
                source: e.into(),
            })
    };
    let spki = match jwk.kty.as_str() {
        "RSA" | "RSA-HSM" => {
            let public = der(
                0x30,
                &[
                    der_uint(&field(&jwk.n, "n")?),
                    der_uint(&field(&jwk.e, "e")?),
                ]
                .concat(),
            );
            let algorithm = der(0x30, &[der(0x06, OID_RSA), vec![0x05, 0x00]].concat());
            der(0x30, &[algorithm, bit_string(&public)].concat())
        }
        "EC" | "EC-HSM" => {
            let (curve, size) = match jwk.crv.as_deref() {
                Some("P-256") => (OID_P256, 32),
                Some("P-384") => (OID_P384, 48),
                Some("P-521") => (OID_P521, 66),
                other => return Err(PemError::UnsupportedCurve(other.map(str::to_string))),
            };
            let (x, y) = (field(&jwk.x, "x")?, field(&jwk.y, "y")?);
            if x.len() > size || y.len() > size {
                return Err(PemError::CoordinatesTooLong);
            }
            // Uncompressed point: 0x04, then x and y left-padded to the field size.
            let mut point = vec![0x04];
            point.extend(std::iter::repeat_n(0, size - x.len()));
            point.extend(&x);
            point.extend(std::iter::repeat_n(0, size - y.len()));
            point.extend(&y);
            let algorithm = der(0x30, &[der(0x06, OID_EC), der(0x06, curve)].concat());
            der(0x30, &[algorithm, bit_string(&point)].concat())
        }
        other => return Err(PemError::NoPublicKey(other.to_string())),
    };
    Ok(pem_block("PUBLIC KEY", &spki))
}

/// A PKCS#12 bundle (Key Vault's are protected by the empty password) as PEM: the private key,
/// then the certificate that goes with it, then the rest of the chain.
pub fn pkcs12_to_pem(pfx: &[u8]) -> Result<Secret, PemError> {
    let archive = p12_keystore::Pkcs12Archive::from_pkcs12(pfx, "").map_err(PemError::Pkcs12)?;
    let key = archive.keys.first().ok_or(PemError::NoPrivateKey)?;
    let mut out = pem_block("PRIVATE KEY", key.key.as_der());
    let key_id = key.local_key_id.as_ref().map(|id| id.0.clone());
    let (leaf, rest): (Vec<_>, Vec<_>) = archive
        .certs
        .iter()
        .partition(|c| key_id.is_some() && c.local_key_id == key_id);
    for cert in leaf.iter().chain(rest.iter()) {
        out.push_str(&pem_block("CERTIFICATE", cert.cert.as_der()));
    }
    Ok(Secret::new(out))
}

/// The PEM blocks of `text` whose label is `label` (or ends with it, for `RSA PRIVATE KEY`
/// and `EC PRIVATE KEY` under "PRIVATE KEY"), concatenated.
pub fn blocks(text: &str, label: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            inside = name.ends_with(label);
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
        if line.starts_with("-----END ") {
            inside = false;
        }
    }
    out
}

/// One PEM block as the CSI driver writes it: 64-character lines, `\n` endings.
fn pem_block(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A positive INTEGER: leading zeros dropped, one put back when the high bit is set.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let mut value = bytes[start..].to_vec();
    if value.first().is_none_or(|b| b & 0x80 != 0) {
        value.insert(0, 0);
    }
    der(0x02, &value)
}

fn bit_string(content: &[u8]) -> Vec<u8> {
    let mut with_unused = vec![0];
    with_unused.extend_from_slice(content);
    der(0x03, &with_unused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use rcgen::PublicKeyData;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::SubjectPublicKeyInfoDer;

    fn b64(bytes: &[u8]) -> Option<String> {
        Some(URL_SAFE_NO_PAD.encode(bytes))
    }

    #[test]
    fn an_ec_jwk_becomes_the_same_spki_rcgen_makes() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.der_bytes().to_vec();
        assert_eq!(point[0], 4);
        let jwk = Jwk {
            kty: "EC".into(),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: b64(&point[1..33]),
            y: b64(&point[33..]),
        };
        let pem = jwk_to_pem(&jwk).unwrap();
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), pair.subject_public_key_info().as_slice());
    }

    #[test]
    fn an_rsa_jwk_becomes_the_same_spki_rcgen_makes() {
        let pem = include_str!("../entra/testdata/test-only-rsa-key.pem");
        let pair = rcgen::KeyPair::from_pem_and_sign_algo(pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        // The PKCS#1 RSAPublicKey: SEQUENCE { INTEGER n, INTEGER e }; pull n and e back out.
        let pkcs1 = pair.der_bytes();
        let (n, rest) = integer(&pkcs1[header_len(pkcs1)..]);
        let (e, _) = integer(rest);
        let jwk = Jwk {
            kty: "RSA-HSM".into(),
            n: b64(n),
            e: b64(e),
            crv: None,
            x: None,
            y: None,
        };
        let out = jwk_to_pem(&jwk).unwrap();
        let der = SubjectPublicKeyInfoDer::from_pem_slice(out.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), pair.subject_public_key_info().as_slice());
        let oct = Jwk {
            kty: "oct".into(),
            n: None,
            e: None,
            crv: None,
            x: None,
            y: None,
        };
        assert!(jwk_to_pem(&oct)
            .unwrap_err()
            .to_string()
            .contains("symmetric"));
    }

    fn header_len(der: &[u8]) -> usize {
        if der[1] < 0x80 {
            2
        } else {
            2 + (der[1] & 0x7f) as usize
        }
    }

    fn integer(der: &[u8]) -> (&[u8], &[u8]) {
        let h = header_len(der);
        let len = if der[1] < 0x80 {
            der[1] as usize
        } else {
            der[2..h].iter().fold(0, |a, b| (a << 8) | *b as usize)
        };
        (&der[h..h + len], &der[h + len..])
    }

    #[test]
    fn pem_blocks_have_64_character_lines_and_lf_endings() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = pem_block("CERTIFICATE", &der);
        let body = STANDARD.encode(&der);
        let mut expected = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            expected.push_str(std::str::from_utf8(line).unwrap());
            expected.push('\n');
        }
        expected.push_str("-----END CERTIFICATE-----\n");
        assert_eq!(text, expected);
        assert!(!text.contains('\r'));
    }

    #[test]
    fn blocks_pick_keys_or_certificates() {
        let text = "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            blocks(text, "PRIVATE KEY"),
            "-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n"
        );
        assert_eq!(
            blocks(text, "CERTIFICATE"),
            "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n"
        );
    }
}
