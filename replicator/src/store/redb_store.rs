//! [`RedbStore`]: the device's local [`Store`] in one redb file (`till.redb`, say).
//!
//! One file per device holds the identity, the store-feed position and, per order, the
//! device-only [`OrderRecord`], the last compacted Automerge snapshot and the tail of raw changes
//! appended since. Every [`Store`] method that writes is one redb write transaction with
//! [`Durability::Immediate`]: when it returns `Ok`, the data is on disk, whole; on error, none
//! of it is. Reads use read transactions.
//!
//! # Tables
//!
//! | table | key | value |
//! |---|---|---|
//! | [`META`] | `&str` name | bytes: [`META_FORMAT`] = u32 BE [`FORMAT_VERSION`], [`META_IDENTITY`] = [`Identity`] as JSON, [`META_FEED_SEQ`] = u64 BE |
//! | [`RECORDS`] | order id, 16 bytes | [`OrderRecord`] as JSON; one row per order on the device |
//! | [`SNAPSHOTS`] | order id | the last compacted `save()`; no row while the snapshot is empty |
//! | [`TAIL`] | (order id, index u32) | one raw change (or incremental save) appended after the snapshot |
//!
//! Tuple keys sort component by component, so a range over `(order, ..)` reads exactly one
//! order's tail, in index order; order ids sort as their bytes, which is [`OrderId`]'s order.
//!
//! # Opening
//!
//! [`RedbStore::open`] never writes to a file it has not recognised as its own. An existing,
//! non-empty file is first opened **read-only** and checked: it must be a redb database whose
//! tables are all ours, with our format version in [`META`] (or a redb database with no table
//! at all, which a crash during the very first open can leave behind). Only then is it opened
//! for writing, with redb's integrity check, which verifies the checksum of every page. Garbage,
//! a damaged database, a foreign redb file (the relay's `relay.redb`, say) or an unknown format
//! version all give [`ReplicatorError::Open`] naming the file and leave it byte for byte as it
//! was. A file another handle holds gives [`ReplicatorError::Open`] saying it is in use.
//!
//! The one exception: a redb file that was not closed cleanly cannot be checked read-only, so
//! it is opened for writing at once, and redb repairs it before the format check runs.

use std::fmt;
use std::io::ErrorKind;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use crdt_model::OrderId;
use redb::{
    Database, DatabaseError, Durability, ReadOnlyDatabase, ReadTransaction, ReadableDatabase,
    ReadableTable, StorageError, TableDefinition, TableHandle, WriteTransaction,
};

use crate::core::Effect;
use crate::error::ReplicatorError;
use crate::store::{Identity, OrderRecord, Store, StoredOrder};

/// The on-disk format this build reads and writes. A file with any other value is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Key in [`META`] of the format version (u32 big-endian). The name is specific to this crate,
/// so another program's `meta` table (the relay's has a `format` key) is never taken for ours.
pub const META_FORMAT: &str = "replicator.format";
/// Key in [`META`] of the device [`Identity`] (JSON).
pub const META_IDENTITY: &str = "identity";
/// Key in [`META`] of the last store-feed sequence processed (u64 big-endian).
pub const META_FEED_SEQ: &str = "feed_seq";
/// Key in [`META`] of the relay data id last synced with (UTF-8).
pub const META_RELAY_DATA: &str = "relay_data";

/// Store-wide values: format version, identity, feed sequence.
pub const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
/// Order id -> [`OrderRecord`] as JSON. An order is on the device iff it has a row here.
pub const RECORDS: TableDefinition<'static, [u8; 16], &[u8]> = TableDefinition::new("records");
/// Order id -> the last compacted Automerge `save()` (absent while empty).
pub const SNAPSHOTS: TableDefinition<'static, [u8; 16], &[u8]> = TableDefinition::new("snapshots");
/// (order id, index) -> raw Automerge change bytes, appended after the snapshot.
pub const TAIL: TableDefinition<'static, ([u8; 16], u32), &[u8]> = TableDefinition::new("tail");

