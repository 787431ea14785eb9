//! Tests of [`RedbStore`], the device's redb store: identity, append/load round trips with real
//! Automerge changes, compaction, removal, the feed position, durability across close and
//! reopen, refusal of files that are not ours (left unchanged), locking, and a property test
//! that replays random operations against [`MemoryStore`] and compares what both load.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "runtime-tokio")]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use automerge::{Automerge, ChangeHash};
use crdt_model::{
    Currency, DeviceId, LineDraft, NewOrder, Order, OrderId, SplitMix64, StoreId, Timestamp, Writer,
};
use proptest::prelude::*;
use redb::TableDefinition;
use replicator::store::Blocked;
use replicator::store::redb_store::{self, RedbStore};
use replicator::{
    Identity, LocalSyncStatus, MemoryStore, OrderRecord, ReplicatorError, Store, StoredOrder,
};

const T0: i64 = 1_700_000_000_000;

/// One order's history: its id, every change (raw bytes, in order), and the full saves after
/// the first `n` changes (`saves[n]`).
struct History {
    id: OrderId,
    changes: Vec<Vec<u8>>,
    saves: Vec<Vec<u8>>,
    heads: Vec<ChangeHash>,
}

fn device(seed: u64) -> DeviceId {
    DeviceId::generate(Timestamp(T0), &mut SplitMix64::new(seed))
}

/// An order created on a device, then `lines` lines added: `1 + lines` changes.
fn history(seed: u64, lines: usize) -> History {
    let mut rng = SplitMix64::new(seed);
    let id = OrderId::generate(Timestamp(T0), &mut rng);
    let new = NewOrder {
        id,
        store: StoreId::new("s1").unwrap(),
        currency: Currency::new("EUR").unwrap(),
    };
    let mut order = Order::create(
        new,
        Writer::new(device(seed), 1),
        Timestamp(T0),
        &mut SplitMix64::new(1),
    )
    .unwrap();
    for i in 0..lines {
        let draft = LineDraft {
            sku: format!("sku-{i}"),
            name: format!("item {i}"),
            unit_price: 100 + i64::try_from(i).unwrap(),
            quantity: 1,
            modifiers: Vec::new(),
            note: String::new(),
        };
        let at = Timestamp(T0 + 1000 * (i64::try_from(i).unwrap() + 1));
        order.add_line(at, &mut rng, draft).unwrap();
    }
    let changes: Vec<Vec<u8>> = order
        .doc()
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    assert_eq!(changes.len(), 1 + lines);
    let saves = (0..=changes.len())
        .map(|n| {
            let mut doc = Automerge::new();
            for c in &changes[..n] {
                doc.load_incremental(c).unwrap();
            }
            doc.save()
        })
        .collect();
    History {
        id,
        changes,
        saves,
        heads: order.doc().get_heads(),
    }
}

/// The document a stored order produces: the snapshot (if any), then every tail entry.
fn to_doc(o: &StoredOrder) -> Automerge {
    let mut doc = if o.snapshot.is_empty() {
        Automerge::new()
    } else {
        Automerge::load(&o.snapshot).unwrap()
    };
    for change in &o.tail {
        doc.load_incremental(change).unwrap();
    }
    doc
}

fn heads(o: &StoredOrder) -> Vec<ChangeHash> {
    let mut h = to_doc(o).get_heads();
    h.sort();
    h
}

fn sorted(mut h: Vec<ChangeHash>) -> Vec<ChangeHash> {
    h.sort();
    h
}

fn record(status: LocalSyncStatus, at: i64) -> OrderRecord {
    OrderRecord::new(status, at)
}

fn identity(seed: u64) -> Identity {
    Identity {
        device: device(seed),
        store: StoreId::new("s1").unwrap(),
        epoch: 7,
        relay_url: "ws://relay.local:7400/v1/sync".into(),
        fallback_urls: Vec::new(),
        token: format!("dev_{seed}"),
    }
}

fn temp_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("till.redb");
    (dir, path)
}

