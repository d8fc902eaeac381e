//! The import and reconcile benchmark (`bench/population.sh`): the Webex simulator in this
//! process, `flowthrough import --standalone` and `flowthrough reconcile` as child processes of
//! the release binary, on loopback.
//!
//! - import: N users from CSV under a simulator rate limit R; delivered per second (counted by
//!   the simulator: provisions accepted over the import's duration) against R, and the share of
//!   calls answered 429;
//! - reconcile: the same N subscribers listed (and compared) with `list_latency_ms` per page;
//!   its time against the floor: pages needed × page latency.
//!
//! Usage: population_bench FLOWTHROUGH_BINARY USERS RATE PAGE_LATENCY_MS

use std::process::Command;
use std::time::Instant;

use flowthrough::sim::{Control, SimOptions, Simulator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [binary, users, rate, page_ms] = args.as_slice() else {
        return Err("usage: population_bench FLOWTHROUGH_BINARY USERS RATE PAGE_LATENCY_MS".into());
    };
    let users: usize = users.parse()?;
    let rate: u32 = rate.parse()?;
    let page_ms: u64 = page_ms.parse()?;
    let dir = tempfile::tempdir()?;
    let sim = Simulator::start(SimOptions {
        control: Control {
            rate_limit_per_s: rate,
            ..Control::default()
        },
        ..SimOptions::default()
    })
    .await?;
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("sim-ca.pem"), &sim.ca_pem)?;
    std::fs::write(path("secret"), sim.client_secret.expose())?;
    std::fs::write(path("refresh"), sim.refresh_token.expose())?;
    std::fs::write(
        path("flowthrough.toml"),
        format!(
            r#"default_template = "acme"
[templates.acme]
provisioning_id = "prov-acme"
package = "standard"
enterprise_mode = true
user_verification = "trusted_email"
country = "US"
calling_code = "+1"
default_language = "en_US"
default_timezone = "America/New_York"
[store]
path = "{store}"
[webex]
api_base = "{base}"
token_url = "{base}/access_token"
ca_bundle = "{ca}"
client_id = "{id}"
client_secret_file = "{secret}"
refresh_token_file = "{refresh}"
"#,
            store = path("store").display(),
            base = sim.base_url,
            ca = path("sim-ca.pem").display(),
            id = sim.client_id,
            secret = path("secret").display(),
            refresh = path("refresh").display(),
        ),
    )?;
    let mut csv = String::from(
        "userId,serviceProviderId,groupId,firstName,lastName,phoneNumber,extension,emailAddress\n",
    );
    for i in 0..users {
        csv.push_str(&format!(
            "bench-{i:06}@acme.example,acme-ent,hq,Bench,User{i},+1-202-5{i:06},{},bench-{i:06}@acme.example\n",
            10_000 + i
        ));
    }
    std::fs::write(path("users.csv"), csv)?;
    let config = path("flowthrough.toml");
    let run =
        |command: &str, extra: &[&str]| -> Result<(f64, String), Box<dyn std::error::Error>> {
            let started = Instant::now();
            let out = Command::new(binary)
                .arg(command)
                .arg("--config")
                .arg(&config)
                .args(extra)
                .arg(path("users.csv"))
                .env("RUST_LOG", "error")
                .output()?;
            let took = started.elapsed().as_secs_f64();
            if !out.status.success() {
                return Err(format!(
                    "{command} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            Ok((took, String::from_utf8_lossy(&out.stderr).into_owned()))
        };

    let before = sim.counter("sent_429");
    let (import_s, _) = run("import", &["--standalone"])?;
    let provisioned = sim.counter("provision");
    let limited = sim.counter("sent_429") - before;
    let calls = ["provision", "list", "get", "update"]
        .iter()
        .map(|c| sim.counter(c))
        .sum::<u64>();
    let delivered = users as f64 / import_s;
    println!(
        "import: {users} users in {import_s:.1} s = {delivered:.1}/s = {:.2} R (R = {rate}/s); {limited} of {calls} calls answered 429 ({:.2} %); {provisioned} provision calls",
        delivered / f64::from(rate),
        100.0 * limited as f64 / calls.max(1) as f64
    );

    sim.control(serde_json::json!({ "rate_limit_per_s": 0, "list_latency_ms": page_ms }))?;
    let pages_before = sim.counter("list");
    let (reconcile_s, report) = run("reconcile", &[])?;
    let pages = sim.counter("list") - pages_before;
    let floor = pages as f64 * page_ms as f64 / 1000.0;
    println!(
        "reconcile: {users} subscribers in {reconcile_s:.2} s; floor {pages} pages × {page_ms} ms = {floor:.2} s ({:.2}× the floor); {}",
        reconcile_s / floor.max(f64::EPSILON),
        report.trim()
    );
    sim.stop().await;
    Ok(())
}
