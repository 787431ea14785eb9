//! [`RelayStore::check`]: an offline-style consistency check of everything stored, run inside
//! one read transaction (the relay may keep serving).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crdt_model::Order;
use crdt_model::automerge::ReadDoc;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::codec::{self, decode_meta};
use super::tables::{FEED, NUMBERS, ORDERS, RECOVERY, SNAPSHOTS, STORES, TAIL};
use super::{OrderMeta, RelayIdentity, RelayStore, StoredOrder};
use crate::error::RelayError;

/// What [`RelayStore::check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Orders examined.
    pub orders: u64,
    /// Inconsistencies: the store is damaged.
    pub errors: Vec<String>,
    /// Oddities that are allowed (an order whose document does not carry its number yet).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// `true` when no error was found (warnings allowed).
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl RelayStore {
    /// Verifies every stored order and the indexes:
    ///
    /// * the snapshot and tail load with Automerge, with no missing dependencies, and the
    ///   document parses as an order whose view builds;
    /// * the document's id, store, heads and effective status equal the metadata, and its number
    ///   (when it has one yet; otherwise a warning) equals the assigned number;
    /// * the tail holds exactly `tail_len` changes; no snapshot or tail entry lacks an order;
    /// * per store, the numbers are unique and exactly `1..=counter`, and the number index
    ///   agrees with the metadata;
    /// * the feed holds exactly one entry per order, at the order's `feed_seq`, not past the
    ///   store's feed head.
    ///
    /// Storage failures are returned as errors; everything found is in the report.
    pub fn check(&self) -> Result<CheckReport, RelayError> {
        check_in(&self.db.begin_read()?, self.identity)
    }

    /// [`RelayStore::check`] on the relay data at `dir`, opened read-only: nothing is written,
    /// and data that is missing, empty or not a relay's is an error. The one exception is a
    /// file that was not closed cleanly: redb recovers it first (a write, the one the relay's
    /// next start would make), and the report's first warning says so. A running relay holds
    /// its file, so this gives [`RelayError::Locked`] then.
    pub fn check_read_only(dir: &Path) -> Result<CheckReport, RelayError> {
        let path = dir.join(super::DB_FILE);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == 0 => {
                return Err(RelayError::Corrupt(format!(
                    "{}: the file is empty (0 bytes), not a relay database",
                    path.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RelayError::NotFound(format!(
                    "no relay data at {} ({} does not exist)",
                    dir.display(),
                    path.display()
                )));
            }
            Err(e) => return Err(RelayError::open(path, e)),
        }
        let db = match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => db,
            // Not closed cleanly (a crash, a kill): redb must recover the file before anyone
            // reads it, which a read-only handle cannot do. The check then recovers it, as the
            // relay's next start would, and says so.
            Err(redb::DatabaseError::RepairAborted) => {
                let mut report = Self::open_existing(dir)?.check()?;
                report.warnings.insert(
                    0,
                    format!(
                        "{} was not closed cleanly (the relay stopped abruptly): it was recovered \
                         before the check, as the relay's next start would",
                        path.display()
                    ),
                );
                return Ok(report);
            }
            Err(e) => return Err(super::open_error(&path, e)),
        };
        let txn = db.begin_read()?;
        let identity = {
            let meta = txn.open_table(super::META).map_err(|e| {
                RelayError::Corrupt(format!("{}: not a relay database: {e}", path.display()))
            })?;
            let stored = meta.get(super::META_IDENTITY)?.ok_or_else(|| {
                RelayError::Corrupt(format!("{}: no relay identity", path.display()))
            })?;
            codec::decode_identity(stored.value())
                .map_err(|e| RelayError::Corrupt(format!("{}: {e}", path.display())))?
        };
        check_in(&txn, identity)
    }
}

