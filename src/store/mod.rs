//! The durable store, behind a small API of domain operations (outbox, user map, profiles,
//! customers, audit, tokens). sled is the embedded backend; no sled type leaves this module, so a
//! PostgreSQL backend for two-node deployments (SPEC §11) is an addition, not a rewrite.

use std::path::{Path, PathBuf};

mod tokens;
pub use tokens::{TokenRecord, TokenState};

/// The on-disk layout version. Bumped whenever a tree's key or value encoding changes; a store
/// written by another version is refused at open rather than misread.
pub const SCHEMA_VERSION: u32 = 1;

const META_TREE: &str = "meta";
const SCHEMA_KEY: &[u8] = b"schema_version";

/// A failure of the store. The message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store at {path}: {reason}; check that the directory exists, is writable by the flowthrough user, and that no other flowthrough process uses it"
    )]
    Open { path: PathBuf, reason: String },
    #[error(
        "the store at {path} has schema version {found}, this flowthrough understands {expected}; run the flowthrough release that wrote it, or move the directory aside to start empty"
    )]
    SchemaMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("store I/O error: {0}; check disk space and the health of the data volume")]
    Io(String),
    #[error("a record in the store is corrupt ({what}): {reason}")]
    Corrupt { what: &'static str, reason: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// The store handle; cheap to clone and shared by every task.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (or create) the store and check its schema version.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let meta = db.open_tree(META_TREE)?;
        match meta.get(SCHEMA_KEY)? {
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: "schema version",
                        reason: format!("{} bytes instead of 4", raw.len()),
                    })?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaMismatch {
                        path: path.to_owned(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
        }
        Ok(Store {
            db,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make every write so far durable. The AS is answered only after this returns.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }
}