/// Names of every table above: a file with any other table is not ours.
pub const TABLE_NAMES: [&str; 4] = ["meta", "records", "snapshots", "tail"];

/// Reason given when the file is held by another open handle.
const IN_USE: &str = "the file is in use by another open handle (another process or store)";

/// The device's local store in one redb file. See the [module docs](self).
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

fn open_err(path: &Path, reason: impl Into<String>) -> ReplicatorError {
    ReplicatorError::Open {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Maps a failed open of the database file to [`ReplicatorError::Open`] with a clear reason.
fn open_error(path: &Path, e: DatabaseError) -> ReplicatorError {
    let reason = match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => IN_USE.into(),
        DatabaseError::Storage(StorageError::Io(io)) => match io.kind() {
            ErrorKind::WouldBlock => IN_USE.into(),
            ErrorKind::InvalidData | ErrorKind::UnexpectedEof => {
                format!("not a redb database ({io})")
            }
            _ => io.to_string(),
        },
        DatabaseError::Storage(StorageError::Corrupted(why)) => {
            format!("damaged database: {why}")
        }
        DatabaseError::UpgradeRequired(v) => {
            format!("redb file format {v} is not supported by this build")
        }
        other => other.to_string(),
    };
    open_err(path, reason)
}

/// Maps any redb error met while the store is open: damage is [`ReplicatorError::Corrupt`],
/// everything else [`ReplicatorError::Storage`].
fn db_err(e: impl Into<redb::Error>) -> ReplicatorError {
    match e.into() {
        redb::Error::Corrupted(why) => ReplicatorError::Corrupt(format!("damaged database: {why}")),
        redb::Error::TableDoesNotExist(t) => {
            ReplicatorError::Corrupt(format!("table {t} is missing"))
        }
        redb::Error::TableTypeMismatch { table, .. } => {
            ReplicatorError::Corrupt(format!("table {table} has unexpected types"))
        }
        other => ReplicatorError::Storage(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Codec: every decoder returns `Corrupt` on bad input, never panics.

fn encode_json<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, ReplicatorError> {
    serde_json::to_vec(value).map_err(|e| ReplicatorError::Storage(format!("encoding {what}: {e}")))
}

fn decode_record(order: OrderId, bytes: &[u8]) -> Result<OrderRecord, ReplicatorError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ReplicatorError::Corrupt(format!("order {order}: stored record: {e}")))
}

fn decode_identity(bytes: &[u8]) -> Result<Identity, ReplicatorError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ReplicatorError::Corrupt(format!("stored identity: {e}")))
}

fn decode_u32(what: &str, bytes: &[u8]) -> Result<u32, String> {
    let arr: [u8; 4] = bytes
        .try_into()
        .map_err(|_| format!("{what} is not 4 bytes"))?;
    Ok(u32::from_be_bytes(arr))
}

fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64, ReplicatorError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| ReplicatorError::Corrupt(format!("stored {what} is not 8 bytes")))?;
    Ok(u64::from_be_bytes(arr))
}

/// The order id of a stored key (the canonical hyphenated text of the 16 bytes, parsed).
fn order_id(key: &[u8; 16]) -> Result<OrderId, ReplicatorError> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in key.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s.parse()
        .map_err(|_| ReplicatorError::Corrupt(format!("stored order id {s} is not a UUID")))
}

