//! The outbox on PostgreSQL: one row per entry; a user's queue is its pending rows in id order
//! and the dead row that holds its lane (`holds_lane`), each a partial index, as are the dead
//! and delivered views. Each change is one statement, so an entry's state and its place in the
//! queue change together.

use tokio_postgres::Row;

use super::lanes::{CLAIM_HEAD_SQL, claim_from, release_on};
use super::records::json;
use super::{Access, OpError, PgStore, durable_transaction, to_i64, to_u64};
use crate::store::{
    Accepted, AuditKey, Call, Claim, ClaimRequest, Entry, EntryId, EntryState, Filter, Lease,
    NewEntry, Origin, Progress, Remembered, StoreError, UserMapChange,
};

pub(super) const COLUMNS: &str = "id, created_ms, user_id, template, command, call::text, client, state, \
                       ended_ms, subscriber_id, webex_status, dead_reason, attempts, last_error, \
                       tracking_id, origin";

/// The head of user `$1`'s queue ([`crate::store::Store::head_of`]): its oldest pending entry
/// or the dead entry that holds its lane, whichever is older, each found by its own partial
/// index (an `OR` of the two would read the user's whole history).
pub(super) static HEAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "(SELECT {COLUMNS} FROM outbox WHERE user_id = $1 AND state = 'pending' ORDER BY id LIMIT 1) \
         UNION ALL (SELECT {COLUMNS} FROM outbox WHERE user_id = $1 AND holds_lane ORDER BY id LIMIT 1) \
         ORDER BY id LIMIT 1"
    )
});

/// Rows deleted per statement when pruning: a long delete would hold back the commits that
/// acknowledgements wait for.
const PRUNE_BATCH: i64 = 5000;

/// A command's records and entries as one statement, committed on its own with
/// `synchronous_commit = on`: one statement instead of seven (begin, the setting, profile,
/// template, lanes, entries, commit) is what PostgreSQL spends most of a command's CPU on.
///
/// The sub-statements of a `WITH` run in no set order, so the order that matters is made by
/// data: `locked` counts the lanes the statement created, and everything else reads `locked`,
/// so the lanes are created or locked first. A lane that exists is locked by the upsert's
/// `DO UPDATE … WHERE false`: PostgreSQL locks the conflicting row before it evaluates the
/// condition, and the false condition spares a new row version (its dead tuple and WAL) on
/// every command of a known user. The lanes are taken in user order (two statements
/// sharing lanes cannot deadlock) before any entry id is drawn: a second command for a user
/// (on another node) waits here until the first has committed, so its entries' ids are drawn
/// after the first's are visible, and per user id order is commit order — delivery, which
/// reads a user's head by id, never finds an entry before an older one still committing. The
/// profile, template and customer are written under those locks too, so they follow the same
/// order. `synchronous_commit` is set for the statement's own transaction (`set_config(...,
/// true)`), which ends when the statement does; the main query reads `locked`, so the setting
/// is made even when nothing else is written, and its value comes back to be checked. The
/// command's audit record goes in with it, naming the entry (a command has at most one).
const ACCEPT: &str = "\
WITH durable AS MATERIALIZED (SELECT set_config('synchronous_commit', 'on', true) AS setting), \
lanes AS (INSERT INTO lanes (user_id) SELECT u FROM unnest($9::text[]) AS u ORDER BY u \
    ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id WHERE false RETURNING 1), \
locked AS MATERIALIZED (SELECT (SELECT count(*) FROM lanes) AS lanes, \
    (SELECT setting FROM durable) AS setting), \
profile AS (INSERT INTO profiles (user_id, profile) SELECT $2, $3::text::json FROM locked \
    WHERE $2::text IS NOT NULL ON CONFLICT (user_id) DO UPDATE SET profile = excluded.profile), \
template AS (INSERT INTO user_map (user_id, template) SELECT $4, $5 FROM locked \
    WHERE $4::text IS NOT NULL ON CONFLICT (user_id) DO UPDATE SET template = excluded.template \
    WHERE user_map.template IS DISTINCT FROM excluded.template), \
customer AS (INSERT INTO customers (service_provider_id, group_id, record) \
    SELECT $6, $7, $8::text::json FROM locked WHERE $6::text IS NOT NULL \
    ON CONFLICT (service_provider_id, group_id) DO UPDATE SET record = excluded.record), \
entries AS (INSERT INTO outbox (created_ms, user_id, template, command, call, client, origin, state) \
    SELECT $1, e.user_id, e.template, e.command, e.call::json, e.client, e.origin, 'pending' \
    FROM locked, unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[]) \
        WITH ORDINALITY AS e (user_id, template, command, call, client, origin, n) \
    ORDER BY e.n RETURNING id), \
audited AS (INSERT INTO audit (at_ms, user_id, record) \
    SELECT $16, $17, CASE WHEN entry.id IS NULL THEN $18::text::json \
        ELSE ($18::text::jsonb || jsonb_build_object('outbox_id', entry.id))::json END \
    FROM locked, (SELECT min(id) AS id FROM entries) AS entry WHERE $18::text IS NOT NULL RETURNING id) \
SELECT locked.setting, entries.id, (SELECT id FROM audited) FROM locked LEFT JOIN entries ON true \
ORDER BY entries.id";

