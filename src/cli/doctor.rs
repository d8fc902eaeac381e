//! `flowthrough doctor`: checks a deployment before (or while) it runs and prints each check with
//! its fix: config, files and permissions, certificates and their expiry, the server name, CA
//! bundle and CRLs, the store, the upstream, the token.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;

use super::fail;
use crate::config::{Config, PostgresTls, SecretSource, StoreBackend};
use crate::store::postgres::PgStore;
use crate::store::{Store, StoreError, TokenRecord, TokenState};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/flowthrough/flowthrough.toml"
    )]
    config: PathBuf,
    /// Skip the checks that need the network (name resolution and TLS to Webex).
    #[arg(long)]
    offline: bool,
}

/// A certificate that expires within this many days is a warning.
const EXPIRY_WARNING_DAYS: i64 = 21;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn line(&mut self, verdict: Verdict, what: &str, detail: impl AsRef<str>) {
        let mark = match verdict {
            Verdict::Pass => "✓",
            Verdict::Warn => {
                self.warned += 1;
                "!"
            }
            Verdict::Fail => {
                self.failed += 1;
                "✗"
            }
        };
        let detail = detail.as_ref();
        if detail.is_empty() {
            println!("{mark} {what}");
        } else {
            println!("{mark} {what}: {detail}");
        }
    }

    fn check(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => self.line(Verdict::Pass, what, detail),
            Err(fix) => self.line(Verdict::Fail, what, fix),
        }
    }
}

pub fn run(args: DoctorArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            println!("✗ config {}: {e}", args.config.display());
            return fail("the config does not load; fix it first");
        }
    };
    let mut report = Report {
        failed: 0,
        warned: 0,
    };
    report.line(
        Verdict::Pass,
        "config",
        format!("{} loads and validates", args.config.display()),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };

    if let Some(server) = &config.server {
        report.check("private key permissions", private_file(&server.private_key));
        certificate_checks(&mut report, &server.certificate, "server certificate");
        match &server.public_name {
            Some(name) => report.check("server name", name_in_certificate(&server.certificate, name)),
            None => report.line(
                Verdict::Warn,
                "server name",
                "[server].public_name is not set; set it to the name the AS connects to so this check can prove the certificate matches",
            ),
        }
        certificate_checks(&mut report, &server.client_ca, "client CA bundle");
        for crl in &server.crls {
            report.check(&format!("CRL {}", crl.display()), crl_check(crl));
        }
        let observer: crate::tls::Observer = std::sync::Arc::new(|_| {});
        report.check(
            "TLS set (certificate, key, CA bundle, CRLs together)",
            crate::tls::server_config(server, &config.client_policy, observer)
                .map(|loaded| {
                    for w in &loaded.warnings {
                        println!("  ! {w}");
                    }
                    "loads as serve would load it".to_owned()
                })
                .map_err(|e| e.to_string()),
        );
    } else if config.tunnel.is_some() {
        report.line(
            Verdict::Fail,
            "[server]",
            "the tunnel uses [server]'s certificate, key and client CA; add the section",
        );
    }

    let store = match config.store.backend {
        StoreBackend::Sled => sled_checks(&mut report, &config),
        StoreBackend::Postgres => runtime.block_on(postgres_checks(&mut report, &config)),
    };

    if let Some(webex) = &config.webex {
        report.check("client secret", secret_check(&webex.client_secret_source()));
        match &store {
            StoreFound::Open(store) => report.check(
                "Webex token",
                runtime
                    .block_on(store.token())
                    .map_err(|e| e.to_string())
                    .and_then(|record| token_check(record, &webex.refresh_token_source())),
            ),
            StoreFound::Missing => report.check(
                "Webex token",
                token_check(None, &webex.refresh_token_source()),
            ),
            StoreFound::Unavailable => report.line(
                Verdict::Warn,
                "Webex token",
                "not checked: the store could not be opened (see the store lines above); `flowthrough token status` or /status show it",
            ),
        }
        if !args.offline {
            report.check(
                "Webex API reachable",
                runtime.block_on(upstream_check(&webex.api_base, webex.ca_bundle.as_deref())),
            );
        }
    } else if !config.server.as_ref().is_none_or(|s| s.listen.is_empty()) {
        report.line(Verdict::Fail, "[webex]", "the provisioning listener needs [webex]; add it, or empty [server].listen for a tunnel-only node");
    }

    if let Some(tunnel) = &config.tunnel {
        let resolver = crate::failover::Resolver::System;
        let lines = runtime.block_on(crate::tunnel::check(
            tunnel,
            (!args.offline).then_some(&resolver),
        ));
        for line in lines {
            let verdict = match line.level {
                crate::tunnel::Level::Ok => Verdict::Pass,
                crate::tunnel::Level::Warn => Verdict::Warn,
                crate::tunnel::Level::Fail => Verdict::Fail,
            };
            report.line(verdict, &line.check, &line.detail);
        }
    }
    if let Some(server) = &config.server {
        for addr in &server.listen {
            report.check(&format!("provisioning listener {addr}"), bindable(*addr));
        }
    }
    report.check("admin listener", bindable(config.admin.listen));

    println!();
    if report.failed > 0 {
        println!(
            "{} check(s) failed, {} warning(s): fix the ✗ lines above, then run doctor again.",
            report.failed, report.warned
        );
        ExitCode::from(2)
    } else {
        println!("all checks passed ({} warning(s)).", report.warned);
        ExitCode::SUCCESS
    }
}