/// Every tail key of one order.
fn tail_range(key: [u8; 16]) -> std::ops::RangeInclusive<([u8; 16], u32)> {
    (key, 0)..=(key, u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Recognising our files

/// What a redb file holds, as far as opening is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Layout {
    /// Our format version: ours.
    Ours,
    /// A redb database with no table at all: initialise it.
    Blank,
}

/// Refuses a file with multimap tables or tables that are not ours. `Err` is the reason.
fn check_tables(tables: &[String], multimaps: usize) -> Result<(), String> {
    if multimaps > 0 {
        return Err("not a replicator store: it has multimap tables".into());
    }
    match tables.iter().find(|t| !TABLE_NAMES.contains(&t.as_str())) {
        Some(t) => Err(format!("not a replicator store: unknown table {t:?}")),
        None => Ok(()),
    }
}

/// Decides from the file's table names and its format value (after [`check_tables`]) whether
/// it is ours. `Err` is the reason it is refused.
fn check_format(tables: &[String], format: Option<&[u8]>) -> Result<Layout, String> {
    match format {
        Some(bytes) => {
            let v = decode_u32("format version", bytes)?;
            if v == FORMAT_VERSION {
                Ok(Layout::Ours)
            } else {
                Err(format!(
                    "unknown format version {v} (this build reads {FORMAT_VERSION})"
                ))
            }
        }
        None if tables.is_empty() => Ok(Layout::Blank),
        None => Err(
            "not a replicator store: a redb database without a replicator format version".into(),
        ),
    }
}

/// Checks an existing file through a read-only handle, which never writes. `Ok`: ours (or
/// blank), or not closed cleanly (a read-only handle cannot repair it): open it for writing,
/// where `init` checks it again.
fn probe(path: &Path) -> Result<(), ReplicatorError> {
    // redb trusts the pages of a file it reads: a damaged one can trip a bounds check inside it
    // (even while opening). The read-only handle writes nothing, so such a panic is caught and
    // reported as damage, and the file is left as it was.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let db = match redb::Builder::new().open_read_only(path) {
            Ok(db) => db,
            Err(DatabaseError::RepairAborted) => return Ok(()),
            Err(e) => return Err(open_error(path, e)),
        };
        let checked = check_read_only(&db);
        if let Err(e) = db.close() {
            tracing::debug!(error = %e, "closing the read-only probe of {}", path.display());
        }
        checked.map(drop).map_err(|reason| open_err(path, reason))
    }));
    outcome.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "reading it failed".into());
        Err(open_err(path, format!("damaged database: {why}")))
    })
}

fn check_read_only(db: &ReadOnlyDatabase) -> Result<Layout, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let tables: Vec<String> = txn
        .list_tables()
        .map_err(|e| e.to_string())?
        .map(|t| t.name().to_owned())
        .collect();
    let multimaps = txn
        .list_multimap_tables()
        .map_err(|e| e.to_string())?
        .count();
    // Refuse foreign tables before opening any table with our types.
    check_tables(&tables, multimaps)?;
    let format = if tables.iter().any(|t| t == "meta") {
        let meta = txn
            .open_table(META)
            .map_err(|e| format!("not a replicator store: {e}"))?;
        meta.get(META_FORMAT)
            .map_err(|e| e.to_string())?
            .map(|g| g.value().to_vec())
    } else {
        None
    };
    let layout = check_format(&tables, format.as_deref())?;
    // Our tables must have our types.
    for name in &tables {
        let typed = match name.as_str() {
            "records" => txn.open_table(RECORDS).map(drop),
            "snapshots" => txn.open_table(SNAPSHOTS).map(drop),
            "tail" => txn.open_table(TAIL).map(drop),
            _ => Ok(()),
        };
        typed.map_err(|e| format!("not a replicator store: {e}"))?;
    }
    Ok(layout)
}

// ---------------------------------------------------------------------------------------------

