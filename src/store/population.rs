//! What `flowthrough reconcile` reads from and leaves in the store: the whole user map, and the
//! counts of its last run by kind of drift (exported by `/metrics`): the sled side, and the
//! record both backends keep (PostgreSQL's is in `postgres/records.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::users::USERS;
use super::{SledStore, StoreError, UserRecord, decode, encode};

const RECONCILE: &str = "reconcile";
const LAST_RUN: &[u8] = b"last_run";

/// The counts of the last reconcile run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub at_ms: u64,
    /// Kind of drift (`missing`, `extra`, …) → users found.
    pub counts: BTreeMap<String, u64>,
}

impl SledStore {
    /// Every user the adapter knows, in userId order.
    pub fn users(&self) -> Result<Vec<(String, UserRecord)>, StoreError> {
        self.tree(USERS)?
            .iter()
            .map(|item| {
                let (key, raw) = item?;
                Ok((
                    String::from_utf8_lossy(&key).into_owned(),
                    decode(&raw, "user record")?,
                ))
            })
            .collect()
    }

    pub fn put_reconcile_report(&self, report: &ReconcileReport) -> Result<(), StoreError> {
        self.tree(RECONCILE)?.insert(LAST_RUN, encode(report)?)?;
        Ok(())
    }

    pub fn reconcile_report(&self) -> Result<Option<ReconcileReport>, StoreError> {
        self.tree(RECONCILE)?
            .get(LAST_RUN)?
            .map(|raw| decode(&raw, "reconcile report"))
            .transpose()
    }
}
