//! Tests of the PostgreSQL store (`relay_server::pg`): the redb store's behaviours (numbering,
//! feed, conflicts, idempotent retry, compaction, devices, tokens) on real order documents,
//! plus what only a shared database has: two `PgStore`s numbering one store's orders at once,
//! and two relays writing one order at once.
//!
//! They run when `RELAY_TEST_POSTGRES` holds a connection URL (CI sets it; locally e.g.
//! `RELAY_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/test`), each test in a fresh schema
//! it creates and drops. Without it each test prints how to enable it and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crdt_model::automerge::ChangeHash;
use crdt_model::{DeviceId, Order, OrderId, OrderNumber, OrderStatus, Timestamp};
use relay_server::RelayError;
use relay_server::pg::{PgOptions, PgStore, schema};
use relay_server::store::{CommitOutcome, OrderWrite, Principal, StatusFilter};

const ENV: &str = "RELAY_TEST_POSTGRES";

/// The database URL, or `None` after printing how to enable the test.
fn database(test: &str) -> Option<String> {
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

/// A schema of its own for one test, dropped (with everything in it) when this goes away,
/// panics included.
struct Schema {
    url: String,
    name: String,
}

static SCHEMAS: AtomicUsize = AtomicUsize::new(0);

impl Schema {
    fn new(url: &str, test: &str) -> Self {
        let name = format!(
            "relay_t_{}_{}_{}",
            test.chars().take(30).collect::<String>(),
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        );
        let s = Self {
            url: url.to_owned(),
            name,
        };
        s.drop_schema();
        s
    }

    fn options(&self, pool: usize) -> PgOptions {
        PgOptions::new(self.url.clone(), pool).in_schema(self.name.clone())
    }

    async fn store(&self) -> PgStore {
        PgStore::connect_with(&self.options(4)).await.unwrap()
    }

    /// Drops the schema from a thread of its own (this may run inside a runtime). After a
    /// panic the test's connections may still hold locks that only its runtime can release,
    /// so the thread is then left to finish on its own instead of being waited for.
    fn drop_schema(&self) {
        let url = self.url.clone();
        let sql = format!(
            "SET lock_timeout = '60s'; DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        );
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let task = tokio::spawn(conn);
                if let Err(e) = client.batch_execute(&sql).await {
                    eprintln!("dropping a test schema failed: {e}");
                }
                drop(client);
                let _ = task.await;
            });
        });
        if !std::thread::panicking() && thread.join().is_err() {
            eprintln!("dropping a test schema failed");
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.drop_schema();
    }
}

/// Makes real order documents, as terminals would.
mod orders;
use orders::*;

async fn commit_one(store: &PgStore, w: OrderWrite) -> CommitOutcome {
    let mut out = store.commit(&[w]).await.unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

/// The relay's flow for a new order: persist, then write the assigned number into the
/// document (as the relay's writer) and persist that change too.
async fn persist_new(store: &PgStore, o: &mut Order, at: i64) -> CommitOutcome {
    let first = commit_one(store, write(o, &[], at)).await;
    assert!(first.newly_numbered);
    let before = o.heads();
    let mut as_relay = Order::from_doc(o.doc().clone(), store.identity().writer()).unwrap();
    as_relay.assign_number(Timestamp(at), first.number).unwrap();
    *o = Order::from_doc(as_relay.into_doc(), o.writer().clone()).unwrap();
    let second = commit_one(store, write(o, &before, at + 1)).await;
    assert!(!second.newly_numbered);
    assert_eq!(second.number, first.number);
    second
}

/// Numbers of `store`'s orders are exactly 1..=n and its feed positions strictly increase.
async fn assert_numbers_gap_free(store: &PgStore, s: &str) -> usize {
    let feed = store.feed_since(&sid(s), 0, usize::MAX).await.unwrap();
    let mut numbers: Vec<u64> = feed.iter().map(|r| r.meta.number.0).collect();
    numbers.sort_unstable();
    let want: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, want, "store {s}: numbers unique and gap-free");
    assert!(feed.windows(2).all(|w| w[0].seq < w[1].seq));
    for r in &feed {
        assert_eq!(
            store.order_by_number(&sid(s), r.meta.number).await.unwrap(),
            Some(r.meta.order)
        );
    }
    feed.len()
}

