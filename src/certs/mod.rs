//! Certificate tooling: an internal CA, server and BroadWorks client certificates, CSRs, CRLs and
//! inspection. The CLI (`flowthrough certs`), the sandbox and tests all mint certificates here.

mod inspect;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

pub use inspect::{CertReport, RefusalReport, inspect};
pub use rcgen::ExtendedKeyUsagePurpose;

use crate::secret::Secret;

/// The BroadWorks client EKU OID as rcgen components.
pub const BROADWORKS_OID_ARCS: [u64; 13] = [1, 3, 6, 1, 4, 1, 6431, 1, 1, 8, 2, 1, 3];

/// The BroadWorks client EKU purpose.
pub fn broadworks_eku() -> ExtendedKeyUsagePurpose {
    ExtendedKeyUsagePurpose::Other(BROADWORKS_OID_ARCS.to_vec())
}

/// Default CN of the BroadWorks client certificate in the Webex deployment.
pub const DEFAULT_CLIENT_CN: &str = "bwcticlient.webex.com";

/// What went wrong while making, reading or writing certificates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertsError {
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error("cannot generate the {what}: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("{}: cannot use the CA: {reason}; create one with `flowthrough certs ca --cn NAME --out {}`", dir.display(), dir.display())]
    BadCa { dir: PathBuf, reason: String },
    #[error(
        "\"{0}\" is not a serial number; write it in hex as `certs inspect` prints it (e.g. 1a:2b:3c or 1a2b3c)"
    )]
    BadSerial(String),
    #[error("{0}")]
    Parse(String),
}

fn gen_err(what: &'static str) -> impl Fn(rcgen::Error) -> CertsError {
    move |e| CertsError::Generate {
        what,
        reason: e.to_string(),
    }
}

/// Key algorithm and size of a new key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    pub const NAMES: [&'static str; 5] =
        ["ecdsa-p256", "ecdsa-p384", "rsa2048", "rsa3072", "rsa4096"];

    /// Generate a key. ring cannot generate RSA keys, so those come from the `rsa` crate as
    /// PKCS#8 and are loaded into rcgen.
    pub fn generate(self) -> Result<KeyPair, CertsError> {
        let rsa_bits = match self {
            KeyType::EcdsaP256 => {
                return KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(gen_err("key"));
            }
            KeyType::EcdsaP384 => {
                return KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                    .map_err(gen_err("key"));
            }
            KeyType::Rsa2048 => 2048,
            KeyType::Rsa3072 => 3072,
            KeyType::Rsa4096 => 4096,
        };
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, rsa_bits).map_err(|e| {
            CertsError::Generate {
                what: "RSA key",
                reason: e.to_string(),
            }
        })?;
        let pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| CertsError::Generate {
                what: "RSA key",
                reason: e.to_string(),
            })?;
        KeyPair::from_pem(&pem).map_err(gen_err("RSA key"))
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "ecdsa-p256" => KeyType::EcdsaP256,
            "ecdsa-p384" => KeyType::EcdsaP384,
            "rsa2048" => KeyType::Rsa2048,
            "rsa3072" => KeyType::Rsa3072,
            "rsa4096" => KeyType::Rsa4096,
            _ => {
                return Err(format!(
                    "unknown key type \"{s}\"; use one of: {}",
                    KeyType::NAMES.join(", ")
                ));
            }
        })
    }
}

/// A file to write: its name inside the output directory and whether it is a private key.
#[derive(Clone)]
pub struct OutFile {
    pub name: String,
    pub contents: Secret,
    pub private: bool,
}

impl OutFile {
    fn public(name: String, contents: String) -> OutFile {
        OutFile {
            name,
            contents: Secret::new(contents),
            private: false,
        }
    }
}

/// A certificate and its private key (`Debug` shows the key as redacted).
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: Secret,
    /// Hex, colon-separated, as `certs inspect` and `openssl x509 -serial` show it.
    pub serial: String,
}

