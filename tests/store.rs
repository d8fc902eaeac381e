//! The store's domain operations, one list of tests run against both backends: sled in a temp
//! dir, and PostgreSQL in a throwaway cluster (tests/common/pg.rs). A backend that passes this
//! list can carry flowthrough; what is particular to one backend (sled's index keys, its
//! in-memory entries, old on-disk layouts) is tested beside it in src/store.

mod common;

use std::sync::Arc;

use common::pg::PgCluster;
use flowthrough::oci::UserProfile;
use flowthrough::secret::Secret;
use flowthrough::store::{
    AuditEvent, AuditQuery, AuditRecord, Call, Claim, ClaimRequest, Customer, EntryId, EntryState,
    Filter, NewEntry, Origin, Progress, ReconcileReport, Remembered, Store, StoreError,
    TokenRecord, TokenState, UserMapChange,
};

/// A store of one backend, and what it takes to open it again as a restarted node would.
struct Harness {
    /// Always `Some` between calls; empty only while [`Harness::reopen`] has closed it.
    open: Option<Store>,
    reopen: Reopen,
}

enum Reopen {
    Sled(tempfile::TempDir),
    Postgres {
        cluster: Arc<PgCluster>,
        dbname: String,
        config: Box<flowthrough::config::StoreConfig>,
    },
}

impl Harness {
    fn sled() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness {
            open: Some(Store::open(dir.path()).unwrap()),
            reopen: Reopen::Sled(dir),
        }
    }

    async fn postgres() -> Harness {
        let cluster = PgCluster::shared();
        let dbname = cluster.database();
        let config = Box::new(cluster.store_config(&dbname));
        Harness {
            open: Some(Store::open_configured(&config).await.unwrap()),
            reopen: Reopen::Postgres {
                cluster,
                dbname,
                config,
            },
        }
    }

    /// The PostgreSQL cluster and database of the store, for what only SQL shows (a row's
    /// version, who waits for a lock).
    fn database(&self) -> (&PgCluster, &str) {
        match &self.reopen {
            Reopen::Postgres {
                cluster, dbname, ..
            } => (cluster, dbname),
            Reopen::Sled(_) => panic!("a sled store has no database"),
        }
    }

    /// Run SQL in the store's PostgreSQL database.
    fn psql(&self, sql: &str) -> String {
        let (cluster, dbname) = self.database();
        cluster.psql(dbname, sql)
    }

    fn store(&self) -> &Store {
        self.open.as_ref().expect("the store is open between calls")
    }

    /// Close the store (after a flush, as an acknowledgement has) and open it again: sled lets
    /// go of its directory only when the last handle is gone.
    async fn reopen(&mut self) {
        self.store().flush().await.unwrap();
        drop(self.open.take());
        self.open = Some(match &self.reopen {
            Reopen::Sled(dir) => Store::open(dir.path()).unwrap(),
            Reopen::Postgres { config, .. } => Store::open_configured(config).await.unwrap(),
        });
    }
}

macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Harness::sled()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Harness::postgres().await).await;
                }
            )*
        }
    };
}

both_backends!(
    per_user_order_is_arrival_order_and_finishing_advances_the_head,
    a_user_id_that_prefixes_another_does_not_see_its_queue,
    a_dead_entry_holds_its_lane_until_retried_or_dropped,
    attempts_are_counted_and_survive_reopening,
    acknowledged_entries_and_records_survive_reopening,
    several_entries_are_stored_in_order_and_announced,
    call_bodies_come_back_as_they_were_written,
    every_change_returns_the_stored_entry,
    prune_removes_only_old_finished_entries,
    the_active_view_finds_dead_and_pending_entries_behind_any_history,
    the_history_cap_removes_the_oldest_delivered_entries_only,
    dead_count_follows_finish_retry_drop_and_prune,
    user_map_keeps_fields_not_given,
    concurrent_changes_to_one_user_record_are_all_kept,
    profiles_and_customers_round_trip,
    audit_is_newest_first_filtered_by_user_and_pruned_by_age_then_count,
    documents_are_capped_apart_from_commands,
    the_token_record_round_trips,
    flushes_complete_for_every_ticket,
    accepting_a_command_writes_its_records_and_its_entry,
    the_origin_of_an_entry_is_kept_through_every_change_and_a_reopen,
    the_whole_user_map_is_listed_in_user_id_order,
    the_last_reconcile_report_replaces_the_one_before_and_survives_reopening,
    one_owner_at_a_time_holds_a_lane_and_late_writes_are_fenced_off,
    a_claim_reads_the_head_and_a_hand_back_says_what_is_left_and_holds_a_backoff,
    the_end_of_a_try_writes_the_entry_the_user_map_and_hands_the_lane_back,
    nodes_share_rate_limits_heartbeats_and_chores,
);

