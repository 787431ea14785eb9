//! Fault stories from the seed thread, each against a real relay (in process, on a loopback
//! port) and terminals behind fault-injecting proxies. Each asserts converged views, sync
//! statuses, order numbers and money.
//!
//! Stories covered elsewhere: 2, an order paid entirely offline (`devices.rs`,
//! `offline_edits_sync_after_reconnect`); 5, the relay killed with SIGKILL between persisting
//! and answering (`relay_killed.rs`, the relay as a child process, and
//! `relay-server/tests/crash.rs`); 6, a till killed between "charge sent" and "result recorded"
//! (`terminal_process.rs`, the till as a child process, and `devices.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crdt_model::*;
use e2e::harness::{EmbeddedRelay, http};
use e2e::proxy::{Direction, Proxy};
use replicator::core::EngineConfig;
use replicator::*;

const WAIT: Duration = Duration::from_secs(10);

struct Till {
    rep: Replicator,
    proxy: Proxy,
}

async fn till(relay: &EmbeddedRelay, dir: &tempfile::TempDir, store: &str, name: &str) -> Till {
    let (device, token) = relay
        .provision(&StoreId::new(store).unwrap(), name)
        .unwrap();
    let proxy = Proxy::start(relay.addr).await.unwrap();
    let identity = Identity {
        device,
        store: StoreId::new(store).unwrap(),
        epoch: 1,
        relay_url: format!("ws://{}/v1/sync", proxy.addr),
        fallback_urls: Vec::new(),
        token,
    };
    let config = Config {
        engine: EngineConfig {
            backoff_min_ms: 20,
            backoff_max_ms: 200,
            ..EngineConfig::default()
        },
        connect_timeout: Duration::from_secs(2),
    };
    let rep = Replicator::open(
        &dir.path().join(format!("{name}.redb")),
        identity,
        config,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap();
    Till { rep, proxy }
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

async fn until(r: &Replicator, order: OrderId, pred: impl Fn(&OrderView) -> bool) -> OrderView {
    for _ in 0..400 {
        if let Ok(v) = r.view(order).await
            && pred(&v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "order {order} never reached the expected state: {:?}",
        r.view(order).await
    );
}

async fn relay_view(relay: &EmbeddedRelay, order: OrderId) -> OrderView {
    e2e::harness::get_json(relay.addr, &format!("/v1/orders/{order}"), &relay.admin)
        .await
        .unwrap()
}

/// Story 1: "its id is 0 until the first send ... a request may break mid-way (the server
/// already got the data but the answer never reached the device)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_created_offline_gets_exactly_one_number_although_the_answer_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let a = till(&relay, &dir, "s1", "a").await;
    a.proxy.set_blackhole(true);
    let order = a.rep.create_order(eur()).await.unwrap();
    a.rep
        .add_line(order, line("Pizza", 1_100, 1))
        .await
        .unwrap();
    // The next answer from the relay is cut after a few bytes: the relay stores the order
    // (and numbers it), the device never hears back.
    a.proxy.cut_after(Direction::Down, 60);
    a.proxy.set_blackhole(false);
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let v = until(&a.rep, order, |v| v.number.is_some()).await;
    assert_eq!(v.number, Some(1));
    assert!(a.proxy.cuts() >= 1, "the answer was really cut");
    let (_, list) = http(
        relay.addr,
        "GET",
        "/v1/stores/s1/orders",
        &relay.admin,
        None,
    )
    .await
    .unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list["orders"].as_array().unwrap().len(),
        1,
        "one order, not two"
    );
    assert_eq!(
        relay_view(&relay, order).await,
        a.rep.view(order).await.unwrap()
    );
}

/// Story 3: "pay part of it, then come back and add more to it" — on two terminals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_paid_in_two_sittings_with_lines_added_between_on_two_terminals() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let a = till(&relay, &dir, "s1", "a").await;
    let b = till(&relay, &dir, "s1", "b").await;
    let order = a.rep.create_order(eur()).await.unwrap();
    a.rep.add_line(order, line("Menu", 1_500, 2)).await.unwrap();
    a.rep.take_payment(order, cash(1_000)).await.unwrap();
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    // B (offline for a moment) adds dessert for the same table.
    until(&b.rep, order, |v| v.payments.len() == 1).await;
    b.proxy.set_blackhole(true);
    b.rep
        .add_line(order, line("Dessert", 600, 2))
        .await
        .unwrap();
    b.proxy.set_blackhole(false);
    b.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let v = until(&a.rep, order, |v| v.lines.len() == 2).await;
    assert_eq!(v.totals.balance_due, 3_000 + 1_200 - 1_000);
    let ChargeResult::Captured(_) = a.rep.charge_card(order, 3_200).await.unwrap() else {
        panic!()
    };
    a.rep.complete_sale(order, None).await.unwrap();
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let done = until(&b.rep, order, |v| v.status == OrderStatus::Done).await;
    assert_eq!(
        (done.totals.total, done.totals.paid, done.totals.balance_due),
        (4_200, 4_200, 0)
    );
    assert!(done.late_edits.is_empty());
    assert_eq!(relay_view(&relay, order).await, done);
}

