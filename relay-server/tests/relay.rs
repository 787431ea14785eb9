//! The relay end to end over real sockets: handshake, sync, durable receipts, rejections, store
//! isolation, numbering, fan-out, feed, restart and the HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use automerge::ReadDoc;
use automerge::sync::{self, SyncDoc};
use common::*;
use crdt_model::wire::{ClientFrame, RelayFrame, Version, codes};
use crdt_model::*;
use serde_bytes::ByteBuf;

/// Fetches an order the client does not have yet, through the sync protocol.
async fn fetch(c: &mut Client, id: OrderId) -> Result<Order, RelayFrame> {
    let mut doc = automerge::Automerge::new();
    let mut state = sync::State::new();
    let frame = |m: sync::Message| ClientFrame::Sync {
        order: id.to_string(),
        data: ByteBuf::from(m.encode()),
    };
    if let Some(m) = doc.generate_sync_message(&mut state) {
        c.send(&frame(m)).await;
    }
    let mut kept = Vec::new();
    for _ in 0..100 {
        let got = c.recv().await.expect("relay went quiet");
        match got {
            RelayFrame::Sync { order, data } if order == id.to_string() => {
                doc.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap())
                    .unwrap();
                if let Some(m) = doc.generate_sync_message(&mut state) {
                    c.send(&frame(m)).await;
                }
                if !doc.get_heads().is_empty() && doc.get_missing_deps(&[]).is_empty() {
                    break;
                }
            }
            f @ RelayFrame::Unavailable { .. } => {
                c.backlog.extend(kept);
                return Err(f);
            }
            other => kept.push(other),
        }
    }
    c.backlog.extend(kept);
    c.states.insert(id, state);
    Ok(Order::from_doc(doc, c.writer.clone()).unwrap())
}

#[tokio::test]
async fn upgrade_needs_a_valid_token() {
    let relay = TestRelay::start().await;
    let (device, token) = relay.device("s1", "till");
    assert_eq!(connect_raw(relay.addr, None).await.err(), Some(401));
    assert_eq!(
        connect_raw(relay.addr, Some("dev_nope")).await.err(),
        Some(401)
    );
    relay.store.revoke_device(device).unwrap();
    assert_eq!(connect_raw(relay.addr, Some(&token)).await.err(), Some(401));
    relay.stop().await;
}

#[tokio::test]
async fn unknown_major_version_gets_a_typed_error() {
    let relay = TestRelay::start().await;
    let (device, token) = relay.device("s1", "till");
    // Major 1 (the protocol before pushed changes) and a future major are both refused.
    for major in [1, 3] {
        let mut ws = connect_raw(relay.addr, Some(&token)).await.unwrap();
        send_hello(&mut ws, Version { major, minor: 0 }, device).await;
        match recv_frame(&mut ws).await {
            Some(RelayFrame::Error { code, fatal, .. }) => {
                assert_eq!(code, codes::UNSUPPORTED_VERSION);
                assert!(fatal);
            }
            other => panic!("major {major}: {other:?}"),
        }
        assert!(
            recv_frame(&mut ws).await.is_none(),
            "the relay closes after the error"
        );
    }
    relay.stop().await;
}

