//! `flowthrough outbox list|show|retry|drop`: the operator's view of undelivered work.
//!
//! A stopped instance's store is opened directly. A running instance holds the store's lock, so
//! the same operations go through its admin listener (`[admin].listen`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::fail;
use crate::config::Config;
use crate::store::{
    AuditEvent, AuditQuery, AuditRecord, Entry, EntryState, Filter, Store, StoreError,
};

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[arg(
        long,
        short,
        value_name = "FILE",
        global = true,
        default_value = "/etc/flowthrough/flowthrough.toml"
    )]
    config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: OutboxAction,
}

#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// List entries (pending and dead by default).
    List {
        /// Only dead entries.
        #[arg(long, conflicts_with_all = ["pending", "all"])]
        dead: bool,
        /// Only pending entries.
        #[arg(long, conflicts_with = "all")]
        pending: bool,
        /// Every entry, delivered ones included.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one entry with its Webex call and last error.
    Show { id: u64 },
    /// Put a dead entry (or, with --dead, every dead entry) back in its user's queue.
    Retry {
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<u64>,
        #[arg(long)]
        dead: bool,
    },
    /// Remove an entry for good (it will never be delivered).
    Drop { id: u64 },
    /// Show the audit trail, newest first: commands and their outcomes, or (with --documents)
    /// the documents and commands flowthrough could not use, redacted.
    Audit {
        /// Only records of this BroadWorks userId.
        #[arg(long)]
        user: Option<String>,
        /// The unreadable documents and unsupported commands kept for study.
        #[arg(long, conflicts_with = "user")]
        documents: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Either the store itself (sled with the instance stopped, or PostgreSQL) or the admin API of
/// the running instance.
enum Target {
    Store {
        store: Store,
        runtime: tokio::runtime::Runtime,
    },
    Admin {
        base: String,
        runtime: tokio::runtime::Runtime,
        http: reqwest::Client,
    },
}

pub fn run(args: OutboxArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    let target = match runtime.block_on(Store::connect_configured(&config.store)) {
        Ok(store) => Target::Store { store, runtime },
        Err(StoreError::Open { .. }) => {
            let http = match reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
            {
                Ok(h) => h,
                Err(e) => return fail(format!("cannot build an HTTP client: {e}")),
            };
            Target::Admin {
                base: format!("http://{}", config.admin.listen),
                runtime,
                http,
            }
        }
        Err(e) => return fail(e),
    };
    match execute(&target, &args.action, args.json) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn execute(target: &Target, action: &OutboxAction, json: bool) -> Result<ExitCode, String> {
    match action {
        OutboxAction::List {
            dead,
            pending,
            all,
            limit,
        } => {
            let (filter, state) = if *dead {
                (Filter::Dead, "dead")
            } else if *pending {
                (Filter::Pending, "pending")
            } else if *all {
                (Filter::All, "all")
            } else {
                (Filter::Active, "active")
            };
            let entries = list(target, filter, state, *limit)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?
                );
            } else {
                print_table(&entries);
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Show { id } => {
            let entry = show(target, *id)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&entry).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Retry { id: Some(id), .. } => {
            retry(target, *id)?;
            println!("entry {id} is queued again");
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Retry { id: None, .. } => {
            let dead = list(target, Filter::Dead, "dead", usize::MAX)?;
            let bar = indicatif::ProgressBar::new(dead.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} dead entries queued again",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut failed = 0;
            for entry in &dead {
                if let Err(e) = retry(target, entry.id) {
                    bar.println(format!("entry {}: {e}", entry.id));
                    failed += 1;
                }
                bar.inc(1);
            }
            bar.finish();
            if failed > 0 {
                return Err(format!(
                    "{failed} of {} dead entries could not be retried",
                    dead.len()
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Drop { id } => {
            drop_entry(target, *id)?;
            println!("entry {id} dropped; it will not be delivered");
            Ok(ExitCode::SUCCESS)
        }
        OutboxAction::Audit {
            user,
            documents,
            limit,
        } => {
            let query = AuditQuery {
                user_id: user.clone(),
                documents_only: *documents,
                limit: *limit,
            };
            let records = audit(target, &query)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&records).map_err(|e| e.to_string())?
                );
            } else {
                print_audit(&records);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn audit(target: &Target, query: &AuditQuery) -> Result<Vec<AuditRecord>, String> {
    match target {
        Target::Store { store, runtime } => runtime
            .block_on(store.audit(query))
            .map_err(|e| e.to_string()),
        Target::Admin { .. } => {
            let mut path = format!(
                "/admin/audit?limit={}&documents={}",
                query.limit, query.documents_only
            );
            if let Some(user) = &query.user_id {
                path.push_str("&user=");
                path.push_str(&percent_encode(user));
            }
            let value = admin_call(target, reqwest::Method::GET, &path)?;
            serde_json::from_value(value).map_err(|e| e.to_string())
        }
    }
}

/// Enough percent-encoding for a userId in a query string.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_audit(records: &[AuditRecord]) {
    if records.is_empty() {
        println!("no audit records");
        return;
    }
    for r in records {
        let when = chrono::DateTime::from_timestamp_millis(r.at_ms as i64)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        match &r.event {
            AuditEvent::Command {
                command,
                user_id,
                outcome,
                webex_status,
                tracking_id,
                ..
            } => println!(
                "{when}  {command:<32} {:<32} {outcome}{}{}",
                user_id.as_deref().unwrap_or("-"),
                webex_status
                    .as_deref()
                    .map(|s| format!("  webex={s}"))
                    .unwrap_or_default(),
                tracking_id
                    .as_deref()
                    .map(|t| format!("  {t}"))
                    .unwrap_or_default(),
            ),
            AuditEvent::Tunnel {
                destination,
                end,
                bytes_up,
                bytes_down,
                ..
            } => println!(
                "{when}  tunnel {destination} ↑{bytes_up} ↓{bytes_down} {end}  {}",
                r.client
            ),
            AuditEvent::Document { reason, excerpt } => {
                println!("{when}  {reason}  ({})", r.client);
                for line in excerpt.lines().take(20) {
                    println!("    {line}");
                }
            }
        }
    }
}

fn admin_call(target: &Target, method: reqwest::Method, path: &str) -> Result<Value, String> {
    let Target::Admin {
        base,
        runtime,
        http,
    } = target
    else {
        return Err("internal: not talking to an admin listener".to_owned());
    };
    let url = format!("{base}{path}");
    runtime.block_on(async {
        let response = http.request(method, &url).send().await.map_err(|e| {
            format!(
                "the store is locked by a running flowthrough, and its admin listener at {base} does not answer ({e}); check [admin].listen"
            )
        })?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(body["error"].as_str().unwrap_or("the admin listener refused the request").to_owned())
        }
    })
}

fn list(target: &Target, filter: Filter, state: &str, limit: usize) -> Result<Vec<Entry>, String> {
    match target {
        Target::Store { store, runtime } => runtime
            .block_on(store.list(filter, limit))
            .map_err(|e| e.to_string()),
        Target::Admin { .. } => {
            let value = admin_call(
                target,
                reqwest::Method::GET,
                &format!("/admin/outbox?state={state}&limit={limit}"),
            )?;
            serde_json::from_value(value).map_err(|e| e.to_string())
        }
    }
}

fn show(target: &Target, id: u64) -> Result<Entry, String> {
    match target {
        Target::Store { store, runtime } => runtime
            .block_on(store.entry(id))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no outbox entry {id}; `flowthrough outbox list --all` shows the entries there are"
                )
            }),
        Target::Admin { .. } => {
            let value = admin_call(target, reqwest::Method::GET, &format!("/admin/outbox/{id}"))?;
            serde_json::from_value(value).map_err(|e| e.to_string())
        }
    }
}

fn retry(target: &Target, id: u64) -> Result<(), String> {
    match target {
        Target::Store { store, runtime } => match runtime.block_on(store.retry(id)) {
            Ok(true) => runtime.block_on(store.flush()).map_err(|e| e.to_string()),
            Ok(false) => Err(format!(
                "entry {id} is not dead (or does not exist); only dead entries are retried"
            )),
            Err(e) => Err(e.to_string()),
        },
        Target::Admin { .. } => admin_call(
            target,
            reqwest::Method::POST,
            &format!("/admin/outbox/{id}/retry"),
        )
        .map(|_| ()),
    }
}

fn drop_entry(target: &Target, id: u64) -> Result<(), String> {
    match target {
        Target::Store { store, runtime } => match runtime.block_on(store.drop_entry(id)) {
            Ok(Some(_)) => runtime.block_on(store.flush()).map_err(|e| e.to_string()),
            Ok(None) => Err(format!("no outbox entry {id}")),
            Err(e) => Err(e.to_string()),
        },
        Target::Admin { .. } => admin_call(
            target,
            reqwest::Method::DELETE,
            &format!("/admin/outbox/{id}"),
        )
        .map(|_| ()),
    }
}

fn print_table(entries: &[Entry]) {
    if entries.is_empty() {
        println!("the outbox is empty");
        return;
    }
    println!(
        "{:>8}  {:<9}  {:<8}  {:<32}  {:>3}  last error",
        "id", "state", "call", "user", "try"
    );
    for e in entries {
        let state = match &e.state {
            EntryState::Pending => "pending".to_owned(),
            EntryState::Delivered { webex_status, .. } => webex_status
                .clone()
                .unwrap_or_else(|| "delivered".to_owned()),
            EntryState::Dead { .. } => "dead".to_owned(),
        };
        let error = match &e.state {
            EntryState::Dead { reason, .. } => reason.as_str(),
            _ => e.last_error.as_deref().unwrap_or(""),
        };
        println!(
            "{:>8}  {:<9}  {:<8}  {:<32}  {:>3}  {}",
            e.id,
            state,
            e.new.call.kind(),
            e.new.user_id,
            e.attempts,
            error
        );
    }
}
