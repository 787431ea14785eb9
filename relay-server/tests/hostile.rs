//! One hostile device cannot take the relay down: each attack runs while a witness device of
//! another store keeps editing, and the witness's receipts must keep flowing (no gap over 2 s),
//! the attacker must get an error frame, and the stored data must stay consistent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use automerge::ReadDoc;
use automerge::sync::{self, SyncDoc};
use common::hostile::*;
use common::terminal::{Down, Terminal};
use common::*;
use crdt_model::wire::{ClientFrame, RelayFrame, codes};
use crdt_model::*;
use relay_server::core::Incoming;

/// The longest a witness may wait for its next receipt while an attack runs.
const MAX_GAP: Duration = Duration::from_secs(2);

/// What the witness saw.
#[derive(Debug, Default)]
struct WitnessLog {
    receipts: u32,
    max_gap: Duration,
    failures: Vec<String>,
}

/// A device of store `witness` adding a line and syncing it, over and over.
struct Witness {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<WitnessLog>,
}

impl Witness {
    async fn start(relay: &TestRelay) -> Self {
        let (device, token) = relay.device("witness", "w");
        let addr = relay.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut log = WitnessLog::default();
            let mut t = Terminal::new(device, token, 99);
            let mut last = Instant::now();
            if t.connect(addr).await.is_err() {
                log.failures.push("cannot connect".into());
                return log;
            }
            let id = t.create("witness");
            let mut price = 100;
            while !stopping.load(Ordering::Relaxed) {
                add_line(&mut t, id, price);
                price += 1;
                match t.sync_until_receipted(id, Duration::from_secs(5)).await {
                    Ok(true) => {
                        log.max_gap = log.max_gap.max(last.elapsed());
                        last = Instant::now();
                        log.receipts += 1;
                    }
                    Ok(false) => log.failures.push("no receipt within 5 s".into()),
                    Err(Down) => {
                        log.failures.push("connection lost".into());
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            log.max_gap = log.max_gap.max(last.elapsed());
            for f in &t.unexpected {
                log.failures.push(format!("unexpected frame {f:?}"));
            }
            log
        });
        // Let it get going before the attack starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Self { stop, task }
    }

    /// Stops the witness and checks it was served throughout.
    async fn finish(self) {
        // One more round after the attack: the relay still serves.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        let log = self.task.await.unwrap();
        assert!(log.failures.is_empty(), "witness: {:?}", log.failures);
        assert!(log.receipts >= 3, "witness got {} receipts", log.receipts);
        assert!(
            log.max_gap <= MAX_GAP,
            "witness waited {:?} for a receipt",
            log.max_gap
        );
    }
}

fn add_line(t: &mut Terminal, id: OrderId, price: i64) {
    let at = t.tick();
    let o = t.orders.get_mut(&id).unwrap();
    let draft = LineDraft {
        sku: format!("sku-{price}"),
        name: format!("item {price}"),
        unit_price: price,
        quantity: 1,
        ..Default::default()
    };
    o.add_line(at, &mut t.rng, draft).unwrap();
}

/// An attacker of store `attack` with one order the relay has stored.
async fn attacker(relay: &TestRelay) -> (Client, Order) {
    let (device, token) = relay.device("attack", "evil");
    let mut c = Client::connect(relay.addr, device, &token).await;
    let mut o = c.create("attack");
    let others = c.sync_until_receipted(&mut o).await;
    assert!(
        others
            .iter()
            .all(|f| matches!(f, RelayFrame::Feed { .. } | RelayFrame::Welcome { .. })),
        "{others:?}"
    );
    (c, o)
}

/// Reads frames until an error frame arrives; `None` if the relay went quiet or closed first.
async fn next_error(c: &mut Client) -> Option<(String, bool)> {
    for _ in 0..5000 {
        match c.recv().await? {
            RelayFrame::Error { code, fatal, .. } => return Some((code, fatal)),
            _ => continue,
        }
    }
    None
}

/// Random frames per fuzzing test: `HOSTILE_CASES`, 200 by default.
fn hostile_cases() -> usize {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Whether the connection still answers a ping (false: it was closed for cause); `seen` gets
/// every frame that came before the pong.
async fn answers(c: &mut Client, nonce: u64, seen: &mut dyn FnMut(&RelayFrame)) -> bool {
    c.send_may_be_cut(&ClientFrame::Ping { nonce }).await;
    while let Some(f) = c.recv().await {
        seen(&f);
        if matches!(f, RelayFrame::Pong { nonce: n } if n == nonce) {
            return true;
        }
    }
    false
}

/// The attacker's store still works after the attack: a fresh connection stores a new order.
async fn attacker_store_still_works(relay: &TestRelay) {
    let (device, token) = relay.device("attack", "honest");
    let mut c = Client::connect(relay.addr, device, &token).await;
    let mut o = c.create("attack");
    c.sync_until_receipted(&mut o).await;
    assert!(relay.store.load_order(o.id()).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_a_bloom_filter_with_zero_bits_is_refused() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, o) = attacker(&relay).await;
    for _ in 0..3 {
        let data = raw_message(&o.heads(), &[bloom(3, 0, 7, 0)], &[]);
        c.send(&sync_frame(o.id(), data)).await;
        let (code, _) = next_error(&mut c).await.expect("an error frame");
        assert_eq!(code, codes::BAD_SYNC_MESSAGE);
    }
    attacker_store_still_works(&relay).await;
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_2_many_or_heavy_bloom_filters_are_refused_quickly() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, o) = attacker(&relay).await;
    let started = Instant::now();
    // 150 small filters with many probes each, in about a kilobyte.
    let many: Vec<Vec<u8>> = (0..150).map(|_| bloom(1, 8, 1_000_000, 1)).collect();
    c.send(&sync_frame(o.id(), raw_message(&o.heads(), &many, &[])))
        .await;
    let (code, _) = next_error(&mut c).await.expect("an error frame");
    assert_eq!(code, codes::LIMIT_EXCEEDED);
    // One filter with a million probes.
    let heavy = vec![bloom(1, 8, 1_000_000, 1)];
    c.send(&sync_frame(o.id(), raw_message(&o.heads(), &heavy, &[])))
        .await;
    let (code, _) = next_error(&mut c).await.expect("an error frame");
    assert_eq!(code, codes::BAD_SYNC_MESSAGE);
    assert!(started.elapsed() < Duration::from_secs(2));
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_2_a_deflate_bomb_is_refused_before_it_inflates() {
    use std::io::Write;
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, o) = attacker(&relay).await;
    // A "compressed change" chunk that inflates to 256 MiB of zeros.
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..256 {
        enc.write_all(&zeros).unwrap();
    }
    let deflated = enc.finish().unwrap();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 2];
    leb(&mut chunk, deflated.len() as u64);
    chunk.extend(&deflated);
    c.send(&sync_frame(o.id(), raw_message(&o.heads(), &[], &[chunk])))
        .await;
    let (code, _) = next_error(&mut c).await.expect("an error frame");
    assert_eq!(code, codes::LIMIT_EXCEEDED);
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_9_a_corrupt_change_gets_an_error_frame() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, mut o) = attacker(&relay).await;
    let before = o.heads();
    let at = c.tick();
    o.add_line(
        at,
        &mut c.rng,
        LineDraft {
            sku: "x".into(),
            name: "x".into(),
            unit_price: 1,
            quantity: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let change = o.doc().get_changes(&before).pop().unwrap();
    let mut raw = change.raw_bytes().to_vec();
    let n = raw.len();
    raw[n - 3] ^= 0x5a;
    c.send(&sync_frame(o.id(), raw_message(&o.heads(), &[], &[raw])))
        .await;
    let (code, _) = next_error(&mut c).await.expect("an error frame");
    assert_eq!(code, codes::BAD_CHANGE);
    // Nothing of it was stored.
    let stored = relay.store.load_order(o.id()).unwrap().unwrap();
    assert!(
        stored
            .to_doc()
            .unwrap()
            .get_change_by_hash(&change.hash())
            .is_none()
    );
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sync_messages_never_hurt_the_relay() {
    let cases = hostile_cases();
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, o) = attacker(&relay).await;
    let real = o
        .doc()
        .generate_sync_message(&mut sync::State::new())
        .unwrap()
        .encode();
    let mut g = Gen(0x5eed);
    let (device, token) = relay.device("attack", "fuzz");
    for case in 0..cases {
        let data = g.sync_message(&real, &o.heads());
        c.send_may_be_cut(&sync_frame(o.id(), data)).await;
        if case % 20 == 19 && !answers(&mut c, case as u64, &mut |_| {}).await {
            // Closed for cause: open a new connection.
            c = Client::connect(relay.addr, device, &token).await;
        }
    }
    // The attacker's order is intact and the relay still stores orders.
    let stored = relay.store.load_order(o.id()).unwrap().unwrap();
    let doc = stored.to_doc().unwrap();
    assert!(
        o.heads()
            .iter()
            .all(|h| doc.get_change_by_hash(h).is_some())
    );
    attacker_store_still_works(&relay).await;
    witness.finish().await;
    relay.stop().await;
}

/// Protocol 2's push path under the same attack: random, mutated, duplicated and misordered
/// change chunks and lying heads never take the relay down, never damage the attacker's own
/// stored order, and leave its store working; the connection answers or is closed for cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pushes_never_hurt_the_relay() {
    let cases = hostile_cases();
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, mut o) = attacker(&relay).await;
    let before = o.heads();
    // Real changes the relay has not seen, to mutate and replay out of order.
    for price in [100, 200, 300] {
        let at = c.tick();
        let draft = LineDraft {
            name: format!("item {price}"),
            unit_price: price,
            quantity: 1,
            ..Default::default()
        };
        o.add_line(at, &mut c.rng, draft).unwrap();
    }
    let real: Vec<Vec<u8>> = o
        .doc()
        .get_changes(&before)
        .iter()
        .map(|ch| ch.raw_bytes().to_vec())
        .collect();
    let mut g = Gen(0x0905_4a11);
    let (device, token) = relay.device("attack", "fuzz-push");
    let mut refused = std::collections::BTreeMap::new();
    let mut reconnects = 0;
    for case in 0..cases {
        let (changes, heads) = g.push(&real, &o.heads());
        let frame = ClientFrame::Changes {
            order: o.id().to_string(),
            changes,
            heads,
            voucher: None,
        };
        c.send_may_be_cut(&frame).await;
        let mut count = |f: &RelayFrame| {
            if let RelayFrame::Error { code, .. } = f {
                *refused.entry(code.clone()).or_insert(0usize) += 1;
            }
        };
        if case % 20 == 19 && !answers(&mut c, case as u64, &mut count).await {
            reconnects += 1;
            c = Client::connect(relay.addr, device, &token).await;
        }
    }
    eprintln!("refused: {refused:?}, reconnects: {reconnects}");
    // Most frames are refused one by one, on a connection that stays up.
    assert!(refused.values().sum::<usize>() > cases / 4, "{refused:?}");
    assert!(reconnects < cases / 20 / 2, "{reconnects} reconnects");
    // What the relay stored of the attacker's order is its own history, whole.
    let stored = relay.store.load_order(o.id()).unwrap().unwrap();
    let doc = stored.to_doc().unwrap();
    assert!(before.iter().all(|h| doc.get_change_by_hash(h).is_some()));
    let relay_device = relay.store.identity().unwrap().device;
    for ch in doc.get_changes(&[]) {
        let by_relay = device_of_actor(ch.actor_id()) == Some(relay_device);
        assert!(
            by_relay || o.doc().get_change_by_hash(&ch.hash()).is_some(),
            "the relay stored a change the attacker never made: {}",
            ch.hash()
        );
    }
    attacker_store_still_works(&relay).await;
    witness.finish().await;
    relay.stop().await;
}