fn private_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}; check the path in the config", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:o}: other users can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(format!("{} mode {mode:o}", path.display()))
}

fn certificate_checks(report: &mut Report, path: &Path, what: &str) {
    let certs = match crate::tls::read_cert_file(path) {
        Ok(c) => c,
        Err(e) => {
            report.line(Verdict::Fail, what, e.to_string());
            return;
        }
    };
    for (i, der) in certs.iter().enumerate() {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            report.line(
                Verdict::Fail,
                what,
                format!("certificate {} of {} does not parse", i + 1, path.display()),
            );
            continue;
        };
        let days = (cert.validity().not_after.timestamp() - now_secs()) / 86_400;
        let subject = cert.subject().to_string();
        let label = format!("{what} #{} ({subject})", i + 1);
        if days < 0 {
            report.line(
                Verdict::Fail,
                &label,
                format!(
                    "expired {} day(s) ago; issue a new one (`flowthrough certs …`) and reload",
                    -days
                ),
            );
        } else if days < EXPIRY_WARNING_DAYS {
            report.line(
                Verdict::Warn,
                &label,
                format!("expires in {days} day(s); renew it soon"),
            );
        } else {
            report.line(
                Verdict::Pass,
                &label,
                format!("valid for {days} more day(s)"),
            );
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn name_in_certificate(path: &Path, name: &str) -> Result<String, String> {
    let certs = crate::tls::read_cert_file(path).map_err(|e| e.to_string())?;
    let leaf = certs.first().ok_or("the certificate file is empty")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
    let names = crate::tls::subject_alt_names(&cert);
    let matches = |san: &str| {
        let san = san.trim_start_matches("DNS:").trim_start_matches("IP:");
        san.eq_ignore_ascii_case(name)
            || san.strip_prefix("*.").is_some_and(|suffix| {
                name.split_once('.')
                    .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix))
            })
    };
    if names.iter().any(|n| matches(n)) {
        Ok(format!("\"{name}\" is in the certificate's SANs"))
    } else {
        Err(format!(
            "\"{name}\" (server.public_name) is not in the certificate's SANs {names:?}; the AS will refuse the connection — issue one with `flowthrough certs server --dns {name}`"
        ))
    }
}

