//! Versioned schema migrations: plain SQL files in `migrations/`, applied in order, each once,
//! in one transaction under a transaction-scoped advisory lock, so nodes starting together
//! apply them once between them and a node never sees half a schema. A database migrated by a
//! newer flowthrough than this one is refused: this binary would misread it.

use deadpool_postgres::Object;

use super::OpError;
use crate::store::StoreError;

/// The migrations this binary knows, in order; the last one's number is its schema version.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/001_init.sql")),
    (
        2,
        "population",
        include_str!("migrations/002_population.sql"),
    ),
    (3, "cluster", include_str!("migrations/003_cluster.sql")),
    (
        4,
        "held_lanes",
        include_str!("migrations/004_held_lanes.sql"),
    ),
    (5, "shares", include_str!("migrations/005_shares.sql")),
];

/// The schema version this binary reads and writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Any fixed number: the key of the advisory lock that serializes migrations ("flowthrough" in
/// the letters' positions, more or less).
const MIGRATION_LOCK: i64 = 0x0f10_7487_0b06;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS flowthrough_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Where a database's schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The version found before anything was applied (0: an empty database).
    pub found: i32,
    /// The migrations applied now (by `apply`) or still to apply (by `report`).
    pub pending: Vec<String>,
}

fn names_after(version: i32) -> Vec<String> {
    MIGRATIONS
        .iter()
        .filter(|(v, _, _)| *v > version)
        .map(|(v, name, _)| format!("{v:03}_{name}"))
        .collect()
}

fn refuse_newer(found: i32) -> Result<(), OpError> {
    if found > SCHEMA_VERSION {
        return Err(OpError::Store(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        }));
    }
    Ok(())
}

/// Bring the schema up to date; changes nothing when it is.
pub(super) async fn apply(client: &mut Object) -> Result<MigrationReport, OpError> {
    let tx = super::durable_transaction(client).await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(VERSION_TABLE).await?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM flowthrough_schema",
            &[],
        )
        .await?
        .try_get(0)?;
    refuse_newer(found)?;
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO flowthrough_schema (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tracing::info!(version, name, "PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(MigrationReport {
        found,
        pending: names_after(found),
    })
}

/// Where the schema stands, changing nothing (`store migrate --check`, `doctor`).
pub(super) async fn report(client: &Object) -> Result<MigrationReport, OpError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('flowthrough_schema') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    let found = if exists {
        client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM flowthrough_schema",
                &[],
            )
            .await?
            .try_get(0)?
    } else {
        0
    };
    Ok(MigrationReport {
        found,
        pending: names_after(found),
    })
}

/// A report's verdict: `Ok` when the database is at this binary's version.
pub fn check(report: &MigrationReport) -> Result<(), StoreError> {
    if report.found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: report.found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}