/// What nodes tell each other: each 429 counts once and pauses all at least as long as asked
/// (a shorter one never cuts a longer pause), a claim brings the limits along; heartbeats list
/// the nodes with the lanes they hold; their shares of the rate limit are averaged; the Webex
/// probe and a chore are held by one owner at a time until their lease ends.
async fn nodes_share_rate_limits_heartbeats_and_chores(h: Harness) {
    let store = h.store();
    let before = store.shared_limits().await.unwrap();
    assert_eq!(before.pause_left_ms, 0, "{before:?}");
    let first = store.note_rate_limited(60_000).await.unwrap();
    assert_eq!(first.rate_limited, before.rate_limited + 1);
    assert!(
        (55_000..=60_000).contains(&first.pause_left_ms),
        "{first:?}"
    );
    assert!(
        first.limited_ms_ago.is_some_and(|ago| ago < 5_000),
        "when the latest 429 was noted: {first:?}"
    );
    let second = store.note_rate_limited(1_000).await.unwrap();
    assert_eq!(second.rate_limited, before.rate_limited + 2);
    assert!(
        second.pause_left_ms > 50_000,
        "the longer pause holds: {second:?}"
    );
    store.enqueue(vec![entry("carol", "add")], 1).await.unwrap();
    let claim = store
        .claim_head("carol", "node-a", 60_000)
        .await
        .unwrap()
        .expect("a free lane");
    assert_eq!(claim.limits.rate_limited, second.rate_limited, "{claim:?}");
    assert!(claim.limits.pause_left_ms > 50_000, "{claim:?}");

    store
        .heartbeat("node-a", "1.2.3", 1_000, false)
        .await
        .unwrap();
    store
        .heartbeat("node-b", "1.2.4", 2_000, false)
        .await
        .unwrap();
    store
        .heartbeat("node-b", "1.2.4", 2_000, true)
        .await
        .unwrap();
    let nodes = store.nodes().await.unwrap();
    let seen: Vec<(&str, &str, u64, bool, Vec<String>)> = nodes
        .iter()
        .map(|n| {
            (
                n.node_id.as_str(),
                n.version.as_str(),
                n.started_ms,
                n.stopped,
                n.lanes_held.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("node-a", "1.2.3", 1_000, false, vec!["carol".to_owned()]),
            ("node-b", "1.2.4", 2_000, true, vec![]),
        ]
    );
    assert!(
        nodes.iter().all(|n| n.heartbeat_age_ms < 10_000),
        "{nodes:?}"
    );

    // Shares: the average of the live nodes that keep one.
    assert_eq!(store.shared_limits().await.unwrap().share_per_s, None);
    store
        .heartbeat("node-b", "1.2.4", 2_000, false)
        .await
        .unwrap();
    store.publish_share("node-a", Some(40.0)).await.unwrap();
    store.publish_share("node-b", Some(60.0)).await.unwrap();
    assert_eq!(store.shared_limits().await.unwrap().share_per_s, Some(50.0));
    store.publish_share("node-b", None).await.unwrap();
    assert_eq!(store.shared_limits().await.unwrap().share_per_s, Some(40.0));

    // The Webex probe: one owner at a time, renewed by its owner, taken over once run out, shown
    // with the limits, ended by its owner only.
    assert!(store.claim_probe("node-a", 60_000).await.unwrap());
    assert!(!store.claim_probe("node-b", 60_000).await.unwrap());
    assert!(
        store.claim_probe("node-a", 60_000).await.unwrap(),
        "renewed"
    );
    let limits = store.shared_limits().await.unwrap();
    assert_eq!(limits.probe_owner.as_deref(), Some("node-a"));
    assert!(limits.probe_left_ms > 50_000, "{limits:?}");
    store.end_probe("node-b").await.unwrap();
    assert_eq!(
        store.shared_limits().await.unwrap().probe_owner.as_deref(),
        Some("node-a"),
        "only its owner ends a probe"
    );
    store.end_probe("node-a").await.unwrap();
    let limits = store.shared_limits().await.unwrap();
    assert_eq!((limits.probe_owner, limits.probe_left_ms), (None, 0));
    assert!(store.claim_probe("node-b", 1).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        store.shared_limits().await.unwrap().probe_owner,
        None,
        "run out"
    );
    assert!(
        store.claim_probe("node-a", 60_000).await.unwrap(),
        "taken over"
    );

    assert!(store.claim_chore("prune", "node-a", 60_000).await.unwrap());
    assert!(
        !store.claim_chore("prune", "node-b", 60_000).await.unwrap(),
        "held by node-a"
    );
    assert!(
        store.claim_chore("prune", "node-a", 60_000).await.unwrap(),
        "renewed"
    );
    assert!(
        store.claim_chore("refresh", "node-b", 1).await.unwrap(),
        "another chore"
    );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(
        store
            .claim_chore("refresh", "node-a", 60_000)
            .await
            .unwrap(),
        "run out"
    );
}

/// Leases on delivery lanes: a held lane is refused to others, its own owner renews it, an
/// expired one goes to the next claimer with a higher fence, and from then on every outcome
/// written under the old lease is refused without changing the entry.
async fn one_owner_at_a_time_holds_a_lane_and_late_writes_are_fenced_off(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(vec![entry("alice", "add"), entry("bob", "add")], 1)
        .await
        .unwrap();
    let first = store
        .claim_lane("alice", "node-a", 1000)
        .await
        .unwrap()
        .expect("a free lane is claimed");
    assert_eq!(
        (first.user_id.as_str(), first.owner.as_str()),
        ("alice", "node-a")
    );
    assert!(
        store
            .claim_lane("alice", "node-b", 1000)
            .await
            .unwrap()
            .is_none(),
        "a held lane is not handed to another node"
    );
    let bob = store.claim_lane("bob", "node-b", 60_000).await.unwrap();
    assert!(bob.is_some(), "another user's lane is free");
    // Held: writes under the lease go through.
    store
        .record_attempt(ids[0], "FLOWTHROUGH_1", Some(&first))
        .await
        .unwrap();
    // Past the lease, node-b takes the lane over.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = store
        .claim_lane("alice", "node-b", 60_000)
        .await
        .unwrap()
        .expect("an expired lease is claimable");
    assert!(second.fence > first.fence, "{first:?} {second:?}");
    let late = [
        store
            .record_attempt(ids[0], "FLOWTHROUGH_2", Some(&first))
            .await
            .err(),
        store
            .record_failure(ids[0], "timeout", Some(&first))
            .await
            .err(),
        store
            .finish(ids[0], delivered(3), Some("FLOWTHROUGH_2"), Some(&first))
            .await
            .err(),
    ];
    for refused in late {
        let message = refused.expect("a late write is refused").to_string();
        assert!(
            message.contains("alice") && message.contains("another node"),
            "{message}"
        );
    }
    // Handing back a lease that moved on leaves the successor's lease in place.
    assert!(
        store.release_lane(&first, 0).await.unwrap(),
        "alice has work"
    );
    assert!(
        store
            .claim_lane("alice", "node-a", 1000)
            .await
            .unwrap()
            .is_none()
    );
    let stored = store.entry(ids[0]).await.unwrap().unwrap();
    assert!(stored.is_pending(), "{stored:?}");
    assert_eq!(
        (stored.attempts, stored.tracking_id.as_deref()),
        (1, Some("FLOWTHROUGH_1"))
    );
    store
        .finish(ids[0], delivered(3), None, Some(&second))
        .await
        .unwrap();
    // Handed back, the lane is anyone's at once, with a higher fence.
    assert!(
        !store.release_lane(&second, 0).await.unwrap(),
        "alice's only entry has ended"
    );
    let third = store
        .claim_lane("alice", "node-a", 1000)
        .await
        .unwrap()
        .expect("a handed-back lane is free");
    assert!(third.fence > second.fence);
}

/// On PostgreSQL a command's records and entry are one transaction: when one statement fails,
/// nothing of it is stored, and the connection it failed on (left inside the transaction) is not
/// handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_accept_stores_nothing_on_postgres() {
    let h = Harness::postgres().await;
    let store = h.store();
    let remembered = Remembered {
        profile: Some(UserProfile {
            user_id: "half@acme.example".into(),
            ..UserProfile::default()
        }),
        template: Some(("half@acme.example".into(), "acme".into())),
        customer: None,
        audit: Some(command(1, "half@acme.example")),
    };
    // PostgreSQL text cannot hold a NUL: the entry's insert fails after the profile's.
    let failed = store
        .accept(
            remembered,
            Some(entry("half\0@acme.example", "add")),
            1,
            None,
            |_| panic!("nothing is announced that was not stored"),
        )
        .await;
    assert!(
        matches!(failed, Err(StoreError::Database { .. })),
        "{failed:?}"
    );
    assert_eq!(store.profile("half@acme.example").await.unwrap(), None);
    assert_eq!(store.user("half@acme.example").await.unwrap(), None);
    assert_eq!(store.audit(&all(10)).await.unwrap(), vec![]);
    for i in 0..20 {
        let id = store
            .accept(
                Remembered::default(),
                Some(entry(&format!("u{i}"), "add")),
                2,
                None,
                |_| {},
            )
            .await
            .unwrap();
        assert!(id.entry.is_some());
    }
    assert_eq!(store.pending_summary().await.unwrap().0, 20);
    assert_eq!(store.write_failure(), None, "a bad record is not an outage");
}

/// On PostgreSQL a claim asked for with an accept comes back with it, made after the commit:
/// its head is the user's oldest pending entry (the one accepted or an older one), a lane
/// another node holds is left to it (the command is stored all the same), and a lane claimed
/// for a command whose accept failed is handed back at once rather than kept from the other
/// nodes for its lease. On sled no claim comes back: delivery makes it in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_brings_its_lane_claimed_on_postgres() {
    let h = Harness::postgres().await;
    let store = h.store();
    let node_a = ClaimRequest {
        owner: "node-a".into(),
        lease_ms: 60_000,
    };
    let accept = |user: &'static str, audit_user: &'static str| {
        let request = node_a.clone();
        async move {
            store
                .accept(
                    Remembered {
                        audit: Some(command(1, audit_user)),
                        ..Remembered::default()
                    },
                    Some(entry(user, "add")),
                    1,
                    Some(&request),
                    |_| {},
                )
                .await
        }
    };

    let alice = accept("alice", "alice").await.unwrap();
    let claim = alice.claim.expect("a free lane is claimed with the accept");
    assert_eq!(claim.lease.owner, "node-a");
    assert_eq!(
        claim.head.map(|e| e.id),
        alice.entry,
        "its head is the new entry"
    );
    assert!(
        store
            .claim_head("alice", "node-b", 60_000)
            .await
            .unwrap()
            .is_none(),
        "node-a holds it"
    );

    let older = store.enqueue(vec![entry("bob", "add")], 1).await.unwrap()[0];
    let bob = accept("bob", "bob").await.unwrap();
    assert_eq!(
        bob.claim.and_then(|claim| claim.head).map(|e| e.id),
        Some(older),
        "an older pending entry of the user is the head"
    );

    store.enqueue(vec![entry("carol", "add")], 1).await.unwrap();
    store
        .claim_head("carol", "node-b", 60_000)
        .await
        .unwrap()
        .expect("a free lane");
    let carol = accept("carol", "carol").await.unwrap();
    assert!(carol.entry.is_some(), "stored all the same");
    assert!(carol.claim.is_none(), "node-b holds carol's lane");

    // An audit record PostgreSQL cannot take fails the accept; the claim after it still ran.
    store
        .finish(alice.entry.unwrap(), delivered(2), None, Some(&claim.lease))
        .await
        .unwrap();
    store.release_lane(&claim.lease, 0).await.unwrap();
    let failed = accept("alice", "al\0ice").await;
    assert!(
        matches!(failed, Err(StoreError::Database { .. })),
        "{failed:?}"
    );
    assert!(
        store
            .claim_head("alice", "node-b", 60_000)
            .await
            .unwrap()
            .is_some(),
        "the lane claimed for the failed accept was handed back"
    );

    let sled = Harness::sled();
    let on_sled = sled
        .store()
        .accept(
            Remembered::default(),
            Some(entry("dave", "add")),
            1,
            Some(&node_a),
            |_| {},
        )
        .await
        .unwrap();
    assert!(
        on_sled.entry.is_some() && on_sled.claim.is_none(),
        "{on_sled:?}"
    );
}

