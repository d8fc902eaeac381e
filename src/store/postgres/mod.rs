//! The PostgreSQL backend: the same domain operations as sled, for several nodes sharing one
//! database (SPEC §11).
//!
//! Every operation is one statement, prepared once per connection, or one transaction whose
//! statements are sent together: one round trip. What the AS is acknowledged for (a command's
//! records and entry), a token rotation and an operator's change commit with
//! `synchronous_commit = on` before they return; PostgreSQL's group commit batches the WAL
//! flushes of concurrent commits, and an error — a connection lost during the commit included —
//! is never taken for an acknowledgement. The rest (delivery state, the audit, the user map as
//! delivery learns it) commits with the connections' default, `synchronous_commit = off`: as on
//! sled, where such writes wait for the next flush, a crash of the database can lose the last
//! moments of them (a delivery is then made again, and a provision looks the user up first), and
//! the WAL being one sequence, never one that an acknowledged commit came after.
//!
//! The pool's connections and the operations run on a small runtime of this backend's own:
//! the callers are actix's single-threaded worker runtimes and the delivery engine, and a
//! connection's task must not depend on which of them happened to open it, nor wait for a busy
//! one to be polled. The hop costs a thread wake-up per operation, next to a network round trip.
//!
//! A failure that means the database cannot take writes (unreachable, read-only, full, shutting
//! down) is kept as the store's write failure: `/readyz` shows it and the AS is answered 503
//! before any work; a probe clears it when a write succeeds again.

mod cluster;
mod connect;
mod import;
mod lanes;
mod migrate;
mod outbox;
mod records;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;

use super::StoreError;
use crate::config::PostgresConfig;

pub use migrate::{MigrationReport, SCHEMA_VERSION, check as check_schema};
pub use records::TokenLock;

/// How often the probe looks at a database that failed, and at a healthy one.
const PROBE_FAILING: Duration = Duration::from_secs(1);
const PROBE_HEALTHY: Duration = Duration::from_secs(5);

/// The PostgreSQL store handle; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Taken and shut down in the background on drop: dropping a runtime inside another
    /// (the last handle may go in an async task) would panic.
    runtime: Option<tokio::runtime::Runtime>,
    failure: Mutex<Option<String>>,
    observer: OnceLock<Observer>,
    /// `host:port/dbname`, for messages.
    target: String,
    audit: Mutex<records::AuditQueue>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pool.close();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.inner.target)
            .finish()
    }
}

/// Who hears about commits and errors: the metrics, set by `serve`.
pub struct Observer {
    /// The round trip of every write, its commit included.
    pub commit: Box<dyn Fn(Duration) + Send + Sync>,
    /// A failed operation, by kind (`unreachable`, `read_only`, `full`, `timeout`, …).
    pub error: Box<dyn Fn(&'static str) + Send + Sync>,
}

/// The pool's figures, read when metrics are scraped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseStats {
    pub pool_size: usize,
    pub pool_in_use: usize,
    pub pool_waiting: usize,
}

