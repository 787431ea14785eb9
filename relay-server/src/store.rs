//! [`RelayStore`]: the relay's durable state in one redb file, `<dir>/relay.redb`.
//!
//! The store is synchronous (blocking): the async parts of the relay call it from a dedicated
//! thread or `spawn_blocking`. It holds, per order, the metadata ([`OrderMeta`]), a compacted
//! Automerge snapshot and a tail of raw changes appended since; per store, the order-number
//! counter and the store feed (one entry per order, its latest change); the provisioned devices
//! and the hashes of access tokens; and the relay's own identity.
//!
//! Every [`RelayStore::commit`] is one redb write transaction with immediate durability, so a
//! batch of writes (group commit) is on disk, whole, when it returns, or not at all.
//! The table layout and key encodings are in [`tables`].

mod check;
mod codec;
pub mod tables;

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crdt_model::automerge::Automerge;
use crdt_model::{DeviceId, OrderId, OrderNumber, OrderStatus, StoreId, Writer};
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageError, TableDefinition, TableError, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use check::CheckReport;

use crate::error::RelayError;
use codec::{decode_identity, decode_meta, encode_meta};
use tables::{
    DB_FILE, DEVICES, FEED, FORMAT_VERSION, META, META_FORMAT, META_IDENTITY, NUMBERS, ORDERS,
    SNAPSHOTS, STORES, TAIL, TOKENS,
};

/// Prefix of device tokens.
pub const DEVICE_TOKEN_PREFIX: &str = "dev_";
/// Prefix of admin tokens (global or per store).
pub const ADMIN_TOKEN_PREFIX: &str = "adm_";
/// Longest device or token name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The relay's own identity: the device id its changes (order numbers, back-office edits) are
/// written as, and the epoch of its Automerge actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayIdentity {
    /// The relay's device id (a random UUID v4 made on first open).
    pub device: DeviceId,
    /// The actor epoch (random, made on first open).
    pub epoch: u32,
}

impl RelayIdentity {
    /// The model writer the relay commits its own changes as.
    pub fn writer(&self) -> Writer {
        Writer::new(self.device, self.epoch)
    }
}

/// Everything stored about one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrder {
    /// The order's metadata.
    pub meta: OrderMeta,
    /// The last compacted document (`Automerge::save()`), empty before the first compaction.
    pub snapshot: Vec<u8>,
    /// Raw Automerge changes appended since the snapshot, in commit order.
    pub tail: Vec<Vec<u8>>,
}

impl StoredOrder {
    /// The document: the snapshot loaded, then every tail change applied incrementally.
    /// Stored bytes that do not load give [`RelayError::Corrupt`].
    pub fn to_doc(&self) -> Result<Automerge, RelayError> {
        let mut doc = if self.snapshot.is_empty() {
            Automerge::new()
        } else {
            Automerge::load(&self.snapshot).map_err(|e| {
                RelayError::Corrupt(format!("order {}: snapshot: {e}", self.meta.order))
            })?
        };
        for (i, change) in self.tail.iter().enumerate() {
            doc.load_incremental(change).map_err(|e| {
                RelayError::Corrupt(format!("order {}: tail change {i}: {e}", self.meta.order))
            })?;
        }
        Ok(doc)
    }
}

/// What the relay keeps about an order beside its document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderMeta {
    /// The order.
    pub order: OrderId,
    /// Its store.
    pub store: StoreId,
    /// The number the relay assigned (per store, from 1).
    pub number: OrderNumber,
    /// Effective business status as of the last write.
    pub status: OrderStatus,
    /// Heads of the stored document.
    pub heads: Vec<[u8; 32]>,
    /// First persist, ms since the epoch (relay clock).
    pub created_at: i64,
    /// Last write, ms since the epoch (relay clock).
    pub updated_at: i64,
    /// The order's current position in its store's feed.
    pub feed_seq: u64,
    /// Number of changes in the tail after the snapshot.
    pub tail_len: u32,
}

/// One order's write within a [`RelayStore::commit`] batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderWrite {
    /// The order.
    pub order: OrderId,
    /// Its store; must equal the stored store of a known order.
    pub store: StoreId,
    /// Raw Automerge change bytes to append to the tail (ignored when `compacted` is set).
    pub changes: Vec<Vec<u8>>,
    /// A full `Automerge::save()` that replaces the snapshot and the whole tail.
    pub compacted: Option<Vec<u8>>,
    /// Effective status after this write.
    pub status: OrderStatus,
    /// Heads after this write.
    pub heads: Vec<[u8; 32]>,
    /// When, ms since the epoch (relay clock).
    pub at: i64,
}

