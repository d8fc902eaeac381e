//! Crash safety, measured: `flowthrough serve` runs as a child process and is killed with SIGKILL
//! while requests are in flight, then restarted on the same store. At the end the simulator must
//! hold exactly the acknowledged subscribers (SuccessResponse or 7020): none lost, none twice, and
//! no entry dead.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;

/// Kill rounds in the test suite; `bench/run.sh crash` runs more.
const ROUNDS: usize = 4;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_duplicates_nothing() {
    let world = World::new(SimOptions::default()).await;
    let Served {
        config, admin, url, ..
    } = serve_config(&world, "ack_deadline_ms = 1000");
    let client = world.as_client();
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let sent: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    for round in 0..ROUNDS {
        let mut child = spawn(&config, "warn", Stdio::inherit());
        wait_ready(&admin).await;
        let mut load = Vec::new();
        for c in 0..CLIENTS {
            let (client, url) = (client.clone(), url.clone());
            let (acknowledged, sent) = (acknowledged.clone(), sent.clone());
            load.push(tokio::spawn(async move {
                for n in 0.. {
                    let user = format!("crash-{round}-{c}-{n}@acme.example");
                    sent.lock().unwrap().insert(user.clone());
                    let body = document(&user_add(&user, Some(&user)));
                    let Ok(response) = client
                        .post(&url)
                        .header("content-type", "text/xml")
                        .body(body)
                        .send()
                        .await
                    else {
                        return;
                    };
                    let Ok(text) = response.text().await else {
                        return;
                    };
                    let answer = &answers(&text)[0];
                    if answer.kind == "SuccessResponse" || answer.code == Some(7020) {
                        acknowledged.lock().unwrap().insert(user);
                    }
                }
            }));
        }
        // Kill at a different moment each round, while requests are in flight.
        let delay = 150 + (round as u64 * 137) % 400;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for task in load {
            task.await.unwrap();
        }
    }

    // Restart once more and let the outbox drain.
    let mut child = spawn(&config, "warn", Stdio::inherit());
    wait_ready(&admin).await;
    let mut drained = false;
    for _ in 0..600 {
        let status = get_json(&format!("http://{admin}/status")).await;
        if status["outbox"]["pending"] == 0 {
            assert_eq!(
                status["outbox"]["dead"], 0,
                "no entry may die of a crash: {status}"
            );
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(drained, "the outbox drains after the last restart");

    let mut per_user: BTreeMap<String, usize> = BTreeMap::new();
    for s in world.subscribers() {
        *per_user
            .entry(s["userId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|u| !per_user.contains_key(*u))
        .collect();
    let twice: Vec<_> = per_user.iter().filter(|(_, n)| **n > 1).collect();
    let unknown: Vec<_> = per_user.keys().filter(|u| !sent.contains(*u)).collect();
    eprintln!(
        "crash test: {ROUNDS} kills, {} sent, {} acknowledged, {} provisioned, lost {}, twice {}",
        sent.len(),
        acknowledged.len(),
        per_user.len(),
        lost.len(),
        twice.len()
    );
    assert!(
        acknowledged.len() >= ROUNDS,
        "the load must actually have run"
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never provisioned: {lost:?}"
    );
    assert!(twice.is_empty(), "provisioned twice: {twice:?}");
    assert!(unknown.is_empty(), "subscribers nobody sent: {unknown:?}");
}