fn assert_open_error(result: Result<RedbStore, ReplicatorError>, path: &Path) -> String {
    match result {
        Err(ReplicatorError::Open { path: p, reason }) => {
            assert_eq!(p, path);
            let shown = ReplicatorError::Open {
                path: p,
                reason: reason.clone(),
            }
            .to_string();
            assert!(shown.contains(&*path.to_string_lossy()), "{shown}");
            reason
        }
        other => panic!("expected an Open error, got {other:?}"),
    }
}

#[test]
fn open_creates_the_file_and_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("till.redb");
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.path(), path);
    assert!(path.is_file());
    assert_eq!(store.identity().unwrap(), None);
    assert_eq!(store.load_orders().unwrap(), Vec::new());
    assert_eq!(store.feed_seq().unwrap(), 0);
}

#[test]
fn identity_is_set_once_and_refuses_another() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let memory = MemoryStore::new();
    let me = identity(1);
    for s in [&store as &dyn Store, &memory as &dyn Store] {
        s.set_identity(&me).unwrap();
        assert_eq!(s.identity().unwrap(), Some(me.clone()));
        // The same one again is fine.
        s.set_identity(&me).unwrap();
        // Another device, another store or another epoch is refused, saying what it belongs
        // to; the first identity stays.
        let mut other_store = me.clone();
        other_store.store = StoreId::new("s2").unwrap();
        let mut other_epoch = me.clone();
        other_epoch.epoch += 1;
        for other in [identity(2), other_store, other_epoch] {
            let err = s.set_identity(&other).unwrap_err();
            assert!(
                matches!(&err, ReplicatorError::Invalid(m) if m.contains("belongs to device")),
                "{err:?}"
            );
            assert_eq!(s.identity().unwrap(), Some(me.clone()));
        }
    }
    // The relay moved and the token was rotated: the same device's store takes both.
    let mut moved = me.clone();
    moved.token = "dev_rotated".into();
    moved.relay_url = "wss://relay.example:7443/v1/sync".into();
    store.set_identity(&moved).unwrap();
    assert_eq!(store.identity().unwrap(), Some(moved.clone()));
    drop(store);
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.identity().unwrap(), Some(moved));
}

#[test]
fn an_identity_stored_before_fallback_urls_existed_still_loads() {
    let (_dir, path) = temp_file();
    let me = identity(1);
    RedbStore::open(&path).unwrap().set_identity(&me).unwrap();
    // Rewrite the stored identity as earlier builds wrote it: without `fallback_urls`.
    {
        let mut old = serde_json::to_value(&me).unwrap();
        assert!(
            old.as_object_mut()
                .unwrap()
                .remove("fallback_urls")
                .is_some()
        );
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb_store::META)
            .unwrap()
            .insert(
                redb_store::META_IDENTITY,
                serde_json::to_vec(&old).unwrap().as_slice(),
            )
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.identity().unwrap(), Some(me.clone()));
    // The same device, now given further relays, takes them.
    let mut more = me.clone();
    more.fallback_urls = vec!["ws://relay-2.local:7400/v1/sync".into()];
    store.set_identity(&more).unwrap();
    drop(store);
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.identity().unwrap(), Some(more));
}

#[test]
fn appended_changes_load_back_into_the_same_document() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let h = history(1, 4);
    store
        .append(h.id, &h.changes[..1], &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    store
        .append(
            h.id,
            &h.changes[1..3],
            &record(LocalSyncStatus::Syncing, T0 + 1),
        )
        .unwrap();
    store
        .append(h.id, &[], &record(LocalSyncStatus::Delayed, T0 + 2))
        .unwrap();
    let last = record(LocalSyncStatus::Synced, T0 + 3);
    store.append(h.id, &h.changes[3..], &last).unwrap();

    let orders = store.load_orders().unwrap();
    assert_eq!(orders.len(), 1);
    let o = &orders[0];
    assert_eq!(o.order, h.id);
    assert!(o.snapshot.is_empty());
    assert_eq!(o.tail, h.changes, "tail in append order");
    assert_eq!(o.record, last);
    assert_eq!(heads(o), sorted(h.heads.clone()));
    // The model reads the order back too.
    let doc = to_doc(o);
    let order = Order::from_doc(doc, Writer::new(device(9), 1)).unwrap();
    assert_eq!(order.id(), h.id);
    assert_eq!(order.view().unwrap().lines.len(), 4);
}

