//! Records brought in by `store copy`, with the ids and states they had: each batch in one
//! transaction, a record already there left as it is (so a copy run again, or resumed after an
//! interruption, changes nothing it did before and never undoes what a node has done since), and
//! the number of the batch's records the database holds afterwards, for the final comparison.

use super::{Access, OpError, PgStore, durable_transaction, to_i64};
use crate::oci::UserProfile;
use crate::store::{
    AuditEvent, AuditRecord, Customer, Entry, ReconcileReport, StoreError, TokenRecord, UserRecord,
};

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Io(format!("cannot encode a record: {e}")))
}

impl PgStore {
    /// Outbox entries, each with whether it holds its user's lane (a dead entry at the head of
    /// its queue); returns how many of them the outbox holds now.
    pub async fn import_entries(&self, entries: Vec<(Entry, bool)>) -> Result<u64, StoreError> {
        let mut rows = Vec::with_capacity(entries.len());
        for (e, holds_lane) in entries {
            let (state, ended, subscriber, status, reason) = match e.state {
                crate::store::EntryState::Pending => ("pending", None, None, None, None),
                crate::store::EntryState::Delivered {
                    at_ms,
                    subscriber_id,
                    webex_status,
                } => (
                    "delivered",
                    Some(to_i64(at_ms)),
                    subscriber_id,
                    webex_status,
                    None,
                ),
                crate::store::EntryState::Dead { at_ms, reason } => {
                    ("dead", Some(to_i64(at_ms)), None, None, Some(reason))
                }
            };
            let call = json(&e.new.call)?;
            rows.push((
                to_i64(e.id),
                to_i64(e.created_ms),
                e.new.user_id,
                e.new.template,
                e.new.command,
                call,
                e.new.client,
                state,
                ended,
                subscriber,
                status,
                reason,
                i32::try_from(e.attempts).unwrap_or(i32::MAX),
                e.last_error,
                e.tracking_id,
                e.new.origin.name(),
                holds_lane,
            ));
        }
        self.run("copy outbox entries", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let lane = tx
                    .prepare_cached("INSERT INTO lanes (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
                    .await?;
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO outbox (id, created_ms, user_id, template, command, call, client, \
                         state, ended_ms, subscriber_id, webex_status, dead_reason, attempts, last_error, \
                         tracking_id, origin, holds_lane) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, \
                         $4, $5, $6::text::json, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .await?;
                let mut ids = Vec::with_capacity(rows.len());
                for r in &rows {
                    tx.execute(&lane, &[&r.2]).await?;
                    tx.execute(
                        &insert,
                        &[
                            &r.0, &r.1, &r.2, &r.3, &r.4, &r.5, &r.6, &r.7, &r.8, &r.9, &r.10,
                            &r.11, &r.12, &r.13, &r.14, &r.15, &r.16,
                        ],
                    )
                    .await?;
                    ids.push(r.0);
                }
                let present: i64 = tx
                    .query_one("SELECT count(*) FROM outbox WHERE id = ANY($1)", &[&ids])
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// Audit records with the ids the sled store gave them (documents apart, as there).
    pub async fn import_audit(&self, records: Vec<(u64, AuditRecord)>) -> Result<u64, StoreError> {
        let mut rows = Vec::with_capacity(records.len());
        for (id, record) in records {
            let (table, user) = match &record.event {
                AuditEvent::Document { .. } => ("documents", None),
                AuditEvent::Command { user_id, .. } => ("audit", user_id.clone()),
                AuditEvent::Tunnel { .. } => ("audit", None),
            };
            rows.push((
                table,
                to_i64(id),
                to_i64(record.at_ms),
                user,
                json(&record)?,
            ));
        }
        self.run("copy audit records", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let audit = tx
                    .prepare_cached(
                        "INSERT INTO audit (id, at_ms, user_id, record) OVERRIDING SYSTEM VALUE \
                         VALUES ($1, $2, $3, $4::text::json) ON CONFLICT (id) DO NOTHING",
                    )
                    .await?;
                let documents = tx
                    .prepare_cached(
                        "INSERT INTO documents (id, at_ms, record) OVERRIDING SYSTEM VALUE \
                         VALUES ($1, $2, $3::text::json) ON CONFLICT (id) DO NOTHING",
                    )
                    .await?;
                let (mut audit_ids, mut document_ids) = (Vec::new(), Vec::new());
                for (table, id, at, user, record) in &rows {
                    if *table == "documents" {
                        tx.execute(&documents, &[id, at, record]).await?;
                        document_ids.push(*id);
                    } else {
                        tx.execute(&audit, &[id, at, user, record]).await?;
                        audit_ids.push(*id);
                    }
                }
                let present: i64 = tx
                    .query_one(
                        "SELECT (SELECT count(*) FROM audit WHERE id = ANY($1)) \
                         + (SELECT count(*) FROM documents WHERE id = ANY($2))",
                        &[&audit_ids, &document_ids],
                    )
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// User map records.
    pub async fn import_users(&self, users: Vec<(String, UserRecord)>) -> Result<u64, StoreError> {
        self.run("copy the user map", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO user_map (user_id, subscriber_id, template) VALUES ($1, $2, $3) \
                         ON CONFLICT (user_id) DO NOTHING",
                    )
                    .await?;
                let mut keys = Vec::with_capacity(users.len());
                for (user, record) in &users {
                    tx.execute(&insert, &[user, &record.subscriber_id, &record.template])
                        .await?;
                    keys.push(user.clone());
                }
                let present: i64 = tx
                    .query_one("SELECT count(*) FROM user_map WHERE user_id = ANY($1)", &[&keys])
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// Last profiles seen.
    pub async fn import_profiles(&self, profiles: Vec<UserProfile>) -> Result<u64, StoreError> {
        let rows = profiles
            .iter()
            .map(|p| Ok((p.user_id.clone(), json(p)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.run("copy profiles", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO profiles (user_id, profile) VALUES ($1, $2::text::json) \
                         ON CONFLICT (user_id) DO NOTHING",
                    )
                    .await?;
                let mut keys = Vec::with_capacity(rows.len());
                for (user, profile) in &rows {
                    tx.execute(&insert, &[user, profile]).await?;
                    keys.push(user.clone());
                }
                let present: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM profiles WHERE user_id = ANY($1)",
                        &[&keys],
                    )
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// Customers: all of them at once (a few per enterprise or group).
    pub async fn import_customers(&self, customers: Vec<Customer>) -> Result<u64, StoreError> {
        let rows = customers
            .iter()
            .map(|c| Ok((c.service_provider_id.clone(), c.group_id.clone(), json(c)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.run("copy customers", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO customers (service_provider_id, group_id, record) \
                         VALUES ($1, $2, $3::text::json) ON CONFLICT DO NOTHING",
                    )
                    .await?;
                let exists = tx
                    .prepare_cached(
                        "SELECT count(*) FROM customers WHERE service_provider_id = $1 \
                         AND group_id IS NOT DISTINCT FROM $2",
                    )
                    .await?;
                let mut present = 0;
                for (sp, group, record) in &rows {
                    tx.execute(&insert, &[sp, group, record]).await?;
                    present += tx
                        .query_one(&exists, &[sp, group])
                        .await?
                        .try_get::<_, i64>(0)?;
                }
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// The token record, unless the database has one already (a node may have rotated it).
    pub async fn import_token(&self, record: &TokenRecord) -> Result<u64, StoreError> {
        let raw = json(record)?;
        self.run("copy the token record", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                tx.execute(
                    "INSERT INTO token (id, record) VALUES (true, $1::text::json) ON CONFLICT (id) DO NOTHING",
                    &[&raw],
                )
                .await?;
                let present: i64 = tx
                    .query_one("SELECT count(*) FROM token", &[])
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// The last reconcile run's counts, unless the database has a report already (a reconcile
    /// may have run against it since).
    pub async fn import_reconcile_report(
        &self,
        report: &ReconcileReport,
    ) -> Result<u64, StoreError> {
        let raw = json(report)?;
        self.run("copy the reconcile report", Access::Write, move |mut c| {
            Box::pin(async move {
                let tx = durable_transaction(&mut c).await?;
                tx.execute(
                    "INSERT INTO reconcile_report (id, report) VALUES (true, $1::text::json) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&raw],
                )
                .await?;
                let present: i64 = tx
                    .query_one("SELECT count(*) FROM reconcile_report", &[])
                    .await?
                    .try_get(0)?;
                tx.commit().await?;
                Ok(u64::try_from(present).unwrap_or_default())
            })
        })
        .await
    }

    /// After a copy: the id sequences continue after the highest id copied, so new entries
    /// stay after the old ones in every user's queue.
    pub async fn import_done(&self) -> Result<(), StoreError> {
        self.run("continue the id sequences", Access::Write, |c| {
            Box::pin(async move {
                for table in ["outbox", "audit", "documents"] {
                    c.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                             greatest((SELECT max(id) FROM {table}), 1))"
                        ),
                        &[],
                    )
                    .await
                    .map_err(OpError::from)?;
                }
                Ok(())
            })
        })
        .await
    }
}
