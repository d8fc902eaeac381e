//! `flowthrough reconcile`: compare what BroadWorks says (the import sources), what flowthrough
//! knows (its user map) and what Webex has (the paged subscriber list); report the drift by kind,
//! and with `--repair` send the fixes through the outbox.
//!
//! Exit status: 0 in sync, 2 drift found (or, after `--repair`, a fix that failed), 1 usage,
//! config, store or Webex errors.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use super::fail;
use super::import::{
    Admin, SourceArgs, deliver_showing_progress, list_webex, mapped, open_store, run_async, scopes,
};
use crate::delivery::Finished;
use crate::metrics::Metrics;
use crate::population::deliver;
use crate::population::diff::{self, Finding, Fix, Kind, Thresholds};
use crate::population::fetch::{ListStats, Scope};
use crate::store::{ReconcileReport, Store, now_ms};
use crate::webex::{Subscriber, WebexClient};

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Compare only this customer (its spEnterpriseId) instead of every provisioning ID the
    /// users map to; may be repeated.
    #[arg(long, value_name = "ID")]
    sp_enterprise_id: Vec<String>,
    /// A subscriber pending or in progress longer than this is reported as stuck.
    #[arg(long, value_name = "MINUTES", default_value_t = 60)]
    stuck_after_minutes: u64,
    /// At most this many Webex calls per second while listing.
    #[arg(long, value_name = "PER_SECOND")]
    max_rate: Option<f64>,
    /// Print JSON (one object, stable) instead of a table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
    /// Send the fixes through the outbox: provision the missing, update what differs, retry
    /// error and stuck subscribers, forget stale map entries. Removals only with `--only extra`.
    #[arg(long)]
    repair: bool,
    /// Repair only these kinds: missing, extra, differs, error, stuck, stale_map.
    #[arg(long, value_name = "KIND", num_args = 1.., requires = "repair", value_parser = parse_kind)]
    only: Vec<Kind>,
    /// Refuse to repair when more than this many changes would be made.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_changes: usize,
    /// Do not ask for confirmation before repairing.
    #[arg(long)]
    yes: bool,
    /// Deliver the fixes from this command (the node must be stopped), instead of leaving them
    /// in the outbox for the node.
    #[arg(long, requires = "repair")]
    standalone: bool,
}

fn parse_kind(name: &str) -> Result<Kind, String> {
    Kind::parse(name).ok_or_else(|| {
        let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown kind {name:?}; kinds are {}", kinds.join(", "))
    })
}

