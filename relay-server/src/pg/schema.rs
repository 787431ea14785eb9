//! The PostgreSQL schema of [`PgStore`](super::PgStore), as versioned migrations.
//!
//! Each migration runs once, in its own transaction, and records its version in
//! `schema_migrations`; relays starting at once serialise on a transaction-scoped advisory lock,
//! so exactly one of them applies a migration and the others see it applied. A database whose
//! recorded version is newer than [`LATEST`] was migrated by a newer build and is refused.
//! Migrations are append-only: a released one is never edited, a change is a new version.

use deadpool_postgres::{Pool, Transaction};

use crate::error::RelayError;

/// One schema change.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its version: 1, 2, ... in order, never reused.
    pub version: u32,
    /// What it does, recorded beside the version.
    pub name: &'static str,
    /// The statements, run as one transaction.
    pub sql: &'static str,
}

/// Key of the advisory lock the migrating relays serialise on ("relay-sc" in ASCII).
const MIGRATION_LOCK: i64 = 0x7265_6c61_792d_7363;

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "orders, changes, numbers, feed, devices, tokens, relay identity",
    sql: r"
CREATE TABLE relay_meta (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);

CREATE TABLE relay_instances (
    epoch      bigint PRIMARY KEY CHECK (epoch BETWEEN 0 AND 4294967295),
    started_at bigint NOT NULL
);

CREATE TABLE stores (
    store       text PRIMARY KEY,
    last_number bigint NOT NULL DEFAULT 0 CHECK (last_number >= 0),
    feed_head   bigint NOT NULL DEFAULT 0 CHECK (feed_head >= 0)
);

CREATE TABLE orders (
    order_id   uuid PRIMARY KEY,
    store      text NOT NULL REFERENCES stores (store),
    number     bigint NOT NULL CHECK (number > 0),
    status     text NOT NULL
               CHECK (status IN ('in_progress', 'in_delivery', 'delayed', 'done', 'deleted')),
    heads      bytea NOT NULL CHECK (length(heads) % 32 = 0),
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    feed_seq   bigint NOT NULL CHECK (feed_seq > 0),
    tail_len   integer NOT NULL CHECK (tail_len >= 0),
    unnumbered boolean NOT NULL DEFAULT false,
    snapshot   bytea NOT NULL DEFAULT '',
    CONSTRAINT orders_feed_position UNIQUE (store, feed_seq)
);
CREATE INDEX orders_unnumbered ON orders (order_id) WHERE unnumbered;

CREATE TABLE order_numbers (
    store    text NOT NULL REFERENCES stores (store),
    number   bigint NOT NULL CHECK (number > 0),
    order_id uuid NOT NULL REFERENCES orders (order_id),
    PRIMARY KEY (store, number)
);

CREATE TABLE changes (
    order_id uuid NOT NULL REFERENCES orders (order_id),
    hash     bytea NOT NULL CHECK (length(hash) = 32),
    pos      integer NOT NULL CHECK (pos >= 0),
    bytes    bytea NOT NULL,
    PRIMARY KEY (order_id, hash),
    CONSTRAINT changes_position UNIQUE (order_id, pos)
);

CREATE TABLE devices (
    device_id  uuid PRIMARY KEY,
    store      text NOT NULL,
    name       text NOT NULL,
    created_at bigint NOT NULL,
    revoked    boolean NOT NULL DEFAULT false
);

CREATE TABLE tokens (
    hash       bytea PRIMARY KEY CHECK (length(hash) = 32),
    kind       text NOT NULL CHECK (kind IN ('device', 'store_admin', 'admin')),
    device_id  uuid REFERENCES devices (device_id),
    store      text,
    name       text NOT NULL,
    created_at bigint NOT NULL,
    CHECK ((kind = 'device') = (device_id IS NOT NULL)),
    CHECK ((kind = 'store_admin') = (store IS NOT NULL))
);
",
}];

/// The newest schema version this build knows.
pub const LATEST: u32 = 1;

/// Brings the database to [`LATEST`]; returns how many migrations this call applied.
pub(super) async fn migrate(pool: &Pool, schema: Option<&str>) -> Result<u32, RelayError> {
    let mut client = pool.get().await?;
    {
        let txn = client.transaction().await?;
        match bootstrap(&txn, schema).await {
            Ok(()) => txn.commit().await?,
            Err(e) => return Err(rollback(txn, e).await),
        }
    }
    let mut applied = 0;
    for m in MIGRATIONS {
        let txn = client.transaction().await?;
        match apply(&txn, m).await {
            Ok(true) => {
                txn.commit().await?;
                tracing::info!(
                    version = m.version,
                    name = m.name,
                    "applied a schema migration"
                );
                applied += 1;
            }
            // Already applied: end the transaction (and its advisory lock) now.
            Ok(false) => txn.rollback().await?,
            Err(e) => return Err(rollback(txn, e).await),
        }
    }
    Ok(applied)
}

/// Rolls back explicitly (not on drop, which only queues it) so the advisory lock is
/// released before the error reaches the caller; returns the error.
async fn rollback(txn: Transaction<'_>, e: RelayError) -> RelayError {
    if let Err(r) = txn.rollback().await {
        tracing::warn!(error = %r, "rolling back a failed migration step failed");
    }
    e
}

/// The schema and the migrations table.
async fn bootstrap(txn: &Transaction<'_>, schema: Option<&str>) -> Result<(), RelayError> {
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    if let Some(schema) = schema {
        // A plain identifier, checked by `PgStore::connect_with`.
        txn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
    }
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    Ok(())
}

/// Applies `m` unless it was; `true` if it did.
async fn apply(txn: &Transaction<'_>, m: &Migration) -> Result<bool, RelayError> {
    let version = i32::try_from(m.version)
        .map_err(|_| RelayError::Internal(format!("migration version {}", m.version)))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let newest: Option<i32> = txn
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .try_get(0)?;
    let newest = u32::try_from(newest.unwrap_or(0)).unwrap_or(0);
    if newest > LATEST {
        return Err(RelayError::Corrupt(format!(
            "the database schema is at version {newest}, newer than this build's {LATEST}: \
             run a relay at least as new as the one that migrated it"
        )));
    }
    let done = txn
        .query_opt(
            "SELECT 1 FROM schema_migrations WHERE version = $1",
            &[&version],
        )
        .await?
        .is_some();
    if done {
        return Ok(false);
    }
    txn.batch_execute(m.sql).await?;
    txn.execute(
        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
        &[&version, &m.name],
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_and_latest_is_the_last() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(LATEST));
    }
}
