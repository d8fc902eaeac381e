//! Configuration: one TOML file, parsed once at start-up into typed, validated structs.
//!
//! Every error names the file, the line and the key, and says how to fix it: an operator reads
//! these at 3 a.m. with a broken deployment. Unknown keys are errors (a typo must not silently
//! fall back to a default). Secrets are never read here: the config holds where they come from
//! ([`SecretSource`]), and the component that needs one resolves it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::mapping::{LanguageTable, Template};
use crate::secret::PasswordAccount;

/// The whole configuration. Sections that a subcommand does not need may be absent: `translate`
/// needs only templates, overrides and languages; a tunnel-only `serve` needs no `[webex]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Template used by `POST /provisioning` when neither an override nor the user map decides.
    #[serde(default)]
    pub default_template: Option<String>,
    #[serde(default)]
    pub server: Option<ServerConfig>,
    #[serde(default)]
    pub client_policy: ClientPolicyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub webex: Option<WebexConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// BroadWorks language name → ISO-639-1 code, merged over the built-in defaults.
    #[serde(default)]
    pub languages: BTreeMap<String, String>,
    #[serde(default)]
    pub templates: BTreeMap<String, Template>,
    /// serviceProviderId → template name.
    #[serde(default)]
    pub template_overrides: BTreeMap<String, String>,
    #[serde(default)]
    pub tunnel: Option<TunnelConfig>,
}

/// `[server]`: the provisioning listener and the certificates both listeners use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Empty: no provisioning listener (tunnel-only deployment).
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Certificate chain, leaf first (PEM).
    #[serde(default = "default_certificate")]
    pub certificate: PathBuf,
    #[serde(default = "default_private_key")]
    pub private_key: PathBuf,
    /// CA bundle the AS client certificate must chain to.
    #[serde(default = "default_client_ca")]
    pub client_ca: PathBuf,
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Client addresses allowed to connect, checked before TLS; empty = any.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    /// The name the AS connects to; `doctor` checks it is in the server certificate.
    #[serde(default)]
    pub public_name: Option<String>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long the AS waits for Webex before it gets 7020 and delivery continues in background.
    #[serde(default = "default_ack_deadline_ms")]
    pub ack_deadline_ms: u64,
    /// Connections older than this are closed after their current request, so long keep-alive
    /// connections pick up revocations and new CRLs.
    #[serde(default = "default_max_connection_age_s")]
    pub max_connection_age_s: u64,
    /// TLS session resumption skips certificate verification, so revocation would not bite on a
    /// resumed session: off unless an operator turns it on knowingly.
    #[serde(default)]
    pub session_resumption: bool,
    /// On SIGTERM, how long in-flight requests get before their work is left to the outbox.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
    /// Threads serving the AS side (TLS, HTTP, parsing, mapping, the request's store writes).
    /// Delivery, the store's flusher and the admin listener have threads of their own.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

/// `[client_policy]`: the rules of SPEC §6 applied to the AS's client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPolicyConfig {
    #[serde(default = "yes")]
    pub require_broadworks_oid: bool,
    #[serde(default = "yes")]
    pub require_client_auth: bool,
    /// Exact names or `*.suffix` patterns. Empty = any CN.
    #[serde(default = "default_common_names")]
    pub allowed_common_names: Vec<String>,
    #[serde(default)]
    pub allow_san: bool,
}

impl Default for ClientPolicyConfig {
    fn default() -> Self {
        ClientPolicyConfig {
            require_broadworks_oid: true,
            require_client_auth: true,
            allowed_common_names: default_common_names(),
            allow_san: false,
        }
    }
}

/// `[admin]`: metrics, health, readiness, status and reload. Loopback by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

/// sled's page cache by default. sled's own default (1 GiB) lets RSS grow for hours; the hot data
/// (pending entries, recent users) is a few MiB, and the kernel's page cache serves the rest.
pub const DEFAULT_CACHE_MIB: u64 = 32;

/// `[cluster]`: this node among several sharing one PostgreSQL store (SPEC §11).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name on the leases it holds; the host name when not given (resolved once,
    /// here, so every part of the node uses the same name).
    #[serde(default = "host_name")]
    pub node_id: String,
    /// How long a delivery lease lasts: a dead node's users go to the others after this.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// How often a node looks in the shared store for work another node accepted.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: host_name(),
            lease_ms: default_lease_ms(),
            poll_ms: default_poll_ms(),
        }
    }
}

fn default_lease_ms() -> u64 {
    30_000
}

