//! The rustls server configuration of the client-authenticated listeners: loads and validates the
//! whole certificate set, and plugs [`ClientPolicy`] in as the client-certificate verifier.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use super::policy::{ClientPolicy, PolicyRefusal, Refusal, time_text};
use crate::config::{ClientPolicyConfig, ServerConfig as ServerSection};

/// Called once per refusal, e.g. to log it and count it under `label()`.
pub type Observer = Arc<dyn Fn(&Refusal) + Send + Sync>;

/// Why a certificate set cannot be loaded. Each message names the file and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {reason}; check the path in the config and the file permissions", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}: no certificate found; expected PEM (-----BEGIN CERTIFICATE-----) or DER", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate {index} cannot be parsed: {reason}; replace the file with a valid certificate", path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: no usable private key found: {reason}; expected a PKCS#8, PKCS#1 or SEC1 PEM key", path.display())]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("{}: the private key does not match the certificate in {}; install the key that was generated with this certificate", key.display(), certificate.display())]
    KeyMismatch { certificate: PathBuf, key: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadCaBundle { path: PathBuf, reason: String },
    #[error("{}: cannot parse the CRL: {reason}; fetch a fresh CRL from its CA (PEM or DER)", path.display())]
    BadCrl { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {reason}")]
    Rustls { reason: String },
}

/// A freshly loaded, fully validated TLS set. Loading has no side effects, so a reload simply
/// loads again and swaps `config` in.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    pub config: Arc<ServerConfig>,
    pub policy: Arc<ClientPolicy>,
    /// Problems worth a log line and a metric that do not stop the set (e.g. an expired CRL).
    pub warnings: Vec<String>,
    /// Each configured CRL and its nextUpdate (for the CRL-age metric).
    pub crl_next_updates: Vec<(PathBuf, Option<SystemTime>)>,
}

/// Build the rustls server configuration of `server` with the client policy `policy_cfg`.
pub fn server_config(
    server: &ServerSection,
    policy_cfg: &ClientPolicyConfig,
    observer: Observer,
) -> Result<LoadedTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_cert_file(&server.certificate)?;
    let key_bytes = read_file(&server.private_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::BadPrivateKey {
        path: server.private_key.clone(),
        reason: e.to_string(),
    })?;
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadPrivateKey {
                path: server.private_key.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        certificate: server.certificate.clone(),
        key: server.private_key.clone(),
    })?;

    let ca_certs = read_cert_file(&server.client_ca).map_err(|e| match e {
        TlsError::NoCertificate { path } => TlsError::BadCaBundle {
            path,
            reason: "the client CA bundle holds no certificate; put the CA that issued the AS client certificate there (PEM)".to_owned(),
        },
        other => other,
    })?;
    let mut warnings = Vec::new();
    let mut crl_next_updates = Vec::new();
    let mut crls = Vec::new();
    let now = SystemTime::now();
    for path in &server.crls {
        let der = read_crl_file(path)?;
        let next = crl_next_update(&der).map_err(|reason| TlsError::BadCrl {
            path: path.clone(),
            reason,
        })?;
        if let Some(next) = next
            && next < now
        {
            let unix = next
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            warnings.push(format!(
                "{}: the CRL expired (nextUpdate {}); it is still applied, but publish a fresh one",
                path.display(),
                time_text(unix)
            ));
        }
        crl_next_updates.push((path.clone(), next));
        crls.push(der);
    }
    let policy = ClientPolicy::new(policy_cfg.clone(), ca_certs, &crls).map_err(|e| match e {
        super::policy::PolicyError::BadCrl { index, reason } => TlsError::BadCrl {
            path: server.crls.get(index - 1).cloned().unwrap_or_default(),
            reason,
        },
        other => TlsError::BadCaBundle {
            path: server.client_ca.clone(),
            reason: format!("{other}; fix the bundle (PEM CA certificates)"),
        },
    })?;
    let policy = Arc::new(policy);
    let verifier = Arc::new(PolicyVerifier::new(
        policy.clone(),
        observer,
        provider.clone(),
    ));

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls {
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if server.session_resumption {
        config.session_storage = ServerSessionMemoryCache::new(1024);
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Rustls {
            reason: e.to_string(),
        })?;
    } else {
        // A resumed session skips certificate verification, so revocation would not bite.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(LoadedTls {
        config: Arc::new(config),
        policy,
        warnings,
        crl_next_updates,
    })
}

