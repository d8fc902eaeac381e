//! `flowthrough import`: bring an existing BroadWorks population onto Webex. Reads the exports,
//! maps each user through its template like live traffic, and either prints the plan
//! (`--dry-run`), queues the work in the store's outbox for the node to deliver (live commands
//! first), or delivers it itself (`--standalone`) with the engine and pace of `serve`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::fail;
use crate::config::Config;
use crate::delivery::Finished;
use crate::metrics::Metrics;
use crate::population::deliver;
use crate::population::diff::{self, Desired, Fix, Thresholds};
use crate::population::fetch::{self, ListStats, Scope};
use crate::population::source::{Defaults, Population, Refusal};
use crate::store::{NewEntry, Store, StoreError, now_ms};
use crate::webex::{Subscriber, WebexClient};

/// Where the users come from: the same for import and reconcile.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Exports to read, in order: `.csv` files, and saved OCI-P documents (user tables of
    /// UserGetListIn{Group,ServiceProvider,System}Response, UserGetResponse22/23,
    /// UserServiceGetAssignmentListResponse, each optionally after its request).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/flowthrough/flowthrough.toml"
    )]
    pub config: PathBuf,
    /// Map every user through this template; without it, a row's `template` column, then
    /// [template_overrides] by serviceProviderId, then default_template.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// The serviceProviderId of table rows that carry none and whose request was not saved.
    #[arg(long, value_name = "ID")]
    pub service_provider: Option<String>,
    /// The groupId of table rows that carry none and whose request was not saved.
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,
    /// Leave out users whose Integrated IM&P assignment the sources do not state.
    #[arg(long)]
    pub require_imp: bool,
}

/// The users the sources describe, mapped; and every refusal on the way.
pub struct Sources {
    pub config: Config,
    pub wanted: Vec<Desired>,
    pub refused: Vec<Refusal>,
}

impl SourceArgs {
    pub fn read(&self) -> Result<Sources, String> {
        let config = Config::load(&self.config).map_err(|e| e.to_string())?;
        if let Some(t) = &self.template
            && !config.templates.contains_key(t)
        {
            let known: Vec<&str> = config.templates.keys().map(String::as_str).collect();
            return Err(format!(
                "--template {t}: no such template in {}; configured: {}",
                self.config.display(),
                known.join(", ")
            ));
        }
        let defaults = Defaults {
            service_provider_id: self.service_provider.clone(),
            group_id: self.group.clone(),
        };
        let mut population = Population::default();
        for file in &self.files {
            let bytes =
                std::fs::read(file).map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
            let name = file.display().to_string();
            let is_csv = file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            if is_csv {
                population.read_csv(&name, &bytes)?;
            } else {
                let stem = file_stem(file);
                population.read_oci(&name, &stem, &bytes, &defaults)?;
            }
        }
        let (wanted, mut refused) = diff::desired(
            &population.records,
            &config,
            self.template.as_deref(),
            self.require_imp,
        );
        refused.splice(0..0, population.refused);
        Ok(Sources {
            config,
            wanted,
            refused,
        })
    }
}

/// `alice@acme.example.xml` → `alice@acme.example`.
fn file_stem(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Print the plan and every refused row with its reason; no Webex call, nothing stored.
    #[arg(long)]
    dry_run: bool,
    /// Deliver the work from this command, with the delivery engine of `serve`, on the
    /// configured store (the node must be stopped).
    #[arg(long)]
    standalone: bool,
    /// At most this many Webex calls per second (standalone), or users handed to the running
    /// node per second.
    #[arg(long, value_name = "PER_SECOND")]
    max_rate: Option<f64>,
    /// Write one line per user with its outcome and Webex's error text.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
    report_format: ReportFormat,
}

/// One user's line of the report.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    #[serde(rename = "userId")]
    user_id: String,
    origin: String,
    template: String,
    action: String,
    outcome: String,
    detail: String,
}

pub fn run(args: ImportArgs) -> ExitCode {
    let sources = match args.source.read() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if args.max_rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return fail("--max-rate must be a positive number of calls per second");
    }
    if args.dry_run {
        return dry_run(&sources);
    }
    match run_async(import(&args, &sources)) {
        Ok(rows) => finish(&args, &sources.refused, &rows),
        Err(e) => fail(e),
    }
}

