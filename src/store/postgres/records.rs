//! The other records on PostgreSQL: user map, profiles, customers, audit (commands and tunnels
//! apart from unreadable documents, each capped), the token row and the last reconcile's counts. Records the domain keeps
//! as a whole are stored as the same JSON the sled backend writes, so `store copy` moves them
//! unchanged.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::outbox::{RECORD_CUSTOMER, SAVE_PROFILE};
use super::{Access, OpError, PgStore, durable_transaction, to_i64};
use crate::oci::UserProfile;
use crate::store::{
    AuditEvent, AuditKey, AuditQuery, AuditRecord, Customer, ReconcileReport, StoreError,
    TokenRecord, UserRecord,
};

/// Unknown documents kept at most (as on sled): a misbehaving AS cannot push real command
/// records out of the audit.
const MAX_DOCUMENTS: i64 = 1000;

pub(super) fn json<T: Serialize>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Io(format!("cannot encode {what}: {e}")))
}

fn parse<T: DeserializeOwned>(raw: &str, what: &'static str) -> Result<T, OpError> {
    serde_json::from_str(raw).map_err(|e| {
        OpError::Store(StoreError::Corrupt {
            what,
            reason: e.to_string(),
        })
    })
}

impl PgStore {
    /// One JSON record by a text key, or none.
    async fn record<T: DeserializeOwned + Send + 'static>(
        &self,
        sql: &'static str,
        key: Option<String>,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.run("read a record", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(sql).await?;
                let row = match &key {
                    Some(key) => c.query_opt(&statement, &[key]).await?,
                    None => c.query_opt(&statement, &[]).await?,
                };
                match row {
                    Some(row) => Ok(Some(parse(&row.try_get::<_, String>(0)?, what)?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    /// One write with text parameters (`None` is SQL NULL).
    async fn write(
        &self,
        what: &'static str,
        sql: &'static str,
        params: Vec<Option<String>>,
    ) -> Result<(), StoreError> {
        self.run(what, Access::Write, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(sql).await?;
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.execute(&statement, &refs).await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<UserRecord>, StoreError> {
        let user = user_id.to_owned();
        self.run("read the user map", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "SELECT subscriber_id, template FROM user_map WHERE user_id = $1",
                    )
                    .await?;
                let row = c.query_opt(&statement, &[&user]).await?;
                match row {
                    Some(row) => Ok(Some(UserRecord {
                        subscriber_id: row.try_get(0)?,
                        template: row.try_get(1)?,
                    })),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    pub async fn users(&self) -> Result<Vec<(String, UserRecord)>, StoreError> {
        self.run("read the user map", Access::Read, |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT user_id, subscriber_id, template FROM user_map \
                         ORDER BY user_id COLLATE \"C\"",
                        &[],
                    )
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.try_get(0)?,
                            UserRecord {
                                subscriber_id: row.try_get(1)?,
                                template: row.try_get(2)?,
                            },
                        ))
                    })
                    .collect()
            })
        })
        .await
    }

    /// One upsert: fields not given keep what is stored, so the handler (template) and delivery
    /// (subscriber id) never undo each other's change.
    pub async fn map_user(
        &self,
        user_id: &str,
        subscriber_id: Option<&str>,
        template: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(
            "write the user map",
            "INSERT INTO user_map (user_id, subscriber_id, template) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET \
             subscriber_id = coalesce(excluded.subscriber_id, user_map.subscriber_id), \
             template = coalesce(excluded.template, user_map.template) \
             WHERE (user_map.subscriber_id, user_map.template) IS DISTINCT FROM \
             (coalesce(excluded.subscriber_id, user_map.subscriber_id), \
             coalesce(excluded.template, user_map.template))",
            vec![
                Some(user_id.to_owned()),
                subscriber_id.map(str::to_owned),
                template.map(str::to_owned),
            ],
        )
        .await
    }

    pub async fn unmap_subscriber(&self, user_id: &str) -> Result<(), StoreError> {
        self.write(
            "write the user map",
            "UPDATE user_map SET subscriber_id = NULL WHERE user_id = $1 AND subscriber_id IS NOT NULL",
            vec![Some(user_id.to_owned())],
        )
        .await
    }