/// Sends a `hello` for `device` speaking `protocol`.
async fn send_hello(ws: &mut Ws, protocol: Version, device: DeviceId) {
    let hello = ClientFrame::Hello {
        protocol,
        device: device.to_string(),
        agent: "x".into(),
        feed_since: 0,
        highest_number: None,
    };
    futures_util::SinkExt::send(
        ws,
        tokio_tungstenite::tungstenite::Message::Binary(hello.encode().into()),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn hello_must_name_the_tokens_device() {
    let relay = TestRelay::start().await;
    let (_device, token) = relay.device("s1", "till");
    let (other, _) = relay.device("s1", "other");
    let mut ws = connect_raw(relay.addr, Some(&token)).await.unwrap();
    send_hello(&mut ws, Version::CURRENT, other).await;
    assert!(
        matches!(recv_frame(&mut ws).await, Some(RelayFrame::Error { code, .. }) if code == codes::WRONG_DEVICE)
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_order_is_receipted_numbered_and_the_number_syncs_back() {
    let relay = TestRelay::start().await;
    let (device, token) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, device, &token).await;
    let mut order = c.create("s1");
    let at = c.tick();
    order
        .add_line(
            at,
            &mut c.rng,
            LineDraft {
                name: "Tea".into(),
                unit_price: 300,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    c.sync_until_receipted(&mut order).await;
    // The receipt came after the commit: the store has the order.
    let meta = relay.store.order_meta(order.id()).unwrap().expect("stored");
    assert_eq!(meta.number, OrderNumber(1));
    // The relay's number change reaches the device through sync.
    c.pump_until(&mut order, |o| o.number().unwrap().is_some())
        .await;
    assert_eq!(order.number().unwrap(), Some(OrderNumber(1)));
    relay.stop().await;
}

#[tokio::test]
async fn a_forged_change_is_rejected_and_nothing_is_stored() {
    let relay = TestRelay::start().await;
    let (device, token) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, device, &token).await;
    let mut order = c.create("s1");
    c.sync_until_receipted(&mut order).await;
    let stored = relay.store.order_meta(order.id()).unwrap().unwrap();
    // Raw Automerge: the device tries to write the number itself.
    {
        use automerge::transaction::Transactable;
        let mut tx = order.doc_mut().transaction();
        tx.put(automerge::ROOT, "number", 99u64).unwrap();
        tx.commit();
    }
    let frames = c.sync_until_receipted(&mut order).await;
    let Some(RelayFrame::Rejected { code, changes, .. }) = frames
        .iter()
        .find(|f| matches!(f, RelayFrame::Rejected { .. }))
        .cloned()
    else {
        panic!("no rejection: {frames:?}");
    };
    assert_eq!(code, "number_written_by_device");
    assert_eq!(changes.len(), 1);
    let (_, metrics) = relay.http("GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("relay_changes_rejected_total{reason=\"number_written_by_device\"} 1"),
        "{metrics}"
    );
    let after = relay.store.order_meta(order.id()).unwrap().unwrap();
    assert!(
        after
            .heads
            .iter()
            .all(|h| !changes.iter().any(|c| c.as_slice() == h)),
        "refused change not stored"
    );
    assert!(after.feed_seq >= stored.feed_seq);
    relay.stop().await;
}

#[tokio::test]
async fn stores_are_isolated() {
    let relay = TestRelay::start().await;
    let (a, ta) = relay.device("s1", "a");
    let (b, tb) = relay.device("s2", "b");
    let mut ca = Client::connect(relay.addr, a, &ta).await;
    let mut cb = Client::connect(relay.addr, b, &tb).await;
    let mut order = ca.create("s1");
    ca.sync_until_receipted(&mut order).await;
    // Another store's device cannot fetch it: the answer reveals nothing.
    assert!(matches!(
        fetch(&mut cb, order.id()).await,
        Err(RelayFrame::Unavailable { .. })
    ));
    // Nor create an order in a store that is not its own.
    let mut foreign = cb.create("s1");
    let frames = cb.sync_until_receipted(&mut foreign).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, RelayFrame::Unavailable { .. })),
        "{frames:?}"
    );
    assert!(relay.store.order_meta(foreign.id()).unwrap().is_none());
    relay.stop().await;
}

#[tokio::test]
async fn another_terminal_learns_of_the_order_from_the_feed_and_gets_edits() {
    let relay = TestRelay::start().await;
    let (a, ta) = relay.device("s1", "a");
    let (b, tb) = relay.device("s1", "b");
    let mut ca = Client::connect(relay.addr, a, &ta).await;
    let mut cb = Client::connect(relay.addr, b, &tb).await;
    let mut order = ca.create("s1");
    ca.sync_until_receipted(&mut order).await;
    let feed = cb
        .wait_for(None, |f| matches!(f, RelayFrame::Feed { .. }))
        .await;
    let RelayFrame::Feed { entries } = feed else {
        unreachable!()
    };
    assert_eq!(entries[0].order, order.id().to_string());
    let mut on_b = fetch(&mut cb, order.id()).await.unwrap();
    assert_eq!(on_b.id(), order.id());
    // A edits; B receives the line through the relay.
    let at = ca.tick();
    order
        .add_line(
            at,
            &mut ca.rng,
            LineDraft {
                name: "Cake".into(),
                unit_price: 450,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    ca.sync_until_receipted(&mut order).await;
    cb.pump_until(&mut on_b, |o| o.view().unwrap().lines.len() == 1)
        .await;
    assert_eq!(on_b.view().unwrap().lines[0].name, "Cake");
    relay.stop().await;
}

#[tokio::test]
async fn numbers_are_unique_and_gap_free_under_concurrent_first_syncs() {
    let relay = TestRelay::start().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (d, t) = relay.device("s1", &format!("till-{i}"));
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, d, &t).await;
            let mut ids = Vec::new();
            for _ in 0..3 {
                let mut o = c.create("s1");
                c.sync_until_receipted(&mut o).await;
                ids.push(o.id());
            }
            ids
        }));
    }
    let mut numbers = Vec::new();
    for t in tasks {
        for id in t.await.unwrap() {
            numbers.push(relay.store.order_meta(id).unwrap().unwrap().number.0);
        }
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=24).collect::<Vec<u64>>());
    relay.stop().await;
}

