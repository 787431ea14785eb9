//! Restoring a backup without losing what the tills hold: [`RelayStore::restore`] and the
//! recovery that follows it.
//!
//! A backup is older than the relay it replaces: orders, payments and numbers made after it
//! exist only on the tills. The restore makes them come back and keeps numbers unique:
//!
//! * the restored data gets a new data id (devices see it in `welcome` and push everything
//!   they hold again, resuming the feed from the start) and a fresh actor epoch (the restored
//!   relay never reuses a sequence number it wrote after the backup);
//! * the relay's own changes made after the backup (numbers, back-office edits) come back
//!   through the tills and are accepted because they carry the relay's seal, whose key the
//!   backup holds (`crdt_model::seal`); a device cannot forge one;
//! * an order that comes back with its number keeps it, and the store's counter moves past it;
//! * every store starts in **recovery**: the relay gives no new number in that store until
//!   every device of the store (not revoked) has said hello to the restored relay, each telling
//!   the highest number it holds, which the counter moves past before any new number is given.
//!   New orders are accepted meanwhile and wait, unreceipted, for their number. An operator can
//!   release a store whose missing till will never come back ([`RelayStore::release_recovery`]).

use std::fs::File;
use std::path::Path;

use crdt_model::{DeviceId, StoreId};
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::codec;
use super::tables::{
    DB_FILE, DEVICES, META, META_BACKUP, META_DATA_ID, META_IDENTITY, ORDERS, RECOVERY, STORES,
};
use super::{RelayStore, set_immediate};
use crate::error::RelayError;

/// What a store's last restore left to do (JSON in [`RECOVERY`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// When the restore ran, ms since the epoch.
    pub restored_at: i64,
    /// When the backup was taken, ms since the epoch (0 if unknown).
    pub backup_taken_at: i64,
    /// The store's last order number in the backup.
    pub numbers_from_backup: u64,
    /// Devices of the store not heard from since the restore.
    pub pending: Vec<DeviceId>,
    /// Numbering resumed: every device was heard from, or an operator released the store.
    pub released: bool,
    /// Released by an operator while devices were still pending (numbers they hold that the
    /// relay never saw may be given again: the check reports such duplicates).
    pub released_early: bool,
}

impl RecoveryRecord {
    /// Whether the store still waits for devices before giving new numbers.
    pub fn recovering(&self) -> bool {
        !self.released
    }
}

/// What [`RelayStore::restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    /// Orders in the backup.
    pub orders: u64,
    /// Stores put in recovery, with how many devices each waits for.
    pub stores: Vec<(StoreId, usize)>,
    /// The restored data's new id.
    pub data_id: String,
    /// When the backup was taken (ms since the epoch), if it says.
    pub backup_taken_at: Option<i64>,
}

fn decode(b: &[u8]) -> Result<RecoveryRecord, RelayError> {
    codec::from_json("recovery record", b)
}

fn encode(r: &RecoveryRecord) -> Result<Vec<u8>, RelayError> {
    codec::to_json(r)
}

/// Devices of every store that are not revoked, by store.
fn active_devices(
    txn: &WriteTransaction,
) -> Result<std::collections::BTreeMap<StoreId, Vec<DeviceId>>, RelayError> {
    let devices = txn.open_table(DEVICES)?;
    let mut out: std::collections::BTreeMap<StoreId, Vec<DeviceId>> = Default::default();
    for entry in devices.iter()? {
        let (_, v) = entry?;
        let record = codec::from_json::<super::DeviceRecord>("device record", v.value())?;
        if !record.revoked {
            out.entry(record.store).or_default().push(record.device);
        }
    }
    Ok(out)
}

/// Whether `device` is provisioned and not revoked.
fn active(txn: &WriteTransaction, device: &DeviceId) -> Result<bool, RelayError> {
    let devices = txn.open_table(DEVICES)?;
    let record = devices.get(*device.as_bytes())?;
    match record {
        Some(v) => {
            Ok(!codec::from_json::<super::DeviceRecord>("device record", v.value())?.revoked)
        }
        None => Ok(false),
    }
}

