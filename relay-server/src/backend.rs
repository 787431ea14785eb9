//! [`Backend`]: where the relay keeps its records, chosen at start: the embedded redb file
//! ([`RelayStore`], the default: one process, nothing to install) or a PostgreSQL database
//! shared by several relay processes ([`PgStore`], feature `postgres`).
//!
//! The hub, the HTTP handlers and the connections use the records only through this type, with
//! the same meaning whichever store it is (the redb store's semantics are the specification;
//! `docs/operations.md` lists where the two differ). The redb store is synchronous, so its
//! calls run on tokio's blocking pool; the PostgreSQL store is async and is awaited directly.
//!
//! An enum rather than a trait object: there are two stores, both known here, and the few
//! operations one of them lacks (a file backup, recovery after a file restore) answer with a
//! typed error naming what to use instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crdt_model::{DeviceId, OrderId, SealKey, StoreId};

use crate::error::RelayError;
#[cfg(feature = "postgres")]
use crate::pg::PgStore;
use crate::records::{CommitOutcome, FeedRecord, OrderMeta, OrderWrite, StoredOrder, StoredTail};
use crate::store::{
    DeviceRecord, Principal, RecoveryRecord, RelayIdentity, RelayStore, StatusFilter,
};

/// The relay's records: redb or PostgreSQL. Cheap to clone. See the [module docs](self).
#[derive(Clone, Debug)]
pub enum Backend {
    /// The embedded redb file (one relay process).
    Redb(Arc<RelayStore>),
    /// A PostgreSQL database (any number of relay processes).
    #[cfg(feature = "postgres")]
    Postgres(Arc<PgStore>),
}

/// Runs a call of the synchronous redb store on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<RelayStore>,
    f: impl FnOnce(&RelayStore) -> Result<T, RelayError> + Send + 'static,
) -> Result<T, RelayError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| RelayError::Internal(format!("store task: {e}")))?
}

impl From<Arc<RelayStore>> for Backend {
    fn from(store: Arc<RelayStore>) -> Self {
        Self::Redb(store)
    }
}

#[cfg(feature = "postgres")]
impl From<Arc<PgStore>> for Backend {
    fn from(store: Arc<PgStore>) -> Self {
        Self::Postgres(store)
    }
}

impl Backend {
    /// Whether several relay processes may share these records (PostgreSQL): the hub then
    /// listens for the others' commits and reads the feed from the database.
    pub fn is_shared(&self) -> bool {
        match self {
            Self::Redb(_) => false,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => true,
        }
    }

    /// Handles on the store (its `Arc`'s strong count): the server waits at shutdown until
    /// only its caller's remain, so the caller can open the same data again at once.
    pub fn handles(&self) -> usize {
        match self {
            Self::Redb(s) => Arc::strong_count(s),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => Arc::strong_count(s),
        }
    }

    /// What the records are, for logs: the redb file or the database.
    pub fn describe(&self) -> String {
        match self {
            Self::Redb(s) => format!("redb {}", s.path().display()),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => format!("{s:?}"),
        }
    }

    /// The redb file, when the records are one.
    pub fn redb_path(&self) -> Option<PathBuf> {
        match self {
            Self::Redb(s) => Some(s.path().to_path_buf()),
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => None,
        }
    }

    /// The relay's identity (with PostgreSQL: the database's relay device and this process's
    /// own actor epoch).
    pub fn identity(&self) -> Result<RelayIdentity, RelayError> {
        match self {
            Self::Redb(s) => s.identity(),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => Ok(s.identity()),
        }
    }

    /// The key the relay seals its own changes with.
    pub fn seal_key(&self) -> SealKey {
        match self {
            Self::Redb(s) => s.seal_key(),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.seal_key(),
        }
    }

    /// The data's id (new after every restore).
    pub fn data_id(&self) -> String {
        match self {
            Self::Redb(s) => s.data_id(),
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.data_id(),
        }
    }

