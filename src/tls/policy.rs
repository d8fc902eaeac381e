//! The client-certificate policy of SPEC §6 as one value: chain, validity, EKU, CN, SAN and CRL
//! rules, each refusal a typed [`Refusal`]. Both the TLS verifier and `certs verify` call
//! [`ClientPolicy::check`], so the CLI and the server never disagree.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use sha2::{Digest, Sha256};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, ExtendedKeyUsageValidator,
    KeyPurposeIdIter, OwnedCertRevocationList, RevocationCheckDepth, RevocationOptionsBuilder,
    UnknownStatusPolicy,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::config::ClientPolicyConfig;

/// The BroadWorks client-certificate EKU purpose (SPEC §6).
pub const BROADWORKS_OID: &str = "1.3.6.1.4.1.6431.1.1.8.2.1.3";
/// id-kp-clientAuth.
pub const CLIENT_AUTH_OID: &str = "1.3.6.1.5.5.7.3.2";
/// Private-enterprise arc: an EKU OID under it that is not ours is a "wrong vendor OID".
const ENTERPRISE_ARC: &str = "1.3.6.1.4.1.";

/// Why a client certificate was refused. `label()` is the metric label, `Display` the log line
/// (it says what to do next).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the client presented no certificate; configure the AS to present its client certificate"
    )]
    NoCertificate,
    #[error("the certificate expired on {not_after}; issue a new client certificate")]
    Expired { not_after: String },
    #[error("the certificate is not valid before {not_before}; check the clocks or wait")]
    NotYetValid { not_before: String },
    #[error(
        "the certificate (issuer \"{issuer}\") does not chain to the configured client CA bundle; add its CA to server.client_ca or issue it from that CA"
    )]
    UnknownCa { issuer: String },
    #[error(
        "the certificate \"{subject}\" is self-signed and not in the client CA bundle; issue it from the configured CA"
    )]
    SelfSigned { subject: String },
    #[error(
        "the certificate's Extended Key Usage lacks the BroadWorks OID {BROADWORKS_OID}; issue it with `flowthrough certs client` or set client_policy.require_broadworks_oid = false"
    )]
    MissingBroadWorksOid,
    #[error(
        "the BroadWorks OID {BROADWORKS_OID} is on the CA certificate but not on the client certificate; the leaf itself must carry it"
    )]
    BroadWorksOidOnlyOnCa,
    #[error(
        "the certificate's Extended Key Usage has vendor OID(s) {found} but not the BroadWorks OID {BROADWORKS_OID}; reissue it with the BroadWorks OID"
    )]
    WrongVendorOid { found: String },
    #[error(
        "the certificate's Extended Key Usage lacks TLS Web Client Authentication; issue it with clientAuth or set client_policy.require_client_auth = false"
    )]
    MissingClientAuth,
    #[error(
        "the certificate has no Extended Key Usage extension; it needs clientAuth and the BroadWorks OID {BROADWORKS_OID}"
    )]
    NoEku,
    #[error(
        "the certificate has Subject Alternative Names ({sans}), which the policy refuses; issue it without SAN or set client_policy.allow_san = true"
    )]
    SanPresent { sans: String },
    #[error("the certificate's CN \"{cn}\" is not in client_policy.allowed_common_names")]
    CommonNameNotAllowed { cn: String },
    #[error("the certificate (serial {serial}) is revoked by a configured CRL")]
    Revoked { serial: String },
    #[error("the certificate cannot be parsed: {detail}")]
    BadEncoding { detail: String },
    #[error("the certificate chain is invalid: {detail}")]
    InvalidChain { detail: String },
}

impl Refusal {
    /// A stable, low-cardinality metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::UnknownCa { .. } => "unknown_ca",
            Refusal::SelfSigned { .. } => "self_signed",
            Refusal::MissingBroadWorksOid => "missing_broadworks_oid",
            Refusal::BroadWorksOidOnlyOnCa => "broadworks_oid_only_on_ca",
            Refusal::WrongVendorOid { .. } => "wrong_vendor_oid",
            Refusal::MissingClientAuth => "missing_client_auth",
            Refusal::NoEku => "no_eku",
            Refusal::SanPresent { .. } => "san_present",
            Refusal::CommonNameNotAllowed { .. } => "common_name_not_allowed",
            Refusal::Revoked { .. } => "revoked",
            Refusal::BadEncoding { .. } => "bad_encoding",
            Refusal::InvalidChain { .. } => "invalid_chain",
        }
    }
}

/// The refusals of one handshake, carried inside the rustls error so the accept loop can log
/// them (see [`crate::tls::refusals_in`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRefusal(pub Vec<Refusal>);

impl fmt::Display for PolicyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("client certificate refused: ")?;
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyRefusal {}