/// Run a command's work on a runtime of its own (two threads: delivery, listing and the store's
/// flushes overlap; more buys nothing against one Webex limit).
pub fn run_async<T>(
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?
        .block_on(work)
}

fn dry_run(sources: &Sources) -> ExitCode {
    let mut out = std::io::stdout().lock();
    for want in &sources.wanted {
        let body = serde_json::to_string(&want.body).unwrap_or_default();
        let _ = writeln!(
            out,
            "provision {} (template {}, {}): POST /broadworks/subscribers {body}",
            want.body.user_id, want.template, want.origin
        );
    }
    for refusal in &sources.refused {
        let _ = writeln!(
            out,
            "refused {} ({}): {}",
            refusal.user_id.as_deref().unwrap_or("-"),
            refusal.origin,
            refusal.reason
        );
    }
    let _ = writeln!(
        out,
        "{} users to provision or update, {} refused; nothing was sent (dry run)",
        sources.wanted.len(),
        sources.refused.len()
    );
    if sources.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// The scopes to list: the provisioning ID of every template the users map through.
pub fn scopes(wanted: &[Desired], config: &Config) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = wanted
        .iter()
        .filter_map(|w| config.templates.get(&w.template))
        .map(|t| Scope::ProvisioningId(t.provisioning_id.clone()))
        .collect();
    scopes.sort();
    scopes.dedup();
    scopes
}

/// Webex's subscribers under every scope, with a progress line per scope.
pub async fn list_webex(
    client: &WebexClient,
    scopes: &[Scope],
    max_rate: Option<f64>,
    stats: &mut ListStats,
) -> Result<Vec<Subscriber>, String> {
    let mut all = Vec::new();
    for scope in scopes {
        let bar = spinner(&format!("listing Webex subscribers ({scope})"));
        let listed = fetch::list_scope(client, scope, max_rate, stats, |n| {
            bar.set_position(n as u64)
        })
        .await
        .map_err(|e| format!("cannot list the Webex subscribers of {scope}: {e}"))?;
        bar.finish_and_clear();
        all.extend(listed);
    }
    Ok(all)
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar
}

pub fn progress(len: usize, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_owned());
    bar
}

