//! `flowthrough serve`: load the config, set up logging, run the server until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::fail;
use crate::config::Config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file; see deploy/flowthrough.example.toml.
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/flowthrough/flowthrough.toml"
    )]
    config: PathBuf,
}

pub fn run(args: ServeArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let _log_writer = crate::logging::init(&config.log);
    let system = actix_rt::System::new();
    match system.block_on(crate::server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            fail(e)
        }
    }
}
