//! The log is not on the request's path: `flowthrough serve` whose stderr nobody reads (journald
//! fallen behind, a pipe to a stopped collector) goes on provisioning.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;

/// Enough commands that their info lines overflow a pipe's 64 KiB buffer several times.
const COMMANDS: usize = 1_200;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_does_not_stall_provisioning() {
    let world = World::new(SimOptions::default()).await;
    let served = serve_config(&world, "");
    // Piped and never read: once the pipe is full, every write to it blocks.
    let mut child = spawn(&served.config, "info", Stdio::piped());
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
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        for kind in task.await.unwrap() {
            *outcomes.entry(kind).or_default() += 1;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(unread_stderr);
    assert_eq!(
        outcomes.get("SuccessResponse"),
        Some(&COMMANDS),
        "every command delivered and answered while nobody read the log: {outcomes:?}"
    );
    assert_eq!(world.subscribers().len(), COMMANDS);
}
