//! `flowthrough certs …`: the certificate tooling on the command line. Exit codes: 0 done or
//! passed, 1 usage or I/O error, 2 a certificate fails the client policy (`verify`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};

use crate::certs::{self, CaParams, CertsError, CsrParams, KeyType, LeafParams, OutFile};
use crate::config::ClientPolicyConfig;
use crate::secret::Secret;
use crate::tls;

#[derive(Debug, Args)]
#[command(about = "Create an internal CA, issue, inspect and verify certificates")]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create an internal CA (ca.pem, ca.key).
    Ca(CaArgs),
    /// Issue a server certificate (DNS/IP SANs, EKU serverAuth) from the CA.
    Server(ServerArgs),
    /// Issue a BroadWorks client certificate (EKU BroadWorks OID + clientAuth, no SAN).
    Client(ClientArgs),
    /// Write a key and a CSR for an external CA.
    Csr(CsrArgs),
    /// Show certificates (PEM or DER, bundles) and their verdict against the client policy.
    Inspect(InspectArgs),
    /// Check a client certificate chain against a CA bundle, CRLs and the client policy.
    Verify(VerifyArgs),
    /// Write a CRL signed by the CA revoking the given serial numbers.
    Crl(CrlArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// ecdsa-p256, ecdsa-p384, rsa2048, rsa3072 or rsa4096.
    #[arg(long, default_value = "ecdsa-p256", value_parser = clap::builder::ValueParser::new(str::parse::<KeyType>))]
    pub key_type: KeyType,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Output directory.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Common name of the CA, e.g. "ACME BroadWorks DMZ CA".
    #[arg(long)]
    pub cn: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Maximum number of intermediate CAs below this one.
    #[arg(long, default_value_t = 1)]
    pub pathlen: u8,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long, default_value = "certs")]
    pub ca: PathBuf,
    /// DNS names the server answers to (SANs); include the name the AS connects to.
    #[arg(long, required = true, num_args = 1..)]
    pub dns: Vec<String>,
    /// IP addresses the server answers to (SANs).
    #[arg(long, num_args = 1..)]
    pub ip: Vec<std::net::IpAddr>,
    /// Validity in days (825 keeps clients that cap server certificates happy).
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// File stem: <name>.pem and <name>.key.
    #[arg(long, default_value = "server")]
    pub name: String,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long, default_value = "certs")]
    pub ca: PathBuf,
    /// Common name; Webex's BroadWorks deployment uses bwcticlient.webex.com.
    #[arg(long, default_value = certs::DEFAULT_CLIENT_CN)]
    pub cn: String,
    /// Validity in days.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// File stem: <name>.pem and <name>.key.
    #[arg(long, default_value = "client")]
    pub name: String,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct CsrArgs {
    /// Common name to request.
    #[arg(long)]
    pub cn: String,
    /// Request EKU BroadWorks OID + clientAuth.
    #[arg(long)]
    pub broadworks_client: bool,
    /// DNS names to request as SANs (server certificates only: BroadWorks client certificates carry no SAN).
    #[arg(long, num_args = 1..)]
    pub dns: Vec<String>,
    /// File stem: <name>.csr and <name>.key (default: client with --broadworks-client, else server).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Certificate files: PEM (bundles too) or DER.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// CA bundle (PEM) the certificate must chain to.
    #[arg(long)]
    pub ca: PathBuf,
    /// The certificate, optionally followed by its intermediates (PEM or DER).
    pub cert: PathBuf,
    /// CRL files (PEM or DER) to check revocation against (repeatable).
    #[arg(long)]
    pub crl: Vec<PathBuf>,
    /// Accept a client certificate that has a SAN (refused by default).
    #[arg(long)]
    pub allow_san: bool,
    /// Do not require the BroadWorks OID in EKU.
    #[arg(long)]
    pub no_broadworks_oid: bool,
    /// Do not require TLS Web Client Authentication in EKU.
    #[arg(long)]
    pub no_client_auth: bool,
    /// Allowed CN, exact or "*.suffix" (repeatable; default bwcticlient.webex.com).
    #[arg(long)]
    pub cn: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CrlArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long, default_value = "certs")]
    pub ca: PathBuf,
    /// Serial numbers in hex (as `certs inspect` prints them).
    #[arg(long, num_args = 1..)]
    pub revoke: Vec<String>,
    /// Days until nextUpdate.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Output directory (crl.pem).
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Overwrite an existing crl.pem.
    #[arg(long)]
    pub force: bool,
}