/// [`PgStore::finish_try`]: the entry's end under the lease's fence (as `change` writes it),
/// the user map as the end changes it, and the lane handed back ready at once, in one
/// statement; then whether the user has pending work besides this entry (the statement's
/// snapshot still shows it pending), never after a dead end, which holds the lane. An entry another node's accept adds while this statement
/// waits for the lane is not seen here; that node hands its user to its own engine, and the
/// poll finds it otherwise.
static FINISH_TRY_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ended AS ({}), \
         mapped AS (INSERT INTO user_map (user_id, subscriber_id, template) \
         SELECT user_id, $10, $11 FROM ended WHERE $10::text IS NOT NULL \
         ON CONFLICT (user_id) DO UPDATE SET subscriber_id = excluded.subscriber_id, \
         template = excluded.template WHERE (user_map.subscriber_id, user_map.template) \
         IS DISTINCT FROM (excluded.subscriber_id, excluded.template)), \
         forgotten AS (UPDATE user_map SET subscriber_id = NULL \
         WHERE $12 AND user_id = (SELECT user_id FROM ended) AND subscriber_id IS NOT NULL), \
         released AS (UPDATE lanes SET lease_owner = NULL, lease_until = NULL, ready_at = now() \
         WHERE user_id = (SELECT user_id FROM ended) AND fence = $9) \
         SELECT ended.*, $2 <> 'dead' AND EXISTS (SELECT 1 FROM outbox \
         WHERE user_id = ended.user_id AND state = 'pending' AND id <> ended.id) FROM ended",
        change_sql(END, 9)
    )
});

/// The columns an entry's end sets ([`ChangeParams::End`]); a dead end holds the lane.
const END: &str = "state = $2, ended_ms = $3, subscriber_id = $4, webex_status = $5, \
     dead_reason = $6, attempts = attempts + $7, tracking_id = coalesce($8, tracking_id), \
     holds_lane = ($2 = 'dead')";

/// A change of one entry by id (`$1`) that returns it as it is now; under a lease (its fence
/// in parameter `fence_param`, NULL for none) only while the lease still holds the user's lane:
/// its fence unchanged and its time not run out.
fn change_sql(set: &str, fence_param: usize) -> String {
    format!(
        "UPDATE outbox SET {set} WHERE id = $1 AND (${fence_param}::bigint IS NULL OR EXISTS \
         (SELECT 1 FROM lanes WHERE lanes.user_id = outbox.user_id \
         AND lanes.fence = ${fence_param} AND lanes.lease_until > now())) RETURNING {COLUMNS}"
    )
}

pub(super) const SAVE_PROFILE: &str = "INSERT INTO profiles (user_id, profile) VALUES ($1, $2::text::json) \
     ON CONFLICT (user_id) DO UPDATE SET profile = excluded.profile";

pub(super) const RECORD_CUSTOMER: &str = "INSERT INTO customers (service_provider_id, group_id, record) \
     VALUES ($1, $2, $3::text::json) \
     ON CONFLICT (service_provider_id, group_id) DO UPDATE SET record = excluded.record";

