//! The thin command-line layer: argument parsing, output formatting and exit codes. Nothing in the
//! library imports this module.
//!
//! Exit codes are the same for every subcommand: 0 success, 1 usage, config or I/O error, 2 the
//! input was processed and something in it was refused (a rejected command, a certificate that
//! fails the policy).

mod certs;
mod cluster;
mod doctor;
mod import;
mod outbox;
mod reconcile;
mod sandbox;
mod serve;
mod simulator;
mod store;
mod token;
mod tools;
mod translate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// flowthrough: BroadWorks OCI-P to Webex for BroadWorks, in the DMZ.
///
/// The Application Server sends OCI-P over mutual TLS; flowthrough checks its client certificate,
/// maps each user command through a customer template onto the Webex subscriber API, delivers it
/// durably and answers in OCI-P. Every subcommand takes `--config FILE` where it needs one; see
/// deploy/flowthrough.example.toml for every key.
#[derive(Debug, Parser)]
#[command(
    name = "flowthrough",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the adapter: provisioning listener(s), admin listener, delivery, tunnel.
    Serve(serve::ServeArgs),
    /// Try it: the real server on loopback with development certificates and the Webex API
    /// simulator, ready for curl (`--demo` sends the sample documents and prints the result).
    Sandbox(sandbox::SandboxArgs),
    /// Offline dry run: the Webex call each command of a document would cause.
    ///
    /// Exit status: 0 when no command is rejected, 2 otherwise, 1 on usage or I/O errors.
    Translate(translate::TranslateArgs),
    /// Bring an existing BroadWorks population onto Webex from CSV or saved OCI-P exports.
    ///
    /// Exit status: 0 all done, 2 some users refused or failed, 1 usage, config or I/O errors.
    Import(import::ImportArgs),
    /// Compare BroadWorks, flowthrough and Webex; report drift by kind; --repair fixes it.
    ///
    /// Exit status: 0 in sync, 2 drift found, 1 usage, config, store or Webex errors.
    Reconcile(reconcile::ReconcileArgs),
    /// Inspect and repair undelivered work: list, show, retry, drop.
    Outbox(outbox::OutboxArgs),
    /// Check a deployment: config, files, certificates, server name, store, upstream, token.
    ///
    /// Each check is printed with its fix. Exit status: 0 all pass, 2 some fail, 1 the config
    /// does not load.
    Doctor(doctor::DoctorArgs),
    /// Certificate tooling: an internal CA, server and BroadWorks client certificates, CSRs,
    /// CRLs; inspect and verify any certificate against the client policy.
    Certs(certs::CertsArgs),
    /// Webex OAuth credentials: show their state, or install a new refresh token.
    Token(token::TokenArgs),
    /// The PostgreSQL store: apply (or check) schema migrations; copy a sled store into it.
    Store(store::StoreArgs),
    /// Several nodes on one PostgreSQL store: every node, its heartbeat and the users it delivers.
    Cluster(cluster::ClusterArgs),
    /// Run the Webex API SIMULATOR (for tests, staging and benchmarks; never used by serve).
    Simulator(simulator::SimulatorArgs),
    /// Hash a password for a provisioning or proxy account (read from stdin).
    HashPassword(tools::HashPasswordArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions(tools::CompletionsArgs),
    /// Print the man page (roff) generated from these definitions.
    Man,
}

/// Parse the command line and run the subcommand.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1: 2 means "processed, and something was refused".
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Certs(args) => certs::run(args),
        Command::Token(args) => token::run(args),
        Command::Store(args) => store::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Simulator(args) => simulator::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Sandbox(args) => sandbox::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Outbox(args) => outbox::run(args),
        Command::Import(args) => import::run(args),
        Command::Reconcile(args) => reconcile::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::HashPassword(args) => tools::hash_password(args),
        Command::Completions(args) => tools::completions(args),
        Command::Man => tools::man(),
    }
}

/// Print an operator-facing error and return the exit code for usage/config/I/O problems.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}