fn crl_check(path: &Path) -> Result<String, String> {
    let der = crate::tls::read_crl_file(path).map_err(|e| e.to_string())?;
    match crate::tls::crl_next_update(der.as_ref()) {
        Ok(Some(next)) if next < SystemTime::now() => Err(format!(
            "{} is past its nextUpdate; publish a fresh CRL from the CA and reload",
            path.display()
        )),
        Ok(Some(next)) => Ok(format!(
            "next update in {} hour(s)",
            next.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .as_secs()
                / 3600
        )),
        Ok(None) => Ok("loads (no nextUpdate)".to_owned()),
        Err(e) => Err(e),
    }
}

/// What the store checks found, for the token check after them.
enum StoreFound {
    Open(Store),
    /// No sled store yet: `serve` creates it, and takes the initial refresh token then.
    Missing,
    Unavailable,
}

/// The sled store and its volume. A store that does not exist yet is reported, not created:
/// a check changes nothing; the volume is then the one it will be created on.
fn sled_checks(report: &mut Report, config: &Config) -> StoreFound {
    let path = &config.store.path;
    let volume = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    match crate::store::volume_space(volume) {
        Ok(space) => {
            let (verdict, detail) = volume_verdict(space);
            report.line(verdict, "store volume", detail);
        }
        Err(e) => report.line(Verdict::Fail, "store volume", e.to_string()),
    }
    if !path.exists() {
        report.line(
            Verdict::Pass,
            "store",
            format!(
                "{} does not exist yet; `serve` creates it at its first start (its parent must be writable by the flowthrough user)",
                path.display()
            ),
        );
        return StoreFound::Missing;
    }
    match Store::open(path) {
        Ok(store) => {
            report.check(
                "store",
                counts(&store).map(|counts| format!("{} opens; {counts}", path.display())),
            );
            StoreFound::Open(store)
        }
        Err(StoreError::Open { reason, .. }) if reason.to_lowercase().contains("lock") => {
            report.line(
                Verdict::Pass,
                "store",
                format!(
                    "{} is in use by a running flowthrough (that is fine)",
                    path.display()
                ),
            );
            StoreFound::Unavailable
        }
        Err(e) => {
            report.line(Verdict::Fail, "store", e.to_string());
            StoreFound::Unavailable
        }
    }
}

/// Pending and dead entries, read without a runtime of the caller's (sled answers at once).
fn counts(store: &Store) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(store_counts(store))
}

async fn store_counts(store: &Store) -> Result<String, String> {
    let (pending, _) = store.pending_summary().await.map_err(|e| e.to_string())?;
    let dead = store.dead_count().await.map_err(|e| e.to_string())?;
    if dead > 0 {
        println!("  ! {dead} dead outbox entries: `flowthrough outbox list --dead`");
    }
    Ok(format!("{pending} pending, {dead} dead"))
}

