//! What the nodes sharing the database tell each other (see `store::cluster`): the rate limit
//! one of them met, heartbeats, and leases on chores that must run once. The database's clock
//! decides every age and expiry.

use tokio_postgres::Row;

use super::{Access, OpError, PgStore, to_u64};
use crate::store::{NodeStatus, SharedLimits, StoreError};

/// A 429: one more for every node to see, and a pause at least this long.
const RATE_LIMITED: &str = "UPDATE control SET limited_seq = limited_seq + 1, limited_at = now(), \
     paused_until = greatest(coalesce(paused_until, now()), now() + $1 * interval '1 millisecond')";

/// The columns of [`SharedLimits`], from the `control` row and the live nodes' shares (a node
/// silent for a minute no longer counts).
pub(super) const LIMITS: &str = "control.limited_seq, \
     greatest(0, coalesce(extract(epoch FROM (control.paused_until - now())) * 1000, 0))::bigint, \
     (SELECT avg(share_per_s) FROM nodes WHERE stopped_at IS NULL AND share_per_s IS NOT NULL \
      AND heartbeat_at > now() - interval '1 minute'), \
     CASE WHEN control.probe_until > now() THEN control.probe_owner END, \
     greatest(0, coalesce(extract(epoch FROM (control.probe_until - now())) * 1000, 0))::bigint, \
     CASE WHEN control.limited_at IS NOT NULL \
     THEN greatest(0, extract(epoch FROM (now() - control.limited_at)) * 1000)::bigint END";

/// How many columns [`LIMITS`] has.
pub(super) const LIMITS_COLUMNS: usize = 6;

/// The probe is taken when nobody holds it, its holder renews it, or its time ran out.
const CLAIM_PROBE: &str = "UPDATE control SET probe_owner = $1, \
     probe_until = now() + $2 * interval '1 millisecond' \
     WHERE probe_owner IS NULL OR probe_owner = $1 OR probe_until <= now() RETURNING true";

const END_PROBE: &str =
    "UPDATE control SET probe_owner = NULL, probe_until = NULL WHERE probe_owner = $1";

const PUBLISH_SHARE: &str = "UPDATE nodes SET share_per_s = $2 WHERE node_id = $1";

const HEARTBEAT: &str = "INSERT INTO nodes (node_id, version, started_at, heartbeat_at, stopped_at) \
     VALUES ($1, $2, to_timestamp($3::float8 / 1000), now(), CASE WHEN $4 THEN now() END) \
     ON CONFLICT (node_id) DO UPDATE SET version = excluded.version, \
     started_at = excluded.started_at, heartbeat_at = now(), stopped_at = excluded.stopped_at";

const NODES: &str = "SELECT n.node_id, n.version, (extract(epoch FROM n.started_at) * 1000)::bigint, \
     greatest(0, extract(epoch FROM (now() - n.heartbeat_at)) * 1000)::bigint, n.stopped_at IS NOT NULL, \
     coalesce((SELECT array_agg(l.user_id ORDER BY l.user_id) FROM lanes l \
               WHERE l.lease_owner = n.node_id AND l.lease_until > now()), '{}'), \
     (SELECT count(*) FROM lanes l WHERE l.lease_owner = n.node_id AND l.lease_until <= now() \
      AND EXISTS (SELECT 1 FROM outbox o WHERE o.user_id = l.user_id AND o.state = 'pending')) \
     FROM nodes n ORDER BY n.node_id";

const CLAIM_CHORE: &str = "INSERT INTO chores (name, lease_owner, lease_until) \
     VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
     ON CONFLICT (name) DO UPDATE SET lease_owner = excluded.lease_owner, lease_until = excluded.lease_until \
     WHERE chores.lease_owner = excluded.lease_owner OR chores.lease_until IS NULL \
     OR chores.lease_until <= now() RETURNING name";

impl PgStore {
    pub async fn note_rate_limited(&self, pause_ms: u64) -> Result<SharedLimits, StoreError> {
        let ms = pause_ms as f64;
        self.run("share a rate limit", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(&format!("{RATE_LIMITED} RETURNING {LIMITS}"))
                    .await?;
                limits_from(&c.query_one(&statement, &[&ms]).await?, 0)
            })
        })
        .await
    }

    pub async fn shared_limits(&self) -> Result<SharedLimits, StoreError> {
        self.run("read the shared limits", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(&format!("SELECT {LIMITS} FROM control"))
                    .await?;
                let row = c.query_one(&statement, &[]).await?;
                limits_from(&row, 0)
            })
        })
        .await
    }

    pub async fn claim_probe(&self, owner: &str, for_ms: u64) -> Result<bool, StoreError> {
        let (owner, ms) = (owner.to_owned(), for_ms as f64);
        self.run("claim the Webex probe", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(CLAIM_PROBE).await?;
                Ok(c.query_opt(&statement, &[&owner, &ms]).await?.is_some())
            })
        })
        .await
    }

    pub async fn end_probe(&self, owner: &str) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        self.run("end the Webex probe", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(END_PROBE).await?;
                c.execute(&statement, &[&owner]).await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn publish_share(&self, node_id: &str, share: Option<f64>) -> Result<(), StoreError> {
        let node = node_id.to_owned();
        self.run("publish this node's share", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(PUBLISH_SHARE).await?;
                c.execute(&statement, &[&node, &share]).await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        node_id: &str,
        version: &str,
        started_ms: u64,
        stopped: bool,
    ) -> Result<(), StoreError> {
        let (node, version, started) = (node_id.to_owned(), version.to_owned(), started_ms as f64);
        self.run("write a heartbeat", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(HEARTBEAT).await?;
                c.execute(&statement, &[&node, &version, &started, &stopped])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, StoreError> {
        self.run("read the nodes", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(NODES).await?;
                let rows = c.query(&statement, &[]).await?;
                rows.iter()
                    .map(|row| {
                        Ok(NodeStatus {
                            node_id: row.try_get(0)?,
                            version: row.try_get(1)?,
                            started_ms: to_u64(row.try_get(2)?, "node start")?,
                            heartbeat_age_ms: to_u64(row.try_get(3)?, "heartbeat age")?,
                            stopped: row.try_get(4)?,
                            lanes_held: row.try_get(5)?,
                            leases_overdue: to_u64(row.try_get(6)?, "overdue leases")?,
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    pub async fn claim_chore(
        &self,
        name: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<bool, StoreError> {
        let (name, owner, ms) = (name.to_owned(), owner.to_owned(), lease_ms as f64);
        self.run("claim a chore", Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(CLAIM_CHORE).await?;
                Ok(c.query_opt(&statement, &[&name, &owner, &ms])
                    .await?
                    .is_some())
            })
        })
        .await
    }
}

/// [`SharedLimits`] from the [`LIMITS`] columns starting at `at`.
pub(super) fn limits_from(row: &Row, at: usize) -> Result<SharedLimits, OpError> {
    Ok(SharedLimits {
        rate_limited: to_u64(row.try_get(at)?, "rate-limit count")?,
        pause_left_ms: to_u64(row.try_get(at + 1)?, "pause")?,
        share_per_s: row.try_get(at + 2)?,
        probe_owner: row.try_get(at + 3)?,
        probe_left_ms: to_u64(row.try_get(at + 4)?, "probe time")?,
        limited_ms_ago: row
            .try_get::<_, Option<i64>>(at + 5)?
            .map(|ms| to_u64(ms, "time since the latest 429"))
            .transpose()?,
    })
}