#[test]
fn an_order_appended_without_changes_exists_with_its_record() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let h = history(2, 0);
    let rec = record(LocalSyncStatus::Synced, T0);
    store.append(h.id, &[], &rec).unwrap();
    let orders = store.load_orders().unwrap();
    assert_eq!(
        orders,
        vec![StoredOrder {
            order: h.id,
            snapshot: Vec::new(),
            tail: Vec::new(),
            record: rec
        }]
    );
}

#[test]
fn orders_load_sorted_by_id() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let mut ids = Vec::new();
    for seed in 10..20 {
        let h = history(seed, 0);
        store
            .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
            .unwrap();
        ids.push(h.id);
    }
    ids.sort();
    let loaded: Vec<OrderId> = store
        .load_orders()
        .unwrap()
        .iter()
        .map(|o| o.order)
        .collect();
    assert_eq!(loaded, ids);
}

#[test]
fn compaction_replaces_snapshot_and_tail() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let h = history(3, 5);
    let other = history(4, 2);
    store
        .append(
            other.id,
            &other.changes,
            &record(LocalSyncStatus::Syncing, T0),
        )
        .unwrap();
    store
        .append(h.id, &h.changes[..4], &record(LocalSyncStatus::Syncing, T0))
        .unwrap();

    let compacted = record(LocalSyncStatus::Synced, T0 + 5);
    store.compact(h.id, &h.saves[4], &compacted).unwrap();
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == h.id)
        .unwrap();
    assert_eq!(o.snapshot, h.saves[4]);
    assert!(o.tail.is_empty());
    assert_eq!(o.record, compacted);

    // Appends after a compaction go to a fresh tail on top of the snapshot.
    store
        .append(
            h.id,
            &h.changes[4..],
            &record(LocalSyncStatus::Syncing, T0 + 6),
        )
        .unwrap();
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == h.id)
        .unwrap();
    assert_eq!(o.snapshot, h.saves[4]);
    assert_eq!(o.tail, h.changes[4..].to_vec());
    assert_eq!(heads(&o), sorted(h.heads.clone()));

    // Compacting again with the full save.
    store.compact(h.id, &h.saves[6], &compacted).unwrap();
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == h.id)
        .unwrap();
    assert!(o.tail.is_empty());
    assert_eq!(heads(&o), sorted(h.heads.clone()));

    // The other order is untouched.
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == other.id)
        .unwrap();
    assert_eq!(o.tail, other.changes);

    // Compacting an order the device does not have yet stores it (a fetched order).
    let fetched = history(5, 1);
    store
        .compact(fetched.id, &fetched.saves[2], &compacted)
        .unwrap();
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == fetched.id)
        .unwrap();
    assert_eq!(heads(&o), sorted(fetched.heads));
}

#[test]
fn remove_deletes_everything_of_one_order() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let a = history(6, 2);
    let b = history(7, 2);
    store
        .append(a.id, &a.changes, &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    store
        .compact(a.id, &a.saves[2], &record(LocalSyncStatus::Synced, T0))
        .unwrap();
    store
        .append(a.id, &a.changes[2..], &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    store
        .append(b.id, &b.changes, &record(LocalSyncStatus::Syncing, T0))
        .unwrap();

    store.remove(a.id).unwrap();
    let orders = store.load_orders().unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order, b.id);
    assert_eq!(orders[0].tail, b.changes);
    // Removing an unknown order is a no-op.
    store.remove(a.id).unwrap();
    // A removed order is unknown to put_record.
    let err = store
        .put_record(a.id, &record(LocalSyncStatus::Synced, T0))
        .unwrap_err();
    assert!(
        matches!(err, ReplicatorError::UnknownOrder(id) if id == a.id),
        "{err:?}"
    );
    // Fetched again, it starts from nothing.
    store
        .append(a.id, &a.changes[..1], &record(LocalSyncStatus::Synced, T0))
        .unwrap();
    let o = store
        .load_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.order == a.id)
        .unwrap();
    assert!(o.snapshot.is_empty());
    assert_eq!(o.tail, a.changes[..1].to_vec());
}

