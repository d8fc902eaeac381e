//! Several `flowthrough serve` nodes on one PostgreSQL store (SPEC §11), run as operators run
//! them: child processes with their own `node_id`, ports and log, one throwaway PostgreSQL
//! cluster (fsync on), the Webex simulator on loopback recording every call it applies per user,
//! and the AS over mutual TLS. Every verdict comes from the simulator's record of calls or its
//! counters, and from the shared store: what reached Webex, in which order, how often.
//!
//! Faults: kill -9, SIGSTOP past the lease, one node's database connection cut. Limits the
//! nodes must share: Webex's rate limit and the OAuth refresh.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::proxy::{DbProxy, Link};
use common::*;
use flowthrough::sim::{CallRecord, Control, SimOptions};
use rand::Rng;

/// Short leases and polls, so a dead node's users move within seconds.
const LEASE_MS: u64 = 2000;
const POLL_MS: u64 = 200;

/// The tests run one at a time: each starts two or three nodes, and on a two-core machine
/// concurrent ones would starve each other's leases and skew the rate measurement. (tokio's
/// mutex: held across awaits, and released by a test that panics.)
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One `flowthrough serve` child process, restartable on the same ports and log.
struct Node {
    name: String,
    config: PathBuf,
    admin: String,
    url: String,
    log: PathBuf,
    child: Option<ServeChild>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running already", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(spawn(&self.config, "warn", Stdio::from(log)));
    }

    async fn start_ready(&mut self) {
        self.start();
        wait_ready(&self.admin).await;
    }

    /// SIGKILL: no hand-back of leases, no flush, nothing.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().expect("the node runs").id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn ready(&self) -> (u16, String) {
        match reqwest::get(format!("http://{}/readyz", self.admin)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill();
    }
}

/// The nodes, the world they share and the AS. Nodes are declared first so they are killed
/// before the simulator and the database go.
struct Cluster {
    nodes: Vec<Node>,
    client: reqwest::Client,
    world: World,
}

impl Cluster {
    /// A world on a new database of the shared PostgreSQL cluster, with the simulator
    /// recording calls.
    async fn world(control: Control) -> World {
        let control = Control {
            record_calls: true,
            ..control
        };
        World::on(
            SimOptions {
                control,
                ..SimOptions::default()
            },
            Backend::Postgres,
        )
        .await
    }