impl Issued {
    /// `<stem>.pem` and `<stem>.key`.
    pub fn files(&self, stem: &str) -> Vec<OutFile> {
        vec![
            OutFile::public(format!("{stem}.pem"), self.cert_pem.clone()),
            OutFile {
                name: format!("{stem}.key"),
                contents: self.key_pem.clone(),
                private: true,
            },
        ]
    }
}

/// A CA able to sign: its certificate and key.
pub struct Ca {
    pub cert: Issued,
    key: KeyPair,
}

impl Ca {
    /// Load `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, CertsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| CertsError::BadCa {
                dir: dir.to_owned(),
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        let cert_pem = read("ca.pem")?;
        let key_pem = Secret::new(read("ca.key")?);
        let bad = |reason: String| CertsError::BadCa {
            dir: dir.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| bad(format!("ca.key: {e}")))?;
        let cert_der = crate::tls::parse_certs(cert_pem.as_bytes())
            .map_err(|e| bad(format!("ca.pem: {e:?}")))?
            .remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad(format!("ca.pem: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("ca.key does not belong to ca.pem".to_owned()));
        }
        let serial = parsed.raw_serial_as_string();
        Ok(Ca {
            cert: Issued {
                cert_pem,
                cert_der,
                key_pem,
                serial,
            },
            key,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CertsError> {
        Issuer::from_ca_cert_der(&self.cert.cert_der, &self.key).map_err(gen_err("issuer"))
    }

    /// `ca.pem` and `ca.key`.
    pub fn files(&self) -> Vec<OutFile> {
        self.cert.files("ca")
    }
}

/// Parameters of a CA certificate.
#[derive(Debug, Clone)]
pub struct CaParams {
    pub cn: String,
    pub days: u32,
    /// `None`: no path length constraint.
    pub pathlen: Option<u8>,
    pub key_type: KeyType,
    /// Usually empty; tests set the BroadWorks OID here for the "OID only on the CA" case.
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
}

impl CaParams {
    pub fn new(cn: impl Into<String>) -> CaParams {
        CaParams {
            cn: cn.into(),
            days: 3650,
            pathlen: Some(1),
            key_type: KeyType::default(),
            extended_key_usages: Vec::new(),
        }
    }
}

/// Parameters of a leaf certificate: server or client, every knob open for tests.
#[derive(Debug, Clone)]
pub struct LeafParams {
    pub cn: Option<String>,
    /// DNS names or IP addresses.
    pub sans: Vec<String>,
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub key_type: KeyType,
}

impl LeafParams {
    /// A server certificate for `names` (DNS or IP), EKU serverAuth, valid `days` from now.
    pub fn server(names: &[String], days: u32) -> LeafParams {
        LeafParams {
            cn: names.first().cloned(),
            sans: names.to_vec(),
            extended_key_usages: vec![ExtendedKeyUsagePurpose::ServerAuth],
            ..LeafParams::validity(days)
        }
    }

    /// A BroadWorks client certificate: CN `cn`, EKU BroadWorks OID + clientAuth, no SAN.
    pub fn broadworks_client(cn: impl Into<String>, days: u32) -> LeafParams {
        LeafParams {
            cn: Some(cn.into()),
            extended_key_usages: vec![broadworks_eku(), ExtendedKeyUsagePurpose::ClientAuth],
            ..LeafParams::validity(days)
        }
    }

    fn validity(days: u32) -> LeafParams {
        let now = OffsetDateTime::now_utc();
        LeafParams {
            cn: None,
            sans: Vec::new(),
            extended_key_usages: Vec::new(),
            // An hour back so a peer whose clock runs slightly behind still accepts it.
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
            key_type: KeyType::default(),
        }
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so every tool prints it the same way.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn serial_text(serial: &SerialNumber) -> String {
    serial
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse a serial written in hex, with or without colons (or a `0x` prefix).
pub fn parse_serial(text: &str) -> Result<SerialNumber, CertsError> {
    let clean: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let padded = if clean.len() % 2 == 1 {
        format!("0{clean}")
    } else {
        clean
    };
    match hex::decode(&padded) {
        Ok(bytes) if !bytes.is_empty() => Ok(SerialNumber::from_slice(&bytes)),
        _ => Err(CertsError::BadSerial(text.to_owned())),
    }
}

fn ca_params(p: &CaParams) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, p.cn.as_str());
    params.is_ca = IsCa::Ca(match p.pathlen {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = p.extended_key_usages.clone();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(p.days));
    params.serial_number = Some(random_serial());
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn finish(params: &CertificateParams, key: &KeyPair, cert: rcgen::Certificate) -> Issued {
    Issued {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_pem: Secret::new(key.serialize_pem()),
        serial: params
            .serial_number
            .as_ref()
            .map(serial_text)
            .unwrap_or_default(),
    }
}

/// A new self-signed root CA.
pub fn new_ca(p: &CaParams) -> Result<Ca, CertsError> {
    let key = p.key_type.generate()?;
    let params = ca_params(p);
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;
    Ok(Ca {
        cert: finish(&params, &key, cert),
        key,
    })
}

/// An intermediate CA signed by `parent`.
pub fn issue_intermediate(parent: &Ca, p: &CaParams) -> Result<Ca, CertsError> {
    let key = p.key_type.generate()?;
    let mut params = ca_params(p);
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &parent.issuer()?)
        .map_err(gen_err("intermediate CA certificate"))?;
    Ok(Ca {
        cert: finish(&params, &key, cert),
        key,
    })
}

/// A leaf certificate signed by `ca`.
pub fn issue_leaf(ca: &Ca, p: &LeafParams) -> Result<Issued, CertsError> {
    let key = p.key_type.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = &p.cn {
        params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str());
    }
    params.subject_alt_names = p.sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if matches!(
        p.key_type,
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096
    ) {
        // TLS 1.2 RSA key exchange suites need it; harmless otherwise.
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.extended_key_usages = p.extended_key_usages.clone();
    params.not_before = p.not_before;
    params.not_after = p.not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &ca.issuer()?)
        .map_err(gen_err("certificate"))?;
    Ok(finish(&params, &key, cert))
}

fn san(name: &str) -> Result<SanType, CertsError> {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => name
            .to_owned()
            .try_into()
            .map(SanType::DnsName)
            .map_err(|_| {
                CertsError::Parse(format!(
                    "\"{name}\" is neither a DNS name nor an IP address"
                ))
            }),
    }
}

/// Parameters of a CSR for an external CA.
#[derive(Debug, Clone)]
pub struct CsrParams {
    pub cn: String,
    /// Request the BroadWorks OID and clientAuth in the extension request.
    pub broadworks_client: bool,
    pub dns: Vec<String>,
    pub key_type: KeyType,
}

/// A key and a PEM CSR for it.
pub fn make_csr(p: &CsrParams) -> Result<(String, Secret), CertsError> {
    let key = p.key_type.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, p.cn.as_str());
    params.subject_alt_names = p.dns.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    if p.broadworks_client {
        params.extended_key_usages = vec![broadworks_eku(), ExtendedKeyUsagePurpose::ClientAuth];
    }
    let csr = params.serialize_request(&key).map_err(gen_err("CSR"))?;
    let pem = csr.pem().map_err(gen_err("CSR"))?;
    Ok((pem, Secret::new(key.serialize_pem())))
}

/// A CRL signed by `ca` revoking `serials` (hex), valid `days` from now. The CRL number is the
/// current Unix time, so each new CRL supersedes the previous one.
pub fn make_crl(ca: &Ca, serials: &[String], days: u32) -> Result<String, CertsError> {
    let now = OffsetDateTime::now_utc();
    let revoked_certs = serials
        .iter()
        .map(|s| {
            Ok(RevokedCertParams {
                serial_number: parse_serial(s)?,
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, CertsError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(i64::from(days.max(1))),
        crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer()?).map_err(gen_err("CRL"))?;
    crl.pem().map_err(gen_err("CRL"))
}

/// Write `files` into `dir` (created if missing). Nothing is written when any target exists and
/// `force` is off; keys get mode 0600. Returns the written paths in order.
pub fn write_files(dir: &Path, files: &[OutFile], force: bool) -> Result<Vec<PathBuf>, CertsError> {
    let io = |path: &Path, e: std::io::Error| CertsError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.name)).collect();
    if let Some(existing) = paths.iter().find(|p| !force && p.exists()) {
        return Err(CertsError::Exists {
            path: existing.clone(),
        });
    }
    for (file, path) in files.iter().zip(&paths) {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if file.private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut out = options.open(path).map_err(|e| io(path, e))?;
        #[cfg(unix)]
        if file.private {
            // `mode` only applies to new files; an overwritten key keeps no wider permissions.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io(path, e))?;
        }
        out.write_all(file.contents.expose().as_bytes())
            .map_err(|e| io(path, e))?;
        // A CA key that reached only the page cache is gone after a power cut, while the
        // certificates it signed may already be deployed: nothing could sign their successors.
        out.sync_all().map_err(|e| io(path, e))?;
    }
    sync_dir(dir).map_err(|e| io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent).map_err(|e| io(parent, e))?;
    }
    Ok(paths)
}

/// Make the names of the files created in `dir` durable: a file's own fsync does not cover its
/// directory entry.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A ready-made development PKI: a CA, a server certificate for localhost/127.0.0.1/::1 and a
/// good BroadWorks client certificate. Used by `sandbox`, the simulator and tests.
pub struct DevPki {
    pub ca: Ca,
    pub server: Issued,
    pub client: Issued,
}

/// Where [`DevPki::write`] put its files.
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevPki {
    pub fn in_memory() -> Result<DevPki, CertsError> {
        let ca = new_ca(&CaParams::new("flowthrough development CA"))?;
        let names = ["localhost", "127.0.0.1", "::1"].map(str::to_owned);
        let server = issue_leaf(&ca, &LeafParams::server(&names, 365))?;
        let client = issue_leaf(&ca, &LeafParams::broadworks_client(DEFAULT_CLIENT_CN, 365))?;
        Ok(DevPki { ca, server, client })
    }

    /// Generate and write to `dir` (overwriting: a development PKI is disposable).
    pub fn generate(dir: &Path) -> Result<(DevPki, DevPkiFiles), CertsError> {
        let pki = DevPki::in_memory()?;
        let mut files = pki.ca.files();
        files.extend(pki.server.files("server"));
        files.extend(pki.client.files("client"));
        write_files(dir, &files, true)?;
        let paths = DevPkiFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        Ok((pki, paths))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_round_trip() {
        let s = random_serial();
        let text = serial_text(&s);
        assert_eq!(parse_serial(&text).unwrap(), s);
        assert_eq!(parse_serial(&text.replace(':', "")).unwrap(), s);
        assert!(parse_serial("zz").is_err());
        assert!(parse_serial("").is_err());
    }

    #[test]
    fn key_types_parse() {
        for name in KeyType::NAMES {
            assert!(name.parse::<KeyType>().is_ok());
        }
        assert!("dsa".parse::<KeyType>().unwrap_err().contains("ecdsa-p256"));
    }

    #[test]
    fn write_refuses_overwrite_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::in_memory().unwrap();
        let files = pki.client.files("client");
        let written = write_files(dir.path(), &files, false).unwrap();
        assert_eq!(written.len(), 2);
        let err = write_files(dir.path(), &files, false).unwrap_err();
        assert!(matches!(err, CertsError::Exists { .. }));
        assert!(err.to_string().contains("--force"));
        write_files(dir.path(), &files, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("client.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn ca_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, paths) = DevPki::generate(dir.path()).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        assert_eq!(ca.cert.cert_der, pki.ca.cert.cert_der);
        assert!(paths.client_key.exists());
        // A key that does not belong to the certificate is refused.
        std::fs::copy(&paths.server_key, &paths.ca_key).unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CertsError::BadCa { .. })
        ));
    }

    #[test]
    fn rsa_keys_work() {
        let key = KeyType::Rsa2048.generate().unwrap();
        assert!(key.serialize_pem().contains("BEGIN PRIVATE KEY"));
    }
}
