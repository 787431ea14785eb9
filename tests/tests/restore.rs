//! A relay restored from an older backup loses nothing the tills still hold (issue 14): sales,
//! payments and numbers made after the backup come back through the tills, with their
//! numbers; the relay's own changes made after the backup (numbers, a back-office status) are
//! accepted because they are sealed; a new order made while a till has not reconnected waits
//! for its number, which then never repeats one a till holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crdt_model::*;
use e2e::harness::{EmbeddedRelay, http};
use relay_server::store::RelayStore;
use replicator::core::EngineConfig;
use replicator::*;

fn fast() -> Config {
    Config {
        engine: EngineConfig {
            backoff_min_ms: 20,
            backoff_max_ms: 200,
            ..EngineConfig::default()
        },
        connect_timeout: Duration::from_secs(2),
    }
}

fn eur() -> Currency {
    Currency::new("EUR").unwrap()
}

fn line(name: &str, price: i64) -> LineDraft {
    LineDraft {
        sku: name.to_lowercase(),
        name: name.into(),
        unit_price: price,
        quantity: 1,
        ..Default::default()
    }
}

fn cash(amount: i64) -> PaymentDraft {
    PaymentDraft {
        kind: PaymentKind::Cash,
        amount,
        reference: String::new(),
    }
}

async fn open(dir: &tempfile::TempDir, name: &str, identity: &Identity) -> Replicator {
    let terminal = Arc::new(SimTerminal::new(SimMode::Approve));
    Replicator::open(
        &dir.path().join(format!("{name}.redb")),
        identity.clone(),
        fast(),
        terminal,
    )
    .await
    .unwrap()
}

async fn wait_number(r: &Replicator, order: OrderId) -> u64 {
    for _ in 0..800 {
        if let Some(n) = r.view(order).await.ok().and_then(|v| v.number) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no number for {order}");
}

/// Waits until `r` holds `order` Synced with `pred` true of its view.
#[track_caller]
fn wait_synced<'a>(
    r: &'a Replicator,
    order: OrderId,
    pred: impl Fn(&OrderView) -> bool + 'a,
) -> impl Future<Output = ()> + 'a {
    let at = std::panic::Location::caller();
    async move {
        for _ in 0..800 {
            if r.sync_status(order).await == Some(LocalSyncStatus::Synced)
                && let Ok(v) = r.view(order).await
                && pred(&v)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{at}: order {order} not synced as expected: {:?} ({:?}) {:?}",
            r.sync_status(order).await,
            r.blocked_reason(order).await,
            r.view(order)
                .await
                .map(|v| (v.number, v.status, v.payments.len()))
        );
    }
}

/// The tills of `(on_a, on_b)`.
fn pick<'r>(on: (bool, bool), a: &'r Replicator, b: &'r Replicator) -> Vec<&'r Replicator> {
    let mut v = Vec::new();
    if on.0 {
        v.push(a);
    }
    if on.1 {
        v.push(b);
    }
    v
}

/// What a sale looks like wherever it is read: number, status, paid, line count.
fn summary(v: &OrderView) -> (Option<u64>, OrderStatus, i64, usize) {
    (v.number, v.status, v.totals.paid, v.lines.len())
}

