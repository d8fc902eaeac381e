//! `flowthrough sandbox`: the real server on loopback with development certificates and the Webex
//! API simulator, ready for curl. One command on a fresh machine; Ctrl-C stops it cleanly.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::fail;
use crate::certs::{DevPki, DevPkiFiles};
use crate::config::{Config, LogConfig};
use crate::sim::{SimHandle, SimOptions, Simulator};

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Folder for the generated certificates, config and store (recreated each run).
    #[arg(long, value_name = "DIR", default_value = "sandbox")]
    dir: PathBuf,
    /// Port of the provisioning listener on 127.0.0.1.
    #[arg(long, default_value_t = 8443)]
    port: u16,
    /// Port of the admin listener on 127.0.0.1.
    #[arg(long, default_value_t = 9090)]
    admin_port: u16,
    /// Port of the CONNECT tunnel on 127.0.0.1 (it reaches only the simulator).
    #[arg(long, default_value_t = 8080)]
    tunnel_port: u16,
    /// Send the sample documents through the sandbox, print what happened, and stop.
    #[arg(long)]
    demo: bool,
}

/// The sample documents the demo sends, in an order that tells a story.
const DEMO: [(&str, &[u8]); 7] = [
    (
        "user-add-17sp4.xml",
        include_bytes!("../../schemas/samples/user-add-17sp4.xml"),
    ),
    (
        "user-add-22v2.xml",
        include_bytes!("../../schemas/samples/user-add-22v2.xml"),
    ),
    (
        "user-modify-22.xml",
        include_bytes!("../../schemas/samples/user-modify-22.xml"),
    ),
    (
        "service-unassign-impp.xml",
        include_bytes!("../../schemas/samples/service-unassign-impp.xml"),
    ),
    (
        "service-assign-impp.xml",
        include_bytes!("../../schemas/samples/service-assign-impp.xml"),
    ),
    (
        "group-add.xml",
        include_bytes!("../../schemas/samples/group-add.xml"),
    ),
    (
        "user-delete.xml",
        include_bytes!("../../schemas/samples/user-delete.xml"),
    ),
];

