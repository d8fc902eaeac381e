//! The client-certificate policy over real TLS handshakes on loopback: a tokio-rustls server with
//! `tls::server_config`, a tokio-rustls client presenting each kind of certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowthrough::certs::{
    self, BROADWORKS_OID_ARCS, Ca, CaParams, DevPki, ExtendedKeyUsagePurpose, Issued, LeafParams,
};
use flowthrough::config::{ClientPolicyConfig, ServerConfig};
use flowthrough::tls::{self, ClientIdentity, LoadedTls, Refusal, TlsError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIMIT: Duration = Duration::from_secs(20);

struct Server {
    tls: LoadedTls,
    observed: Arc<Mutex<Vec<Refusal>>>,
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn server_section(
    dir: &Path,
    pki: &DevPki,
    bundle: &str,
    crls: &[PathBuf],
    resumption: bool,
) -> ServerConfig {
    let cert = write(dir, "server.pem", &pki.server.cert_pem);
    let key = write(dir, "server.key", pki.server.key_pem.expose());
    let ca = write(dir, "bundle.pem", bundle);
    let crls: Vec<String> = crls
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let text = format!(
        "certificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\ncrls = [{}]\nsession_resumption = {resumption}\n",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string(),
        crls.join(", ")
    );
    toml::from_str(&text).unwrap()
}

fn start(section: &ServerConfig, policy: &ClientPolicyConfig) -> Server {
    let observed = Arc::new(Mutex::new(Vec::new()));
    let sink = observed.clone();
    let tls = tls::server_config(
        section,
        policy,
        Arc::new(move |r: &Refusal| sink.lock().unwrap().push(r.clone())),
    )
    .unwrap();
    Server { tls, observed }
}

/// `ca` is the CA the client trusts for the server certificate.
fn client_config(ca: &Ca, presented: Option<&[&Issued]>, tls12_only: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.cert_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let config = match presented {
        None => builder.with_no_client_auth(),
        Some(chain) => {
            let certs: Vec<CertificateDer<'static>> =
                chain.iter().map(|i| i.cert_der.clone()).collect();
            let key = PrivateKeyDer::from_pem_slice(chain[0].key_pem.expose().as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    Arc::new(config)
}

struct Outcome {
    server: Result<ClientIdentity, Vec<Refusal>>,
    observed: Vec<Refusal>,
    client_kind: Option<HandshakeKind>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
}

async fn handshake(server: &Server, client: Arc<ClientConfig>) -> Outcome {
    server.observed.lock().unwrap().clear();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.tls.config.clone());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut stream) => {
                let (_, conn) = stream.get_ref();
                let id = tls::identity(conn.peer_certificates().unwrap_or_default());
                let version = conn.protocol_version();
                let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                stream.write_all(b"ok").await.unwrap();
                stream.shutdown().await.ok();
                Ok((id.unwrap(), version, alpn))
            }
            Err(e) => Err(tls::refusals_in_io(&e)),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(client);
    let client_kind = match connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    {
        Ok(mut stream) => {
            let mut buf = Vec::new();
            // Reading processes TLS 1.3 session tickets too (when the server sends any).
            let _ = stream.read_to_end(&mut buf).await;
            stream.get_ref().1.handshake_kind()
        }
        Err(_) => None,
    };
    let result = tokio::time::timeout(LIMIT, server_side)
        .await
        .unwrap()
        .unwrap();
    let observed = server.observed.lock().unwrap().clone();
    match result {
        Ok((id, version, alpn)) => Outcome {
            server: Ok(id),
            observed,
            client_kind,
            version,
            alpn,
        },
        Err(refusals) => Outcome {
            server: Err(refusals),
            observed,
            client_kind,
            version: None,
            alpn: None,
        },
    }
}

fn leaf(ca: &Ca, cn: &str, ekus: Vec<ExtendedKeyUsagePurpose>) -> Issued {
    let mut p = LeafParams::broadworks_client(cn, 30);
    p.extended_key_usages = ekus;
    certs::issue_leaf(ca, &p).unwrap()
}

fn oid() -> ExtendedKeyUsagePurpose {
    certs::broadworks_eku()
}

/// Assert the handshake was refused with exactly `expected`, seen both by the observer and in the
/// error the accept loop gets.
async fn assert_refused(server: &Server, ca: &Ca, chain: &[&Issued], expected: &str) {
    let outcome = handshake(server, client_config(ca, Some(chain), false)).await;
    let refusals = outcome.server.expect_err("handshake must be refused");
    let labels: Vec<&str> = refusals.iter().map(Refusal::label).collect();
    assert_eq!(labels, [expected], "{refusals:?}");
    assert_eq!(
        outcome.observed, refusals,
        "the observer sees what the error carries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::in_memory().unwrap();
    // A second trusted CA that carries the BroadWorks OID itself (the "OID only on the CA" case).
    let mut oid_ca_params = CaParams::new("CA with the BroadWorks OID");
    oid_ca_params.extended_key_usages = vec![oid(), ExtendedKeyUsagePurpose::ClientAuth];
    let oid_ca = certs::new_ca(&oid_ca_params).unwrap();
    let bundle = format!("{}{}", pki.ca.cert.cert_pem, oid_ca.cert.cert_pem);
    let section = server_section(dir.path(), &pki, &bundle, &[], false);
    let server = start(&section, &ClientPolicyConfig::default());
    assert!(server.tls.warnings.is_empty());
    let ca = &pki.ca;

    // Good: accepted, and the server side sees the identity.
    let outcome = handshake(&server, client_config(ca, Some(&[&pki.client]), false)).await;
    let id = outcome.server.expect("good certificate accepted");
    assert_eq!(id.common_name.as_deref(), Some("bwcticlient.webex.com"));
    assert_eq!(id.subject, "CN=bwcticlient.webex.com");
    assert_eq!(id.serial, pki.client.serial);
    assert!(outcome.observed.is_empty());
    assert_eq!(outcome.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(outcome.alpn, None, "the client offered no ALPN");

    // TLS 1.2 works too.
    let outcome = handshake(&server, client_config(ca, Some(&[&pki.client]), true)).await;
    assert!(outcome.server.is_ok());
    assert_eq!(outcome.version, Some(ProtocolVersion::TLSv1_2));

    // No client certificate.
    let outcome = handshake(&server, client_config(ca, None, false)).await;
    assert_eq!(outcome.server.unwrap_err(), vec![Refusal::NoCertificate]);

    // Validity.
    let now = time::OffsetDateTime::now_utc();
    let mut p = LeafParams::broadworks_client("bwcticlient.webex.com", 30);
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    assert_refused(
        &server,
        ca,
        &[&certs::issue_leaf(ca, &p).unwrap()],
        "expired",
    )
    .await;
    p.not_before = now + time::Duration::days(1);
    p.not_after = now + time::Duration::days(10);
    assert_refused(
        &server,
        ca,
        &[&certs::issue_leaf(ca, &p).unwrap()],
        "not_yet_valid",
    )
    .await;

    // Wrong CA, self-signed.
    let stranger = certs::new_ca(&CaParams::new("Some other CA")).unwrap();
    let foreign = leaf(
        &stranger,
        "bwcticlient.webex.com",
        vec![oid(), ExtendedKeyUsagePurpose::ClientAuth],
    );
    assert_refused(&server, ca, &[&foreign], "unknown_ca").await;
    let self_signed = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bwcticlient.webex.com");
        params.extended_key_usages = vec![oid(), ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: flowthrough::secret::Secret::new(key.serialize_pem()),
            serial: String::new(),
        }
    };
    assert_refused(&server, ca, &[&self_signed], "self_signed").await;

    // The EKU cases of SPEC §6, each with its own reason.
    let cn = "bwcticlient.webex.com";
    assert_refused(
        &server,
        ca,
        &[&leaf(ca, cn, vec![oid()])],
        "missing_client_auth",
    )
    .await;
    assert_refused(
        &server,
        ca,
        &[&leaf(ca, cn, vec![ExtendedKeyUsagePurpose::ClientAuth])],
        "missing_broadworks_oid",
    )
    .await;
    assert_refused(&server, ca, &[&leaf(ca, cn, vec![])], "no_eku").await;
    let mut wrong_vendor = BROADWORKS_OID_ARCS.to_vec();
    wrong_vendor[6] = 9999;
    assert_refused(
        &server,
        ca,
        &[&leaf(
            ca,
            cn,
            vec![
                ExtendedKeyUsagePurpose::Other(wrong_vendor),
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )],
        "wrong_vendor_oid",
    )
    .await;
    assert_refused(
        &server,
        ca,
        &[&leaf(
            &oid_ca,
            cn,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )],
        "broadworks_oid_only_on_ca",
    )
    .await;
    // The same CA's properly issued leaf passes: the refusal above is about the leaf.
    let outcome = handshake(
        &server,
        client_config(
            ca,
            Some(&[&leaf(
                &oid_ca,
                cn,
                vec![oid(), ExtendedKeyUsagePurpose::ClientAuth],
            )]),
            false,
        ),
    )
    .await;
    assert!(outcome.server.is_ok());

    // SAN and CN.
    let mut with_san = LeafParams::broadworks_client(cn, 30);
    with_san.sans = vec!["bwcticlient.webex.com".to_owned()];
    let with_san = certs::issue_leaf(ca, &with_san).unwrap();
    assert_refused(&server, ca, &[&with_san], "san_present").await;
    let other_cn = leaf(
        ca,
        "as1.as.example",
        vec![oid(), ExtendedKeyUsagePurpose::ClientAuth],
    );
    assert_refused(&server, ca, &[&other_cn], "common_name_not_allowed").await;

    // Several failures at once are all reported.
    let outcome = handshake(
        &server,
        client_config(ca, Some(&[&leaf(ca, "x.example", vec![])]), false),
    )
    .await;
    let labels: Vec<_> = outcome
        .server
        .unwrap_err()
        .iter()
        .map(Refusal::label)
        .collect();
    assert_eq!(labels, ["no_eku", "common_name_not_allowed"]);

    // A chain through an intermediate CA sent by the client.
    let intermediate = certs::issue_intermediate(ca, &CaParams::new("Intermediate CA")).unwrap();
    let via_intermediate = leaf(
        &intermediate,
        cn,
        vec![oid(), ExtendedKeyUsagePurpose::ClientAuth],
    );
    let outcome = handshake(
        &server,
        client_config(ca, Some(&[&via_intermediate, &intermediate.cert]), false),
    )
    .await;
    assert_eq!(outcome.server.unwrap().common_name.as_deref(), Some(cn));
    assert_refused(&server, ca, &[&via_intermediate], "unknown_ca").await;

    // Allowing SAN and a "*.suffix" CN lets those through.
    let lenient = ClientPolicyConfig {
        allow_san: true,
        allowed_common_names: vec![
            "bwcticlient.webex.com".to_owned(),
            "*.as.example".to_owned(),
        ],
        ..ClientPolicyConfig::default()
    };
    let lenient_server = start(&section, &lenient);
    for cert in [&with_san, &other_cn] {
        let outcome = handshake(&lenient_server, client_config(ca, Some(&[cert]), false)).await;
        assert!(outcome.server.is_ok());
    }
    assert_refused(
        &lenient_server,
        ca,
        &[&leaf(
            ca,
            "as.example",
            vec![oid(), ExtendedKeyUsagePurpose::ClientAuth],
        )],
        "common_name_not_allowed",
    )
    .await;

    // Revoked by a CRL; a certificate not on it still passes.
    let revoked = leaf(ca, cn, vec![oid(), ExtendedKeyUsagePurpose::ClientAuth]);
    let crl = write(
        dir.path(),
        "crl.pem",
        &certs::make_crl(ca, std::slice::from_ref(&revoked.serial), 7).unwrap(),
    );
    let crl_section = server_section(dir.path(), &pki, &bundle, std::slice::from_ref(&crl), false);
    let crl_server = start(&crl_section, &ClientPolicyConfig::default());
    assert_eq!(crl_server.tls.crl_next_updates.len(), 1);
    assert_eq!(crl_server.tls.crl_next_updates[0].0, crl);
    assert!(crl_server.tls.crl_next_updates[0].1.unwrap() > std::time::SystemTime::now());
    assert_refused(&crl_server, ca, &[&revoked], "revoked").await;
    assert!(
        handshake(&crl_server, client_config(ca, Some(&[&pki.client]), false))
            .await
            .server
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption_is_off_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::in_memory().unwrap();
    let client = client_config(&pki.ca, Some(&[&pki.client]), false);

    let section = server_section(dir.path(), &pki, &pki.ca.cert.cert_pem, &[], false);
    let server = start(&section, &ClientPolicyConfig::default());
    for _ in 0..2 {
        let outcome = handshake(&server, client.clone()).await;
        assert!(outcome.server.is_ok());
        assert_eq!(outcome.client_kind, Some(HandshakeKind::Full));
    }

    // The same client against a server with resumption on does resume: the check above can fail.
    let section = server_section(dir.path(), &pki, &pki.ca.cert.cert_pem, &[], true);
    let server = start(&section, &ClientPolicyConfig::default());
    let first = handshake(&server, client.clone()).await;
    assert_eq!(first.client_kind, Some(HandshakeKind::Full));
    let second = handshake(&server, client).await;
    assert_eq!(second.client_kind, Some(HandshakeKind::Resumed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_http11() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::in_memory().unwrap();
    let section = server_section(dir.path(), &pki, &pki.ca.cert.cert_pem, &[], false);
    let server = start(&section, &ClientPolicyConfig::default());
    let mut client = (*client_config(&pki.ca, Some(&[&pki.client]), false)).clone();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let outcome = handshake(&server, Arc::new(client)).await;
    assert_eq!(outcome.alpn.as_deref(), Some(&b"http/1.1"[..]));
}

fn load_err(section: &ServerConfig) -> TlsError {
    tls::server_config(
        section,
        &ClientPolicyConfig::default(),
        Arc::new(|_: &Refusal| {}),
    )
    .unwrap_err()
}

#[test]
fn bad_certificate_sets_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::in_memory().unwrap();
    let good = server_section(dir.path(), &pki, &pki.ca.cert.cert_pem, &[], false);

    let mut s = good.clone();
    s.private_key = write(dir.path(), "other.key", pki.client.key_pem.expose());
    let err = load_err(&s);
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("other.key"));

    let mut s = good.clone();
    s.client_ca = write(dir.path(), "empty.pem", "");
    let err = load_err(&s);
    assert!(matches!(err, TlsError::BadCaBundle { .. }), "{err}");
    assert!(err.to_string().contains("empty.pem"));

    let mut s = good.clone();
    s.client_ca = write(
        dir.path(),
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    assert!(matches!(load_err(&s), TlsError::BadCertificate { .. }));

    let mut s = good.clone();
    s.certificate = dir.path().join("missing.pem");
    let err = load_err(&s);
    assert!(matches!(err, TlsError::Unreadable { .. }));
    assert!(err.to_string().contains("missing.pem"));

    let mut s = good.clone();
    s.private_key = write(dir.path(), "nokey.key", "not a key");
    assert!(matches!(load_err(&s), TlsError::BadPrivateKey { .. }));

    let mut s = good.clone();
    s.crls = vec![write(dir.path(), "bad.crl", "garbage")];
    let err = load_err(&s);
    assert!(matches!(err, TlsError::BadCrl { .. }), "{err}");
    assert!(err.to_string().contains("bad.crl"));
}

#[test]
fn an_expired_crl_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::in_memory().unwrap();
    // A CRL whose nextUpdate has passed, made directly with rcgen.
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &pki.ca.cert.cert_pem,
        rcgen::KeyPair::from_pem(pki.ca.cert.key_pem.expose()).unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::days(10),
        next_update: now - time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let path = write(dir.path(), "old.crl", &crl.pem().unwrap());
    let section = server_section(
        dir.path(),
        &pki,
        &pki.ca.cert.cert_pem,
        std::slice::from_ref(&path),
        false,
    );
    let loaded = tls::server_config(
        &section,
        &ClientPolicyConfig::default(),
        Arc::new(|_: &Refusal| {}),
    )
    .unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].contains("old.crl"));
    assert!(loaded.crl_next_updates[0].1.unwrap() < std::time::SystemTime::now());
}