fn at_relay(store: &RelayStore, order: OrderId) -> OrderView {
    let doc = store.load_order(order).unwrap().unwrap().to_doc().unwrap();
    Order::from_doc(doc, Writer::new(DeviceId(Default::default()), 0))
        .unwrap()
        .view()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_an_older_backup_loses_no_sale_payment_or_number() {
    let data = tempfile::tempdir().unwrap();
    let devs = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let mut relay = EmbeddedRelay::start(data.path(), 0).await.unwrap();
    let port = relay.addr.port();
    let s1 = StoreId::new("s1").unwrap();
    let identity = |relay: &EmbeddedRelay, name: &str| {
        let (device, token) = relay.provision(&s1, name).unwrap();
        Identity {
            device,
            store: s1.clone(),
            epoch: 1,
            relay_url: format!("ws://127.0.0.1:{port}/v1/sync"),
            fallback_urls: Vec::new(),
            token,
        }
    };
    let (ida, idb) = (identity(&relay, "a"), identity(&relay, "b"));
    let a = open(&devs, "a", &ida).await;
    let b = open(&devs, "b", &idb).await;

    // Before the backup: one sale, paid and closed.
    let before = a.create_order(eur()).await.unwrap();
    a.add_line(before, line("Soup", 700)).await.unwrap();
    a.take_payment(before, cash(700)).await.unwrap();
    a.complete_sale(before, None).await.unwrap();
    wait_synced(&a, before, |v| v.number.is_some() && v.status.is_terminal()).await;
    let backup = backups.path().join("relay.redb");
    relay.store().unwrap().backup_to(&backup).unwrap();

    // After the backup, on both tills: a paid and closed sale, an open sale paid in part, a
    // sale made on one till and paid on the other, and a back-office status change (written
    // by the relay itself).
    let closed = b.create_order(eur()).await.unwrap();
    b.add_line(closed, line("Tea", 300)).await.unwrap();
    b.take_payment(closed, cash(300)).await.unwrap();
    b.complete_sale(closed, None).await.unwrap();
    let open_sale = a.create_order(eur()).await.unwrap();
    a.add_line(open_sale, line("Cake", 450)).await.unwrap();
    a.add_line(open_sale, line("Coffee", 250)).await.unwrap();
    a.take_payment(open_sale, cash(200)).await.unwrap();
    let shared = a.create_order(eur()).await.unwrap();
    a.add_line(shared, line("Bread", 380)).await.unwrap();
    wait_number(&a, shared).await;
    wait_synced(&b, shared, |v| v.lines.len() == 1).await;
    b.take_payment(shared, cash(380)).await.unwrap();
    wait_number(&b, closed).await;
    for o in [open_sale, shared] {
        wait_number(&a, o).await;
    }
    let (status, body) = http(
        relay.addr,
        "POST",
        &format!("/v1/orders/{open_sale}/status"),
        &relay.admin,
        Some(r#"{"status":"in_delivery"}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // Everything reached the tills that hold it (a closed order is not fetched by the other
    // till) and is Synced there.
    let sales = [before, closed, open_sale, shared];
    // (held by a, held by b)
    let holds = move |o: OrderId| (o != closed, o != before);
    let mut expected = BTreeMap::new();
    for o in sales {
        let first = pick(holds(o), &a, &b)[0];
        wait_synced(first, o, |v| {
            v.number.is_some() && (o != open_sale || v.status == OrderStatus::InDelivery)
        })
        .await;
        let want = summary(&first.view(o).await.unwrap());
        for r in pick(holds(o), &a, &b) {
            wait_synced(r, o, |v| summary(v) == want).await;
        }
        expected.insert(o, want);
    }
    let mut numbers: Vec<u64> = expected.values().filter_map(|s| s.0).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![1, 2, 3, 4], "one number per sale");
    let highest = *numbers.iter().max().unwrap();
    assert_eq!(highest, 4);

    // The relay is lost; till b is switched off meanwhile. The backup is restored (into a new
    // directory, as an operator would) and served at the same address.
    b.close().await;
    drop(b);
    relay.stop().await.unwrap();
    drop(relay);
    let restored_dir = tempfile::tempdir().unwrap();
    let (store, report) =
        RelayStore::restore(&backup, restored_dir.path(), 1_000).expect("restore");
    assert_eq!(report.orders, 1, "the backup holds only the first sale");
    assert_eq!(report.stores, vec![(s1.clone(), 2)]);
    assert!(store.recovery(&s1).unwrap().unwrap().recovering());
    drop(store);
    let relay = EmbeddedRelay::start(restored_dir.path(), port)
        .await
        .unwrap();

    // Till a comes back first and sells again: the sale is kept but waits for its number,
    // because till b (not heard from) may hold numbers the restored relay never saw.
    let waiting = a.create_order(eur()).await.unwrap();
    a.add_line(waiting, line("Juice", 320)).await.unwrap();
    a.take_payment(waiting, cash(320)).await.unwrap();
    for o in [before, open_sale, shared] {
        wait_synced(&a, o, |v| summary(v) == expected[&o]).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.view(waiting).await.unwrap().number, None);
    assert_ne!(a.sync_status(waiting).await, Some(LocalSyncStatus::Synced));
    assert!(
        relay
            .store()
            .unwrap()
            .load_order(waiting)
            .unwrap()
            .is_none()
    );

    // Till b comes back: numbering resumes above every number a till holds.
    let b = open(&devs, "b", &idb).await;
    let n = wait_number(&a, waiting).await;
    assert_eq!(
        n,
        highest + 1,
        "a new number, never one a till already holds"
    );
    wait_synced(&a, waiting, |v| v.number == Some(n)).await;
    let all = [before, closed, open_sale, shared, waiting];
    expected.insert(waiting, summary(&a.view(waiting).await.unwrap()));
    for o in all {
        let on: Vec<&Replicator> = if o == waiting {
            vec![&a, &b]
        } else {
            pick(holds(o), &a, &b)
        };
        for r in on {
            wait_synced(r, o, |v| summary(v) == expected[&o]).await;
            assert_eq!(r.blocked_reason(o).await, None);
        }
        assert_eq!(summary(&at_relay(relay.store().unwrap(), o)), expected[&o]);
    }
    // Every payment once, at the relay as on the tills.
    let paid: i64 = all
        .iter()
        .map(|o| at_relay(relay.store().unwrap(), *o).totals.paid)
        .sum();
    assert_eq!(paid, 700 + 300 + 200 + 380 + 320);
    let store = relay.store().unwrap();
    assert!(!store.recovery(&s1).unwrap().unwrap().recovering());
    let report = store.check().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for (i, o) in all.iter().enumerate() {
        assert_eq!(
            store
                .order_by_number(&s1, OrderNumber(i as u64 + 1))
                .unwrap(),
            Some(*o)
        );
    }
    a.close().await;
    b.close().await;
}