pub(super) fn entry_from(row: &Row) -> Result<Entry, OpError> {
    let state: &str = row.try_get(7)?;
    let ended_ms: Option<i64> = row.try_get(8)?;
    let ended = || -> Result<u64, StoreError> {
        to_u64(ended_ms.unwrap_or_default(), "outbox entry end time")
    };
    let state = match state {
        "pending" => EntryState::Pending,
        "delivered" => EntryState::Delivered {
            at_ms: ended()?,
            subscriber_id: row.try_get(9)?,
            webex_status: row.try_get(10)?,
        },
        "dead" => EntryState::Dead {
            at_ms: ended()?,
            reason: row.try_get::<_, Option<String>>(11)?.unwrap_or_default(),
        },
        other => {
            return Err(OpError::Store(StoreError::Corrupt {
                what: "outbox entry state",
                reason: format!("unknown state {other:?}"),
            }));
        }
    };
    let call: String = row.try_get(5)?;
    Ok(Entry {
        id: to_u64(row.try_get(0)?, "outbox entry id")?,
        created_ms: to_u64(row.try_get(1)?, "outbox entry time")?,
        new: NewEntry {
            user_id: row.try_get(2)?,
            template: row.try_get(3)?,
            command: row.try_get(4)?,
            call: serde_json::from_str::<Call>(&call).map_err(|e| StoreError::Corrupt {
                what: "outbox entry call",
                reason: e.to_string(),
            })?,
            client: row.try_get(6)?,
            origin: Origin::from_name(row.try_get(15)?)?,
        },
        state,
        attempts: u32::try_from(row.try_get::<_, i32>(12)?).unwrap_or_default(),
        last_error: row.try_get(13)?,
        tracking_id: row.try_get(14)?,
    })
}

/// The columns an [`EntryState`] is kept in: state, ended_ms, subscriber_id, webex_status,
/// dead_reason.
type StateColumns = (
    &'static str,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn state_columns(state: &EntryState) -> StateColumns {
    match state {
        EntryState::Pending => ("pending", None, None, None, None),
        EntryState::Delivered {
            at_ms,
            subscriber_id,
            webex_status,
        } => (
            "delivered",
            Some(to_i64(*at_ms)),
            subscriber_id.clone(),
            webex_status.clone(),
            None,
        ),
        EntryState::Dead { at_ms, reason } => (
            "dead",
            Some(to_i64(*at_ms)),
            None,
            None,
            Some(reason.clone()),
        ),
    }
}

fn encode_call(call: &Call) -> Result<String, StoreError> {
    serde_json::to_string(call)
        .map_err(|e| StoreError::Io(format!("cannot encode a Webex call: {e}")))
}

fn filter_clause(filter: Filter) -> &'static str {
    match filter {
        Filter::All => "true",
        Filter::Active => "state <> 'delivered'",
        Filter::Pending => "state = 'pending'",
        Filter::Dead => "state = 'dead'",
        Filter::Delivered => "state = 'delivered'",
    }
}

/// The rows of a committed [`ACCEPT`] as the entries' ids and the audit record's, checked: a
/// commit without `synchronous_commit = on`, a missing entry or a missing audit record is not
/// acknowledged.
fn committed(
    rows: &[Row],
    count: usize,
    audit_expected: bool,
) -> Result<(Vec<EntryId>, Option<u64>), OpError> {
    let mut ids = Vec::with_capacity(count);
    let mut audited = None;
    for row in rows {
        if let Some(id) = row.try_get::<_, Option<i64>>(2)? {
            audited = Some(to_u64(id, "audit record id")?);
        }
        let setting: String = row.try_get(0)?;
        if setting != "on" {
            return Err(OpError::from(StoreError::Io(format!(
                "PostgreSQL committed a command with synchronous_commit = {setting}, not on: not acknowledged"
            ))));
        }
        if let Some(id) = row.try_get::<_, Option<i64>>(1)? {
            ids.push(to_u64(id, "outbox entry id")?);
        }
    }
    if ids.len() != count {
        return Err(OpError::from(StoreError::Io(format!(
            "PostgreSQL stored {} of {count} outbox entries of a command: not acknowledged",
            ids.len()
        ))));
    }
    if audited.is_none() && audit_expected {
        return Err(OpError::from(StoreError::Io(
            "PostgreSQL did not store a command's audit record: not acknowledged".to_owned(),
        )));
    }
    Ok((ids, audited))
}

