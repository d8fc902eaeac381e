//! `flowthrough simulator`: the Webex API simulator on its own, for staging tests and benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::secret::Secret;
use crate::sim::{SimOptions, Simulator};

#[derive(Debug, clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on (repeat for several, e.g. 127.0.0.2:8444 and 127.0.0.3:8444).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Directory for `ca.pem`, the CA certificate to trust as `webex.ca_bundle`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub client_id: Option<String>,
    #[arg(long)]
    pub client_secret: Option<String>,
    #[arg(long)]
    pub refresh_token: Option<String>,
}

pub fn run(args: SimulatorArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: SimulatorArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let sim = Simulator::start(SimOptions {
        listen: args.listen,
        client_id: args.client_id,
        client_secret: args.client_secret.map(Secret::new),
        refresh_token: args.refresh_token.map(Secret::new),
        ..SimOptions::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let ca = args.out.join("ca.pem");
    std::fs::write(&ca, &sim.ca_pem).map_err(|e| format!("cannot write {}: {e}", ca.display()))?;
    // These are the simulator's own throw-away credentials: printing them is the point.
    println!("Webex API simulator (not Webex) listening");
    println!("api_base = \"{}\"", sim.base_url);
    println!("token_url = \"{}/access_token\"", sim.base_url);
    println!("ca_bundle = \"{}\"", ca.display());
    println!("client_id = \"{}\"", sim.client_id);
    println!("FLOWTHROUGH_CLIENT_SECRET={}", sim.client_secret.expose());
    println!("FLOWTHROUGH_REFRESH_TOKEN={}", sim.refresh_token.expose());
    let root = sim.base_url.trim_end_matches("/v1");
    println!(
        "fault control: POST {root}/_sim/control   state: GET {root}/_sim/state   stop: Ctrl-C"
    );
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
    sim.stop().await;
    Ok(())
}
