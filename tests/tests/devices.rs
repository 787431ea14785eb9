//! Devices (the `replicator` library) and a real relay on a loopback port, in one process:
//! offline edits then reconnect, two terminals on one order, an order created and paid entirely
//! offline, a relay restart mid-sync, crash-safe card payments, policy refusals, and a payment
//! retried after the device's store failed to write it (recorded once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crdt_model::*;
use e2e::harness::EmbeddedRelay;
use relay_server::store::RelayStore;
use replicator::core::EngineConfig;
use replicator::store::redb_store::RedbStore;
use replicator::*;

const WAIT: Duration = Duration::from_secs(10);

/// The shared embedded relay (`e2e::harness`), with its temp data directory and a handle on
/// its store for assertions.
struct Relay {
    inner: EmbeddedRelay,
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    store: Arc<RelayStore>,
}

async fn start_relay(dir: tempfile::TempDir, port: u16) -> Relay {
    let inner = EmbeddedRelay::start(dir.path(), port).await.unwrap();
    let store = Arc::clone(inner.store().unwrap());
    Relay {
        addr: inner.addr,
        inner,
        dir,
        store,
    }
}

impl Relay {
    /// Stops the relay and releases its data directory (returned, with the port, for a restart).
    async fn halt(self) -> (tempfile::TempDir, u16) {
        let Relay {
            mut inner,
            dir,
            store,
            addr,
        } = self;
        drop(store);
        inner.stop().await.unwrap();
        (dir, addr.port())
    }

    fn identity(&self, store: &str, name: &str) -> Identity {
        let (device, token) = self
            .inner
            .provision(&StoreId::new(store).unwrap(), name)
            .unwrap();
        Identity {
            device,
            store: StoreId::new(store).unwrap(),
            epoch: 1,
            relay_url: format!("ws://{}/v1/sync", self.addr),
            fallback_urls: Vec::new(),
            token,
        }
    }
}