#[tokio::test]
async fn a_lost_answer_and_a_retry_give_one_order_and_one_number() {
    let relay = TestRelay::start().await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut order = c.create("s1");
    let at = c.tick();
    let p = order
        .add_payment(
            at,
            &mut c.rng,
            PaymentDraft {
                kind: PaymentKind::Cash,
                amount: 500,
                reference: String::new(),
            },
            PaymentState::Captured,
        )
        .unwrap();
    // Send, then drop the connection without reading the answer.
    c.push(&order).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Reconnect with fresh sync state and redo the round.
    let mut c = Client::connect(relay.addr, d, &t).await;
    c.sync_until_receipted(&mut order).await;
    c.pump_until(&mut order, |o| o.number().unwrap().is_some())
        .await;
    assert_eq!(order.number().unwrap(), Some(OrderNumber(1)));
    let s1 = StoreId::new("s1").unwrap();
    assert_eq!(
        relay
            .store
            .list_orders(&s1, relay_server::store::StatusFilter::Any, 0, 10)
            .unwrap()
            .len(),
        1,
        "one order, not two"
    );
    let (other_d, other_t) = relay.device("s1", "other");
    let mut other = Client::connect(relay.addr, other_d, &other_t).await;
    let fetched = fetch(&mut other, order.id()).await.unwrap();
    let v = fetched.view().unwrap();
    assert_eq!(v.payments.len(), 1);
    assert_eq!(v.payments[0].id, p);
    assert_eq!(v.totals.paid, 500);
    relay.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let relay = TestRelay::start().await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut order = c.create("s1");
    let at = c.tick();
    order
        .add_line(
            at,
            &mut c.rng,
            LineDraft {
                name: "Soup".into(),
                unit_price: 700,
                quantity: 2,
                ..Default::default()
            },
        )
        .unwrap();
    c.sync_until_receipted(&mut order).await;
    c.pump_until(&mut order, |o| o.number().unwrap().is_some())
        .await;
    drop(c);
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir).await;
    let mut c = Client::connect(relay.addr, d, &t).await;
    let fetched = fetch(&mut c, order.id()).await.unwrap();
    assert_eq!(fetched.view().unwrap(), order.view().unwrap());
    // A new order after the restart continues the numbering.
    let mut next = c.create("s1");
    c.sync_until_receipted(&mut next).await;
    assert_eq!(
        relay.store.order_meta(next.id()).unwrap().unwrap().number,
        OrderNumber(2)
    );
    relay.stop().await;
}

