//! Story 5 with real processes: the relay (a child process) is SIGKILLed again and again while
//! a till (the `replicator` library) keeps selling — including between persisting a change and
//! answering. After the last restart nothing the till did is lost, and nothing is doubled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use crdt_model::*;
use relay_server::store::RelayStore;
use replicator::core::EngineConfig;
use replicator::*;

const BIN: &str = env!("CARGO_BIN_EXE_relay-proc");

fn spawn_relay(data: &std::path::Path, port: u16) -> Child {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
            data.to_str().unwrap(),
        ])
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("relay did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_sync_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let (device, token) = {
        let store = RelayStore::open(&data).unwrap();
        let (rec, token) = store
            .add_device(&StoreId::new("s1").unwrap(), "till", 0)
            .unwrap();
        (rec.device, token)
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut relay = spawn_relay(&data, port);
    let identity = Identity {
        device,
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        relay_url: format!("ws://127.0.0.1:{port}/v1/sync"),
        fallback_urls: Vec::new(),
        token,
    };
    let config = Config {
        engine: EngineConfig {
            backoff_min_ms: 20,
            backoff_max_ms: 150,
            ..EngineConfig::default()
        },
        connect_timeout: Duration::from_secs(1),
    };
    let till = Replicator::open(
        &dir.path().join("till.redb"),
        identity,
        config,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap();
    let eur = Currency::new("EUR").unwrap();
    let mut rng = SplitMix64::new(5);
    let mut orders = Vec::new();
    let mut lines_made = 0usize;
    let mut kills = 0;
    for round in 0..6 {
        let order = till.create_order(eur).await.unwrap();
        orders.push(order);
        for i in 0..8 {
            till.add_line(
                order,
                LineDraft {
                    name: format!("item {round}-{i}"),
                    unit_price: 100 + i,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            lines_made += 1;
            // Kill the relay at an arbitrary point of the stream of changes.
            if (round * 8 + i) % 5 == 2 {
                kills += 1;
                relay.kill().unwrap(); // SIGKILL
                relay.wait().unwrap();
                tokio::time::sleep(Duration::from_millis(rng.next_u64() % 50)).await;
                relay = spawn_relay(&data, port);
            }
        }
        let due = till.view(order).await.unwrap().totals.balance_due;
        till.complete_sale(
            order,
            Some(FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: due,
                reference: String::new(),
            })),
        )
        .await
        .unwrap();
    }
    for order in &orders {
        till.wait_for_status(*order, LocalSyncStatus::Synced, Duration::from_secs(20))
            .await
            .unwrap();
    }
    // Let the numbers arrive, then stop the relay for good and read its data directory.
    for order in &orders {
        for _ in 0..200 {
            if till.view(*order).await.unwrap().number.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    till.close().await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    let store = RelayStore::open(&data).unwrap();
    assert!(
        store.check().unwrap().is_ok(),
        "{:?}",
        store.check().unwrap()
    );
    let mut numbers = Vec::new();
    let mut lines_on_relay = 0;
    for order in &orders {
        let stored = store
            .load_order(*order)
            .unwrap()
            .expect("every order reached the relay");
        let view = view_of(&stored.to_doc().unwrap()).unwrap();
        assert_eq!(
            view,
            till.view(*order).await.unwrap(),
            "relay and till agree on {order}"
        );
        assert_eq!(view.status, OrderStatus::Done);
        assert_eq!(view.payments.len(), 1, "the payment is stored once");
        lines_on_relay += view.lines.len();
        numbers.push(view.number.unwrap());
    }
    assert_eq!(lines_on_relay, lines_made, "no line lost or doubled");
    assert!(kills >= 3, "the relay was killed {kills} times");
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=orders.len() as u64).collect::<Vec<_>>(),
        "one number per order, no gaps"
    );
}