/// Provisions till "a" of store s1 in the relay data at `data` (no relay running) and its
/// identity for a relay that will listen on `port`.
fn provisioned(data: &std::path::Path, port: u16) -> Identity {
    let store = RelayStore::open(data).unwrap();
    let (rec, token) = store
        .add_device(&StoreId::new("s1").unwrap(), "a", 0)
        .unwrap();
    Identity {
        device: rec.device,
        store: rec.store,
        epoch: 1,
        relay_url: format!("ws://127.0.0.1:{port}/v1/sync"),
        fallback_urls: Vec::new(),
        token,
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
    let identity = provisioned(dir.path(), port);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_terminals_edit_one_order_and_converge() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    let a = device(&devs, "a", relay.identity("s1", "a"), Arc::clone(&term)).await;
    let b = device(&devs, "b", relay.identity("s1", "b"), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    let burger = a.add_line(order, line("Burger", 900, 1)).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    wait_view(&b, order, |v| v.lines.len() == 1).await;
    // Both edit at once: A takes a partial payment and bumps the burger, B adds fries and a
    // second burger too.
    let (ra, rb) = tokio::join!(
        async {
            a.take_payment(order, cash(500)).await.unwrap();
            a.change_quantity(order, burger, 1).await.unwrap();
        },
        async {
            b.add_line(order, line("Fries", 300, 1)).await.unwrap();
            b.change_quantity(order, burger, 1).await.unwrap();
        }
    );
    let _ = (ra, rb);
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    b.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let va = wait_view(&a, order, |v| {
        v.lines.len() == 2 && v.lines.iter().any(|l| l.quantity == 3)
    })
    .await;
    let vb = wait_view(&b, order, |v| {
        v.payments.len() == 1 && v.lines.iter().any(|l| l.quantity == 3)
    })
    .await;
    assert_eq!(va, vb);
    assert_eq!(va.totals.total, 3 * 900 + 300);
    assert_eq!(va.totals.paid, 500);
    assert_eq!(va.totals.balance_due, 2_500);
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_mid_sync_loses_nothing() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let a = device(
        &devs,
        "a",
        relay.identity("s1", "a"),
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Tea", 300, 1)).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let (dir, port) = relay.halt().await;
    // Edits while the relay is down.
    for i in 0..5 {
        a.add_line(order, line(&format!("Cookie {i}"), 150, 1))
            .await
            .unwrap();
    }
    a.wait_for_status(order, LocalSyncStatus::Delayed, WAIT)
        .await
        .unwrap();
    let relay = start_relay(dir, port).await;
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let stored = relay
        .store
        .load_order(order)
        .unwrap()
        .unwrap()
        .to_doc()
        .unwrap();
    let on_relay = Order::from_doc(stored, Writer::new(DeviceId(Default::default()), 0))
        .unwrap()
        .view()
        .unwrap();
    assert_eq!(on_relay.lines.len(), 6);
    assert_eq!(on_relay, wait_view(&a, order, |v| *v == on_relay).await);
    assert_eq!(on_relay.number, Some(1), "one number, assigned once");
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_payments_are_charged_declined_and_synced() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    let a = device(&devs, "a", relay.identity("s1", "a"), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Steak", 2_500, 1)).await.unwrap();
    term.set_mode(SimMode::Decline);
    let declined = a.charge_card(order, 2_500).await.unwrap();
    assert!(matches!(declined, ChargeResult::Declined { .. }));
    term.set_mode(SimMode::Approve);
    let ChargeResult::Captured(p) = a.charge_card(order, 2_500).await.unwrap() else {
        panic!()
    };
    let v = a.view(order).await.unwrap();
    let captured = v.payments.iter().find(|x| x.id == p).unwrap();
    assert_eq!(captured.state, PaymentState::Captured);
    assert!(
        captured.reference.contains("4242") && captured.reference.contains("AUTH"),
        "{}",
        captured.reference
    );
    assert_eq!(
        v.payments
            .iter()
            .filter(|x| x.state == PaymentState::Voided)
            .count(),
        1
    );
    assert_eq!(v.totals.balance_due, 0);
    a.complete_sale(order, None).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    assert_eq!(term.charged(), 1);
    assert!(a.pending_charges().await.is_empty());
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_charge_and_record_is_reconciled_without_a_second_charge() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let term = Arc::new(SimTerminal::new(SimMode::ApproveThenHang));
    let identity = relay.identity("s1", "a");
    let a = device(&devs, "a", identity.clone(), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Wine", 4_000, 1)).await.unwrap();
    let charging = tokio::spawn({
        let a = a.clone();
        async move { a.charge_card(order, 4_000).await }
    });
    // The terminal took the money; the app dies before recording the outcome.
    for _ in 0..200 {
        if term.charged() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(term.charged(), 1);
    assert_eq!(a.sync_status(order).await, Some(LocalSyncStatus::Charging));
    charging.abort();
    a.close().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Restart on the same local store.
    term.set_mode(SimMode::Approve);
    let a = device(&devs, "a", identity, Arc::clone(&term)).await;
    let pending = a.pending_charges().await;
    assert_eq!(pending.len(), 1, "the pending payment is surfaced");
    let v = a.view(order).await.unwrap();
    assert_eq!(v.payments[0].state, PaymentState::Pending);
    let done = a.reconcile().await.unwrap();
    assert_eq!(done, vec![Reconciled::Captured(order, pending[0].1)]);
    assert_eq!(term.charged(), 1, "never charged twice");
    assert_eq!(
        term.calls(),
        1,
        "reconciliation looks up, it does not charge"
    );
    let v = a.view(order).await.unwrap();
    assert_eq!(v.payments[0].state, PaymentState::Captured);
    a.complete_sale(order, None).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_the_relay_refuses_is_blocked_with_its_reason() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    // A misconfigured till: its token is for store s2 but it creates orders for s1.
    let mut identity = relay.identity("s2", "a");
    identity.store = StoreId::new("s1").unwrap();
    let a = device(
        &devs,
        "a",
        identity,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await;
    let order = a.create_order(eur()).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Blocked, WAIT)
        .await
        .unwrap();
    let reason = a.blocked_reason(order).await.unwrap();
    assert_eq!(reason.code, "unavailable");
    // Still readable, and not retried blindly.
    assert!(a.view(order).await.is_ok());
    a.add_line(order, line("Soup", 500, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.sync_status(order).await, Some(LocalSyncStatus::Blocked));
    assert!(relay.store.order_meta(order).unwrap().is_none());
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_till_shows_its_unsent_orders_blocked_revoked() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    let identity = relay.identity("s1", "a");
    let id = identity.device;
    let a = device(&devs, "a", identity, Arc::clone(&term)).await;
    let b = device(&devs, "b", relay.identity("s1", "b"), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Espresso", 250, 1)).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    // The operator revokes the till while the relay runs: its connection is closed at once.
    let (status, body) = e2e::harness::http(
        relay.addr,
        "POST",
        &format!("/v1/admin/devices/{id}/revoke"),
        &relay.inner.admin,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // An edit made after that cannot reach the relay: the order shows Blocked `revoked`, not
    // merely Delayed (offline).
    a.add_line(order, line("Water", 100, 1)).await.unwrap();
    let second = a.create_order(eur()).await.unwrap();
    for o in [order, second] {
        a.wait_for_status(o, LocalSyncStatus::Blocked, WAIT)
            .await
            .unwrap();
        assert_eq!(a.blocked_reason(o).await.unwrap().code, "revoked");
        assert!(a.view(o).await.is_ok());
    }
    assert!(relay.store.order_meta(second).unwrap().is_none());
    // Another till of the store goes on syncing.
    let other = b.create_order(eur()).await.unwrap();
    b.wait_for_status(other, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_till_with_an_unknown_token_shows_blocked_unauthorized() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let mut identity = relay.identity("s1", "a");
    identity.token = format!("dev_{}", "0".repeat(64));
    let a = device(
        &devs,
        "a",
        identity,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await;
    let order = a.create_order(eur()).await.unwrap();
    a.wait_for_status(order, LocalSyncStatus::Blocked, WAIT)
        .await
        .unwrap();
    assert_eq!(a.blocked_reason(order).await.unwrap().code, "unauthorized");
    relay.halt().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_orders_are_evicted_after_retention_and_fetched_on_demand() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let mut config = fast();
    config.engine.retention_ms = 300;
    let a = Replicator::open(
        &devs.path().join("a.redb"),
        relay.identity("s1", "a"),
        config,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap();
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Cake", 400, 1)).await.unwrap();
    a.complete_sale(order, Some(FinalPayment::New(cash(400))))
        .await
        .unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    a.wait_for_status(order, LocalSyncStatus::Removed, WAIT)
        .await
        .unwrap();
    assert!(a.view(order).await.is_err());
    assert!(a.order_ids().await.is_empty());
    a.fetch(order).await.unwrap();
    let v = wait_view(&a, order, |v| v.status == OrderStatus::Done).await;
    assert_eq!(v.totals.paid, 400);
    relay.halt().await;
}

/// The app is "killed" (handle closed and dropped, store reopened) at each step of a card
/// payment; each time the payment ends up recorded exactly once and money is taken at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_step_of_a_card_payment_never_charges_twice() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let identity = relay.identity("s1", "a");
    // Step 1 done, step 2 never happened: pending recorded, the terminal took nothing.
    // Step 2 done, answer lost: the terminal took the money but said "timeout".
    for (mode, expect_captured) in [
        (SimMode::Timeout, false),
        (SimMode::ApproveThenTimeout, true),
    ] {
        let term = Arc::new(SimTerminal::new(mode.clone()));
        let a = device(&devs, "a", identity.clone(), Arc::clone(&term)).await;
        let order = a.create_order(eur()).await.unwrap();
        a.add_line(order, line("Menu", 1_500, 1)).await.unwrap();
        assert!(matches!(
            a.charge_card(order, 1_500).await,
            Err(ReplicatorError::Terminal(_))
        ));
        assert_eq!(a.sync_status(order).await, Some(LocalSyncStatus::Charging));
        a.close().await;
        drop(a);
        let a = device(&devs, "a", identity.clone(), Arc::clone(&term)).await;
        let pending = a.pending_charges().await;
        assert_eq!(
            pending.len(),
            1,
            "{mode:?}: the payment is surfaced after restart"
        );
        let done = a.reconcile().await.unwrap();
        let v = a.view(order).await.unwrap();
        if expect_captured {
            assert_eq!(done, vec![Reconciled::Captured(order, pending[0].1)]);
            assert_eq!(v.totals.paid, 1_500);
            assert_eq!(term.charged(), 1);
        } else {
            assert_eq!(done, vec![Reconciled::Voided(order, pending[0].1)]);
            assert_eq!(v.payments[0].state, PaymentState::Voided);
            assert_eq!(term.charged(), 0);
        }
        assert_eq!(
            term.calls(),
            1,
            "{mode:?}: reconciliation never charges again"
        );
        assert!(a.pending_charges().await.is_empty());
        a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        a.close().await;
    }
    // Step 3 done, step 4 not: captured locally while the relay is down, app restarted, then
    // the relay comes back.
    let (dir, port) = relay.halt().await;
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    let a = device(&devs, "a", identity.clone(), Arc::clone(&term)).await;
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Menu", 900, 1)).await.unwrap();
    assert!(matches!(
        a.charge_card(order, 900).await.unwrap(),
        ChargeResult::Captured(_)
    ));
    a.close().await;
    drop(a);
    let a = device(&devs, "a", identity, Arc::clone(&term)).await;
    assert!(
        a.pending_charges().await.is_empty(),
        "the outcome was recorded before the crash"
    );
    let relay = start_relay(dir, port).await;
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let stored = relay
        .store
        .load_order(order)
        .unwrap()
        .unwrap()
        .to_doc()
        .unwrap();
    let v = Order::from_doc(stored, Writer::new(DeviceId(Default::default()), 0))
        .unwrap()
        .view()
        .unwrap();
    assert_eq!(v.totals.paid, 900);
    assert_eq!(v.payments.len(), 1);
    assert_eq!(term.charged(), 1);
    relay.halt().await;
}

/// A device store (redb) whose writes fail while `failing` is set: refused outright, or written
/// and then reported as failed (an fsync error after the data reached the disk).
struct FlakyStore {
    inner: RedbStore,
    failing: std::sync::Mutex<Option<bool>>,
}

impl FlakyStore {
    /// `Some(landed)`: writes fail, after being written if `landed`. `None`: they work.
    fn fail(&self, mode: Option<bool>) {
        *self.failing.lock().unwrap() = mode;
    }

    fn write(
        &self,
        op: impl FnOnce(&dyn Store) -> Result<(), ReplicatorError>,
    ) -> Result<(), ReplicatorError> {
        let mode = *self.failing.lock().unwrap();
        match mode {
            None => op(&self.inner),
            Some(false) => Err(ReplicatorError::Storage("injected: no space left".into())),
            Some(true) => {
                op(&self.inner)?;
                Err(ReplicatorError::Storage("injected: fsync failed".into()))
            }
        }
    }
}

impl Store for FlakyStore {
    fn identity(&self) -> Result<Option<Identity>, ReplicatorError> {
        self.inner.identity()
    }
    fn set_identity(&self, identity: &Identity) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_identity(identity))
    }
    fn load_orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError> {
        self.inner.load_orders()
    }
    fn append(
        &self,
        order: OrderId,
        changes: &[Vec<u8>],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|s| s.append(order, changes, record))
    }
    fn put_record(&self, order: OrderId, record: &OrderRecord) -> Result<(), ReplicatorError> {
        self.write(|s| s.put_record(order, record))
    }
    fn compact(
        &self,
        order: OrderId,
        snapshot: &[u8],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|s| s.compact(order, snapshot, record))
    }
    fn remove(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.write(|s| s.remove(order))
    }
    fn feed_seq(&self) -> Result<u64, ReplicatorError> {
        self.inner.feed_seq()
    }
    fn set_feed_seq(&self, seq: u64) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_feed_seq(seq))
    }

    fn relay_data(&self) -> Result<Option<String>, ReplicatorError> {
        self.inner.relay_data()
    }

    fn set_relay_data(&self, data: &str) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_relay_data(data))
    }
}

/// The order as the relay has committed it.
fn at_relay(relay: &Relay, order: OrderId) -> OrderView {
    let stored = relay
        .store
        .load_order(order)
        .unwrap()
        .unwrap()
        .to_doc()
        .unwrap();
    Order::from_doc(stored, Writer::new(DeviceId(Default::default()), 0))
        .unwrap()
        .view()
        .unwrap()
}

/// A till's UI retries `take_payment` after an error: the failed attempt did nothing (not on the
/// till, not at the relay), and the retry records the cash once — on the till, after a restart
/// from its redb file, and at the relay. Both for a write that is refused and for one that
/// lands on disk but reports failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cash_payment_retried_after_a_local_store_failure_is_recorded_once_everywhere() {
    let relay = start_relay(tempfile::tempdir().unwrap(), 0).await;
    let devs = tempfile::tempdir().unwrap();
    let identity = relay.identity("s1", "a");
    let path = devs.path().join("a.redb");
    let term = Arc::new(SimTerminal::new(SimMode::Approve));
    for landed in [false, true] {
        let store = Arc::new(FlakyStore {
            inner: RedbStore::open(&path).unwrap(),
            failing: std::sync::Mutex::new(None),
        });
        let a = Replicator::with_store(
            store.clone(),
            identity.clone(),
            fast(),
            Arc::clone(&term) as Arc<dyn PaymentTerminal>,
        )
        .await
        .unwrap();
        let order = a.create_order(eur()).await.unwrap();
        a.add_line(order, line("Menu", 1_500, 1)).await.unwrap();
        // Settled: the relay's number (a change from the relay) is in, nothing is on its way.
        wait_number(&a, order).await;
        a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        let before = a.view(order).await.unwrap();

        store.fail(Some(landed));
        let failed = a.take_payment(order, cash(1_500)).await;
        assert!(
            matches!(failed, Err(ReplicatorError::Storage(_))),
            "{failed:?}"
        );
        assert_eq!(a.view(order).await.unwrap(), before);
        assert_eq!(a.sync_status(order).await, Some(LocalSyncStatus::Synced));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(at_relay(&relay, order).payments.is_empty(), "never sent");

        store.fail(None);
        a.take_payment(order, cash(1_500)).await.unwrap();
        a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        let on_till = a.view(order).await.unwrap();
        assert_eq!(on_till.payments.len(), 1);
        assert_eq!(on_till.totals.paid, 1_500);
        let on_relay = at_relay(&relay, order);
        assert_eq!(on_relay.payments.len(), 1, "landed: {landed}");
        assert_eq!(on_relay.payments[0].id, on_till.payments[0].id);
        assert_eq!(on_relay.totals.paid, 1_500);

        a.close().await;
        drop(a);
        drop(store);
        let a = device(&devs, "a", identity.clone(), Arc::clone(&term)).await;
        let restarted = a.view(order).await.unwrap();
        assert_eq!(restarted.payments, on_till.payments);
        assert_eq!(restarted.totals, on_till.totals);
        a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        assert_eq!(at_relay(&relay, order).payments.len(), 1);
        a.close().await;
    }
    relay.halt().await;
}

/// The relay moved to a new address while a till held unsynced sales: the till's local store
/// opens with the new address (and would with a rotated token), keeps its sales and syncs
/// them; opening it as another store is refused with a clear error and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_till_keeps_its_unsynced_sales_when_the_relay_moves() {
    let dir = tempfile::tempdir().unwrap();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let old_port = free_port();
    let identity = provisioned(dir.path(), old_port);
    let devs = tempfile::tempdir().unwrap();
    let path = devs.path().join("a.redb");
    let terminal = Arc::new(SimTerminal::new(SimMode::Approve));
    let a = Replicator::open(&path, identity.clone(), fast(), terminal.clone())
        .await
        .unwrap();
    let order = a.create_order(eur()).await.unwrap();
    a.add_line(order, line("Soup", 700, 1)).await.unwrap();
    a.close().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Another store: refused, clearly.
    let mut elsewhere = identity.clone();
    elsewhere.store = StoreId::new("s2").unwrap();
    let err = Replicator::open(&path, elsewhere, fast(), terminal.clone())
        .await
        .err()
        .expect("another store is refused");
    assert!(err.to_string().contains("belongs to device"), "{err}");

    // The relay comes up at a new address; the till is reopened with it.
    let relay = start_relay(dir, free_port()).await;
    let mut moved = identity.clone();
    moved.relay_url = format!("ws://{}/v1/sync", relay.addr);
    let a = Replicator::open(&path, moved, fast(), terminal)
        .await
        .unwrap();
    a.wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    assert_eq!(at_relay(&relay, order).lines.len(), 1);
    a.close().await;
    relay.halt().await;
}
