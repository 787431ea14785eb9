//! [`RelayStore`]: the relay's durable state in one redb file, `<dir>/relay.redb`.
//!
//! The store is synchronous (blocking): the async parts of the relay call it from a dedicated
//! thread or `spawn_blocking`. It holds, per order, the metadata ([`OrderMeta`]), a compacted
//! Automerge snapshot and a tail of raw changes appended since; per store, the order-number
//! counter and the store feed (one entry per order, its latest change); the provisioned devices
//! and the hashes of access tokens; and the relay's own identity.
//!
//! Every [`RelayStore::commit`] is one redb write transaction with immediate durability, so a
//! batch of writes (group commit) is on disk, whole, when it returns, or not at all. Each
//! [`OrderWrite`] names the heads it builds on ([`OrderWrite::base`]); a batch with a write
//! whose base is not the stored heads is refused whole ([`RelayError::Conflict`]).
//!
//! This module holds the types and [`RelayStore::open`]; the operations are split by concern:
//!
//! * `orders`: commit, and the reads of orders (load, metadata, by number, listing, count);
//! * `feed`: the store feed devices catch up from;
//! * `devices`: devices, admin tokens, authentication and revocation;
//! * `backup`: a consistent copy of the whole store while the relay serves;
//! * `check`: the consistency check of everything stored;
//! * `codec`: byte encodings of stored values; [`tables`]: the table layout and key encodings.
//!
//! Failures are typed (see [`crate::error`]): redb failures keep their source and are classified
//! (disk full, I/O, corruption) in [`RelayError::Storage`]; stored bytes that do not decode are
//! [`RelayError::Corrupt`].

mod backup;
mod check;
pub(crate) mod codec;
mod devices;
mod feed;
mod orders;
mod recovery;
pub mod tables;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crdt_model::{DeviceId, OrderStatus, SealKey, StoreId, Writer};
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageError, TableError, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};

pub use crate::records::{
    CommitOutcome, FeedRecord, OrderMeta, OrderWrite, StoredOrder, StoredTail,
};
pub use check::CheckReport;
pub use recovery::{RecoveryRecord, RestoreReport};

