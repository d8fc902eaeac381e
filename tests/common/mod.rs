//! Shared set-up for the end-to-end tests: a development PKI, the Webex simulator on loopback, a
//! config pointing flowthrough at it, and an mTLS HTTP client playing the Application Server.
#![allow(dead_code)]

pub mod pg;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowthrough::certs::{DevPki, DevPkiFiles};
use flowthrough::sim::{SimHandle, SimOptions, Simulator};

pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: DevPkiFiles,
    pub sim: SimHandle,
    /// The store's database when the world runs on PostgreSQL; sled in the temp dir otherwise.
    pub postgres: Option<(std::sync::Arc<pg::PgCluster>, String)>,
}

/// The store backend a world's flowthrough runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Postgres,
}

/// The template section every end-to-end test uses.
pub const TEMPLATES: &str = r#"
default_template = "acme"

[templates.acme]
provisioning_id = "prov-acme"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
default_language = "en_US"
default_timezone = "America/New_York"

[templates.secured]
provisioning_id = "prov-secured"
package = "premium"
enterprise_mode = true
user_verification = "untrusted_email"
country = "CA"
calling_code = "+1"
# the hash of "example"
provisioning_account = { user = "bwprov", password_hash = "$argon2id$v=19$m=19456,t=2,p=1$HtZRe3yMJpIqn3mydWJc/g$WSRbdHsv8TkI2m0TaLxdy4DPuG6ewn0F14ClEuMvv+4" }

[template_overrides]
"acme-ent" = "acme"
"secure-ent" = "secured"
"#;

impl World {
    pub async fn new(options: SimOptions) -> World {
        World::on(options, Backend::Sled).await
    }

    /// A world whose store is `backend`: on PostgreSQL, a new database of the test binary's
    /// shared cluster.
    pub async fn on(options: SimOptions, backend: Backend) -> World {
        let postgres = match backend {
            Backend::Sled => None,
            Backend::Postgres => {
                let cluster = pg::PgCluster::shared();
                let db = cluster.database();
                Some((cluster, db))
            }
        };
        World::with_store(options, postgres).await
    }

    /// A world on `dbname` of `cluster` (a cluster of the test's own, to stop and start).
    pub async fn on_cluster(options: SimOptions, cluster: std::sync::Arc<pg::PgCluster>) -> World {
        let db = cluster.database();
        World::with_store(options, Some((cluster, db))).await
    }