#[tokio::test]
async fn malformed_frames_get_typed_errors_and_others_keep_being_served() {
    let relay = TestRelay::start().await;
    let (d, t) = relay.device("s1", "till");
    let (d2, t2) = relay.device("s1", "other");
    let mut bad = Client::connect(relay.addr, d, &t).await;
    let mut good = Client::connect(relay.addr, d2, &t2).await;
    // Not an Automerge sync message: non-fatal.
    bad.send(&ClientFrame::Sync {
        order: OrderId::generate(Timestamp(T0), &mut SplitMix64::new(1)).to_string(),
        data: ByteBuf::from(vec![1, 2, 3]),
    })
    .await;
    assert!(
        matches!(bad.recv().await, Some(RelayFrame::Error { code, fatal: false, .. }) if code == codes::BAD_SYNC_MESSAGE)
    );
    // A bad order id: non-fatal.
    bad.send(&ClientFrame::Sync {
        order: "nope".into(),
        data: ByteBuf::from(vec![]),
    })
    .await;
    assert!(
        matches!(bad.recv().await, Some(RelayFrame::Error { code, fatal: false, .. }) if code == codes::BAD_ORDER_ID)
    );
    // Garbage bytes: fatal, connection closed.
    bad.send_raw(vec![0xff, 0x00, 0x13]).await;
    assert!(
        matches!(bad.recv().await, Some(RelayFrame::Error { code, fatal: true, .. }) if code == codes::MALFORMED_FRAME)
    );
    assert!(bad.recv().await.is_none());
    // The other device is unaffected.
    let mut o = good.create("s1");
    good.sync_until_receipted(&mut o).await;
    relay.stop().await;
}