/// The accept locks the lane of a user it knows without writing it: the upsert's `DO UPDATE
/// ... WHERE false` takes the row lock and leaves no new row version (its dead tuple and WAL,
/// on every command of a known user). The lock is what orders a user's commands across nodes:
/// while another transaction holds the lane, the accept waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_locks_a_known_users_lane_without_writing_it_on_postgres() {
    use std::io::Write;
    let h = Harness::postgres().await;
    let store = h.store();
    let (cluster, dbname) = h.database();
    let lane = || h.psql("SELECT xmin FROM lanes WHERE user_id = 'alice'");
    let accept = |command: &'static str| {
        let store = store.clone();
        async move {
            store
                .accept(
                    Remembered::default(),
                    Some(entry("alice", command)),
                    1,
                    None,
                    |_| {},
                )
                .await
        }
    };
    accept("add").await.unwrap();
    let created = lane();
    assert!(!created.is_empty(), "the first accept creates the lane");
    accept("modify").await.unwrap();
    assert_eq!(
        lane(),
        created,
        "a known user's lane is locked, not written"
    );

    let mut holder = cluster.psql_session(dbname);
    let mut to_holder = holder.stdin.take().unwrap();
    to_holder
        .write_all(b"BEGIN; SELECT 1 FROM lanes WHERE user_id = 'alice' FOR UPDATE;\n")
        .unwrap();
    to_holder.flush().unwrap();
    let waiting_on = |state: &str| {
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}' AND {state}")
    };
    let seen = |query: &str| {
        (0..600).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            h.psql(query) == "1"
        })
    };
    assert!(
        seen(&waiting_on("state = 'idle in transaction'")),
        "the holder's transaction never held the lane"
    );
    let blocked = tokio::spawn(accept("delete"));
    assert!(
        seen(&waiting_on(
            "wait_event_type = 'Lock' AND query LIKE 'WITH durable%'"
        )),
        "the accept never waited for the lane's lock"
    );
    assert!(!blocked.is_finished(), "the accept went past a held lane");
    to_holder.write_all(b"COMMIT;\n").unwrap();
    drop(to_holder);
    assert!(holder.wait().unwrap().success());
    let accepted = blocked.await.unwrap().unwrap();
    assert!(accepted.entry.is_some());
}

/// A user-map change that leaves the record as it is writes no new row version: every
/// delivered UserModify maps its user to the subscriber and template it already has, and
/// each needless version is a dead tuple and WAL for PostgreSQL to carry. Checked on the
/// row's `xmin` through every statement that changes the map: the accept's template, the
/// end of a try, and the plain upsert and unmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_map_change_to_what_is_stored_writes_no_row_version_on_postgres() {
    let h = Harness::postgres().await;
    let store = h.store();
    let version = || h.psql("SELECT xmin FROM user_map WHERE user_id = 'alice'");
    let remembered = || Remembered {
        template: Some(("alice".into(), "acme".into())),
        ..Remembered::default()
    };
    let accepted = store
        .accept(remembered(), Some(entry("alice", "add")), 1, None, |_| {})
        .await
        .unwrap();
    let first = version();
    assert!(!first.is_empty(), "the accept maps alice to her template");

    let modify = store
        .accept(
            remembered(),
            Some(entry("alice", "modify")),
            2,
            None,
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(version(), first, "the same template again");

    let end = |id: EntryId, subscriber: &'static str| {
        let store = store.clone();
        async move {
            let claim = store
                .claim_head("alice", "node-a", 60_000)
                .await
                .unwrap()
                .expect("a free lane");
            assert_eq!(claim.head.map(|e| e.id), Some(id));
            store
                .finish_try(
                    id,
                    EntryState::Delivered {
                        at_ms: 3,
                        subscriber_id: Some(subscriber.into()),
                        webex_status: None,
                    },
                    None,
                    &claim.lease,
                    Some(UserMapChange::Map {
                        subscriber_id: subscriber.into(),
                        template: "acme".into(),
                    }),
                )
                .await
                .unwrap();
        }
    };
    end(accepted.entry.unwrap(), "sub-1").await;
    let mapped = version();
    assert_ne!(mapped, first, "the first delivery learns the subscriber");
    end(modify.entry.unwrap(), "sub-1").await;
    assert_eq!(version(), mapped, "a delivery that learns nothing new");

    store
        .map_user("alice", Some("sub-1"), Some("acme"))
        .await
        .unwrap();
    store.map_user("alice", None, Some("acme")).await.unwrap();
    assert_eq!(version(), mapped, "upserts of what is stored");
    store.unmap_subscriber("alice").await.unwrap();
    let unmapped = version();
    assert_ne!(unmapped, mapped);
    store.unmap_subscriber("alice").await.unwrap();
    assert_eq!(version(), unmapped, "an unmap of an unmapped user");
    let record = store.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (record.subscriber_id, record.template.as_deref()),
        (None, Some("acme"))
    );
}

fn entry(user: &str, command: &str) -> NewEntry {
    NewEntry {
        user_id: user.to_owned(),
        template: "acme".to_owned(),
        command: command.to_owned(),
        call: Call::Remove,
        client: "CN=bwcticlient.webex.com".to_owned(),
        origin: Origin::Live,
    }
}

fn delivered(at_ms: u64) -> EntryState {
    EntryState::Delivered {
        at_ms,
        subscriber_id: None,
        webex_status: None,
    }
}

fn dead(at_ms: u64) -> EntryState {
    EntryState::Dead {
        at_ms,
        reason: "400 bad".into(),
    }
}