#[tokio::test]
async fn migrations_are_versioned_idempotent_and_refuse_a_newer_schema() {
    let Some(url) = database("migrations") else {
        return;
    };
    let schema = Schema::new(&url, "migrations");
    let store = schema.store().await;
    assert_eq!(store.migrate().await.unwrap(), 0, "already at the latest");
    let client = store.pool().get().await.unwrap();
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let want: Vec<i32> = (1..=schema::LATEST as i32).collect();
    assert_eq!(versions, want);
    let sync: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sync, "on");

    // Connecting again (another relay) changes nothing and shares the identity.
    let again = schema.store().await;
    assert_eq!(again.identity().device, store.identity().device);
    assert_ne!(
        again.identity().epoch,
        store.identity().epoch,
        "each relay process writes as its own actor"
    );
    assert_eq!(again.data_id(), store.data_id());
    assert_eq!(again.data_id().len(), 32);

    client
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES (99, 'from the future')",
            &[],
        )
        .await
        .unwrap();
    let err = store.migrate().await.unwrap_err();
    assert!(
        matches!(&err, RelayError::Corrupt(m) if m.contains("99")),
        "{err:?}"
    );
    let err = PgStore::connect_with(&schema.options(1)).await.unwrap_err();
    assert!(matches!(err, RelayError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn orders_round_trip_and_survive_a_reconnect() {
    let Some(url) = database("round_trip") else {
        return;
    };
    let schema = Schema::new(&url, "round_trip");
    let mut m = Maker::new(1);
    let mut o = m.order("s1");
    m.add_line(&mut o, "Espresso");
    let outcome = {
        let store = schema.store().await;
        persist_new(&store, &mut o, T0).await
    };
    let store = schema.store().await;
    assert_eq!(store.order_count().await.unwrap(), 1);
    let meta = store.order_meta(o.id()).await.unwrap().unwrap();
    assert_eq!(meta, outcome.meta);
    assert_eq!(meta.number, OrderNumber(1));
    assert_eq!(meta.store, sid("s1"));
    assert_eq!(meta.status, OrderStatus::InProgress);
    assert_eq!(meta.heads, heads(&o));
    assert_eq!(meta.created_at, T0);
    assert_eq!(meta.updated_at, T0 + 1);
    let stored = store.load_order(o.id()).await.unwrap().unwrap();
    assert!(stored.snapshot.is_empty(), "no compaction yet");
    assert_eq!(stored.tail.len(), 3, "create, add line, the relay's number");
    let back = doc_of(&stored);
    assert_eq!(back.heads(), o.heads());
    assert_eq!(back.number().unwrap(), Some(OrderNumber(1)));
    assert_eq!(back.view().unwrap(), o.view().unwrap());
    assert_eq!(
        store
            .order_by_number(&sid("s1"), OrderNumber(1))
            .await
            .unwrap(),
        Some(o.id())
    );
    assert_eq!(
        store
            .order_by_number(&sid("s1"), OrderNumber(2))
            .await
            .unwrap(),
        None
    );
    let unknown = m.order("s1");
    assert!(store.load_order(unknown.id()).await.unwrap().is_none());
    assert!(store.order_meta(unknown.id()).await.unwrap().is_none());
}

#[tokio::test]
async fn two_stores_are_numbered_independently_and_exactly_once() {
    let Some(url) = database("numbering") else {
        return;
    };
    let schema = Schema::new(&url, "numbering");
    let store = schema.store().await;
    let mut m = Maker::new(2);
    let a: Vec<Order> = (0..3).map(|_| m.order("a")).collect();
    let b: Vec<Order> = (0..2).map(|_| m.order("b")).collect();

    let out = store
        .commit(&[write(&a[0], &[], T0), write(&b[0], &[], T0)])
        .await
        .unwrap();
    assert_eq!(out[0].number, OrderNumber(1));
    assert_eq!(out[1].number, OrderNumber(1));
    assert!(out.iter().all(|o| o.newly_numbered));
    let out = store
        .commit(&[
            write(&a[1], &[], T0),
            write(&a[2], &[], T0),
            write(&b[1], &[], T0),
        ])
        .await
        .unwrap();
    let numbers: Vec<u64> = out.iter().map(|o| o.number.0).collect();
    assert_eq!(numbers, [2, 3, 2]);

    // A retry of an order's first write (same bytes) keeps its number, and its changes are
    // stored once (rows keyed by change hash).
    let tail_before = store.order_meta(a[1].id()).await.unwrap().unwrap().tail_len;
    let retry = commit_one(&store, resend(&a[1], &a[1].heads(), T0 + 5)).await;
    assert!(!retry.newly_numbered);
    assert_eq!(retry.number, OrderNumber(2));
    assert_eq!(retry.meta.tail_len, tail_before, "no duplicate change rows");
    let stored = store.load_order(a[1].id()).await.unwrap().unwrap();
    assert_eq!(stored.meta.created_at, T0, "first persist time kept");
    assert_eq!(stored.meta.updated_at, T0 + 5);
    assert_eq!(doc_of(&stored).heads(), a[1].heads());

    // Two writes of a new order in one batch: numbered once, applied in order.
    let mut c = m.order("a");
    let first = write(&c, &[], T0);
    let seen = c.heads();
    m.add_line(&mut c, "Tea");
    let second = write(&c, &seen, T0 + 1);
    let out = store.commit(&[first, second]).await.unwrap();
    assert_eq!(out[0].number, OrderNumber(4));
    assert!(out[0].newly_numbered);
    assert_eq!(out[1].number, OrderNumber(4));
    assert!(!out[1].newly_numbered);
    assert!(out[1].feed_seq > out[0].feed_seq);
    assert_eq!(out[1].meta.tail_len, 2);
    assert_eq!(
        store.order_meta(c.id()).await.unwrap().unwrap(),
        out[1].meta
    );
    assert_eq!(
        doc_of(&store.load_order(c.id()).await.unwrap().unwrap()).heads(),
        c.heads()
    );

    let next = commit_one(&store, write(&m.order("a"), &[], T0)).await;
    assert_eq!(next.number, OrderNumber(5), "no gap after retries");
    let next = commit_one(&store, write(&m.order("b"), &[], T0)).await;
    assert_eq!(next.number, OrderNumber(3));
    assert_eq!(store.order_count().await.unwrap(), 8);
    assert_eq!(assert_numbers_gap_free(&store, "a").await, 5);
    assert_eq!(assert_numbers_gap_free(&store, "b").await, 3);
}

#[tokio::test]
async fn a_batch_with_a_wrong_store_for_a_known_order_writes_nothing() {
    let Some(url) = database("wrong_store") else {
        return;
    };
    let schema = Schema::new(&url, "wrong_store");
    let store = schema.store().await;
    let mut m = Maker::new(3);
    let mut known = m.order("a");
    commit_one(&store, write(&known, &[], T0)).await;
    let before_meta = store.order_meta(known.id()).await.unwrap().unwrap();
    let head_a = store.feed_head(&sid("a")).await.unwrap();

    let fresh = m.order("a");
    let seen = known.heads();
    m.add_line(&mut known, "Cake");
    let mut wrong = write(&known, &seen, T0 + 1);
    wrong.store = sid("b");
    let err = store
        .commit(&[write(&fresh, &[], T0 + 1), wrong])
        .await
        .unwrap_err();
    assert!(matches!(err, RelayError::Invalid(_)), "{err:?}");
    assert!(store.order_meta(fresh.id()).await.unwrap().is_none());
    assert_eq!(
        store.order_meta(known.id()).await.unwrap().unwrap(),
        before_meta
    );
    assert_eq!(
        store
            .load_order(known.id())
            .await
            .unwrap()
            .unwrap()
            .tail
            .len(),
        1
    );
    assert_eq!(store.feed_head(&sid("a")).await.unwrap(), head_a);
    assert_eq!(store.feed_head(&sid("b")).await.unwrap(), 0);
    assert_eq!(store.order_count().await.unwrap(), 1);

    // The same within one batch: the first write makes the order known in store a.
    let mut twice = write(&fresh, &[], T0 + 1);
    twice.store = sid("b");
    let err = store
        .commit(&[write(&fresh, &[], T0 + 1), twice])
        .await
        .unwrap_err();
    assert!(matches!(err, RelayError::Invalid(_)), "{err:?}");
    assert!(store.order_meta(fresh.id()).await.unwrap().is_none());

    // The rolled-back order gets the number it would have had.
    let out = commit_one(&store, write(&fresh, &[], T0 + 2)).await;
    assert_eq!(out.number, OrderNumber(2));
}

#[tokio::test]
async fn a_write_built_on_stale_heads_is_refused_and_its_batch_writes_nothing() {
    let Some(url) = database("stale") else {
        return;
    };
    let schema = Schema::new(&url, "stale");
    let store = schema.store().await;
    let mut m = Maker::new(14);
    let mut known = m.order("a");
    commit_one(&store, write(&known, &[], T0)).await;
    let first = known.heads();
    m.add_line(&mut known, "Tea");
    commit_one(&store, write(&known, &first, T0 + 1)).await;
    let before_meta = store.order_meta(known.id()).await.unwrap().unwrap();
    assert_eq!(before_meta.heads, heads(&known));
    let before_order = store.load_order(known.id()).await.unwrap().unwrap();
    let head_a = store.feed_head(&sid("a")).await.unwrap();

    let mut other = m.order("a");
    commit_one(&store, write(&other, &[], T0 + 2)).await;
    let other_seen = other.heads();
    let other_meta = store.order_meta(other.id()).await.unwrap().unwrap();
    m.add_line(&mut other, "Cake");
    let fresh = m.order("a");
    m.add_line(&mut known, "Coffee");
    let stale = write(&known, &first, T0 + 3);
    let err = store
        .commit(&[
            write(&fresh, &[], T0 + 3),
            write(&other, &other_seen, T0 + 3),
            stale,
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RelayError::Conflict(msg) if msg.contains(&known.id().to_string())),
        "{err:?}"
    );
    assert!(store.order_meta(fresh.id()).await.unwrap().is_none());
    assert_eq!(
        store.order_meta(other.id()).await.unwrap().unwrap(),
        other_meta
    );
    assert_eq!(
        store.load_order(known.id()).await.unwrap().unwrap(),
        before_order
    );
    assert_eq!(store.feed_head(&sid("a")).await.unwrap(), head_a + 1);
    assert_eq!(store.order_count().await.unwrap(), 2);

    // Built on the stored heads it commits; a later write of the order in the same batch
    // builds on the one before it.
    let stored: Vec<ChangeHash> = before_meta.heads.iter().map(|h| ChangeHash(*h)).collect();
    let w = write(&known, &stored, T0 + 4);
    let seen = known.heads();
    m.add_line(&mut known, "Juice");
    let out = store
        .commit(&[w, write(&known, &seen, T0 + 5)])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].meta.heads, heads(&known));
    let stored = store.load_order(known.id()).await.unwrap().unwrap();
    assert_eq!(doc_of(&stored).heads(), known.heads());

    // A new order with a base is refused and uses no number.
    let o = m.order("a");
    let mut w = write(&o, &[], T0);
    w.base = vec![[7; 32]];
    let err = store.commit(&[w]).await.unwrap_err();
    assert!(matches!(&err, RelayError::Conflict(_)), "{err:?}");
    assert_eq!(
        commit_one(&store, write(&o, &[], T0)).await.number,
        OrderNumber(3)
    );

    // Bytes that are not a change are refused before anything is written.
    let mut junk = write(&m.order("a"), &[], T0);
    junk.changes.push(b"not a change".to_vec());
    let err = store.commit(&[junk]).await.unwrap_err();
    assert!(matches!(&err, RelayError::Invalid(_)), "{err:?}");
    assert_numbers_gap_free(&store, "a").await;
}

