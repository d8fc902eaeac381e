//! The thin command-line layer: argument parsing, output formatting and exit codes. Nothing in the
//! library imports this module.

mod simulator;
mod token;

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "flowthrough", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the Webex API simulator (not Webex) on its own.
    Simulator(simulator::SimulatorArgs),
    /// Show or install the Webex OAuth tokens.
    Token(token::TokenArgs),
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Simulator(args) => simulator::run(args),
        Command::Token(args) => token::run(args),
    }
}
