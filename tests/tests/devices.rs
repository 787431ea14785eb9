//! Devices (the `replicator` library) and a real relay on a loopback port, in one process:
//! offline edits then reconnect, two terminals on one order, an order created and paid entirely
//! offline, a relay restart mid-sync, crash-safe card payments, and policy refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crdt_model::*;
use relay_server::store::RelayStore;
use relay_server::{RelayConfig, RelayError};
use replicator::core::EngineConfig;
use replicator::*;

const WAIT: Duration = Duration::from_secs(10);

struct Relay {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    store: Arc<RelayStore>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
}

async fn start_relay(dir: tempfile::TempDir, port: u16) -> Relay {
    let store = Arc::new(RelayStore::open(dir.path()).unwrap());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let config = RelayConfig {
        data: dir.path().to_path_buf(),
        ..RelayConfig::default()
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay_server::server::serve_store(
        config,
        Arc::clone(&store),
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    Relay {
        dir,
        addr,
        store,
        stop,
        task,
    }
}

impl Relay {
    async fn halt(self) -> (tempfile::TempDir, u16) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        drop(self.store);
        (self.dir, self.addr.port())
    }

    fn identity(&self, store: &str, name: &str) -> Identity {
        let (rec, token) = self
            .store
            .add_device(&StoreId::new(store).unwrap(), name, 0)
            .unwrap();
        Identity {
            device: rec.device,
            store: rec.store,
            epoch: 1,
            relay_url: format!("ws://{}/v1/sync", self.addr),
            token,
        }
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
    name: &str,
    identity: Identity,
    terminal: Arc<SimTerminal>,
) -> Replicator {
    Replicator::open(
        &dir.path().join(format!("{name}.redb")),
        identity,
        fast(),
        terminal,
    )
    .await
    .unwrap()
}

fn eur() -> Currency {
    Currency::new("EUR").unwrap()
}

fn line(name: &str, price: i64, qty: i64) -> LineDraft {
    LineDraft {
        sku: name.to_lowercase(),
        name: name.into(),
        unit_price: price,
        quantity: qty,
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

async fn wait_number(r: &Replicator, order: OrderId) -> u64 {
    for _ in 0..200 {
        if let Some(n) = r.view(order).await.ok().and_then(|v| v.number) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no number for {order}");
}

async fn wait_view(r: &Replicator, order: OrderId, pred: impl Fn(&OrderView) -> bool) -> OrderView {
    for _ in 0..400 {
        if let Ok(v) = r.view(order).await
            && pred(&v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("order {order} never reached the expected state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_syncs_gets_its_number_and_reaches_another_terminal() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    let a = device(&devs, "a", relay.identity("s1", "a"), Arc::clone(&term)).await;
    let b = device(&devs, "b", relay.identity("s1", "b"), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Espresso", 250, 2)).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    assert_eq!(wait_number(&a, order).await, 1);
    // B learns of it from the store feed and fetches it.
    let on_b = wait_view(&b, order, |v| v.lines.len() == 1).await;
    assert_eq!(on_b.number, Some(1));
    assert_eq!(b.active_orders().await.len(), 1);
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_sync_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    // Reserve a port, then start the relay on it only later: the device starts offline.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RelayStore::open(dir.path()).unwrap();
    let (rec, token) = store
        .add_device(&StoreId::new("s1").unwrap(), "a", 0)
        .unwrap();
    drop(store);
    let identity = Identity {
        device: rec.device,
        store: rec.store,
        epoch: 1,
        relay_url: format!("ws://127.0.0.1:{port}/v1/sync"),
        token,
    };
    let devs = tempfile::tempdir().unwrap();
    let a = device(
        &devs,
        "a",
        identity,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await;
    let order = a.create_order(eur()).await.unwrap();
    let l = a.add_line(order, line("Pizza", 1_200, 1)).await.unwrap();
    a.change_quantity(order, l, 1).await.unwrap();
    a.take_payment(order, cash(1_000)).await.unwrap();
    a.complete_sale(order, Some(FinalPayment::New(cash(1_400))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.sync_status(order).await,
        Some(LocalSyncStatus::Delayed),
        "offline: waiting on the device"
    );
    let relay = start_relay(dir, port).await;
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let meta = relay.store.order_meta(order).unwrap().unwrap();
    assert_eq!(meta.status, OrderStatus::Done);
    let v = a.view(order).await.unwrap();
    assert_eq!(
        (v.totals.total, v.totals.paid, v.totals.change_due),
        (2_400, 2_400, 0)
    );
    relay.halt().await;
}