impl RelayStore {
    /// Restores the backup file `backup` as the relay data of `dir`, which must not hold relay
    /// data yet ([`RelayError::Invalid`] otherwise: move the old file away first). The copy is
    /// made beside the target, prepared (new data id, fresh epoch, every store in recovery, the
    /// backup mark removed), fsynced and renamed into place, so a failed restore leaves no
    /// `relay.redb` behind. See the module docs of `store/recovery.rs`.
    pub fn restore(
        backup: &Path,
        dir: &Path,
        now_ms: i64,
    ) -> Result<(Self, RestoreReport), RelayError> {
        let target = dir.join(DB_FILE);
        if target.exists() {
            return Err(RelayError::Invalid(format!(
                "{} exists: restore into a directory without relay data (move the old file \
                 away first; keep it, it may hold what the backup lacks)",
                target.display()
            )));
        }
        let src = File::open(backup).map_err(|e| RelayError::open(backup, e))?;
        if src
            .metadata()
            .map_err(|e| RelayError::open(backup, e))?
            .len()
            == 0
        {
            return Err(RelayError::Corrupt(format!(
                "{}: the file is empty (0 bytes), not a backup",
                backup.display()
            )));
        }
        drop(src);
        std::fs::create_dir_all(dir).map_err(|e| RelayError::open(dir, e))?;
        let staging = dir.join(".restoring");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| RelayError::open(&staging, e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| RelayError::open(&staging, e))?;
        let staged = staging.join(DB_FILE);
        let result = (|| -> Result<RestoreReport, RelayError> {
            std::fs::copy(backup, &staged).map_err(|e| RelayError::open(&staged, e))?;
            let report = Self::open(&staging)?.prepare_restored(now_ms)?;
            File::open(&staged)?.sync_all()?;
            std::fs::rename(&staged, &target).map_err(|e| RelayError::open(&target, e))?;
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                tracing::warn!(dir = %dir.display(), error = %e, "fsync of the data directory");
            }
            Ok(report)
        })();
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), error = %e, "removing the restore's staging");
        }
        let report = result?;
        Ok((Self::open(dir)?, report))
    }

    fn prepare_restored(&self, now_ms: i64) -> Result<RestoreReport, RelayError> {
        let backup_taken_at = self.backup_taken_at()?;
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        let data_id = codec::random_bytes::<16>()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.remove(META_BACKUP)?;
            meta.insert(META_DATA_ID, &data_id[..])?;
            let id = self.identity.with_fresh_epoch()?;
            meta.insert(META_IDENTITY, &codec::encode_identity(&id)[..])?;
        }
        let mut by_store = active_devices(&txn)?;
        let orders = txn.open_table(ORDERS)?.len()?;
        let mut stores = Vec::new();
        {
            let counters = txn.open_table(STORES)?;
            for entry in counters.iter()? {
                let (k, _) = entry?;
                by_store
                    .entry(StoreId::new(k.value()).map_err(|e| {
                        RelayError::Corrupt(format!("store id {:?}: {e}", k.value()))
                    })?)
                    .or_default();
            }
            let mut recovery = txn.open_table(RECOVERY)?;
            for (store, pending) in std::mem::take(&mut by_store) {
                let last = counters.get(store.as_str())?.map_or(0, |g| g.value().0);
                let record = RecoveryRecord {
                    restored_at: now_ms,
                    backup_taken_at: backup_taken_at.unwrap_or(0),
                    numbers_from_backup: last,
                    released: pending.is_empty(),
                    released_early: false,
                    pending,
                };
                recovery.insert(store.as_str(), encode(&record)?.as_slice())?;
                stores.push((store, record.pending.len()));
            }
        }
        txn.commit()?;
        Ok(RestoreReport {
            orders,
            stores,
            data_id: codec::hex(&data_id),
            backup_taken_at,
        })
    }

    /// Stores that give no new numbers until their devices are heard from (after a restore).
    pub fn recovering_stores(&self) -> Result<Vec<StoreId>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(RECOVERY)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            if decode(v.value())?.recovering() {
                out.push(
                    StoreId::new(k.value())
                        .map_err(|e| RelayError::Corrupt(format!("recovery store: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// The record of `store`'s last restore, if it was ever restored.
    pub fn recovery(&self, store: &StoreId) -> Result<Option<RecoveryRecord>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(RECOVERY)?;
        let record = table.get(store.as_str())?;
        record.map(|v| decode(v.value())).transpose()
    }

    /// `device` of `store`, recovering, said hello holding numbers up to `highest`: the store's
    /// counter moves past it and the device is no longer waited for. Returns `true` when this
    /// ended the store's recovery (every device heard from), `false` if devices are still
    /// pending or the store is not recovering.
    pub fn recovery_hello(
        &self,
        store: &StoreId,
        device: DeviceId,
        highest: u64,
    ) -> Result<bool, RelayError> {
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        let ended = {
            let mut table = txn.open_table(RECOVERY)?;
            let stored = table.get(store.as_str())?.map(|v| decode(v.value()));
            let Some(mut record) = stored.transpose()? else {
                return Ok(false);
            };
            if !record.recovering() {
                return Ok(false);
            }
            let mut counters = txn.open_table(STORES)?;
            let (last, feed) = counters.get(store.as_str())?.map_or((0, 0), |g| g.value());
            if highest > last {
                counters.insert(store.as_str(), (highest, feed))?;
            }
            let mut pending = Vec::new();
            for d in record.pending.drain(..) {
                if d != device && active(&txn, &d)? {
                    pending.push(d);
                }
            }
            record.pending = pending;
            record.released = record.pending.is_empty();
            table.insert(store.as_str(), encode(&record)?.as_slice())?;
            record.released
        };
        txn.commit()?;
        Ok(ended)
    }

    /// An operator ends `store`'s recovery before every device was heard from (a till that
    /// will never come back). Returns the devices that were still pending; `None` if the
    /// store was not recovering.
    pub fn release_recovery(&self, store: &StoreId) -> Result<Option<Vec<DeviceId>>, RelayError> {
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        let pending = {
            let mut table = txn.open_table(RECOVERY)?;
            let stored = table.get(store.as_str())?.map(|v| decode(v.value()));
            let Some(mut record) = stored.transpose()? else {
                return Ok(None);
            };
            if !record.recovering() {
                return Ok(None);
            }
            record.released = true;
            record.released_early = !record.pending.is_empty();
            let pending = record.pending.clone();
            table.insert(store.as_str(), encode(&record)?.as_slice())?;
            pending
        };
        txn.commit()?;
        Ok(Some(pending))
    }
}
