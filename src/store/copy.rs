//! `store copy`: a sled store moved into PostgreSQL — every outbox entry (pending, dead and the
//! delivered history) with its id and state (and a dead entry's hold on its user's lane), the user map, profiles, customers, the token, the
//! audit and the last reconcile run's counts. Read in key order in batches, written a batch per
//! transaction; a record the database already holds is left alone, so a copy can be run again
//! or resumed after an interruption. At the end, every kind's count in the source is compared
//! with how many of those records the database holds.

use std::path::Path;

use super::postgres::PgStore;
use super::{SledStore, StoreError, audit, decode, outbox, users};
use crate::config::PostgresConfig;

/// Records per transaction.
const BATCH: usize = 500;

/// One kind of record: how many the source holds, how many of those the database holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub kind: &'static str,
    pub source: u64,
    pub target: u64,
}

/// What the copy tells its caller as it goes (the CLI draws a progress bar from it).
pub trait CopyProgress {
    /// The number of records to copy, known once the source is open.
    fn total(&self, records: u64);
    /// `records` more were copied.
    fn advanced(&self, records: u64);
}

/// Copy the sled store at `source` into the PostgreSQL database of `target` (migrated first).
/// Refused while a running node holds the sled store: its file lock says so.
pub async fn sled_to_postgres(
    source: &Path,
    target: &PostgresConfig,
    progress: &dyn CopyProgress,
) -> Result<Vec<Copied>, StoreError> {
    if !source.join("conf").exists() && !source.join("db").exists() {
        return Err(StoreError::Open {
            path: source.to_owned(),
            reason: "there is no sled store there".to_owned(),
        });
    }
    let sled = SledStore::open(source).map_err(|e| match e {
        StoreError::Open { path, reason } if reason.contains("lock") => StoreError::Open {
            path,
            reason: format!(
                "{reason}: a running flowthrough holds it; stop that node first (a copy reads a store no node writes)"
            ),
        },
        other => other,
    })?;
    let pg = PgStore::open(target).await?;
    let trees = [
        (outbox::OUTBOX, "outbox entries"),
        (users::USERS, "user map records"),
        (users::PROFILES, "profiles"),
        (audit::AUDIT, "audit records"),
        (audit::DOCUMENTS, "unreadable documents"),
    ];
    let mut total = 0;
    for (tree, _) in trees {
        total += sled.tree(tree)?.len() as u64;
    }
    let customers = sled.customers()?;
    let token = sled.token()?;
    let last_reconcile = sled.reconcile_report()?;
    total +=
        customers.len() as u64 + u64::from(token.is_some()) + u64::from(last_reconcile.is_some());
    progress.total(total);

    let mut report = Vec::new();
    for (tree, kind) in trees {
        let mut copied = Copied {
            kind,
            source: 0,
            target: 0,
        };
        let mut after: Option<sled::IVec> = None;
        loop {
            let batch = sled.batch(tree, after.as_ref(), BATCH)?;
            let Some((last, _)) = batch.last() else {
                break;
            };
            after = Some(last.clone());
            let n = batch.len() as u64;
            copied.source += n;
            copied.target += match tree {
                outbox::OUTBOX => {
                    let entries: Vec<outbox::Entry> = decoded(&batch, "outbox entry")?;
                    let mut held = Vec::with_capacity(entries.len());
                    for entry in entries {
                        let holds = sled.holds_lane(&entry)?;
                        held.push((entry, holds));
                    }
                    pg.import_entries(held).await?
                }
                users::USERS => {
                    let records = batch
                        .iter()
                        .map(|(key, raw)| {
                            Ok((
                                String::from_utf8_lossy(key).into_owned(),
                                decode(raw, "user record")?,
                            ))
                        })
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    pg.import_users(records).await?
                }
                users::PROFILES => pg.import_profiles(decoded(&batch, "user profile")?).await?,
                _ => {
                    let records = batch
                        .iter()
                        .map(|(key, raw)| {
                            // Keys are time ‖ id, big-endian: the id goes along.
                            let id = key
                                .get(8..16)
                                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                                .map(u64::from_be_bytes)
                                .ok_or(StoreError::Corrupt {
                                    what: "audit key",
                                    reason: format!("{} bytes instead of 16", key.len()),
                                })?;
                            Ok((id, decode(raw, "audit record")?))
                        })
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    pg.import_audit(records).await?
                }
            };
            progress.advanced(n);
        }
        report.push(copied);
    }
    let mut copied = |kind, source, target| {
        progress.advanced(source);
        report.push(Copied {
            kind,
            source,
            target,
        });
    };
    let count = customers.len() as u64;
    copied("customers", count, pg.import_customers(customers).await?);
    if let Some(token) = &token {
        copied("token record", 1, pg.import_token(token).await?);
    }
    if let Some(last) = &last_reconcile {
        copied(
            "reconcile report",
            1,
            pg.import_reconcile_report(last).await?,
        );
    }
    pg.import_done().await?;
    Ok(report)
}

fn decoded<T: serde::de::DeserializeOwned>(
    batch: &[(sled::IVec, sled::IVec)],
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    batch.iter().map(|(_, raw)| decode(raw, what)).collect()
}

impl SledStore {
    /// Up to `n` records of `tree` after the key `after`, in key order.
    fn batch(
        &self,
        tree: &str,
        after: Option<&sled::IVec>,
        n: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        let tree = self.tree(tree)?;
        let range = match after {
            Some(key) => tree.range::<&[u8], _>((
                std::ops::Bound::Excluded(key.as_ref()),
                std::ops::Bound::Unbounded,
            )),
            None => tree.iter(),
        };
        range
            .take(n)
            .map(|item| item.map_err(StoreError::from))
            .collect()
    }
}