/// The store of the configured deployment, or none when a running node holds it (sled; a
/// PostgreSQL store is shared, and a node polling it finds the bulk entries written there).
pub async fn open_store(config: &Config) -> Result<Option<Store>, String> {
    match Store::connect_configured(&config.store).await {
        Ok(store) => Ok(Some(store)),
        Err(StoreError::Open { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn import(args: &ImportArgs, sources: &Sources) -> Result<Vec<Row>, String> {
    let config = &sources.config;
    let store = match open_store(config).await? {
        Some(store) => store,
        None if args.standalone => {
            return Err(format!(
                "the store at {} is in use: a flowthrough node is running on it; run the import without --standalone to let that node deliver it (live commands first), or stop the node",
                config.store.path.display()
            ));
        }
        None => return through_node(args, sources).await,
    };
    let mut rows = Vec::new();
    let origins: HashMap<&str, &Desired> = sources
        .wanted
        .iter()
        .map(|w| (w.body.user_id.as_str(), w))
        .collect();
    let row = |user_id: &str, action: &str, outcome: &str, detail: String| {
        let want = origins.get(user_id);
        Row {
            user_id: user_id.to_owned(),
            origin: want.map(|w| w.origin.clone()).unwrap_or_default(),
            template: want.map(|w| w.template.clone()).unwrap_or_default(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            detail,
        }
    };
    let mut entries: Vec<NewEntry> = Vec::new();
    let mut actions: HashMap<String, &'static str> = HashMap::new();
    if args.standalone {
        let metrics = Arc::new(Metrics::new());
        let client = deliver::connect(config, &store, &metrics).await?;
        let mut stats = ListStats::default();
        let webex = list_webex(
            &client,
            &scopes(&sources.wanted, config),
            args.max_rate,
            &mut stats,
        )
        .await?;
        let map = mapped(&store).await?;
        let findings = diff::reconcile(
            &sources.wanted,
            &map,
            &webex,
            Thresholds {
                now_ms: now_ms(),
                stuck_after_ms: u64::MAX,
            },
        );
        for step in diff::import_steps(&sources.wanted, &findings, &webex) {
            let user_id = step.user_id.as_str();
            if step.fix == Some(Fix::Unmap) {
                store
                    .unmap_subscriber(user_id)
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
            // A user with work left in the outbox (an interrupted run) is delivered from there,
            // and reported when it ends.
            if store.has_queued(user_id).await.map_err(|e| e.to_string())? {
                continue;
            }
            match &step.fix {
                Some(fix) => {
                    if let Some(entry) = deliver::entry(user_id, &step.template, fix, "import")
                        .map_err(|e| e.to_string())?
                    {
                        actions.insert(step.user_id.clone(), fix.action());
                        entries.push(entry);
                    }
                }
                None if step.status == "provisioned" => rows.push(row(
                    user_id,
                    "skip",
                    "in_sync",
                    "already in Webex with the same fields".to_owned(),
                )),
                None => rows.push(row(
                    user_id,
                    "skip",
                    "skipped",
                    format!(
                        "already in Webex with status {}; `flowthrough reconcile` reports and repairs it",
                        step.status
                    ),
                )),
            }
        }
        let ended = deliver_showing_progress(
            &store,
            config,
            (client, metrics),
            entries,
            args.max_rate,
            "delivering",
        )
        .await?;
        for end in ended {
            let action = actions.get(&end.user_id).copied().unwrap_or("resume");
            let (outcome, detail) = match &end.finished {
                Finished::Delivered { webex_status, .. } => (
                    if action == "update" {
                        "updated"
                    } else {
                        "provisioned"
                    },
                    webex_status.clone().unwrap_or_default(),
                ),
                Finished::Dead { reason } => ("failed", reason.clone()),
                Finished::Held { behind, reason } => {
                    ("held", Finished::held_advice(*behind, reason))
                }
            };
            rows.push(row(&end.user_id, action, outcome, detail));
        }
    } else {
        // No Webex call from here: a user the node does not know is sent as a provision, and a
        // duplicate answer settles by lookup, never a second subscriber.
        for want in &sources.wanted {
            let user_id = want.body.user_id.as_str();
            let known = store
                .user(user_id)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|u| u.subscriber_id.is_some());
            if known || store.has_queued(user_id).await.map_err(|e| e.to_string())? {
                rows.push(row(user_id, "skip", "known", "flowthrough already maps or queues this user; `flowthrough reconcile` compares its fields".to_owned()));
                continue;
            }
            let fix = Fix::Provision(want.body.clone());
            if let Some(entry) = deliver::entry(user_id, &want.template, &fix, "import")
                .map_err(|e| e.to_string())?
            {
                entries.push(entry);
                rows.push(row(
                    user_id,
                    "provision",
                    "queued",
                    "delivered when flowthrough serve runs on this store".to_owned(),
                ));
            }
        }
        store
            .enqueue(entries, now_ms())
            .await
            .map_err(|e| e.to_string())?;
        store.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(rows)
}

/// [`deliver::standalone`] with a progress bar (rate and ETA) of the entries that have ended.
pub async fn deliver_showing_progress(
    store: &Store,
    config: &Config,
    (client, metrics): (WebexClient, Arc<Metrics>),
    entries: Vec<NewEntry>,
    max_rate: Option<f64>,
    message: &str,
) -> Result<Vec<deliver::Ended>, String> {
    let pending = store
        .list(crate::store::Filter::Pending, usize::MAX)
        .await
        .map_err(|e| e.to_string())?
        .len();
    let bar = progress(entries.len() + pending, message);
    let ended = deliver::standalone(store, config, client, metrics, entries, max_rate, |_| {
        bar.inc(1)
    })
    .await;
    bar.finish_and_clear();
    ended
}

/// flowthrough's user map: userId → subscriber id.
pub async fn mapped(store: &Store) -> Result<HashMap<String, String>, String> {
    Ok(store
        .users()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|(user, record)| record.subscriber_id.map(|id| (user, id)))
        .collect())
}

/// Hand the users to the running node through its admin listener, `--max-rate` users a second.
/// A running node's admin listener: the node holds the store (and the Webex credentials), so
/// bulk work goes through it.
pub struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(config: &Config) -> Result<Admin, String> {
        Ok(Admin {
            base: format!("http://{}", config.admin.listen),
            // Listing a large population through the node takes minutes under a rate limit.
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3600))
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    /// Send a request to the node and read its JSON answer, or say why not.
    pub async fn call(
        &self,
        request: impl FnOnce(&reqwest::Client, String) -> reqwest::RequestBuilder,
        path: &str,
    ) -> Result<serde_json::Value, String> {
        let base = &self.base;
        let answer = request(&self.http, format!("{base}{path}"))
            .send()
            .await
            .map_err(|e| format!("cannot reach the running node's admin listener at {base} ({e}); is [admin].listen right, and is the node up?"))?;
        let status = answer.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(serde_json::Value::Null);
        }
        let body: serde_json::Value = answer.json().await.map_err(|e| {
            format!("the node's answer to {path} does not parse ({e}); is the node the same flowthrough release?")
        })?;
        if !status.is_success() {
            return Err(format!(
                "the node refused {path} ({status}): {}",
                body["error"].as_str().unwrap_or("no reason given")
            ));
        }
        Ok(body)
    }

    /// Bulk entries into the node's outbox; `skip_known` leaves users it knows alone.
    pub async fn queue(
        &self,
        entries: &[NewEntry],
        skip_known: bool,
    ) -> Result<serde_json::Value, String> {
        let body = json!({ "entries": entries, "skip_known": skip_known });
        self.call(|http, url| http.post(url).json(&body), "/admin/import")
            .await
    }
}

async fn through_node(args: &ImportArgs, sources: &Sources) -> Result<Vec<Row>, String> {
    let admin = Admin::new(&sources.config)?;
    let batch = args
        .max_rate
        .map_or(500, |r| (r.ceil() as usize).clamp(1, 500));
    let bar = progress(sources.wanted.len(), "handing to the node");
    let mut rows = Vec::new();
    let mut next = tokio::time::Instant::now();
    for chunk in sources.wanted.chunks(batch) {
        if args.max_rate.is_some() {
            tokio::time::sleep_until(next).await;
            next += std::time::Duration::from_secs(1);
        }
        let mut entries = Vec::with_capacity(chunk.len());
        for want in chunk {
            let fix = Fix::Provision(want.body.clone());
            if let Some(entry) = deliver::entry(&want.body.user_id, &want.template, &fix, "import")
                .map_err(|e| e.to_string())?
            {
                entries.push(entry);
            }
        }
        let body = admin.queue(&entries, true).await?;
        for (want, outcome) in chunk
            .iter()
            .zip(body["users"].as_array().into_iter().flatten())
        {
            rows.push(Row {
                user_id: want.body.user_id.clone(),
                origin: want.origin.clone(),
                template: want.template.clone(),
                action: "provision".to_owned(),
                outcome: outcome["outcome"].as_str().unwrap_or("unknown").to_owned(),
                detail: outcome["detail"].as_str().unwrap_or("").to_owned(),
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(rows)
}

fn finish(args: &ImportArgs, refused: &[Refusal], rows: &[Row]) -> ExitCode {
    let mut all: Vec<Row> = rows.to_vec();
    all.extend(refused.iter().map(|r| Row {
        user_id: r.user_id.clone().unwrap_or_default(),
        origin: r.origin.clone(),
        template: String::new(),
        action: "none".to_owned(),
        outcome: "refused".to_owned(),
        detail: r.reason.clone(),
    }));
    if let Some(path) = &args.report
        && let Err(e) = write_report(path, args.report_format, &all)
    {
        return fail(format!("{}: cannot write the report: {e}", path.display()));
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for row in &all {
        *counts.entry(row.outcome.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("import: {} users: {}", all.len(), summary.join(", "));
    let failed = all
        .iter()
        .filter(|r| r.outcome == "failed" || r.outcome == "refused")
        .count();
    if failed > 0 {
        println!(
            "{failed} users were refused or failed; {} says why for each",
            args.report
                .as_ref()
                .map_or("--report FILE".to_owned(), |p| p.display().to_string())
        );
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

fn write_report(path: &Path, format: ReportFormat, rows: &[Row]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(file);
    match format {
        ReportFormat::Csv => {
            let mut writer = csv::Writer::from_writer(out);
            for row in rows {
                writer.serialize(row).map_err(|e| e.to_string())?;
            }
            writer.flush().map_err(|e| e.to_string())?;
        }
        ReportFormat::Json => {
            for row in rows {
                serde_json::to_writer(&mut out, row).map_err(|e| e.to_string())?;
                writeln!(out).map_err(|e| e.to_string())?;
            }
            out.flush().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