    pub async fn profile(&self, user_id: &str) -> Result<Option<UserProfile>, StoreError> {
        self.record(
            "SELECT profile::text FROM profiles WHERE user_id = $1",
            Some(user_id.to_owned()),
            "user profile",
        )
        .await
    }

    pub async fn save_profile(&self, profile: &UserProfile) -> Result<(), StoreError> {
        self.write(
            "write a profile",
            SAVE_PROFILE,
            vec![
                Some(profile.user_id.clone()),
                Some(json(profile, "a profile")?),
            ],
        )
        .await
    }

    pub async fn record_customer(&self, customer: &Customer) -> Result<(), StoreError> {
        self.write(
            "record a customer",
            RECORD_CUSTOMER,
            vec![
                Some(customer.service_provider_id.clone()),
                customer.group_id.clone(),
                Some(json(customer, "a customer")?),
            ],
        )
        .await
    }

    pub async fn customers(&self) -> Result<Vec<Customer>, StoreError> {
        self.run("read the customers", Access::Read, |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT record::text FROM customers ORDER BY \
                         service_provider_id COLLATE \"C\", group_id COLLATE \"C\" NULLS FIRST",
                        &[],
                    )
                    .await?;
                rows.iter()
                    .map(|row| parse(&row.try_get::<_, String>(0)?, "customer"))
                    .collect()
            })
        })
        .await
    }

    pub async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let raw = json(record, "an audit record")?;
        let at = to_i64(record.at_ms);
        match &record.event {
            // Inserted and capped in one statement: the delete sees the table without the new
            // row, hence the offset one short of the cap.
            AuditEvent::Document { .. } => {
                self.run("write an audit record", Access::Write, move |c| {
                    Box::pin(async move {
                        let statement = c
                            .prepare_cached(
                                "WITH added AS (INSERT INTO documents (at_ms, record) \
                                 VALUES ($1, $2::text::json)) \
                                 DELETE FROM documents WHERE id IN (SELECT id FROM documents \
                                 ORDER BY at_ms DESC, id DESC OFFSET $3)",
                            )
                            .await?;
                        c.execute(&statement, &[&at, &raw, &(MAX_DOCUMENTS - 1)])
                            .await?;
                        Ok(())
                    })
                })
                .await
            }
            _ => {
                let user = record.user_id().map(str::to_owned);
                self.queue_audit((None, at, user, raw)).await
            }
        }
    }

    pub async fn complete_audit(
        &self,
        key: AuditKey,
        record: &AuditRecord,
    ) -> Result<(), StoreError> {
        let raw = json(record, "an audit record")?;
        let id = to_i64(key.id);
        self.queue_audit((Some(id), to_i64(key.at_ms), None, raw))
            .await
    }

    /// Hand a record to [`PgStore::write_audit_batches`], starting it if it does not run, and
    /// wait until its batch is written.
    async fn queue_audit(&self, row: AuditRow) -> Result<(), StoreError> {
        let (sender, written) = oneshot::channel();
        let lead = {
            let mut queue = self.audit_queue();
            queue.waiting.push((row, sender));
            !std::mem::replace(&mut queue.writing, true)
        };
        if lead {
            let Some(runtime) = &self.inner.runtime else {
                return Err(StoreError::Io("the PostgreSQL store is closed".to_owned()));
            };
            runtime.spawn(self.clone().write_audit_batches());
        }
        written.await.unwrap_or_else(|_| {
            Err(StoreError::Io(
                "the audit writer stopped before writing a record".to_owned(),
            ))
        })
    }

    fn audit_queue(&self) -> std::sync::MutexGuard<'_, AuditQueue> {
        self.inner
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Write the queued audit records, all that are waiting in one statement, until none are:
    /// new records inserted, completed ones (with the id an accept gave them) replaced.
    /// A record queued while a batch is being written goes with the next: under load a batch
    /// holds the records of every request answered meanwhile, one statement for them all
    /// instead of one each; alone, a record is written at once. Runs as a task of its own, so
    /// a caller that goes away cannot leave the queue without a writer.
    async fn write_audit_batches(self) {
        loop {
            let batch = {
                let mut queue = self.audit_queue();
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let (rows, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let (mut ids, mut times, mut users, mut records) = (
                Vec::with_capacity(rows.len()),
                Vec::with_capacity(rows.len()),
                Vec::with_capacity(rows.len()),
                Vec::with_capacity(rows.len()),
            );
            for (id, at, user, raw) in rows {
                ids.push(id);
                times.push(at);
                users.push(user);
                records.push(raw);
            }
            let written = self
                .run("write audit records", Access::Write, move |c| {
                    Box::pin(async move {
                        let statement = c
                            .prepare_cached(
                                "WITH r AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], \
                                 $3::text[], $4::text[]) \
                                 WITH ORDINALITY AS r (id, at_ms, user_id, record, n)), \
                                 completed AS (UPDATE audit SET record = r.record::json FROM r \
                                 WHERE r.id IS NOT NULL AND audit.id = r.id) \
                                 INSERT INTO audit (at_ms, user_id, record) \
                                 SELECT at_ms, user_id, record::json FROM r \
                                 WHERE r.id IS NULL ORDER BY n",
                            )
                            .await?;
                        c.execute(&statement, &[&ids, &times, &users, &records])
                            .await?;
                        Ok(())
                    })
                })
                .await;
            for sender in senders {
                let _ = sender.send(written.clone());
            }
        }
    }

    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = to_i64(query.limit as u64);
        let sql = match (query.documents_only, &query.user_id) {
            // Documents carry no user: a user's view of them is empty, as on sled.
            (true, Some(_)) => return Ok(Vec::new()),
            (true, None) => {
                "SELECT record::text FROM documents ORDER BY at_ms DESC, id DESC LIMIT $1"
            }
            (false, None) => "SELECT record::text FROM audit ORDER BY at_ms DESC, id DESC LIMIT $1",
            (false, Some(_)) => {
                "SELECT record::text FROM audit WHERE user_id = $2 \
                 ORDER BY at_ms DESC, id DESC LIMIT $1"
            }
        };
        let user = query.user_id.clone();
        self.run("read the audit", Access::Read, move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(sql).await?;
                let rows = match &user {
                    Some(user) => c.query(&statement, &[&limit, user]).await?,
                    None => c.query(&statement, &[&limit]).await?,
                };
                rows.iter()
                    .map(|row| parse(&row.try_get::<_, String>(0)?, "audit record"))
                    .collect()
            })
        })
        .await
    }

    pub async fn prune_audit(&self, cutoff_ms: u64, max_records: u64) -> Result<u64, StoreError> {
        let expired = self
            .prune_batches(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < $2 \
                 ORDER BY at_ms, id LIMIT $1)",
                Some(to_i64(cutoff_ms)),
                None,
            )
            .await?;
        let excess = self
            .run("count the audit", Access::Read, |c| {
                Box::pin(async move {
                    Ok(c.query_one("SELECT count(*) FROM audit", &[])
                        .await?
                        .try_get::<_, i64>(0)?)
                })
            })
            .await?
            .saturating_sub(to_i64(max_records));
        let capped = self
            .prune_batches(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY at_ms, id LIMIT $1)",
                None,
                Some(excess),
            )
            .await?;
        Ok(expired + capped)
    }

    pub async fn token(&self) -> Result<Option<TokenRecord>, StoreError> {
        self.record("SELECT record::text FROM token", None, "token record")
            .await
    }

    /// Durable before it returns: a rotated refresh token that is lost locks the deployment out.
    pub async fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let raw = json(record, "the token record")?;
        self.run("write the token record", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                tx.execute(
                    "INSERT INTO token (id, record, updated_at) VALUES (true, $1::text::json, now()) \
                     ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_at = now()",
                    &[&raw],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn put_reconcile_report(&self, report: &ReconcileReport) -> Result<(), StoreError> {
        self.write(
            "keep the reconcile report",
            "INSERT INTO reconcile_report (id, report) VALUES (true, $1::text::json) \
             ON CONFLICT (id) DO UPDATE SET report = excluded.report",
            vec![Some(json(report, "the reconcile report")?)],
        )
        .await
    }

    pub async fn reconcile_report(&self) -> Result<Option<ReconcileReport>, StoreError> {
        self.record(
            "SELECT report::text FROM reconcile_report",
            None,
            "reconcile report",
        )
        .await
    }
}

/// The token record under a transaction-scoped advisory lock in an open durable transaction, so
/// that one node at a time refreshes (a lock on the row itself would not exist before the first
/// refresh stores one, when every node starts from the same initial refresh token): the others wait on the row and then read the record the first one
/// committed. Dropped without [`PgStore::commit_token`], its connection is closed rather than
/// returned to the pool inside the transaction; the server then rolls it back.
pub struct TokenLock {
    client: Option<deadpool_postgres::Object>,
    record: Option<TokenRecord>,
}

impl TokenLock {
    pub fn record(&self) -> Option<&TokenRecord> {
        self.record.as_ref()
    }
}

impl Drop for TokenLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl std::fmt::Debug for TokenLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLock").finish_non_exhaustive()
    }
}

