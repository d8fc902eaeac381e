//! Crash safety, measured: `flowthrough serve` runs as a child process and is killed with SIGKILL
//! while requests are in flight, then restarted on the same store. At the end the simulator must
//! hold exactly the acknowledged subscribers (SuccessResponse or 7020): none lost, none twice, and
//! no entry dead.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;

/// Kill rounds in the test suite; `bench/run.sh crash` runs more.
const ROUNDS: usize = 4;
const CLIENTS: usize = 8;

fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn wait_ready(admin: &str) {
    let ready = eventually(Duration::from_secs(30), || {
        std::net::TcpStream::connect(admin).is_ok()
    })
    .await;
    assert!(ready, "flowthrough did not start listening on {admin}");
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("http://{admin}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("flowthrough never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_duplicates_nothing() {
    let world = World::new(SimOptions::default()).await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let text = world
        .config_text(
            "ack_deadline_ms = 1000",
            &format!("\n[admin]\nlisten = \"{admin}\"\n"),
        )
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        )
        .replace("[admin]\nlisten = \"127.0.0.1:0\"\n", "");
    let config = world.path("flowthrough.toml");
    std::fs::write(&config, text).unwrap();
    let url = format!("https://localhost:{port}/provisioning");
    let client = world.as_client();
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let sent: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    for round in 0..ROUNDS {
        let mut child = spawn(&config);
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
    let mut child = spawn(&config);
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