    /// `count` nodes named node-a, node-b …, started one after the other and ready. `webex` is
    /// extra `[webex]` keys, `server` extra `[server]` keys.
    async fn start(control: Control, count: usize, webex: &str, server: &str) -> Cluster {
        let world = Cluster::world(control).await;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            client: as_client(&world),
            world,
        };
        for i in 0..count {
            cluster.add_node(i, webex, server, None);
        }
        for node in &mut cluster.nodes {
            node.start_ready().await;
        }
        cluster
    }

    /// Configure node number `i` (not started); with `proxy`, its store is reached through it.
    fn add_node(&mut self, i: usize, webex: &str, server: &str, proxy: Option<&DbProxy>) {
        let name = format!("node-{}", (b'a' + i as u8) as char);
        let port = free_port();
        let admin = format!("127.0.0.1:{}", free_port());
        let extra = format!(
            "{webex}\n[admin]\nlisten = \"{admin}\"\n\n[cluster]\nnode_id = \"{name}\"\n\
             lease_ms = {LEASE_MS}\npoll_ms = {POLL_MS}\n"
        );
        let mut text = self
            .world
            .config_text(server, &extra)
            .replace(
                "listen = [\"127.0.0.1:0\"]",
                &format!("listen = [\"127.0.0.1:{port}\"]"),
            )
            .replace("[admin]\nlisten = \"127.0.0.1:0\"\n", "");
        if let Some(proxy) = proxy {
            text = proxy.route(&text);
        }
        let config = self.world.path(&format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        self.nodes.push(Node {
            log: self.world.path(&format!("{name}.log")),
            name,
            config,
            admin,
            url: format!("https://localhost:{port}/provisioning"),
            child: None,
        });
    }

    fn pg(&self) -> (&common::pg::PgCluster, &str) {
        let (cluster, db) = self.world.postgres.as_ref().unwrap();
        (cluster, db.as_str())
    }

    /// SQL against the shared store, as the operator would read it.
    fn sql(&self, query: &str) -> String {
        let (cluster, db) = self.pg();
        cluster.psql(db, query)
    }

    fn count(&self, query: &str) -> u64 {
        self.sql(query).parse().unwrap()
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// Wait until the store holds no pending entry; whether it got there.
    async fn drained(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.count("SELECT count(*) FROM outbox WHERE state = 'pending'") == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// What Webex applied, per user, in the order it applied it (see [`step`]).
    fn applied(&self) -> BTreeMap<String, Vec<String>> {
        let mut per_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for call in self.world.sim.calls().iter().filter(|c| c.applied()) {
            let user = call.user_id.clone().unwrap_or_default();
            per_user.entry(user).or_default().push(step(call));
        }
        per_user
    }
}

/// The AS: mutual TLS, enough idle connections kept for every user's task.
fn as_client(world: &World) -> reqwest::Client {
    let mut pem = std::fs::read(&world.pki.client_cert).unwrap();
    pem.extend(std::fs::read(&world.pki.client_key).unwrap());
    let ca = std::fs::read(&world.pki.ca_cert).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A command of a user's life, and the call it must become at Webex.
#[derive(Debug, Clone)]
enum Cmd {
    Add,
    Modify(String),
    ImpOff,
    /// Provisions from the last profile: the first name of the last modify.
    ImpOn(String),
    Delete,
}

impl Cmd {
    fn xml(&self, user: &str) -> String {
        match self {
            Cmd::Add => user_add(user, Some(user)),
            Cmd::Modify(first) => format!(
                r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>{user}</userId><firstName>{first}</firstName></command>"#
            ),
            Cmd::ImpOff => format!(
                r#"<command xsi:type="UserServiceUnassignListRequest" xmlns=""><userId>{user}</userId><serviceName>Integrated IM&amp;P</serviceName></command>"#
            ),
            Cmd::ImpOn(_) => format!(
                r#"<command xsi:type="UserServiceAssignListRequest" xmlns=""><userId>{user}</userId><serviceName>Integrated IM&amp;P</serviceName></command>"#
            ),
            Cmd::Delete => format!(
                r#"<command xsi:type="UserDeleteRequest" xmlns=""><userId>{user}</userId></command>"#
            ),
        }
    }

    /// The [`step`] Webex must apply for it.
    fn expected(&self) -> String {
        match self {
            Cmd::Add => "provision User".to_owned(),
            Cmd::Modify(first) => format!("update {first}"),
            Cmd::ImpOff | Cmd::Delete => "remove".to_owned(),
            Cmd::ImpOn(first) => format!("provision {first}"),
        }
    }
}

/// An applied call as a comparable step: its kind and the first name it carried (each modify
/// sets its own, so two modifies are told apart).
fn step(call: &CallRecord) -> String {
    match call.kind.as_str() {
        "remove" => "remove".to_owned(),
        kind => format!("{kind} {}", call.body["firstName"].as_str().unwrap_or("-")),
    }
}

/// What the AS heard.
#[derive(Debug)]
enum Heard {
    /// SuccessResponse, or 7020 (stored, delivery pending): flowthrough owes its delivery.
    Acknowledged,
    /// Not accepted: no connection, no answer, or a transport status (503).
    NotAccepted(String),
    /// An OCI-P answer that is neither: a test failure wherever it shows.
    Refused(String),
}

async fn send(client: &reqwest::Client, url: &str, command: &str) -> Heard {
    let response = match client
        .post(url)
        .header("content-type", "text/xml")
        .body(document(command))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Heard::NotAccepted(e.to_string()),
    };
    let status = response.status();
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => return Heard::NotAccepted(e.to_string()),
    };
    if status != 200 {
        return Heard::NotAccepted(format!("HTTP {status}: {text}"));
    }
    match answers(&text).first() {
        Some(a) if a.kind == "SuccessResponse" || a.code == Some(7020) => Heard::Acknowledged,
        _ => Heard::Refused(text),
    }
}

/// The order of the issue: add, modify, modify, IM&P off, IM&P on, delete.
fn life() -> Vec<Cmd> {
    vec![
        Cmd::Add,
        Cmd::Modify("M1".into()),
        Cmd::Modify("M2".into()),
        Cmd::ImpOff,
        Cmd::ImpOn("M2".into()),
        Cmd::Delete,
    ]
}

/// Two nodes, 200 users at once, each command of a user sent to the other node than the one
/// before: Webex sees each user's calls exactly in order, none missing, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_users_commands_reach_webex_in_order_whichever_node_took_them() {
    let _serial = SERIAL.lock().await;
    const USERS: usize = 200;
    let cluster = Cluster::start(Control::default(), 2, "", "").await;
    let urls = cluster.urls();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let (client, urls) = (cluster.client.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            let user = format!("order-{u}@acme.example");
            for (k, cmd) in life().iter().enumerate() {
                let url = &urls[(u + k) % 2];
                match send(&client, url, &cmd.xml(&user)).await {
                    Heard::Acknowledged => {}
                    other => {
                        return Err(format!("{user} command {k} ({cmd:?}) at {url}: {other:?}"));
                    }
                }
            }
            Ok(user)
        }));
    }
    let mut users = Vec::new();
    for task in tasks {
        users.push(task.await.unwrap().unwrap());
    }
    assert!(
        cluster.drained(Duration::from_secs(120)).await,
        "every acknowledged command is delivered"
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM outbox WHERE state = 'dead'"),
        0
    );
    let expected: Vec<String> = life().iter().map(Cmd::expected).collect();
    let applied = cluster.applied();
    let wrong: Vec<_> = users
        .iter()
        .filter(|u| applied.get(*u) != Some(&expected))
        .map(|u| (u, applied.get(u)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {USERS} users' calls differ from {expected:?}, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert_eq!(applied.len(), USERS, "calls for users nobody sent");
    assert!(
        cluster.world.subscribers().is_empty(),
        "every user ends deleted"
    );
}

/// A user's run: the user and the commands it had acknowledged, or what went wrong.
type UserRun = Result<(String, Vec<Cmd>), String>;

/// The AS side of a load that survives node deaths: each user's commands in a cycle (add, then
/// modify, modify, IM&P off, IM&P on …), each sent to the next node; a command not accepted is
/// sent again to the other node until one acknowledges it, as the AS does behind a balancer.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<UserRun>>,
}

