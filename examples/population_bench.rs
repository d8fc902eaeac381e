//! The import and reconcile benchmark (`bench/population.sh`): the Webex simulator in this
//! process, `flowthrough import --standalone` and `flowthrough reconcile` as child processes of
//! the release binary, on loopback.
//!
//! - import: N users from CSV under a simulator rate limit R; delivered per second (counted by
//!   the simulator: provisions accepted over the import's duration) against R, and the share of
//!   calls answered 429;
//! - reconcile: the same N subscribers listed (and compared) with `list_latency_ms` per page;
//!   its time against the floor: pages needed × page latency;
//! - live commands during an import: `flowthrough serve` on the same store, LIVE UserAdds sent
//!   one after another at 20/s over mutual TLS, their acknowledgement times' p99 alone and
//!   while a second population of N users is imported through the node under R.
//!
//! Usage: population_bench FLOWTHROUGH_BINARY USERS RATE PAGE_LATENCY_MS [IMPORT_MAX_RATE]

use std::process::Command;
use std::time::Instant;

use flowthrough::sim::{Control, SimOptions, Simulator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (binary, users, rate, page_ms, import_cap) = match args.as_slice() {
        [b, u, r, p] => (b, u, r, p, None),
        [b, u, r, p, cap] => (b, u, r, p, Some(cap.clone())),
        _ => {
            return Err(
                "usage: population_bench FLOWTHROUGH_BINARY USERS RATE PAGE_LATENCY_MS [IMPORT_MAX_RATE]"
                    .into(),
            );
        }
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
    std::fs::write(path("users.csv"), population("bench", users))?;
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

    // The import runs beside a watch of the simulator's counters: the delivery window is from
    // the first accepted provision to the last, without the command's start-up (reading the
    // CSV, writing the outbox) and end.
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(["import", "--standalone", "--config"])
        .arg(&config)
        .args(
            import_cap
                .iter()
                .flat_map(|cap| ["--max-rate".to_owned(), cap.clone()]),
        )
        .arg(path("users.csv"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let accepted = || {
        sim.counter("provision")
            .saturating_sub(sim.counter("sent_429"))
    };
    let (mut first, mut last) = (None, None);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {
                let now = accepted();
                if now >= 1 && first.is_none() {
                    first = Some(started.elapsed());
                }
                if now >= users as u64 && last.is_none() {
                    last = Some(started.elapsed());
                }
            }
        }
    };
    let import_s = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("import failed: {status}").into());
    }
    let limited = sim.counter("sent_429");
    let calls = ["provision", "list", "get", "update"]
        .iter()
        .map(|c| sim.counter(c))
        .sum::<u64>();
    let window = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => import_s,
    };
    let delivered = (users - 1) as f64 / window;
    println!(
        "import{}: {users} users, command {import_s:.1} s ({:.2} R over it), deliveries {window:.1} s = {delivered:.1}/s = {:.2} R (R = {rate}/s); {limited} of {calls} calls answered 429 ({:.2} %)",
        import_cap
            .as_ref()
            .map_or(String::new(), |cap| format!(" --max-rate {cap}")),
        users as f64 / import_s / f64::from(rate),
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

    // Live commands alone, then during an import through the node.
    sim.control(serde_json::json!({ "rate_limit_per_s": rate, "list_latency_ms": 0 }))?;
    let (_, pki) = flowthrough::certs::DevPki::generate(&path("pki"))?;
    let port = free_port()?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let served = std::fs::read_to_string(&config)?
        + &format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\ncertificate = \"{}\"\nprivate_key = \"{}\"\nclient_ca = \"{}\"\n[admin]\nlisten = \"{admin}\"\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_cert.display()
        );
    std::fs::write(&config, served)?;
    let mut node = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .spawn()?;
    let ready = async {
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(format!("http://{admin}/readyz")).await
                && r.status() == 200
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    if !ready.await {
        let _ = node.kill();
        return Err("flowthrough serve did not become ready".into());
    }
    let mut identity = std::fs::read(&pki.client_cert)?;
    identity.extend(std::fs::read(&pki.client_key)?);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .identity(reqwest::Identity::from_pem(&identity)?)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            &pki.ca_cert,
        )?)?)
        .build()?;
    let url = format!("https://localhost:{port}/provisioning/acme");
    const LIVE: usize = 200;
    let alone = live_p99(&client, &url, "alone", LIVE).await?;
    std::fs::write(path("second.csv"), population("second", users))?;
    let import = |file: &str, extra: &[&str]| -> Result<(), Box<dyn std::error::Error>> {
        let out = Command::new(binary)
            .args(["import", "--config"])
            .arg(&config)
            .args(extra)
            .arg(path(file))
            .env("RUST_LOG", "error")
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "import through the node failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into())
        }
    };
    let imported = |prefix: &str| {
        sim.state()["subscribers"].as_array().map_or(0, |s| {
            s.iter()
                .filter(|s| s["userId"].as_str().is_some_and(|u| u.starts_with(prefix)))
                .count()
        })
    };
    if let Err(e) = import("second.csv", &[]) {
        let _ = node.kill();
        return Err(e);
    }
    let during = live_p99(&client, &url, "during", LIVE).await?;
    let done = imported("second-");
    println!(
        "live acks (UserAdd, 20/s, {LIVE} each): p99 {alone:.1} ms alone, {during:.1} ms during an import through the node ({done} of {users} imported when the live commands were done)"
    );
    // The same with the import handed over below the limit (--max-rate 0.75 R): no 429, so no
    // pause for the live commands to wait out. Started once the second import has drained.
    while imported("second-") < users {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    std::fs::write(path("third.csv"), population("third", users))?;
    let cap = (f64::from(rate) * 0.75).to_string();
    let limited_before = sim.counter("sent_429");
    // Handing over at the cap takes as long as the import itself: run it beside the live commands.
    let mut capped_import = Command::new(binary)
        .args(["import", "--config"])
        .arg(&config)
        .args(["--max-rate", &cap])
        .arg(path("third.csv"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let capped = live_p99(&client, &url, "capped", LIVE).await?;
    let done = imported("third-");
    let _ = capped_import.kill();
    let _ = capped_import.wait();
    println!(
        "live acks during an import handed over at --max-rate {cap}: p99 {capped:.1} ms ({} answered 429 meanwhile; {done} of {users} imported when the live commands were done)",
        sim.counter("sent_429") - limited_before
    );
    let _ = node.kill();
    let _ = node.wait();
    sim.stop().await;
    Ok(())
}

/// A CSV export of `users` users named `{prefix}-NNNNNN@acme.example`.
fn population(prefix: &str, users: usize) -> String {
    let mut csv = String::from(
        "userId,serviceProviderId,groupId,firstName,lastName,phoneNumber,extension,emailAddress\n",
    );
    for i in 0..users {
        csv.push_str(&format!(
            "{prefix}-{i:06}@acme.example,acme-ent,hq,Bench,User{i},+1-202-5{i:06},{},{prefix}-{i:06}@acme.example\n",
            10_000 + i
        ));
    }
    csv
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Send `count` live UserAdds one after another at 20/s; the p99 of their answer times in ms.
async fn live_p99(
    client: &reqwest::Client,
    url: &str,
    run: &str,
    count: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut times = Vec::with_capacity(count);
    let mut next = tokio::time::Instant::now();
    for n in 0..count {
        tokio::time::sleep_until(next).await;
        next += std::time::Duration::from_millis(50);
        let user = format!("live-{run}-{n}@acme.example");
        let body = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sessionId xmlns="">bench</sessionId><command xsi:type="UserAddRequest17sp4" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId><userId>{user}</userId><lastName>Live</lastName><firstName>User</firstName><password>x</password><extension>5{n:03}</extension><emailAddress>{user}</emailAddress></command></BroadsoftDocument>"#
        );
        let started = std::time::Instant::now();
        let answer = client
            .post(url)
            .header("content-type", "text/xml")
            .body(body)
            .send()
            .await?
            .text()
            .await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !answer.contains("SuccessResponse") {
            return Err(format!(
                "live command {n} ({run}) was not answered SuccessResponse: {answer}"
            )
            .into());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[(times.len() * 99 / 100).min(times.len() - 1)])
}