#[test]
fn put_record_writes_only_the_record_of_a_known_order() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let h = history(8, 1);
    let err = store
        .put_record(h.id, &record(LocalSyncStatus::Synced, T0))
        .unwrap_err();
    assert!(
        matches!(err, ReplicatorError::UnknownOrder(id) if id == h.id),
        "{err:?}"
    );
    assert!(
        store.load_orders().unwrap().is_empty(),
        "nothing was created"
    );

    store
        .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    let mut rec = record(LocalSyncStatus::Blocked, T0 + 9);
    rec.blocked = Some(Blocked {
        code: "policy".into(),
        message: "closed order".into(),
        changes: vec![[7; 32]],
    });
    rec.receipted = vec![[1; 32], [2; 32]];
    rec.settled_at = Some(T0 + 8);
    store.put_record(h.id, &rec).unwrap();
    let o = &store.load_orders().unwrap()[0];
    assert_eq!(o.record, rec);
    assert_eq!(o.tail, h.changes);
}

#[test]
fn feed_seq_is_stored() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.feed_seq().unwrap(), 0);
    store.set_feed_seq(42).unwrap();
    assert_eq!(store.feed_seq().unwrap(), 42);
    store.set_feed_seq(u64::MAX).unwrap();
    assert_eq!(store.feed_seq().unwrap(), u64::MAX);
    store.set_feed_seq(43).unwrap();
    drop(store);
    assert_eq!(RedbStore::open(&path).unwrap().feed_seq().unwrap(), 43);
}

#[test]
fn data_survives_close_and_reopen() {
    let (_dir, path) = temp_file();
    let a = history(11, 3);
    let b = history(12, 2);
    let me = identity(3);
    let before = {
        let store = RedbStore::open(&path).unwrap();
        store.set_identity(&me).unwrap();
        store.set_feed_seq(17).unwrap();
        store
            .append(a.id, &a.changes[..2], &record(LocalSyncStatus::Syncing, T0))
            .unwrap();
        store
            .compact(a.id, &a.saves[2], &record(LocalSyncStatus::Synced, T0 + 1))
            .unwrap();
        store
            .append(
                a.id,
                &a.changes[2..],
                &record(LocalSyncStatus::Syncing, T0 + 2),
            )
            .unwrap();
        store
            .append(b.id, &b.changes, &record(LocalSyncStatus::Charging, T0 + 3))
            .unwrap();
        store.load_orders().unwrap()
    };
    for _ in 0..2 {
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.identity().unwrap(), Some(me.clone()));
        assert_eq!(store.feed_seq().unwrap(), 17);
        let after = store.load_orders().unwrap();
        assert_eq!(after, before);
        let a_loaded = after.iter().find(|o| o.order == a.id).unwrap();
        assert_eq!(heads(a_loaded), sorted(a.heads.clone()));
        let b_loaded = after.iter().find(|o| o.order == b.id).unwrap();
        assert_eq!(heads(b_loaded), sorted(b.heads.clone()));
    }
}