pub fn run(args: ReconcileArgs) -> ExitCode {
    match run_async(reconcile(&args)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// Where flowthrough's side of the comparison lives.
enum Node {
    /// The node is stopped: its store and its Webex credentials are used directly.
    Stopped {
        store: Store,
        /// Boxed: a client is large beside the admin handle.
        client: Box<WebexClient>,
        metrics: Arc<Metrics>,
    },
    /// A node runs on the store: its admin listener reads the map, lists Webex with the node's
    /// credentials and takes the fixes.
    Running(Admin),
}

impl Node {
    async fn open(config: &crate::config::Config) -> Result<Node, String> {
        match open_store(config).await? {
            Some(store) => {
                let metrics = Arc::new(Metrics::new());
                let client = Box::new(deliver::connect(config, &store, &metrics).await?);
                Ok(Node::Stopped {
                    store,
                    client,
                    metrics,
                })
            }
            None => Ok(Node::Running(Admin::new(config)?)),
        }
    }

    async fn map(&self) -> Result<HashMap<String, String>, String> {
        match self {
            Node::Stopped { store, .. } => mapped(store).await,
            Node::Running(admin) => {
                let body = admin
                    .call(|http, url| http.get(url), "/admin/users")
                    .await?;
                serde_json::from_value(body["users"].clone()).map_err(|e| e.to_string())
            }
        }
    }

    async fn list(
        &self,
        scopes: &[Scope],
        max_rate: Option<f64>,
        stats: &mut ListStats,
    ) -> Result<Vec<Subscriber>, String> {
        let admin = match self {
            Node::Stopped { client, .. } => {
                return list_webex(client, scopes, max_rate, stats).await;
            }
            Node::Running(admin) => admin,
        };
        let mut all = Vec::new();
        for scope in scopes {
            let (key, id) = match scope {
                Scope::ProvisioningId(id) => ("provisioningId", id),
                Scope::SpEnterpriseId(id) => ("spEnterpriseId", id),
            };
            let mut query = vec![(key, id.clone())];
            if let Some(rate) = max_rate {
                query.push(("max_rate", rate.to_string()));
            }
            let body = admin
                .call(
                    |http, url| http.get(url).query(&query),
                    "/admin/webex/subscribers",
                )
                .await?;
            stats.pages += body["pages"].as_u64().unwrap_or(0);
            stats.rate_limited += body["rate_limited"].as_u64().unwrap_or(0);
            let listed: Vec<Subscriber> = serde_json::from_value(body["subscribers"].clone())
                .map_err(|e| format!("the node's subscriber list does not parse: {e}"))?;
            all.extend(listed);
        }
        Ok(all)
    }

    async fn keep(&self, report: &ReconcileReport) -> Result<(), String> {
        match self {
            Node::Stopped { store, .. } => {
                store
                    .put_reconcile_report(report)
                    .await
                    .map_err(|e| e.to_string())?;
                store.flush().await.map_err(|e| e.to_string())
            }
            Node::Running(admin) => admin
                .call(|http, url| http.put(url).json(report), "/admin/reconcile")
                .await
                .map(drop),
        }
    }
}

async fn reconcile(args: &ReconcileArgs) -> Result<ExitCode, String> {
    let sources = args.source.read()?;
    let config = &sources.config;
    let node = Node::open(config).await?;
    if args.standalone && matches!(node, Node::Running(_)) {
        return Err(format!(
            "--standalone delivers from this command, but a flowthrough node runs on the store at {}; leave out --standalone and the node delivers the fixes (live commands first), or stop it",
            config.store.path.display()
        ));
    }
    for refusal in &sources.refused {
        eprintln!(
            "not compared: {} ({}): {}",
            refusal.user_id.as_deref().unwrap_or("-"),
            refusal.origin,
            refusal.reason
        );
    }
    let mut wanted = sources.wanted.clone();
    let scopes: Vec<Scope> = if args.sp_enterprise_id.is_empty() {
        scopes(&wanted, config)
    } else {
        wanted.retain(|w| args.sp_enterprise_id.contains(&w.body.sp_enterprise_id));
        args.sp_enterprise_id
            .iter()
            .map(|id| Scope::SpEnterpriseId(id.clone()))
            .collect()
    };
    let mut stats = ListStats::default();
    let started = std::time::Instant::now();
    let webex = node.list(&scopes, args.max_rate, &mut stats).await?;
    let listed_in = started.elapsed();
    let map = node.map().await?;
    // Only the map entries of compared users: another customer's users are not this run's.
    let findings = diff::reconcile(
        &wanted,
        &map,
        &webex,
        Thresholds {
            now_ms: now_ms(),
            stuck_after_ms: args.stuck_after_minutes.saturating_mul(60_000),
        },
    );
    let counts = diff::counts(&findings);
    node.keep(&ReconcileReport {
        at_ms: now_ms(),
        counts: counts
            .iter()
            .map(|(k, v)| (k.name().to_owned(), *v))
            .collect(),
    })
    .await?;
    print_findings(args, &findings, &counts)?;
    eprintln!(
        "compared {} BroadWorks users with {} Webex subscribers ({} pages in {:.1} s, {} answered 429)",
        wanted.len(),
        webex.len(),
        stats.pages,
        listed_in.as_secs_f64(),
        stats.rate_limited
    );
    let extra = counts.get(&Kind::Extra).copied().unwrap_or(0);
    if extra > 0 {
        eprintln!(
            "WARNING: {extra} Webex subscribers are not in BroadWorks and are still billed; check them, then remove them with `--repair --only extra`"
        );
    }
    if findings.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if !args.repair {
        return Ok(ExitCode::from(2));
    }
    repair(args, &sources.config, node, &findings).await
}

fn print_findings(
    args: &ReconcileArgs,
    findings: &[Finding],
    counts: &BTreeMap<Kind, u64>,
) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    if args.json {
        let counts: BTreeMap<&str, u64> = counts.iter().map(|(k, v)| (k.name(), *v)).collect();
        let value = serde_json::json!({
            "in_sync": findings.is_empty(),
            "counts": counts,
            "findings": findings,
        });
        serde_json::to_writer_pretty(&mut out, &value).map_err(|e| e.to_string())?;
        writeln!(out).map_err(io)?;
    } else if args.csv {
        let mut writer = csv::Writer::from_writer(out);
        writer
            .write_record([
                "kind",
                "userId",
                "subscriberId",
                "template",
                "spEnterpriseId",
                "status",
                "detail",
            ])
            .map_err(|e| e.to_string())?;
        for f in findings {
            writer
                .write_record([
                    f.kind.name(),
                    &f.user_id,
                    f.subscriber_id.as_deref().unwrap_or(""),
                    f.template.as_deref().unwrap_or(""),
                    f.sp_enterprise_id.as_deref().unwrap_or(""),
                    f.status.as_deref().unwrap_or(""),
                    &f.detail,
                ])
                .map_err(|e| e.to_string())?;
        }
        writer.flush().map_err(io)?;
    } else {
        writeln!(out, "{:<10} {:<40} {:<14} DETAIL", "KIND", "USER", "STATUS").map_err(io)?;
        for f in findings {
            writeln!(
                out,
                "{:<10} {:<40} {:<14} {}",
                f.kind.name(),
                f.user_id,
                f.status.as_deref().unwrap_or("-"),
                f.detail
            )
            .map_err(io)?;
            for field in &f.fields {
                writeln!(
                    out,
                    "{:<10}   {}: BroadWorks {:?}, Webex {:?}",
                    "",
                    field.field,
                    field.broadworks.as_deref().unwrap_or(""),
                    field.webex.as_deref().unwrap_or("")
                )
                .map_err(io)?;
            }
        }
        let summary: Vec<String> = counts
            .iter()
            .map(|(k, v)| format!("{} {v}", k.name()))
            .collect();
        writeln!(
            out,
            "{}: {}",
            if findings.is_empty() {
                "in sync"
            } else {
                "drift found"
            },
            summary.join(", ")
        )
        .map_err(io)?;
    }
    Ok(())
}

async fn repair(
    args: &ReconcileArgs,
    config: &crate::config::Config,
    node: Node,
    findings: &[Finding],
) -> Result<ExitCode, String> {
    let chosen: Vec<&Finding> = findings
        .iter()
        .filter(|f| {
            if args.only.is_empty() {
                f.kind != Kind::Extra
            } else {
                args.only.contains(&f.kind)
            }
        })
        .collect();
    if chosen.is_empty() {
        eprintln!("nothing to repair among the kinds chosen (--only); removals need --only extra");
        return Ok(ExitCode::from(2));
    }
    if chosen.len() > args.max_changes {
        return Err(format!(
            "{} changes would be made, more than --max-changes {}; check the report, then raise --max-changes or narrow with --only",
            chosen.len(),
            args.max_changes
        ));
    }
    let removals = chosen.iter().filter(|f| f.fix == Fix::Remove).count();
    if !args.yes {
        eprint!(
            "repair {} users ({} removals from Webex)? type yes to go on: ",
            chosen.len(),
            removals
        );
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| e.to_string())?;
        if answer.trim() != "yes" {
            return Err("not confirmed; nothing was changed".to_owned());
        }
    }
    let mut entries = Vec::new();
    let mut unmap = Vec::new();
    for finding in &chosen {
        if finding.fix == Fix::Unmap {
            unmap.push(finding.user_id.clone());
            continue;
        }
        let template = finding.template.clone().unwrap_or_default();
        if let Some(entry) = deliver::entry(
            &finding.user_id,
            &template,
            &finding.fix,
            "reconcile --repair",
        )
        .map_err(|e| e.to_string())?
        {
            entries.push(entry);
        }
    }
    let (store, client, metrics) = match node {
        Node::Running(admin) => {
            let body = json!({ "users": unmap });
            admin
                .call(|http, url| http.post(url).json(&body), "/admin/users/unmap")
                .await?;
            admin.queue(&entries, false).await?;
            println!(
                "{} fixes queued in the running node's outbox (delivered after live commands), {} stale map entries forgotten; run reconcile again once `flowthrough outbox list` is empty",
                entries.len(),
                unmap.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Node::Stopped {
            store,
            client,
            metrics,
        } => (store, *client, metrics),
    };
    for user in &unmap {
        store
            .unmap_subscriber(user)
            .await
            .map_err(|e| e.to_string())?;
    }
    if !args.standalone {
        let queued = entries.len();
        store
            .enqueue(entries, now_ms())
            .await
            .map_err(|e| e.to_string())?;
        store.flush().await.map_err(|e| e.to_string())?;
        println!(
            "{queued} fixes queued in the outbox; `flowthrough serve` delivers them (live commands first) — run reconcile again afterwards to confirm, or repair with --standalone to deliver them now"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let ended = deliver_showing_progress(
        &store,
        config,
        (client, metrics),
        entries,
        args.max_rate,
        "repairing",
    )
    .await?;
    let mut failed = 0;
    for end in &ended {
        match &end.finished {
            Finished::Delivered { .. } => {}
            Finished::Dead { reason } => {
                failed += 1;
                println!("failed {}: {reason}", end.user_id);
            }
            Finished::Held { behind, reason } => {
                failed += 1;
                println!(
                    "not repaired {}: {}",
                    end.user_id,
                    Finished::held_advice(*behind, reason)
                );
            }
        }
    }
    println!(
        "repaired {} of {} (run reconcile again to confirm)",
        ended.len() - failed,
        ended.len()
    );
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
