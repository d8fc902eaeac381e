//! Crash safety, measured: `flowthrough serve` runs as a child process and is killed with SIGKILL
//! while requests are in flight, then restarted on the same store. At the end the simulator must
//! hold exactly the acknowledged subscribers (SuccessResponse or 7020): none lost, none twice, and
//! no entry dead.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::proxy::{DbProxy, Link};
use common::*;
use flowthrough::sim::SimOptions;

/// Kill rounds in the test suite; `bench/run.sh crash` runs more.
const ROUNDS: usize = 4;
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_duplicates_nothing_on_sled() {
    kill_9_under_load(Backend::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_duplicates_nothing_on_postgres() {
    kill_9_under_load(Backend::Postgres).await;
}

async fn kill_9_under_load(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
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
        "crash test ({backend:?}): {ROUNDS} kills, {} sent, {} acknowledged, {} provisioned, lost {}, twice {}",
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

/// `flowthrough serve` as a child process that cannot write a file past `bytes` (RLIMIT_FSIZE,
/// with SIGXFSZ ignored so a write past it fails with EFBIG instead of killing the process):
/// what a full data volume looks like to the store. Its log goes nowhere, since a log file past
/// the limit would fail too.
fn spawn_with_file_size_limit(config: &std::path::Path, bytes: u64) -> ServeChild {
    use std::os::unix::process::CommandExt;
    let mut command = serve_command(config, "warn", Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls are made (setrlimit, signal).
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ServeChild(command.spawn().unwrap())
}

/// A store that cannot grow (a full volume; here a file size limit): the AS hears 503 and why,
/// the node reports itself not ready with what to do, it keeps running, and every command it
/// acknowledged before is delivered once after a restart with room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_grow_refuses_goes_unready_and_loses_nothing_acknowledged() {
    let world = World::new(SimOptions::default()).await;
    let Served {
        config, admin, url, ..
    } = serve_config(&world, "");
    let client = world.as_client();
    let post = |user: &str| {
        client
            .post(&url)
            .header("content-type", "text/xml")
            .body(document(&user_add(user, Some(user))))
            .send()
    };

    let mut child = spawn_with_file_size_limit(&config, 3_000_000);
    wait_ready(&admin).await;
    let mut acknowledged = BTreeSet::new();
    let mut refusal = None;
    for n in 0..20_000 {
        let user = format!("full-{n}@acme.example");
        let response = post(&user).await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        if status == 503 {
            refusal = Some(text);
            break;
        }
        assert_eq!(status, 200, "{text}");
        let answer = &answers(&text)[0];
        if answer.kind == "SuccessResponse" || answer.code == Some(7020) {
            acknowledged.insert(user);
        }
    }
    let refusal = refusal.expect("3 MB of store fill up within 20,000 commands");
    assert!(
        refusal.contains("store") && refusal.contains("data volume"),
        "{refusal}"
    );
    assert!(
        acknowledged.len() >= 10,
        "commands were acknowledged before the store filled up"
    );

    let readyz = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let why = readyz.text().await.unwrap();
    assert!(
        why.contains("the store cannot be written") && why.contains("restart flowthrough"),
        "{why}"
    );
    let again = post("full-after@acme.example").await.unwrap();
    assert_eq!(again.status(), 503, "a full store keeps refusing");
    let again = again.text().await.unwrap();
    assert!(
        again.contains("data volume") && again.contains("restart flowthrough"),
        "{again}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "flowthrough must keep running on a full store"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = spawn(&config, "warn", Stdio::inherit());
    wait_ready(&admin).await;
    let drained = eventually(Duration::from_secs(30), || {
        let subscribers = world.subscribers();
        acknowledged.iter().all(|user| {
            subscribers
                .iter()
                .any(|s| s["userId"].as_str() == Some(user.as_str()))
        })
    })
    .await;
    let status = get_json(&format!("http://{admin}/status")).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        drained,
        "every acknowledged command reaches Webex after the restart"
    );
    assert_eq!(status["outbox"]["dead"], 0, "{status}");
    provisioned_once_each(&world);
}

/// PostgreSQL stopped under load and started again, flowthrough left running: the AS hears 503
/// (nothing acknowledged that is not committed), `/readyz` turns red with the reason and green
/// again by itself, and every acknowledged command is delivered, in per-user order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_loses_nothing_and_recovers_by_itself() {
    let cluster = Arc::new(common::pg::PgCluster::start());
    let world = World::on_cluster(SimOptions::default(), cluster.clone()).await;
    let Served {
        config, admin, url, ..
    } = serve_config(&world, "ack_deadline_ms = 1000");
    let mut child = spawn(&config, "warn", Stdio::inherit());
    wait_ready(&admin).await;
    let client = world.as_client();
    // Per user: an add, then modifies numbered in sending order.
    let acknowledged: Arc<Mutex<BTreeMap<String, Vec<usize>>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..CLIENTS {
        let (client, url) = (client.clone(), url.clone());
        let (acknowledged, refused, stop) = (acknowledged.clone(), refused.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let user = format!("pg-{c}@acme.example");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let command = if n == 0 {
                    user_add(&user, Some(&user))
                } else {
                    format!(
                        r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>{user}</userId><firstName>V{n}</firstName></command>"#
                    )
                };
                let Ok(response) = client
                    .post(&url)
                    .header("content-type", "text/xml")
                    .body(document(&command))
                    .send()
                    .await
                else {
                    continue;
                };
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if status == 503 {
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let answer = &answers(&text)[0];
                if answer.kind == "SuccessResponse" || answer.code == Some(7020) {
                    acknowledged.lock().unwrap().entry(user.clone()).or_default().push(n);
                    n += 1;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = acknowledged
        .lock()
        .unwrap()
        .values()
        .map(Vec::len)
        .sum::<usize>();
    cluster.stop();
    let (status, why) = readiness_until(&admin, Duration::from_secs(20), |status, why| {
        status == 503 && why.contains("PostgreSQL")
    })
    .await;
    assert!(
        status == 503
            && why.contains("the store cannot be written")
            && why.contains("resumes by itself"),
        "{status} {why}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart();
    let (status, why) =
        readiness_until(&admin, Duration::from_secs(30), |status, _| status == 200).await;
    assert_eq!(
        status, 200,
        "/readyz turns green once PostgreSQL is back, without a restart: {why}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let total: usize = acknowledged.values().map(Vec::len).sum();
    assert!(
        total > before && before > 0,
        "commands were acknowledged before the outage ({before}) and after it ({total})"
    );
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the AS heard 503 while the database was down"
    );
    // Delivered, each user's last acknowledged modify last: an older one applied after a newer
    // would leave an older name.
    let delivered = eventually(Duration::from_secs(30), || {
        acknowledged.iter().all(|(user, ns)| {
            let last = ns.last().copied().unwrap_or(0);
            // The command after the last acknowledged one may have committed as the database
            // went away (answered 503, then sent again): it may be the last applied too.
            world.subscriber(user).is_some_and(|s| {
                let name = s["firstName"].as_str().unwrap_or_default();
                (last == 0 && name == "User")
                    || name == format!("V{last}")
                    || name == format!("V{}", last + 1)
            })
        })
    })
    .await;
    let status = get_json(&format!("http://{admin}/status")).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        delivered,
        "every acknowledged command is delivered in per-user order: {acknowledged:?} {:?} {status}",
        world.subscribers()
    );
    assert_eq!(status["outbox"]["dead"], 0, "{status}");
    assert_eq!(
        world.subscribers().len(),
        CLIENTS,
        "one subscriber per user"
    );
    drop(world);
}

/// Issue 21: a connection lost during a commit never turns into an acknowledgement. A relay
/// between flowthrough and PostgreSQL switches to swallowing PostgreSQL's answers: the commands'
/// transactions reach the server and commit, flowthrough never hears so, and the connections are
/// closed a moment later. Each of those commands is answered 503 (its outcome unknown to
/// flowthrough), yet the database shows that some committed, so the window was hit; once the
/// relay is back the node turns ready by itself, accepts again, and delivers what committed
/// unacknowledged (the AS resends it anyway; a provision sent again looks the user up first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_the_commit_is_never_acknowledged() {
    const LOST: usize = 5;
    // A cluster of the test's own: the relay's grace before it closes (SWALLOWED_CLOSE) must
    // cover the commit, which other tests' load on a shared cluster could slow down.
    let cluster = Arc::new(common::pg::PgCluster::start());
    let world = World::on_cluster(SimOptions::default(), cluster.clone()).await;
    let db = world.postgres.as_ref().map(|(_, db)| db.clone()).unwrap();
    let proxy = DbProxy::start(cluster.port).await;
    let Served {
        config, admin, url, ..
    } = serve_config(&world, "ack_deadline_ms = 1000");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, proxy.route(&text)).unwrap();
    let _serving = spawn(&config, "warn", Stdio::inherit());
    wait_ready(&admin).await;
    let client = world.as_client();

    // Sanity, and a warm pool: sent together, these leave several pooled connections with the
    // store's statements prepared, so a command sent after the switch can go straight to its
    // one-round-trip commit (a fresh connection's handshake would be swallowed before anything
    // commits).
    let before: Vec<String> = (0..LOST)
        .map(|i| format!("before-{i}@acme.example"))
        .collect();
    for (user, (status, body)) in before.iter().zip(add_all(&client, &url, &before).await) {
        assert!(
            acknowledged(status, &body),
            "{user}: acknowledged with the database reachable: {status} {body}"
        );
    }

    // The AS hears Webex's answer before the entry's end and the audit record's completion are
    // written: wait for those, or their statements, swallowed, hold the pool's connections
    // and the commands below never reach PostgreSQL.
    let settled = eventually(Duration::from_secs(30), || {
        cluster.psql(
            &db,
            "SELECT (SELECT count(*) FROM outbox WHERE user_id LIKE 'before-%' AND state = 'pending') \
             + (SELECT count(*) FROM audit WHERE user_id LIKE 'before-%' AND record->>'outcome' = 'accepted')",
        )
        .trim()
            == "0"
    })
    .await;
    assert!(
        settled,
        "the commands sent before the cut were not delivered and audited"
    );

    proxy.set(Link::SwallowAnswers);
    let lost: Vec<String> = (0..LOST)
        .map(|i| format!("lost-{i}@acme.example"))
        .collect();
    // Together, so that they all pass admission before the first lost connection marks the store
    // as failing (after which later requests are refused before they reach the database).
    let heard = add_all(&client, &url, &lost).await;
    for (user, (status, body)) in lost.iter().zip(&heard) {
        assert!(
            !acknowledged(*status, body),
            "{user} was acknowledged although PostgreSQL's answer to its commit never reached flowthrough: {status} {body}"
        );
        // What serve answers when the store's write fails: 503 in plain text, no OCI-P document.
        assert!(
            *status == 503
                && body.starts_with("the store cannot be written")
                && answers(body).is_empty(),
            "{user}: a lost commit is answered 503 \"the store cannot be written\": {status} {body}"
        );
    }
    let committed = committed_users(&cluster, &db, "lost-%");
    assert!(
        !committed.is_empty(),
        "none of {lost:?} committed, so the test missed the window it is about (a commit whose \
         answer is lost): the relay closed before PostgreSQL committed, or every command needed a \
         new connection; answers: {heard:?}"
    );
    eprintln!(
        "lost commits: {} of {LOST} committed without an answer, all answered 503: {}",
        committed.len(),
        heard[0].1.trim_end()
    );

    proxy.set(Link::Up);
    let (status, why) =
        readiness_until(&admin, Duration::from_secs(30), |status, _| status == 200).await;
    assert_eq!(
        status, 200,
        "/readyz turns green once the connection works again, without a restart: {why}"
    );
    let after = "after@acme.example".to_owned();
    let (status, body) = add_all(&client, &url, std::slice::from_ref(&after))
        .await
        .remove(0);
    assert!(
        acknowledged(status, &body),
        "{after}: acknowledged once the database is reachable again: {status} {body}"
    );

    // Every acknowledged command and every commit whose answer was lost reaches Webex.
    let mut expected: BTreeSet<String> = before.iter().cloned().collect();
    expected.insert(after);
    expected.extend(committed.iter().cloned());
    let delivered = eventually(Duration::from_secs(30), || {
        let subscribers: BTreeSet<String> = world
            .subscribers()
            .iter()
            .filter_map(|s| s["userId"].as_str().map(str::to_owned))
            .collect();
        expected.is_subset(&subscribers)
    })
    .await;
    let status = get_json(&format!("http://{admin}/status")).await;
    assert!(
        delivered,
        "delivered: {expected:?}; the simulator has {:?}; {status}",
        world.subscribers()
    );
    assert_eq!(status["outbox"]["dead"], 0, "{status}");
    // What committed is exactly what was delivered of the lost commands (read again: the set is
    // final now), each once, and its entries ended delivered.
    let committed = committed_users(&cluster, &db, "lost-%");
    let per_user = provisioned_once_each(&world);
    let delivered_lost: BTreeSet<String> = per_user
        .keys()
        .filter(|u| u.starts_with("lost-"))
        .cloned()
        .collect();
    assert_eq!(
        delivered_lost, committed,
        "the lost commands Webex got are those that committed"
    );
    // The entry's end is written after Webex's answer, so a moment after the subscriber shows.
    let ended = eventually(Duration::from_secs(10), || {
        cluster.psql(
            &db,
            "SELECT count(*) FROM outbox WHERE state <> 'delivered'",
        ) == "0"
    })
    .await;
    assert!(
        ended,
        "every entry ends delivered: {}",
        cluster.psql(&db, "SELECT user_id, state FROM outbox ORDER BY id")
    );
}

/// A UserAdd for each of `users`, all sent at once; each one's HTTP status and body, in order.
async fn add_all(client: &reqwest::Client, url: &str, users: &[String]) -> Vec<(u16, String)> {
    let sends: Vec<_> = users
        .iter()
        .map(|user| {
            let request = client
                .post(url)
                .header("content-type", "text/xml")
                .body(document(&user_add(user, Some(user))));
            let user = user.clone();
            tokio::spawn(async move {
                let response = request
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{user}: no answer from flowthrough: {e}"));
                let status = response.status().as_u16();
                let body = response
                    .text()
                    .await
                    .unwrap_or_else(|e| panic!("{user}: the answer's body broke off: {e}"));
                (status, body)
            })
        })
        .collect();
    let mut heard = Vec::with_capacity(sends.len());
    for send in sends {
        heard.push(send.await.expect("a request's task ends"));
    }
    heard
}

/// Whether the AS was told the command is accepted: SuccessResponse, or 7020 (stored, delivery
/// continues).
fn acknowledged(status: u16, body: &str) -> bool {
    status == 200
        && answers(body)
            .first()
            .is_some_and(|a| a.kind == "SuccessResponse" || a.code == Some(7020))
}

/// The users of the outbox entries committed in `db` whose user id is `LIKE pattern`, read from
/// PostgreSQL directly (not through the relay).
fn committed_users(cluster: &common::pg::PgCluster, db: &str, pattern: &str) -> BTreeSet<String> {
    cluster
        .psql(
            db,
            &format!("SELECT DISTINCT user_id FROM outbox WHERE user_id LIKE '{pattern}'"),
        )
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Poll `/readyz` until `done` holds for its status and text, or `limit` passes; the last answer.
async fn readiness_until(
    admin: &str,
    limit: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let answer = match reqwest::get(format!("http://{admin}/readyz")).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        };
        if done(answer.0, &answer.1) || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The simulator's subscribers by userId, after checking that none was provisioned twice.
fn provisioned_once_each(world: &World) -> BTreeMap<String, usize> {
    let mut per_user: BTreeMap<String, usize> = BTreeMap::new();
    for s in world.subscribers() {
        *per_user
            .entry(s["userId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_user.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "provisioned twice: {twice:?}");
    per_user
}