/// The users `owner` may claim now, sorted (the store promises no order).
async fn claimable(store: &Store, owner: &str) -> Vec<String> {
    let mut users: Vec<String> = store
        .claimable_users(owner, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    users.sort();
    users
}

/// The delivery round trips: a claim hands over the head with the lease; the hand-back says
/// whether work is left, and a backoff given with it keeps the user out of every node's look
/// for work until it is over; a renewal pushes the lease while it holds and fails once it has
/// moved on; the look for work leaves out lanes other nodes hold.
async fn a_claim_reads_the_head_and_a_hand_back_says_what_is_left_and_holds_a_backoff(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(
            vec![
                entry("alice", "add"),
                entry("alice", "modify"),
                NewEntry {
                    origin: Origin::Bulk,
                    ..entry("bob", "add")
                },
            ],
            1,
        )
        .await
        .unwrap();
    let origins: std::collections::BTreeMap<String, Origin> = store
        .claimable_users("node-a", usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        origins.into_iter().collect::<Vec<_>>(),
        vec![("alice".into(), Origin::Live), ("bob".into(), Origin::Bulk)]
    );
    assert_eq!(
        store.claimable_users("node-a", 1).await.unwrap().len(),
        1,
        "the look is bounded"
    );

    let Claim { lease, head, .. } = store
        .claim_head("alice", "node-a", 60_000)
        .await
        .unwrap()
        .expect("a free lane");
    assert_eq!(
        head.map(|e| e.id),
        Some(ids[0]),
        "the head comes with the lease"
    );
    assert!(
        store
            .claim_head("alice", "node-b", 60_000)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        claimable(store, "node-b").await,
        vec!["bob"],
        "alice is held by node-a"
    );
    assert_eq!(
        claimable(store, "node-a").await,
        vec!["alice", "bob"],
        "its own lane"
    );
    let renewed = store.renew_lane(&lease, 120_000).await.unwrap();
    assert!(
        renewed.is_some_and(|until| until > lease.until_ms),
        "{renewed:?} {lease:?}"
    );

    store
        .finish(ids[0], delivered(2), None, Some(&lease))
        .await
        .unwrap();
    assert!(
        store.release_lane(&lease, 60_000).await.unwrap(),
        "the modify is left"
    );
    assert!(
        store.renew_lane(&lease, 60_000).await.unwrap().is_none(),
        "a handed-back lease is not renewed"
    );
    assert_eq!(
        claimable(store, "node-b").await,
        vec!["bob"],
        "alice backs off"
    );
    let Claim { lease, head, .. } = store
        .claim_head("alice", "node-a", 60_000)
        .await
        .unwrap()
        .expect("a backoff does not stop a claim: the node that set it retries on time");
    assert_eq!(head.map(|e| e.id), Some(ids[1]));
    store
        .finish(ids[1], delivered(3), None, Some(&lease))
        .await
        .unwrap();
    assert!(
        !store.release_lane(&lease, 0).await.unwrap(),
        "nothing left"
    );
    assert_eq!(claimable(store, "node-b").await, vec!["bob"]);
    let Claim { head, .. } = store
        .claim_head("alice", "node-b", 60_000)
        .await
        .unwrap()
        .expect("a free lane");
    assert!(head.is_none(), "no head without pending work");
}

/// `finish_try`: the entry ends with the attempt counted, the user map changes as the end
/// says (mapped with the entry's template, then forgotten by a removal, the template kept), the
/// lane is free for another node at once, and the answer says whether work is left. A late end
/// under a lease that moved on changes nothing.
async fn the_end_of_a_try_writes_the_entry_the_user_map_and_hands_the_lane_back(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(
            vec![
                entry("alice", "add"),
                entry("alice", "delete"),
                entry("bob", "add"),
            ],
            1,
        )
        .await
        .unwrap();
    store.map_user("alice", None, Some("older")).await.unwrap();
    let claim = |user: &'static str, owner: &'static str| async move {
        store
            .claim_head(user, owner, 60_000)
            .await
            .unwrap()
            .expect("a free lane")
    };

    let Claim { lease, head, .. } = claim("alice", "node-a").await;
    assert_eq!(head.map(|e| e.id), Some(ids[0]));
    let provisioned = EntryState::Delivered {
        at_ms: 2,
        subscriber_id: Some("sub-1".into()),
        webex_status: Some("provisioned".into()),
    };
    let map = UserMapChange::Map {
        subscriber_id: "sub-1".into(),
        template: "acme".into(),
    };
    let (ended, more) = store
        .finish_try(
            ids[0],
            provisioned.clone(),
            Some("FLOWTHROUGH_1"),
            &lease,
            Some(map),
        )
        .await
        .unwrap();
    assert_eq!((ended.state, ended.attempts), (provisioned, 1));
    assert!(more, "the delete is left");
    let record = store.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (record.subscriber_id.as_deref(), record.template.as_deref()),
        (Some("sub-1"), Some("acme"))
    );
    assert!(
        store.renew_lane(&lease, 60_000).await.unwrap().is_none(),
        "the lease was handed back"
    );

    let Claim { lease, head, .. } = claim("alice", "node-b").await;
    assert_eq!(
        head.map(|e| e.id),
        Some(ids[1]),
        "another node takes the lane at once"
    );
    let removed = EntryState::Delivered {
        at_ms: 3,
        subscriber_id: Some("sub-1".into()),
        webex_status: Some("removed".into()),
    };
    let (_, more) = store
        .finish_try(ids[1], removed, None, &lease, Some(UserMapChange::Forget))
        .await
        .unwrap();
    assert!(!more, "nothing left");
    let record = store.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (record.subscriber_id.as_deref(), record.template.as_deref()),
        (None, Some("acme"))
    );

    let Claim { lease: stale, .. } = claim("bob", "node-a").await;
    store.release_lane(&stale, 0).await.unwrap();
    let Claim { lease, .. } = claim("bob", "node-b").await;
    let late = store
        .finish_try(
            ids[2],
            dead(4),
            None,
            &stale,
            Some(UserMapChange::Map {
                subscriber_id: "sub-2".into(),
                template: "acme".into(),
            }),
        )
        .await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost { .. })),
        "{late:?}"
    );
    assert_eq!(store.user("bob").await.unwrap(), None, "no map change");
    assert!(store.entry(ids[2]).await.unwrap().unwrap().is_pending());
    assert!(
        store.renew_lane(&lease, 60_000).await.unwrap().is_some(),
        "the holder's lease stands"
    );
    let (_, more) = store
        .finish_try(ids[2], dead(5), None, &lease, None)
        .await
        .unwrap();
    assert!(!more);
    assert_eq!(store.user("bob").await.unwrap(), None);
}