/// Who an accepted client is, for request handlers and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// RFC 4514-style subject, e.g. `CN=bwcticlient.webex.com`.
    pub subject: String,
    pub common_name: Option<String>,
    /// Hex, colon-separated, as `openssl x509 -serial` prints it (lower case).
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256_fingerprint: String,
}

/// The identity of the leaf of `peer_certs` (as `ServerConnection::peer_certificates()` returns
/// them), or `None` when there is no parseable certificate.
pub fn identity(peer_certs: &[CertificateDer<'_>]) -> Option<ClientIdentity> {
    let leaf = peer_certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(identity_of(&cert, leaf))
}

fn identity_of(cert: &X509Certificate<'_>, der: &[u8]) -> ClientIdentity {
    ClientIdentity {
        subject: cert.subject().to_string(),
        common_name: common_name(cert),
        serial: cert.raw_serial_as_string(),
        sha256_fingerprint: hex::encode(Sha256::digest(der)),
    }
}

/// The first CN of the subject, if any.
pub fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// The policy value: the configured rules plus the CA bundle and CRLs they refer to.
pub struct ClientPolicy {
    config: ClientPolicyConfig,
    ca_certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("config", &self.config)
            .field("ca_certs", &self.ca_certs.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

/// Why a policy could not be built from its inputs (the caller knows which file they came from).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the client CA bundle is empty: it must hold at least one CA certificate")]
    EmptyCaBundle,
    #[error("CA certificate {index} of the bundle cannot be used as a trust anchor: {reason}")]
    BadCaCertificate { index: usize, reason: String },
    #[error("CRL {index} cannot be parsed: {reason}")]
    BadCrl { index: usize, reason: String },
}

impl ClientPolicy {
    pub fn new(
        config: ClientPolicyConfig,
        ca_certs: Vec<CertificateDer<'static>>,
        crls: &[CertificateRevocationListDer<'_>],
    ) -> Result<ClientPolicy, PolicyError> {
        if ca_certs.is_empty() {
            return Err(PolicyError::EmptyCaBundle);
        }
        let anchors = ca_certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                x509_parser::parse_x509_certificate(der).map_err(|e| {
                    PolicyError::BadCaCertificate {
                        index: i + 1,
                        reason: e.to_string(),
                    }
                })?;
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| PolicyError::BadCaCertificate {
                        index: i + 1,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let crls = crls
            .iter()
            .enumerate()
            .map(|(i, der)| {
                OwnedCertRevocationList::from_der(der)
                    .map(CertRevocationList::from)
                    .map_err(|e| PolicyError::BadCrl {
                        index: i + 1,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClientPolicy {
            config,
            ca_certs,
            anchors,
            crls,
        })
    }

    pub fn config(&self) -> &ClientPolicyConfig {
        &self.config
    }

    /// The CA certificates client certificates must chain to.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// Check a presented chain (leaf first, then intermediates) at `now`. Every failing rule is
    /// reported, not just the first, so an operator fixes a certificate in one round.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<ClientIdentity, Vec<Refusal>> {
        let Some(leaf_der) = chain.first() else {
            return Err(vec![Refusal::NoCertificate]);
        };
        let leaf = match x509_parser::parse_x509_certificate(leaf_der) {
            Ok((_, cert)) => cert,
            Err(e) => {
                return Err(vec![Refusal::BadEncoding {
                    detail: e.to_string(),
                }]);
            }
        };
        let mut refusals = self.chain_refusals(chain, &leaf, now);
        for r in leaf_refusals(&leaf, &self.config, now) {
            if !refusals.contains(&r) {
                refusals.push(r);
            }
        }
        if let Some(i) = refusals
            .iter()
            .position(|r| *r == Refusal::MissingBroadWorksOid)
            && self.issuer_has_broadworks_oid(&leaf, &chain[1..])
        {
            refusals[i] = Refusal::BroadWorksOidOnlyOnCa;
        }
        if refusals.is_empty() {
            Ok(identity_of(&leaf, leaf_der))
        } else {
            Err(refusals)
        }
    }

    /// Chain building and revocation with webpki. The EKU validator accepts any EKU: stock
    /// verification would refuse a leaf without clientAuth before our rules run, and the EKU
    /// verdicts belong to the policy (see [`leaf_refusals`]).
    fn chain_refusals(
        &self,
        chain: &[CertificateDer<'_>],
        leaf: &X509Certificate<'_>,
        now: SystemTime,
    ) -> Vec<Refusal> {
        let ee = match EndEntityCert::try_from(&chain[0]) {
            Ok(ee) => ee,
            Err(e) => {
                return vec![Refusal::BadEncoding {
                    detail: format!("{e:?}"),
                }];
            }
        };
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                // An expired CRL is a warning (SPEC §6), not a reason to refuse every client.
                .with_expiration_policy(ExpirationPolicy::Ignore)
                .build()
        });
        let time =
            UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO));
        let result = ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &chain[1..],
            time,
            AnyEku,
            revocation,
            None,
        );
        match result {
            Ok(_) => Vec::new(),
            Err(e) => vec![map_webpki_error(e, leaf, &chain[0], &self.ca_certs)],
        }
    }

    /// Whether an intermediate presented by the client, or the bundle CA that issued the leaf,
    /// carries the BroadWorks OID (the "OID only on the CA" case of SPEC §6).
    fn issuer_has_broadworks_oid(
        &self,
        leaf: &X509Certificate<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> bool {
        intermediates
            .iter()
            .chain(self.ca_certs.iter())
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .filter(|(_, ca)| ca.subject().as_raw() == leaf.issuer().as_raw())
            .any(|(_, ca)| eku_oids(&ca).is_some_and(|o| o.iter().any(|s| s == BROADWORKS_OID)))
    }
}

/// The webpki EKU hook that lets every EKU through, so the policy decides.
struct AnyEku;

impl ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        // Still walk the list: a malformed EKU extension is a bad encoding, not an accept.
        for id in iter {
            id?;
        }
        Ok(())
    }
}

fn map_webpki_error(
    e: webpki::Error,
    leaf: &X509Certificate<'_>,
    leaf_der: &[u8],
    ca_certs: &[CertificateDer<'_>],
) -> Refusal {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => Refusal::Expired {
            not_after: time_text(leaf.validity().not_after.timestamp()),
        },
        E::CertNotValidYet { .. } => Refusal::NotYetValid {
            not_before: time_text(leaf.validity().not_before.timestamp()),
        },
        E::CertRevoked => Refusal::Revoked {
            serial: leaf.raw_serial_as_string(),
        },
        E::UnknownIssuer => {
            let in_bundle = ca_certs.iter().any(|c| c.as_ref() == leaf_der);
            if leaf.subject().as_raw() == leaf.issuer().as_raw() && !in_bundle {
                Refusal::SelfSigned {
                    subject: leaf.subject().to_string(),
                }
            } else {
                Refusal::UnknownCa {
                    issuer: leaf.issuer().to_string(),
                }
            }
        }
        E::BadDer | E::BadDerTime | E::TrailingData(_) => Refusal::BadEncoding {
            detail: format!("{e:?}"),
        },
        other => Refusal::InvalidChain {
            detail: format!("{other:?}"),
        },
    }
}

/// The rules that look at the leaf alone: validity, EKU, SAN and CN. `certs inspect` reports
/// these as the verdict of a certificate without its chain.
pub fn leaf_refusals(
    cert: &X509Certificate<'_>,
    config: &ClientPolicyConfig,
    now: SystemTime,
) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let validity = cert.validity();
    if now_s > validity.not_after.timestamp() {
        refusals.push(Refusal::Expired {
            not_after: time_text(validity.not_after.timestamp()),
        });
    }
    if now_s < validity.not_before.timestamp() {
        refusals.push(Refusal::NotYetValid {
            not_before: time_text(validity.not_before.timestamp()),
        });
    }
    match eku_oids(cert) {
        None if config.require_broadworks_oid || config.require_client_auth => {
            refusals.push(Refusal::NoEku)
        }
        None => {}
        Some(oids) => {
            if config.require_broadworks_oid && !oids.iter().any(|o| o == BROADWORKS_OID) {
                let vendor: Vec<&str> = oids
                    .iter()
                    .map(String::as_str)
                    .filter(|o| o.starts_with(ENTERPRISE_ARC))
                    .collect();
                if vendor.is_empty() {
                    refusals.push(Refusal::MissingBroadWorksOid);
                } else {
                    refusals.push(Refusal::WrongVendorOid {
                        found: vendor.join(", "),
                    });
                }
            }
            if config.require_client_auth && !oids.iter().any(|o| o == CLIENT_AUTH_OID) {
                refusals.push(Refusal::MissingClientAuth);
            }
        }
    }
    if !config.allow_san {
        let sans = subject_alt_names(cert);
        if !sans.is_empty() {
            refusals.push(Refusal::SanPresent {
                sans: sans.join(", "),
            });
        }
    }
    if !config.allowed_common_names.is_empty() {
        let cn = common_name(cert);
        let allowed = cn
            .as_deref()
            .is_some_and(|cn| cn_allowed(cn, &config.allowed_common_names));
        if !allowed {
            refusals.push(Refusal::CommonNameNotAllowed {
                cn: cn.unwrap_or_else(|| "(no CN)".to_owned()),
            });
        }
    }
    refusals
}