#[tokio::test]
async fn http_api_lists_views_audits_and_changes_status() {
    let relay = TestRelay::start().await;
    let admin = relay.admin();
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut order = c.create("s1");
    let at = c.tick();
    order
        .add_line(
            at,
            &mut c.rng,
            LineDraft {
                name: "Pie".into(),
                unit_price: 500,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    c.sync_until_receipted(&mut order).await;
    c.pump_until(&mut order, |o| o.number().unwrap().is_some())
        .await;

    assert_eq!(relay.http("GET", "/healthz", None, None).await.0, 200);
    assert_eq!(
        relay
            .http("GET", "/v1/stores/s1/orders", None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        relay
            .http("GET", "/v1/stores/s1/orders", Some(&t), None)
            .await
            .0,
        403,
        "device tokens are not back office"
    );
    let (status, body) = relay
        .http(
            "GET",
            "/v1/stores/s1/orders?status=active",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["orders"][0]["id"], order.id().to_string());
    assert_eq!(v["orders"][0]["number"], 1);

    let (status, body) = relay
        .http(
            "GET",
            &format!("/v1/orders/{}", order.id()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let view: OrderView = serde_json::from_str(&body).unwrap();
    assert_eq!(view, order.view().unwrap());

    let (status, body) = relay
        .http(
            "GET",
            &format!("/v1/orders/{}/history", order.id()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    let changes = h["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3, "create, add line, relay number");
    assert_eq!(changes[0]["device"], d.to_string());

    // A back-office status change, fanned out to the device.
    let (status, body) = relay
        .http(
            "POST",
            &format!("/v1/orders/{}/status", order.id()),
            Some(&admin),
            Some(r#"{"status":"in_delivery"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    c.pump_until(&mut order, |o| {
        o.status().unwrap() == OrderStatus::InDelivery
    })
    .await;

    // Store admins see only their store; unknown orders are 404.
    let s2_admin = relay
        .store
        .add_admin_token(Some(&StoreId::new("s2").unwrap()), "s2", T0)
        .unwrap();
    assert_eq!(
        relay
            .http(
                "GET",
                &format!("/v1/orders/{}", order.id()),
                Some(&s2_admin),
                None
            )
            .await
            .0,
        404
    );
    assert_eq!(
        relay
            .http("GET", "/v1/stores/s1/orders", Some(&s2_admin), None)
            .await
            .0,
        403
    );

    let (status, metrics) = relay.http("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("relay_changes_accepted_total"),
        "{metrics}"
    );
    assert!(metrics.contains("relay_commit_seconds_count"));
    relay.stop().await;
}

#[tokio::test]
async fn ping_gets_pong() {
    let relay = TestRelay::start().await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    c.send(&ClientFrame::Ping { nonce: 77 }).await;
    let f = c
        .wait_for(None, |f| matches!(f, RelayFrame::Pong { .. }))
        .await;
    assert_eq!(f, RelayFrame::Pong { nonce: 77 });
    relay.stop().await;
}

#[tokio::test]
async fn oversized_frames_close_the_connection_and_change_nothing() {
    let relay =
        TestRelay::start_with(tempfile::tempdir().unwrap(), |c| c.max_frame_bytes = 4096).await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut order = c.create("s1");
    c.sync_until_receipted(&mut order).await;
    // The relay writes the order's number in a commit of its own after the first one: wait
    // for it, or it may land between `before` and the check below.
    c.pump_until(&mut order, |o| o.number().unwrap().is_some())
        .await;
    let before = relay.store.order_meta(order.id()).unwrap().unwrap();
    let huge = ClientFrame::Sync {
        order: order.id().to_string(),
        data: ByteBuf::from(vec![0x42; 64 * 1024]),
    };
    // The relay may close the connection before the whole message is written.
    c.send_may_be_cut(&huge).await;
    // The relay closes the connection (possibly after an error frame).
    let mut closed = false;
    for _ in 0..10 {
        match c.recv().await {
            None => {
                closed = true;
                break;
            }
            Some(RelayFrame::Error { fatal: true, .. }) => {}
            Some(_) => {}
        }
    }
    assert!(closed, "an oversized message must close the connection");
    assert_eq!(relay.store.order_meta(order.id()).unwrap().unwrap(), before);
    // The relay still serves.
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut o2 = c.create("s1");
    c.sync_until_receipted(&mut o2).await;
    relay.stop().await;
}

/// Issue 12, defect 4: a connection over its rate is slowed down, not answered with a refusal
/// and its frame dropped (Automerge would not send a dropped change again). The burst of twice
/// the rate passes at once; the rest is paced, and every frame is answered.
#[tokio::test]
async fn a_flood_of_frames_is_paced_not_dropped() {
    let relay = TestRelay::start_with(tempfile::tempdir().unwrap(), |c| c.rate_per_sec = 10).await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let started = std::time::Instant::now();
    for i in 0..40 {
        c.send(&ClientFrame::Ping { nonce: i }).await;
    }
    let mut nonces = Vec::new();
    while nonces.len() < 40 {
        match c.recv().await {
            Some(RelayFrame::Pong { nonce }) => nonces.push(nonce),
            Some(RelayFrame::Error { code, .. }) => panic!("a paced frame got {code}"),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        nonces,
        (0..40).collect::<Vec<_>>(),
        "every frame answered, in order"
    );
    // 20 frames beyond the burst at 10 per second take about two seconds.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "frames beyond the burst were not paced: {:?}",
        started.elapsed()
    );
    relay.stop().await;
}

#[tokio::test]
async fn memory_holds_a_bounded_number_of_orders() {
    let relay = TestRelay::start_with(tempfile::tempdir().unwrap(), |c| {
        c.hub.workers = 2;
        c.hub.cache_orders = 32;
    })
    .await;
    let admin = relay.admin();
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut ids = Vec::new();
    for _ in 0..120 {
        let mut o = c.create("s1");
        c.sync_until_receipted(&mut o).await;
        ids.push(o.id());
    }
    let (_, metrics) = relay.http("GET", "/metrics", None, None).await;
    let in_memory: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_orders_in_memory "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(in_memory <= 34, "orders in memory: {in_memory}");
    // An evicted order is reloaded on demand, intact.
    let (status, body) = relay
        .http("GET", &format!("/v1/orders/{}", ids[0]), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let mut other = Client::connect(relay.addr, d, &t).await;
    let fetched = fetch(&mut other, ids[0]).await.unwrap();
    assert_eq!(fetched.number().unwrap(), Some(OrderNumber(1)));
    relay.stop().await;
}

#[tokio::test]
async fn a_long_history_is_compacted() {
    let relay = TestRelay::start().await;
    let (d, t) = relay.device("s1", "till");
    let mut c = Client::connect(relay.addr, d, &t).await;
    let mut order = c.create("s1");
    let at = c.tick();
    let line = order
        .add_line(
            at,
            &mut c.rng,
            LineDraft {
                name: "Beer".into(),
                unit_price: 400,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    c.sync_until_receipted(&mut order).await;
    for _ in 0..150 {
        let at = c.tick();
        order.change_quantity(at, line, 1).unwrap();
        c.sync_until_receipted(&mut order).await;
    }
    let stored = relay.store.load_order(order.id()).unwrap().unwrap();
    assert!(
        stored.meta.tail_len < 64,
        "tail of {} changes",
        stored.meta.tail_len
    );
    assert!(!stored.snapshot.is_empty());
    let doc = stored.to_doc().unwrap();
    let view = Order::from_doc(doc, c.writer.clone())
        .unwrap()
        .view()
        .unwrap();
    assert_eq!(view.lines[0].quantity, 151);
    relay.stop().await;
}

/// Issue 12, defect 7: a relay stopped in-process releases its data before `stop` returns, even
/// while connections are in the middle of their feed catch-up (which used to run in a task
/// nothing waited for, holding the store): the same data opens again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_releases_its_data_at_once() {
    let mut dir = tempfile::tempdir().unwrap();
    {
        // Enough orders for a catch-up of several pages.
        let store = relay_server::store::RelayStore::open(dir.path()).unwrap();
        let mut rng = SplitMix64::new(77);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        let writes: Vec<_> = (0..1_200)
            .map(|i| {
                let new = NewOrder {
                    id: OrderId::generate(Timestamp(T0 + i), &mut rng),
                    store: StoreId::new("s1").unwrap(),
                    currency: Currency::new("EUR").unwrap(),
                };
                let o = Order::create(new, Writer::new(device, 1), Timestamp(T0 + i), &mut rng)
                    .unwrap();
                relay_server::store::OrderWrite {
                    order: o.id(),
                    store: o.store().clone(),
                    base: Vec::new(),
                    number: None,
                    changes: Vec::new(),
                    compacted: Some(o.doc().save()),
                    status: OrderStatus::InProgress,
                    heads: o.heads().iter().map(|h| h.0).collect(),
                    at: T0 + i,
                }
            })
            .collect();
        store.commit(&writes).unwrap();
    }
    for round in 0..5 {
        let relay = TestRelay::start_in(dir).await;
        let (d, t) = relay.device("s1", &format!("till-{round}"));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(Client::connect(relay.addr, d, &t).await);
        }
        dir = relay.stop().await;
        drop(clients);
        relay_server::store::RelayStore::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: the data is still held: {e}"));
    }
}

/// An order stored without its number change (the relay stopped between the two writes) gets
/// its number written when the relay starts again, with no device touching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_that_missed_its_document_is_written_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = relay_server::store::RelayStore::open(dir.path()).unwrap();
        let mut rng = SplitMix64::new(78);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        let new = NewOrder {
            id: OrderId::generate(Timestamp(T0), &mut rng),
            store: StoreId::new("s1").unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        let o = Order::create(new, Writer::new(device, 1), Timestamp(T0), &mut rng).unwrap();
        store
            .commit(&[relay_server::store::OrderWrite {
                order: o.id(),
                store: o.store().clone(),
                base: Vec::new(),
                number: None,
                changes: o
                    .doc()
                    .get_changes(&[])
                    .iter()
                    .map(|c| c.raw_bytes().to_vec())
                    .collect(),
                compacted: None,
                status: OrderStatus::InProgress,
                heads: o.heads().iter().map(|h| h.0).collect(),
                at: T0,
            }])
            .unwrap();
        o.id()
    };
    let relay = TestRelay::start_in(dir).await;
    let mut number = None;
    for _ in 0..100 {
        let stored = relay.store.load_order(id).unwrap().unwrap();
        number = number_of(&stored.to_doc().unwrap()).unwrap();
        if number.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(number, Some(OrderNumber(1)));
    assert!(relay.store.unnumbered(10).unwrap().is_empty());
    relay.stop().await;
}

/// Every HTTP answer has the documented JSON error shape: an unknown path, a method a path
/// does not take, and a body that is not JSON.
#[tokio::test]
async fn http_errors_are_json() {
    let relay = TestRelay::start().await;
    let admin = relay.admin();
    let cases = [
        ("GET", "/v1/nope", None, None, 404, "not_found"),
        ("POST", "/healthz", None, None, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/admin/devices",
            Some(admin.as_str()),
            Some("{not json"),
            400,
            "invalid",
        ),
    ];
    for (method, path, token, body, status, code) in cases {
        let (got, text) = relay.http(method, path, token, body).await;
        assert_eq!(got, status, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        assert_eq!(v["error"]["code"], code, "{method} {path}: {text}");
        assert!(v["error"]["message"].is_string(), "{text}");
    }
    relay.stop().await;
}