/// Drives the hub directly (no socket, no screening) until `order` is receipted.
async fn hub_sync_until_receipt(
    hub: &relay_server::hub::Hub,
    peer: &Arc<relay_server::hub::Peer>,
    rx: &mut tokio::sync::mpsc::Receiver<axum::body::Bytes>,
    order: &mut Order,
) {
    let mut state = sync::State::new();
    for _ in 0..50 {
        if let Some(m) = order.doc().generate_sync_message(&mut state) {
            hub.sync(peer, order.id(), Incoming::Sync(m)).await.unwrap();
        }
        let bytes = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the hub answers")
            .expect("the outbox is open");
        match RelayFrame::decode(&bytes).unwrap() {
            RelayFrame::Sync { data, .. } => {
                let m = sync::Message::decode(&data).unwrap();
                order.doc_mut().receive_sync_message(&mut state, m).unwrap();
                order.refresh().unwrap();
            }
            RelayFrame::Receipt { .. } => return,
            RelayFrame::Feed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no receipt");
}

/// Finding 1 at the hub, past the screening: Automerge panics on a Bloom filter with zero bits
/// per entry. The panic ends that frame's work only: the connection gets `unprocessable` and is
/// closed, the panic is counted, and the same worker goes on serving other orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_handling_a_frame_is_contained() {
    use relay_server::hub::{Hub, HubConfig};
    use relay_server::metrics::Metrics;
    use relay_server::store::RelayStore;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RelayStore::open(dir.path()).unwrap());
    let attack = StoreId::new("attack").unwrap();
    let witness = StoreId::new("witness").unwrap();
    let (evil, _) = store.add_device(&attack, "evil", T0).unwrap();
    let (good, _) = store.add_device(&witness, "good", T0).unwrap();
    let metrics = Arc::new(Metrics::default());
    // One worker: the witness's order is served by the worker that panicked.
    let config = HubConfig {
        workers: 1,
        cache_orders: 100,
    };
    let hub = Hub::start(Arc::clone(&store), Arc::clone(&metrics), &config)
        .await
        .unwrap();
    let mut rng = SplitMix64::new(7);
    let new_order = |device: DeviceId, s: &StoreId, at: i64, rng: &mut SplitMix64| {
        let new = NewOrder {
            id: OrderId::generate(Timestamp(at), rng),
            store: s.clone(),
            currency: Currency::new("EUR").unwrap(),
        };
        Order::create(new, Writer::new(device, 1), Timestamp(at), rng).unwrap()
    };

    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let peer = hub.connect(evil.device, attack.clone(), tx);
    let mut o = new_order(evil.device, &attack, T0, &mut rng);
    hub_sync_until_receipt(&hub, &peer, &mut rx, &mut o).await;
    while rx.try_recv().is_ok() {}

    let bad = sync::Message::decode(&raw_message(&o.heads(), &[bloom(3, 0, 7, 0)], &[])).unwrap();
    hub.sync(&peer, o.id(), Incoming::Sync(bad)).await.unwrap();
    let mut got = None;
    while let Ok(Some(bytes)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        if let RelayFrame::Error { code, fatal, .. } = RelayFrame::decode(&bytes).unwrap() {
            got = Some((code, fatal));
            break;
        }
    }
    assert_eq!(got, Some((codes::UNPROCESSABLE.to_owned(), true)));
    assert!(peer.is_closed());
    assert_eq!(metrics.frame_panics.load(Ordering::Relaxed), 1);
    assert!(hub.workers_alive());
    assert!(metrics.render().contains("relay_frame_panics_total 1"));

    // The same worker serves a witness order, and the attacked order, afterwards.
    let (tx2, mut rx2) = tokio::sync::mpsc::channel(64);
    let peer2 = hub.connect(good.device, witness.clone(), tx2);
    let mut w = new_order(good.device, &witness, T0 + 1, &mut rng);
    hub_sync_until_receipt(&hub, &peer2, &mut rx2, &mut w).await;
    let (tx3, mut rx3) = tokio::sync::mpsc::channel(64);
    let peer3 = hub.connect(evil.device, attack.clone(), tx3);
    let draft = LineDraft {
        sku: "x".into(),
        name: "x".into(),
        unit_price: 1,
        quantity: 1,
        ..Default::default()
    };
    o.add_line(Timestamp(T0 + 5000), &mut rng, draft).unwrap();
    hub_sync_until_receipt(&hub, &peer3, &mut rx3, &mut o).await;
    hub.flush().await;
    let stored = store.load_order(o.id()).unwrap().unwrap().to_doc().unwrap();
    assert!(
        o.heads()
            .iter()
            .all(|h| stored.get_change_by_hash(h).is_some())
    );
    hub.shutdown().await;
}