async fn ids_listed(store: &Store, filter: Filter, limit: usize) -> Vec<EntryId> {
    store
        .list(filter, limit)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

async fn per_user_order_is_arrival_order_and_finishing_advances_the_head(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(
            vec![
                entry("alice", "add"),
                entry("bob", "add"),
                entry("alice", "modify"),
            ],
            1,
        )
        .await
        .unwrap();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
    assert_eq!(store.head_of("alice").await.unwrap().unwrap().id, ids[0]);
    assert_eq!(claimable(store, "node").await, vec!["alice", "bob"]);
    let done = EntryState::Delivered {
        at_ms: 2,
        subscriber_id: Some("sub-1".into()),
        webex_status: None,
    };
    store
        .finish(ids[0], done.clone(), Some("FLOWTHROUGH_9"), None)
        .await
        .unwrap();
    let head = store.head_of("alice").await.unwrap().unwrap();
    assert_eq!(head.id, ids[2]);
    assert_eq!(head.new.command, "modify");
    let ended = store.entry(ids[0]).await.unwrap().unwrap();
    assert_eq!(ended.state, done);
    assert_eq!(ended.attempts, 1);
    assert_eq!(ended.tracking_id.as_deref(), Some("FLOWTHROUGH_9"));
    assert_eq!(
        store.progress(ids[0]).await.unwrap(),
        Some(Progress {
            state: done,
            tracking_id: Some("FLOWTHROUGH_9".into())
        })
    );
    assert_eq!(
        store.progress(ids[2]).await.unwrap(),
        Some(Progress {
            state: EntryState::Pending,
            tracking_id: None
        })
    );
    assert_eq!(store.progress(ids[2] + 100).await.unwrap(), None);
    assert_eq!(store.pending_summary().await.unwrap(), (2, Some(1)));
    assert!(store.has_queued("alice").await.unwrap());
    assert!(!store.has_queued("carol").await.unwrap());
}

async fn a_user_id_that_prefixes_another_does_not_see_its_queue(h: Harness) {
    let store = h.store();
    store.enqueue(vec![entry("al", "x")], 1).await.unwrap();
    let ids = store.enqueue(vec![entry("a", "y")], 1).await.unwrap();
    assert_eq!(store.head_of("a").await.unwrap().unwrap().id, ids[0]);
    assert!(store.head_of("").await.unwrap().is_none());
}

/// SPEC §11: a dead entry stays at the head of its user's queue and holds the lane until the
/// operator acts; the user's later entries wait behind it, other users go on. A retry makes it
/// pending where it stands (its age counted anew); a drop lets the next entry go. While it
/// holds the lane it is never pruned with age.
async fn a_dead_entry_holds_its_lane_until_retried_or_dropped(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(
            vec![
                entry("alice", "add"),
                entry("alice", "modify"),
                entry("bob", "add"),
            ],
            1,
        )
        .await
        .unwrap();
    assert!(
        !store.retry(ids[0]).await.unwrap(),
        "a pending entry is not retried"
    );
    store.finish(ids[0], dead(5), None, None).await.unwrap();
    let head = store.head_of("alice").await.unwrap().unwrap();
    assert!(head.id == ids[0] && head.is_dead(), "{head:?}");
    assert!(store.has_queued("alice").await.unwrap());
    assert_eq!(claimable(store, "node-a").await, vec!["bob"]);
    assert_eq!(ids_listed(store, Filter::Dead, 10).await, vec![ids[0]]);
    assert_eq!(
        ids_listed(store, Filter::Pending, 10).await,
        vec![ids[1], ids[2]]
    );
    assert_eq!(store.pending_summary().await.unwrap(), (2, Some(1)));
    // A claim finds the dead head; the hand-back says nothing can go.
    let claim = store
        .claim_head("alice", "node-a", 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.head.map(|e| e.id), Some(ids[0]));
    assert!(!store.release_lane(&claim.lease, 0).await.unwrap());
    assert_eq!(
        store.prune_finished(u64::MAX, u64::MAX).await.unwrap(),
        0,
        "a dead entry holding its lane is not pruned"
    );

    assert!(store.retry(ids[0]).await.unwrap());
    let revived = store.head_of("alice").await.unwrap().unwrap();
    assert_eq!((revived.id, &revived.state), (ids[0], &EntryState::Pending));
    assert!(revived.created_ms > 5, "its age counts from the retry");
    assert_eq!(claimable(store, "node-a").await, vec!["alice", "bob"]);
    assert!(!store.retry(ids[0]).await.unwrap(), "retried once only");

    // Dead again at the end of a try: the hand-back with it says nothing can go.
    let claim = store
        .claim_head("alice", "node-a", 60_000)
        .await
        .unwrap()
        .unwrap();
    let (ended, more) = store
        .finish_try(ids[0], dead(6), Some("FLOWTHROUGH_2"), &claim.lease, None)
        .await
        .unwrap();
    assert!(ended.is_dead() && !more, "{ended:?} {more}");
    assert_eq!(store.head_of("alice").await.unwrap().unwrap().id, ids[0]);
    assert_eq!(claimable(store, "node-a").await, vec!["bob"]);

    let dropped = store.drop_entry(ids[0]).await.unwrap().unwrap();
    assert_eq!(dropped.id, ids[0]);
    assert_eq!(store.head_of("alice").await.unwrap().unwrap().id, ids[1]);
    assert_eq!(claimable(store, "node-a").await, vec!["alice", "bob"]);
    assert!(store.entry(ids[0]).await.unwrap().is_none());
    assert!(store.drop_entry(ids[0]).await.unwrap().is_none());
    assert!(!store.retry(ids[0]).await.unwrap());
    for result in [
        store.finish(ids[0], EntryState::Pending, None, None).await,
        store.record_attempt(ids[0], "FLOWTHROUGH_1", None).await,
        store.record_failure(ids[0], "timeout", None).await,
        store.set_webex_status(ids[0], "provisioned").await,
    ] {
        assert!(
            matches!(result, Err(StoreError::NotFound(id)) if id == ids[0]),
            "{result:?}"
        );
    }

    // With nothing behind it, a dead entry still holds the lane for what comes next.
    store.finish(ids[2], dead(7), None, None).await.unwrap();
    assert!(store.has_queued("bob").await.unwrap());
    let later = store
        .enqueue(vec![entry("bob", "modify")], 8)
        .await
        .unwrap();
    assert_eq!(store.head_of("bob").await.unwrap().unwrap().id, ids[2]);
    assert_eq!(claimable(store, "node-a").await, vec!["alice"]);
    store.drop_entry(ids[2]).await.unwrap().unwrap();
    assert_eq!(store.head_of("bob").await.unwrap().unwrap().id, later[0]);
}

async fn attempts_are_counted_and_survive_reopening(mut h: Harness) {
    let ids = h
        .store()
        .enqueue(vec![entry("alice", "add")], 1)
        .await
        .unwrap();
    h.store()
        .record_attempt(ids[0], "FLOWTHROUGH_1", None)
        .await
        .unwrap();
    h.store()
        .record_failure(ids[0], "timeout", None)
        .await
        .unwrap();
    h.reopen().await;
    let entry = h.store().head_of("alice").await.unwrap().unwrap();
    assert_eq!(entry.id, ids[0]);
    assert_eq!(entry.attempts, 1);
    assert_eq!(entry.tracking_id.as_deref(), Some("FLOWTHROUGH_1"));
    assert_eq!(entry.last_error.as_deref(), Some("timeout"));
}

/// What a restarted node finds: every acknowledged entry in its state, the records beside them,
/// and new ids still after the old ones.
async fn acknowledged_entries_and_records_survive_reopening(mut h: Harness) {
    let ids = h
        .store()
        .enqueue(vec![entry("a", "1"), entry("b", "2"), entry("c", "3")], 10)
        .await
        .unwrap();
    h.store()
        .finish(ids[0], delivered(11), None, None)
        .await
        .unwrap();
    h.store()
        .finish(ids[1], dead(11), None, None)
        .await
        .unwrap();
    h.store()
        .map_user("a", Some("sub-a"), Some("acme"))
        .await
        .unwrap();
    h.store().append_audit(&command(12, "a")).await.unwrap();
    h.reopen().await;
    let store = h.store();
    assert_eq!(claimable(store, "node").await, vec!["c"]);
    assert_eq!(ids_listed(store, Filter::Dead, 10).await, vec![ids[1]]);
    assert_eq!(ids_listed(store, Filter::Delivered, 10).await, vec![ids[0]]);
    assert_eq!(ids_listed(store, Filter::All, 10).await, ids);
    assert_eq!(
        store
            .user("a")
            .await
            .unwrap()
            .unwrap()
            .subscriber_id
            .as_deref(),
        Some("sub-a")
    );
    assert_eq!(store.audit(&all(10)).await.unwrap(), vec![command(12, "a")]);
    let later = store.enqueue(vec![entry("d", "4")], 13).await.unwrap();
    assert!(later[0] > ids[2], "{later:?} after {ids:?}");
}

async fn several_entries_are_stored_in_order_and_announced(h: Harness) {
    let mut announced = Vec::new();
    let ids = h
        .store()
        .enqueue_announced(
            vec![entry("x", "1"), entry("x", "2"), entry("y", "3")],
            5,
            |id| announced.push(id),
        )
        .await
        .unwrap();
    assert_eq!(announced, ids);
    let listed = h.store().list(Filter::Pending, 10).await.unwrap();
    let commands: Vec<&str> = listed.iter().map(|e| e.new.command.as_str()).collect();
    assert_eq!(commands, ["1", "2", "3"]);
    assert!(listed.iter().all(|e| e.created_ms == 5 && e.attempts == 0));
    assert_eq!(h.store().head_of("x").await.unwrap().unwrap().id, ids[0]);
}

/// The body is sent to Webex as it was mapped: its text, key order and all, comes back.
async fn call_bodies_come_back_as_they_were_written(h: Harness) {
    let body = serde_json::json!({"userId": "müller@acme.example", "firstName": "Jürgen",
        "lastName": "O'Brien \"quoted\"", "primaryPhoneNumber": "+12025550101", "extension": ""});
    let calls = [
        Call::provision(&body).unwrap(),
        Call::update(&serde_json::json!({"mobilePhoneNumber": ""})).unwrap(),
        Call::Remove,
    ];
    let entries = calls
        .iter()
        .map(|call| NewEntry {
            call: call.clone(),
            ..entry("müller@acme.example", "cmd")
        })
        .collect();
    let ids = h.store().enqueue(entries, 1).await.unwrap();
    for (id, call) in ids.iter().zip(&calls) {
        let stored = h.store().entry(*id).await.unwrap().unwrap();
        assert_eq!(&stored.new.call, call);
        if let (Call::Provision { body: a }, Call::Provision { body: b }) = (&stored.new.call, call)
        {
            assert_eq!(a.get(), b.get());
        }
    }
}

/// Each change hands back the entry as it is now stored, field for field.
async fn every_change_returns_the_stored_entry(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(vec![entry("alice", "add"), entry("bob", "add")], 1)
        .await
        .unwrap();
    let stored = |id| async move { store.entry(id).await.unwrap().unwrap() };
    assert_eq!(
        store.head_of("alice").await.unwrap().unwrap(),
        stored(ids[0]).await
    );
    let attempted = store
        .record_attempt(ids[0], "FLOWTHROUGH_1", None)
        .await
        .unwrap();
    assert_eq!(
        (attempted.attempts, attempted.tracking_id.as_deref()),
        (1, Some("FLOWTHROUGH_1"))
    );
    assert_eq!(attempted, stored(ids[0]).await);
    let failed = store.record_failure(ids[0], "timeout", None).await.unwrap();
    assert_eq!(failed.last_error.as_deref(), Some("timeout"));
    assert_eq!(failed, stored(ids[0]).await);
    let unchanged = store.set_webex_status(ids[0], "provisioned").await.unwrap();
    assert_eq!(
        unchanged.state,
        EntryState::Pending,
        "a status is only kept for a delivered entry"
    );
    let ended = store
        .finish(
            ids[1],
            EntryState::Delivered {
                at_ms: 2,
                subscriber_id: Some("sub-2".into()),
                webex_status: Some("provisioning".into()),
            },
            Some("FLOWTHROUGH_2"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ended, stored(ids[1]).await);
    assert_eq!(ended.attempts, 1);
    let settled = store.set_webex_status(ids[1], "provisioned").await.unwrap();
    assert_eq!(
        settled.state,
        EntryState::Delivered {
            at_ms: 2,
            subscriber_id: Some("sub-2".into()),
            webex_status: Some("provisioned".into()),
        }
    );
    assert_eq!(settled, stored(ids[1]).await);
    let without_call = store.finish(ids[0], dead(3), None, None).await.unwrap();
    assert_eq!(
        (without_call.attempts, without_call.tracking_id.as_deref()),
        (1, Some("FLOWTHROUGH_1")),
        "an end without a call counts no attempt and keeps the last TrackingID"
    );
}

async fn prune_removes_only_old_finished_entries(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(vec![entry("a", "1"), entry("b", "2"), entry("d", "4")], 10)
        .await
        .unwrap();
    let late = store.enqueue(vec![entry("c", "3")], 100).await.unwrap();
    store
        .finish(ids[0], delivered(11), None, None)
        .await
        .unwrap();
    store.finish(ids[2], dead(11), None, None).await.unwrap();
    store
        .finish(late[0], delivered(101), None, None)
        .await
        .unwrap();
    assert_eq!(store.prune_finished(50, u64::MAX).await.unwrap(), 1);
    assert!(store.entry(ids[0]).await.unwrap().is_none());
    assert!(
        store.entry(ids[1]).await.unwrap().is_some(),
        "pending entries are never pruned"
    );
    assert!(
        store.entry(ids[2]).await.unwrap().is_some(),
        "nor a dead entry holding its lane"
    );
    assert!(store.entry(late[0]).await.unwrap().is_some());
}

/// The operator's default view: dead and pending entries however much history is before them.
async fn the_active_view_finds_dead_and_pending_entries_behind_any_history(h: Harness) {
    let store = h.store();
    let history: Vec<NewEntry> = (0..20).map(|i| entry(&format!("u{i}"), "add")).collect();
    for id in store.enqueue(history, 1).await.unwrap() {
        store.finish(id, delivered(2), None, None).await.unwrap();
    }
    let ids = store
        .enqueue(vec![entry("dead", "add"), entry("waiting", "add")], 3)
        .await
        .unwrap();
    store.finish(ids[0], dead(4), None, None).await.unwrap();
    assert_eq!(ids_listed(store, Filter::Active, 5).await, ids);
    assert_eq!(store.list(Filter::Active, 1).await.unwrap()[0].id, ids[0]);
    assert_eq!(store.list(Filter::Delivered, 5).await.unwrap().len(), 5);
    assert_eq!(store.list(Filter::All, 100).await.unwrap().len(), 22);
}

/// The cap holds the delivered history to a size whatever the retention; it never touches what
/// is still owed.
async fn the_history_cap_removes_the_oldest_delivered_entries_only(h: Harness) {
    let store = h.store();
    let first = store
        .enqueue(vec![entry("dead", "add"), entry("waiting", "add")], 1)
        .await
        .unwrap();
    store.finish(first[0], dead(2), None, None).await.unwrap();
    let history: Vec<NewEntry> = (0..6).map(|i| entry(&format!("u{i}"), "add")).collect();
    let delivered_ids = store.enqueue(history, 3).await.unwrap();
    for id in &delivered_ids {
        store.finish(*id, delivered(4), None, None).await.unwrap();
    }
    assert_eq!(store.prune_finished(0, 4).await.unwrap(), 2);
    assert_eq!(
        ids_listed(store, Filter::Delivered, 10).await,
        delivered_ids[2..],
        "the oldest two went"
    );
    assert_eq!(ids_listed(store, Filter::Active, 10).await, first);
    assert_eq!(
        store.prune_finished(0, 4).await.unwrap(),
        0,
        "nothing beyond the cap"
    );
    assert_eq!(store.prune_finished(0, 0).await.unwrap(), 4);
    assert_eq!(
        ids_listed(store, Filter::All, 10).await,
        first,
        "dead and pending stay"
    );
    // Counts follow the writes after a round.
    let later: Vec<NewEntry> = (0..3).map(|i| entry(&format!("v{i}"), "add")).collect();
    let later = store.enqueue(later, 5).await.unwrap();
    for id in &later {
        store.finish(*id, delivered(6), None, None).await.unwrap();
    }
    store.drop_entry(later[0]).await.unwrap();
    assert_eq!(store.prune_finished(0, 1).await.unwrap(), 1);
    assert_eq!(ids_listed(store, Filter::Delivered, 10).await, later[2..]);
}

async fn dead_count_follows_finish_retry_drop_and_prune(h: Harness) {
    let store = h.store();
    let ids = store
        .enqueue(
            vec![
                entry("a", "1"),
                entry("b", "2"),
                entry("c", "3"),
                entry("d", "4"),
            ],
            10,
        )
        .await
        .unwrap();
    store.finish(ids[0], dead(11), None, None).await.unwrap();
    store.finish(ids[1], dead(11), None, None).await.unwrap();
    store
        .finish(ids[2], delivered(11), Some("FLOWTHROUGH_1"), None)
        .await
        .unwrap();
    assert_eq!(store.dead_count().await.unwrap(), 2);
    assert_eq!(
        ids_listed(store, Filter::Dead, 10).await,
        vec![ids[0], ids[1]]
    );
    assert_eq!(store.list(Filter::Dead, 1).await.unwrap().len(), 1);
    assert_eq!(ids_listed(store, Filter::Pending, 10).await, vec![ids[3]]);
    assert!(store.retry(ids[0]).await.unwrap());
    assert_eq!(store.dead_count().await.unwrap(), 1);
    assert_eq!(
        ids_listed(store, Filter::Pending, 10).await,
        vec![ids[0], ids[3]],
        "oldest first across users"
    );
    store.drop_entry(ids[0]).await.unwrap();
    assert_eq!(
        store.prune_finished(100, u64::MAX).await.unwrap(),
        1,
        "the delivered entry; the dead one holds its lane"
    );
    assert_eq!(store.dead_count().await.unwrap(), 1);
    store.drop_entry(ids[1]).await.unwrap();
    assert_eq!(store.dead_count().await.unwrap(), 0);
    assert!(store.list(Filter::Dead, 10).await.unwrap().is_empty());
}

async fn user_map_keeps_fields_not_given(h: Harness) {
    let store = h.store();
    assert_eq!(store.user("alice").await.unwrap(), None);
    store.map_user("alice", None, Some("acme")).await.unwrap();
    store.map_user("alice", Some("sub-1"), None).await.unwrap();
    let record = store.user("alice").await.unwrap().unwrap();
    assert_eq!(record.subscriber_id.as_deref(), Some("sub-1"));
    assert_eq!(record.template.as_deref(), Some("acme"));
    store.unmap_subscriber("alice").await.unwrap();
    let record = store.user("alice").await.unwrap().unwrap();
    assert_eq!(record.subscriber_id, None);
    assert_eq!(record.template.as_deref(), Some("acme"));
    store.unmap_subscriber("nobody").await.unwrap();
    assert_eq!(store.user("nobody").await.unwrap(), None);
}

/// The handler (a user's template) and delivery (its subscriber id) change one record at once.
async fn concurrent_changes_to_one_user_record_are_all_kept(h: Harness) {
    let users: Arc<Vec<String>> = Arc::new((0..300).map(|i| format!("user{i}")).collect());
    let writers = [(Some("sub"), None), (None, Some("acme"))].map(|(sub, template)| {
        let (store, users) = (h.store().clone(), users.clone());
        tokio::spawn(async move {
            for user in users.iter() {
                store.map_user(user, sub, template).await.unwrap();
            }
        })
    });
    for writer in writers {
        writer.await.unwrap();
    }
    for user in users.iter() {
        let record = h.store().user(user).await.unwrap().unwrap();
        assert_eq!(
            (record.subscriber_id.as_deref(), record.template.as_deref()),
            (Some("sub"), Some("acme")),
            "{user}"
        );
    }
}

async fn profiles_and_customers_round_trip(h: Harness) {
    let store = h.store();
    let profile = UserProfile {
        user_id: "müller@acme.example".into(),
        last_name: "Müller".into(),
        ..UserProfile::default()
    };
    assert_eq!(store.profile(&profile.user_id).await.unwrap(), None);
    store.save_profile(&profile).await.unwrap();
    let changed = UserProfile {
        first_name: "Jürgen".into(),
        ..profile.clone()
    };
    store.save_profile(&changed).await.unwrap();
    assert_eq!(
        store.profile("müller@acme.example").await.unwrap(),
        Some(changed)
    );
    let group = Customer {
        service_provider_id: "acme-ent".into(),
        group_id: Some("hq".into()),
        name: Some("Acme HQ".into()),
        enterprise: false,
        template: "acme".into(),
    };
    let enterprise = Customer {
        group_id: None,
        enterprise: true,
        ..group.clone()
    };
    store.record_customer(&group).await.unwrap();
    store.record_customer(&enterprise).await.unwrap();
    store.record_customer(&group).await.unwrap();
    let renamed = Customer {
        name: Some("Acme Headquarters".into()),
        ..group.clone()
    };
    store.record_customer(&renamed).await.unwrap();
    assert_eq!(store.customers().await.unwrap(), vec![enterprise, renamed]);
}

fn command(at_ms: u64, user: &str) -> AuditRecord {
    AuditRecord {
        at_ms,
        client: "CN=bwcticlient.webex.com serial=01".into(),
        event: AuditEvent::Command {
            template: Some("acme".into()),
            command: "UserAddRequest17sp4".into(),
            user_id: Some(user.into()),
            outcome: "success".into(),
            webex_status: Some("provisioned".into()),
            tracking_id: Some("FLOWTHROUGH_x".into()),
            outbox_id: Some(1),
            latency_ms: 3,
        },
    }
}

fn all(limit: usize) -> AuditQuery {
    AuditQuery {
        limit,
        ..AuditQuery::default()
    }
}

async fn at_ms(store: &Store, query: &AuditQuery) -> Vec<u64> {
    store
        .audit(query)
        .await
        .unwrap()
        .iter()
        .map(|r| r.at_ms)
        .collect()
}

async fn audit_is_newest_first_filtered_by_user_and_pruned_by_age_then_count(h: Harness) {
    let store = h.store();
    for (t, u) in [(10, "a"), (20, "b"), (30, "a"), (40, "a")] {
        store.append_audit(&command(t, u)).await.unwrap();
    }
    let tunnel = AuditRecord {
        at_ms: 35,
        client: "plain".into(),
        event: AuditEvent::Tunnel {
            client_address: "192.0.2.1:5000".into(),
            destination: "webexapis.com:443".into(),
            address_used: None,
            bytes_up: 1,
            bytes_down: 2,
            duration_ms: 3,
            end: "closed".into(),
        },
    };
    store.append_audit(&tunnel).await.unwrap();
    let of_a = AuditQuery {
        user_id: Some("a".into()),
        limit: 2,
        ..AuditQuery::default()
    };
    assert_eq!(at_ms(store, &of_a).await, vec![40, 30]);
    assert_eq!(store.audit(&all(2)).await.unwrap()[1], tunnel);
    assert_eq!(store.prune_audit(15, 100).await.unwrap(), 1);
    assert_eq!(store.prune_audit(0, 3).await.unwrap(), 1);
    assert_eq!(at_ms(store, &all(10)).await, vec![40, 35, 30]);
    for t in [50, 60, 70] {
        store.append_audit(&command(t, "c")).await.unwrap();
    }
    assert_eq!(store.prune_audit(0, 2).await.unwrap(), 4);
    assert_eq!(at_ms(store, &all(10)).await, vec![70, 60]);
    assert_eq!(store.prune_audit(0, 2).await.unwrap(), 0);
}

async fn documents_are_capped_apart_from_commands(h: Harness) {
    let store = h.store();
    store.append_audit(&command(1, "a")).await.unwrap();
    for i in 0..1005u64 {
        let doc = AuditRecord {
            at_ms: 100 + i,
            client: "x".into(),
            event: AuditEvent::Document {
                reason: "unknown".into(),
                excerpt: "<x/>".into(),
            },
        };
        store.append_audit(&doc).await.unwrap();
    }
    let docs = AuditQuery {
        documents_only: true,
        limit: 5000,
        ..AuditQuery::default()
    };
    let kept = store.audit(&docs).await.unwrap();
    assert_eq!(kept.len(), 1000);
    assert_eq!(kept[0].at_ms, 1104, "newest first");
    assert_eq!(
        kept.last().unwrap().at_ms,
        105,
        "the oldest documents went first"
    );
    assert_eq!(store.audit(&all(10)).await.unwrap(), vec![command(1, "a")]);
    let of_user = AuditQuery {
        user_id: Some("a".into()),
        documents_only: true,
        limit: 10,
    };
    assert!(store.audit(&of_user).await.unwrap().is_empty());
}

async fn the_token_record_round_trips(mut h: Harness) {
    assert_eq!(h.store().token().await.unwrap(), None);
    let first = TokenRecord {
        access_token: Some(Secret::new("acc")),
        access_expires_at: Some(100),
        refresh_token: Secret::new("ref"),
        refresh_expires_at: Some(200),
        last_refresh: Some(50),
        state: TokenState::Ok,
    };
    h.store().put_token(&first).await.unwrap();
    let rotated = TokenRecord {
        refresh_token: Secret::new("ref-2"),
        state: TokenState::CredentialsInvalid {
            reason: "invalid_grant".into(),
        },
        ..first
    };
    h.store().put_token(&rotated).await.unwrap();
    h.reopen().await;
    assert_eq!(h.store().token().await.unwrap(), Some(rotated));
}

async fn flushes_complete_for_every_ticket(h: Harness) {
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let store = h.store().clone();
        tasks.push(tokio::spawn(async move {
            store
                .enqueue(vec![entry(&format!("u{i}"), "add")], 1)
                .await
                .unwrap();
            let ticket = store.start_flush();
            store.flushed(ticket).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(h.store().pending_summary().await.unwrap().0, 32);
}

/// What the handler stores for one command, in one call: the profile, the user's template, a
/// customer, the entry (announced) and the command's audit record naming it, or any of them
/// alone; the record completed afterwards in place.
async fn accepting_a_command_writes_its_records_and_its_entry(h: Harness) {
    let store = h.store();
    let profile = UserProfile {
        user_id: "new@acme.example".into(),
        first_name: "Neu".into(),
        ..UserProfile::default()
    };
    let customer = Customer {
        service_provider_id: "acme-ent".into(),
        group_id: None,
        name: None,
        enterprise: true,
        template: "acme".into(),
    };
    store
        .map_user("new@acme.example", Some("sub-9"), None)
        .await
        .unwrap();
    let mut announced = Vec::new();
    let accepted_record = AuditRecord {
        event: AuditEvent::Command {
            outcome: "accepted".into(),
            webex_status: None,
            tracking_id: None,
            outbox_id: None,
            latency_ms: 0,
            template: Some("acme".into()),
            command: "UserAddRequest17sp4".into(),
            user_id: Some("new@acme.example".into()),
        },
        ..command(7, "new@acme.example")
    };
    let accepted = store
        .accept(
            Remembered {
                profile: Some(profile.clone()),
                template: Some(("new@acme.example".into(), "acme".into())),
                customer: Some(customer.clone()),
                audit: Some(accepted_record.clone()),
            },
            Some(entry("new@acme.example", "add")),
            7,
            None,
            |id| announced.push(id),
        )
        .await
        .unwrap();
    let id = accepted.entry.unwrap();
    assert_eq!(announced, vec![id]);
    // The record went in with the entry, naming it.
    let mut naming = accepted_record.clone();
    if let AuditEvent::Command { outbox_id, .. } = &mut naming.event {
        *outbox_id = Some(id);
    }
    assert_eq!(store.audit(&all(10)).await.unwrap(), vec![naming]);
    let mut answered = command(7, "new@acme.example");
    if let AuditEvent::Command { outbox_id, .. } = &mut answered.event {
        *outbox_id = Some(id);
    }
    store
        .complete_audit(accepted.audit.unwrap(), &answered)
        .await
        .unwrap();
    assert_eq!(store.audit(&all(10)).await.unwrap(), vec![answered.clone()]);
    let of_user = AuditQuery {
        user_id: Some("new@acme.example".into()),
        ..all(10)
    };
    assert_eq!(store.audit(&of_user).await.unwrap(), vec![answered]);
    assert_eq!(
        store.head_of("new@acme.example").await.unwrap().unwrap().id,
        id
    );
    assert_eq!(
        store.profile("new@acme.example").await.unwrap(),
        Some(profile)
    );
    let record = store.user("new@acme.example").await.unwrap().unwrap();
    assert_eq!(
        (record.subscriber_id.as_deref(), record.template.as_deref()),
        (Some("sub-9"), Some("acme")),
        "the template is added, the subscriber id kept"
    );
    assert_eq!(store.customers().await.unwrap(), vec![customer]);
    let nothing_queued = store
        .accept(Remembered::default(), None, 8, None, |_| {
            panic!("no entry, no id")
        })
        .await
        .unwrap();
    assert_eq!(
        (nothing_queued.entry, nothing_queued.audit),
        (None, None),
        "{nothing_queued:?}"
    );
    assert!(nothing_queued.claim.is_none(), "{nothing_queued:?}");
    // A command answered at its accept: its record is final and names no entry.
    let final_record = command(9, "other@acme.example");
    let answered_now = store
        .accept(
            Remembered {
                audit: Some(final_record.clone()),
                ..Remembered::default()
            },
            None,
            9,
            None,
            |_| panic!("no entry, no id"),
        )
        .await
        .unwrap();
    assert_eq!(answered_now.entry, None);
    assert!(answered_now.audit.is_some());
    assert_eq!(store.audit(&all(1)).await.unwrap(), vec![final_record]);
    assert_eq!(store.pending_summary().await.unwrap().0, 1);
}

async fn the_origin_of_an_entry_is_kept_through_every_change_and_a_reopen(mut h: Harness) {
    let bulk = NewEntry {
        origin: Origin::Bulk,
        ..entry("imported", "import")
    };
    let ids = h
        .store()
        .enqueue(vec![bulk, entry("live", "add")], 1)
        .await
        .unwrap();
    let store = h.store();
    assert_eq!(
        store.head_of("imported").await.unwrap().unwrap().new.origin,
        Origin::Bulk
    );
    assert_eq!(
        store.entry(ids[1]).await.unwrap().unwrap().new.origin,
        Origin::Live
    );
    let tried = store
        .record_attempt(ids[0], "FLOWTHROUGH_1", None)
        .await
        .unwrap();
    assert_eq!(tried.new.origin, Origin::Bulk);
    let failed = store.record_failure(ids[0], "503", None).await.unwrap();
    assert_eq!(failed.new.origin, Origin::Bulk);
    store.flush().await.unwrap();
    h.reopen().await;
    let store = h.store();
    let listed: Vec<(String, Origin)> = store
        .list(Filter::Pending, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.new.user_id, e.new.origin))
        .collect();
    assert_eq!(
        listed,
        [
            ("imported".to_owned(), Origin::Bulk),
            ("live".to_owned(), Origin::Live)
        ]
    );
    let ended = store
        .finish(ids[0], dead(5), Some("FLOWTHROUGH_2"), None)
        .await
        .unwrap();
    assert_eq!(ended.new.origin, Origin::Bulk);
    assert!(store.retry(ids[0]).await.unwrap());
    assert_eq!(
        store.head_of("imported").await.unwrap().unwrap().new.origin,
        Origin::Bulk,
        "a retried bulk entry stays bulk"
    );
}

async fn the_whole_user_map_is_listed_in_user_id_order(h: Harness) {
    let store = h.store();
    assert!(store.users().await.unwrap().is_empty());
    store
        .map_user("bob@x", Some("S2"), Some("acme"))
        .await
        .unwrap();
    store.map_user("alice@x", None, Some("acme")).await.unwrap();
    // Byte order, as sled keeps its keys: upper case before lower case.
    store.map_user("Zed@x", Some("S3"), None).await.unwrap();
    store.unmap_subscriber("bob@x").await.unwrap();
    let users = store.users().await.unwrap();
    let listed: Vec<(&str, Option<&str>, Option<&str>)> = users
        .iter()
        .map(|(user, record)| {
            (
                user.as_str(),
                record.subscriber_id.as_deref(),
                record.template.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("Zed@x", Some("S3"), None),
            ("alice@x", None, Some("acme")),
            ("bob@x", None, Some("acme")),
        ]
    );
}

async fn the_last_reconcile_report_replaces_the_one_before_and_survives_reopening(mut h: Harness) {
    assert_eq!(h.store().reconcile_report().await.unwrap(), None);
    let first = ReconcileReport {
        at_ms: 7_000,
        counts: [("missing".to_owned(), 3), ("extra".to_owned(), 1)].into(),
    };
    h.store().put_reconcile_report(&first).await.unwrap();
    assert_eq!(h.store().reconcile_report().await.unwrap(), Some(first));
    let second = ReconcileReport {
        at_ms: 9_000,
        counts: [("stale_map".to_owned(), 2)].into(),
    };
    h.store().put_reconcile_report(&second).await.unwrap();
    h.store().flush().await.unwrap();
    h.reopen().await;
    assert_eq!(h.store().reconcile_report().await.unwrap(), Some(second));
}
