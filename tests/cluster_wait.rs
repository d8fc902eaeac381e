//! A command accepted by one node and delivered by another (SPEC §11), over real mTLS to a real
//! `serve` on a throwaway PostgreSQL cluster. The test plays a second node that holds the user's
//! delivery lane, so `serve` stores the command but cannot deliver it; the AS, waiting up to the
//! ack deadline, must hear the other node's outcome from the store, or 7020 at the deadline with
//! the command still pending.

mod common;

use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;
use flowthrough::store::{
    AuditEvent, AuditQuery, Call, EntryId, EntryState, Filter, Lease, NewEntry, Origin, Store,
    now_ms,
};
use tokio::task::JoinHandle;

const USER: &str = "lane@acme.example";
const OTHER_NODE: &str = "other-node";
/// Longer than every test here: the other node's lease must not run out while it plays its part.
const LEASE_MS: u64 = 120_000;
/// A bound against hangs, not a timing assertion.
const SETTLE: Duration = Duration::from_secs(20);
/// The ack deadline of the test where the other node delivers: far beyond [`SETTLE`], so an
/// answer within `SETTLE` cannot be the deadline's.
const GENEROUS_DEADLINE_MS: u64 = 60_000;

/// `serve` beside another node that holds [`USER`]'s lane, with one entry of its own queued.
struct TwoNodes {
    world: World,
    running: flowthrough::server::Running,
    url: String,
    /// The other node's handle on the shared database.
    store: Store,
    lease: Lease,
    /// The other node's entry for [`USER`], ahead of anything `serve` stores for the user.
    first: EntryId,
}

impl TwoNodes {
    async fn start(ack_deadline_ms: u64) -> TwoNodes {
        let world = World::on(SimOptions::default(), Backend::Postgres).await;
        let (cluster, db) = world.postgres.clone().unwrap();
        // The other node queues its entry and holds the lane before `serve` starts: a `serve`
        // already running could find the entry and take the lane first.
        let store = Store::open_configured(&cluster.store_config(&db))
            .await
            .unwrap();
        let first = store
            .enqueue(
                vec![NewEntry {
                    user_id: USER.to_owned(),
                    template: "acme".to_owned(),
                    command: "UserAddRequest17sp4".to_owned(),
                    call: Call::provision(&serde_json::json!({ "userId": USER })).unwrap(),
                    client: "CN=other-as".to_owned(),
                    origin: Origin::Live,
                }],
                now_ms(),
            )
            .await
            .unwrap()[0];
        let lease = store
            .claim_lane(USER, OTHER_NODE, LEASE_MS)
            .await
            .unwrap()
            .expect("the new user's lane is free");
        // A short poll: `serve` tries the held lane again and again while the test waits.
        let config = world.config(
            &format!("ack_deadline_ms = {ack_deadline_ms}"),
            "\n[cluster]\nnode_id = \"serve-node\"\npoll_ms = 100\n",
        );
        let running = flowthrough::server::start(config).await.unwrap();
        let url = format!(
            "https://localhost:{}/provisioning",
            running.provisioning_addrs[0].port()
        );
        TwoNodes {
            world,
            running,
            url,
            store,
            lease,
            first,
        }
    }

    /// The AS sends a UserModify for [`USER`]; the answer arrives when the handle is awaited.
    fn send_modify(&self) -> JoinHandle<(u16, String)> {
        let client = self.world.as_client();
        let url = self.url.clone();
        let body = document(&format!(
            r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>{USER}</userId><firstName>Renamed</firstName></command>"#
        ));
        tokio::spawn(async move {
            let response = client
                .post(url)
                .header("content-type", "text/xml; charset=ISO-8859-1")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        })
    }