/// What an operation's body can fail with: the database, or a record that does not decode.
pub(super) enum OpError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Pg(e) => f.write_str(&describe(e)),
            OpError::Store(e) => e.fmt(f),
        }
    }
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Pg(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

type OpFuture<T> = Pin<Box<dyn Future<Output = Result<T, OpError>> + Send>>;

/// Whether an operation writes: a write that succeeds proves the database writable again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

impl PgStore {
    /// Connect, bring the schema up to date (under the migration lock) and start the probe.
    pub async fn open(config: &PostgresConfig) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(config)?;
        store.migrate().await?;
        store.start_probe();
        Ok(store)
    }

    /// A handle that has changed nothing and connects at its first operation: for checks
    /// (`doctor`, `store migrate --check`) and for `store migrate` itself.
    pub fn connect(config: &PostgresConfig) -> Result<PgStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let (pool, target) = connect::pool(config)?;
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                runtime: Some(runtime),
                failure: Mutex::new(None),
                observer: OnceLock::new(),
                target,
                audit: Mutex::default(),
            }),
        };
        Ok(store)
    }

    /// Apply the migrations this binary has and the database lacks; refuses a newer schema.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        self.run("migrate the schema", Access::Write, |mut c| {
            Box::pin(async move { migrate::apply(&mut c).await })
        })
        .await
    }

    /// Set who hears about commits and errors (once; later calls are ignored).
    pub fn observe(&self, observer: Observer) {
        let _ = self.inner.observer.set(observer);
    }

    /// Why writes cannot be made now, if they cannot.
    pub fn write_failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stats(&self) -> DatabaseStats {
        let status = self.inner.pool.status();
        DatabaseStats {
            pool_size: status.max_size,
            pool_in_use: status.size.saturating_sub(status.available),
            pool_waiting: status.waiting,
        }
    }

    /// `host:port/dbname` of the database.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Run one operation on a pooled connection, on the backend's runtime. `what` completes
    /// "PostgreSQL could not …" in the error.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        access: Access,
        op: impl FnOnce(Object) -> OpFuture<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.inner.pool.clone();
        self.run_on(what, access, async move {
            let client = pool.get().await.map_err(pool_error)?;
            op(client).await.map_err(Failure::from)
        })
        .await
    }

    /// Run an operation on a connection it already holds (the token lock's), on the backend's
    /// runtime, failures counted as [`PgStore::run`] counts them.
    pub(super) async fn run_held<T: Send + 'static>(
        &self,
        what: &'static str,
        op: OpFuture<T>,
    ) -> Result<T, StoreError> {
        self.run_on(what, Access::Write, async move {
            op.await.map_err(Failure::from)
        })
        .await
    }

    async fn run_on<T: Send + 'static>(
        &self,
        what: &'static str,
        access: Access,
        op: impl Future<Output = Result<T, Failure>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(runtime) = &self.inner.runtime else {
            return Err(StoreError::Io("the PostgreSQL store is closed".to_owned()));
        };
        let started = Instant::now();
        let task = runtime.spawn(op);
        let result = match task.await {
            Ok(result) => result,
            Err(e) => Err(Failure::Other(StoreError::Io(format!(
                "a PostgreSQL operation ended unexpectedly: {e}"
            )))),
        };
        match result {
            Ok(value) => {
                if access == Access::Write {
                    if let Some(observer) = self.inner.observer.get() {
                        (observer.commit)(started.elapsed());
                    }
                    self.set_failure(None);
                }
                Ok(value)
            }
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::Database { kind, reason }) => {
                if let Some(observer) = self.inner.observer.get() {
                    (observer.error)(kind);
                }
                if blocks_writes(kind) {
                    self.set_failure(Some(format!("{kind}: {reason}")));
                }
                Err(StoreError::Database { kind, what, reason })
            }
        }
    }

    fn set_failure(&self, failure: Option<String>) {
        let mut current = self
            .inner
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match (&*current, &failure) {
            (None, Some(reason)) => tracing::error!(
                database = %self.inner.target,
                reason,
                "PostgreSQL cannot take writes; provisioning answers 503 and delivery waits until it can (nothing to do in flowthrough: bring the database back)"
            ),
            (Some(_), None) => tracing::info!(
                database = %self.inner.target,
                "PostgreSQL takes writes again; provisioning and delivery resume"
            ),
            _ => {}
        }
        *current = failure;
    }

    /// Look at the database now and then: a write while it is failing (so readiness turns green
    /// once it is back, though provisioning refuses everything meanwhile), a read that notices
    /// it gone or read-only while it is healthy. The task holds only a weak handle.
    fn start_probe(&self) {
        let Some(runtime) = &self.inner.runtime else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                let failing = match weak.upgrade() {
                    Some(inner) => inner
                        .failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some(),
                    None => return,
                };
                tokio::time::sleep(if failing {
                    PROBE_FAILING
                } else {
                    PROBE_HEALTHY
                })
                .await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let store = PgStore { inner };
                let _ = store.probe(failing).await;
            }
        });
    }

    /// One look at the database: a write when `write`, else a check that it is writable.
    async fn probe(&self, write: bool) -> Result<(), StoreError> {
        if write {
            // Durable, as an acknowledgement: a full disk shows in the WAL flush.
            self.run("write (probe)", Access::Write, |mut c| {
                Box::pin(async move {
                    let tx = durable_transaction(&mut c).await?;
                    tx.execute("UPDATE control SET probed_at = now()", &[])
                        .await?;
                    tx.commit().await?;
                    Ok(())
                })
            })
            .await
        } else {
            let read_only = self
                .run("answer (probe)", Access::Read, |c| {
                    Box::pin(async move {
                        let row = c
                            .query_one("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'", &[])
                            .await?;
                        Ok(row.try_get::<_, bool>(0)?)
                    })
                })
                .await?;
            if read_only {
                self.set_failure(Some(
                    "read_only: the database is read-only (a standby, or default_transaction_read_only)".to_owned(),
                ));
            }
            Ok(())
        }
    }

    /// The schema version of the database, and what `migrate` would apply.
    pub async fn schema(&self) -> Result<MigrationReport, StoreError> {
        self.run("read the schema version", Access::Read, |c| {
            Box::pin(async move { migrate::report(&c).await })
        })
        .await
    }

    /// Facts for `doctor`: effective `synchronous_commit` and `fsync`, and the time of one
    /// commit.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        let settings = self
            .run("read its settings", Access::Read, |c| {
                Box::pin(async move {
                    let row = c
                        .query_one(
                            "SELECT current_setting('synchronous_commit'), current_setting('fsync'), \
                             current_setting('synchronous_standby_names'), version()",
                            &[],
                        )
                        .await?;
                    Ok((
                        row.try_get::<_, String>(0)?,
                        row.try_get::<_, String>(1)?,
                        row.try_get::<_, String>(2)?,
                        row.try_get::<_, String>(3)?,
                    ))
                })
            })
            .await?;
        // A durable transaction that takes an id writes a commit record and waits for its flush,
        // as an acknowledgement does, and changes no data.
        let started = Instant::now();
        let acknowledged = self
            .run("commit", Access::Read, |mut c| {
                Box::pin(async move {
                    let tx = durable_transaction(&mut c).await?;
                    let setting = tx
                        .query_one(
                            "SELECT current_setting('synchronous_commit'), pg_current_xact_id()::text",
                            &[],
                        )
                        .await?
                        .try_get::<_, String>(0)?;
                    tx.commit().await?;
                    Ok(setting)
                })
            })
            .await?;
        Ok(Durability {
            synchronous_commit: acknowledged,
            background_commit: settings.0,
            fsync: settings.1,
            synchronous_standby_names: settings.2,
            server_version: settings.3,
            commit: started.elapsed(),
        })
    }
}