/// The result of one [`OrderWrite`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The order.
    pub order: OrderId,
    /// Its number (new or kept).
    pub number: OrderNumber,
    /// `true` when this write assigned the number (the order's first persist).
    pub newly_numbered: bool,
    /// The order's new feed position.
    pub feed_seq: u64,
    /// The metadata as stored after this write.
    pub meta: OrderMeta,
}

/// One entry of a store feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedRecord {
    /// Position in the store's feed.
    pub seq: u64,
    /// The order's metadata (its latest; `meta.feed_seq == seq`).
    pub meta: OrderMeta,
}

/// Which orders [`RelayStore::list_orders`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    /// InProgress, InDelivery or Delayed.
    Active,
    /// Done.
    Done,
    /// Deleted.
    Deleted,
    /// Every order.
    Any,
}

impl StatusFilter {
    /// Whether an order with `status` passes the filter.
    pub fn matches(self, status: OrderStatus) -> bool {
        match self {
            Self::Active => !status.is_terminal(),
            Self::Done => status == OrderStatus::Done,
            Self::Deleted => status == OrderStatus::Deleted,
            Self::Any => true,
        }
    }
}

/// A provisioned device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device id (made by the relay at provisioning).
    pub device: DeviceId,
    /// The store it belongs to.
    pub store: StoreId,
    /// Human name ("till 2").
    pub name: String,
    /// When it was provisioned, ms since the epoch.
    pub created_at: i64,
    /// Revoked devices no longer authenticate.
    pub revoked: bool,
}

/// Who a token authenticates as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A terminal of one store.
    Device {
        /// The device.
        device: DeviceId,
        /// Its store.
        store: StoreId,
    },
    /// The back office of one store.
    StoreAdmin {
        /// The store.
        store: StoreId,
    },
    /// The relay's operator: every store.
    Admin,
}

/// What a stored token grants (JSON in [`tables::TOKENS`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Grant {
    Device { device: DeviceId },
    StoreAdmin { store: StoreId },
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecord {
    grant: Grant,
    name: String,
    created_at: i64,
}

/// The relay's redb store. See the [module docs](self).
pub struct RelayStore {
    db: Database,
    path: PathBuf,
    identity: RelayIdentity,
}

impl std::fmt::Debug for RelayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStore")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn set_immediate(txn: &mut WriteTransaction) -> Result<(), RelayError> {
    txn.set_durability(Durability::Immediate)
        .map_err(|e| RelayError::Storage(e.to_string()))
}

/// Maps a failed open of the database file to a typed error naming the file.
fn open_error(path: &Path, e: DatabaseError) -> RelayError {
    let shown = path.display();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            RelayError::Locked(path.to_path_buf())
        }
        DatabaseError::Storage(StorageError::Io(io)) if io.kind() == ErrorKind::InvalidData => {
            RelayError::Corrupt(format!("{shown}: not a redb database ({io})"))
        }
        DatabaseError::Storage(StorageError::Io(io)) if io.kind() == ErrorKind::WouldBlock => {
            RelayError::Locked(path.to_path_buf())
        }
        DatabaseError::Storage(StorageError::Corrupted(why)) => {
            RelayError::Corrupt(format!("{shown}: damaged database: {why}"))
        }
        other => RelayError::Open {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// A table that exists with other types (or as a multimap) means the file is not ours.
fn table_error(path: &Path, e: TableError) -> RelayError {
    match e {
        TableError::Storage(s) => s.into(),
        TableError::TableDoesNotExist(t) => {
            RelayError::Corrupt(format!("{}: table {t} is missing", path.display()))
        }
        other => RelayError::Corrupt(format!("{}: not a relay database: {other}", path.display())),
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token(prefix: &str) -> Result<String, RelayError> {
    let bytes = codec::random_bytes::<32>()?;
    Ok(format!("{prefix}{}", codec::hex(&bytes)))
}

fn check_name(name: &str) -> Result<(), RelayError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(RelayError::Invalid(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes of printable text"
        )));
    }
    Ok(())
}

/// redb page cache used by [`RelayStore::open`]: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