    /// The entry `serve` stored for the command, once it is in the shared database.
    async fn stored_by_serve(&self) -> EntryId {
        let until = tokio::time::Instant::now() + SETTLE;
        loop {
            let pending = self.store.list(Filter::Pending, 10).await.unwrap();
            if let Some(entry) = pending
                .iter()
                .find(|e| e.new.user_id == USER && e.id != self.first)
            {
                return entry.id;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "serve never stored the command: {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The other node's delivery of one entry, written under its lease.
    async fn deliver(&self, id: EntryId, tracking_id: &str) {
        self.store
            .finish(
                id,
                EntryState::Delivered {
                    at_ms: now_ms(),
                    subscriber_id: Some("sub-lane".to_owned()),
                    webex_status: Some("provisioned".to_owned()),
                },
                Some(tracking_id),
                Some(&self.lease),
            )
            .await
            .unwrap();
    }

    /// The other node's end of one entry as dead, written under its lease (which it keeps).
    async fn give_up(&self, id: EntryId, reason: &str, tracking_id: &str) {
        self.store
            .finish(
                id,
                EntryState::Dead {
                    at_ms: now_ms(),
                    reason: reason.to_owned(),
                },
                Some(tracking_id),
                Some(&self.lease),
            )
            .await
            .unwrap();
    }

    /// Calls that reached the Webex simulator's subscriber API, from anyone.
    fn webex_calls(&self) -> u64 {
        ["provision", "validate", "update", "remove", "get", "list"]
            .iter()
            .map(|kind| self.world.sim.counter(kind))
            .sum()
    }

    async fn stop(self) {
        self.running.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

fn only(body: &str) -> Answer {
    let all = answers(body);
    assert_eq!(all.len(), 1, "{body}");
    all.into_iter().next().unwrap()
}

/// The lane's holder delivers both entries in order while the AS waits: the AS hears success, well
/// before the deadline (at the deadline it would be 7020), and the audit carries the other node's
/// TrackingID, so the answer came from its stored outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_as_hears_the_outcome_another_node_delivered() {
    let nodes = TwoNodes::start(GENEROUS_DEADLINE_MS).await;
    let answer = nodes.send_modify();
    let id = nodes.stored_by_serve().await;

    // Time for `serve` to try the lane a few times (it polls every 100 ms): it must not deliver.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let untouched = nodes.store.entry(id).await.unwrap().unwrap();
    assert!(
        untouched.is_pending() && untouched.attempts == 0,
        "{untouched:?}"
    );
    assert_eq!(
        nodes.webex_calls(),
        0,
        "serve called Webex for a lane it does not hold"
    );
    assert!(!answer.is_finished(), "answered before anything ended");

    nodes.deliver(nodes.first, "TRACKING_FIRST").await;
    nodes.deliver(id, "TRACKING_OTHER").await;
    let (status, body) = tokio::time::timeout(SETTLE, answer)
        .await
        .expect("no answer long after the other node delivered, though the deadline is far off")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(only(&body).kind, "SuccessResponse", "{body}");

    // The record went in with the command as `accepted` and is completed after the answer
    // (not waited for): it says what the other node's delivery came to soon after.
    let recorded = || async {
        let audit = nodes
            .store
            .audit(&AuditQuery {
                user_id: Some(USER.to_owned()),
                documents_only: false,
                limit: 10,
            })
            .await
            .unwrap();
        let outcome = audit.iter().find_map(|record| match &record.event {
            AuditEvent::Command {
                outbox_id: Some(outbox_id),
                outcome,
                tracking_id,
                ..
            } if *outbox_id == id => Some((outcome.clone(), tracking_id.clone())),
            _ => None,
        });
        (outcome, audit)
    };
    let completed = Some(("success".to_owned(), Some("TRACKING_OTHER".to_owned())));
    let deadline = tokio::time::Instant::now() + SETTLE;
    let (mut outcome, mut audit) = recorded().await;
    while outcome != completed && tokio::time::Instant::now() < deadline {
        assert_eq!(
            outcome.as_ref().map(|(outcome, _)| outcome.as_str()),
            Some("accepted"),
            "{audit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        (outcome, audit) = recorded().await;
    }
    assert_eq!(outcome, completed, "{audit:?}");
    nodes.stop().await;
}

/// The lane's holder finds the command dead: the AS hears Webex's refusal (7010) with the other
/// node's reason, not a 7020 that would leave the operator looking for a command still under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_as_hears_a_refusal_another_node_met() {
    let nodes = TwoNodes::start(GENEROUS_DEADLINE_MS).await;
    let answer = nodes.send_modify();
    let id = nodes.stored_by_serve().await;
    nodes.deliver(nodes.first, "TRACKING_FIRST").await;
    nodes
        .give_up(
            id,
            "Webex answered 400: firstName refused",
            "TRACKING_OTHER",
        )
        .await;
    let (status, body) = tokio::time::timeout(SETTLE, answer)
        .await
        .expect("no answer long after the other node gave up, though the deadline is far off")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let a = only(&body);
    assert_eq!(a.code, Some(7010), "{body}");
    assert!(a.text.contains("firstName refused"), "{body}");
    nodes.stop().await;
}

/// The lane's holder finds its own entry dead, which now holds the user's lane, and keeps its
/// lease: `serve` cannot claim the lane, so its engine never sees the dead head, but the AS
/// still hears at once (not at the deadline, a minute off) that its command waits behind that
/// entry, and what the operator can do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_as_hears_at_once_that_its_command_waits_behind_another_nodes_dead_entry() {
    let nodes = TwoNodes::start(GENEROUS_DEADLINE_MS).await;
    let answer = nodes.send_modify();
    let id = nodes.stored_by_serve().await;
    nodes
        .give_up(
            nodes.first,
            "Webex answered 400: userId refused",
            "TRACKING_FIRST",
        )
        .await;
    let (status, body) = tokio::time::timeout(SETTLE, answer)
        .await
        .expect("no answer long after the dead entry took the lane, though the deadline is far off")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let a = only(&body);
    assert_eq!(a.code, Some(7020), "{body}");
    assert!(
        a.text.contains("userId refused")
            && a.text.contains(&format!("outbox retry {}", nodes.first)),
        "the detail names the dead entry, its reason and the way on: {body}"
    );
    let progress = nodes.store.progress(id).await.unwrap().unwrap();
    assert_eq!(
        progress.state,
        EntryState::Pending,
        "still queued behind it"
    );
    assert_eq!(nodes.webex_calls(), 0);
    nodes.stop().await;
}

/// Nobody delivers: the AS hears 7020 at the deadline, and the command is still pending in the
/// shared store behind the other node's entry, for whoever holds the lane next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_outcome_the_as_hears_7020_and_the_command_stays_pending() {
    let nodes = TwoNodes::start(2_000).await;
    let answer = nodes.send_modify();
    let id = nodes.stored_by_serve().await;
    let (status, body) = tokio::time::timeout(SETTLE, answer)
        .await
        .expect("answered at the deadline")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let a = only(&body);
    assert_eq!(
        (a.code, a.severity.as_deref()),
        (Some(7020), Some("Warning")),
        "{body}"
    );
    assert!(
        a.text.contains(&format!("outbox entry {id}")),
        "the detail names the entry: {body}"
    );

    for entry in [nodes.first, id] {
        let progress = nodes.store.progress(entry).await.unwrap().unwrap();
        assert_eq!(progress.state, EntryState::Pending, "entry {entry}");
    }
    let head = nodes.store.head_of(USER).await.unwrap().unwrap();
    assert_eq!(
        head.id, nodes.first,
        "the order of the user's entries holds"
    );
    assert_eq!(nodes.webex_calls(), 0);
    nodes.stop().await;
}