#[tokio::test]
async fn compaction_replaces_snapshot_and_tail() {
    let Some(url) = database("compaction") else {
        return;
    };
    let schema = Schema::new(&url, "compaction");
    let store = schema.store().await;
    let mut m = Maker::new(4);
    let mut o = m.order("s");
    persist_new(&store, &mut o, T0).await;
    for name in ["a", "b", "c"] {
        let seen = o.heads();
        m.add_line(&mut o, name);
        commit_one(&store, write(&o, &seen, T0 + 10)).await;
    }
    let before = store.load_order(o.id()).await.unwrap().unwrap();
    assert_eq!(before.tail.len(), 5);
    assert_eq!(before.meta.tail_len, 5);
    // A tail read from a position gives the changes stored there and after, in order.
    for from in [0, 2, 5, 9] {
        let tail = store.load_tail(o.id(), from).await.unwrap().unwrap();
        assert_eq!(tail.meta, before.meta);
        assert_eq!(tail.from, from);
        assert_eq!(tail.changes, before.tail[(from as usize).min(5)..].to_vec());
    }
    let absent = OrderId::generate(Timestamp(T0), &mut m.rng);
    assert!(store.load_tail(absent, 0).await.unwrap().is_none());

    let out = commit_one(&store, compact(&o, &o.heads(), T0 + 20)).await;
    assert_eq!(out.meta.tail_len, 0);
    let after = store.load_order(o.id()).await.unwrap().unwrap();
    assert_eq!(after.snapshot, o.save());
    assert!(after.tail.is_empty());
    assert_eq!(doc_of(&after).view().unwrap(), o.view().unwrap());

    // Appending continues after the snapshot; changes of a compacting write are ignored.
    let seen = o.heads();
    m.add_line(&mut o, "d");
    commit_one(&store, write(&o, &seen, T0 + 30)).await;
    let again = store.load_order(o.id()).await.unwrap().unwrap();
    assert_eq!(again.tail.len(), 1);
    // Positions started over at the compaction: a reader that held 5 tail changes gets none,
    // and the stored heads tell it that it lacks the rest (it then reads the whole order).
    let stale = store.load_tail(o.id(), 5).await.unwrap().unwrap();
    assert!(stale.changes.is_empty());
    assert_eq!(stale.meta.tail_len, 1);
    assert_eq!(doc_of(&again).heads(), o.heads());
    let mut w = compact(&o, &o.heads(), T0 + 40);
    w.changes = vec![b"ignored".to_vec()];
    commit_one(&store, w).await;
    let last = store.load_order(o.id()).await.unwrap().unwrap();
    assert!(last.tail.is_empty());
    assert_eq!(doc_of(&last).heads(), o.heads());

    // Compaction then an append in one batch.
    let seen = o.heads();
    m.add_line(&mut o, "e");
    let out = store
        .commit(&[compact(&o, &seen, T0 + 50), write(&o, &o.heads(), T0 + 51)])
        .await
        .unwrap();
    assert_eq!(
        out[1].meta.tail_len, 0,
        "nothing after the snapshot to append"
    );
    let client = store.pool().get().await.unwrap();
    let rows: i64 = client
        .query_one("SELECT count(*) FROM changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "no stale change row survives the compactions");
}

#[tokio::test]
async fn the_feed_keeps_one_entry_per_order_and_paginates() {
    let Some(url) = database("feed") else {
        return;
    };
    let schema = Schema::new(&url, "feed");
    let store = schema.store().await;
    let mut m = Maker::new(5);
    let s = sid("s");
    assert_eq!(store.feed_head(&s).await.unwrap(), 0);
    assert!(store.feed_since(&s, 0, 10).await.unwrap().is_empty());

    let mut orders: Vec<Order> = (0..5).map(|_| m.order("s")).collect();
    for o in &orders {
        commit_one(&store, write(o, &[], T0)).await;
    }
    commit_one(&store, write(&m.order("other"), &[], T0)).await;
    assert_eq!(store.feed_head(&s).await.unwrap(), 5);
    assert_eq!(store.feed_head(&sid("other")).await.unwrap(), 1);

    for i in [1, 3, 1] {
        let seen = orders[i].heads();
        m.add_line(&mut orders[i], "x");
        commit_one(&store, write(&orders[i], &seen, T0 + 1)).await;
    }
    assert_eq!(store.feed_head(&s).await.unwrap(), 8);
    let all = store.feed_since(&s, 0, 100).await.unwrap();
    let ids: Vec<OrderId> = all.iter().map(|r| r.meta.order).collect();
    let want: Vec<OrderId> = [0, 2, 4, 3, 1].iter().map(|&i| orders[i].id()).collect();
    assert_eq!(ids, want, "one entry per order, latest position");
    let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 3, 5, 7, 8]);
    assert!(all.iter().all(|r| r.meta.feed_seq == r.seq));
    assert!(all.iter().all(|r| r.meta.store == s));

    let mut since = 0;
    let mut paged = Vec::new();
    loop {
        let page = store.feed_since(&s, since, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        since = page.last().unwrap().seq;
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert_eq!(store.feed_since(&s, 5, 100).await.unwrap().len(), 2);
    assert!(store.feed_since(&s, 8, 100).await.unwrap().is_empty());
    assert!(
        store
            .feed_since(&s, u64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.feed_since(&s, 0, 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn list_orders_filters_by_status_and_paginates() {
    let Some(url) = database("list") else {
        return;
    };
    let schema = Schema::new(&url, "list");
    let store = schema.store().await;
    let mut m = Maker::new(6);
    let s = sid("s");
    let (mut active, mut done, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..9 {
        let mut o = m.order("s");
        m.add_line(&mut o, "item");
        match i % 3 {
            0 => {}
            1 => m.complete(&mut o),
            _ => m.delete(&mut o),
        }
        commit_one(&store, write(&o, &[], T0 + i)).await;
        match o.status().unwrap() {
            OrderStatus::Done => done.push(o.id()),
            OrderStatus::Deleted => deleted.push(o.id()),
            _ => active.push(o.id()),
        }
    }
    assert_eq!((active.len(), done.len(), deleted.len()), (3, 3, 3));
    let ids = async |f, since, limit| -> Vec<OrderId> {
        store
            .list_orders(&s, f, since, limit)
            .await
            .unwrap()
            .iter()
            .map(|m| m.order)
            .collect()
    };
    assert_eq!(ids(StatusFilter::Active, 0, 100).await, active);
    assert_eq!(ids(StatusFilter::Done, 0, 100).await, done);
    assert_eq!(ids(StatusFilter::Deleted, 0, 100).await, deleted);
    assert_eq!(ids(StatusFilter::Any, 0, 100).await.len(), 9);
    assert!(ids(StatusFilter::Any, 0, 0).await.is_empty());

    let page1 = store
        .list_orders(&s, StatusFilter::Done, 0, 2)
        .await
        .unwrap();
    assert_eq!(page1.len(), 2);
    let page2 = store
        .list_orders(&s, StatusFilter::Done, page1[1].feed_seq, 2)
        .await
        .unwrap();
    assert_eq!(page2.len(), 1);
    let all: Vec<OrderId> = page1.iter().chain(&page2).map(|m| m.order).collect();
    assert_eq!(all, done);
    assert!(
        store
            .list_orders(&sid("nobody"), StatusFilter::Any, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn tokens_authenticate_to_their_principal_and_are_not_stored() {
    let Some(url) = database("tokens") else {
        return;
    };
    let schema = Schema::new(&url, "tokens");
    let store = schema.store().await;
    assert!(!store.has_admin_token().await.unwrap());
    let (rec, dev_token) = store.add_device(&sid("s1"), "till 1", T0).await.unwrap();
    assert!(!store.has_admin_token().await.unwrap());
    assert!(dev_token.starts_with("dev_"));
    assert_eq!(dev_token.len(), 4 + 64);
    assert_eq!(rec.store, sid("s1"));
    assert_eq!(rec.name, "till 1");
    assert_eq!(rec.created_at, T0);
    assert!(!rec.revoked);
    let (other, other_token) = store
        .add_device(&sid("s2"), "till 2", T0 + 1)
        .await
        .unwrap();
    let admin = store.add_admin_token(None, "ops", T0).await.unwrap();
    let store_admin = store
        .add_admin_token(Some(&sid("s1")), "office", T0)
        .await
        .unwrap();
    assert!(admin.starts_with("adm_") && store_admin.starts_with("adm_"));
    assert!(store.has_admin_token().await.unwrap());

    assert_eq!(
        store.authenticate(&dev_token).await.unwrap(),
        Principal::Device {
            device: rec.device,
            store: sid("s1")
        }
    );
    assert_eq!(
        store.authenticate(&other_token).await.unwrap(),
        Principal::Device {
            device: other.device,
            store: sid("s2")
        }
    );
    assert_eq!(store.authenticate(&admin).await.unwrap(), Principal::Admin);
    assert_eq!(
        store.authenticate(&store_admin).await.unwrap(),
        Principal::StoreAdmin { store: sid("s1") }
    );
    assert_eq!(store.device(rec.device).await.unwrap(), Some(rec.clone()));
    assert_eq!(store.list_devices(None).await.unwrap().len(), 2);
    assert_eq!(
        store.list_devices(Some(&sid("s2"))).await.unwrap(),
        vec![other]
    );
    assert!(
        store
            .list_devices(Some(&sid("s3")))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.add_device(&sid("s1"), "", T0).await,
        Err(RelayError::Invalid(_))
    ));

    // The tokens themselves never reach the database.
    let client = store.pool().get().await.unwrap();
    let dump: Vec<String> = client
        .query(
            "SELECT t::text FROM tokens t UNION ALL SELECT d::text FROM devices d",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in [&dev_token, &admin, &store_admin] {
        let secret = &t[4..];
        assert!(
            dump.iter().all(|row| !row.contains(secret)),
            "a token is stored in the clear"
        );
    }

    let unauthorized =
        async |t: &str| matches!(store.authenticate(t).await, Err(RelayError::Unauthorized));
    assert!(unauthorized(&format!("dev_{}", "0".repeat(64))).await);
    assert!(unauthorized(&format!("adm_{}", "a".repeat(64))).await);
    assert!(unauthorized("").await);
    assert!(unauthorized("dev_").await);
    assert!(unauthorized("Bearer x").await);
    assert!(unauthorized(&dev_token[..dev_token.len() - 1]).await);
    assert!(unauthorized(&format!("{dev_token}0")).await);
    assert!(unauthorized(&dev_token.to_uppercase()).await);
    assert!(unauthorized(&format!("adm_{}", &dev_token[4..])).await);
    assert!(unauthorized(&format!("dev_{}", &admin[4..])).await);

    store.revoke_device(rec.device).await.unwrap();
    assert!(matches!(
        store.authenticate(&dev_token).await,
        Err(RelayError::Revoked)
    ));
    assert!(store.device(rec.device).await.unwrap().unwrap().revoked);
    store.revoke_device(rec.device).await.unwrap();
    let mut m = Maker::new(7);
    let unknown = DeviceId::generate(Timestamp(T0), &mut m.rng);
    assert!(matches!(
        store.revoke_device(unknown).await,
        Err(RelayError::NotFound(_))
    ));
    assert!(store.device(unknown).await.unwrap().is_none());

    // Rotation retires the operator tokens only.
    let second = store.add_admin_token(None, "ops 2", T0).await.unwrap();
    let (new, replaced) = store.rotate_admin_token("ops", T0 + 1).await.unwrap();
    assert_eq!(replaced, 2);
    for old in [&admin, &second] {
        assert!(unauthorized(old).await);
    }
    assert_eq!(store.authenticate(&new).await.unwrap(), Principal::Admin);
    assert_eq!(
        store.authenticate(&store_admin).await.unwrap(),
        Principal::StoreAdmin { store: sid("s1") }
    );
    assert!(matches!(
        store.authenticate(&other_token).await.unwrap(),
        Principal::Device { .. }
    ));
    assert!(store.rotate_admin_token("", T0 + 2).await.is_err());
    assert_eq!(store.authenticate(&new).await.unwrap(), Principal::Admin);
}

#[tokio::test]
async fn orders_waiting_for_their_number_change_are_listed() {
    let Some(url) = database("unnumbered") else {
        return;
    };
    let schema = Schema::new(&url, "unnumbered");
    let store = schema.store().await;
    let mut m = Maker::new(41);
    let mut a = m.order("s1");
    let mut b = m.order("s1");
    let first = commit_one(&store, write(&a, &[], T0)).await;
    assert!(first.newly_numbered);
    assert_eq!(store.unnumbered(10).await.unwrap(), vec![a.id()]);
    persist_new(&store, &mut b, T0 + 5).await;
    assert_eq!(store.unnumbered(10).await.unwrap(), vec![a.id()]);
    drop(store);
    let store = schema.store().await;
    assert_eq!(store.unnumbered(10).await.unwrap(), vec![a.id()]);
    let before = a.heads();
    let mut as_relay = Order::from_doc(a.doc().clone(), store.identity().writer()).unwrap();
    as_relay
        .assign_number(Timestamp(T0 + 9), first.number)
        .unwrap();
    a = Order::from_doc(as_relay.into_doc(), a.writer().clone()).unwrap();
    commit_one(&store, write(&a, &before, T0 + 10)).await;
    assert!(store.unnumbered(10).await.unwrap().is_empty());
}

/// An order back after a restore keeps its number, and the counter moves past it.
#[tokio::test]
async fn an_order_coming_back_with_its_number_keeps_it() {
    let Some(url) = database("comes_back") else {
        return;
    };
    let schema = Schema::new(&url, "comes_back");
    let store = schema.store().await;
    let mut m = Maker::new(42);
    commit_one(&store, write(&m.order("s"), &[], T0)).await;
    let mut back = m.order("s");
    let mut as_relay = Order::from_doc(back.doc().clone(), store.identity().writer()).unwrap();
    as_relay
        .assign_number(Timestamp(T0), OrderNumber(7))
        .unwrap();
    back = Order::from_doc(as_relay.into_doc(), back.writer().clone()).unwrap();
    let out = commit_one(&store, write(&back, &[], T0 + 1)).await;
    assert_eq!(out.number, OrderNumber(7));
    assert!(!out.newly_numbered);
    assert!(!store.unnumbered(10).await.unwrap().contains(&back.id()));
    assert_eq!(
        store
            .order_by_number(&sid("s"), OrderNumber(7))
            .await
            .unwrap(),
        Some(back.id())
    );
    let next = commit_one(&store, write(&m.order("s"), &[], T0 + 2)).await;
    assert_eq!(next.number, OrderNumber(8));
}

/// Two relays (two `PgStore`s, separate pools) on one database create hundreds of orders of
/// the same store at once, in batches of varying size: every number from 1 to the total is
/// given exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_number_one_store_concurrently_without_duplicate_or_gap() {
    let Some(url) = database("concurrent_numbers") else {
        return;
    };
    let schema = Schema::new(&url, "concurrent_numbers");
    let relays = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    const TASKS_PER_RELAY: u64 = 4;
    const ORDERS_PER_TASK: usize = 60;
    let mut tasks = Vec::new();
    for (r, relay) in relays.iter().enumerate() {
        for t in 0..TASKS_PER_RELAY {
            let relay = Arc::clone(relay);
            let seed = 1000 + r as u64 * 100 + t;
            tasks.push(tokio::spawn(async move {
                let mut m = Maker::new(seed);
                let mut numbers = Vec::new();
                let mut left = ORDERS_PER_TASK;
                let mut size = 1;
                while left > 0 {
                    let n = size.min(left);
                    // Mostly store "shared"; now and then another store joins the batch.
                    let mut batch: Vec<OrderWrite> =
                        (0..n).map(|_| write(&m.order("shared"), &[], T0)).collect();
                    if size % 3 == 0 {
                        batch.push(write(&m.order("side"), &[], T0));
                    }
                    for o in relay.commit(&batch).await.unwrap() {
                        assert!(o.newly_numbered);
                        if o.meta.store.as_str() == "shared" {
                            numbers.push(o.number.0);
                        }
                    }
                    left -= n;
                    size = size % 7 + 1;
                }
                numbers
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let total = relays.len() * TASKS_PER_RELAY as usize * ORDERS_PER_TASK;
    all.sort_unstable();
    let want: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(all, want, "numbers handed out: unique, gap-free");
    assert_eq!(assert_numbers_gap_free(&relays[0], "shared").await, total);
    assert_numbers_gap_free(&relays[1], "side").await;
    assert_eq!(
        relays[1].feed_head(&sid("shared")).await.unwrap(),
        total as u64
    );
}

/// Two relays commit a write of the same order built on the same stored heads at the same
/// moment: exactly one lands, the other gets Conflict; and the same for the first persist of
/// one new order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_writing_one_order_at_once_one_wins_the_other_conflicts() {
    let Some(url) = database("concurrent_order") else {
        return;
    };
    let schema = Schema::new(&url, "concurrent_order");
    let a = Arc::new(schema.store().await);
    let b = Arc::new(schema.store().await);
    let mut m = Maker::new(77);
    let mut other = Maker::new(78);
    for round in 0..20 {
        // First persist of one new order from both relays.
        let o = m.order("s");
        let w = write(&o, &[], T0 + round);
        let results = race(&a, &b, vec![w.clone()], vec![w]).await;
        let (won, lost) = one_winner(&results);
        assert!(won.is_some() && lost, "round {round}: {results:?}");

        // Two tills' edits of the stored order reach two relays, both built on its heads.
        let base = o.heads();
        let mut on_a = o.clone();
        m.add_line(&mut on_a, "from a");
        let mut on_b = Order::from_doc(o.doc().clone(), other.writer.clone()).unwrap();
        other.add_line(&mut on_b, "from b");
        let results = race(
            &a,
            &b,
            vec![write(&on_a, &base, T0 + round)],
            vec![write(&on_b, &base, T0 + round)],
        )
        .await;
        let (won, lost) = one_winner(&results);
        assert!(lost, "round {round}: {results:?}");
        let winner = if won == Some(0) { &on_a } else { &on_b };
        let stored = a.load_order(o.id()).await.unwrap().unwrap();
        assert_eq!(stored.meta.heads, heads(winner));
        assert_eq!(doc_of(&stored).heads(), winner.heads());
    }
    assert_numbers_gap_free(&a, "s").await;
}

type Outcome = Result<Vec<CommitOutcome>, RelayError>;

/// Commits `wa` on `a` and `wb` on `b` at the same moment.
async fn race(
    a: &Arc<PgStore>,
    b: &Arc<PgStore>,
    wa: Vec<OrderWrite>,
    wb: Vec<OrderWrite>,
) -> [Outcome; 2] {
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let spawn = |store: &Arc<PgStore>, writes: Vec<OrderWrite>| {
        let store = Arc::clone(store);
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            gate.wait().await;
            store.commit(&writes).await
        })
    };
    let ta = spawn(a, wa);
    let tb = spawn(b, wb);
    [ta.await.unwrap(), tb.await.unwrap()]
}

/// Which of the two landed (if exactly one did), and whether the other got Conflict.
fn one_winner(results: &[Outcome; 2]) -> (Option<usize>, bool) {
    match (&results[0], &results[1]) {
        (Ok(_), Err(RelayError::Conflict(_))) => (Some(0), true),
        (Err(RelayError::Conflict(_)), Ok(_)) => (Some(1), true),
        _ => (None, false),
    }
}

/// Not a test of speed (nothing is asserted on time): prints commits/s of batches of 50
/// writes (new orders, then appends to them) against the database. Run with
/// `cargo test -p relay-server --test pg_store -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a throughput figure; run by hand"]
async fn batch_commit_throughput() {
    let Some(url) = database("throughput") else {
        return;
    };
    let schema = Schema::new(&url, "throughput");
    let store = schema.store().await;
    let mut m = Maker::new(5);
    const BATCH: usize = 50;
    const BATCHES: usize = 40;
    let stores = ["s1", "s2", "s3", "s4"];
    let mut orders: Vec<Order> = (0..BATCH * BATCHES)
        .map(|i| m.order(stores[i % stores.len()]))
        .collect();
    let started = Instant::now();
    for chunk in orders.chunks(BATCH) {
        let batch: Vec<OrderWrite> = chunk.iter().map(|o| write(o, &[], T0)).collect();
        store.commit(&batch).await.unwrap();
    }
    let new_secs = started.elapsed().as_secs_f64();
    let mut batches = Vec::new();
    for chunk in orders.chunks_mut(BATCH) {
        let batch: Vec<OrderWrite> = chunk
            .iter_mut()
            .map(|o| {
                let seen = o.heads();
                m.add_line(o, "more");
                write(o, &seen, T0 + 1)
            })
            .collect();
        batches.push(batch);
    }
    let started = Instant::now();
    for batch in &batches {
        store.commit(batch).await.unwrap();
    }
    let append_secs = started.elapsed().as_secs_f64();
    println!(
        "PostgreSQL commit, batches of {BATCH} writes: new orders {:.0} batches/s ({:.0} \
         writes/s); appends {:.0} batches/s ({:.0} writes/s)",
        BATCHES as f64 / new_secs,
        (BATCHES * BATCH) as f64 / new_secs,
        BATCHES as f64 / append_secs,
        (BATCHES * BATCH) as f64 / append_secs,
    );
}
