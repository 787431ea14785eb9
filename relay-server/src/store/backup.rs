//! [`RelayStore::backup_to`]: a consistent copy of the whole store, taken while the relay serves,
//! written to a new redb file with a fresh actor epoch.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::Path;

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::codec;
use super::tables::{
    DEVICES, FEED, META, META_BACKUP, META_IDENTITY, NUMBERS, ORDERS, RECOVERY, SNAPSHOTS, STORES,
    TAIL, TOKENS, UNNUMBERED,
};
use super::{RelayStore, open_error, set_immediate};
use crate::error::RelayError;

impl RelayStore {
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
                _ => RelayError::open(file, e),
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
        // Absent in files from before the lists existed.
        for copied in [
            copy_table(&src, &w, UNNUMBERED),
            copy_table(&src, &w, RECOVERY),
        ] {
            match copied {
                Err(RelayError::Storage(e))
                    if matches!(e.redb(), redb::Error::TableDoesNotExist(_)) => {}
                other => {
                    other?;
                }
            }
        }
        {
            let id = self.identity.with_fresh_epoch()?;
            let mut meta = w.open_table(META)?;
            meta.insert(META_IDENTITY, &codec::encode_identity(&id)[..])?;
            // A backup is not relay data until `restore` made it so (see `recovery`).
            let taken = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            meta.insert(META_BACKUP, &taken.to_be_bytes()[..])?;
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