/// The PostgreSQL store: reachable (with TLS as configured), schema version, durability
/// settings, the time of one commit. Nothing is written: the commit is of a transaction that
/// only takes a transaction id. Returns the store when its schema is current.
async fn postgres_checks(report: &mut Report, config: &Config) -> StoreFound {
    let Some(settings) = config.store.postgres.as_ref() else {
        report.line(
            Verdict::Fail,
            "PostgreSQL",
            "store.backend is \"postgres\" but there is no [store.postgres]; add it",
        );
        return StoreFound::Unavailable;
    };
    let pg = match PgStore::connect(settings) {
        Ok(pg) => pg,
        Err(e) => {
            report.line(Verdict::Fail, "PostgreSQL", e.to_string());
            return StoreFound::Unavailable;
        }
    };
    let started = std::time::Instant::now();
    let schema = match pg.schema().await {
        Ok(schema) => schema,
        Err(e) => {
            report.line(
                Verdict::Fail,
                "PostgreSQL reachable",
                format!("{}: {e}", pg.target()),
            );
            return StoreFound::Unavailable;
        }
    };
    report.line(
        Verdict::Pass,
        "PostgreSQL reachable",
        format!(
            "{} answered in {} ms",
            pg.target(),
            started.elapsed().as_millis()
        ),
    );
    match settings.tls {
        PostgresTls::VerifyFull => report.line(
            Verdict::Pass,
            "PostgreSQL TLS",
            "verify-full: encrypted, the server's certificate chains to store.postgres.ca_bundle and names the host",
        ),
        PostgresTls::Require => report.line(
            Verdict::Warn,
            "PostgreSQL TLS",
            "require: encrypted but the server's certificate is not checked; set tls = \"verify-full\" with ca_bundle to stop an active attacker",
        ),
        PostgresTls::Disable => report.line(
            Verdict::Warn,
            "PostgreSQL TLS",
            "disable: plain TCP; fine on the same host or a trusted network only, else set tls = \"verify-full\"",
        ),
    }
    let current = match crate::store::postgres::check_schema(&schema) {
        Err(e) => {
            report.line(Verdict::Fail, "PostgreSQL schema", e.to_string());
            false
        }
        Ok(()) if !schema.pending.is_empty() => {
            report.line(
                Verdict::Warn,
                "PostgreSQL schema",
                format!(
                    "version {}, {} to apply: `serve` applies them at start, or run `flowthrough store migrate`",
                    schema.found,
                    schema.pending.join(", ")
                ),
            );
            false
        }
        Ok(()) => {
            report.line(
                Verdict::Pass,
                "PostgreSQL schema",
                format!("version {} (current)", schema.found),
            );
            true
        }
    };
    match pg.durability().await {
        Ok(d) => {
            report.check("PostgreSQL durability", durability_verdict(&d));
            let standby = if d.synchronous_standby_names.is_empty() {
                "no synchronous standby: a commit is on this server's disk only".to_owned()
            } else {
                format!("synchronous standbys {}", d.synchronous_standby_names)
            };
            report.line(
                Verdict::Pass,
                "PostgreSQL commit",
                format!(
                    "one commit took {:.2} ms; {standby}",
                    d.commit.as_secs_f64() * 1000.0
                ),
            );
        }
        Err(e) => report.line(Verdict::Fail, "PostgreSQL durability", e.to_string()),
    }
    if !current {
        return StoreFound::Unavailable;
    }
    let store = Store::from(pg);
    report.check("store", store_counts(&store).await);
    StoreFound::Open(store)
}

fn durability_verdict(d: &crate::store::postgres::Durability) -> Result<String, String> {
    if d.fsync != "on" {
        return Err(format!(
            "fsync = {}: a crash of the database server can lose acknowledged commands; set fsync = on",
            d.fsync
        ));
    }
    if d.synchronous_commit != "on"
        && d.synchronous_commit != "remote_apply"
        && d.synchronous_commit != "remote_write"
    {
        return Err(format!(
            "synchronous_commit = {} in flowthrough's acknowledging transactions: an acknowledgement would not wait for the disk; report this",
            d.synchronous_commit
        ));
    }
    Ok(format!(
        "fsync = on, synchronous_commit = {} for acknowledgements ({} for delivery state and the audit) ({})",
        d.synchronous_commit, d.background_commit, d.server_version
    ))
}

/// Under this share of its volume free, the store is a warning; the alert rule
/// `FlowthroughStoreVolumeLow` (deploy/prometheus-alerts.yml) fires at the same share.
const LOW_SPACE_SHARE: f64 = 0.10;

fn volume_verdict(space: crate::store::VolumeSpace) -> (Verdict, String) {
    let gib = |bytes: u64| bytes as f64 / f64::from(1 << 30);
    let share = if space.total == 0 {
        0.0
    } else {
        space.available as f64 / space.total as f64
    };
    let detail = format!(
        "{:.1} GiB free of {:.1} GiB ({:.0} %)",
        gib(space.available),
        gib(space.total),
        share * 100.0
    );
    if share < LOW_SPACE_SHARE {
        (
            Verdict::Warn,
            format!(
                "{detail}; when it is full every command is refused with 503 until flowthrough restarts — free space or grow the volume, or lower store.history_max_entries and store.audit_max_records"
            ),
        )
    } else {
        (Verdict::Pass, detail)
    }
}