/// Exact (case-insensitive) or `*.suffix`; `*.example.com` matches `a.example.com` and
/// `a.b.example.com` but not `example.com` itself.
pub fn cn_allowed(cn: &str, patterns: &[String]) -> bool {
    let cn = cn.to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        match p.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => {
                cn.len() > suffix.len() && cn.ends_with(suffix)
            }
            _ => cn == p,
        }
    })
}

/// The EKU OIDs as dotted strings, or `None` without the extension (or with a malformed one,
/// which the chain check reports as a bad encoding).
pub fn eku_oids(cert: &X509Certificate<'_>) -> Option<Vec<String>> {
    let eku = cert.extended_key_usage().ok()??.value;
    let mut oids = Vec::new();
    let named = [
        (eku.any, "2.5.29.37.0"),
        (eku.server_auth, "1.3.6.1.5.5.7.3.1"),
        (eku.client_auth, CLIENT_AUTH_OID),
        (eku.code_signing, "1.3.6.1.5.5.7.3.3"),
        (eku.email_protection, "1.3.6.1.5.5.7.3.4"),
        (eku.time_stamping, "1.3.6.1.5.5.7.3.8"),
        (eku.ocsp_signing, "1.3.6.1.5.5.7.3.9"),
    ];
    for (present, oid) in named {
        if present {
            oids.push(oid.to_owned());
        }
    }
    oids.extend(eku.other.iter().map(|o| o.to_id_string()));
    Some(oids)
}