/// A refresh holds the row for as long as Webex's token endpoint takes to answer (a few
/// seconds, bounded by its request timeout): a node waiting for it must outwait that rather
/// than give up after the statement timeout meant for the hot path.
/// Any fixed number, other than the migration lock's: the token refresh's advisory lock.
const TOKEN_LOCK_KEY: i64 = 0x0f10_7487_70c3;

const TOKEN_LOCK: &str = "BEGIN; SET LOCAL synchronous_commit TO on; \
     SET LOCAL lock_timeout = '60s'; SET LOCAL statement_timeout = '65s'";

impl PgStore {
    pub async fn lock_token(&self) -> Result<TokenLock, StoreError> {
        self.run("lock the token record", Access::Write, move |c| {
            Box::pin(async move {
                let mut lock = TokenLock {
                    client: Some(c),
                    record: None,
                };
                if let Some(c) = &lock.client {
                    c.batch_execute(TOKEN_LOCK).await?;
                    c.execute("SELECT pg_advisory_xact_lock($1)", &[&TOKEN_LOCK_KEY])
                        .await?;
                    let row = c.query_opt("SELECT record::text FROM token", &[]).await?;
                    if let Some(row) = row {
                        let raw: String = row.try_get(0)?;
                        lock.record = Some(crate::store::decode(raw.as_bytes(), "token record")?);
                    }
                }
                Ok(lock)
            })
        })
        .await
    }