impl RedbStore {
    /// Opens the store file at `path` (the file itself, e.g. `data/till.redb`), creating it and
    /// its parent directory if missing.
    ///
    /// A file that is not a redb database, is damaged, is another program's redb database or
    /// has an unknown format version gives [`ReplicatorError::Open`] naming the file, and the file
    /// is left unchanged. A file held by another open handle (in this process or another) gives
    /// [`ReplicatorError::Open`] saying it is in use. See the [module docs](self).
    pub fn open(path: &Path) -> Result<Self, ReplicatorError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                open_err(
                    path,
                    format!("cannot create directory {}: {e}", parent.display()),
                )
            })?;
        }
        let existing = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => m.len() > 0,
            Ok(_) => return Err(open_err(path, "not a regular file")),
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(open_err(path, e.to_string())),
        };
        if existing {
            probe(path)?;
        }
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(true);
        let db = if existing {
            builder.open(path)
        } else {
            builder.create(path)
        }
        .map_err(|e| open_error(path, e))?;
        Self::init(&db, path)?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Checks the format version (writing it into a blank file) and creates missing tables.
    fn init(db: &Database, path: &Path) -> Result<(), ReplicatorError> {
        let fail = |e: redb::Error| open_err(path, e.to_string());
        let mut txn = db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| fail(e.into()))?;
        let checked = (|| {
            let tables: Vec<String> = txn
                .list_tables()
                .map_err(|e| fail(e.into()))?
                .map(|t| t.name().to_owned())
                .collect();
            let multimaps = txn
                .list_multimap_tables()
                .map_err(|e| fail(e.into()))?
                .count();
            check_tables(&tables, multimaps).map_err(|reason| open_err(path, reason))?;
            let mut meta = txn
                .open_table(META)
                .map_err(|e| open_err(path, format!("not a replicator store: {e}")))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(|e| fail(e.into()))?
                .map(|g| g.value().to_vec());
            match check_format(&tables, format.as_deref()) {
                Ok(Layout::Ours) => {}
                Ok(Layout::Blank) => {
                    meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes()[..])
                        .map_err(|e| fail(e.into()))?;
                }
                Err(reason) => return Err(open_err(path, reason)),
            }
            drop(meta);
            let typed =
                |e: redb::TableError| open_err(path, format!("not a replicator store: {e}"));
            txn.open_table(RECORDS).map_err(typed)?;
            txn.open_table(SNAPSHOTS).map_err(typed)?;
            txn.open_table(TAIL).map_err(typed)?;
            Ok(())
        })();
        match checked {
            Ok(()) => txn.commit().map_err(|e| fail(e.into())),
            Err(e) => {
                if let Err(abort) = txn.abort() {
                    tracing::warn!(error = %abort, "aborting the refused open of {}", path.display());
                }
                Err(e)
            }
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<ReadTransaction, ReplicatorError> {
        self.db.begin_read().map_err(db_err)
    }

    /// Runs `f` in one write transaction with immediate durability: committed if `f` succeeds,
    /// aborted (nothing written) if it fails.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, ReplicatorError>,
    ) -> Result<T, ReplicatorError> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate).map_err(db_err)?;
        match f(&txn) {
            Ok(v) => {
                txn.commit().map_err(db_err)?;
                Ok(v)
            }
            Err(e) => {
                if let Err(abort) = txn.abort() {
                    tracing::warn!(error = %abort, "aborting a refused write failed");
                }
                Err(e)
            }
        }
    }
}