fn secret_check(source: &SecretSource) -> Result<String, String> {
    match crate::webex::read_secret(source) {
        Ok(Some(_)) => {
            if let Some(file) = &source.file
                && std::env::var_os(source.env).is_none()
            {
                private_file(file)?;
                return Ok(format!("read from {} (mode ok)", file.display()));
            }
            Ok(format!("read from ${}", source.env))
        }
        Ok(None) => Err(format!(
            "not set: export {} or set {} to a file holding it",
            source.env, source.key
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn token_check(record: Option<TokenRecord>, initial: &SecretSource) -> Result<String, String> {
    if record.is_none() {
        return match crate::webex::read_secret(initial) {
            Ok(Some(_)) => Ok(
                "none stored yet; the initial refresh token is used at the first start".to_owned(),
            ),
            Ok(None) => Err(format!(
                "no refresh token anywhere: export {}, set {}, or install one with `flowthrough token set`",
                initial.env, initial.key
            )),
            Err(e) => Err(e.to_string()),
        };
    }
    let status = crate::webex::TokenStatus::of(record.as_ref());
    if let TokenState::CredentialsInvalid { reason } = &status.state {
        return Err(format!(
            "Webex rejected the refresh token ({reason}); install a new one with `flowthrough token set`"
        ));
    }
    if record.is_none() {
        return Ok(
            "none stored yet; the initial refresh token is read at the first start".to_owned(),
        );
    }
    if status.refresh_expiring_soon {
        println!(
            "  ! the refresh token expires in less than 14 days: install a new one with `flowthrough token set`"
        );
    }
    Ok(match status.refresh_seconds_left {
        Some(s) => format!("usable; refresh token valid for {} more day(s)", s / 86_400),
        None => "usable".to_owned(),
    })
}

async fn upstream_check(api_base: &str, ca_bundle: Option<&Path>) -> Result<String, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(5));
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path)
            .map_err(|e| format!("{}: {e}; check webex.ca_bundle", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    match client.get(api_base).send().await {
        // Any HTTP answer proves name resolution, TCP and a verified TLS handshake.
        Ok(response) => Ok(format!(
            "{api_base} answered HTTP {} over verified TLS",
            response.status().as_u16()
        )),
        Err(e) => Err(format!(
            "{api_base} does not answer over TLS ({e}); check DNS and egress from the DMZ, and webex.ca_bundle if a TLS-inspecting proxy is in the way"
        )),
    }
}

fn bindable(addr: std::net::SocketAddr) -> Result<String, String> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok("can bind".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(
            "in use (a running flowthrough, or another process: check with `ss -ltnp`)".to_owned(),
        ),
        Err(e) => Err(format!(
            "cannot bind {addr}: {e}; ports below 1024 need CAP_NET_BIND_SERVICE"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VolumeSpace;

    #[test]
    fn a_volume_under_a_tenth_free_is_a_warning_that_says_what_to_do() {
        let gib = 1u64 << 30;
        let (verdict, detail) = volume_verdict(VolumeSpace {
            available: 50 * gib,
            total: 100 * gib,
        });
        assert_eq!(verdict, Verdict::Pass);
        assert_eq!(detail, "50.0 GiB free of 100.0 GiB (50 %)");
        let (verdict, detail) = volume_verdict(VolumeSpace {
            available: 9 * gib,
            total: 100 * gib,
        });
        assert_eq!(verdict, Verdict::Warn);
        assert!(
            detail.starts_with("9.0 GiB free of 100.0 GiB (9 %); ")
                && detail.contains("503")
                && detail.contains("store.history_max_entries"),
            "{detail}"
        );
        let (verdict, _) = volume_verdict(VolumeSpace {
            available: 0,
            total: 0,
        });
        assert_eq!(verdict, Verdict::Warn, "a volume of no size is no room");
    }
}