fn default_poll_ms() -> u64 {
    1_000
}

/// The kernel's host name (`node` if it does not say).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// `[store]`: where the outbox, user map, audit and tokens live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    #[serde(default = "default_audit_retention_days")]
    pub audit_retention_days: u32,
    /// Upper bound on audit records whatever their age, so a flood cannot fill the disk.
    #[serde(default = "default_audit_max_records")]
    pub audit_max_records: u64,
    /// Upper bound on delivered outbox entries kept as history (`outbox list --delivered`),
    /// whatever their age. sled's memory follows the store's size, so this is what holds RSS
    /// level on a busy system; dead entries go only with `audit_retention_days`.
    #[serde(default = "default_history_max_entries")]
    pub history_max_entries: u64,
    /// An outbox entry still undelivered after this long becomes dead.
    #[serde(default = "default_max_entry_age_hours")]
    pub max_entry_age_hours: u64,
    /// sled's page cache: RSS grows until it is full, then stays there.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// Where the records live: sled in `path` (one node) or PostgreSQL (`[store.postgres]`).
    #[serde(default)]
    pub backend: StoreBackend,
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

/// `[store] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Sled,
    Postgres,
}

/// `[store.postgres]`: the database of a PostgreSQL-backed store. Either `url` or the separate
/// keys; the password never in the config itself (`password_file` or `FLOWTHROUGH_PG_PASSWORD`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgresql://user@host:port/dbname` (or libpq's `key=value` form), without a password.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: PostgresTls,
    /// The CA bundle (PEM) the server's certificate must chain to, with `tls = "verify-full"`.
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// Connections kept open to the database.
    #[serde(default = "default_pg_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_pg_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bound on every statement; a statement that takes longer fails (and is not acknowledged).
    #[serde(default = "default_pg_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
}

impl PostgresConfig {
    /// Where the password comes from: `FLOWTHROUGH_PG_PASSWORD`, else the file; none is fine
    /// for peer or certificate authentication.
    pub fn password_source(&self) -> SecretSource {
        SecretSource {
            env: "FLOWTHROUGH_PG_PASSWORD",
            file: self.password_file.clone(),
            key: "store.postgres.password_file",
        }
    }
}

/// `[store.postgres] tls`: libpq's sslmode values that flowthrough supports, with rustls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PostgresTls {
    /// Encrypted, the server's certificate chains to `ca_bundle` and names the host.
    #[default]
    #[serde(rename = "verify-full")]
    VerifyFull,
    /// Encrypted, the server's certificate not checked (protects against eavesdropping only).
    #[serde(rename = "require")]
    Require,
    /// Plain TCP or a Unix socket: only on a trusted network or the same host.
    #[serde(rename = "disable")]
    Disable,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: default_store_path(),
            audit_retention_days: default_audit_retention_days(),
            audit_max_records: default_audit_max_records(),
            history_max_entries: default_history_max_entries(),
            max_entry_age_hours: default_max_entry_age_hours(),
            cache_mib: default_cache_mib(),
            backend: StoreBackend::default(),
            postgres: None,
        }
    }
}

