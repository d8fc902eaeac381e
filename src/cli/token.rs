//! `flowthrough token status|set`: show the stored Webex token state, install a new refresh token.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::failover::Resolver;
use crate::secret::Secret;
use crate::store::Store;
use crate::webex::{TokenManager, TokenStatus, Transport, TransportOptions};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Show the token state, expiries and last refresh (from the store).
    Status {
        #[arg(long, default_value = "flowthrough.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Install a new refresh token (from --file or stdin), verified by one refresh.
    Set {
        #[arg(long, default_value = "flowthrough.toml")]
        config: PathBuf,
        /// File holding the refresh token; without it, read stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub fn run(args: TokenArgs) -> ExitCode {
    let result = match args.command {
        TokenCommand::Status { config, json } => status(&config, json),
        TokenCommand::Set { config, file } => set(&config, file.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn fmt_time(t: Option<i64>) -> String {
    t.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|d| d.to_rfc3339())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn status(config: &Path, json: bool) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let record = runtime
        .block_on(async { Store::connect_configured(&cfg.store).await?.token().await })
        .map_err(|e| e.to_string())?;
    let status = TokenStatus::of(record.as_ref());
    if json {
        let text = serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    match &status.state {
        crate::store::TokenState::Ok => println!("state:                 ok"),
        crate::store::TokenState::CredentialsInvalid { reason } => println!(
            "state:                 credentials invalid ({reason}); install a new refresh token with `flowthrough token set`"
        ),
    }
    println!(
        "access token expires:  {}",
        fmt_time(status.access_expires_at)
    );
    println!(
        "refresh token expires: {}",
        fmt_time(status.refresh_expires_at)
    );
    println!("last refresh:          {}", fmt_time(status.last_refresh));
    if status.refresh_expiring_soon {
        println!(
            "warning: the refresh token expires in less than 14 days; install a new one with `flowthrough token set`"
        );
    }
    Ok(())
}

fn set(config: &Path, file: Option<&Path>) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let webex = cfg.webex.as_ref().ok_or_else(|| {
        format!(
            "{}: there is no [webex] section; add one with client_id and the client secret source",
            config.display()
        )
    })?;
    let raw = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read the refresh token from stdin: {e}"))?;
            s
        }
    };
    let token = Secret::new(raw.trim());
    if token.is_empty() {
        return Err("the refresh token is empty; give it with --file or on stdin".to_owned());
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let store = Store::connect_configured(&cfg.store)
            .await
            .map_err(|e| e.to_string())?;
        let opts = TransportOptions::from_config(webex, Resolver::System).map_err(|e| e.to_string())?;
        let transport = Transport::new(opts).map_err(|e| e.to_string())?;
        let tokens = TokenManager::new(webex, store, transport, None)
            .await
            .map_err(|e| e.to_string())?;
        tokens
            .install_refresh_token(token)
            .await
            .map_err(|e| format!("the new refresh token was not installed: {e}"))?;
        let status = tokens.status();
        println!(
            "refresh token installed and verified; access token expires {}, refresh token expires {}",
            fmt_time(status.access_expires_at),
            fmt_time(status.refresh_expires_at)
        );
        Ok(())
    })
}