    /// Write `record` (if any) under the lock and commit, durably; the lock ends either way.
    pub async fn commit_token(
        &self,
        mut lock: TokenLock,
        record: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        let raw = record.map(|r| json(r, "the token record")).transpose()?;
        let Some(client) = lock.client.take() else {
            return Ok(());
        };
        self.run_held(
            "write the token record",
            Box::pin(async move {
                let result = async {
                    if let Some(raw) = &raw {
                        client
                            .execute(
                                "INSERT INTO token (id, record, updated_at) VALUES (true, $1::text::json, now()) \
                                 ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_at = now()",
                                &[raw],
                            )
                            .await?;
                    }
                    client.batch_execute("COMMIT").await
                }
                .await;
                if result.is_err() {
                    drop(deadpool_postgres::Object::take(client));
                }
                Ok(result?)
            }),
        )
        .await
    }
}

/// Audit records waiting for [`PgStore::write_audit_batches`], and whether it runs.
#[derive(Default)]
pub(super) struct AuditQueue {
    writing: bool,
    waiting: Vec<(AuditRow, oneshot::Sender<Result<(), StoreError>>)>,
}

/// An audit record's columns: the id of the record it replaces (none for a new one), time,
/// user, the record as JSON text.
type AuditRow = (Option<i64>, i64, Option<String>, String);
