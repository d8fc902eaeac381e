//! The connection pool from `[store.postgres]`: where to connect, the password (never from the
//! config file itself), TLS with rustls as configured, the per-connection settings that
//! durability and bounded waits depend on.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{PostgresConfig, PostgresTls};
use crate::secret::Secret;
use crate::store::StoreError;

/// The pool and a `host:port/dbname` label for messages. Nothing connects yet.
pub(super) fn pool(config: &PostgresConfig) -> Result<(Pool, String), StoreError> {
    let mut pg = match &config.url {
        Some(url) => url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| settings_error("store.postgres.url", e.to_string()))?,
        None => {
            let mut pg = tokio_postgres::Config::new();
            pg.host(config.host.as_deref().unwrap_or_default());
            if let Some(port) = config.port {
                pg.port(port);
            }
            pg.dbname(config.dbname.as_deref().unwrap_or_default());
            pg.user(config.user.as_deref().unwrap_or_default());
            pg
        }
    };
    if pg.get_password().is_some() {
        return Err(settings_error(
            "store.postgres.url",
            "holds a password; put it in store.postgres.password_file or FLOWTHROUGH_PG_PASSWORD"
                .to_owned(),
        ));
    }
    if let Some(password) = read_password(config)? {
        pg.password(password.expose().as_bytes());
    }
    // Whatever the database or role default: writes that nothing is acknowledged for do not wait
    // for the disk; acknowledgements open their transactions with `synchronous_commit = on`
    // (`ACCEPT`, `durable_transaction`).
    pg.options(format!(
        "-c synchronous_commit=off -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        config.statement_timeout_ms,
        config.statement_timeout_ms.saturating_mul(2)
    ));
    pg.application_name("flowthrough");
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    pg.connect_timeout(connect_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    let target = target_label(&pg);
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match config.tls {
        PostgresTls::Disable => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            Manager::from_config(pg, tokio_postgres::NoTls, manager_config)
        }
        PostgresTls::Require | PostgresTls::VerifyFull => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(config)?);
            Manager::from_config(pg, tls, manager_config)
        }
    };
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(connect_timeout))
        .create_timeout(Some(connect_timeout))
        .recycle_timeout(Some(connect_timeout))
        .build()
        .map_err(|e| settings_error("store.postgres.pool_size", e.to_string()))?;
    Ok((pool, target))
}

fn settings_error(key: &str, reason: String) -> StoreError {
    StoreError::Io(format!(
        "{key}: {reason}; fix [store.postgres] in the config (README, \"Running on PostgreSQL\")"
    ))
}

fn target_label(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", pg.get_dbname().unwrap_or_default())
}

/// `FLOWTHROUGH_PG_PASSWORD` wins over `password_file`; neither is fine (peer or certificate
/// authentication, or a `.pgpass`-less trust setup).
fn read_password(config: &PostgresConfig) -> Result<Option<Secret>, StoreError> {
    let source = config.password_source();
    if let Ok(value) = std::env::var(source.env)
        && !value.is_empty()
    {
        return Ok(Some(Secret::new(value.trim_end_matches(['\r', '\n']))));
    }
    let Some(path) = &source.file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        settings_error(
            source.key,
            format!(
                "cannot read the password file {}: {e}; check the path and that the flowthrough user may read it",
                path.display()
            ),
        )
    })?;
    Ok(Some(Secret::new(text.trim_end_matches(['\r', '\n']))))
}

fn client_tls(config: &PostgresConfig) -> Result<rustls::ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| settings_error("store.postgres.tls", e.to_string()))?;
    match (config.tls, &config.ca_bundle) {
        (PostgresTls::VerifyFull, Some(bundle)) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = crate::tls::read_cert_file(bundle)
                .map_err(|e| settings_error("store.postgres.ca_bundle", e.to_string()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| settings_error("store.postgres.ca_bundle", e.to_string()))?;
            }
            Ok(builder.with_root_certificates(roots).with_no_client_auth())
        }
        (PostgresTls::VerifyFull, None) => Err(settings_error(
            "store.postgres.ca_bundle",
            "is required with tls = \"verify-full\"".to_owned(),
        )),
        _ => Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth()),
    }
}

/// `tls = "require"`, as libpq's `sslmode=require`: the channel is encrypted and the handshake's
/// signatures are checked, but the certificate is not (no protection from an active attacker).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