impl PgStore {
    /// New entries, in order, in one durable transaction.
    pub async fn enqueue(
        &self,
        entries: Vec<NewEntry>,
        now_ms: u64,
    ) -> Result<Vec<EntryId>, StoreError> {
        let (ids, _, _) = self
            .write_durably(Remembered::default(), entries, now_ms, None)
            .await?;
        Ok(ids)
    }

    /// [`crate::store::Store::accept`]: a command's records and its entry.
    pub async fn accept(
        &self,
        remembered: Remembered,
        entry: Option<NewEntry>,
        now_ms: u64,
        claim: Option<&ClaimRequest>,
    ) -> Result<Accepted, StoreError> {
        let at_ms = remembered.audit.as_ref().map(|record| record.at_ms);
        let (ids, audit, claim) = self
            .write_durably(remembered, entry.into_iter().collect(), now_ms, claim)
            .await?;
        Ok(Accepted {
            entry: ids.into_iter().next(),
            audit: at_ms.zip(audit).map(|(at_ms, id)| AuditKey { at_ms, id }),
            claim,
        })
    }

    /// Records and entries in one statement ([`ACCEPT`]) whose transaction commits with
    /// `synchronous_commit = on` before the answer comes: the commit is one round trip away,
    /// and an error — a connection lost during the commit included — is never taken for it.
    ///
    /// With `claim`, the claim of the (one) entry's lane is pipelined behind it
    /// ([`CLAIM_HEAD_SQL`], as delivery sends it): sent without waiting for the accept's
    /// answer, run by PostgreSQL after the accept has committed, in a statement of its own
    /// whose snapshot sees the entry and every older one of its user. A claim that fails or
    /// finds the lane held gives none, and delivery claims as it would have.
    async fn write_durably(
        &self,
        remembered: Remembered,
        entries: Vec<NewEntry>,
        now_ms: u64,
        claim: Option<&ClaimRequest>,
    ) -> Result<(Vec<EntryId>, Option<u64>, Option<Claim>), StoreError> {
        let (profile_user, profile) = match &remembered.profile {
            Some(p) => (
                Some(p.user_id.clone()),
                Some(
                    serde_json::to_string(p)
                        .map_err(|e| StoreError::Io(format!("cannot encode a profile: {e}")))?,
                ),
            ),
            None => (None, None),
        };
        let (service_provider, group, customer) = match &remembered.customer {
            Some(c) => (
                Some(c.service_provider_id.clone()),
                c.group_id.clone(),
                Some(
                    serde_json::to_string(c)
                        .map_err(|e| StoreError::Io(format!("cannot encode a customer: {e}")))?,
                ),
            ),
            None => (None, None, None),
        };
        let (template_user, template) = remembered.template.unzip();
        let (audit_at, audit_user, audit) = match &remembered.audit {
            Some(record) => (
                Some(to_i64(record.at_ms)),
                record.user_id().map(str::to_owned),
                Some(json(record, "an audit record")?),
            ),
            None => (None, None, None),
        };
        let count = entries.len();
        let mut columns: [Vec<String>; 6] = Default::default();
        for e in entries {
            let call = encode_call(&e.call)?;
            for (column, value) in columns.iter_mut().zip([
                e.user_id,
                e.template,
                e.command,
                call,
                e.client,
                e.origin.name().to_owned(),
            ]) {
                column.push(value);
            }
        }
        let mut lane_users = columns[0].clone();
        lane_users.sort_unstable();
        lane_users.dedup();
        let created = to_i64(now_ms);
        let claim = match (claim, columns[0].as_slice()) {
            (Some(claim), [user]) => {
                Some((user.clone(), claim.owner.clone(), claim.lease_ms as f64))
            }
            _ => None,
        };
        let audit_expected = audit.is_some();
        self.run("store the command", Access::Write, move |c| {
            Box::pin(async move {
                let accept = c.prepare_cached(ACCEPT).await?;
                let claim = match claim {
                    Some(claim) => Some((c.prepare_cached(&CLAIM_HEAD_SQL).await?, claim)),
                    None => None,
                };
                let [users, templates, commands, calls, clients, origins] = &columns;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 18] = [
                    &created,
                    &profile_user,
                    &profile,
                    &template_user,
                    &template,
                    &service_provider,
                    &group,
                    &customer,
                    &lane_users,
                    users,
                    templates,
                    commands,
                    calls,
                    clients,
                    origins,
                    &audit_at,
                    &audit_user,
                    &audit,
                ];
                let accepting = c.query(&accept, &params);
                // `join` sends the accept first: tokio-postgres writes a request when its future
                // is first polled, and PostgreSQL answers requests in the order they came.
                let (rows, claimed) = match &claim {
                    Some((claim_head, (user, owner, ms))) => {
                        let (rows, claimed) = futures_util::future::join(
                            accepting,
                            c.query_opt(claim_head, &[user, owner, ms]),
                        )
                        .await;
                        let claimed = claimed.map_err(OpError::from).and_then(|row| {
                            row.map(|row| claim_from(&row, user.clone(), owner.clone()))
                                .transpose()
                        });
                        (rows, claimed)
                    }
                    None => (accepting.await, Ok(None)),
                };
                let claimed = claimed.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "the claim sent with an accept failed; delivery claims the lane itself");
                    None
                });
                match rows
                    .map_err(OpError::from)
                    .and_then(|rows| committed(&rows, count, audit_expected))
                {
                    Ok((ids, audited)) => Ok((ids, audited, claimed)),
                    Err(e) => {
                        // Not acknowledged: a lane claimed for nothing is handed back rather
                        // than kept from the other nodes until its lease runs out.
                        if let Some(claim) = claimed
                            && let Err(release) = release_on(&c, &claim.lease, 0).await
                        {
                            tracing::debug!(user_id = %claim.lease.user_id, error = %release, "cannot hand back a lane claimed for a command not accepted; its lease runs out");
                        }
                        Err(e)
                    }
                }
            })
        })
        .await
    }

    /// Rows of `sql`, which selects [`COLUMNS`], as entries.
    async fn entries(
        &self,
        what: &'static str,
        sql: String,
        id: Option<i64>,
        text: Option<String>,
    ) -> Result<Vec<Entry>, StoreError> {
        self.run(what, Access::Read, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(&sql).await?;
                let rows = match (&id, &text) {
                    (Some(id), _) => c.query(&statement, &[id]).await?,
                    (None, Some(text)) => c.query(&statement, &[text]).await?,
                    (None, None) => c.query(&statement, &[]).await?,
                };
                rows.iter().map(entry_from).collect()
            })
        })
        .await
    }

    /// A change of one entry by id, returning it as it is now; `NotFound` when there is none.
    ///
    /// Under a lease, the row changes only while the lease still holds the user's lane (its
    /// fence unchanged and its time not run out), checked in the same statement; a refused
    /// change is [`StoreError::LeaseLost`].
    async fn change(
        &self,
        what: &'static str,
        set: &'static str,
        id: EntryId,
        params: ChangeParams,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        let fence_param = match params {
            ChangeParams::Text(_) => 3,
            ChangeParams::End(..) => 9,
        };
        let sql = change_sql(set, fence_param);
        let key = to_i64(id);
        let fence = lease.map(|l| to_i64(l.fence));
        let changed = self
            .run(what, Access::Write, move |c| {
                Box::pin(async move {
                    let statement = c.prepare_cached(&sql).await?;
                    let row = match &params {
                        ChangeParams::Text(text) => {
                            c.query_opt(&statement, &[&key, text, &fence]).await?
                        }
                        ChangeParams::End(state, last_call) => {
                            let (name, ended, subscriber, status, reason) = state;
                            let counted = i32::from(last_call.is_some());
                            c.query_opt(
                                &statement,
                                &[
                                    &key, name, ended, subscriber, status, reason, &counted,
                                    last_call, &fence,
                                ],
                            )
                            .await?
                        }
                    };
                    row.as_ref().map(entry_from).transpose()
                })
            })
            .await?;
        match (changed, lease) {
            (Some(entry), _) => Ok(entry),
            // Delivery writes only entries it has read, which stay until pruned long after.
            (None, Some(lease)) => Err(crate::store::lanes::lease_lost(lease)),
            (None, None) => Err(StoreError::NotFound(id)),
        }
    }

    pub async fn entry(&self, id: EntryId) -> Result<Option<Entry>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM outbox WHERE id = $1");
        Ok(self
            .entries("read the outbox", sql, Some(to_i64(id)), None)
            .await?
            .pop())
    }

    pub async fn progress(&self, id: EntryId) -> Result<Option<Progress>, StoreError> {
        Ok(self.entry(id).await?.map(|entry| Progress {
            state: entry.state,
            tracking_id: entry.tracking_id,
        }))
    }

    pub async fn head_of(&self, user_id: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .entries(
                "read the outbox",
                HEAD_SQL.clone(),
                None,
                Some(user_id.to_owned()),
            )
            .await?
            .pop())
    }

    pub async fn has_queued(&self, user_id: &str) -> Result<bool, StoreError> {
        let user = user_id.to_owned();
        self.run("read the outbox", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM outbox WHERE user_id = $1 AND state = 'pending') \
                         OR EXISTS (SELECT 1 FROM outbox WHERE user_id = $1 AND holds_lane)",
                    )
                    .await?;
                Ok(c.query_one(&statement, &[&user]).await?.try_get(0)?)
            })
        })
        .await
    }

    pub async fn record_attempt(
        &self,
        id: EntryId,
        tracking_id: &str,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.change(
            "record a delivery attempt",
            "attempts = attempts + 1, tracking_id = $2",
            id,
            ChangeParams::Text(tracking_id.to_owned()),
            lease,
        )
        .await
    }

    pub async fn record_failure(
        &self,
        id: EntryId,
        error: &str,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.change(
            "record a failed attempt",
            "last_error = $2",
            id,
            ChangeParams::Text(error.to_owned()),
            lease,
        )
        .await
    }

    pub async fn set_webex_status(&self, id: EntryId, status: &str) -> Result<Entry, StoreError> {
        self.change(
            "record a subscriber status",
            "webex_status = CASE WHEN state = 'delivered' THEN $2 ELSE webex_status END",
            id,
            ChangeParams::Text(status.to_owned()),
            None,
        )
        .await
    }

    pub async fn finish(
        &self,
        id: EntryId,
        state: EntryState,
        last_call: Option<&str>,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.change(
            "record the end of an entry",
            END,
            id,
            ChangeParams::End(state_columns(&state), last_call.map(str::to_owned)),
            lease,
        )
        .await
    }

    pub async fn finish_try(
        &self,
        id: EntryId,
        state: EntryState,
        last_call: Option<&str>,
        lease: &Lease,
        user_map: Option<UserMapChange>,
    ) -> Result<(Entry, bool), StoreError> {
        let (key, fence) = (to_i64(id), to_i64(lease.fence));
        let (name, ended, subscriber, status, reason) = state_columns(&state);
        let (counted, last_call) = (i32::from(last_call.is_some()), last_call.map(str::to_owned));
        let (map_to, template, forget) = match user_map {
            Some(UserMapChange::Map {
                subscriber_id,
                template,
            }) => (Some(subscriber_id), Some(template), false),
            Some(UserMapChange::Forget) => (None, None, true),
            None => (None, None, false),
        };
        let ended_try = self
            .run(
                "record the end of a delivery try",
                Access::Write,
                move |c| {
                    Box::pin(async move {
                        let statement = c.prepare_cached(&FINISH_TRY_SQL).await?;
                        let Some(row) = c
                            .query_opt(
                                &statement,
                                &[
                                    &key,
                                    &name,
                                    &ended,
                                    &subscriber,
                                    &status,
                                    &reason,
                                    &counted,
                                    &last_call,
                                    &fence,
                                    &map_to,
                                    &template,
                                    &forget,
                                ],
                            )
                            .await?
                        else {
                            return Ok(None);
                        };
                        let more: bool = row.try_get(row.len() - 1)?;
                        Ok(Some((entry_from(&row)?, more)))
                    })
                },
            )
            .await?;
        // Delivery ends only entries it has read, which stay until pruned long after.
        ended_try.ok_or_else(|| crate::store::lanes::lease_lost(lease))
    }

    pub async fn retry(&self, id: EntryId) -> Result<bool, StoreError> {
        let (key, now) = (to_i64(id), to_i64(crate::store::now_ms()));
        self.run(
            "put an entry back in its queue",
            Access::Write,
            move |mut c| {
                Box::pin(async move {
                    let tx = durable_transaction(&mut c).await?;
                    let revived = tx
                    .execute(
                        "UPDATE outbox SET state = 'pending', ended_ms = NULL, dead_reason = NULL, \
                         last_error = NULL, holds_lane = false, created_ms = $2 \
                         WHERE id = $1 AND state = 'dead'",
                        &[&key, &now],
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(revived == 1)
                })
            },
        )
        .await
    }

    pub async fn drop_entry(&self, id: EntryId) -> Result<Option<Entry>, StoreError> {
        let key = to_i64(id);
        self.run("drop an entry", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let sql = format!("DELETE FROM outbox WHERE id = $1 RETURNING {COLUMNS}");
                let row = tx.query_opt(&sql, &[&key]).await?;
                tx.commit().await?;
                row.as_ref().map(entry_from).transpose()
            })
        })
        .await
    }

    pub async fn list(&self, filter: Filter, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM outbox WHERE {} ORDER BY id LIMIT {}",
            filter_clause(filter),
            to_i64(limit as u64)
        );
        self.entries("list the outbox", sql, None, None).await
    }

    pub async fn dead_count(&self) -> Result<usize, StoreError> {
        self.run("count dead entries", Access::Read, |c| {
            Box::pin(async move {
                let row = c
                    .query_one("SELECT count(*) FROM outbox WHERE state = 'dead'", &[])
                    .await?;
                Ok(usize::try_from(row.try_get::<_, i64>(0)?).unwrap_or_default())
            })
        })
        .await
    }

    pub async fn pending_summary(&self) -> Result<(u64, Option<u64>), StoreError> {
        self.run("count pending entries", Access::Read, |c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "SELECT count(*), (SELECT created_ms FROM outbox WHERE state = 'pending' \
                         ORDER BY id LIMIT 1) FROM outbox WHERE state = 'pending'",
                        &[],
                    )
                    .await?;
                let oldest = row
                    .try_get::<_, Option<i64>>(1)?
                    .map(|ms| to_u64(ms, "outbox entry time"))
                    .transpose()?;
                Ok((to_u64(row.try_get(0)?, "count")?, oldest))
            })
        })
        .await
    }

    pub async fn prune_finished(
        &self,
        cutoff_ms: u64,
        max_delivered: u64,
    ) -> Result<u64, StoreError> {
        let expired = self
            .prune_batches(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state <> 'pending' \
                 AND NOT holds_lane AND created_ms < $2 ORDER BY id LIMIT $1)",
                Some(to_i64(cutoff_ms)),
                None,
            )
            .await?;
        let excess = self
            .run("count the delivered history", Access::Read, |c| {
                Box::pin(async move {
                    let row = c
                        .query_one("SELECT count(*) FROM outbox WHERE state = 'delivered'", &[])
                        .await?;
                    Ok(row.try_get::<_, i64>(0)?)
                })
            })
            .await?
            .saturating_sub(to_i64(max_delivered));
        let capped = self
            .prune_batches(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'delivered' \
                 ORDER BY id LIMIT $1)",
                None,
                Some(excess),
            )
            .await?;
        Ok(expired + capped)
    }

    /// Run a `DELETE … LIMIT $1` (`$2` its bound, if any) in batches until it removes less than
    /// a batch or `total` rows are gone.
    pub(super) async fn prune_batches(
        &self,
        sql: &'static str,
        bound: Option<i64>,
        total: Option<i64>,
    ) -> Result<u64, StoreError> {
        let mut removed: u64 = 0;
        loop {
            let left = total.map_or(PRUNE_BATCH, |t| t.saturating_sub(to_i64(removed)));
            if left <= 0 {
                return Ok(removed);
            }
            let batch = left.min(PRUNE_BATCH);
            let gone = self
                .run("prune old records", Access::Write, move |c| {
                    Box::pin(async move {
                        Ok(match &bound {
                            Some(bound) => c.execute(sql, &[&batch, bound]).await?,
                            None => c.execute(sql, &[&batch]).await?,
                        })
                    })
                })
                .await?;
            removed += gone;
            if gone < batch as u64 {
                return Ok(removed);
            }
        }
    }
}

/// The parameters of a change after the id.
enum ChangeParams {
    Text(String),
    End(StateColumns, Option<String>),
}