/// Run a `certs` subcommand.
pub fn run(args: CertsArgs) -> ExitCode {
    let result = match args.command {
        CertsCommand::Ca(a) => ca(a),
        CertsCommand::Server(a) => server(a),
        CertsCommand::Client(a) => client(a),
        CertsCommand::Csr(a) => csr(a),
        CertsCommand::Inspect(a) => inspect(a),
        CertsCommand::Verify(a) => verify(a),
        CertsCommand::Crl(a) => crl(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn write_and_list(dir: &Path, files: &[OutFile], force: bool) -> Result<ExitCode, CertsError> {
    let paths = certs::write_files(dir, files, force)?;
    println!("wrote:");
    for (path, file) in paths.iter().zip(files) {
        if file.private {
            println!("  {} (private key, mode 0600)", path.display());
        } else {
            println!("  {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ca(a: CaArgs) -> Result<ExitCode, CertsError> {
    let ca = certs::new_ca(&CaParams {
        cn: a.cn,
        days: a.days,
        pathlen: Some(a.pathlen),
        key_type: a.key.key_type,
        extended_key_usages: Vec::new(),
    })?;
    write_and_list(&a.key.out, &ca.files(), a.key.force)
}

fn server(a: ServerArgs) -> Result<ExitCode, CertsError> {
    let ca = certs::Ca::load(&a.ca)?;
    let mut names = a.dns;
    names.extend(a.ip.iter().map(|ip| ip.to_string()));
    let mut params = LeafParams::server(&names, a.days);
    params.key_type = a.key.key_type;
    let issued = certs::issue_leaf(&ca, &params)?;
    write_and_list(&a.key.out, &issued.files(&a.name), a.key.force)
}

fn client(a: ClientArgs) -> Result<ExitCode, CertsError> {
    let ca = certs::Ca::load(&a.ca)?;
    let mut params = LeafParams::broadworks_client(a.cn, a.days);
    params.key_type = a.key.key_type;
    let issued = certs::issue_leaf(&ca, &params)?;
    write_and_list(&a.key.out, &issued.files(&a.name), a.key.force)
}

fn csr(a: CsrArgs) -> Result<ExitCode, CertsError> {
    let name = a.name.unwrap_or_else(|| {
        if a.broadworks_client {
            "client"
        } else {
            "server"
        }
        .to_owned()
    });
    let (csr, key) = certs::make_csr(&CsrParams {
        cn: a.cn,
        broadworks_client: a.broadworks_client,
        dns: a.dns,
        key_type: a.key.key_type,
    })?;
    let files = [
        OutFile {
            name: format!("{name}.csr"),
            contents: Secret::new(csr),
            private: false,
        },
        OutFile {
            name: format!("{name}.key"),
            contents: key,
            private: true,
        },
    ];
    write_and_list(&a.key.out, &files, a.key.force)
}

fn crl(a: CrlArgs) -> Result<ExitCode, CertsError> {
    let ca = certs::Ca::load(&a.ca)?;
    let pem = certs::make_crl(&ca, &a.revoke, a.days)?;
    let file = OutFile {
        name: "crl.pem".to_owned(),
        contents: Secret::new(pem),
        private: false,
    };
    write_and_list(&a.out, &[file], a.force)
}

fn inspect(a: InspectArgs) -> Result<ExitCode, CertsError> {
    let policy = ClientPolicyConfig::default();
    let now = SystemTime::now();
    let mut all = Vec::new();
    for path in &a.files {
        let bytes = std::fs::read(path).map_err(|e| CertsError::Io {
            path: path.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let reports = certs::inspect(&bytes, &policy, now).map_err(|e| CertsError::Io {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        all.push((path.clone(), reports));
    }
    if a.json {
        let value: Vec<_> = all
            .iter()
            .map(|(path, reports)| {
                serde_json::json!({ "file": path.display().to_string(), "certificates": reports })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&value).map_err(|e| CertsError::Parse(e.to_string()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (path, reports) in &all {
        for (i, r) in reports.iter().enumerate() {
            println!("{} [{}/{}]", path.display(), i + 1, reports.len());
            println!("  subject:   {}", r.subject);
            println!("  issuer:    {}", r.issuer);
            println!("  serial:    {}", r.serial);
            let left = if r.days_left < 0 {
                format!("EXPIRED {} days ago", -r.days_left)
            } else {
                format!("{} days left", r.days_left)
            };
            println!("  validity:  {} to {} ({left})", r.not_before, r.not_after);
            println!("  key:       {}", r.key);
            println!("  CA:        {}", if r.is_ca { "yes" } else { "no" });
            println!("  key usage: {}", list_or_none(&r.key_usage));
            println!("  EKU:       {}", list_or_none(&r.extended_key_usage));
            println!("  SAN:       {}", list_or_none(&r.subject_alt_names));
            println!("  SHA-256:   {}", r.sha256_fingerprint);
            if r.meets_client_policy {
                println!("  BroadWorks client policy: PASS");
            } else {
                println!("  BroadWorks client policy: FAIL");
                for refusal in &r.policy_refusals {
                    println!("    - [{}] {}", refusal.label, refusal.message);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

fn verify(a: VerifyArgs) -> Result<ExitCode, CertsError> {
    let tls_err = |e: tls::TlsError| CertsError::Parse(e.to_string());
    let bundle = tls::read_cert_file(&a.ca).map_err(tls_err)?;
    let chain = tls::read_cert_file(&a.cert).map_err(tls_err)?;
    let crls = a
        .crl
        .iter()
        .map(|p| tls::read_crl_file(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)?;
    let defaults = ClientPolicyConfig::default();
    let config = ClientPolicyConfig {
        require_broadworks_oid: !a.no_broadworks_oid,
        require_client_auth: !a.no_client_auth,
        allowed_common_names: if a.cn.is_empty() {
            defaults.allowed_common_names
        } else {
            a.cn
        },
        allow_san: a.allow_san,
    };
    let policy = tls::ClientPolicy::new(config, bundle, &crls).map_err(|e| CertsError::Io {
        path: a.ca.clone(),
        reason: e.to_string(),
    })?;
    match policy.check(&chain, SystemTime::now()) {
        Ok(id) => {
            println!("PASS {}", a.cert.display());
            println!("  subject: {}", id.subject);
            println!("  serial:  {}", id.serial);
            println!("  SHA-256: {}", id.sha256_fingerprint);
            Ok(ExitCode::SUCCESS)
        }
        Err(refusals) => {
            println!("FAIL {}", a.cert.display());
            for r in &refusals {
                println!("  - [{}] {r}", r.label());
            }
            Ok(ExitCode::from(2))
        }
    }
}
