//! Delivery lanes on PostgreSQL, shared by every node (see `store::lanes`). The database's clock
//! decides expiry, so nodes' clocks need not agree.

use tokio_postgres::Row;

use super::cluster::{LIMITS, LIMITS_COLUMNS, limits_from};
use super::outbox::{HEAD_SQL, entry_from};
use super::{Access, OpError, PgStore, to_i64, to_u64};
use crate::store::{Claim, Lease, Origin, StoreError};

/// A lane is claimable when unleased, leased to the claimer (a renewal), or past its lease; the
/// fence grows at every claim. The claim waits for a transaction that holds the lane row (an
/// accept of the same user committing on another node) rather than skipping it, so a user just
/// handed to this node is not passed over. The head is read in the same statement: one round
/// trip from "user ready" to "entry in hand", with the rate limit the nodes share. The head may
/// be a dead entry holding the lane: delivery then leaves the user to the operator. Its snapshot predates a wait for the lane, so it
/// may miss an entry committed during that wait; `RELEASE` sees it and the user goes again.
pub(super) static CLAIM_HEAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH claimed AS (UPDATE lanes SET lease_owner = $2, \
         lease_until = now() + $3 * interval '1 millisecond', fence = fence + 1 \
         WHERE user_id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= now()) \
         RETURNING fence, (extract(epoch FROM lease_until) * 1000)::bigint AS until_ms) \
         SELECT head.*, claimed.fence, claimed.until_ms, {LIMITS} FROM claimed CROSS JOIN control \
         LEFT JOIN LATERAL ({}) head ON true",
        *HEAD_SQL
    )
});

/// Hands the lane back, not ready for other nodes' polls before `$3` ms (a backoff), and says
/// whether the head of the user's queue is pending (the statement's snapshot is taken after the
/// release's own).
static RELEASE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH released AS (UPDATE lanes SET lease_owner = NULL, lease_until = NULL, \
         ready_at = now() + $3 * interval '1 millisecond' WHERE user_id = $1 AND fence = $2) \
         SELECT coalesce((SELECT head.state = 'pending' FROM ({}) head), false)",
        *HEAD_SQL
    )
});

/// Extends a lease that still holds: same fence, not yet run out.
const RENEW: &str = "UPDATE lanes SET lease_until = now() + $3 * interval '1 millisecond' \
     WHERE user_id = $1 AND fence = $2 AND lease_until > now() \
     RETURNING (extract(epoch FROM lease_until) * 1000)::bigint";

/// Users with pending work that this node may claim now, with the origin of each one's head:
/// driven by the pending rows (a partial index), not by every lane ever created. A user whose
/// lane a dead entry holds (an older one) is left to the operator.
const CLAIMABLE: &str = "SELECT p.user_id, p.origin FROM \
     (SELECT DISTINCT ON (user_id) user_id, id, origin FROM outbox WHERE state = 'pending' \
      ORDER BY user_id, id) p JOIN lanes l USING (user_id) \
     WHERE l.ready_at <= now() AND (l.lease_owner IS NULL OR l.lease_owner = $1 OR l.lease_until <= now()) \
     AND NOT EXISTS (SELECT 1 FROM outbox h WHERE h.user_id = p.user_id AND h.holds_lane \
     AND h.id < p.id) \
     LIMIT $2";

fn lease_from(row: &Row, at: usize, user: String, owner: String) -> Result<Lease, OpError> {
    Ok(Lease {
        fence: to_u64(row.try_get(at)?, "lane fence")?,
        until_ms: to_u64(row.try_get(at + 1)?, "lane lease time")?,
        user_id: user,
        owner,
    })
}

/// A row of [`CLAIM_HEAD_SQL`] as the claim it made.
pub(super) fn claim_from(row: &Row, user: String, holder: String) -> Result<Claim, OpError> {
    let head = match row.try_get::<_, Option<i64>>(0)? {
        Some(_) => Some(entry_from(row)?),
        None => None,
    };
    let at = row.len() - 2 - LIMITS_COLUMNS;
    Ok(Claim {
        lease: lease_from(row, at, user, holder)?,
        head,
        limits: limits_from(row, at + 2)?,
    })
}

/// [`RELEASE`] on a connection the caller holds: the lane handed back if `lease` still holds
/// it, ready for other nodes' polls in `ready_in_ms`; whether the user's head is pending.
pub(super) async fn release_on(
    client: &deadpool_postgres::Object,
    lease: &Lease,
    ready_in_ms: u64,
) -> Result<bool, OpError> {
    let (fence, ready_in) = (to_i64(lease.fence), ready_in_ms as f64);
    let release = client.prepare_cached(&RELEASE).await?;
    Ok(client
        .query_one(&release, &[&lease.user_id, &fence, &ready_in])
        .await?
        .try_get(0)?)
}

impl PgStore {
    pub async fn claim_lane(
        &self,
        user_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        Ok(self
            .claim_head(user_id, owner, lease_ms)
            .await?
            .map(|claim| claim.lease))
    }

    pub async fn claim_head(
        &self,
        user_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<Option<Claim>, StoreError> {
        let (user, holder) = (user_id.to_owned(), owner.to_owned());
        let ms = lease_ms as f64;
        self.run("claim a delivery lane", Access::Write, move |c| {
            Box::pin(async move {
                let claim = c.prepare_cached(&CLAIM_HEAD_SQL).await?;
                match c.query_opt(&claim, &[&user, &holder, &ms]).await? {
                    Some(row) => Ok(Some(claim_from(&row, user, holder)?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    pub async fn release_lane(&self, lease: &Lease, ready_in_ms: u64) -> Result<bool, StoreError> {
        let lease = lease.clone();
        self.run("hand back a delivery lane", Access::Write, move |c| {
            Box::pin(async move { release_on(&c, &lease, ready_in_ms).await })
        })
        .await
    }

    pub async fn renew_lane(
        &self,
        lease: &Lease,
        lease_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (user, fence) = (lease.user_id.clone(), to_i64(lease.fence));
        let ms = lease_ms as f64;
        self.run("renew a delivery lease", Access::Write, move |c| {
            Box::pin(async move {
                let renew = c.prepare_cached(RENEW).await?;
                match c.query_opt(&renew, &[&user, &fence, &ms]).await? {
                    Some(row) => Ok(Some(to_u64(row.try_get(0)?, "lane lease time")?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    pub async fn claimable_users(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<(String, Origin)>, StoreError> {
        let holder = owner.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("look for claimable work", Access::Read, move |c| {
            Box::pin(async move {
                let query = c.prepare_cached(CLAIMABLE).await?;
                let rows = c.query(&query, &[&holder, &limit]).await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.try_get::<_, String>(0)?,
                            Origin::from_name(row.try_get(1)?)?,
                        ))
                    })
                    .collect()
            })
        })
        .await
    }
}