    async fn with_store(
        options: SimOptions,
        postgres: Option<(std::sync::Arc<pg::PgCluster>, String)>,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let (_, pki) = DevPki::generate(&dir.path().join("pki")).unwrap();
        let sim = Simulator::start(options).await.unwrap();
        std::fs::write(dir.path().join("sim-ca.pem"), &sim.ca_pem).unwrap();
        for (name, secret) in [
            ("client_secret", &sim.client_secret),
            ("refresh_token", &sim.refresh_token),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, secret.expose()).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        World {
            dir,
            pki,
            sim,
            postgres,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A complete config: loopback listeners on free ports, the store in the temp dir, Webex at
    /// the simulator. `extra` is appended (more sections or keys).
    pub fn config_text(&self, server_extra: &str, extra: &str) -> String {
        let p = |path: &Path| path.display().to_string();
        format!(
            r#"{TEMPLATES}
[server]
listen = ["127.0.0.1:0"]
certificate = "{cert}"
private_key = "{key}"
client_ca = "{ca}"
public_name = "localhost"
{ack}
{server_extra}

[admin]
listen = "127.0.0.1:0"

{store}

[webex]
api_base = "{base}"
token_url = "{base}/access_token"
ca_bundle = "{sim_ca}"
client_id = "{client_id}"
client_secret_file = "{secret}"
refresh_token_file = "{refresh}"
{timeout}
follow_up_s = 5
{extra}
"#,
            ack = if server_extra.contains("ack_deadline_ms") {
                ""
            } else {
                "ack_deadline_ms = 3000"
            },
            timeout = if extra.contains("request_timeout_ms") {
                ""
            } else {
                "request_timeout_ms = 1000"
            },
            cert = p(&self.pki.server_cert),
            key = p(&self.pki.server_key),
            ca = p(&self.pki.ca_cert),
            store = match &self.postgres {
                Some((cluster, db)) => cluster.store_section(db),
                None => format!("[store]\npath = \"{}\"", p(&self.path("store"))),
            },
            base = self.sim.base_url,
            sim_ca = p(&self.path("sim-ca.pem")),
            client_id = self.sim.client_id,
            secret = p(&self.path("client_secret")),
            refresh = p(&self.path("refresh_token")),
        )
    }

    pub fn config(&self, server_extra: &str, extra: &str) -> flowthrough::config::Config {
        let text = self.config_text(server_extra, extra);
        flowthrough::config::Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    /// The AS: an HTTPS client presenting the BroadWorks client certificate.
    pub fn as_client(&self) -> reqwest::Client {
        self.client_with(&self.pki.client_cert, &self.pki.client_key)
    }

    pub fn client_with(&self, cert: &Path, key: &Path) -> reqwest::Client {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        let ca = std::fs::read(&self.pki.ca_cert).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .pool_max_idle_per_host(4)
            .build()
            .unwrap()
    }

    /// The simulator's subscribers.
    pub fn subscribers(&self) -> Vec<serde_json::Value> {
        self.sim.state()["subscribers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn subscriber(&self, user_id: &str) -> Option<serde_json::Value> {
        self.subscribers()
            .into_iter()
            .find(|s| s["userId"].as_str() == Some(user_id))
    }
}

/// A sample document from `schemas/samples`.
pub fn sample(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/samples")
        .join(name);
    let bytes = std::fs::read(&path).unwrap();
    // The samples are ISO-8859-1 and ASCII-only, so this is exact.
    bytes.iter().map(|&b| b as char).collect()
}

/// A one-command OCI-P document.
pub fn document(command: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sessionId xmlns="">sess-1</sessionId>{command}</BroadsoftDocument>"#
    )
}

pub fn user_add(user_id: &str, email: Option<&str>) -> String {
    let email = email
        .map(|e| format!("<emailAddress>{e}</emailAddress>"))
        .unwrap_or_default();
    format!(
        r#"<command xsi:type="UserAddRequest17sp4" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId><userId>{user_id}</userId><lastName>Test</lastName><firstName>User</firstName><password>x</password><extension>1234</extension><language>English</language>{email}</command>"#
    )
}

/// One response command of an OCI-P answer: (xsi:type, errorCode, whole command text).
#[derive(Debug, Clone)]
pub struct Answer {
    pub kind: String,
    pub code: Option<u16>,
    pub severity: Option<String>,
    pub text: String,
}

/// Split an OCI-P response document into its commands (a light reading: the parser's own tests
/// and xmllint validate the writer; here the test only needs each command's type and code).
pub fn answers(body: &str) -> Vec<Answer> {
    body.split("<command")
        .skip(1)
        .map(|chunk| {
            let kind = between(chunk, "xsi:type=\"", "\"").unwrap_or_default();
            let code = between(chunk, "<errorCode>", "</errorCode>").and_then(|c| c.parse().ok());
            let severity = between(chunk, " type=\"", "\"");
            Answer {
                kind,
                code,
                severity,
                text: chunk.to_owned(),
            }
        })
        .collect()
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].to_owned())
}

/// Poll `check` until it holds or `limit` passes (not a timing assertion: a bound against hangs).
pub async fn eventually(limit: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if check() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check()
}

/// GET a URL (the admin listener) and return its body as text.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// GET a URL (the admin listener) and return its body as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Run the `flowthrough` binary: exit code, stdout, stderr.
pub fn flowthrough(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A path as an argument.
pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `flowthrough serve` config for a child process: fixed ports, so it can be restarted on them.
pub struct Served {
    pub config: PathBuf,
    pub admin: String,
    pub url: String,
}

/// Write the config of a `flowthrough serve` child process pointed at `world`.
pub fn serve_config(world: &World, server_extra: &str) -> Served {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let text = world
        .config_text(server_extra, &format!("\n[admin]\nlisten = \"{admin}\"\n"))
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        )
        .replace("[admin]\nlisten = \"127.0.0.1:0\"\n", "");
    let config = world.path("flowthrough.toml");
    std::fs::write(&config, text).unwrap();
    Served {
        config,
        admin,
        url: format!("https://localhost:{port}/provisioning"),
    }
}

/// The command that runs `flowthrough serve` with `config`, its log at `level` to `stderr`.
pub fn serve_command(config: &Path, level: &str, stderr: Stdio) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowthrough"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(stderr);
    command
}

/// `flowthrough serve` as a child process, its log at `level` to `stderr`.
pub fn spawn(config: &Path, level: &str, stderr: Stdio) -> ServeChild {
    ServeChild(serve_command(config, level, stderr).spawn().unwrap())
}

/// A child process killed when dropped, so that a test failing before it stops its `serve`
/// leaves none running (with its ports, its store and its CPU) behind the test run. A child
/// the test already ended is only reaped.
pub struct ServeChild(pub Child);

impl std::ops::Deref for ServeChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ServeChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Wait until the child's admin listener answers and says it is ready.
pub async fn wait_ready(admin: &str) {
    let ready = eventually(Duration::from_secs(30), || {
        std::net::TcpStream::connect(admin).is_ok()
    })
    .await;
    assert!(ready, "flowthrough did not start listening on {admin}");
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("http://{admin}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("flowthrough never became ready");
}
