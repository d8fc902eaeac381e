//! `certs inspect`: what a certificate says, in the terms an operator checks, and its verdict
//! against the client policy (leaf rules only: inspect has no CA bundle).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::public_key::PublicKey;

use super::CertsError;
use crate::config::ClientPolicyConfig;
use crate::tls::{self, BROADWORKS_OID};

/// One certificate of the inspected file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertReport {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// Whole days until notAfter; negative once expired.
    pub days_left: i64,
    /// e.g. `ECDSA P-256`, `RSA 3072`.
    pub key: String,
    pub is_ca: bool,
    pub key_usage: Vec<String>,
    /// By name where known, e.g. `BroadWorks client (1.3.6.1.4.1.6431.1.1.8.2.1.3)`.
    pub extended_key_usage: Vec<String>,
    pub subject_alt_names: Vec<String>,
    pub sha256_fingerprint: String,
    pub meets_client_policy: bool,
    /// Every failing rule, not just the first.
    pub policy_refusals: Vec<RefusalReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusalReport {
    pub label: &'static str,
    pub message: String,
}

/// Inspect every certificate in `bytes` (PEM bundle or one DER certificate).
pub fn inspect(
    bytes: &[u8],
    policy: &ClientPolicyConfig,
    now: SystemTime,
) -> Result<Vec<CertReport>, CertsError> {
    let certs = tls::parse_certs(bytes).map_err(|e| {
        CertsError::Parse(match e {
            tls::CertsParseError::Empty => {
                "no certificate found; expected PEM (-----BEGIN CERTIFICATE-----) or DER".to_owned()
            }
            tls::CertsParseError::Bad { index, reason } => {
                format!("certificate {index} cannot be parsed: {reason}")
            }
        })
    })?;
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut reports = Vec::with_capacity(certs.len());
    for der in &certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertsError::Parse(e.to_string()))?;
        let refusals = tls::leaf_refusals(&cert, policy, now);
        let not_after = cert.validity().not_after.timestamp();
        reports.push(CertReport {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: tls::time_text(cert.validity().not_before.timestamp()),
            not_after: tls::time_text(not_after),
            days_left: (not_after - now_s).div_euclid(86_400),
            key: key_description(&cert),
            is_ca: cert.is_ca(),
            key_usage: match cert.key_usage() {
                Ok(Some(ku)) => ku
                    .value
                    .to_string()
                    .split(", ")
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            },
            extended_key_usage: tls::eku_oids(&cert)
                .unwrap_or_default()
                .iter()
                .map(|o| eku_name(o))
                .collect(),
            subject_alt_names: tls::subject_alt_names(&cert),
            sha256_fingerprint: tls::identity(std::slice::from_ref(der))
                .map(|i| i.sha256_fingerprint)
                .unwrap_or_default(),
            meets_client_policy: refusals.is_empty(),
            policy_refusals: refusals
                .iter()
                .map(|r| RefusalReport {
                    label: r.label(),
                    message: r.to_string(),
                })
                .collect(),
        });
    }
    Ok(reports)
}

/// An EKU OID by the name `openssl x509 -text` uses, with the OID.
pub fn eku_name(oid: &str) -> String {
    let name = match oid {
        BROADWORKS_OID => "BroadWorks client",
        "2.5.29.37.0" => "Any Extended Key Usage",
        "1.3.6.1.5.5.7.3.1" => "TLS Web Server Authentication",
        tls::CLIENT_AUTH_OID => "TLS Web Client Authentication",
        "1.3.6.1.5.5.7.3.3" => "Code Signing",
        "1.3.6.1.5.5.7.3.4" => "E-mail Protection",
        "1.3.6.1.5.5.7.3.8" => "Time Stamping",
        "1.3.6.1.5.5.7.3.9" => "OCSP Signing",
        _ => return oid.to_owned(),
    };
    format!("{name} ({oid})")
}

fn key_description(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "ECDSA P-256".to_owned(),
                Some("1.3.132.0.34") => "ECDSA P-384".to_owned(),
                Some("1.3.132.0.35") => "ECDSA P-521".to_owned(),
                Some(other) => format!("EC {other} ({} bits)", point.key_size()),
                None => format!("EC ({} bits)", point.key_size()),
            }
        }
        Ok(PublicKey::Unknown(_)) | Ok(_) => spki.algorithm.algorithm.to_id_string(),
        Err(e) => format!("unparseable key: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{DevPki, ExtendedKeyUsagePurpose, LeafParams, issue_leaf};

    #[test]
    fn reports_a_good_client_and_every_failure_of_a_bad_one() {
        let pki = DevPki::in_memory().unwrap();
        let policy = ClientPolicyConfig::default();
        let good = inspect(pki.client.cert_pem.as_bytes(), &policy, SystemTime::now()).unwrap();
        assert_eq!(good.len(), 1);
        let r = &good[0];
        assert!(r.meets_client_policy, "{r:?}");
        assert_eq!(r.key, "ECDSA P-256");
        assert!(r.days_left >= 364 && r.days_left <= 365, "{}", r.days_left);
        assert!(
            r.extended_key_usage
                .contains(&"BroadWorks client (1.3.6.1.4.1.6431.1.1.8.2.1.3)".to_owned())
        );
        assert!(
            r.extended_key_usage
                .contains(&"TLS Web Client Authentication (1.3.6.1.5.5.7.3.2)".to_owned())
        );
        assert!(r.subject_alt_names.is_empty());

        let mut params = LeafParams::server(&["other.example".to_owned()], 10);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let bad = issue_leaf(&pki.ca, &params).unwrap();
        // A bundle: the bad leaf then the CA, in DER for the first to prove both forms work.
        let reports = inspect(&bad.cert_der, &policy, SystemTime::now()).unwrap();
        let labels: Vec<_> = reports[0].policy_refusals.iter().map(|r| r.label).collect();
        assert_eq!(
            labels,
            [
                "missing_broadworks_oid",
                "missing_client_auth",
                "san_present",
                "common_name_not_allowed"
            ]
        );
        let bundle = format!("{}{}", bad.cert_pem, pki.ca.cert.cert_pem);
        let reports = inspect(bundle.as_bytes(), &policy, SystemTime::now()).unwrap();
        assert_eq!(reports.len(), 2);
        assert!(reports[1].is_ca);
        assert!(!reports[1].meets_client_policy);
    }

    #[test]
    fn garbage_is_an_error() {
        let policy = ClientPolicyConfig::default();
        assert!(inspect(b"", &policy, SystemTime::now()).is_err());
        assert!(inspect(b"\x30\x03\x02\x01\x00", &policy, SystemTime::now()).is_err());
        assert!(
            inspect(
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                &policy,
                SystemTime::now()
            )
            .is_err()
        );
    }
}
