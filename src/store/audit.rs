//! The audit trail: one record per command, per tunnel and per document the adapter could not
//! understand, kept for the configured retention (age and count).
//!
//! Keys are `time_ms ‖ id` (big-endian), so records are in time order and pruning walks from the
//! front.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, encode};

const AUDIT: &str = "audit";
const DOCUMENTS: &str = "documents";

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    /// The client certificate subject and serial, or `plain` / the client address.
    pub client: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AuditEvent {
    /// One OCI-P command and what became of it.
    Command {
        template: Option<String>,
        command: String,
        user_id: Option<String>,
        /// `success`, `error 7010`, `pending`, `delivered`, `dead`, …
        outcome: String,
        webex_status: Option<String>,
        tracking_id: Option<String>,
        outbox_id: Option<u64>,
        latency_ms: u64,
    },
    /// One CONNECT tunnel.
    Tunnel {
        client_address: String,
        destination: String,
        address_used: Option<String>,
        bytes_up: u64,
        bytes_down: u64,
        duration_ms: u64,
        end: String,
    },
    /// A document or command flowthrough did not understand, kept (redacted) for the operator.
    Document { reason: String, excerpt: String },
}

/// Which records `audit` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user_id: Option<String>,
    pub documents_only: bool,
    pub limit: usize,
}

fn key(at_ms: u64, id: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&at_ms.to_be_bytes());
    key[8..].copy_from_slice(&id.to_be_bytes());
    key
}

/// Unknown documents are kept apart and capped on their own: a misbehaving AS sending garbage
/// must not push real command records out of the audit.
const MAX_DOCUMENTS: usize = 1000;

impl Store {
    pub fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let id = self.db.generate_id()?;
        let tree = match record.event {
            AuditEvent::Document { .. } => DOCUMENTS,
            _ => AUDIT,
        };
        let tree = self.tree(tree)?;
        tree.insert(key(record.at_ms, id), encode(record)?)?;
        if matches!(record.event, AuditEvent::Document { .. }) {
            while tree.len() > MAX_DOCUMENTS {
                tree.pop_min()?;
            }
        } else {
            self.counts.audit.added(1);
        }
        Ok(())
    }

    /// Newest records first.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let tree = self.tree(if query.documents_only {
            DOCUMENTS
        } else {
            AUDIT
        })?;
        let mut out = Vec::new();
        for item in tree.iter().rev() {
            if out.len() >= query.limit {
                break;
            }
            let (_, raw) = item?;
            let record: AuditRecord = decode(&raw, "audit record")?;
            let wanted = match (&query.user_id, &record.event) {
                (None, _) => true,
                (Some(u), AuditEvent::Command { user_id, .. }) => user_id.as_deref() == Some(u),
                (Some(_), _) => false,
            };
            if wanted {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Drop records older than `cutoff_ms`, then the oldest beyond `max_records`.
    pub fn prune_audit(&self, cutoff_ms: u64, max_records: u64) -> Result<u64, StoreError> {
        let tree = self.tree(AUDIT)?;
        let count = &self.counts.audit;
        let mut records = count.of(&tree);
        let mut removed = 0;
        while let Some((k, _)) = tree.first()? {
            if k.len() < 8 || u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8])) >= cutoff_ms {
                break;
            }
            if tree.remove(k)?.is_some() {
                count.removed(1);
                records = records.saturating_sub(1);
                removed += 1;
            }
        }
        while records > max_records {
            if tree.pop_min()?.is_none() {
                break;
            }
            count.removed(1);
            records -= 1;
            removed += 1;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn newest_first_filtered_by_user_and_pruned_by_age_then_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (t, u) in [(10, "a"), (20, "b"), (30, "a"), (40, "a")] {
            store.append_audit(&command(t, u)).unwrap();
        }
        let q = AuditQuery {
            user_id: Some("a".into()),
            limit: 2,
            ..AuditQuery::default()
        };
        let got: Vec<u64> = store.audit(&q).unwrap().iter().map(|r| r.at_ms).collect();
        assert_eq!(got, vec![40, 30]);
        assert_eq!(store.prune_audit(15, 100).unwrap(), 1);
        assert_eq!(store.prune_audit(0, 2).unwrap(), 1);
        let all = AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        };
        let left: Vec<u64> = store.audit(&all).unwrap().iter().map(|r| r.at_ms).collect();
        assert_eq!(left, vec![40, 30]);
        // The count walked at the first round is kept by the appends and removals after it.
        for t in [50, 60, 70] {
            store.append_audit(&command(t, "c")).unwrap();
        }
        assert_eq!(store.prune_audit(0, 2).unwrap(), 3);
        let left: Vec<u64> = store.audit(&all).unwrap().iter().map(|r| r.at_ms).collect();
        assert_eq!(left, vec![70, 60]);
        assert_eq!(store.prune_audit(0, 2).unwrap(), 0);
    }

    #[test]
    fn documents_are_capped_apart_from_commands() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.append_audit(&command(1, "a")).unwrap();
        for i in 0..(MAX_DOCUMENTS as u64 + 5) {
            let doc = AuditRecord {
                at_ms: 100 + i,
                client: "x".into(),
                event: AuditEvent::Document {
                    reason: "unknown".into(),
                    excerpt: "<x/>".into(),
                },
            };
            store.append_audit(&doc).unwrap();
        }
        let docs = AuditQuery {
            documents_only: true,
            limit: 5000,
            ..AuditQuery::default()
        };
        let kept = store.audit(&docs).unwrap();
        assert_eq!(kept.len(), MAX_DOCUMENTS);
        assert_eq!(
            kept.last().unwrap().at_ms,
            105,
            "the oldest documents went first"
        );
        let commands = AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        };
        assert_eq!(store.audit(&commands).unwrap().len(), 1);
    }
}