impl StoreConfig {
    fn validate_postgres(&self) -> Result<(), Problem> {
        let Some(pg) = &self.postgres else {
            return match self.backend {
                StoreBackend::Postgres => Err(Problem::new(
                    "store.backend",
                    "is \"postgres\" but there is no [store.postgres] section; add one with url (or host, dbname and user)",
                )),
                StoreBackend::Sled => Ok(()),
            };
        };
        match &pg.url {
            Some(url) => {
                if pg.host.is_some()
                    || pg.port.is_some()
                    || pg.dbname.is_some()
                    || pg.user.is_some()
                {
                    return Err(Problem::new(
                        "store.postgres.url",
                        "is given together with host, port, dbname or user; use either the url or the separate keys",
                    ));
                }
                if url_holds_password(url) {
                    return Err(Problem::new(
                        "store.postgres.url",
                        "holds a password; a config file is no place for one — remove it from the url and put it in the file named by store.postgres.password_file or in FLOWTHROUGH_PG_PASSWORD",
                    ));
                }
            }
            None => {
                for (key, value) in [
                    ("host", &pg.host),
                    ("dbname", &pg.dbname),
                    ("user", &pg.user),
                ] {
                    if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                        return Err(Problem::new(
                            format!("store.postgres.{key}"),
                            "is required when store.postgres.url is not given",
                        ));
                    }
                }
            }
        }
        if pg.tls == PostgresTls::VerifyFull && pg.ca_bundle.is_none() {
            return Err(Problem::new(
                "store.postgres.ca_bundle",
                "is required with tls = \"verify-full\" (the default); name the PEM bundle of the CA that signed the server's certificate, or set tls = \"require\" (encrypted, not verified) or \"disable\"",
            ));
        }
        for (key, value, min) in [
            ("pool_size", pg.pool_size as u64, 1),
            ("connect_timeout_ms", pg.connect_timeout_ms, 100),
            ("statement_timeout_ms", pg.statement_timeout_ms, 100),
        ] {
            if value < min {
                return Err(Problem::new(
                    format!("store.postgres.{key}"),
                    format!("is {value}; use at least {min}"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether a PostgreSQL connection string carries a password: `user:password@` in a URL, or a
/// `password` parameter (URL query or libpq's `key=value` form).
fn url_holds_password(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && userinfo.contains(':')
        {
            return true;
        }
        return rest
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|p| p.starts_with("password=")));
    }
    lower
        .split_whitespace()
        .any(|p| p.starts_with("password=") || p.starts_with("password "))
        || lower.contains("password =")
}

/// `[webex]`: the upstream API and the partner's OAuth credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebexConfig {
    #[serde(default = "default_api_base")]
    pub api_base: String,
    #[serde(default = "default_token_url")]
    pub token_url: String,
    /// Extra CA certificates to trust for the API; empty = the system roots only.
    #[serde(default, deserialize_with = "empty_path_is_none")]
    pub ca_bundle: Option<PathBuf>,
    pub client_id: String,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The initial refresh token; later ones live in the store.
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_block_seconds")]
    pub block_seconds: u64,
    #[serde(default = "default_max_parallel_users")]
    pub max_parallel_users: usize,
    /// Upper bound on any `Retry-After` Webex sends.
    #[serde(default = "default_retry_after_cap_s")]
    pub retry_after_cap_s: u64,
    /// How long an accepted subscriber is followed up with GET until its status settles.
    #[serde(default = "default_follow_up_s")]
    pub follow_up_s: u64,
    /// Refresh the access token this long before it expires.
    #[serde(default = "default_refresh_ahead_s")]
    pub refresh_ahead_s: u64,
}

impl WebexConfig {
    /// Where the client secret comes from: `FLOWTHROUGH_CLIENT_SECRET`, else the file.
    pub fn client_secret_source(&self) -> SecretSource {
        SecretSource {
            env: "FLOWTHROUGH_CLIENT_SECRET",
            file: self.client_secret_file.clone(),
            key: "webex.client_secret_file",
        }
    }

    /// Where the initial refresh token comes from: `FLOWTHROUGH_REFRESH_TOKEN`, else the file.
    pub fn refresh_token_source(&self) -> SecretSource {
        SecretSource {
            env: "FLOWTHROUGH_REFRESH_TOKEN",
            file: self.refresh_token_file.clone(),
            key: "webex.refresh_token_file",
        }
    }
}

/// Where a secret is read from when it is needed: an environment variable wins over the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSource {
    pub env: &'static str,
    pub file: Option<PathBuf>,
    /// The config key that names the file, for error messages.
    pub key: &'static str,
}

/// `[log]`: human-readable or JSON lines, and the default level filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `flowthrough=debug,info`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `[tunnel]`: the CONNECT tunnel of SPEC §10 (the Provisioning Adapter Proxy role).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    #[serde(default = "default_tunnel_listen")]
    pub listen: Vec<SocketAddr>,
    /// mTLS with `[server]`'s certificate and `[client_policy]`.
    #[serde(default = "yes")]
    pub tls: bool,
    /// Required (non-empty) when `tls = false`.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    #[serde(default = "default_allowed_destinations")]
    pub allowed_destinations: Vec<String>,
    #[serde(default)]
    pub allow_private_destinations: bool,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// 0 = no limit.
    #[serde(default)]
    pub max_tunnel_seconds: u64,
    #[serde(default = "default_max_tunnels")]
    pub max_tunnels: usize,
    /// How long blocked destination addresses stay out of rotation.
    #[serde(default = "default_block_seconds")]
    pub block_seconds: u64,
    #[serde(default)]
    pub proxy_account: Option<PasswordAccount>,
}