/// Syncs `doc` with the relay under the order id `as_id` until the relay answers with anything
/// but sync messages; returns that frame.
async fn sync_as(c: &mut Client, doc: &automerge::Automerge, as_id: OrderId) -> RelayFrame {
    let mut doc = doc.clone();
    let mut state = sync::State::new();
    if let Some(m) = doc.generate_sync_message(&mut state) {
        c.send(&sync_frame(as_id, m.encode())).await;
    }
    for _ in 0..100 {
        match c.recv().await.expect("the relay answers") {
            RelayFrame::Sync { order, data } if order == as_id.to_string() => {
                let m = sync::Message::decode(&data).unwrap();
                doc.receive_sync_message(&mut state, m).unwrap();
                if let Some(m) = doc.generate_sync_message(&mut state) {
                    c.send(&sync_frame(as_id, m.encode())).await;
                }
            }
            RelayFrame::Feed { .. } => {}
            RelayFrame::Sync { .. } => {}
            RelayFrame::Receipt { ref order, .. } if *order != as_id.to_string() => {}
            other => return other,
        }
    }
    panic!("the relay never answered with anything but sync messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_a_document_is_stored_under_its_own_id_only() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, o) = attacker(&relay).await;
    let mut rng = SplitMix64::new(11);
    // The stored order, sent again under other ids.
    for _ in 0..2 {
        let other = OrderId::generate(Timestamp(T0 + 1), &mut rng);
        let answer = sync_as(&mut c, o.doc(), other).await;
        assert!(
            matches!(&answer, RelayFrame::Error { code, .. } if code == codes::WRONG_ORDER_ID),
            "{answer:?}"
        );
        assert!(relay.store.load_order(other).unwrap().is_none());
    }
    // A new order, sent under another id first: refused; then under its own: stored once.
    let fresh = c.create("attack");
    let other = OrderId::generate(Timestamp(T0 + 2), &mut rng);
    let answer = sync_as(&mut c, fresh.doc(), other).await;
    assert!(
        matches!(&answer, RelayFrame::Error { code, .. } if code == codes::WRONG_ORDER_ID),
        "{answer:?}"
    );
    assert!(relay.store.load_order(other).unwrap().is_none());
    let answer = sync_as(&mut c, fresh.doc(), fresh.id()).await;
    assert!(matches!(answer, RelayFrame::Receipt { .. }), "{answer:?}");
    let stored = relay.store.load_order(fresh.id()).unwrap().unwrap();
    assert_eq!(id_of(&stored.to_doc().unwrap()).unwrap(), fresh.id());
    witness.finish().await;
    relay.stop().await;
}

/// The relay's next answer about `id` (feed frames and frames about other orders are skipped),
/// with the order id taken out so answers about two ids compare.
async fn answer_about(c: &mut Client, id: OrderId, data: Vec<u8>) -> RelayFrame {
    c.send(&sync_frame(id, data)).await;
    let me = id.to_string();
    for _ in 0..50 {
        let f = c.recv().await.expect("an answer");
        let anon = "-".to_owned();
        match f {
            RelayFrame::Sync { order, data } if order == me => {
                return RelayFrame::Sync { order: anon, data };
            }
            RelayFrame::Unavailable { order } if order == me => {
                return RelayFrame::Unavailable { order: anon };
            }
            RelayFrame::Rejected {
                order,
                code,
                changes,
                ..
            } if order == me => {
                return RelayFrame::Rejected {
                    order: anon,
                    code,
                    message: String::new(),
                    changes,
                };
            }
            RelayFrame::Error { code, fatal, .. } => {
                return RelayFrame::Error {
                    code,
                    message: String::new(),
                    fatal,
                };
            }
            _ => {}
        }
    }
    panic!("no answer about {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_another_stores_order_is_answered_like_an_absent_one() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    // An order of the witness store that exists, and an id that does not.
    let (device, token) = relay.device("witness", "other-till");
    let mut w = Client::connect(relay.addr, device, &token).await;
    let mut theirs = w.create("witness");
    w.sync_until_receipted(&mut theirs).await;
    let (mut c, o) = attacker(&relay).await;
    let mut rng = SplitMix64::new(5);
    let absent = OrderId::generate(Timestamp(T0 + 3), &mut rng);
    let bogus = automerge::ChangeHash([0xab; 32]);
    let own_changes: Vec<Vec<u8>> = o
        .doc()
        .get_changes(&[])
        .iter()
        .map(|ch| ch.raw_bytes().to_vec())
        .collect();
    let probes = [
        raw_message(&[bogus], &[], &[]),
        raw_message(&[], &[], &[]),
        raw_message(&theirs.heads(), &[], &[]),
        raw_message(&o.heads(), &[], &own_changes),
    ];
    for probe in probes {
        let a = answer_about(&mut c, theirs.id(), probe.clone()).await;
        let b = answer_about(&mut c, absent, probe).await;
        assert_eq!(
            a, b,
            "an existing order of another store answers differently"
        );
    }
    assert!(relay.store.load_order(absent).unwrap().is_none());
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_3_changes_withheld_from_their_dependency_are_bounded() {
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, mut o) = attacker(&relay).await;
    // c0 is never sent; every later change depends on it (a chain on top of it).
    let mut changes = Vec::new();
    for i in 0..300 {
        let before = o.heads();
        let at = c.tick();
        let draft = LineDraft {
            sku: format!("s{i}"),
            name: format!("n{i}"),
            unit_price: 1,
            quantity: 1,
            ..Default::default()
        };
        o.add_line(at, &mut c.rng, draft).unwrap();
        changes.extend(o.doc().get_changes(&before));
    }
    let withheld = changes.remove(0);
    let started = Instant::now();
    let mut sent = 0;
    let mut error = None;
    // One frame at a time, reading the relay's answer before the next: a socket closed with
    // unread input is reset, and the reset could swallow the error frame.
    'send: for ch in &changes {
        let data = raw_message(&[ch.hash()], &[], &[ch.raw_bytes().to_vec()]);
        c.send_may_be_cut(&sync_frame(o.id(), data)).await;
        sent += 1;
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await {
            match f {
                RelayFrame::Error { code, fatal, .. } => {
                    error = Some((code, fatal));
                    break 'send;
                }
                RelayFrame::Sync { .. } => break,
                _ => {}
            }
        }
    }
    let (code, fatal) = error.expect("an error frame");
    assert_eq!((code.as_str(), fatal), (codes::LIMIT_EXCEEDED, true));
    assert!(sent > 64);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The connection is closed; nothing of the queued changes was stored.
    let closed = loop {
        match c.recv().await {
            None => break true,
            Some(RelayFrame::Error { .. }) => break false,
            Some(_) => {}
        }
    };
    assert!(closed);
    let stored = relay
        .store
        .load_order(o.id())
        .unwrap()
        .unwrap()
        .to_doc()
        .unwrap();
    assert!(stored.get_change_by_hash(&withheld.hash()).is_none());
    assert!(stored.get_change_by_hash(&changes[0].hash()).is_none());
    attacker_store_still_works(&relay).await;
    witness.finish().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_9_a_corrupt_document_chunk_gets_an_error_frame() {
    use sha2::{Digest, Sha256};
    let relay = TestRelay::start().await;
    let witness = Witness::start(&relay).await;
    let (mut c, mut o) = attacker(&relay).await;
    for i in 0..5 {
        let at = c.tick();
        let draft = LineDraft {
            sku: format!("s{i}"),
            name: format!("n{i}"),
            unit_price: 1,
            quantity: 1,
            ..Default::default()
        };
        o.add_line(at, &mut c.rng, draft).unwrap();
    }
    // The whole order as one document chunk, one byte of its last column flipped, and the
    // checksum made right again: only a full load shows the damage.
    let mut doc = o.doc().save_nocompress();
    let (header_len, payload_len) = {
        let mut i = 9;
        let mut len = 0u64;
        let mut shift = 0;
        loop {
            let b = doc[i];
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        (i, len as usize)
    };
    let at = header_len + payload_len - 40;
    doc[at] ^= 0xff;
    let mut h = Sha256::new();
    h.update([0u8]);
    let mut len = Vec::new();
    leb(&mut len, payload_len as u64);
    h.update(&len);
    h.update(&doc[header_len..]);
    let digest = h.finalize();
    doc[4..8].copy_from_slice(&digest[..4]);
    c.send(&sync_frame(o.id(), raw_message(&o.heads(), &[], &[doc])))
        .await;
    let (code, _) = next_error(&mut c).await.expect("an error frame");
    assert_eq!(code, codes::BAD_CHANGE);
    witness.finish().await;
    relay.stop().await;
}
