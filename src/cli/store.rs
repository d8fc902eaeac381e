//! `flowthrough store migrate|copy`: bring a PostgreSQL store's schema up to date (or check it),
//! and move a sled store into PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::fail;
use crate::config::{Config, PostgresConfig, StoreBackend};
use crate::store::copy::{Copied, CopyProgress};
use crate::store::postgres::{MigrationReport, PgStore, SCHEMA_VERSION, check_schema};

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Apply the schema migrations the PostgreSQL database lacks (serve also does at start).
    ///
    /// Exit status: 0 up to date, 1 on errors; with --check, 2 when migrations are pending.
    Migrate {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Only report the schema version and what would be applied; change nothing.
        #[arg(long)]
        check: bool,
    },
    /// Copy a sled store into PostgreSQL: outbox (pending, dead, delivered history), user map,
    /// profiles, customers, token, audit, the last reconcile report. Safe to run again or
    /// resume; refused while a running node holds the sled store.
    Copy {
        /// The sled store: its directory, or a config whose [store] path names it.
        #[arg(long, value_name = "PATH")]
        from: PathBuf,
        /// The config whose [store.postgres] names the database to copy into.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

pub fn run(args: StoreArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    match args.command {
        StoreCommand::Migrate { config, check } => runtime.block_on(migrate(&config, check)),
        StoreCommand::Copy { from, to } => runtime.block_on(copy(&from, &to)),
    }
}

fn postgres_of(config: &Path) -> Result<PostgresConfig, String> {
    let loaded = Config::load(config).map_err(|e| e.to_string())?;
    match (loaded.store.backend, loaded.store.postgres) {
        (StoreBackend::Postgres, Some(pg)) => Ok(pg),
        _ => Err(format!(
            "{}: store.backend is not \"postgres\"; set it and [store.postgres] (README, \"Running on PostgreSQL\")",
            config.display()
        )),
    }
}

async fn migrate(config: &Path, check: bool) -> ExitCode {
    let pg =
        match postgres_of(config).and_then(|pg| PgStore::connect(&pg).map_err(|e| e.to_string())) {
            Ok(pg) => pg,
            Err(e) => return fail(e),
        };
    let report = match pg.schema().await {
        Ok(report) => report,
        Err(e) => return fail(e),
    };
    if let Err(e) = check_schema(&report) {
        return fail(e);
    }
    if check {
        print_schema(pg.target(), &report);
        return if report.pending.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    match pg.migrate().await {
        Ok(applied) if applied.pending.is_empty() => {
            println!(
                "{}: schema version {SCHEMA_VERSION}, nothing to apply",
                pg.target()
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!(
                "{}: schema version {} → {SCHEMA_VERSION}; applied {}",
                pg.target(),
                applied.found,
                applied.pending.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn print_schema(target: &str, report: &MigrationReport) {
    if report.pending.is_empty() {
        println!("{target}: schema version {} (current)", report.found);
    } else {
        println!(
            "{target}: schema version {}, this flowthrough has {SCHEMA_VERSION}; pending: {} (run without --check to apply)",
            report.found,
            report.pending.join(", ")
        );
    }
}

/// The progress bar of a copy.
struct Bar(indicatif::ProgressBar);

impl CopyProgress for Bar {
    fn total(&self, records: u64) {
        self.0.set_length(records);
    }

    fn advanced(&self, records: u64) {
        self.0.inc(records);
    }
}

async fn copy(from: &Path, to: &Path) -> ExitCode {
    let source = if from.is_file() {
        match Config::load(from) {
            Ok(c) if c.store.backend == StoreBackend::Sled => c.store.path,
            Ok(_) => {
                return fail(format!(
                    "{}: its store is not sled; --from names a sled store (its directory or its config)",
                    from.display()
                ));
            }
            Err(e) => return fail(e),
        }
    } else {
        from.to_owned()
    };
    let target = match postgres_of(to) {
        Ok(pg) => pg,
        Err(e) => return fail(e),
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} copying [{bar:40}] {pos}/{len} records ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = crate::store::copy::sled_to_postgres(&source, &target, &Bar(bar.clone())).await;
    bar.finish_and_clear();
    match result {
        Ok(report) => print_copy(&source, &report),
        Err(e) => fail(format!(
            "{e}\nnothing copied so far is lost: run the same command again to resume"
        )),
    }
}

fn print_copy(source: &Path, report: &[Copied]) -> ExitCode {
    let mut short = Vec::new();
    println!("copied {} into PostgreSQL:", source.display());
    for c in report {
        let mark = if c.target == c.source { "✓" } else { "✗" };
        println!(
            "{mark} {:<22} {:>10} in sled, {:>10} of them in PostgreSQL",
            c.kind, c.source, c.target
        );
        if c.target != c.source {
            short.push(c.kind);
        }
    }
    if short.is_empty() {
        println!("every record is in PostgreSQL; point serve at it (store.backend = \"postgres\")");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "error: the counts differ for {}; run the copy again, and if they still differ keep both stores and report it",
            short.join(", ")
        );
        ExitCode::from(2)
    }
}