pub fn run(args: SandboxArgs) -> ExitCode {
    // The demo prints a table: keep the log to problems only.
    let level = if args.demo {
        "warn"
    } else {
        "warn,flowthrough=info"
    };
    let _log_writer = crate::logging::init(&LogConfig {
        level: level.to_owned(),
        ..LogConfig::default()
    });
    let system = actix_rt::System::new();
    match system.block_on(sandbox(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn sandbox(args: SandboxArgs) -> Result<(), String> {
    let dir = &args.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| {
            format!(
                "{}: cannot clear the sandbox folder: {e}; remove it or pass --dir",
                dir.display()
            )
        })?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let (_, pki) = DevPki::generate(&dir.join("pki")).map_err(|e| e.to_string())?;
    let sim = Simulator::start(SimOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let config_path = write_config(dir, &pki, &sim, &args)?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let running = crate::server::start(config).await.map_err(|e| {
        format!("{e}\n(is another sandbox running? pass --port/--admin-port to use other ports)")
    })?;
    let base = format!("https://localhost:{}", running.provisioning_addrs[0].port());
    let proxy = running
        .tunnel_addrs
        .first()
        .map(|a| format!("https://localhost:{}", a.port()))
        .unwrap_or_default();
    print_banner(
        dir,
        &pki,
        &sim,
        &base,
        &proxy,
        running.admin_addr,
        &config_path,
    );

    if args.demo {
        let result = demo(&pki, &base).await;
        running
            .shutdown(Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        sim.stop().await;
        return result;
    }
    println!("Ctrl-C stops the sandbox.");
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping: draining in-flight work, flushing the store…");
    running
        .shutdown(Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    sim.stop().await;
    println!("stopped.");
    Ok(())
}

fn write_secret(path: &Path, value: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(value.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A real config file, so the operator can read what the sandbox runs and start from it.
fn write_config(
    dir: &Path,
    pki: &DevPkiFiles,
    sim: &SimHandle,
    args: &SandboxArgs,
) -> Result<PathBuf, String> {
    let abs = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_owned())
            .display()
            .to_string()
    };
    let sim_ca = dir.join("simulator-ca.pem");
    std::fs::write(&sim_ca, &sim.ca_pem).map_err(|e| format!("{}: {e}", sim_ca.display()))?;
    write_secret(&dir.join("client_secret"), sim.client_secret.expose())?;
    write_secret(&dir.join("refresh_token"), sim.refresh_token.expose())?;
    let provisioning = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, args.admin_port));
    let tunnel = SocketAddr::from((Ipv4Addr::LOCALHOST, args.tunnel_port));
    let sim_port = sim.port;
    let text = format!(
        r#"# Generated by `flowthrough sandbox`: development certificates and the Webex API SIMULATOR.
# Never use this file in production; start from deploy/flowthrough.example.toml instead.
default_template = "sandbox"

[server]
listen = ["{provisioning}"]
certificate = "{server_cert}"
private_key = "{server_key}"
client_ca = "{ca}"
public_name = "localhost"

[admin]
listen = "{admin}"

[store]
path = "{store}"

[log]
level = "warn,flowthrough=info"

[webex]
# The simulator, NOT Webex.
api_base = "{base}"
token_url = "{base}/access_token"
ca_bundle = "{sim_ca}"
client_id = "{client_id}"
client_secret_file = "{secret}"
refresh_token_file = "{refresh}"
follow_up_s = 30

[templates.sandbox]
provisioning_id = "sandbox-provisioning-id"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
default_language = "en_US"
default_timezone = "America/New_York"

[template_overrides]
"acme-ent" = "sandbox"

[tunnel]
listen = ["{tunnel}"]
# Only the simulator; loopback is a private destination, allowed here and nowhere else.
allowed_destinations = ["127.0.0.1:{sim_port}", "localhost:{sim_port}"]
allow_private_destinations = true
"#,
        server_cert = abs(&pki.server_cert),
        server_key = abs(&pki.server_key),
        ca = abs(&pki.ca_cert),
        store = abs(&dir.join("store")),
        base = sim.base_url,
        sim_ca = abs(&sim_ca),
        client_id = sim.client_id,
        secret = abs(&dir.join("client_secret")),
        refresh = abs(&dir.join("refresh_token")),
    );
    let path = dir.join("flowthrough.toml");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn print_banner(
    dir: &Path,
    pki: &DevPkiFiles,
    sim: &SimHandle,
    base: &str,
    proxy: &str,
    admin: SocketAddr,
    config: &Path,
) {
    let d = dir.display();
    println!();
    println!(
        "flowthrough sandbox is running (development certificates, Webex API SIMULATOR — not Webex)"
    );
    println!(
        "  provisioning  {base}/provisioning  (mTLS; client certificate {})",
        pki.client_cert.display()
    );
    println!("  tunnel        {proxy}  (CONNECT, mTLS; reaches only the simulator)");
    println!("  admin         http://{admin}/status  /metrics  /readyz");
    println!(
        "  simulator     {}   state: {}/_sim/state",
        sim.base_url,
        sim.base_url.trim_end_matches("/v1")
    );
    println!("  config        {}", config.display());
    println!();
    println!("Provision a user (paste as is, from the project folder):");
    println!(
        "  curl --cacert {d}/pki/ca.pem --cert {d}/pki/client.pem --key {d}/pki/client.key \\\n       -H 'Content-Type: text/xml' --data-binary @schemas/samples/user-add-17sp4.xml \\\n       {base}/provisioning"
    );
    println!(
        "See what the simulator holds, through the tunnel (the Provisioning Adapter Proxy role):"
    );
    println!(
        "  curl --proxy {proxy} --proxy-cacert {d}/pki/ca.pem --proxy-cert {d}/pki/client.pem \\\n       --proxy-key {d}/pki/client.key --cacert {d}/simulator-ca.pem {}/_sim/state",
        sim.base_url.trim_end_matches("/v1")
    );
    println!();
}

/// Send the samples and print a table of what happened.
async fn demo(pki: &DevPkiFiles, base: &str) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut identity = read(&pki.client_cert)?;
    identity.extend(read(&pki.client_key)?);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .identity(reqwest::Identity::from_pem(&identity).map_err(|e| e.to_string())?)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&read(&pki.ca_cert)?).map_err(|e| e.to_string())?,
        )
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    println!(
        "{:<26} {:<32} {:<34} {:<8} AS got",
        "document", "command", "user", "Webex"
    );
    let mut failures = 0;
    for (name, body) in DEMO {
        let document = crate::oci::parse(body, &crate::oci::ParseLimits::default())
            .map_err(|e| format!("{name}: {e}"))?;
        let response = client
            .post(format!("{base}/provisioning"))
            .header("content-type", "text/xml")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let outcome = summarize(status.as_u16(), &text);
        if !outcome.starts_with("Success") {
            failures += 1;
        }
        for request in &document.commands {
            let user = crate::mapping::command_user_id(&request.command).unwrap_or("-");
            let call = match &request.command {
                crate::oci::Command::UserAdd(_) => "POST",
                crate::oci::Command::UserModify(_) => "PUT",
                crate::oci::Command::UserDelete { .. }
                | crate::oci::Command::ServiceUnassign { .. } => "DELETE",
                crate::oci::Command::ServiceAssign { .. } => "POST",
                _ => "-",
            };
            println!(
                "{name:<26} {:<32} {user:<34} {call:<8} {outcome}",
                request.name
            );
        }
    }
    if failures > 0 {
        return Err(format!(
            "{failures} demo document(s) did not succeed; see the table above"
        ));
    }
    println!("\nAll sample documents went through. Run without --demo to keep the sandbox up.");
    Ok(())
}

fn summarize(status: u16, body: &str) -> String {
    if status != 200 {
        return format!("HTTP {status}");
    }
    if body.contains("SuccessResponse") {
        return "SuccessResponse".to_owned();
    }
    let code = body
        .split("<errorCode>")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or("?");
    format!("ErrorResponse {code}")
}