/// What `doctor` reports about a database's durability.
#[derive(Debug, Clone)]
pub struct Durability {
    /// `synchronous_commit` of the transactions that acknowledgements wait for.
    pub synchronous_commit: String,
    /// The connections' default, for delivery state and the audit.
    pub background_commit: String,
    pub fsync: String,
    pub synchronous_standby_names: String,
    pub server_version: String,
    pub commit: Duration,
}

/// A failed operation, classified on the backend's runtime.
enum Failure {
    Database { kind: &'static str, reason: String },
    Other(StoreError),
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Store(e) => Failure::Other(e),
            OpError::Pg(e) => Failure::Database {
                kind: error_kind(&e),
                reason: describe(&e),
            },
        }
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> Failure {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => Failure::Database {
            kind: error_kind(&e),
            reason: describe(&e),
        },
        PoolError::Timeout(_) => Failure::Database {
            kind: "unreachable",
            reason: "no connection to the database within store.postgres.connect_timeout_ms"
                .to_owned(),
        },
        other => Failure::Database {
            kind: "unreachable",
            reason: other.to_string(),
        },
    }
}

/// The metrics label of an error; also decides whether it means "cannot take writes".
fn error_kind(e: &tokio_postgres::Error) -> &'static str {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or was lost (during a commit, too: its outcome is
        // unknown and it is not acknowledged).
        return if e.is_closed() {
            "connection_lost"
        } else {
            "unreachable"
        };
    };
    if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        "read_only"
    } else if [
        SqlState::DISK_FULL,
        SqlState::INSUFFICIENT_RESOURCES,
        SqlState::OUT_OF_MEMORY,
        SqlState::TOO_MANY_CONNECTIONS,
    ]
    .contains(code)
    {
        "full"
    } else if [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
    ]
    .contains(code)
        || code.code().starts_with("08")
    {
        "unreachable"
    } else if *code == SqlState::QUERY_CANCELED {
        "timeout"
    } else if code.code().starts_with("28") {
        "authentication"
    } else {
        "other"
    }
}

fn blocks_writes(kind: &'static str) -> bool {
    matches!(
        kind,
        "connection_lost" | "unreachable" | "read_only" | "full" | "timeout" | "authentication"
    )
}

/// The error's own words: tokio-postgres's `Display` of a server error is only "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

/// A transaction whose commit waits for the WAL on disk (and synchronous standbys), whatever the
/// connection's default: token rotations, operators' changes, migrations, copies.
pub(super) async fn durable_transaction(
    client: &mut Object,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit TO on")
        .await?;
    Ok(tx)
}

/// Milliseconds and ids are `u64` in the domain and `bigint` in the tables; neither gets near
/// 2^63, so a value that does not fit is a corrupt row.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what,
        reason: format!("negative value {value}"),
    })
}