/// SAN entries as `DNS:name`, `IP:addr`, … (empty when there is no SAN extension).
pub fn subject_alt_names(cert: &X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(general_name_text)
            .collect(),
        _ => Vec::new(),
    }
}

/// A SAN entry the way `openssl x509 -text` writes it.
fn general_name_text(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(n) => format!("DNS:{n}"),
        GeneralName::RFC822Name(n) => format!("email:{n}"),
        GeneralName::URI(n) => format!("URI:{n}"),
        GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
            Ok(v4) => format!("IP:{}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*b) {
                Ok(v6) => format!("IP:{}", std::net::Ipv6Addr::from(v6)),
                Err(_) => format!("IP:{}", hex::encode(b)),
            },
        },
        other => other.to_string(),
    }
}

/// A Unix timestamp as RFC 3339 UTC.
pub fn time_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("@{unix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cn_patterns() {
        let p = vec![
            "bwcticlient.webex.com".to_owned(),
            "*.as.example".to_owned(),
        ];
        assert!(cn_allowed("bwcticlient.webex.com", &p));
        assert!(cn_allowed("BWCTIclient.webex.com", &p));
        assert!(cn_allowed("as1.as.example", &p));
        assert!(cn_allowed("a.b.as.example", &p));
        assert!(!cn_allowed("as.example", &p));
        assert!(!cn_allowed("evilas.example", &p));
        assert!(!cn_allowed("bwcticlient.webex.com.evil", &p));
    }

    #[test]
    fn labels_are_distinct() {
        let all = [
            Refusal::NoCertificate,
            Refusal::Expired {
                not_after: String::new(),
            },
            Refusal::NotYetValid {
                not_before: String::new(),
            },
            Refusal::UnknownCa {
                issuer: String::new(),
            },
            Refusal::SelfSigned {
                subject: String::new(),
            },
            Refusal::MissingBroadWorksOid,
            Refusal::BroadWorksOidOnlyOnCa,
            Refusal::WrongVendorOid {
                found: String::new(),
            },
            Refusal::MissingClientAuth,
            Refusal::NoEku,
            Refusal::SanPresent {
                sans: String::new(),
            },
            Refusal::CommonNameNotAllowed { cn: String::new() },
            Refusal::Revoked {
                serial: String::new(),
            },
            Refusal::BadEncoding {
                detail: String::new(),
            },
            Refusal::InvalidChain {
                detail: String::new(),
            },
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(Refusal::label).collect();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn empty_chain_is_no_certificate_and_garbage_is_bad_encoding() {
        let pki = crate::certs::DevPki::in_memory().unwrap();
        let policy = ClientPolicy::new(
            ClientPolicyConfig::default(),
            vec![pki.ca.cert.cert_der.clone()],
            &[],
        )
        .unwrap();
        assert_eq!(
            policy.check(&[], SystemTime::now()),
            Err(vec![Refusal::NoCertificate])
        );
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = policy.check(&[junk], SystemTime::now()).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].label(), "bad_encoding");
        let id = policy
            .check(
                std::slice::from_ref(&pki.client.cert_der),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(id.common_name.as_deref(), Some("bwcticlient.webex.com"));
        assert_eq!(id.sha256_fingerprint.len(), 64);
    }

    #[test]
    fn empty_bundle_refused() {
        assert_eq!(
            ClientPolicy::new(ClientPolicyConfig::default(), vec![], &[]).unwrap_err(),
            PolicyError::EmptyCaBundle
        );
    }
}