/// The refusals carried by a failed handshake: those of the policy, or `NoCertificate` when the
/// client sent none (rustls refuses that before the verifier runs).
pub fn refusals_in(err: &rustls::Error) -> Vec<Refusal> {
    match err {
        rustls::Error::NoCertificatesPresented => vec![Refusal::NoCertificate],
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<PolicyRefusal>()
            .map(|p| p.0.clone())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Like [`refusals_in`] for the `io::Error` that tokio-rustls' accept returns.
pub fn refusals_in_io(err: &std::io::Error) -> Vec<Refusal> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(refusals_in)
        .unwrap_or_default()
}

/// [`ClientPolicy`] as a rustls client-certificate verifier.
pub struct PolicyVerifier {
    policy: Arc<ClientPolicy>,
    observer: Observer,
    provider: Arc<CryptoProvider>,
    root_hints: Vec<DistinguishedName>,
}

impl fmt::Debug for PolicyVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyVerifier")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl PolicyVerifier {
    pub fn new(
        policy: Arc<ClientPolicy>,
        observer: Observer,
        provider: Arc<CryptoProvider>,
    ) -> PolicyVerifier {
        let root_hints = policy
            .ca_certs()
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| DistinguishedName::from(c.subject().as_raw().to_vec()))
            .collect();
        PolicyVerifier {
            policy,
            observer,
            provider,
            root_hints,
        }
    }
}

impl ClientCertVerifier for PolicyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let at = UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        match self.policy.check(&chain, at) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(refusals) => {
                for r in &refusals {
                    (self.observer)(r);
                }
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(PolicyRefusal(refusals))),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// All certificates of a PEM bundle or a single DER certificate, each checked to parse.
pub fn read_cert_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    parse_certs(&bytes).map_err(|e| match e {
        CertsParseError::Empty => TlsError::NoCertificate {
            path: path.to_owned(),
        },
        CertsParseError::Bad { index, reason } => TlsError::BadCertificate {
            path: path.to_owned(),
            index,
            reason,
        },
    })
}

/// Why bytes did not yield certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertsParseError {
    Empty,
    /// `index` counts from 1.
    Bad {
        index: usize,
        reason: String,
    },
}

/// Certificates from PEM (any number, other PEM sections ignored) or one DER certificate; each
/// one is parsed so a broken certificate is reported here, not at the first handshake.
pub fn parse_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertsParseError> {
    let certs: Vec<CertificateDer<'static>> = if looks_like_pem(bytes) {
        CertificateDer::pem_slice_iter(bytes)
            .enumerate()
            .map(|(i, c)| {
                c.map_err(|e| CertsParseError::Bad {
                    index: i + 1,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?
    } else if bytes.is_empty() {
        Vec::new()
    } else {
        vec![CertificateDer::from(bytes.to_vec())]
    };
    if certs.is_empty() {
        return Err(CertsParseError::Empty);
    }
    for (i, c) in certs.iter().enumerate() {
        match x509_parser::parse_x509_certificate(c) {
            Ok(([], _)) => {}
            Ok(_) => {
                return Err(CertsParseError::Bad {
                    index: i + 1,
                    reason: "trailing bytes after the certificate".to_owned(),
                });
            }
            Err(e) => {
                return Err(CertsParseError::Bad {
                    index: i + 1,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(certs)
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// A CRL from a PEM or DER file.
pub fn read_crl_file(path: &Path) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    let der = if looks_like_pem(&bytes) {
        CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadCrl {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
    } else {
        CertificateRevocationListDer::from(bytes)
    };
    crl_next_update(&der).map_err(|reason| TlsError::BadCrl {
        path: path.to_owned(),
        reason,
    })?;
    Ok(der)
}

/// The CRL's nextUpdate, checking that it parses.
pub fn crl_next_update(der: &[u8]) -> Result<Option<SystemTime>, String> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| e.to_string())?;
    Ok(crl.next_update().map(|t| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    }))
}
