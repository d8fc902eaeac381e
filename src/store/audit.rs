//! The audit trail: one record per command, per tunnel and per document the adapter could not
//! understand, kept for the configured retention (age and count).
//!
//! Keys are `time_ms ‖ id` (big-endian), so records are in time order and pruning walks from the
//! front.

use serde::{Deserialize, Serialize};

use super::{SledStore, StoreError, decode, encode};

pub(super) const AUDIT: &str = "audit";
pub(super) const DOCUMENTS: &str = "documents";

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

impl AuditRecord {
    /// The user a command's record is about.
    pub fn user_id(&self) -> Option<&str> {
        match &self.event {
            AuditEvent::Command { user_id, .. } => user_id.as_deref(),
            _ => None,
        }
    }
}

/// Where [`crate::store::Store::accept`] put a command's audit record, for
/// [`crate::store::Store::complete_audit`] to replace it once the command is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditKey {
    pub(crate) at_ms: u64,
    pub(crate) id: u64,
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

impl SledStore {
    pub fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.append_audit_keyed(record).map(|_| ())
    }

    /// [`SledStore::append_audit`], saying where the record went.
    pub(super) fn append_audit_keyed(&self, record: &AuditRecord) -> Result<AuditKey, StoreError> {
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
        Ok(AuditKey {
            at_ms: record.at_ms,
            id,
        })
    }

    /// Replace the record at `key` (written again if pruning took it meanwhile).
    pub fn complete_audit(&self, key: AuditKey, record: &AuditRecord) -> Result<(), StoreError> {
        let replaced = self
            .tree(AUDIT)?
            .insert(self::key(key.at_ms, key.id), encode(record)?)?;
        if replaced.is_none() {
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
