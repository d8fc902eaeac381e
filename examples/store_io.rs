//! Bytes written to disk per provisioning request by the store (sled's write amplification),
//! replaying the store operations of one delivered UserAdd, one thread, a flush every BATCH
//! requests (the group commit of BATCH concurrent requests):
//!
//!   cargo run --release --example store_io -- [STEPS] [BATCH] [N] [USERS] [KEEP]
//!
//! USERS (default 0: a new user per request) cycles through that many users instead. KEEP (default
//! 0: never) prunes the delivered history and the audit down to KEEP records every KEEP requests,
//! as the housekeeping does with `history_max_entries` and `audit_max_records`, and trims the
//! heap afterwards as it does.
//!
//! STEPS picks the operations besides the enqueue: p save the profile, m map the user, e read the
//! head, r record an attempt, a map the subscriber, f finish, A two audit records (B: one).
//! The store goes under /var/tmp (a disk, not tmpfs) and is removed afterwards. Six times in the
//! run it prints the process's RSS beside the store's size on disk: with no HTTP, TLS or delivery
//! in the process, memory that follows the store's size is the store's.

use flowthrough::store::{Call, EntryState, NewEntry, Origin, Store, now_ms};

// The server's allocator, so that the figures are the server's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn dir_mib(dir: &std::path::Path) -> f64 {
    let mut bytes = 0;
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => bytes += m.len(),
                Err(_) => {}
            }
        }
    }
    bytes as f64 / 1024.0 / 1024.0
}

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = args.get(1).cloned().unwrap_or("pmeafB".into());
    let batch: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(4);
    let n: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(4000);
    let users: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(0);
    let keep: usize = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = Store::open(dir.path()).unwrap();
    // The body flowthrough builds for schemas/samples/user-add-17sp4.xml.
    let body = serde_json::json!({
        "email": "alice.smith@acme.example", "extension": "0101", "firstName": "Alice",
        "language": "en_US", "lastName": "Smith", "package": "standard",
        "primaryPhoneNumber": "+12025550101", "provisioningId": "prov-acme",
        "spEnterpriseId": "acme-ent", "timezone": "America/New_York",
        "userId": "alice.smith@acme.example"
    });
    let call = Call::provision(&body).unwrap();
    let profile_xml = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/samples/user-add-17sp4.xml"
    ))
    .unwrap();
    let doc = flowthrough::oci::parse(&profile_xml, &Default::default()).unwrap();
    let profile = match &doc.commands[0].command {
        flowthrough::oci::Command::UserAdd(p) => p.clone(),
        _ => panic!(),
    };
    let before = write_bytes();
    let started = std::time::Instant::now();
    for i in 0..n {
        if i % (n / 6).max(1) == 0 {
            println!(
                "after {i} requests: RSS {:.1} MiB, store {:.0} MiB",
                rss_mib(),
                dir_mib(dir.path())
            );
        }
        if keep > 0 && i > 0 && i % keep == 0 {
            store.prune_audit(0, keep as u64).await.unwrap();
            store.prune_finished(0, keep as u64).await.unwrap();
            // As the server's housekeeping does after each round.
            // SAFETY: see `release_freed_heap` in src/server/mod.rs.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            unsafe {
                libc::malloc_trim(0);
            }
        }
        let user = format!("user{}@example.com", if users > 0 { i % users } else { i });
        let mut p = profile.clone();
        p.user_id = user.clone();
        if steps.contains('p') {
            store.save_profile(&p).await.unwrap();
        }
        if steps.contains('m') {
            store.map_user(&user, None, Some("acme")).await.unwrap();
        }
        let id = store
            .enqueue(
                vec![NewEntry {
                    user_id: user.clone(),
                    template: "acme".into(),
                    command: "UserAddRequest".into(),
                    call: call.clone(),
                    client: "CN=as1.example.com serial 01".into(),
                    origin: Origin::Live,
                }],
                now_ms(),
            )
            .await
            .unwrap()[0];
        if i % batch == 0 {
            store.flush().await.unwrap();
        }
        if steps.contains('e') {
            let _ = store.head_of(&user).await.unwrap();
        }
        if steps.contains('r') {
            store
                .record_attempt(id, "FLOWTHROUGH_abc", None)
                .await
                .unwrap();
        }
        if steps.contains('a') {
            store
                .map_user(&user, Some("sub-1"), Some("acme"))
                .await
                .unwrap();
        }
        if steps.contains('f') {
            store
                .finish(
                    id,
                    EntryState::Delivered {
                        at_ms: now_ms(),
                        subscriber_id: Some("sub-1".into()),
                        webex_status: Some("provisioned".into()),
                    },
                    Some("FLOWTHROUGH_abc"),
                    None,
                )
                .await
                .unwrap();
        }
        if steps.contains('A') {
            for _ in 0..if steps.contains('B') { 1 } else { 2 } {
                store
                    .append_audit(&flowthrough::store::AuditRecord {
                        at_ms: now_ms(),
                        client: "CN=as1.example.com serial 01".into(),
                        event: flowthrough::store::AuditEvent::Command {
                            template: Some("acme".into()),
                            command: "UserAddRequest".into(),
                            user_id: Some(user.clone()),
                            outcome: "success".into(),
                            webex_status: Some("provisioned".into()),
                            tracking_id: Some("FLOWTHROUGH_abc".into()),
                            outbox_id: Some(id),
                            latency_ms: 3,
                        },
                    })
                    .await
                    .unwrap();
            }
        }
    }
    store.flush().await.unwrap();
    println!(
        "after {n} requests: RSS {:.1} MiB, store {:.0} MiB",
        rss_mib(),
        dir_mib(dir.path())
    );
    let after = write_bytes();
    // Rounds of the server's housekeeping with the default caps, which this run stays under:
    // what it costs just to find out there is nothing to remove. The first round counts the
    // records by walking them; later rounds use the counts kept since.
    for round in ["first", "second"] {
        let pruning = std::time::Instant::now();
        let cutoff = now_ms().saturating_sub(7 * 24 * 3600 * 1000);
        let removed = store.prune_audit(cutoff, 1_000_000).await.unwrap()
            + store.prune_finished(cutoff, 1_000_000).await.unwrap();
        println!(
            "{round} pruning round under the default caps: {} ms, {removed} removed",
            pruning.elapsed().as_millis()
        );
    }
    println!(
        "steps={steps} batch={batch} n={n}: {:.1} KiB written per request, {:.1} µs per request",
        (after - before) as f64 / n as f64 / 1024.0,
        started.elapsed().as_micros() as f64 / n as f64
    );
}