impl Load {
    fn start(client: &reqwest::Client, urls: Vec<String>, users: usize, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..users)
            .map(|u| {
                let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
                let user = format!("{prefix}-{u}@acme.example");
                tokio::spawn(async move {
                    let mut acknowledged = Vec::new();
                    let mut last_name = "User".to_owned();
                    for k in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let cmd = match (k, (k + 3) % 4) {
                            (0, _) => Cmd::Add,
                            (_, 2) => Cmd::ImpOff,
                            (_, 3) => Cmd::ImpOn(last_name.clone()),
                            _ => {
                                last_name = format!("M{k}");
                                Cmd::Modify(last_name.clone())
                            }
                        };
                        let mut node = (u + k) % urls.len();
                        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
                        loop {
                            match send(&client, &urls[node], &cmd.xml(&user)).await {
                                Heard::Acknowledged => break,
                                Heard::Refused(text) => {
                                    return Err(format!("{user} {cmd:?}: {text}"));
                                }
                                Heard::NotAccepted(why) => {
                                    if tokio::time::Instant::now() > give_up {
                                        return Err(format!(
                                            "{user} {cmd:?} never accepted: {why}"
                                        ));
                                    }
                                    node = (node + 1) % urls.len();
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                        acknowledged.push(cmd);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok((user, acknowledged))
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stop after each user's command under way is acknowledged; what each user had
    /// acknowledged, in order.
    async fn finish(self) -> BTreeMap<String, Vec<Cmd>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut acknowledged = BTreeMap::new();
        for task in self.tasks {
            let (user, cmds) = task.await.unwrap().unwrap();
            acknowledged.insert(user, cmds);
        }
        acknowledged
    }
}

/// Merge a re-applied update into the one before it: an update Webex applied whose outcome a
/// killed node never wrote is sent again by the survivor (PUT carries no idempotency key), and a
/// command stored by a node killed before it answered is sent again by the AS. Provisions and
/// removes are never merged: a second one would be a second subscriber or a lost one.
fn without_repeated_updates(steps: &[String]) -> (Vec<String>, usize) {
    let mut out: Vec<String> = Vec::new();
    let mut repeats = 0;
    for s in steps {
        if s.starts_with("update ") && out.last() == Some(s) {
            repeats += 1;
        } else {
            out.push(s.clone());
        }
    }
    (out, repeats)
}

/// Pending entries of users whose lane a (dead or stopped) node still leases: (entry id, user,
/// lease end in ms).
fn stranded(cluster: &Cluster, node: &str) -> Vec<(u64, String, u64)> {
    cluster
        .sql(&format!(
            "SELECT o.id, o.user_id, (extract(epoch FROM l.lease_until) * 1000)::bigint \
             FROM outbox o JOIN lanes l USING (user_id) WHERE o.state = 'pending' \
             AND l.lease_owner = '{node}' AND l.lease_until > now() ORDER BY o.id"
        ))
        .lines()
        .map(|line| {
            let mut cols = line.split('|');
            let mut next = || cols.next().unwrap().to_owned();
            (next().parse().unwrap(), next(), next().parse().unwrap())
        })
        .collect()
}

/// Wait until `node` leases a lane with pending work (so a fault strands some).
async fn holds_work(cluster: &Cluster, node: &str) -> bool {
    let query = format!(
        "SELECT count(*) FROM lanes l WHERE lease_owner = '{node}' AND lease_until > now() \
         AND EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id AND o.state = 'pending')"
    );
    for _ in 0..400 {
        if cluster.count(&query) > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// When the stranded entries ended, once all have; `None` if some never did.
async fn ended(cluster: &Cluster, ids: &[u64], limit: Duration) -> Option<Vec<(u64, String)>> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let ok = eventually_async(limit, || {
        cluster.count(&format!(
            "SELECT count(*) FROM outbox WHERE id IN ({list}) AND state = 'pending'"
        )) == 0
    })
    .await;
    ok.then(|| {
        cluster
            .sql(&format!(
                "SELECT ended_ms, state FROM outbox WHERE id IN ({list}) ORDER BY id"
            ))
            .lines()
            .map(|l| {
                let (at, state) = l.split_once('|').unwrap();
                (at.parse().unwrap(), state.to_owned())
            })
            .collect()
    })
}

/// [`eventually`] for checks that run a query (a child process each): polled less often.
async fn eventually_async(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check()
}

/// kill -9 of a node under load: the survivor takes its users once their leases run out. Then
/// 20 rounds of kill -9 on a random node, restarted each time, while commands flow: every
/// acknowledged command reaches Webex, in per-user order, no provision or remove twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_users_are_delivered_by_the_others_in_order() {
    let _serial = SERIAL.lock().await;
    const USERS: usize = 24;
    const ROUNDS: usize = 20;
    // Webex answers after 100 ms, so calls are under way when a node dies.
    let control = Control {
        latency_ms: 100,
        ..Control::default()
    };
    let mut cluster = Cluster::start(control, 2, "", "").await;
    let load = Load::start(&cluster.client, cluster.urls(), USERS, "fail");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A node hands each lane back as its try ends, so it can finish between the look and the
    // kill: then it is started again and killed again, a few times at most.
    let mut kills = 0;
    let (killed_at, left) = loop {
        assert!(
            holds_work(&cluster, "node-a").await,
            "node-a never held work"
        );
        cluster.nodes[0].kill();
        let killed_at = now_ms();
        let left = stranded(&cluster, "node-a");
        kills += 1;
        if !left.is_empty() || kills == 5 {
            break (killed_at, left);
        }
        cluster.nodes[0].start_ready().await;
    };
    assert!(
        !left.is_empty(),
        "node-a died holding no lane with work, {kills} times"
    );
    let ids: Vec<u64> = left.iter().map(|(id, _, _)| *id).collect();
    let ends = ended(&cluster, &ids, Duration::from_secs(30))
        .await
        .expect("the survivor delivers the dead node's users");
    for ((id, user, lease_until), (at, state)) in left.iter().zip(&ends) {
        assert_eq!(state, "delivered", "entry {id} of {user}");
        assert!(
            at >= lease_until,
            "entry {id} of {user} ended at {at}, before the dead node's lease ran out at {lease_until}"
        );
    }
    let first = ends.iter().map(|(at, _)| *at).min().unwrap();
    eprintln!(
        "kill -9 of node-a: {} stranded entries of {} users; first delivered by node-b {} ms after \
         the kill (lease_ms {LEASE_MS}, poll_ms {POLL_MS})",
        left.len(),
        left.iter()
            .map(|(_, u, _)| u)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        first.saturating_sub(killed_at)
    );
    cluster.nodes[0].start_ready().await;

    let mut rng = rand::rng();
    for round in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
        let victim = rng.random_range(0..cluster.nodes.len());
        cluster.nodes[victim].kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        cluster.nodes[victim].start_ready().await;
        eprintln!(
            "round {round}: killed and restarted {}",
            cluster.nodes[victim].name
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acknowledged = load.finish().await;
    assert!(
        cluster.drained(Duration::from_secs(60)).await,
        "every acknowledged command is delivered"
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM outbox WHERE state = 'dead'"),
        0,
        "no entry dies of a kill"
    );
    let applied = cluster.applied();
    let (mut commands, mut repeats) = (0, 0);
    for (user, cmds) in &acknowledged {
        let expected: Vec<String> = cmds.iter().map(Cmd::expected).collect();
        let (got, again) = without_repeated_updates(applied.get(user).map_or(&[][..], |v| v));
        assert_eq!(
            got, expected,
            "{user}: Webex's calls against the acknowledged commands"
        );
        commands += cmds.len();
        repeats += again;
    }
    assert_eq!(applied.len(), USERS, "calls for users nobody sent");
    eprintln!(
        "{} kills: {commands} commands acknowledged and delivered in order, 0 lost, 0 provisions \
         or removes twice, {repeats} updates applied again after a kill",
        ROUNDS + 1
    );
    assert!(commands > USERS * 4, "the load ran: {commands} commands");
}

/// A node stopped (SIGSTOP) mid-call past its lease: the other node delivers its users; woken
/// up, its late outcome writes are refused and logged, and Webex applied each command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_past_its_lease_has_its_late_writes_refused() {
    let _serial = SERIAL.lock().await;
    const USERS: usize = 8;
    // Webex takes 1.5 s to answer (within the lease), and the node waits up to 10 s for it.
    let control = Control {
        latency_ms: 1500,
        ..Control::default()
    };
    let cluster = Cluster::start(control, 2, "request_timeout_ms = 10000", "").await;
    let users: Vec<String> = (0..USERS)
        .map(|u| format!("fence-{u}@acme.example"))
        .collect();
    let mut requests = Vec::new();
    for user in &users {
        let (client, url, user) = (
            cluster.client.clone(),
            cluster.nodes[0].url.clone(),
            user.clone(),
        );
        requests.push(tokio::spawn(async move {
            send(&client, &url, &Cmd::Add.xml(&user)).await
        }));
    }
    // Every add has reached Webex (which answers 1.5 s later): a lane node-a holds now is one
    // whose call is under way, not one it is about to try.
    assert!(
        eventually(Duration::from_secs(20), || {
            cluster.world.sim.counter("provision") >= USERS as u64
        })
        .await
    );
    cluster.nodes[0].signal(libc::SIGSTOP);
    let left = stranded(&cluster, "node-a");
    assert!(
        !left.is_empty(),
        "node-a was stopped holding no lane with work"
    );
    cluster
        .world
        .sim
        .control(serde_json::json!({"latency_ms": 0}))
        .unwrap();
    let ids: Vec<u64> = left.iter().map(|(id, _, _)| *id).collect();
    // node-a cannot write while stopped: whatever ends these entries now is node-b.
    let ends = ended(&cluster, &ids, Duration::from_secs(30))
        .await
        .expect("node-b delivers the stopped node's users");
    for ((id, user, lease_until), (at, state)) in left.iter().zip(&ends) {
        assert_eq!(state, "delivered", "entry {id} of {user}");
        assert!(
            at >= lease_until,
            "entry {id} of {user} taken before the lease ran out"
        );
    }
    cluster.nodes[0].signal(libc::SIGCONT);
    let refused = "has expired or another node took it over";
    let logged = eventually(Duration::from_secs(20), || {
        let log = cluster.nodes[0].log_text();
        left.iter()
            .all(|(_, user, _)| log.contains(refused) && log.contains(user.as_str()))
    })
    .await;
    assert!(
        logged,
        "node-a logs each of its late writes as refused: {}",
        cluster.nodes[0].log_text()
    );
    for request in requests {
        let heard = request.await.unwrap();
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    }
    assert!(cluster.drained(Duration::from_secs(30)).await);
    let applied = cluster.applied();
    for user in &users {
        assert_eq!(
            applied.get(user),
            Some(&vec!["provision User".to_owned()]),
            "{user}: Webex applied the add once"
        );
    }
    assert_eq!(cluster.world.subscribers().len(), USERS);
    // The store kept node-b's outcome: delivered, never overwritten by node-a's.
    assert_eq!(
        cluster.count("SELECT count(*) FROM outbox WHERE state <> 'delivered'"),
        0
    );
}

/// One node's database connection cut: it answers 503 and turns not ready, the other node
/// carries on accepting and delivering; the cut node recovers by itself once it is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_the_database_refuses_while_the_other_delivers() {
    let _serial = SERIAL.lock().await;
    let world = Cluster::world(Control::default()).await;
    let pg_port = world.postgres.as_ref().unwrap().0.port;
    let proxy = DbProxy::start(pg_port).await;
    let mut cluster = Cluster {
        nodes: Vec::new(),
        client: as_client(&world),
        world,
    };
    cluster.add_node(0, "", "", Some(&proxy));
    cluster.add_node(1, "", "", None);
    for node in &mut cluster.nodes {
        node.start_ready().await;
    }
    let (cut, other) = (&cluster.nodes[0], &cluster.nodes[1]);
    let client = &cluster.client;
    let add = |user: &str| Cmd::Add.xml(user);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let heard = send(client, &node.url, &add(&format!("before-{i}@acme.example"))).await;
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    }

    proxy.set(Link::Cut);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    for n in 0.. {
        let heard = send(client, &cut.url, &add(&format!("cut-{n}@acme.example"))).await;
        if matches!(&heard, Heard::NotAccepted(why) if why.starts_with("HTTP 503"))
            || tokio::time::Instant::now() > deadline
        {
            last = Some(heard);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        matches!(&last, Some(Heard::NotAccepted(why)) if why.starts_with("HTTP 503")),
        "the cut node answers 503: {last:?}"
    );
    let red = ready_until(cut, Duration::from_secs(20), |status, why| {
        status == 503 && why.contains("PostgreSQL")
    })
    .await;
    assert!(red.0 == 503, "/readyz of the cut node turns red: {red:?}");
    // The other node accepts and delivers meanwhile.
    for i in 0..5 {
        let user = format!("during-{i}@acme.example");
        let heard = send(client, &other.url, &add(&user)).await;
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
        assert!(
            eventually(Duration::from_secs(10), || cluster
                .world
                .subscriber(&user)
                .is_some())
            .await,
            "{user} delivered while the other node is cut off"
        );
    }
    assert_eq!(cut.ready().await.0, 503, "still cut, still not ready");

    proxy.set(Link::Up);
    let green = ready_until(cut, Duration::from_secs(30), |status, _| status == 200).await;
    assert_eq!(green.0, 200, "the node recovers by itself: {green:?}");
    let heard = send(client, &cut.url, &add("after@acme.example")).await;
    assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    assert!(cluster.drained(Duration::from_secs(30)).await);
    // What the cut node refused with 503 was not stored; everything acknowledged was delivered.
    let subscribers: Vec<String> = cluster
        .world
        .subscribers()
        .iter()
        .map(|s| s["userId"].as_str().unwrap().to_owned())
        .collect();
    for user in ["before-0", "before-1", "during-0", "during-4", "after"] {
        let user = format!("{user}@acme.example");
        assert!(
            subscribers.contains(&user),
            "{user} missing: {subscribers:?}"
        );
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM outbox WHERE state = 'dead'"),
        0
    );
}

/// Poll a node's `/readyz` until `done` holds or `limit` passes; the last answer.
async fn ready_until(
    node: &Node,
    limit: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (status, why) = node.ready().await;
        if done(status, &why) || tokio::time::Instant::now() > deadline {
            return (status, why);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Webex's rate limit R with two nodes pushing a backlog: once they have met it (the first,
/// unpaced second overshoots, as one node's does), at most 2 % of their calls are answered 429
/// — a 429 one node meets pauses both, and both pace at the average of what each learned — and
/// nothing is lost. The rate they deliver is a speed figure, printed for bench/RESULTS.md
/// (issue 22 asks ≥ 0.95 R; one node alone reaches about 0.93 R here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_webexs_rate_limit() {
    let _serial = SERIAL.lock().await;
    const RATE: u64 = 100;
    const USERS: usize = 2000;
    let control = Control {
        rate_limit_per_s: RATE as u32,
        retry_after_s: 1,
        ..Control::default()
    };
    let cluster = Cluster::start(control, 2, "", "ack_deadline_ms = 500").await;
    let mut requests = Vec::new();
    for u in 0..USERS {
        let (client, url) = (cluster.client.clone(), cluster.nodes[u % 2].url.clone());
        requests.push(tokio::spawn(async move {
            send(
                &client,
                &url,
                &Cmd::Add.xml(&format!("rate-{u}@acme.example")),
            )
            .await
        }));
    }
    for request in requests {
        let heard = request.await.unwrap();
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    }
    // Measured over 10 s in the middle of the backlog (20 s at R), after the nodes have met
    // the limit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered = || {
        cluster
            .world
            .sim
            .calls()
            .iter()
            .filter(|c| c.applied())
            .count()
    };
    let window_calls = || cluster.world.sim.calls().len();
    let (from, calls_from, started) = (delivered(), window_calls(), tokio::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (to, calls_to, took) = (delivered(), window_calls(), started.elapsed());
    let backlog = cluster.count("SELECT count(*) FROM outbox WHERE state = 'pending'");
    assert!(backlog > 0, "the backlog lasted the measurement");
    assert!(
        cluster.drained(Duration::from_secs(120)).await,
        "the backlog drains"
    );
    let rate = (to - from) as f64 / took.as_secs_f64();
    let calls = cluster.world.sim.calls();
    let in_window = &calls[calls_from..calls_to];
    let limited = in_window.iter().filter(|c| c.status == 429).count();
    let share = limited as f64 / in_window.len().max(1) as f64;
    let limited_in_all = calls.iter().filter(|c| c.status == 429).count();
    // The delivered rate is a speed figure, reported here and in bench/RESULTS.md rather than
    // asserted (this machine's load moves it); what must hold whatever the speed is asserted:
    // once the nodes have met the limit they share it, so Webex is not answered over it again.
    eprintln!(
        "rate limit {RATE}/s: {rate:.1}/s delivered by two nodes ({:.2} R) over {:.1} s; \
         {limited} of {} calls in that time answered 429, {limited_in_all} of {} in the whole run \
         (the first second's unpaced burst included)",
        rate / RATE as f64,
        took.as_secs_f64(),
        in_window.len(),
        calls.len(),
    );
    assert_eq!(cluster.world.subscribers().len(), USERS, "nothing lost");
    assert!(
        in_window.len() as f64 >= RATE as f64 * took.as_secs_f64() * 0.5,
        "the nodes kept calling under the limit: {} calls in {took:?}",
        in_window.len()
    );
    assert!(
        share <= 0.02,
        "{limited} of {} calls answered 429 once the nodes had met the limit",
        in_window.len()
    );
}

/// The access token expires under 500 concurrent commands spread over two nodes: one refresh in
/// all, the other node reuses the token the first obtained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_refresh_an_expired_token_once() {
    let _serial = SERIAL.lock().await;
    const REQUESTS: usize = 500;
    let cluster = Cluster::start(Control::default(), 2, "", "").await;
    // Each node gets a token of its own in use first.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let user = format!("warm-{i}@acme.example");
        assert!(matches!(
            send(&cluster.client, &node.url, &Cmd::Add.xml(&user)).await,
            Heard::Acknowledged
        ));
    }
    assert!(cluster.drained(Duration::from_secs(30)).await);
    cluster.world.sim.expire_access_tokens();
    let before = cluster.world.sim.counter("refreshes");
    let mut requests = Vec::new();
    for u in 0..REQUESTS {
        let (client, url) = (cluster.client.clone(), cluster.nodes[u % 2].url.clone());
        requests.push(tokio::spawn(async move {
            send(
                &client,
                &url,
                &Cmd::Add.xml(&format!("token-{u}@acme.example")),
            )
            .await
        }));
    }
    for request in requests {
        let heard = request.await.unwrap();
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    }
    assert!(cluster.drained(Duration::from_secs(120)).await);
    assert_eq!(
        cluster.world.subscribers().len(),
        REQUESTS + 2,
        "nothing lost"
    );
    let refreshes = cluster.world.sim.counter("refreshes") - before;
    assert_eq!(
        refreshes, 1,
        "refreshes of the expired token across both nodes"
    );
}

/// While Webex fails, one user of one node probes for both nodes: users that reach the other
/// node meanwhile wait for that probe without a call of their own, and all go once it gets
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_webex_fails_one_node_probes_for_both() {
    let _serial = SERIAL.lock().await;
    let control = Control {
        server_error_ratio: 1.0,
        ..Control::default()
    };
    let cluster = Cluster::start(control, 2, "", "ack_deadline_ms = 200").await;
    let sim = &cluster.world.sim;
    let calls_for = |user: &str| {
        sim.calls()
            .iter()
            .filter(|c| c.user_id.as_deref() == Some(user))
            .count()
    };
    let heard = send(
        &cluster.client,
        &cluster.nodes[0].url,
        &Cmd::Add.xml("probe@acme.example"),
    )
    .await;
    assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    assert!(
        common::eventually(Duration::from_secs(10), || calls_for("probe@acme.example")
            > 0)
        .await,
        "node-a's user meets the outage"
    );
    // node-b hears of node-a's probe at its next claim or look for work.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let waiting: Vec<String> = (0..10).map(|u| format!("wait-{u}@acme.example")).collect();
    for user in &waiting {
        let heard = send(&cluster.client, &cluster.nodes[1].url, &Cmd::Add.xml(user)).await;
        assert!(matches!(heard, Heard::Acknowledged), "{heard:?}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let called: Vec<&String> = waiting.iter().filter(|u| calls_for(u) > 0).collect();
    assert!(
        called.is_empty(),
        "users of node-b called Webex while node-a probed: {called:?}"
    );
    assert!(
        calls_for("probe@acme.example") >= 2,
        "the probe goes on trying"
    );
    sim.control(serde_json::json!({"server_error_ratio": 0.0}))
        .unwrap();
    assert!(
        cluster.drained(Duration::from_secs(60)).await,
        "every user is delivered once Webex answers"
    );
    assert_eq!(cluster.world.subscribers().len(), 11);
}
