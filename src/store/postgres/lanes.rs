//! Delivery lanes on PostgreSQL, shared by every node (see `store::lanes`): a claim takes a lane
//! whose lease is free, its own or run out, skipping a row another node is claiming at that
//! moment, and raises the fence; the database's clock decides expiry, so nodes' clocks need not
//! agree.

use super::{Access, PgStore, to_i64, to_u64};
use crate::store::{Lease, StoreError};

/// The lane row exists for every user with an entry (enqueue creates it); a lane is claimable
/// when unleased, leased to the claimer, or past its lease.
const CLAIM: &str = "WITH free AS (SELECT user_id FROM lanes WHERE user_id = $1 \
     AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= now()) FOR UPDATE SKIP LOCKED) \
     UPDATE lanes SET lease_owner = $2, lease_until = now() + $3 * interval '1 millisecond', \
     fence = lanes.fence + 1 FROM free WHERE lanes.user_id = free.user_id \
     RETURNING lanes.fence, (extract(epoch FROM lanes.lease_until) * 1000)::bigint";

const RELEASE: &str = "UPDATE lanes SET lease_owner = NULL, lease_until = NULL \
     WHERE user_id = $1 AND fence = $2";

impl PgStore {
    pub async fn claim_lane(
        &self,
        user_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<Option<Lease>, StoreError> {
        let (user, holder) = (user_id.to_owned(), owner.to_owned());
        let ms = lease_ms as f64;
        self.run("claim a delivery lane", Access::Write, move |c| {
            Box::pin(async move {
                let claim = c.prepare_cached(CLAIM).await?;
                let Some(row) = c.query_opt(&claim, &[&user, &holder, &ms]).await? else {
                    return Ok(None);
                };
                Ok(Some(Lease {
                    fence: to_u64(row.try_get(0)?, "lane fence")?,
                    until_ms: to_u64(row.try_get(1)?, "lane lease time")?,
                    user_id: user,
                    owner: holder,
                }))
            })
        })
        .await
    }

    pub async fn release_lane(&self, lease: &Lease) -> Result<(), StoreError> {
        let (user, fence) = (lease.user_id.clone(), to_i64(lease.fence));
        self.run("hand back a delivery lane", Access::Write, move |c| {
            Box::pin(async move {
                let release = c.prepare_cached(RELEASE).await?;
                c.execute(&release, &[&user, &fence]).await?;
                Ok(())
            })
        })
        .await
    }
}
