//! Several relays on one PostgreSQL database (issue 15), in one process: devices of one store
//! spread over two relays edit the same orders and see each other's changes; a relay that
//! holds an order in memory learns of the other's commits (LISTEN/NOTIFY, or the sweep) and
//! forwards them; numbers stay unique and gap-free with both relays numbering at once; every
//! device ends with what the database holds.
//!
//! Runs when `RELAY_TEST_POSTGRES` names a database (CI sets it), in a schema of its own that
//! it drops; without it, each test prints one line saying how to enable it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crdt_model::*;
use e2e::pgdb::{TestSchema, database};
use relay_server::RelayConfig;
use relay_server::pg::PgStore;
use replicator::core::EngineConfig;
use replicator::*;

const WAIT: Duration = Duration::from_secs(15);

/// A relay serving `store` on a port of its own.
struct Relay {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), relay_server::RelayError>>,
}

async fn start_relay(store: Arc<PgStore>) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay_server::server::serve_store(
        RelayConfig::default(),
        store,
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    Relay {
        addr,
        stop: Some(stop),
        task,
    }
}

impl Relay {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }
}

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

async fn device(
    dir: &tempfile::TempDir,
    pg: &PgStore,
    store: &str,
    name: &str,
    relay: &Relay,
    fallback: &Relay,
) -> Replicator {
    let (rec, token) = pg
        .add_device(&StoreId::new(store).unwrap(), name, 0)
        .await
        .unwrap();
    let identity = Identity {
        device: rec.device,
        store: rec.store,
        epoch: 1,
        relay_url: relay.url(),
        fallback_urls: vec![fallback.url()],
        token,
    };
    Replicator::open(
        &dir.path().join(format!("{name}.redb")),
        identity,
        fast(),
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap()
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

async fn wait_view(r: &Replicator, order: OrderId, pred: impl Fn(&OrderView) -> bool) -> OrderView {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(v) = r.view(order).await
            && pred(&v)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "order {order} never reached the expected state"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The view of `order` as the database holds it.
async fn stored_view(pg: &PgStore, order: OrderId) -> OrderView {
    let stored = pg.load_order(order).await.unwrap().expect("stored");
    let doc = guard::load_with_increments(&stored.snapshot, stored.tail.iter().map(Vec::as_slice))
        .unwrap();
    view_of(&doc).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_relays_share_orders_through_the_database() {
    let Some(url) = database("devices_on_two_relays_share_orders_through_the_database") else {
        return;
    };
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let schema = TestSchema::new(&url, "relay_multi");
    // Two relay "processes": each its own store handle (own pool, own actor epoch).
    let pg1 = schema.connect(4).await.unwrap();
    let pg2 = schema.connect(4).await.unwrap();
    assert_ne!(pg1.identity().epoch, pg2.identity().epoch);
    let r1 = start_relay(Arc::clone(&pg1)).await;
    let r2 = start_relay(Arc::clone(&pg2)).await;
    let devs = tempfile::tempdir().unwrap();
    let a = device(&devs, &pg1, "s1", "a", &r1, &r2).await;
    let b = device(&devs, &pg1, "s1", "b", &r2, &r1).await;

    // A creates an order on relay 1: B, on relay 2, learns of it from its feed.
    let started = Instant::now();
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Burger", 900)).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let seen = wait_view(&b, order, |v| v.lines.len() == 1 && v.number.is_some()).await;
    println!(
        "an order made on relay 1 reached a device of relay 2 in {:?}",
        started.elapsed()
    );
    assert_eq!(seen.number, Some(1));

    // Both relays now hold the order in memory. Edits on both sides, at once.
    let (ea, eb) = tokio::join!(
        async {
            a.take_payment(
                order,
                PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: 500,
                    reference: String::new(),
                },
            )
            .await
            .unwrap();
            a.add_line(order, line("Cola", 250)).await.unwrap();
        },
        async {
            b.add_line(order, line("Fries", 300)).await.unwrap();
        }
    );
    let _ = (ea, eb);
    let both = |v: &OrderView| v.lines.len() == 3 && v.payments.len() == 1;
    let va = wait_view(&a, order, both).await;
    let vb = wait_view(&b, order, both).await;
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    b.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    assert_eq!(va, vb);
    assert_eq!(va.totals.total, 900 + 250 + 300);
    assert_eq!(va.totals.paid, 500);
    assert_eq!(
        stored_view(&pg1, order).await,
        va,
        "the database holds what the devices show"
    );

    // B (relay 2) changes the order again: A, following it on relay 1, gets the change
    // although relay 1 did not write it.
    let started = Instant::now();
    b.add_line(order, line("Salad", 700)).await.unwrap();
    wait_view(&a, order, |v| v.lines.len() == 4).await;
    println!(
        "a change made through relay 2 reached a device following the order on relay 1 in {:?}",
        started.elapsed()
    );

    // Both relays number new orders of the store at once: unique and gap-free.
    let per_device = 15;
    let (made_a, made_b) = tokio::join!(
        async {
            let mut ids = Vec::new();
            for _ in 0..per_device {
                ids.push(a.create_order(eur()).await.unwrap());
            }
            ids
        },
        async {
            let mut ids = Vec::new();
            for _ in 0..per_device {
                ids.push(b.create_order(eur()).await.unwrap());
            }
            ids
        }
    );
    let mut numbers = BTreeSet::new();
    for (name, dev, ids) in [("a", &a, &made_a), ("b", &b, &made_b)] {
        for id in ids {
            if let Err(e) = dev
                .wait_for_status(*id, LocalSyncStatus::Synced, WAIT)
                .await
            {
                panic!("device {name}: {e}");
            }
            let n = wait_view(dev, *id, |v| v.number.is_some()).await.number;
            assert!(numbers.insert(n.unwrap()), "number {n:?} given twice");
        }
    }
    let expected: BTreeSet<u64> = (2..=(1 + 2 * per_device as u64)).collect();
    assert_eq!(
        numbers, expected,
        "numbers unique and gap-free across both relays"
    );

    // Every device ends with every order of the store, as the database holds it.
    for id in made_a.iter().chain(&made_b).chain(std::iter::once(&order)) {
        let want = stored_view(&pg1, *id).await;
        for dev in [&a, &b] {
            let got = wait_view(dev, *id, |v| *v == want).await;
            assert_eq!(got, want);
        }
    }

    // Relay 1 goes away: A moves to relay 2 (its second relay) and goes on selling; B sees it.
    r1.stop().await;
    let started = Instant::now();
    let late = a.create_order(eur()).await.unwrap();
    a.add_line(late, line("Tea", 200)).await.unwrap();
    a.wait_for_status(late, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let seen = wait_view(&b, late, |v| v.lines.len() == 1).await;
    println!(
        "with relay 1 gone, an order made on A was durable and reached B in {:?}",
        started.elapsed()
    );
    assert_eq!(seen.number, Some(2 + 2 * per_device as u64));
    assert_eq!(stored_view(&pg2, late).await, seen);

    a.close().await;
    b.close().await;
    r2.stop().await;
    schema.drop_schema(&pg1).await.unwrap();
}