/// The checks of [`RelayStore::check`] in one read transaction.
fn check_in(
    txn: &redb::ReadTransaction,
    identity: RelayIdentity,
) -> Result<CheckReport, RelayError> {
    let orders = txn.open_table(ORDERS)?;
    let snapshots = txn.open_table(SNAPSHOTS)?;
    let tail = txn.open_table(TAIL)?;
    let feed = txn.open_table(FEED)?;
    let numbers = txn.open_table(NUMBERS)?;
    let stores = txn.open_table(STORES)?;
    let mut report = CheckReport::default();
    let writer = identity.writer();

    let mut metas: HashMap<[u8; 16], OrderMeta> = HashMap::new();
    for entry in orders.iter()? {
        let (k, v) = entry?;
        let key = k.value();
        report.orders += 1;
        let meta = match decode_meta(v.value()) {
            Ok(m) => m,
            Err(e) => {
                report.errors.push(format!(
                    "order {}: metadata does not decode: {e}",
                    codec::uuid_text(&key)
                ));
                continue;
            }
        };
        if meta.order.as_bytes() != &key {
            report.errors.push(format!(
                "order {}: stored under key {}",
                meta.order,
                codec::uuid_text(&key)
            ));
        }
        let snapshot = snapshots.get(key)?.map(|g| g.value().to_vec());
        let mut changes = Vec::new();
        for entry in tail.range((key, 0u32)..=(key, u32::MAX))? {
            let (_, v) = entry?;
            changes.push(v.value().to_vec());
        }
        match snapshot {
            None => report
                .errors
                .push(format!("order {}: snapshot missing", meta.order)),
            Some(snapshot) => {
                if u32::try_from(changes.len()).ok() != Some(meta.tail_len) {
                    report.errors.push(format!(
                        "order {}: {} tail changes stored, metadata says {}",
                        meta.order,
                        changes.len(),
                        meta.tail_len
                    ));
                }
                let stored = StoredOrder {
                    meta: meta.clone(),
                    snapshot,
                    tail: changes,
                };
                check_document(&stored, &writer, &mut report);
            }
        }
        metas.insert(key, meta);
    }

    // Snapshots and tails must belong to an order.
    for entry in snapshots.iter()? {
        let (k, _) = entry?;
        let key = k.value();
        if !metas.contains_key(&key) && orders.get(key)?.is_none() {
            report.errors.push(format!(
                "snapshot of unknown order {}",
                codec::uuid_text(&key)
            ));
        }
    }
    let mut orphan_tails: BTreeMap<[u8; 16], u64> = BTreeMap::new();
    for entry in tail.iter()? {
        let (k, _) = entry?;
        let (key, _) = k.value();
        if !metas.contains_key(&key) && orders.get(key)?.is_none() {
            *orphan_tails.entry(key).or_default() += 1;
        }
    }
    for (key, n) in orphan_tails {
        report.errors.push(format!(
            "{n} tail changes of unknown order {}",
            codec::uuid_text(&key)
        ));
    }

    // Numbers: unique, gap-free 1..=counter per store, and the index agrees.
    let mut per_store: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for meta in metas.values() {
        per_store
            .entry(meta.store.as_str().to_owned())
            .or_default()
            .push(meta.number.0);
    }
    let mut counters: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for entry in stores.iter()? {
        let (k, v) = entry?;
        counters.insert(k.value().to_owned(), v.value());
    }
    // Stores restored from a backup: numbers the lost relay gave may be missing (held by a
    // till not heard from yet, or never coming back), so gaps are reported, not errors.
    let mut restored: BTreeMap<String, bool> = BTreeMap::new();
    match txn.open_table(RECOVERY) {
        Ok(recovery) => {
            for entry in recovery.iter()? {
                let (k, v) = entry?;
                let record: super::RecoveryRecord = codec::from_json("recovery record", v.value())?;
                restored.insert(k.value().to_owned(), record.recovering());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(RelayError::Corrupt(format!("recovery table: {e}"))),
    }
    for (store, nums) in &mut per_store {
        nums.sort_unstable();
        let counter = counters.get(store).map_or(0, |c| c.0);
        let mut dupes = nums.clone();
        dupes.dedup();
        if dupes.len() != nums.len() {
            report
                .errors
                .push(format!("store {store}: an order number is assigned twice"));
        }
        let expected_len = usize::try_from(counter).ok();
        let gap_free =
            Some(dupes.len()) == expected_len && dupes.iter().zip(1..).all(|(n, want)| *n == want);
        if let Some(recovering) = restored.get(store) {
            let within = dupes.last().is_none_or(|last| *last <= counter);
            if !within {
                report.errors.push(format!(
                    "store {store}: an order number is above the counter {counter}"
                ));
            } else if !gap_free {
                let missing = counter.saturating_sub(dupes.len() as u64);
                report.warnings.push(format!(
                    "store {store}: {missing} number(s) up to {counter} belong to no order here \
                     (restored from a backup{}: tills not heard from may hold them)",
                    if *recovering {
                        ", still recovering"
                    } else {
                        ""
                    }
                ));
            }
        } else if !gap_free {
            report.errors.push(format!(
                "store {store}: numbers are not exactly 1..={counter} ({} orders)",
                nums.len()
            ));
        }
    }
    for (store, (counter, _)) in &counters {
        if !per_store.contains_key(store) && *counter != 0 && !restored.contains_key(store) {
            report.errors.push(format!(
                "store {store}: number counter is {counter} but it has no orders"
            ));
        }
    }
    let mut indexed = 0u64;
    for entry in numbers.iter()? {
        let (k, v) = entry?;
        let (store, number) = k.value();
        let id = v.value();
        indexed += 1;
        match metas.get(&id) {
            Some(m) if m.store.as_str() == store && m.number.0 == number => {}
            _ => report.errors.push(format!(
                "number index {store}/{number} -> {} disagrees with the order",
                codec::uuid_text(&id)
            )),
        }
    }
    if indexed != metas.len() as u64 {
        report.errors.push(format!(
            "number index has {indexed} entries for {} orders",
            metas.len()
        ));
    }

    // Feed: exactly one entry per order, at its feed_seq.
    let mut seen: HashMap<[u8; 16], u64> = HashMap::new();
    for entry in feed.iter()? {
        let (k, v) = entry?;
        let (store, seq) = k.value();
        let id = v.value();
        *seen.entry(id).or_default() += 1;
        let head = counters.get(store).map_or(0, |c| c.1);
        if seq > head {
            report
                .errors
                .push(format!("feed {store}/{seq} is past the feed head {head}"));
        }
        match metas.get(&id) {
            Some(m) if m.store.as_str() == store && m.feed_seq == seq => {}
            Some(m) => report.errors.push(format!(
                "feed {store}/{seq} -> order {} whose latest feed entry is {}/{}",
                m.order, m.store, m.feed_seq
            )),
            None => report.errors.push(format!(
                "feed {store}/{seq} names unknown order {}",
                codec::uuid_text(&id)
            )),
        }
    }
    for (key, meta) in &metas {
        let n = seen.get(key).copied().unwrap_or(0);
        if n != 1 {
            report.errors.push(format!(
                "order {}: {n} feed entries (want exactly 1)",
                meta.order
            ));
        }
    }
    Ok(report)
}

/// Loads one order's document and compares it with its metadata.
fn check_document(stored: &StoredOrder, writer: &crdt_model::Writer, report: &mut CheckReport) {
    let meta = &stored.meta;
    let id = meta.order;
    let doc = match stored.to_doc() {
        Ok(doc) => doc,
        Err(e) => {
            report
                .errors
                .push(format!("order {id}: does not load: {e}"));
            return;
        }
    };
    let missing = doc.get_missing_deps(&[]);
    if !missing.is_empty() {
        report.errors.push(format!(
            "order {id}: {} changes with missing dependencies",
            missing.len()
        ));
    }
    let mut heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
    let order = match Order::from_doc(doc, writer.clone()) {
        Ok(o) => o,
        Err(e) => {
            report
                .errors
                .push(format!("order {id}: not an order document: {e}"));
            return;
        }
    };
    if let Err(e) = order.view() {
        report
            .errors
            .push(format!("order {id}: view does not build: {e}"));
    }
    if order.id() != id {
        report
            .errors
            .push(format!("order {id}: document has id {}", order.id()));
    }
    if *order.store() != meta.store {
        report.errors.push(format!(
            "order {id}: document is of store {}, metadata says {}",
            order.store(),
            meta.store
        ));
    }
    match order.number() {
        Ok(Some(n)) if n == meta.number => {}
        Ok(Some(n)) => report.errors.push(format!(
            "order {id}: document has number {n}, relay assigned {}",
            meta.number
        )),
        Ok(None) => report.warnings.push(format!(
            "order {id}: document does not carry its number {} yet",
            meta.number
        )),
        Err(e) => report
            .errors
            .push(format!("order {id}: number does not read: {e}")),
    }
    let mut want = meta.heads.clone();
    heads.sort_unstable();
    want.sort_unstable();
    if heads != want {
        report
            .errors
            .push(format!("order {id}: document heads differ from metadata"));
    }
    match order.status() {
        Ok(s) if s == meta.status => {}
        Ok(s) => report.errors.push(format!(
            "order {id}: document status is {}, metadata says {}",
            s.as_str(),
            meta.status.as_str()
        )),
        Err(e) => report
            .errors
            .push(format!("order {id}: status does not read: {e}")),
    }
}