impl RelayStore {
    /// Opens (creating if missing) `dir` and `dir/relay.redb`.
    ///
    /// A database held by another handle gives [`RelayError::Locked`]; a file that is not a
    /// redb database, is damaged, is a foreign redb database or has an unknown format version
    /// gives [`RelayError::Corrupt`] naming the file; other failures [`RelayError::Open`]. An
    /// existing non-empty file is never initialised, overwritten or truncated: it is opened
    /// without the create flag, and redb verifies every page checksum on open (so damage is a
    /// typed error rather than a panic later).
    pub fn open(dir: &Path) -> Result<Self, RelayError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`RelayStore::open`] with redb's page cache limited to `cache_bytes`. The hub keeps the
    /// hot orders' documents in memory itself, so redb's cache mostly serves metadata, the
    /// feed and cache misses; a large one only adds resident memory (redb's default is 1 GiB,
    /// which the integrity check on open fills on a big database).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, RelayError> {
        std::fs::create_dir_all(dir).map_err(|e| RelayError::Open {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let path = dir.join(DB_FILE);
        let existing = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len() > 0,
            Ok(_) => {
                return Err(RelayError::Open {
                    path,
                    reason: "not a regular file".into(),
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => {
                return Err(RelayError::Open {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(true);
        builder.set_cache_size(cache_bytes);
        let db = if existing {
            builder.open(&path)
        } else {
            builder.create(&path)
        }
        .map_err(|e| open_error(&path, e))?;
        let identity = Self::init(&db, &path)?;
        Ok(Self { db, path, identity })
    }

    /// Checks or writes the format version and identity, and makes sure every table exists.
    fn init(db: &Database, path: &Path) -> Result<RelayIdentity, RelayError> {
        let mut txn = db.begin_write()?;
        set_immediate(&mut txn)?;
        let present: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
        let identity = {
            let mut meta = txn.open_table(META).map_err(|e| table_error(path, e))?;
            let format = meta
                .get(META_FORMAT)?
                .map(|v| codec::decode_format(v.value()));
            match format {
                Some(v) => {
                    let v =
                        v.map_err(|e| RelayError::Corrupt(format!("{}: {e}", path.display())))?;
                    if v != FORMAT_VERSION {
                        return Err(RelayError::Corrupt(format!(
                            "{}: unknown format version {v} (this build reads {FORMAT_VERSION})",
                            path.display()
                        )));
                    }
                }
                None => {
                    let foreign = txn.list_multimap_tables()?.count() > 0
                        || present.iter().any(|t| t != "meta")
                        || meta.len()? > 0;
                    if foreign {
                        return Err(RelayError::Corrupt(format!(
                            "{}: a redb database without a relay format version",
                            path.display()
                        )));
                    }
                    meta.insert(META_FORMAT, &codec::encode_format(FORMAT_VERSION)[..])?;
                }
            }
            let stored = meta.get(META_IDENTITY)?.map(|v| decode_identity(v.value()));
            match stored {
                Some(id) => {
                    id.map_err(|e| RelayError::Corrupt(format!("{}: {e}", path.display())))?
                }
                None => {
                    let id = RelayIdentity {
                        device: codec::random_device_id()?,
                        epoch: u32::from_be_bytes(codec::random_bytes::<4>()?),
                    };
                    meta.insert(META_IDENTITY, &codec::encode_identity(&id)[..])?;
                    id
                }
            }
        };
        // Create the other tables (or check their types).
        txn.open_table(ORDERS).map_err(|e| table_error(path, e))?;
        txn.open_table(SNAPSHOTS)
            .map_err(|e| table_error(path, e))?;
        txn.open_table(TAIL).map_err(|e| table_error(path, e))?;
        txn.open_table(FEED).map_err(|e| table_error(path, e))?;
        txn.open_table(NUMBERS).map_err(|e| table_error(path, e))?;
        txn.open_table(STORES).map_err(|e| table_error(path, e))?;
        txn.open_table(DEVICES).map_err(|e| table_error(path, e))?;
        txn.open_table(TOKENS).map_err(|e| table_error(path, e))?;
        txn.commit()?;
        Ok(identity)
    }

    /// The database file (`<dir>/relay.redb`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The relay's identity, made on first open and stable across reopens.
    pub fn identity(&self) -> Result<RelayIdentity, RelayError> {
        Ok(self.identity)
    }

    /// The underlying database, for tests and tools that need raw access.
    #[doc(hidden)]
    pub fn raw_db(&self) -> &Database {
        &self.db
    }

    fn read(&self) -> Result<ReadTransaction, RelayError> {
        Ok(self.db.begin_read()?)
    }

    /// Persists a batch of order writes in one write transaction with immediate durability
    /// (group commit): on return, all of them are on disk, or (on error) none.
    ///
    /// An order not yet stored gets the next number of its store (from 1, gap-free), exactly
    /// once. A known order keeps its number, and its store must match (else
    /// [`RelayError::Invalid`] and nothing of the batch is written). Changes are appended to the
    /// tail, or `compacted` replaces snapshot and tail. Each write moves the order to the next
    /// position of its store's feed. Writes for the same order apply in slice order.
    pub fn commit(&self, writes: &[OrderWrite]) -> Result<Vec<CommitOutcome>, RelayError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        match Self::apply(&txn, writes) {
            Ok(out) => {
                txn.commit()?;
                Ok(out)
            }
            Err(e) => {
                // Nothing of the batch is written.
                if let Err(abort) = txn.abort() {
                    tracing::warn!(error = %abort, "aborting a refused batch failed");
                }
                Err(e)
            }
        }
    }

    fn apply(
        txn: &WriteTransaction,
        writes: &[OrderWrite],
    ) -> Result<Vec<CommitOutcome>, RelayError> {
        let mut orders = txn.open_table(ORDERS)?;
        let mut snapshots = txn.open_table(SNAPSHOTS)?;
        let mut tail = txn.open_table(TAIL)?;
        let mut feed = txn.open_table(FEED)?;
        let mut numbers = txn.open_table(NUMBERS)?;
        let mut stores = txn.open_table(STORES)?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let key = *w.order.as_bytes();
            let store = w.store.as_str();
            let prev = orders
                .get(key)?
                .map(|g| decode_meta(g.value()))
                .transpose()?;
            if let Some(prev) = &prev
                && prev.store != w.store
            {
                return Err(RelayError::Invalid(format!(
                    "order {} belongs to store {}, not {}",
                    w.order, prev.store, w.store
                )));
            }
            let (mut last_number, feed_head) =
                stores.get(store)?.map(|g| g.value()).unwrap_or((0, 0));
            let feed_seq = feed_head
                .checked_add(1)
                .ok_or_else(|| RelayError::Storage(format!("feed of store {store} is full")))?;
            let (number, newly_numbered, created_at, old_tail, old_seq) = match &prev {
                Some(p) => (p.number, false, p.created_at, p.tail_len, Some(p.feed_seq)),
                None => {
                    last_number = last_number.checked_add(1).ok_or_else(|| {
                        RelayError::Storage(format!("order numbers of store {store} exhausted"))
                    })?;
                    numbers.insert((store, last_number), key)?;
                    (OrderNumber(last_number), true, w.at, 0, None)
                }
            };
            stores.insert(store, (last_number, feed_seq))?;

            let tail_len = if let Some(snapshot) = &w.compacted {
                snapshots.insert(key, snapshot.as_slice())?;
                tail.retain_in((key, 0u32)..=(key, u32::MAX), |_, _| false)?;
                0
            } else {
                if prev.is_none() {
                    snapshots.insert(key, &[][..])?;
                }
                let mut len = old_tail;
                for change in &w.changes {
                    tail.insert((key, len), change.as_slice())?;
                    len = len.checked_add(1).ok_or_else(|| {
                        RelayError::Invalid(format!("order {}: tail is full, compact it", w.order))
                    })?;
                }
                len
            };

            if let Some(old) = old_seq {
                feed.remove((store, old))?;
            }
            feed.insert((store, feed_seq), key)?;

            let meta = OrderMeta {
                order: w.order,
                store: w.store.clone(),
                number,
                status: w.status,
                heads: w.heads.clone(),
                created_at,
                updated_at: w.at,
                feed_seq,
                tail_len,
            };
            orders.insert(key, encode_meta(&meta)?.as_slice())?;
            out.push(CommitOutcome {
                order: w.order,
                number,
                newly_numbered,
                feed_seq,
                meta,
            });
        }
        Ok(out)
    }

    /// The order's metadata, snapshot and tail, if stored.
    pub fn load_order(&self, order: OrderId) -> Result<Option<StoredOrder>, RelayError> {
        let txn = self.read()?;
        let key = *order.as_bytes();
        let Some(meta) = txn
            .open_table(ORDERS)?
            .get(key)?
            .map(|g| decode_meta(g.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let snapshot = txn
            .open_table(SNAPSHOTS)?
            .get(key)?
            .map(|g| g.value().to_vec())
            .ok_or_else(|| RelayError::Corrupt(format!("order {order}: snapshot missing")))?;
        let tail_table = txn.open_table(TAIL)?;
        let mut tail = Vec::new();
        for entry in tail_table.range((key, 0u32)..=(key, u32::MAX))? {
            let (_, v) = entry?;
            tail.push(v.value().to_vec());
        }
        if tail.len() != usize::try_from(meta.tail_len).unwrap_or(usize::MAX) {
            return Err(RelayError::Corrupt(format!(
                "order {order}: {} tail changes stored, metadata says {}",
                tail.len(),
                meta.tail_len
            )));
        }
        Ok(Some(StoredOrder {
            meta,
            snapshot,
            tail,
        }))
    }

    /// The order's metadata, if stored.
    pub fn order_meta(&self, order: OrderId) -> Result<Option<OrderMeta>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(ORDERS)?;
        let meta = table
            .get(*order.as_bytes())?
            .map(|g| decode_meta(g.value()))
            .transpose()?;
        Ok(meta)
    }

    /// The order with `number` in `store`, if any.
    pub fn order_by_number(
        &self,
        store: &StoreId,
        number: OrderNumber,
    ) -> Result<Option<OrderId>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(NUMBERS)?;
        let id = table.get((store.as_str(), number.0))?.map(|g| g.value());
        id.map(|b| codec::order_id(&b)).transpose()
    }

    /// Feed entries of `store` with `seq > since`, ascending, at most `limit`.
    pub fn feed_since(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<FeedRecord>, RelayError> {
        let mut out = Vec::new();
        self.scan_feed(
            store,
            since,
            |seq, meta| {
                out.push(FeedRecord { seq, meta });
                out.len() < limit
            },
            limit,
        )?;
        Ok(out)
    }

    /// Walks `store`'s feed after `since`, calling `f` until it returns `false`.
    fn scan_feed(
        &self,
        store: &StoreId,
        since: u64,
        mut f: impl FnMut(u64, OrderMeta) -> bool,
        limit: usize,
    ) -> Result<(), RelayError> {
        let Some(first) = since.checked_add(1) else {
            return Ok(());
        };
        if limit == 0 {
            return Ok(());
        }
        let txn = self.read()?;
        let feed = txn.open_table(FEED)?;
        let orders = txn.open_table(ORDERS)?;
        let s = store.as_str();
        for entry in feed.range((s, first)..=(s, u64::MAX))? {
            let (k, v) = entry?;
            let (_, seq) = k.value();
            let id = v.value();
            let meta = orders
                .get(id)?
                .map(|g| decode_meta(g.value()))
                .transpose()?
                .ok_or_else(|| {
                    RelayError::Corrupt(format!(
                        "feed entry {s}/{seq} names unknown order {}",
                        codec::uuid_text(&id)
                    ))
                })?;
            if !f(seq, meta) {
                break;
            }
        }
        Ok(())
    }

    /// The latest feed sequence of `store`, 0 if it has none.
    pub fn feed_head(&self, store: &StoreId) -> Result<u64, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(STORES)?;
        let head = table.get(store.as_str())?.map(|g| g.value().1);
        Ok(head.unwrap_or(0))
    }

    /// Orders of `store` passing `filter` with `feed_seq > since_feed_seq`, ascending by
    /// `feed_seq`, at most `limit`. The next page starts after the last `feed_seq` returned.
    pub fn list_orders(
        &self,
        store: &StoreId,
        filter: StatusFilter,
        since_feed_seq: u64,
        limit: usize,
    ) -> Result<Vec<OrderMeta>, RelayError> {
        let mut out = Vec::new();
        self.scan_feed(
            store,
            since_feed_seq,
            |_, meta| {
                if filter.matches(meta.status) {
                    out.push(meta);
                }
                out.len() < limit
            },
            limit,
        )?;
        Ok(out)
    }

    /// How many orders are stored (all stores).
    pub fn order_count(&self) -> Result<u64, RelayError> {
        let txn = self.read()?;
        Ok(txn.open_table(ORDERS)?.len()?)
    }

    /// Provisions a device of `store` and returns it with its token (`dev_` + 64 hex digits).
    /// Only the token's SHA-256 is stored: the token is shown this once.
    pub fn add_device(
        &self,
        store: &StoreId,
        name: &str,
        now_ms: i64,
    ) -> Result<(DeviceRecord, String), RelayError> {
        check_name(name)?;
        let record = DeviceRecord {
            device: codec::random_device_id()?,
            store: store.clone(),
            name: name.to_owned(),
            created_at: now_ms,
            revoked: false,
        };
        let token = new_token(DEVICE_TOKEN_PREFIX)?;
        let grant = TokenRecord {
            grant: Grant::Device {
                device: record.device,
            },
            name: name.to_owned(),
            created_at: now_ms,
        };
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let key = *record.device.as_bytes();
            if devices.get(key)?.is_some() {
                return Err(RelayError::Storage("device id collision, retry".into()));
            }
            devices.insert(key, codec::to_json(&record)?.as_slice())?;
            txn.open_table(TOKENS)?
                .insert(token_hash(&token), codec::to_json(&grant)?.as_slice())?;
        }
        txn.commit()?;
        Ok((record, token))
    }

    /// Creates an admin token (`adm_` + 64 hex digits): for one store's back office with
    /// `Some(store)`, for the relay's operator with `None`. Only its SHA-256 is stored.
    pub fn add_admin_token(
        &self,
        store: Option<&StoreId>,
        name: &str,
        now_ms: i64,
    ) -> Result<String, RelayError> {
        check_name(name)?;
        let token = new_token(ADMIN_TOKEN_PREFIX)?;
        let grant = TokenRecord {
            grant: match store {
                Some(s) => Grant::StoreAdmin { store: s.clone() },
                None => Grant::Admin,
            },
            name: name.to_owned(),
            created_at: now_ms,
        };
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        txn.open_table(TOKENS)?
            .insert(token_hash(&token), codec::to_json(&grant)?.as_slice())?;
        txn.commit()?;
        Ok(token)
    }

    /// `true` if any admin token (global or for a store) exists.
    pub fn has_admin_token(&self) -> Result<bool, RelayError> {
        let txn = self.read()?;
        let tokens = txn.open_table(TOKENS)?;
        for entry in tokens.iter()? {
            let (_, v) = entry?;
            let record: TokenRecord = codec::from_json("token record", v.value())?;
            if !matches!(record.grant, Grant::Device { .. }) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Who `token` belongs to. Unknown and malformed tokens give
    /// [`RelayError::Unauthorized`], a revoked device's token [`RelayError::Revoked`].
    pub fn authenticate(&self, token: &str) -> Result<Principal, RelayError> {
        let (is_device, secret) = if let Some(rest) = token.strip_prefix(DEVICE_TOKEN_PREFIX) {
            (true, rest)
        } else if let Some(rest) = token.strip_prefix(ADMIN_TOKEN_PREFIX) {
            (false, rest)
        } else {
            return Err(RelayError::Unauthorized);
        };
        if !codec::is_lower_hex(secret, 64) {
            return Err(RelayError::Unauthorized);
        }
        let txn = self.read()?;
        let tokens = txn.open_table(TOKENS)?;
        let Some(record) = tokens
            .get(token_hash(token))?
            .map(|g| codec::from_json::<TokenRecord>("token record", g.value()))
            .transpose()?
        else {
            return Err(RelayError::Unauthorized);
        };
        match (is_device, record.grant) {
            (true, Grant::Device { device }) => {
                let devices = txn.open_table(DEVICES)?;
                let rec = devices
                    .get(*device.as_bytes())?
                    .map(|g| codec::from_json::<DeviceRecord>("device record", g.value()))
                    .transpose()?;
                match rec {
                    Some(rec) if !rec.revoked => Ok(Principal::Device {
                        device: rec.device,
                        store: rec.store,
                    }),
                    Some(_) => Err(RelayError::Revoked),
                    None => Err(RelayError::Unauthorized),
                }
            }
            (false, Grant::StoreAdmin { store }) => Ok(Principal::StoreAdmin { store }),
            (false, Grant::Admin) => Ok(Principal::Admin),
            _ => Err(RelayError::Unauthorized),
        }
    }

    /// Revokes a device: its token stops authenticating. [`RelayError::NotFound`] if unknown;
    /// revoking twice is not an error.
    pub fn revoke_device(&self, device: DeviceId) -> Result<(), RelayError> {
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let key = *device.as_bytes();
            let rec = devices
                .get(key)?
                .map(|g| codec::from_json::<DeviceRecord>("device record", g.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Err(RelayError::NotFound(format!("device {device}")));
            };
            rec.revoked = true;
            devices.insert(key, codec::to_json(&rec)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Provisioned devices (revoked ones included), of one store or of all, oldest first.
    pub fn list_devices(&self, store: Option<&StoreId>) -> Result<Vec<DeviceRecord>, RelayError> {
        let txn = self.read()?;
        let devices = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for entry in devices.iter()? {
            let (_, v) = entry?;
            let rec: DeviceRecord = codec::from_json("device record", v.value())?;
            if store.is_none_or(|s| *s == rec.store) {
                out.push(rec);
            }
        }
        out.sort_by_key(|d| (d.created_at, d.device));
        Ok(out)
    }

    /// One device's record, if provisioned.
    pub fn device(&self, device: DeviceId) -> Result<Option<DeviceRecord>, RelayError> {
        let txn = self.read()?;
        let devices = txn.open_table(DEVICES)?;
        let rec = devices
            .get(*device.as_bytes())?
            .map(|g| codec::from_json("device record", g.value()))
            .transpose()?;
        Ok(rec)
    }

    /// Writes a consistent copy of the whole store to a new redb file at `file` (refused with
    /// [`RelayError::Invalid`] if it exists) while the relay keeps serving: everything is read
    /// in one read transaction, written in one transaction and fsynced. Returns the number of
    /// orders copied. The copy opens with [`RelayStore::open`] as `relay.redb` of a directory.
    ///
    /// The copy keeps the relay's device id but gets a fresh actor epoch, so a relay restored
    /// from it never reuses Automerge sequence numbers it wrote after the backup.
    pub fn backup_to(&self, file: &Path) -> Result<u64, RelayError> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => {
                    RelayError::Invalid(format!("{} already exists", file.display()))
                }
                _ => RelayError::Open {
                    path: file.to_path_buf(),
                    reason: e.to_string(),
                },
            })?;
        let result = self.write_backup(file);
        if result.is_err() {
            // The file is ours (created above): do not leave a partial backup behind.
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!(file = %file.display(), error = %e, "removing a failed backup");
            }
        }
        result
    }

    fn write_backup(&self, file: &Path) -> Result<u64, RelayError> {
        let dst = Database::create(file).map_err(|e| open_error(file, e))?;
        let src = self.read()?;
        let mut w = dst.begin_write()?;
        set_immediate(&mut w)?;
        copy_table(&src, &w, META)?;
        let orders = copy_table(&src, &w, ORDERS)?;
        copy_table(&src, &w, SNAPSHOTS)?;
        copy_table(&src, &w, TAIL)?;
        copy_table(&src, &w, FEED)?;
        copy_table(&src, &w, NUMBERS)?;
        copy_table(&src, &w, STORES)?;
        copy_table(&src, &w, DEVICES)?;
        copy_table(&src, &w, TOKENS)?;
        {
            let mut epoch = self.identity.epoch;
            while epoch == self.identity.epoch {
                epoch = u32::from_be_bytes(codec::random_bytes::<4>()?);
            }
            let id = RelayIdentity {
                device: self.identity.device,
                epoch,
            };
            w.open_table(META)?
                .insert(META_IDENTITY, &codec::encode_identity(&id)[..])?;
        }
        w.commit()?;
        drop(src);
        dst.close().map_err(|e| open_error(file, e))?;
        File::open(file)?.sync_all()?;
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = File::open(parent).and_then(|d| d.sync_all())
        {
            tracing::warn!(dir = %parent.display(), error = %e, "fsync of the backup's directory");
        }
        Ok(orders)
    }
}

/// Copies every entry of one table from `src` into `dst`; returns how many.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &ReadTransaction,
    dst: &WriteTransaction,
    def: TableDefinition<'static, K, V>,
) -> Result<u64, RelayError> {
    let from = src.open_table(def)?;
    let mut to = dst.open_table(def)?;
    let mut n = 0u64;
    for entry in from.iter()? {
        let (k, v) = entry?;
        to.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}
