//! The log is not on the request's path: `flowthrough serve` whose stderr nobody reads (journald
//! fallen behind, a pipe to a stopped collector) goes on provisioning.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;

/// Enough commands that their info lines overflow a pipe's 64 KiB buffer several times.
const COMMANDS: usize = 1_200;
const CLIENTS: usize = 8;

/// Send [`COMMANDS`] UserAdds to a `serve` logging at `level` to a stderr nobody reads. Returns
/// the answers by kind and the server's count of dropped log lines.
async fn provision_with_unread_log(level: &str) -> (BTreeMap<String, usize>, u64) {
    let world = World::new(SimOptions::default()).await;
    let served = serve_config(&world, "");
    // Piped and never read: once the pipe is full, every write to it blocks.
    let mut child = spawn(&served.config, level, Stdio::piped());
    let unread_stderr = child.stderr.take();
    wait_ready(&served.admin).await;

    let client = world.as_client();
    // A stalled server fails the test within a minute instead of hanging it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, url) = (client.clone(), served.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut kinds = Vec::new();
            for n in 0..COMMANDS / CLIENTS {
                if tokio::time::Instant::now() > deadline {
                    kinds.push("not sent: the minute was up".to_owned());
                    continue;
                }
                let user = format!("log-{c}-{n}@acme.example");
                let sent = client
                    .post(&url)
                    .header("content-type", "text/xml")
                    .body(document(&user_add(&user, Some(&user))))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let kind = match sent {
                    Ok(response) => match response.text().await {
                        Ok(text) => answers(&text)[0].kind.clone(),
                        Err(e) => format!("no body: {e}"),
                    },
                    Err(e) => format!("no answer: {e}"),
                };
                kinds.push(kind);
            }
            kinds
        }));
    }
    let mut outcomes = BTreeMap::<String, usize>::new();
    for task in tasks {
        for kind in task.await.unwrap() {
            *outcomes.entry(kind).or_default() += 1;
        }
    }
    // Bounded: a server stalled by its log must fail the test, not hang it.
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", served.admin))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the admin listener answers /metrics")
        .text()
        .await
        .unwrap();
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flowthrough_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter in /metrics:\n{metrics}"));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(unread_stderr);
    assert_eq!(
        world.subscribers().len(),
        outcomes.get("SuccessResponse").copied().unwrap_or(0)
    );
    (outcomes, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_does_not_stall_provisioning() {
    let (outcomes, dropped) = provision_with_unread_log("info").await;
    assert_eq!(
        outcomes.get("SuccessResponse"),
        Some(&COMMANDS),
        "every command delivered and answered while nobody read the log: {outcomes:?}"
    );
    assert_eq!(dropped, 0, "the queue holds what the pipe cannot");
}

/// At trace level every request logs dozens of lines (TLS, HTTP, the Webex call): far more than
/// the writer's queue holds once nobody reads. Lines are dropped and counted, never waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_queue_drops_lines_rather_than_stall_provisioning() {
    let (outcomes, dropped) = provision_with_unread_log("trace").await;
    assert_eq!(
        outcomes.get("SuccessResponse"),
        Some(&COMMANDS),
        "every command delivered and answered while the log queue was full: {outcomes:?}"
    );
    assert!(
        dropped > 0,
        "the queue never filled: the test proves nothing"
    );
}
