//! What `flowthrough reconcile` reads from and leaves in the store: the whole user map, and the
//! counts of its last run by kind of drift (exported by `/metrics`). Another backend implements
//! the same three operations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::users::USERS;
use super::{Store, StoreError, UserRecord, decode, encode};

const RECONCILE: &str = "reconcile";
const LAST_RUN: &[u8] = b"last_run";

/// The counts of the last reconcile run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub at_ms: u64,
    /// Kind of drift (`missing`, `extra`, …) → users found.
    pub counts: BTreeMap<String, u64>,
}

impl Store {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_map_is_listed_and_the_last_report_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.users().unwrap().is_empty());
        assert_eq!(store.reconcile_report().unwrap(), None);
        store.map_user("b@x", Some("S2"), Some("acme")).unwrap();
        store.map_user("a@x", None, Some("acme")).unwrap();
        let users = store.users().unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].0, "a@x");
        assert_eq!(users[1].1.subscriber_id.as_deref(), Some("S2"));
        let report = ReconcileReport {
            at_ms: 7,
            counts: BTreeMap::from([("missing".to_owned(), 3)]),
        };
        store.put_reconcile_report(&report).unwrap();
        assert_eq!(store.reconcile_report().unwrap(), Some(report));
    }
}
