//! `flowthrough store migrate` and `store copy`, run as the operator runs them, against a real
//! PostgreSQL cluster (tests/common/pg.rs) and a sled store written by a real `serve`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::PgCluster;
use common::*;
use flowthrough::sim::SimOptions;
use flowthrough::store::postgres::SCHEMA_VERSION;
use flowthrough::store::{
    AuditQuery, Customer, EntryState, Filter, ReconcileReport, Store, StoreError,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_once_checks_and_refuses_a_newer_schema() {
    let cluster = PgCluster::shared();
    let db = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pg.toml");
    std::fs::write(&config, cluster.store_section(&db)).unwrap();
    let config = path(&config).to_owned();
    let run = |args: &[&str]| {
        let mut all = vec!["store", "migrate", "--config", &config];
        all.extend_from_slice(args);
        flowthrough(&all)
    };

    let (code, out, err) = run(&["--check"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("schema version 0") && out.contains("pending: 001_init"),
        "{out}"
    );
    assert_eq!(
        cluster.psql(&db, "SELECT to_regclass('outbox') IS NULL"),
        "t",
        "a check changes nothing"
    );
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("0 → {SCHEMA_VERSION}"))
            && out.contains("applied 001_init")
            && out.contains("004_held_lanes")
            && out.contains("005_shares"),
        "{out}"
    );
    let (code, out, _) = run(&[]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to apply"), "{out}");
    let (code, out, _) = run(&["--check"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("schema version {SCHEMA_VERSION} (current)")),
        "{out}"
    );

    // A database a newer flowthrough migrated: refused, by the tools and by serve.
    cluster.psql(
        &db,
        "INSERT INTO flowthrough_schema (version, name) VALUES (99, 'future')",
    );
    let (code, out, err) = run(&["--check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("version 99") && err.contains(&format!("versions up to {SCHEMA_VERSION}")),
        "{err}"
    );
    match Store::open_configured(&cluster.store_config(&db)).await {
        Err(StoreError::SchemaTooNew { found: 99, known }) if known == SCHEMA_VERSION => {}
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
    let (code, _, err) = flowthrough(&["outbox", "list", "--config", &config]);
    assert_eq!(code, 1);
    assert!(err.contains("version 99"), "{err}");
}

/// Nodes starting together on an empty database: the migration runs once, under its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let cluster = PgCluster::shared();
    let config = cluster.store_config(&cluster.database());
    let opened =
        futures_util::future::join_all((0..4).map(|_| Store::open_configured(&config))).await;
    for store in opened {
        store.unwrap();
    }
    let db = config.postgres.as_ref().unwrap().dbname.clone().unwrap();
    assert_eq!(
        cluster.psql(&db, "SELECT count(*) FROM flowthrough_schema"),
        SCHEMA_VERSION.to_string(),
        "each migration applied once"
    );
}

/// A sled store holding every kind of record (written by a real serve), copied into
/// PostgreSQL twice (the second run changes nothing), compared record for record, then served
/// from PostgreSQL: its pending work delivered in per-user order, its dead entry listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_copied_into_postgres_is_served_from_there() {
    let world = World::new(SimOptions::default()).await;
    let client = world.as_client();
    let Served { config, admin, url } = serve_config(&world, "ack_deadline_ms = 500");
    let mut child = spawn(&config, "warn", std::process::Stdio::inherit());
    wait_ready(&admin).await;
    let post = |body: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client
                .post(&url)
                .header("content-type", "text/xml")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    // Delivered history, a kept unreadable document, then work that waits: Webex fails.
    let (status, body) = post(document(&user_add(
        "early@acme.example",
        Some("early@acme.example"),
    )))
    .await;
    assert_eq!(
        (status, answers(&body)[0].kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    assert_eq!(post("<not-oci/>".to_owned()).await.0, 400);
    world
        .sim
        .control(json!({"server_error_ratio": 1.0}))
        .unwrap();
    let users: Vec<String> = (0..3).map(|i| format!("moved{i}@acme.example")).collect();
    for (i, user) in users.iter().enumerate() {
        let (_, body) = post(document(&user_add(user, Some(user)))).await;
        assert_eq!(answers(&body)[0].code, Some(7020), "{body}");
        let modify = format!(
            r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>{user}</userId><firstName>After{i}</firstName></command>"#
        );
        let (_, body) = post(document(&modify)).await;
        assert_eq!(answers(&body)[0].code, Some(7020), "{body}");
    }
    let (_, body) = post(document(&user_add(
        "dead@acme.example",
        Some("dead@acme.example"),
    )))
    .await;
    assert_eq!(answers(&body)[0].code, Some(7020), "{body}");
    child.kill().unwrap();
    child.wait().unwrap();

    // What only an operator or a long outage makes: a dead entry, a customer.
    let sled_dir = world.path("store");
    let sled = Store::open(&sled_dir).unwrap();
    let dead_id = sled
        .list(Filter::Pending, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.new.user_id == "dead@acme.example")
        .unwrap()
        .id;
    sled.finish(
        dead_id,
        EntryState::Dead {
            at_ms: 5,
            reason: "undelivered after 72 hours".into(),
        },
        None,
        None,
    )
    .await
    .unwrap();
    sled.record_customer(&Customer {
        service_provider_id: "acme-ent".into(),
        group_id: Some("hq".into()),
        name: Some("Acme HQ".into()),
        enterprise: false,
        template: "acme".into(),
    })
    .await
    .unwrap();
    let last_reconcile = ReconcileReport {
        at_ms: 7_000,
        counts: [("missing".to_owned(), 3), ("extra".to_owned(), 1)].into(),
    };
    sled.put_reconcile_report(&last_reconcile).await.unwrap();
    sled.flush().await.unwrap();

    let cluster = PgCluster::shared();
    let db = cluster.database();
    let pg_config = world.path("pg.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("[store]\npath = \"{}\"", sled_dir.display()),
        &cluster.store_section(&db),
    );
    assert!(text.contains("backend = \"postgres\""));
    std::fs::write(&pg_config, &text).unwrap();

    // Refused while a node holds the sled store.
    let copy = || {
        flowthrough(&[
            "store",
            "copy",
            "--from",
            path(&sled_dir),
            "--to",
            path(&pg_config),
        ])
    };
    let (code, out, err) = copy();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("a running flowthrough holds it"), "{err}");
    let entries = sled.list(Filter::All, 1000).await.unwrap();
    let audit = sled
        .audit(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let documents = sled
        .audit(&AuditQuery {
            limit: 1000,
            documents_only: true,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let token = sled.token().await.unwrap();
    let mut mapped = Vec::new();
    for user in users.iter().chain(["early@acme.example".to_owned()].iter()) {
        mapped.push((
            sled.user(user).await.unwrap(),
            sled.profile(user).await.unwrap(),
        ));
    }
    let customers = sled.customers().await.unwrap();
    drop(sled);
    assert_eq!(entries.len(), 8, "{entries:?}");
    assert!(token.is_some() && !audit.is_empty() && documents.len() == 1);

    for run in 0..2 {
        let (code, out, err) = copy();
        assert_eq!(code, 0, "run {run}: {out}{err}");
        assert!(!out.contains('✗'), "{out}");
        assert!(
            out.contains("✓ outbox entries                  8 in sled,          8 of them"),
            "{out}"
        );
    }

    let copied = Store::connect_configured(&cluster.store_config(&db))
        .await
        .unwrap();
    assert_eq!(copied.list(Filter::All, 1000).await.unwrap(), entries);
    assert_eq!(
        copied
            .audit(&AuditQuery {
                limit: 1000,
                ..AuditQuery::default()
            })
            .await
            .unwrap(),
        audit
    );
    assert_eq!(
        copied
            .audit(&AuditQuery {
                limit: 1000,
                documents_only: true,
                ..AuditQuery::default()
            })
            .await
            .unwrap(),
        documents
    );
    assert_eq!(copied.token().await.unwrap(), token);
    assert_eq!(copied.customers().await.unwrap(), customers);
    assert_eq!(
        copied.reconcile_report().await.unwrap(),
        Some(last_reconcile)
    );
    for (user, (record, profile)) in users
        .iter()
        .chain(["early@acme.example".to_owned()].iter())
        .zip(&mapped)
    {
        assert_eq!(&copied.user(user).await.unwrap(), record, "{user}");
        assert_eq!(&copied.profile(user).await.unwrap(), profile, "{user}");
    }
    drop(copied);

    // Served from PostgreSQL, Webex healthy again.
    world
        .sim
        .control(json!({"server_error_ratio": 0.0}))
        .unwrap();
    let mut child = spawn(&pg_config, "warn", std::process::Stdio::inherit());
    wait_ready(&admin).await;
    let delivered = eventually(Duration::from_secs(30), || {
        users.iter().enumerate().all(|(i, user)| {
            world
                .subscriber(user)
                .is_some_and(|s| s["firstName"] == format!("After{i}"))
        })
    })
    .await;
    assert!(delivered, "{:?}", world.subscribers());
    assert!(
        world.subscriber("dead@acme.example").is_none(),
        "a dead entry waits for the operator"
    );
    let response = client
        .post(&url)
        .header("content-type", "text/xml")
        .body(document(&user_add(
            "late@acme.example",
            Some("late@acme.example"),
        )))
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    assert_eq!(answers(&body)[0].kind, "SuccessResponse", "{body}");
    // The copied dead entry still holds its user's lane: a command for that user waits behind
    // it, and the AS hears so at once.
    let modify = r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>dead@acme.example</userId><firstName>Held</firstName></command>"#;
    let response = client
        .post(&url)
        .header("content-type", "text/xml")
        .body(document(modify))
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    assert_eq!(answers(&body)[0].code, Some(7020), "{body}");
    assert!(
        body.contains(&format!("waits behind dead outbox entry {dead_id}")),
        "{body}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let (code, out, err) = flowthrough(&["outbox", "list", "--dead", "--config", path(&pg_config)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dead@acme.example") && out.contains(&dead_id.to_string()),
        "{out}"
    );
    let (_, out, _) = flowthrough(&[
        "outbox",
        "list",
        "--all",
        "--json",
        "--config",
        path(&pg_config),
    ]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let late = listed
        .iter()
        .find(|e| e["user_id"] == "late@acme.example")
        .unwrap();
    let highest_copied = entries.iter().map(|e| e.id).max().unwrap();
    assert!(
        late["id"].as_u64().unwrap() > highest_copied,
        "new entries come after the copied ones: {late}"
    );
}

/// TLS to the database as configured, with rustls: a server that takes TLS connections only is
/// reached with `require` and with `verify-full` against its CA, refused plain and refused under
/// another CA. `doctor` reports the database and, on an empty one, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_used_as_configured_and_doctor_reports_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pki) = flowthrough::certs::DevPki::generate(&dir.path().join("pki")).unwrap();
    let (_, other) = flowthrough::certs::DevPki::generate(&dir.path().join("other")).unwrap();
    let cluster = PgCluster::start_tls(&pki.server_cert, &pki.server_key);
    let db = cluster.database();
    let section = |tls: &str| cluster.store_section_tls(&db, tls);
    let open = |text: String| async move {
        let config = flowthrough::config::Config::parse(&text, Path::new("pg.toml")).unwrap();
        Store::open_configured(&config.store).await
    };

    let plain = open(section("tls = \"disable\""))
        .await
        .unwrap_err()
        .to_string();
    assert!(plain.contains("no encryption"), "{plain}");
    open(section("tls = \"require\"")).await.unwrap();
    let verified = format!(
        "tls = \"verify-full\"\nca_bundle = \"{}\"",
        pki.ca_cert.display()
    );
    let store = open(section(&verified)).await.unwrap();
    store.enqueue(vec![], 1).await.unwrap();
    drop(store);
    let wrong_ca = format!(
        "tls = \"verify-full\"\nca_bundle = \"{}\"",
        other.ca_cert.display()
    );
    let refused = open(section(&wrong_ca)).await.unwrap_err().to_string();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    let config = dir.path().join("flowthrough.toml");
    std::fs::write(&config, section(&verified)).unwrap();
    let (_, out, err) = flowthrough(&["doctor", "--offline", "--config", path(&config)]);
    let current = format!("✓ PostgreSQL schema: version {SCHEMA_VERSION} (current)");
    for line in [
        "✓ PostgreSQL reachable: 127.0.0.1:",
        "✓ PostgreSQL TLS: verify-full",
        current.as_str(),
        "✓ PostgreSQL durability: fsync = on, synchronous_commit = on",
        "✓ PostgreSQL commit: one commit took",
        "✓ store: 0 pending, 0 dead",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}{err}");
    }

    let empty = cluster.database();
    std::fs::write(&config, cluster.store_section_tls(&empty, &verified)).unwrap();
    let (_, out, err) = flowthrough(&["doctor", "--offline", "--config", path(&config)]);
    assert!(
        out.contains(
            "! PostgreSQL schema: version 0, 001_init, 002_population, 003_cluster, 004_held_lanes"
        ),
        "{out}{err}"
    );
    assert_eq!(
        cluster.psql(
            &empty,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0",
        "a check changes nothing"
    );
}

/// `flowthrough cluster status` reads the nodes from the database: alive, stopped on purpose,
/// missing (no heartbeat for longer than a lease) with the users it still holds, and leases
/// that ran out with work on them; exit 2 while anything is wrong, in the table and in JSON. A
/// sled config is refused with where to look instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_lists_nodes_and_flags_a_missing_one() {
    let cluster = PgCluster::shared();
    let db = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pg.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[cluster]\nnode_id = \"ops-host\"\nlease_ms = 5000\n",
            cluster.store_section(&db)
        ),
    )
    .unwrap();
    let config = path(&config).to_owned();
    let status = |json: bool| {
        let mut args = vec!["cluster", "status", "--config", &config];
        if json {
            args.push("--json");
        }
        flowthrough(&args)
    };
    let store = Store::open_configured(&cluster.store_config(&db))
        .await
        .unwrap();
    let (code, out, err) = status(false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no node has started"), "{out}");

    store
        .heartbeat("node-a", "9.9.9", 1_000, false)
        .await
        .unwrap();
    store
        .heartbeat("node-b", "9.9.9", 2_000, false)
        .await
        .unwrap();
    store
        .heartbeat("node-c", "9.9.8", 3_000, true)
        .await
        .unwrap();
    let (code, out, err) = status(false);
    assert_eq!(code, 0, "all alive or stopped: {out}{err}");
    assert!(out.contains("node-c") && out.contains("stopped"), "{out}");

    // node-b dies holding alice, whose work is still pending.
    store
        .enqueue(vec![new_entry("alice@acme.example")], 1)
        .await
        .unwrap();
    store
        .claim_lane("alice@acme.example", "node-b", 1)
        .await
        .unwrap()
        .expect("a free lane");
    cluster.psql(
        &db,
        "UPDATE nodes SET heartbeat_at = now() - interval '1 minute' WHERE node_id = 'node-b'",
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (code, out, err) = status(false);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("node-b is missing") && out.contains("1 of its leases ran out"),
        "{out}"
    );
    let (code, out, _) = status(true);
    assert_eq!(code, 2);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let states: Vec<(String, String, u64)> = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
                n["leases_overdue"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("node-a".into(), "alive".into(), 0),
            ("node-b".into(), "missing".into(), 1),
            ("node-c".into(), "stopped".into(), 0),
        ]
    );

    let sled = dir.path().join("sled.toml");
    std::fs::write(
        &sled,
        format!("[store]\npath = \"{}\"\n", path(&dir.path().join("s"))),
    )
    .unwrap();
    let (code, _, err) = flowthrough(&["cluster", "status", "--config", path(&sled)]);
    assert_eq!(code, 1);
    assert!(err.contains("sled") && err.contains("/status"), "{err}");
}

fn new_entry(user: &str) -> flowthrough::store::NewEntry {
    flowthrough::store::NewEntry {
        user_id: user.to_owned(),
        template: "acme".to_owned(),
        command: "UserAddRequest17sp4".to_owned(),
        call: flowthrough::store::Call::Remove,
        client: "test".to_owned(),
        origin: flowthrough::store::Origin::Live,
    }
}