/// A copy of the file taken while the store is open is what a crash (`kill -9`, power loss)
/// leaves: redb must repair it, and every committed write is there.
#[test]
fn a_file_left_by_a_crash_opens_with_every_commit() {
    let (dir, path) = temp_file();
    let crashed = dir.path().join("crashed.redb");
    let h = history(18, 3);
    let store = RedbStore::open(&path).unwrap();
    store.set_identity(&identity(4)).unwrap();
    store
        .append(h.id, &h.changes[..2], &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    store
        .compact(h.id, &h.saves[2], &record(LocalSyncStatus::Synced, T0))
        .unwrap();
    store
        .append(h.id, &h.changes[2..], &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    store.set_feed_seq(9).unwrap();
    std::fs::copy(&path, &crashed).unwrap();
    let want = store.load_orders().unwrap();
    assert!(
        matches!(
            redb::ReadOnlyDatabase::open(&crashed),
            Err(redb::DatabaseError::RepairAborted)
        ),
        "the copy needs a repair"
    );

    let reopened = RedbStore::open(&crashed).unwrap();
    assert_eq!(reopened.identity().unwrap(), Some(identity(4)));
    assert_eq!(reopened.feed_seq().unwrap(), 9);
    assert_eq!(reopened.load_orders().unwrap(), want);
    assert_eq!(heads(&want[0]), sorted(h.heads));
}

#[test]
fn a_second_open_of_the_same_file_is_refused_as_in_use() {
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let h = history(13, 0);
    store
        .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("in use"), "{reason}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The first handle still works.
    assert_eq!(store.load_orders().unwrap().len(), 1);
    drop(store);
    assert_eq!(
        RedbStore::open(&path).unwrap().load_orders().unwrap().len(),
        1
    );
}

#[test]
fn a_garbage_file_is_refused_and_left_unchanged() {
    let (_dir, path) = temp_file();
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(7) + 3) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    eprintln!("garbage: {reason}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "file untouched");

    // A short file too.
    std::fs::write(&path, b"hello").unwrap();
    assert_open_error(RedbStore::open(&path), &path);
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");

    // A directory in place of the file.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert_open_error(RedbStore::open(&path), &path);
}

#[test]
fn an_empty_file_is_initialised() {
    let (_dir, path) = temp_file();
    std::fs::write(&path, b"").unwrap();
    let store = RedbStore::open(&path).unwrap();
    store.set_feed_seq(1).unwrap();
    drop(store);
    assert_eq!(RedbStore::open(&path).unwrap().feed_seq().unwrap(), 1);
}

/// The relay's table layout (`relay-server/src/store/tables.rs`), rebuilt here: a `meta` table
/// with a `format` key, and order tables.
#[test]
fn a_relay_style_redb_file_is_refused_and_left_unchanged() {
    let (_dir, path) = temp_file();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).unwrap();
            meta.insert("format", &1u32.to_be_bytes()[..]).unwrap();
            meta.insert("identity", &[0u8; 20][..]).unwrap();
            let orders: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("orders");
            txn.open_table(orders)
                .unwrap()
                .insert([1; 16], &b"meta"[..])
                .unwrap();
            let tail: TableDefinition<'_, ([u8; 16], u32), &[u8]> = TableDefinition::new("tail");
            txn.open_table(tail)
                .unwrap()
                .insert(([1; 16], 0), &b"change"[..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    eprintln!("relay file: {reason}");
    assert!(reason.contains("not a replicator store"), "{reason}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "file untouched");
}

#[test]
fn foreign_tables_and_unknown_format_versions_are_refused() {
    // A redb file with only our table names but no format version (the relay's `meta` alone).
    let (_dir, path) = temp_file();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let meta: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
        txn.open_table(meta)
            .unwrap()
            .insert("format", &1u32.to_be_bytes()[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("format version"), "{reason}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // Our table name with other types.
    let (_dir2, path) = temp_file();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let meta: TableDefinition<'_, u64, u64> = TableDefinition::new("meta");
        txn.open_table(meta).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    assert_open_error(RedbStore::open(&path), &path);
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // Ours, from a future build.
    let (_dir3, path) = temp_file();
    {
        let store = RedbStore::open(&path).unwrap();
        let h = history(14, 0);
        store
            .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
            .unwrap();
    }
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb_store::META)
            .unwrap()
            .insert(redb_store::META_FORMAT, &99u32.to_be_bytes()[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("99"), "{reason}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_blank_redb_file_is_initialised() {
    let (_dir, path) = temp_file();
    drop(redb::Database::create(&path).unwrap());
    let store = RedbStore::open(&path).unwrap();
    let h = history(15, 0);
    store
        .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
        .unwrap();
    drop(store);
    assert_eq!(
        RedbStore::open(&path).unwrap().load_orders().unwrap().len(),
        1
    );
}

#[test]
fn a_damaged_store_is_refused_and_left_unchanged() {
    let (_dir, path) = temp_file();
    {
        let store = RedbStore::open(&path).unwrap();
        for seed in 0..30 {
            let h = history(100 + seed, 1);
            store
                .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
                .unwrap();
        }
    }
    let good = std::fs::read(&path).unwrap();
    // Damage the data pages (past the header), keep the length.
    let mut bad = good.clone();
    for b in bad.iter_mut().skip(8192).step_by(7) {
        *b = b.wrapping_add(0x5a);
    }
    std::fs::write(&path, &bad).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    eprintln!("damaged: {reason}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bad,
        "a damaged file is left as it was"
    );
}

#[test]
fn a_single_flipped_byte_in_a_record_is_caught_on_open() {
    let (_dir, path) = temp_file();
    let marker = "a-very-recognisable-blocked-reason";
    {
        let store = RedbStore::open(&path).unwrap();
        let h = history(17, 1);
        let mut rec = record(LocalSyncStatus::Blocked, T0);
        rec.blocked = Some(Blocked {
            code: "policy".into(),
            message: marker.into(),
            changes: vec![],
        });
        store.append(h.id, &h.changes, &rec).unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let hits: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty());
    for i in hits {
        bytes[i + 5] ^= 0x01;
    }
    std::fs::write(&path, &bytes).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("damaged"), "{reason}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a damaged file is left as it was"
    );
}

#[test]
fn undecodable_stored_values_are_corrupt_errors() {
    let (_dir, path) = temp_file();
    let h = history(16, 0);
    {
        let store = RedbStore::open(&path).unwrap();
        store.set_identity(&identity(1)).unwrap();
        store
            .append(h.id, &h.changes, &record(LocalSyncStatus::Syncing, T0))
            .unwrap();
    }
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb_store::RECORDS)
            .unwrap()
            .insert(*h.id.as_bytes(), &b"{not json"[..])
            .unwrap();
        let mut meta = txn.open_table(redb_store::META).unwrap();
        meta.insert(redb_store::META_IDENTITY, &b"[]"[..]).unwrap();
        meta.insert(redb_store::META_FEED_SEQ, &b"abc"[..]).unwrap();
        drop(meta);
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert!(matches!(
        store.load_orders(),
        Err(ReplicatorError::Corrupt(_))
    ));
    assert!(matches!(store.identity(), Err(ReplicatorError::Corrupt(_))));
    assert!(matches!(
        store.set_identity(&identity(1)),
        Err(ReplicatorError::Corrupt(_))
    ));
    assert!(matches!(store.feed_seq(), Err(ReplicatorError::Corrupt(_))));
    // Writing a good value repairs what can be repaired.
    store.set_feed_seq(5).unwrap();
    assert_eq!(store.feed_seq().unwrap(), 5);
}

// ---------------------------------------------------------------------------------------------
// Property: RedbStore behaves like MemoryStore.

/// Three orders' histories shared by every case.
static HISTORIES: LazyLock<Vec<History>> =
    LazyLock::new(|| (0..3).map(|i| history(1000 + i, 4)).collect());

#[derive(Clone, Debug)]
enum Op {
    /// Append `len` changes of order `order` starting at change `from`.
    Append {
        order: usize,
        from: usize,
        len: usize,
        rec: u8,
    },
    PutRecord {
        order: usize,
        rec: u8,
    },
    /// Compact with the save after `upto` changes (`upto > 5`: an empty snapshot).
    Compact {
        order: usize,
        upto: usize,
        rec: u8,
    },
    Remove {
        order: usize,
    },
    SetFeedSeq(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..5usize, 0..4usize, any::<u8>())
            .prop_map(|(order, from, len, rec)| Op::Append { order, from, len, rec }),
        2 => (0..3usize, any::<u8>()).prop_map(|(order, rec)| Op::PutRecord { order, rec }),
        2 => (0..3usize, 0..7usize, any::<u8>())
            .prop_map(|(order, upto, rec)| Op::Compact { order, upto, rec }),
        1 => (0..3usize).prop_map(|order| Op::Remove { order }),
        1 => any::<u64>().prop_map(Op::SetFeedSeq),
        1 => Just(Op::Reopen),
    ]
}

fn record_of(rec: u8) -> OrderRecord {
    let status = LocalSyncStatus::ALL[usize::from(rec) % LocalSyncStatus::ALL.len()];
    let mut r = OrderRecord::new(status, i64::from(rec));
    if rec.is_multiple_of(3) {
        r.receipted = vec![[rec; 32]];
    }
    if status == LocalSyncStatus::Blocked {
        r.blocked = Some(Blocked {
            code: "policy".into(),
            message: format!("m{rec}"),
            changes: vec![],
        });
    }
    r
}

fn apply(store: &dyn Store, op: &Op) -> Result<(), ReplicatorError> {
    let h = &*HISTORIES;
    match *op {
        Op::Append {
            order,
            from,
            len,
            rec,
        } => {
            let changes = &h[order].changes;
            let end = (from + len).min(changes.len());
            store.append(h[order].id, &changes[from.min(end)..end], &record_of(rec))
        }
        Op::PutRecord { order, rec } => store.put_record(h[order].id, &record_of(rec)),
        Op::Compact { order, upto, rec } => {
            let snapshot = h[order].saves.get(upto).cloned().unwrap_or_default();
            store.compact(h[order].id, &snapshot, &record_of(rec))
        }
        Op::Remove { order } => store.remove(h[order].id),
        Op::SetFeedSeq(seq) => store.set_feed_seq(seq),
        Op::Reopen => Ok(()),
    }
}

proptest! {
    #[test]
    fn redb_store_matches_memory_store(ops in prop::collection::vec(op(), 1..20)) {
        let (_dir, path) = temp_file();
        let mut redb = RedbStore::open(&path).unwrap();
        let mem = MemoryStore::new();
        for op in &ops {
            if matches!(op, Op::Reopen) {
                drop(redb);
                redb = RedbStore::open(&path).unwrap();
            }
            let a = apply(&redb, op);
            let b = apply(&mem, op);
            prop_assert_eq!(format!("{a:?}"), format!("{b:?}"), "{:?}", op);

            let got = redb.load_orders().unwrap();
            let want = mem.load_orders().unwrap();
            prop_assert_eq!(&got, &want, "after {:?}", op);
            for (g, w) in got.iter().zip(&want) {
                prop_assert_eq!(heads(g), heads(w));
            }
            prop_assert_eq!(redb.feed_seq().unwrap(), mem.feed_seq().unwrap());
        }
    }
}

/// A batch of effects (what one flush of the engine's queue writes) lands whole in one
/// transaction: every order and record in it, the feed position, and a record for an order
/// that is gone is skipped, not an error. The memory store's one-by-one default agrees.
#[test]
fn a_batch_of_effects_is_written_whole() {
    use replicator::Effect;
    let (_dir, path) = temp_file();
    let store = RedbStore::open(&path).unwrap();
    let memory = MemoryStore::new();
    let a = history(1, 3);
    let b = history(2, 2);
    let gone = history(3, 0);
    let batch = vec![
        Effect::Append {
            order: a.id,
            changes: a.changes[..2].to_vec(),
            record: record(LocalSyncStatus::Syncing, 1),
        },
        Effect::Append {
            order: b.id,
            changes: b.changes.clone(),
            record: record(LocalSyncStatus::Syncing, 2),
        },
        Effect::Append {
            order: a.id,
            changes: a.changes[2..].to_vec(),
            record: record(LocalSyncStatus::Syncing, 3),
        },
        Effect::Record {
            order: gone.id,
            record: record(LocalSyncStatus::Synced, 4),
        },
        Effect::Record {
            order: b.id,
            record: record(LocalSyncStatus::Synced, 5),
        },
        Effect::FeedSeq(42),
    ];
    for s in [&store as &dyn Store, &memory as &dyn Store] {
        let mut durable = 0;
        s.write_batch(&batch, &mut durable).unwrap();
        assert_eq!(durable, batch.len());
        let mut orders = s.load_orders().unwrap();
        orders.sort_by_key(|o| o.order);
        assert_eq!(orders.len(), 2, "the gone order's record is skipped");
        let on = |id| orders.iter().find(|o| o.order == id).unwrap();
        assert_eq!(sorted(heads(on(a.id))), sorted(a.heads.clone()));
        assert_eq!(sorted(heads(on(b.id))), sorted(b.heads.clone()));
        assert_eq!(on(a.id).record, record(LocalSyncStatus::Syncing, 3));
        assert_eq!(on(b.id).record, record(LocalSyncStatus::Synced, 5));
        assert_eq!(s.feed_seq().unwrap(), 42);
    }
    drop(store);
    let reopened = RedbStore::open(&path).unwrap();
    assert_eq!(reopened.load_orders().unwrap().len(), 2);
}