fn yes() -> bool {
    true
}
fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 8443))]
}
fn default_certificate() -> PathBuf {
    PathBuf::from("certs/server.pem")
}
fn default_private_key() -> PathBuf {
    PathBuf::from("certs/server.key")
}
fn default_client_ca() -> PathBuf {
    PathBuf::from("certs/ca.pem")
}
/// The most AS-side worker threads `server.workers` accepts.
const MAX_WORKERS: usize = 64;

fn default_max_body_bytes() -> usize {
    256 * 1024
}
fn default_ack_deadline_ms() -> u64 {
    5000
}
fn default_max_connection_age_s() -> u64 {
    600
}
fn default_drain_seconds() -> u64 {
    10
}
/// Two: one worker already serves more than 10,000 requests/s (bench/RESULTS.md), far beyond
/// what an AS sends; the second keeps the AS side answering while the first waits on a store
/// write that waits on the disk.
fn default_workers() -> usize {
    2
}
fn default_common_names() -> Vec<String> {
    vec!["bwcticlient.webex.com".to_owned()]
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/flowthrough")
}
fn default_audit_retention_days() -> u32 {
    90
}
fn default_audit_max_records() -> u64 {
    1_000_000
}

fn default_history_max_entries() -> u64 {
    1_000_000
}

fn default_cache_mib() -> u64 {
    DEFAULT_CACHE_MIB
}
fn default_max_entry_age_hours() -> u64 {
    72
}
fn default_pg_pool_size() -> usize {
    16
}
fn default_pg_connect_timeout_ms() -> u64 {
    5000
}
fn default_pg_statement_timeout_ms() -> u64 {
    10_000
}
fn default_api_base() -> String {
    "https://webexapis.com/v1".to_owned()
}
fn default_token_url() -> String {
    "https://webexapis.com/v1/access_token".to_owned()
}
fn default_request_timeout_ms() -> u64 {
    2000
}
fn default_attempts() -> u32 {
    3
}
fn default_block_seconds() -> u64 {
    60
}
fn default_max_parallel_users() -> usize {
    32
}
fn default_retry_after_cap_s() -> u64 {
    300
}
fn default_follow_up_s() -> u64 {
    600
}
fn default_refresh_ahead_s() -> u64 {
    300
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_tunnel_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 8080))]
}
fn default_allowed_destinations() -> Vec<String> {
    vec!["*.wbx2.com:443".to_owned(), "webexapis.com:443".to_owned()]
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_idle_timeout_s() -> u64 {
    300
}
fn default_max_tunnels() -> usize {
    1024
}

fn empty_path_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    Ok(raw.filter(|s| !s.trim().is_empty()).map(PathBuf::from))
}

/// A configuration error, located in the file. `Display` reads like a compiler diagnostic:
/// `flowthrough.toml:12: templates.acme.country: "USA" is not …; write a two-letter ISO-3166 code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {reason}; check the path given to --config")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        /// Dotted key path, e.g. `templates.acme.country`; part of `message` too.
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } if !key.is_empty() => Some(key),
            _ => None,
        }
    }
}

