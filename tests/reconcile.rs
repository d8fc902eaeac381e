//! `flowthrough reconcile` end to end: a simulator seeded with a population in sync plus one
//! drifted user of every kind; reconcile finds exactly those, `--repair` fixes them, and a
//! second run reports the population in sync.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use flowthrough::population::diff::desired;
use flowthrough::population::source::Population;
use flowthrough::sim::SimOptions;
use serde_json::{Value, json};

const USERS: usize = 3000;

fn csv() -> String {
    let mut text = String::from(
        "userId,serviceProviderId,groupId,firstName,lastName,phoneNumber,extension,mobilePhoneNumber,emailAddress,timeZone\n",
    );
    for i in 0..USERS {
        text.push_str(&format!(
            "r-{i:05}@acme.example,acme-ent,hq,First,Last{i},+1-202-55{i:05},{},+15145{i:05},r-{i:05}@acme.example,America/Denver\n",
            3000 + i
        ));
    }
    text
}

async fn reconcile(config: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .arg("reconcile")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn found(out: &std::process::Output) -> Vec<(String, String)> {
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["userId"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_drift_of_every_kind_is_found_exactly_and_repaired() {
    let world = World::new(SimOptions::default()).await;
    let config_path = world.path("flowthrough.toml");
    std::fs::write(&config_path, world.config_text("", "")).unwrap();
    let export = world.path("users.csv");
    std::fs::write(&export, csv()).unwrap();

    // Webex holds what flowthrough's own mapping sends for these users …
    let mut population = Population::default();
    population.read_csv("users.csv", csv().as_bytes()).unwrap();
    let (wanted, refused) = desired(&population.records, &world.config("", ""), None, false);
    assert!(refused.is_empty(), "{refused:?}");
    let mut seed: Vec<Value> = wanted
        .iter()
        .map(|w| serde_json::to_value(&w.body).unwrap())
        .collect();
    // … except for one user of every kind of drift.
    let missing = seed.remove(0)["userId"].as_str().unwrap().to_owned();
    seed[0]["lastName"] = json!("Renamed");
    seed[0]["extension"] = json!("9999");
    let differs = seed[0]["userId"].as_str().unwrap().to_owned();
    seed[1]["status"] = json!("error");
    seed[1]["errors"] = json!([{"errorCode": 10022, "description": "BroadWorks UserID already associated with an existing user"}]);
    let error = seed[1]["userId"].as_str().unwrap().to_owned();
    seed[2]["status"] = json!("provisioning");
    seed[2]["statusAgeS"] = json!(7200);
    let stuck = seed[2]["userId"].as_str().unwrap().to_owned();
    // Pending, but only for a minute: not stuck.
    seed[3]["status"] = json!("pending_email_validation");
    seed[3]["statusAgeS"] = json!(60);
    let mut extra = seed[4].clone();
    extra["userId"] = json!("left-the-company@acme.example");
    seed.push(extra);
    let stale = seed[5]["userId"].as_str().unwrap().to_owned();
    // Another provisioning ID's subscriber is outside the comparison.
    let mut other = seed[6].clone();
    other["userId"] = json!("other@elsewhere.example");
    other["provisioningId"] = json!("prov-other");
    seed.push(other);
    world.sim.seed(&seed).unwrap();
    {
        let store = flowthrough::store::Store::open(&world.path("store")).unwrap();
        store
            .map_user(&stale, Some("sim-sub-deleted-long-ago"), Some("acme"))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }

    let export = export.to_str().unwrap();
    let first = reconcile(&config_path, &["--json", export]).await;
    assert_eq!(first.status.code(), Some(2), "{}", text(&first.stderr));
    let mut expected = vec![
        ("differs".to_owned(), differs.clone()),
        ("error".to_owned(), error.clone()),
        (
            "extra".to_owned(),
            "left-the-company@acme.example".to_owned(),
        ),
        ("missing".to_owned(), missing.clone()),
        ("stale_map".to_owned(), stale.clone()),
        ("stuck".to_owned(), stuck.clone()),
    ];
    let mut got = found(&first);
    got.sort();
    expected.sort();
    assert_eq!(
        got, expected,
        "exactly the seeded drift, nothing else among {USERS} users"
    );
    assert!(
        text(&first.stderr).contains("still billed"),
        "{}",
        text(&first.stderr)
    );
    let report: Value = serde_json::from_slice(&first.stdout).unwrap();
    let differs_fields: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "differs")
        .unwrap()["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(differs_fields, ["lastName", "extension"]);

    // The counts stay in the store, and the node started on it exports them.
    {
        let store = flowthrough::store::Store::open(&world.path("store")).unwrap();
        let last = store.reconcile_report().await.unwrap().unwrap();
        assert!(last.counts.values().all(|n| *n == 1), "{:?}", last.counts);
        assert_eq!(last.counts.len(), 6);
    }
    let served = serve_config(&world, "");
    let mut node = spawn(&served.config, "warn", Stdio::null());
    wait_ready(&served.admin).await;
    let metrics = get_text(&format!("http://{}/metrics", served.admin)).await;
    for kind in ["missing", "extra", "differs", "error", "stuck", "stale_map"] {
        let line = format!("flowthrough_reconcile_drift_users{{kind=\"{kind}\"}} 1");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    // While the node holds the store, reconcile goes through it and finds the same.
    let through_node = reconcile(&served.config, &["--json", export]).await;
    assert_eq!(
        through_node.status.code(),
        Some(2),
        "{}",
        text(&through_node.stderr)
    );
    let mut again = found(&through_node);
    again.sort();
    assert_eq!(again, expected);
    let standalone = reconcile(&config_path, &["--repair", "--yes", "--standalone", export]).await;
    assert_eq!(standalone.status.code(), Some(1));
    assert!(
        text(&standalone.stderr).contains("leave out --standalone"),
        "{}",
        text(&standalone.stderr)
    );
    // A safety limit below the number of changes refuses the repair.
    let limited = reconcile(
        &config_path,
        &["--repair", "--yes", "--max-changes", "2", export],
    )
    .await;
    assert_eq!(limited.status.code(), Some(1));
    assert!(
        text(&limited.stderr).contains("--max-changes 2"),
        "{}",
        text(&limited.stderr)
    );
    // Without --yes and without a "yes" on stdin nothing happens.
    let unconfirmed = reconcile(&config_path, &["--repair", export]).await;
    assert_eq!(unconfirmed.status.code(), Some(1));
    assert!(text(&unconfirmed.stderr).contains("not confirmed"));

    // Repair through the node, without naming extra: the billed seat stays.
    let repaired = reconcile(&config_path, &["--repair", "--yes", export]).await;
    assert!(
        repaired.status.success(),
        "{}\n{}",
        text(&repaired.stdout),
        text(&repaired.stderr)
    );
    assert!(
        text(&repaired.stdout).contains("4 fixes queued in the running node's outbox"),
        "{}",
        text(&repaired.stdout)
    );
    let status_url = format!("http://{}/status", served.admin);
    let mut drained = false;
    for _ in 0..600 {
        if get_json(&status_url).await["outbox"]["pending"] == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(drained, "the node never delivered the fixes");
    node.kill().unwrap();
    node.wait().unwrap();

    let second = reconcile(&config_path, &["--json", export]).await;
    assert_eq!(
        found(&second),
        [(
            "extra".to_owned(),
            "left-the-company@acme.example".to_owned()
        )]
    );
    let as_csv = reconcile(&config_path, &["--csv", export]).await;
    assert_eq!(as_csv.status.code(), Some(2));
    let lines: Vec<String> = text(&as_csv.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines[0],
        "kind,userId,subscriberId,template,spEnterpriseId,status,detail"
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("extra,left-the-company@acme.example,sim-sub-"),
        "{lines:?}"
    );
    let removed = reconcile(
        &config_path,
        &[
            "--repair",
            "--only",
            "extra",
            "--yes",
            "--standalone",
            export,
        ],
    )
    .await;
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    let last = reconcile(&config_path, &[export]).await;
    assert!(
        last.status.success(),
        "{}\n{}",
        text(&last.stdout),
        text(&last.stderr)
    );
    assert!(
        text(&last.stdout).contains("in sync"),
        "{}",
        text(&last.stdout)
    );

    let renamed = world.subscriber(&differs).unwrap();
    assert_eq!(
        (renamed["lastName"].as_str(), renamed["extension"].as_str()),
        (Some("Last1"), Some("3001"))
    );
    assert_eq!(world.subscriber(&error).unwrap()["status"], "provisioned");
    assert!(world.subscriber(&missing).is_some());
    assert!(world.subscriber("left-the-company@acme.example").is_none());
    assert!(world.subscriber("other@elsewhere.example").is_some());
}

/// On a PostgreSQL store, which a node does not hold: reconcile reads the user map there,
/// keeps its counts there, and `--repair --standalone` fixes the drift it found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_found_kept_and_repaired_on_a_postgres_store() {
    let world = World::on(SimOptions::default(), Backend::Postgres).await;
    let store = flowthrough::store::Store::open_configured(&world.config("", "").store)
        .await
        .unwrap();
    let config_path = world.path("flowthrough.toml");
    std::fs::write(&config_path, world.config_text("", "")).unwrap();
    let export = world.path("users.csv");
    std::fs::write(&export, csv()).unwrap();
    let mut population = Population::default();
    population.read_csv("users.csv", csv().as_bytes()).unwrap();
    let (wanted, refused) = desired(&population.records, &world.config("", ""), None, false);
    assert!(refused.is_empty(), "{refused:?}");
    let mut seed: Vec<Value> = wanted
        .iter()
        .map(|w| serde_json::to_value(&w.body).unwrap())
        .collect();
    let missing = seed.remove(0)["userId"].as_str().unwrap().to_owned();
    seed[0]["lastName"] = json!("Renamed");
    let differs = seed[0]["userId"].as_str().unwrap().to_owned();
    let stale = seed.pop().unwrap()["userId"].as_str().unwrap().to_owned();
    world.sim.seed(&seed).unwrap();
    store
        .map_user(&stale, Some("sim-sub-deleted-long-ago"), Some("acme"))
        .await
        .unwrap();

    let export = export.to_str().unwrap();
    let first = reconcile(&config_path, &["--json", export]).await;
    assert_eq!(first.status.code(), Some(2), "{}", text(&first.stderr));
    let mut got = found(&first);
    got.sort();
    let mut expected = vec![
        ("differs".to_owned(), differs),
        ("missing".to_owned(), missing.clone()),
        ("missing".to_owned(), stale.clone()),
        ("stale_map".to_owned(), stale.clone()),
    ];
    expected.sort();
    assert_eq!(got, expected);
    let kept = store.reconcile_report().await.unwrap().unwrap();
    assert_eq!(
        kept.counts,
        [
            ("differs".to_owned(), 1),
            ("error".to_owned(), 0),
            ("extra".to_owned(), 0),
            ("missing".to_owned(), 2),
            ("stale_map".to_owned(), 1),
            ("stuck".to_owned(), 0),
        ]
        .into()
    );

    let repaired = reconcile(&config_path, &["--repair", "--yes", "--standalone", export]).await;
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    assert!(world.subscriber(&missing).is_some());
    let after = reconcile(&config_path, &["--json", export]).await;
    assert_eq!(after.status.code(), Some(0), "{:?}", found(&after));
    assert!(
        store.reconcile_report().await.unwrap().unwrap().at_ms > kept.at_ms,
        "the later run's counts replace the earlier ones"
    );
}
