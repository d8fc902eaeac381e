//! `flowthrough import` end to end: the real binary against the Webex simulator on loopback,
//! from CSV and from saved OCI-P documents, under a rate limit, killed halfway and run again,
//! and through a running node where live commands go first.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use flowthrough::sim::{Control, SimOptions};

fn csv(users: impl Iterator<Item = String>) -> String {
    let mut text = String::from(
        "userId,serviceProviderId,groupId,firstName,lastName,phoneNumber,extension,emailAddress,language,timeZone\n",
    );
    for (i, user) in users.enumerate() {
        text.push_str(&format!(
            "{user},acme-ent,hq,User,Number{i},20255{i:05},{},{user},English,America/Chicago\n",
            1000 + i
        ));
    }
    text
}

fn user(run: &str, i: usize) -> String {
    format!("{run}-{i:05}@acme.example")
}

async fn import(config: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .arg("import")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn assert_says(out: &std::process::Output, needle: &str) {
    let said = text(&out.stdout);
    assert!(said.contains(needle), "no {needle:?} in:\n{said}");
}

/// Users a dry run would provision.
fn planned(out: &std::process::Output) -> usize {
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("provision "))
        .count()
}

/// Every Webex call the simulator answered, and how many of them were 429.
fn calls_and_429s(world: &World) -> (u64, u64) {
    let calls = ["provision", "update", "remove", "get", "list", "validate"]
        .iter()
        .map(|c| world.sim.counter(c))
        .sum();
    (calls, world.sim.counter("sent_429"))
}

fn user_ids(world: &World) -> Vec<String> {
    world
        .subscribers()
        .iter()
        .filter_map(|s| s["userId"].as_str().map(str::to_owned))
        .collect()
}

fn write_config(world: &World, extra: &str) -> std::path::PathBuf {
    let path = world.path("flowthrough.toml");
    std::fs::write(&path, world.config_text("", extra)).unwrap();
    path
}

const RATE: u32 = 100;