impl Config {
    /// Read and validate the config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate config text; `origin` is only used in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::Invalid {
                path: origin.to_owned(),
                line,
                key: String::new(),
                message: format!(
                    "{}; see deploy/flowthrough.example.toml for every key and its form",
                    e.message().trim_end()
                ),
            }
        })?;
        config.validate().map_err(|Problem { key, message }| {
            let line = key_line(text, &key);
            ConfigError::Invalid {
                path: origin.to_owned(),
                line,
                message: format!("{key}: {message}"),
                key,
            }
        })?;
        Ok(config)
    }

    /// What template selection needs from the config, for one command: `explicit` is the URL's
    /// (or `--template`'s) template, `remembered` the one the command's user was provisioned with.
    pub fn selection<'a>(
        &'a self,
        explicit: Option<&'a str>,
        remembered: Option<&'a str>,
    ) -> crate::mapping::Selection<'a> {
        crate::mapping::Selection {
            explicit,
            templates: &self.templates,
            overrides: &self.template_overrides,
            remembered,
            default: self.default_template.as_deref(),
        }
    }

    /// The language table: built-in defaults with `[languages]` on top.
    pub fn language_table(&self) -> LanguageTable {
        LanguageTable::with_overrides(&self.languages)
    }

    /// The checks that serde cannot express. Each failing check names its key and says how to
    /// fix it.
    fn validate(&self) -> Result<(), Problem> {
        if self.cluster.lease_ms < 1000 {
            return Err(Problem::new(
                "cluster.lease_ms",
                "must be at least 1000: a lease shorter than a Webex call would pass users between nodes mid-call",
            ));
        }
        if self.cluster.node_id.trim().is_empty() {
            return Err(Problem::new(
                "cluster.node_id",
                "must not be empty: it names this node on the leases it holds; leave it out to use the host name",
            ));
        }
        if self.cluster.poll_ms == 0 {
            return Err(Problem::new(
                "cluster.poll_ms",
                "must be at least 1: it is how often a node looks for work other nodes accepted",
            ));
        }
        if self.store.cache_mib == 0 {
            return Err(Problem::new(
                "store.cache_mib",
                format!("must be at least 1 (default {DEFAULT_CACHE_MIB})"),
            ));
        }
        self.store.validate_postgres()?;
        for (name, template) in &self.templates {
            template.validate().map_err(|e| Problem {
                key: format!("templates.{name}.{}", e.key),
                message: e.message,
            })?;
        }
        if let Some(name) = &self.default_template
            && !self.templates.contains_key(name)
        {
            {
                return Err(Problem::new(
                    "default_template",
                    format!(
                        "names template \"{name}\", which is not defined; add [templates.{name}] or name one of: {}",
                        self.template_names()
                    ),
                ));
            }
        }
        for (sp, name) in &self.template_overrides {
            if !self.templates.contains_key(name) {
                return Err(Problem::new(
                    format!("template_overrides.{}", quote_key(sp)),
                    format!(
                        "names template \"{name}\", which is not defined; define [templates.{name}] or use one of: {}",
                        self.template_names()
                    ),
                ));
            }
        }
        for (language, code) in &self.languages {
            if !crate::mapping::is_language_code(code) {
                return Err(Problem::new(
                    format!("languages.{}", quote_key(language)),
                    format!(
                        "\"{code}\" is not a two-letter ISO-639-1 code; write e.g. \"fr\" for French"
                    ),
                ));
            }
        }
        if let Some(server) = &self.server {
            if server.max_body_bytes < 1024 {
                return Err(Problem::new(
                    "server.max_body_bytes",
                    format!(
                        "{} bytes cannot hold an OCI-P document; use at least 1024 (default 262144)",
                        server.max_body_bytes
                    ),
                ));
            }
            if server.ack_deadline_ms == 0 {
                return Err(Problem::new(
                    "server.ack_deadline_ms",
                    "must be greater than 0 (default 5000)",
                ));
            }
            if !(1..=MAX_WORKERS).contains(&server.workers) {
                return Err(Problem::new(
                    "server.workers",
                    format!(
                        "{} threads: use 1 to {MAX_WORKERS} (default 2); more than the host's cores \
                         only adds thread switching",
                        server.workers
                    ),
                ));
            }
        }
        for (i, cn) in self.client_policy.allowed_common_names.iter().enumerate() {
            if cn.is_empty()
                || (cn.contains('*') && !(cn.starts_with("*.") && cn[2..].find('*').is_none()))
            {
                return Err(Problem::new(
                    "client_policy.allowed_common_names",
                    format!(
                        "entry {} (\"{cn}\") is not an exact name or a \"*.suffix\" pattern",
                        i + 1
                    ),
                ));
            }
        }
        if let Some(webex) = &self.webex {
            for (key, url) in [
                ("webex.api_base", &webex.api_base),
                ("webex.token_url", &webex.token_url),
            ] {
                if !url.starts_with("https://") {
                    return Err(Problem::new(
                        key,
                        format!(
                            "\"{url}\" must be an https:// URL: Webex is only reachable over TLS"
                        ),
                    ));
                }
            }
            if webex.client_id.trim().is_empty() {
                return Err(Problem::new(
                    "webex.client_id",
                    "is empty; copy the client id of your Webex integration from the Developer Portal",
                ));
            }
            if webex.attempts == 0 {
                return Err(Problem::new(
                    "webex.attempts",
                    "must be at least 1 (default 3)",
                ));
            }
            if webex.max_parallel_users == 0 {
                return Err(Problem::new(
                    "webex.max_parallel_users",
                    "must be at least 1 (default 32)",
                ));
            }
            if webex.request_timeout_ms == 0 {
                return Err(Problem::new(
                    "webex.request_timeout_ms",
                    "must be greater than 0 (default 2000)",
                ));
            }
        }
        if let Some(tunnel) = &self.tunnel {
            if !tunnel.tls && tunnel.allowed_networks.is_empty() {
                return Err(Problem::new(
                    "tunnel.allowed_networks",
                    "must list the AS addresses when tunnel.tls = false: a plain tunnel open to any address would be an open proxy in the DMZ",
                ));
            }
            if tunnel.allowed_destinations.is_empty() {
                return Err(Problem::new(
                    "tunnel.allowed_destinations",
                    "is empty, so every CONNECT would be refused; list e.g. \"*.wbx2.com:443\"",
                ));
            }
            for dest in &tunnel.allowed_destinations {
                if let Err(why) = check_destination_pattern(dest) {
                    return Err(Problem::new(
                        "tunnel.allowed_destinations",
                        format!("\"{dest}\" {why}; write host:port or *.suffix:port"),
                    ));
                }
            }
            if tunnel.max_tunnels == 0 {
                return Err(Problem::new(
                    "tunnel.max_tunnels",
                    "must be at least 1 (default 1024)",
                ));
            }
            if tunnel.connect_timeout_ms == 0 {
                return Err(Problem::new(
                    "tunnel.connect_timeout_ms",
                    "must be greater than 0 (default 2000)",
                ));
            }
        }
        if let Some(account) = self.tunnel.as_ref().and_then(|t| t.proxy_account.as_ref()) {
            check_password_hash(account)
                .map_err(|m| Problem::new("tunnel.proxy_account.password_hash", m))?;
        }
        Ok(())
    }

    fn template_names(&self) -> String {
        if self.templates.is_empty() {
            "(none defined)".to_owned()
        } else {
            self.templates
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// `host:port` or `*.suffix:port`, port 1–65535.
fn check_destination_pattern(dest: &str) -> Result<(), &'static str> {
    let (host, port) = dest.rsplit_once(':').ok_or("has no port")?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err("has an invalid port"),
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.is_empty() || name.contains('*') {
        return Err("is not a host name or a *.suffix pattern");
    }
    Ok(())
}

/// A password hash must be a PHC string (`$argon2id$v=19$m=…`), as `flowthrough hash-password`
/// prints; a plain password in the config is refused so it can never be stored in clear.
pub fn check_password_hash(account: &PasswordAccount) -> Result<(), String> {
    if account.user.is_empty() {
        return Err("the account has an empty user name".to_owned());
    }
    argon2::PasswordHash::new(account.password_hash.expose())
        .map(|_| ())
        .map_err(|_| {
            "is not an Argon2 PHC hash ($argon2id$…); generate one with `flowthrough hash-password` and paste its output — never the plain password".to_owned()
        })
}

struct Problem {
    key: String,
    message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Debug for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn quote_key(key: &str) -> String {
    if key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        format!("\"{key}\"")
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where a dotted key is written, found by walking the spanned document.
fn key_line(text: &str, dotted: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let path = split_key_path(dotted);
    let mut table = doc.get_ref();
    let mut last_span = None;
    for (i, part) in path.iter().enumerate() {
        // A missing key (a required one left out) is reported at its table.
        let Some((key, value)) = table.get_key_value(part.as_str()) else {
            break;
        };
        last_span = Some(key.span().start);
        if i + 1 < path.len() {
            match value.get_ref() {
                toml::de::DeValue::Table(t) => table = t,
                _ => break,
            }
        }
    }
    last_span.map(|s| line_of(text, s))
}

fn split_key_path(dotted: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in dotted.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
[templates.acme]
provisioning_id = "prov-1"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn invalid(text: &str) -> (Option<usize>, String, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn the_shipped_example_is_valid_and_documents_every_section() {
        let text = include_str!("../deploy/flowthrough.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.default_template.as_deref(), Some("acme"));
        let server = config.server.as_ref().unwrap();
        assert_eq!(server.max_body_bytes, 262_144);
        assert_eq!(server.ack_deadline_ms, 5000);
        assert!(!server.session_resumption);
        assert_eq!(config.webex.as_ref().unwrap().attempts, 3);
        assert_eq!(config.store.cache_mib, 32);
        assert_eq!(config.tunnel.as_ref().unwrap().max_tunnels, 1024);
        assert_eq!(config.template_overrides["acme-ent"], "acme");
        assert!(config.templates["acme"].provisioning_account.is_some());
    }

    #[test]
    fn the_node_id_defaults_to_the_host_name_and_is_never_empty() {
        let config = parse(TEMPLATE).unwrap();
        assert!(!config.cluster.node_id.is_empty());
        let named = parse(&format!("{TEMPLATE}[cluster]\nnode_id = \"dmz-a\"\n")).unwrap();
        assert_eq!(named.cluster.node_id, "dmz-a");
        let (_, key, message) = invalid(&format!("{TEMPLATE}[cluster]\nnode_id = \" \"\n"));
        assert_eq!(key, "cluster.node_id");
        assert!(message.contains("host name"), "{message}");
    }

    #[test]
    fn translate_needs_only_templates() {
        let config = parse(TEMPLATE).unwrap();
        assert!(config.server.is_none() && config.webex.is_none() && config.tunnel.is_none());
        assert_eq!(config.client_policy, ClientPolicyConfig::default());
        assert_eq!(config.templates["acme"].default_language, "en_US");
    }

    #[test]
    fn unknown_keys_are_errors_located_at_their_line() {
        let text = format!("{TEMPLATE}countyr = \"US\"\n");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, Some(9));
        assert!(message.contains("countyr"), "{message}");
        let rendered = parse(&text).unwrap_err().to_string();
        assert!(rendered.starts_with("test.toml:9: "), "{rendered}");
    }

    #[test]
    fn wrong_types_and_enum_values_name_the_line() {
        let text = TEMPLATE.replace("\"standard\"", "\"gold\"");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, Some(4));
        assert!(
            message.contains("gold") || message.contains("variant"),
            "{message}"
        );
    }

    #[test]
    fn references_to_missing_templates_name_the_key_and_the_choices() {
        let text = format!("default_template = \"nope\"\n{TEMPLATE}");
        let (line, key, message) = invalid(&text);
        assert_eq!((line, key.as_str()), (Some(1), "default_template"));
        assert!(message.contains("acme"), "{message}");

        let text = format!("{TEMPLATE}\n[template_overrides]\n\"sp.one\" = \"missing\"\n");
        let (line, key, _) = invalid(&text);
        assert_eq!(key, "template_overrides.\"sp.one\"");
        assert_eq!(line, Some(11));
    }

    #[test]
    fn the_postgres_store_keys_are_read_with_their_defaults() {
        assert_eq!(parse(TEMPLATE).unwrap().store.backend, StoreBackend::Sled);
        let text = format!(
            "{TEMPLATE}\n[store]\nbackend = \"postgres\"\n\n[store.postgres]\nhost = \"db.example.net\"\ndbname = \"flowthrough\"\nuser = \"flowthrough\"\nca_bundle = \"/etc/flowthrough/db-ca.pem\"\n"
        );
        let store = parse(&text).unwrap().store;
        assert_eq!(store.backend, StoreBackend::Postgres);
        let pg = store.postgres.unwrap();
        assert_eq!(pg.tls, PostgresTls::VerifyFull);
        assert_eq!(
            (pg.pool_size, pg.connect_timeout_ms, pg.statement_timeout_ms),
            (16, 5000, 10_000)
        );
        assert_eq!(pg.password_source().env, "FLOWTHROUGH_PG_PASSWORD");
        let url = format!(
            "{TEMPLATE}\n[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgresql://flowthrough@db:5433/ft?sslmode=disable\"\ntls = \"require\"\n"
        );
        assert_eq!(
            parse(&url).unwrap().store.postgres.unwrap().tls,
            PostgresTls::Require
        );
    }

    #[test]
    fn a_bad_postgres_store_section_names_its_line_and_key() {
        let section = |body: &str| {
            format!("{TEMPLATE}\n[store]\nbackend = \"postgres\"\n\n[store.postgres]\n{body}")
        };
        for (body, key, line, says) in [
            (
                "url = \"postgresql://flowthrough:s3cret@db/ft\"\ntls = \"disable\"\n",
                "store.postgres.url",
                Some(14),
                "holds a password",
            ),
            (
                "url = \"host=db user=ft password=s3cret\"\ntls = \"disable\"\n",
                "store.postgres.url",
                Some(14),
                "holds a password",
            ),
            (
                "url = \"postgres://db/ft?user=ft&password=x\"\ntls = \"disable\"\n",
                "store.postgres.url",
                Some(14),
                "holds a password",
            ),
            (
                "url = \"postgresql://ft@db/ft\"\nhost = \"db\"\ntls = \"disable\"\n",
                "store.postgres.url",
                Some(14),
                "either the url or",
            ),
            (
                "host = \"db\"\nuser = \"ft\"\ntls = \"disable\"\n",
                "store.postgres.dbname",
                Some(13),
                "required",
            ),
            (
                "host = \"db\"\ndbname = \"ft\"\nuser = \"ft\"\n",
                "store.postgres.ca_bundle",
                Some(13),
                "verify-full",
            ),
            (
                "url = \"postgresql://ft@db/ft\"\ntls = \"disable\"\npool_size = 0\n",
                "store.postgres.pool_size",
                Some(16),
                "at least 1",
            ),
        ] {
            let (got_line, got_key, message) = invalid(&section(body));
            assert_eq!(
                (got_key.as_str(), got_line),
                (key, line),
                "{body}: {message}"
            );
            assert!(message.contains(says), "{body}: {message}");
        }
        let (_, key, message) = invalid(&format!("{TEMPLATE}\n[store]\nbackend = \"postgres\"\n"));
        assert_eq!(key, "store.backend");
        assert!(message.contains("[store.postgres]"), "{message}");
        let err = parse(&section("tls = \"verify-ca\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml:14") && err.contains("verify-ca"),
            "{err}"
        );
        let err = parse(&section("passwrd = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn a_store_cache_of_zero_is_refused() {
        let text = format!("{TEMPLATE}\n[store]\ncache_mib = 0\n");
        let (line, key, message) = invalid(&text);
        assert_eq!(key, "store.cache_mib");
        assert_eq!(line, Some(11));
        assert!(message.contains("at least 1"), "{message}");
        let text = format!("{TEMPLATE}\n[store]\ncache_mib = 8\n");
        assert_eq!(parse(&text).unwrap().store.cache_mib, 8);
        assert_eq!(parse(TEMPLATE).unwrap().store.cache_mib, DEFAULT_CACHE_MIB);
    }

    #[test]
    fn server_workers_default_to_two_and_must_be_1_to_64() {
        let server =
            |extra: &str| format!("{TEMPLATE}\n[server]\nlisten = [\"127.0.0.1:8443\"]\n{extra}");
        assert_eq!(parse(&server("")).unwrap().server.unwrap().workers, 2);
        assert_eq!(
            parse(&server("workers = 1\n"))
                .unwrap()
                .server
                .unwrap()
                .workers,
            1
        );
        for bad in ["workers = 0\n", "workers = 65\n"] {
            let (line, key, message) = invalid(&server(bad));
            assert_eq!(key, "server.workers");
            assert_eq!(line, Some(12), "{bad}");
            assert!(message.contains("use 1 to 64"), "{message}");
        }
    }

    #[test]
    fn a_plain_tunnel_must_be_restricted_to_networks() {
        let text = format!("{TEMPLATE}\n[tunnel]\ntls = false\n");
        let (line, key, message) = invalid(&text);
        assert_eq!(key, "tunnel.allowed_networks");
        assert_eq!(
            line,
            Some(10),
            "points at the [tunnel] table when the key is absent"
        );
        assert!(message.contains("open proxy"), "{message}");
        let ok =
            format!("{TEMPLATE}\n[tunnel]\ntls = false\nallowed_networks = [\"192.0.2.0/24\"]\n");
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn destination_patterns_and_accounts_are_checked() {
        let text = format!("{TEMPLATE}\n[tunnel]\nallowed_destinations = [\"*.wbx2.com\"]\n");
        let (_, key, message) = invalid(&text);
        assert_eq!(key, "tunnel.allowed_destinations");
        assert!(message.contains("no port"), "{message}");

        let text = format!(
            "{TEMPLATE}\n[tunnel]\nproxy_account = {{ user = \"p\", password_hash = \"secret123\" }}\n"
        );
        let (_, key, message) = invalid(&text);
        assert_eq!(key, "tunnel.proxy_account.password_hash");
        assert!(
            !message.contains("secret123"),
            "the value is never echoed: {message}"
        );
    }

    #[test]
    fn webex_urls_must_be_https() {
        let text = format!("{TEMPLATE}\n[webex]\nclient_id = \"c\"\napi_base = \"http://x\"\n");
        let (line, key, _) = invalid(&text);
        assert_eq!((line, key.as_str()), (Some(12), "webex.api_base"));
    }

    #[test]
    fn secret_sources_prefer_the_environment_name() {
        let text = format!("{TEMPLATE}\n[webex]\nclient_id = \"c\"\nclient_secret_file = \"/s\"\n");
        let config = parse(&text).unwrap();
        let source = config.webex.unwrap().client_secret_source();
        assert_eq!(source.env, "FLOWTHROUGH_CLIENT_SECRET");
        assert_eq!(source.file.as_deref(), Some(Path::new("/s")));
    }
}