/// Story 4: a delete on one terminal concurrent with a card payment on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_concurrent_with_a_card_payment_keeps_the_money_visible() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let a = till(&relay, &dir, "s1", "a").await;
    let b = till(&relay, &dir, "s1", "b").await;
    for complete in [false, true] {
        let order = a.rep.create_order(eur()).await.unwrap();
        a.rep
            .add_line(order, line("Steak", 2_400, 1))
            .await
            .unwrap();
        a.rep
            .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        until(&b.rep, order, |v| v.lines.len() == 1).await;
        // Partition both, act concurrently, heal.
        a.proxy.set_blackhole(true);
        b.proxy.set_blackhole(true);
        a.rep.delete(order).await.unwrap();
        b.rep.charge_card(order, 2_400).await.unwrap();
        if complete {
            b.rep.complete_sale(order, None).await.unwrap();
        }
        a.proxy.set_blackhole(false);
        b.proxy.set_blackhole(false);
        a.rep
            .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        b.rep
            .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
            .await
            .unwrap();
        let va = until(&a.rep, order, |v| {
            v.payments.len() == 1 && v.late_edits.len() == 1
        })
        .await;
        let vb = until(&b.rep, order, |v| {
            v.status == va.status && v.late_edits.len() == 1
        })
        .await;
        assert_eq!(va, vb);
        assert_eq!(va, relay_view(&relay, order).await);
        assert_eq!(va.totals.paid, 2_400, "the captured payment is never lost");
        if complete {
            assert_eq!(
                va.status,
                OrderStatus::Done,
                "Done beats a concurrent Delete"
            );
            assert_eq!(va.late_edits[0].kind, LateEditKind::ConcurrentClose);
        } else {
            assert_eq!(va.status, OrderStatus::Deleted);
            assert_eq!(va.late_edits[0].kind, LateEditKind::Payment);
            assert!(
                va.late_edits[0].message.contains("refund needed"),
                "{}",
                va.late_edits[0].message
            );
            assert_eq!(va.totals.change_due, 2_400, "due back to the customer");
        }
    }
}

/// Story 7: the back office changes a status through the relay's HTTP API while terminals edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_office_status_edit_concurrent_with_terminal_edits_converges() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let a = till(&relay, &dir, "s1", "a").await;
    let order = a.rep.create_order(eur()).await.unwrap();
    a.rep.add_line(order, line("Soup", 700, 1)).await.unwrap();
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    a.proxy.set_blackhole(true);
    a.rep.add_line(order, line("Bread", 200, 1)).await.unwrap();
    a.rep
        .set_status(order, ActiveStatus::Delayed)
        .await
        .unwrap();
    let (status, body) = http(
        relay.addr,
        "POST",
        &format!("/v1/orders/{order}/status"),
        &relay.admin,
        Some(r#"{"status":"in_delivery"}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    a.proxy.set_blackhole(false);
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    let v = until(&a.rep, order, |v| {
        v.lines.len() == 2 && !v.conflicts.is_empty()
    })
    .await;
    assert_eq!(v, relay_view(&relay, order).await);
    // Both statuses were set concurrently at the same clock: one wins by entry id, the tie is
    // flagged the same way everywhere.
    assert!(matches!(
        v.status,
        OrderStatus::Delayed | OrderStatus::InDelivery
    ));
    assert_eq!(v.conflicts[0].subject, "status");
    // A back-office Done then closes it for the terminal too.
    let (status, _) = http(
        relay.addr,
        "POST",
        &format!("/v1/orders/{order}/status"),
        &relay.admin,
        Some(r#"{"status":"done"}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    until(&a.rep, order, |v| v.status == OrderStatus::Done).await;
    assert!(matches!(
        a.rep.add_line(order, line("Late", 1, 1)).await,
        Err(ReplicatorError::Model(ModelError::OrderClosed { .. }))
    ));
}

/// Story 8: a forged change (un-closing a Done order) is refused: the forging terminal sees
/// Blocked with the reason, the relay and the other terminals are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_change_is_refused_and_blocks_only_the_forger() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let a = till(&relay, &dir, "s1", "a").await;
    let b = till(&relay, &dir, "s1", "b").await;
    let order = a.rep.create_order(eur()).await.unwrap();
    a.rep.add_line(order, line("Tea", 300, 1)).await.unwrap();
    a.rep
        .complete_sale(order, Some(FinalPayment::New(cash(300))))
        .await
        .unwrap();
    a.rep
        .wait_for_status(order, LocalSyncStatus::Synced, WAIT)
        .await
        .unwrap();
    // The relay's number change follows the first commit; once the device has it, the relay's
    // state is settled.
    until(&a.rep, order, |v| v.number.is_some()).await;
    let before = relay_view(&relay, order).await;
    // Raw Automerge: delete every status entry so the order reads as open again.
    a.rep
        .edit_raw(order, |o| {
            use automerge::transaction::Transactable;
            use automerge::{ROOT, ReadDoc};
            let doc = o.doc_mut();
            let status = doc.get(ROOT, "status").unwrap().unwrap().1;
            let keys: Vec<String> = doc.keys(&status).collect();
            let mut tx = doc.transaction();
            for k in keys {
                tx.delete(&status, k.as_str()).unwrap();
            }
            tx.commit();
            Ok(())
        })
        .await
        .unwrap();
    a.rep
        .wait_for_status(order, LocalSyncStatus::Blocked, WAIT)
        .await
        .unwrap();
    let reason = a.rep.blocked_reason(order).await.unwrap();
    assert_eq!(reason.code, "status_rewritten", "{reason:?}");
    assert_eq!(reason.changes.len(), 1);
    assert_eq!(
        relay_view(&relay, order).await,
        before,
        "the relay's state is unaffected"
    );
    // Closed orders are not pushed to other terminals by the feed; B fetches it on demand.
    b.rep.fetch(order).await.unwrap();
    let on_b = until(&b.rep, order, |v| v.status == OrderStatus::Done).await;
    assert_eq!(on_b, before, "other terminals are unaffected");
    let (_, metrics) = http(relay.addr, "GET", "/metrics", "", None).await.unwrap();
    assert!(
        metrics.contains("relay_changes_rejected_total{reason=\"status_rewritten\"} 1"),
        "{metrics}"
    );
}