impl Store for RedbStore {
    fn identity(&self) -> Result<Option<Identity>, ReplicatorError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let stored = meta.get(META_IDENTITY).map_err(db_err)?;
        stored.map(|g| decode_identity(g.value())).transpose()
    }

    fn set_identity(&self, identity: &Identity) -> Result<(), ReplicatorError> {
        let bytes = encode_json("identity", identity)?;
        self.write(|txn| {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing = meta
                .get(META_IDENTITY)
                .map_err(db_err)?
                .map(|g| decode_identity(g.value()));
            match existing.transpose()? {
                Some(existing) if existing == *identity => Ok(()),
                Some(existing) if !existing.same_device(identity) => {
                    Err(super::identity_refused(&existing, identity))
                }
                // First use, or the same device with a new relay address or token.
                _ => {
                    meta.insert(META_IDENTITY, bytes.as_slice())
                        .map_err(db_err)?;
                    Ok(())
                }
            }
        })
    }

    fn load_orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError> {
        let txn = self.read()?;
        let records = txn.open_table(RECORDS).map_err(db_err)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let tail = txn.open_table(TAIL).map_err(db_err)?;
        let mut out = Vec::new();
        for row in records.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            let order = order_id(&key)?;
            let record = decode_record(order, v.value())?;
            let snapshot = snapshots
                .get(key)
                .map_err(db_err)?
                .map(|g| g.value().to_vec())
                .unwrap_or_default();
            let mut changes = Vec::new();
            for row in tail.range(tail_range(key)).map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                changes.push(v.value().to_vec());
            }
            out.push(StoredOrder {
                order,
                snapshot,
                tail: changes,
                record,
            });
        }
        Ok(out)
    }

    fn append(
        &self,
        order: OrderId,
        changes: &[Vec<u8>],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|txn| append_in(txn, order, changes, record))
    }

    fn put_record(&self, order: OrderId, record: &OrderRecord) -> Result<(), ReplicatorError> {
        self.write(|txn| put_record_in(txn, order, record))
    }

    fn compact(
        &self,
        order: OrderId,
        snapshot: &[u8],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|txn| compact_in(txn, order, snapshot, record))
    }

    fn remove(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.write(|txn| remove_in(txn, order))
    }

    fn feed_seq(&self) -> Result<u64, ReplicatorError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let stored = meta.get(META_FEED_SEQ).map_err(db_err)?;
        stored.map_or(Ok(0), |g| decode_u64("feed sequence", g.value()))
    }

    fn set_feed_seq(&self, seq: u64) -> Result<(), ReplicatorError> {
        self.write(|txn| set_feed_seq_in(txn, seq))
    }

    fn relay_data(&self) -> Result<Option<String>, ReplicatorError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let stored = meta.get(META_RELAY_DATA).map_err(db_err)?;
        stored
            .map(|g| {
                String::from_utf8(g.value().to_vec())
                    .map_err(|_| ReplicatorError::Corrupt("relay data id is not UTF-8".into()))
            })
            .transpose()
    }

    fn set_relay_data(&self, data: &str) -> Result<(), ReplicatorError> {
        self.write(|txn| set_relay_data_in(txn, data))
    }

    /// The whole batch in one write transaction: one fsync for every effect queued, all or
    /// nothing.
    fn write_batch(&self, effects: &[Effect], durable: &mut usize) -> Result<(), ReplicatorError> {
        self.write(|txn| {
            for effect in effects {
                let done = match effect {
                    Effect::Append {
                        order,
                        changes,
                        record,
                    } => append_in(txn, *order, changes, record),
                    Effect::Record { order, record } => put_record_in(txn, *order, record),
                    Effect::Compact {
                        order,
                        snapshot,
                        record,
                    } => compact_in(txn, *order, snapshot, record),
                    Effect::Remove { order } => remove_in(txn, *order),
                    Effect::FeedSeq(seq) => set_feed_seq_in(txn, *seq),
                    Effect::RelayData(data) => set_relay_data_in(txn, data),
                    Effect::Connect => Ok(()),
                };
                match done {
                    // A record for an order removed meanwhile: nothing to keep.
                    Ok(()) | Err(ReplicatorError::UnknownOrder(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        *durable = effects.len();
        Ok(())
    }
}

fn append_in(
    txn: &WriteTransaction,
    order: OrderId,
    changes: &[Vec<u8>],
    record: &OrderRecord,
) -> Result<(), ReplicatorError> {
    let bytes = encode_json("record", record)?;
    let key = *order.as_bytes();
    let mut tail = txn.open_table(TAIL).map_err(db_err)?;
    let last = match tail.range(tail_range(key)).map_err(db_err)?.next_back() {
        Some(row) => Some(row.map_err(db_err)?.0.value().1),
        None => None,
    };
    // `None` once the index space is used up.
    let mut next = match last {
        Some(i) => i.checked_add(1),
        None => Some(0),
    };
    for change in changes {
        let i = next.ok_or_else(|| {
            ReplicatorError::Invalid(format!("order {order}: the tail is full, compact it"))
        })?;
        tail.insert((key, i), change.as_slice()).map_err(db_err)?;
        next = i.checked_add(1);
    }
    let mut records = txn.open_table(RECORDS).map_err(db_err)?;
    records.insert(key, bytes.as_slice()).map_err(db_err)?;
    Ok(())
}

fn put_record_in(
    txn: &WriteTransaction,
    order: OrderId,
    record: &OrderRecord,
) -> Result<(), ReplicatorError> {
    let bytes = encode_json("record", record)?;
    let key = *order.as_bytes();
    let mut records = txn.open_table(RECORDS).map_err(db_err)?;
    let known = records.get(key).map_err(db_err)?.is_some();
    if !known {
        return Err(ReplicatorError::UnknownOrder(order));
    }
    records.insert(key, bytes.as_slice()).map_err(db_err)?;
    Ok(())
}

fn compact_in(
    txn: &WriteTransaction,
    order: OrderId,
    snapshot: &[u8],
    record: &OrderRecord,
) -> Result<(), ReplicatorError> {
    let bytes = encode_json("record", record)?;
    let key = *order.as_bytes();
    let mut snapshots = txn.open_table(SNAPSHOTS).map_err(db_err)?;
    if snapshot.is_empty() {
        snapshots.remove(key).map_err(db_err)?;
    } else {
        snapshots.insert(key, snapshot).map_err(db_err)?;
    }
    let mut tail = txn.open_table(TAIL).map_err(db_err)?;
    tail.retain_in(tail_range(key), |_, _| false)
        .map_err(db_err)?;
    let mut records = txn.open_table(RECORDS).map_err(db_err)?;
    records.insert(key, bytes.as_slice()).map_err(db_err)?;
    Ok(())
}

fn remove_in(txn: &WriteTransaction, order: OrderId) -> Result<(), ReplicatorError> {
    let key = *order.as_bytes();
    txn.open_table(RECORDS)
        .map_err(db_err)?
        .remove(key)
        .map_err(db_err)?;
    txn.open_table(SNAPSHOTS)
        .map_err(db_err)?
        .remove(key)
        .map_err(db_err)?;
    txn.open_table(TAIL)
        .map_err(db_err)?
        .retain_in(tail_range(key), |_, _| false)
        .map_err(db_err)?;
    Ok(())
}

fn set_relay_data_in(txn: &WriteTransaction, data: &str) -> Result<(), ReplicatorError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    meta.insert(META_RELAY_DATA, data.as_bytes())
        .map_err(db_err)?;
    Ok(())
}

fn set_feed_seq_in(txn: &WriteTransaction, seq: u64) -> Result<(), ReplicatorError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    meta.insert(META_FEED_SEQ, &seq.to_be_bytes()[..])
        .map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn checks_recognise_ours_blank_and_foreign() {
        let v1 = FORMAT_VERSION.to_be_bytes();
        assert_eq!(check_tables(&names(&TABLE_NAMES), 0), Ok(()));
        assert!(check_tables(&names(&["meta", "orders"]), 0).is_err());
        assert!(check_tables(&names(&["meta"]), 1).is_err());
        assert_eq!(
            check_format(&names(&TABLE_NAMES), Some(&v1)),
            Ok(Layout::Ours)
        );
        assert_eq!(check_format(&[], None), Ok(Layout::Blank));
        assert!(check_format(&names(&["meta"]), None).is_err());
        let err = check_format(&names(&["meta"]), Some(&99u32.to_be_bytes())).unwrap_err();
        assert!(err.contains("99"), "{err}");
        assert!(check_format(&names(&["meta"]), Some(b"x")).is_err());
    }

    #[test]
    fn order_ids_round_trip_through_keys() {
        let id = OrderId::generate(
            crdt_model::Timestamp(1_700_000_000_000),
            &mut crdt_model::SplitMix64::new(3),
        );
        assert_eq!(order_id(id.as_bytes()).unwrap(), id);
    }
}
