//! PostgreSQL for tests and `pos-sim`: the database named by `RELAY_TEST_POSTGRES` (or given
//! on the command line), one fresh schema per run, dropped at the end.

use std::sync::Arc;

use anyhow::{Context, Result};
use relay_server::pg::{PgOptions, PgStore};

/// The variable naming the test database (`.ci/run` sets it).
pub const ENV: &str = "RELAY_TEST_POSTGRES";

/// The test database's URL, or `None` after printing one line on how to enable `test`.
pub fn database(test: &str) -> Option<String> {
    match std::env::var(ENV) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            println!(
                "skipped {test}: set {ENV} to a PostgreSQL URL to run it \
                 (e.g. {ENV}=postgres://postgres@127.0.0.1:5432/test)"
            );
            None
        }
    }
}

/// A schema of its own in the database, for one run: relays connect to it with
/// [`TestSchema::options`]; [`TestSchema::drop_schema`] removes it.
#[derive(Debug)]
pub struct TestSchema {
    /// The database URL.
    pub url: String,
    /// The schema's name.
    pub name: String,
}

impl TestSchema {
    /// A new schema name (`<prefix>_<random>`); the schema is made by the first relay that
    /// connects.
    pub fn new(url: &str, prefix: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id()) << 64;
        Self {
            url: url.to_owned(),
            name: format!("{prefix}_{:x}", n as u64 ^ (n >> 64) as u64),
        }
    }

    /// Connection options for a relay (pool of `pool` connections) in this schema.
    pub fn options(&self, pool: usize) -> PgOptions {
        PgOptions::new(self.url.clone(), pool).in_schema(self.name.clone())
    }

    /// A store (one relay process's) on this schema.
    pub async fn connect(&self, pool: usize) -> Result<Arc<PgStore>> {
        let store = PgStore::connect_with(&self.options(pool))
            .await
            .with_context(|| format!("PostgreSQL at {} (schema {})", self.url, self.name))?;
        Ok(Arc::new(store))
    }

    /// Drops the schema and everything in it (through `store`'s pool).
    pub async fn drop_schema(&self, store: &PgStore) -> Result<()> {
        let client = store.pool().get().await?;
        client
            .batch_execute(&format!(
                "SET lock_timeout = '60s'; DROP SCHEMA IF EXISTS {} CASCADE",
                self.name
            ))
            .await?;
        Ok(())
    }
}