    /// Commits a batch of writes durably (see [`RelayStore::commit`]).
    pub async fn commit(&self, writes: Vec<OrderWrite>) -> Result<Vec<CommitOutcome>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.commit(&writes)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.commit(&writes).await,
        }
    }

    /// The stored order, if any.
    pub async fn load_order(&self, order: OrderId) -> Result<Option<StoredOrder>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.load_order(order)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.load_order(order).await,
        }
    }

    /// The order's metadata and its tail changes from position `from` on, if stored.
    pub async fn load_tail(
        &self,
        order: OrderId,
        from: u32,
    ) -> Result<Option<StoredTail>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.load_tail(order, from)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.load_tail(order, from).await,
        }
    }

    /// Orders whose stored number their document lacks, at most `limit`.
    pub async fn unnumbered(&self, limit: usize) -> Result<Vec<OrderId>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.unnumbered(limit)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.unnumbered(limit).await,
        }
    }

    /// A store's orders passing `filter`, after feed position `since`, at most `limit`.
    pub async fn list_orders(
        &self,
        store: StoreId,
        filter: StatusFilter,
        since: u64,
        limit: usize,
    ) -> Result<Vec<OrderMeta>, RelayError> {
        match self {
            Self::Redb(s) => {
                blocking(s, move |s| s.list_orders(&store, filter, since, limit)).await
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.list_orders(&store, filter, since, limit).await,
        }
    }

    /// Feed entries of `store` after `since`, ascending, at most `limit`.
    pub async fn feed_since(
        &self,
        store: StoreId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<FeedRecord>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.feed_since(&store, since, limit)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.feed_since(&store, since, limit).await,
        }
    }

    /// The latest feed position of `store`, 0 if none.
    pub async fn feed_head(&self, store: StoreId) -> Result<u64, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.feed_head(&store)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.feed_head(&store).await,
        }
    }

    /// Who `token` authenticates as.
    pub async fn authenticate(&self, token: String) -> Result<Principal, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.authenticate(&token)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.authenticate(&token).await,
        }
    }

    /// Provisions a device of `store`; returns it and its token (shown once).
    pub async fn add_device(
        &self,
        store: StoreId,
        name: String,
        now_ms: i64,
    ) -> Result<(DeviceRecord, String), RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.add_device(&store, &name, now_ms)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.add_device(&store, &name, now_ms).await,
        }
    }

    /// Issues an admin token (for one store, or global when `store` is `None`).
    pub async fn add_admin_token(
        &self,
        store: Option<StoreId>,
        name: String,
        now_ms: i64,
    ) -> Result<String, RelayError> {
        match self {
            Self::Redb(s) => {
                blocking(s, move |s| s.add_admin_token(store.as_ref(), &name, now_ms)).await
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.add_admin_token(store.as_ref(), &name, now_ms).await,
        }
    }

    /// Replaces every global admin token with a new one named `name`; returns it and how many
    /// were replaced.
    pub async fn rotate_admin_token(
        &self,
        name: String,
        now_ms: i64,
    ) -> Result<(String, usize), RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.rotate_admin_token(&name, now_ms)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.rotate_admin_token(&name, now_ms).await,
        }
    }

    /// Whether any admin token exists.
    pub async fn has_admin_token(&self) -> Result<bool, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, RelayStore::has_admin_token).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.has_admin_token().await,
        }
    }

    /// The provisioned device, if any.
    pub async fn device(&self, device: DeviceId) -> Result<Option<DeviceRecord>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.device(device)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.device(device).await,
        }
    }

    /// Devices of `store` (every store when `None`).
    pub async fn list_devices(
        &self,
        store: Option<StoreId>,
    ) -> Result<Vec<DeviceRecord>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.list_devices(store.as_ref())).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.list_devices(store.as_ref()).await,
        }
    }

    /// Revokes a device: its token no longer authenticates.
    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.revoke_device(device)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(s) => s.revoke_device(device).await,
        }
    }

    /// A consistent copy of the records in the file `to` (redb only; a PostgreSQL deployment
    /// is backed up with `pg_dump` or PITR, see `docs/operations.md`). Returns the orders
    /// copied.
    pub async fn backup_to(&self, to: PathBuf) -> Result<u64, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.backup_to(&to)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Err(RelayError::Invalid(
                "this relay keeps its records in PostgreSQL: back it up with pg_dump or \
                 point-in-time recovery (docs/operations.md)"
                    .into(),
            )),
        }
    }

    /// Stores in recovery after a restore of the redb file (none with PostgreSQL, whose
    /// restores are the database's own).
    pub async fn recovering_stores(&self) -> Result<Vec<StoreId>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, RelayStore::recovering_stores).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// The recovery record of `store`, if it was restored.
    pub async fn recovery(&self, store: StoreId) -> Result<Option<RecoveryRecord>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.recovery(&store)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Ok(None),
        }
    }

    /// A till of a recovering store said hello with the highest number it holds; `true` when
    /// that ends the store's recovery.
    pub async fn recovery_hello(
        &self,
        store: StoreId,
        device: DeviceId,
        highest: u64,
    ) -> Result<bool, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.recovery_hello(&store, device, highest)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Ok(false),
        }
    }

    /// Ends `store`'s recovery by hand; the devices not heard from, or `None` if it was not
    /// recovering.
    pub async fn release_recovery(
        &self,
        store: StoreId,
    ) -> Result<Option<Vec<DeviceId>>, RelayError> {
        match self {
            Self::Redb(s) => blocking(s, move |s| s.release_recovery(&store)).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Ok(None),
        }
    }

    /// When the redb file was taken as a backup and not restored (`serve` refuses those).
    pub fn backup_taken_at(&self) -> Result<Option<i64>, RelayError> {
        match self {
            Self::Redb(s) => s.backup_taken_at(),
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => Ok(None),
        }
    }
}

/// Where the relay's records are, as given on the command line: a directory for the redb
/// file, or a `postgres://` / `postgresql://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// `<dir>/relay.redb`.
    Dir(PathBuf),
    /// A PostgreSQL database.
    Postgres(String),
}

impl StoreLocation {
    /// Reads `s`: a PostgreSQL URL, or else a directory.
    pub fn parse(s: &str) -> Self {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Self::Postgres(s.to_owned())
        } else {
            Self::Dir(Path::new(s).to_path_buf())
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => write!(f, "{}", d.display()),
            // The URL may carry a password: show where, not how.
            Self::Postgres(url) => {
                let shown = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
                write!(f, "postgres://…@{shown}")
            }
        }
    }
}