fn limited() -> SimOptions {
    SimOptions {
        control: Control {
            rate_limit_per_s: RATE,
            ..Control::default()
        },
        ..SimOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_population_is_provisioned_under_the_rate_limit_with_few_429s() {
    a_csv_population_is_provisioned_once(Backend::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_population_is_provisioned_once_from_a_postgres_store() {
    a_csv_population_is_provisioned_once(Backend::Postgres).await;
}

async fn a_csv_population_is_provisioned_once(backend: Backend) {
    const USERS: usize = 1500;
    let world = World::on(limited(), backend).await;
    // As an operator does before a first import on PostgreSQL (`store migrate`).
    flowthrough::store::Store::open_configured(&world.config("", "").store)
        .await
        .unwrap();
    let config = write_config(&world, "max_parallel_users = 8");
    let file = world.path("users.csv");
    std::fs::write(&file, csv((0..USERS).map(|i| user("csv", i)))).unwrap();
    let report = world.path("report.csv");
    let out = import(
        &config,
        &[
            "--standalone",
            "--report",
            report.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_ok(&out);
    assert_says(&out, &format!("provisioned {USERS}"));
    let ids = user_ids(&world);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (USERS, USERS));
    let one = world.subscriber(&user("csv", 7)).unwrap();
    assert_eq!(one["primaryPhoneNumber"], "+12025500007");
    assert_eq!(one["timezone"], "America/Chicago");
    assert_eq!(one["package"], "standard");
    let (calls, limited) = calls_and_429s(&world);
    assert!(
        limited * 50 <= calls,
        "{limited} of {calls} calls were answered 429 (more than 2 %)"
    );
    let report = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        report.lines().count(),
        USERS + 1,
        "a header and a line per user"
    );
    assert_eq!(report.matches(",provisioned,").count(), USERS);

    // Run again: nothing is provisioned twice, everyone is in sync.
    let again = import(&config, &["--standalone", file.to_str().unwrap()]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_says(&again, &format!("in_sync {USERS}"));
    assert_eq!(user_ids(&world).len(), USERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_killed_halfway_and_run_again_does_the_rest_without_duplicates() {
    const USERS: usize = 1000;
    let world = World::new(limited()).await;
    let config = write_config(&world, "max_parallel_users = 8");
    let file = world.path("users.csv");
    std::fs::write(&file, csv((0..USERS).map(|i| user("kill", i)))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .args(["import", "--standalone", "--config"])
        .arg(&config)
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let halfway = eventually(Duration::from_secs(60), || {
        world.sim.counter("provision") >= USERS as u64 / 2
    })
    .await;
    assert!(halfway, "the import never got halfway");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = user_ids(&world).len();
    assert!(before < USERS, "killed too late: all {before} were done");

    let report = world.path("report.json");
    let out = import(
        &config,
        &[
            "--standalone",
            "--report",
            report.to_str().unwrap(),
            "--report-format",
            "json",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_ok(&out);
    let ids = user_ids(&world);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), unique.len()),
        (USERS, USERS),
        "no duplicate, none missing"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), USERS);
    let reported: BTreeSet<&str> = rows.iter().map(|r| r["userId"].as_str().unwrap()).collect();
    assert_eq!(reported.len(), USERS, "one line per user");
    // Users done before the kill are in sync, or (their entry's end not yet on disk) settled
    // again by lookup: either way not provisioned a second time.
    let in_sync = rows.iter().filter(|r| r["outcome"] == "in_sync").count();
    assert!(
        in_sync > 0 && in_sync <= before,
        "{in_sync} in sync, {before} before"
    );
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "in_sync" || r["outcome"] == "provisioned")
    );
}

fn oci(commands: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="ISO-8859-1"?>
<BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sessionId xmlns="">export</sessionId>{commands}</BroadsoftDocument>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_oci_documents_are_imported_and_refusals_reported() {
    const USERS: usize = 200;
    let world = World::new(SimOptions::default()).await;
    let config = write_config(&world, "");
    let mut rows = String::new();
    for i in 0..USERS {
        rows.push_str(&format!(
            "<row><col>oci-{i:03}@acme.example</col><col>hq</col><col>Last{i}</col><col>First</col><col/><col>+1-2025551{i:03}</col><col>true</col><col>oci-{i:03}@acme.example</col><col/><col/><col>false</col><col>{}</col></row>",
            2000 + i
        ));
    }
    let table = oci(&format!(
        r#"<command xsi:type="UserGetListInServiceProviderRequest" xmlns=""><serviceProviderId>acme-ent</serviceProviderId></command>
<command xsi:type="UserGetListInServiceProviderResponse" xmlns=""><userTable><colHeading>User Id</colHeading><colHeading>Group Id</colHeading><colHeading>Last Name</colHeading><colHeading>First Name</colHeading><colHeading>Department</colHeading><colHeading>Phone Number</colHeading><colHeading>Phone Number Activated</colHeading><colHeading>Email Address</colHeading><colHeading>Hiragana Last Name</colHeading><colHeading>Hiragana First Name</colHeading><colHeading>In Trunk Group</colHeading><colHeading>Extension</colHeading>{rows}</userTable></command>"#
    ));
    let sp = world.path("sp.xml");
    std::fs::write(&sp, table).unwrap();
    // One user's full profile, named by its file (Latin-1, as the declaration says).
    let mut profile = oci(
        r#"<command xsi:type="UserGetResponse23" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId><lastName>M#ller</lastName><firstName>J#rgen</firstName><extension>2001</extension><language>French</language><timeZone>Europe/Berlin</timeZone><emailAddress>oci-001@acme.example</emailAddress></command>"#,
    )
    .into_bytes();
    for b in profile.iter_mut().filter(|b| **b == b'#') {
        *b = 0xFC;
    }
    let named = world.path("oci-001@acme.example.xml");
    std::fs::write(&named, profile).unwrap();
    // One user without Integrated IM&P: left out, with the reason.
    let assignment = world.path("assignment.xml");
    std::fs::write(
        &assignment,
        oci(r#"<command xsi:type="UserServiceGetAssignmentListRequest" xmlns=""><userId>oci-002@acme.example</userId></command>
<command xsi:type="UserServiceGetAssignmentListResponse" xmlns=""><servicePacksAssignmentTable><colHeading>Service Pack Name</colHeading><colHeading>Assigned</colHeading><colHeading>Description</colHeading></servicePacksAssignmentTable><userServicesAssignmentTable><colHeading>Service Name</colHeading><colHeading>Assigned</colHeading><row><col>Integrated IM&amp;P</col><col>false</col></row></userServicesAssignmentTable></command>"#),
    )
    .unwrap();
    let files = [
        sp.to_str().unwrap(),
        named.to_str().unwrap(),
        assignment.to_str().unwrap(),
    ];

    let dry = import(&config, &[&["--dry-run"][..], &files[..]].concat()).await;
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry.stderr));
    let plan = text(&dry.stdout);
    assert_eq!(planned(&dry), USERS - 1, "{plan}");
    assert!(
        plan.contains("refused oci-002@acme.example")
            && plan.contains("Integrated IM&P is not assigned"),
        "{plan}"
    );
    assert_eq!(calls_and_429s(&world).0, 0, "a dry run calls no Webex API");

    let out = import(&config, &[&["--standalone"][..], &files[..]].concat()).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_says(&out, &format!("provisioned {}", USERS - 1));
    assert_eq!(user_ids(&world).len(), USERS - 1);
    let jorg = world.subscriber("oci-001@acme.example").unwrap();
    assert_eq!(jorg["lastName"], "Müller");
    assert_eq!(jorg["firstName"], "Jürgen");
    assert_eq!(jorg["language"], "fr_FR");
    assert_eq!(jorg["timezone"], "Europe/Berlin");
    assert_eq!(
        world.subscriber("oci-010@acme.example").unwrap()["primaryPhoneNumber"],
        "+1-2025551010"
    );
    assert!(world.subscriber("oci-002@acme.example").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_source_is_refused_before_anything_happens() {
    let world = World::new(SimOptions::default()).await;
    let config = write_config(&world, "");
    let file = world.path("bad.csv");
    std::fs::write(&file, "user,first,last\na,b,c\n").unwrap();
    let out = import(&config, &["--standalone", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown column \"user\""),
        "{}",
        text(&out.stderr)
    );
    let missing = import(&config, &[world.path("nope.csv").to_str().unwrap()]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("cannot read"),
        "{}",
        text(&missing.stderr)
    );
    assert_eq!(calls_and_429s(&world).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_running_node_live_commands_go_before_the_import() {
    const USERS: usize = 400;
    let world = World::new(SimOptions {
        control: Control {
            rate_limit_per_s: 40,
            ..Control::default()
        },
        ..SimOptions::default()
    })
    .await;
    let Served { config, admin, url } = serve_config(&world, "");
    let mut node = spawn(&config, "warn", Stdio::null());
    wait_ready(&admin).await;
    let file = world.path("users.csv");
    std::fs::write(&file, csv((0..USERS).map(|i| user("node", i)))).unwrap();
    let out = import(&config, &[file.to_str().unwrap()]).await;
    assert_ok(&out);
    assert_says(&out, &format!("queued {USERS}"));

    // While the node works through the import at 40/s, live commands are answered at once.
    let client = world.as_client();
    let mut behind = Vec::new();
    for n in 0..5 {
        let live = format!("live-{n}@acme.example");
        let response = client
            .post(&url)
            .header("content-type", "text/xml")
            .body(document(&user_add(&live, Some(&live))))
            .send()
            .await
            .unwrap();
        let answer = answers(&response.text().await.unwrap()).remove(0);
        assert_eq!(answer.kind, "SuccessResponse", "{}", answer.text);
        behind.push(
            USERS
                - user_ids(&world)
                    .iter()
                    .filter(|u| u.starts_with("node-"))
                    .count(),
        );
    }
    assert!(
        behind.iter().all(|b| *b > 0),
        "the import ended before the live commands were answered; nothing was shown: {behind:?}"
    );
    let done = eventually(Duration::from_secs(60), || {
        user_ids(&world).len() == USERS + 5
    })
    .await;
    assert!(done, "{} subscribers", user_ids(&world).len());
    // Run again through the node: nothing is queued twice.
    let again = import(&config, &[file.to_str().unwrap()]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_says(&again, &format!("known {USERS}"));
    node.kill().unwrap();
    node.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_export_samples_plan_cleanly() {
    let world = World::new(SimOptions::default()).await;
    let config = write_config(&world, "");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/exports");
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let csv = import(&config, &["--dry-run", &file("users.csv")]).await;
    assert!(csv.status.success(), "{}", text(&csv.stdout));
    assert_eq!(planned(&csv), 3, "{}", text(&csv.stdout));
    let oci = import(
        &config,
        &[
            "--dry-run",
            &file("sp-list.xml"),
            &file("alice@acme.example.xml"),
            &file("dave-services.xml"),
        ],
    )
    .await;
    assert!(oci.status.success(), "{}", text(&oci.stdout));
    let plan = text(&oci.stdout);
    assert_eq!(planned(&oci), 2, "{plan}");
    assert!(
        plan.contains(r#""mobilePhoneNumber":"+1-202-555-0199""#),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_keeps_a_standalone_import_under_a_limit_it_would_otherwise_hit() {
    const USERS: usize = 80;
    let world = World::new(SimOptions {
        control: Control {
            rate_limit_per_s: 30,
            ..Control::default()
        },
        ..SimOptions::default()
    })
    .await;
    let config = write_config(&world, "");
    let file = world.path("users.csv");
    std::fs::write(&file, csv((0..USERS).map(|i| user("capped", i)))).unwrap();
    let out = import(
        &config,
        &["--standalone", "--max-rate", "20", file.to_str().unwrap()],
    )
    .await;
    assert_ok(&out);
    assert_eq!(user_ids(&world).len(), USERS);
    assert_eq!(
        world.sim.counter("sent_429"),
        0,
        "20 calls a second never meet a limit of 30"
    );
    let bad = import(&config, &["--max-rate", "0", file.to_str().unwrap()]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("--max-rate must be a positive"),
        "{}",
        text(&bad.stderr)
    );
}