use crate::error::RelayError;
use codec::decode_identity;
#[cfg(feature = "postgres")]
pub(crate) use devices::{check_name, new_token, token_hash};
use tables::{
    DB_FILE, DEVICES, FEED, FORMAT_VERSION, META, META_BACKUP, META_DATA_ID, META_FORMAT,
    META_IDENTITY, META_SEAL_KEY, NUMBERS, ORDERS, RECOVERY, SNAPSHOTS, STORES, TAIL, TOKENS,
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

    /// The same device with a new random actor epoch (for a backup or a restore: the relay
    /// they become never reuses a sequence number written under the old one).
    pub(crate) fn with_fresh_epoch(&self) -> Result<Self, RelayError> {
        let mut epoch = self.epoch;
        while epoch == self.epoch {
            epoch = u32::from_be_bytes(codec::random_bytes::<4>()?);
        }
        Ok(Self {
            device: self.device,
            epoch,
        })
    }
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

/// The relay's redb store. See the [module docs](self).
pub struct RelayStore {
    db: Database,
    path: PathBuf,
    identity: RelayIdentity,
    seal: SealKey,
    data_id: [u8; 16],
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
    Ok(txn.set_durability(Durability::Immediate)?)
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
        other => RelayError::open(path, redb::Error::from(other)),
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

    /// Opens relay data that must already exist (for `check` and `backup`): a missing
    /// directory or database file is [`RelayError::NotFound`], and nothing is created.
    pub fn open_existing(dir: &Path) -> Result<Self, RelayError> {
        let path = dir.join(DB_FILE);
        match std::fs::metadata(&path) {
            Ok(_) => Self::open(dir),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(RelayError::NotFound(format!(
                "no relay data at {} ({} does not exist)",
                dir.display(),
                path.display()
            ))),
            Err(e) => Err(RelayError::open(path, e)),
        }
    }

    /// [`RelayStore::open`] with redb's page cache limited to `cache_bytes`. The hub keeps the
    /// hot orders' documents in memory itself, so redb's cache mostly serves metadata, the
    /// feed and cache misses; a large one only adds resident memory (redb's default is 1 GiB,
    /// which the integrity check on open fills on a big database).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, RelayError> {
        std::fs::create_dir_all(dir).map_err(|e| RelayError::open(dir, e))?;
        let path = dir.join(DB_FILE);
        let existing = match std::fs::metadata(&path) {
            // A file of zero bytes is not a fresh start: something (a failed copy, a full disk,
            // a mistake) left it there, and initialising over it would hide that.
            Ok(m) if m.is_file() && m.len() == 0 => {
                return Err(RelayError::Corrupt(format!(
                    "{}: the file is empty (0 bytes), not a relay database; move it away to \
                     start with no data, or restore a backup",
                    path.display()
                )));
            }
            Ok(m) if m.is_file() => true,
            Ok(_) => return Err(RelayError::open_reason(path, "not a regular file")),
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(RelayError::open(path, e)),
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
        let (identity, seal, data_id) = Self::init(&db, &path)?;
        Ok(Self {
            db,
            path,
            identity,
            seal,
            data_id,
        })
    }

    /// Checks or writes the format version and identity, and makes sure every table exists.
    fn init(db: &Database, path: &Path) -> Result<(RelayIdentity, SealKey, [u8; 16]), RelayError> {
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
        let seal = {
            let mut meta = txn.open_table(META).map_err(|e| table_error(path, e))?;
            let stored = meta.get(META_SEAL_KEY)?.map(|v| v.value().to_vec());
            match stored {
                Some(b) => SealKey::from_bytes(b.as_slice().try_into().map_err(|_| {
                    RelayError::Corrupt(format!("{}: the seal key is not 32 bytes", path.display()))
                })?),
                // Made once; files from before seals get one on their next open.
                None => {
                    let key = codec::random_bytes::<32>()?;
                    meta.insert(META_SEAL_KEY, &key[..])?;
                    SealKey::from_bytes(key)
                }
            }
        };
        let data_id = {
            let mut meta = txn.open_table(META).map_err(|e| table_error(path, e))?;
            let stored = meta.get(META_DATA_ID)?.map(|v| v.value().to_vec());
            match stored {
                Some(b) => <[u8; 16]>::try_from(b.as_slice()).map_err(|_| {
                    RelayError::Corrupt(format!("{}: the data id is not 16 bytes", path.display()))
                })?,
                None => {
                    let id = codec::random_bytes::<16>()?;
                    meta.insert(META_DATA_ID, &id[..])?;
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
        txn.open_table(RECOVERY).map_err(|e| table_error(path, e))?;
        txn.commit()?;
        Ok((identity, seal, data_id))
    }

    /// The database file (`<dir>/relay.redb`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The relay's identity, made on first open and stable across reopens.
    pub fn identity(&self) -> Result<RelayIdentity, RelayError> {
        Ok(self.identity)
    }

    /// The key the relay seals its own changes with (`crdt_model::seal`); backups carry it.
    pub fn seal_key(&self) -> SealKey {
        self.seal.clone()
    }

    /// The writer the relay commits its own changes as: its identity, sealing.
    pub fn relay_writer(&self) -> Writer {
        self.identity.writer().with_seal(self.seal.clone())
    }

    /// The data's id (32 hex digits): made on first open, new after every restore. Devices
    /// compare it across connections to learn that the relay's data went back in time.
    pub fn data_id(&self) -> String {
        codec::hex(&self.data_id)
    }

    /// When the file was taken as a backup (ms since the epoch), if it is one that has not
    /// been restored: `serve` refuses those (see `restore`).
    pub fn backup_taken_at(&self) -> Result<Option<i64>, RelayError> {
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        let at = meta.get(META_BACKUP)?.map(|v| {
            let b = v.value();
            <[u8; 8]>::try_from(b).map_or(0, i64::from_be_bytes)
        });
        Ok(at)
    }

    /// The underlying database, for tests and tools that need raw access.
    #[doc(hidden)]
    pub fn raw_db(&self) -> &Database {
        &self.db
    }

    fn read(&self) -> Result<ReadTransaction, RelayError> {
        Ok(self.db.begin_read()?)
    }
}
