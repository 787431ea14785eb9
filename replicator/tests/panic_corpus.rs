//! Crafted bytes never panic the device: damaged sync messages from the relay (single-bit flips
//! with the chunk checksum recomputed, byte edits, a Bloom filter with zero bits per entry) go
//! through the engine's receive path, and damaged stored orders through the engine's start.
//!
//! A refused message must leave the order's document as it was (heads and `save()` bytes), give
//! a typed error, restart the order's sync with the relay, and leave the engine working: the
//! undamaged message is delivered afterwards and must still sync the order. Bare Automerge is
//! run on every input too, and its panics counted and printed (`--nocapture`).
//! `PANIC_CORPUS_CASES=N` sets the number of bit flips per test (default 1,500). When this was
//! written, bare Automerge panicked on 128 of the 1,875 default relay messages (and took 9 more
//! into a broken document), and on 59 of the 750 damaged stored orders (+10 broken).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../crdt-model/tests/common/mod.rs"]
mod common;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};
use common::chunks::{self, Mutation, panics};
use common::corpus::{assert_whole, broken, prefix, seed_documents, seed_orders};
use crdt_model::wire::{ClientFrame, RelayFrame, Version};
use crdt_model::*;
use replicator::core::{Effect, Engine, EngineConfig};
use replicator::{Identity, LocalSyncStatus, OrderRecord, ReplicatorError, StoredOrder};

const DEFAULT_CASES: usize = 1_500;

fn identity() -> Identity {
    let mut rng = SplitMix64::new(77);
    Identity {
        device: DeviceId::generate(Timestamp(0), &mut rng),
        store: StoreId::new("store-1").unwrap(),
        epoch: 1,
        relay_url: "sim".into(),
        fallback_urls: Vec::new(),
        token: "sim".into(),
    }
}

fn stored(id: OrderId, doc: &Automerge) -> StoredOrder {
    StoredOrder {
        order: id,
        snapshot: doc.save(),
        tail: Vec::new(),
        record: OrderRecord::new(LocalSyncStatus::Synced, 0),
    }
}

/// The device's next sync message for `id`, if it sent one.
fn sent_sync(engine: &mut Engine, id: OrderId) -> Option<sync::Message> {
    let mut found = None;
    while let Some(f) = engine.poll_transmit() {
        if let ClientFrame::Sync { order, data } = f
            && order == id.to_string()
        {
            found = Some(sync::Message::decode(&data).unwrap());
        }
    }
    found
}

/// One exchange between the device and the relay, up to the relay's first message that
/// carries changes.
struct Exchange {
    /// The order's document on the device (None: the device is fetching it).
    device_doc: Option<Automerge>,
    /// The relay's copy: the whole order.
    relay_doc: Automerge,
    id: OrderId,
}

impl Exchange {
    /// A fresh engine, online, holding the order as the exchange says; and the relay's message
    /// with changes (deterministic: the same bytes every time).
    fn run(&self) -> (Engine, Vec<u8>) {
        let stored = self.device_doc.iter().map(|d| stored(self.id, d)).collect();
        let mut engine = Engine::new(identity(), stored, 0, EngineConfig::default(), 1).unwrap();
        engine.handle_timeout(0);
        while engine.poll_effect().is_some() {}
        engine.handle_connected(0);
        engine.handle_frame(
            RelayFrame::Welcome {
                protocol: Version::CURRENT,
                relay: "relay".into(),
                store: "store-1".into(),
                feed_seq: 0,
                data: None,
            },
            0,
        );
        if self.device_doc.is_none() {
            engine.fetch(self.id, 0);
        } else {
            // The store feed says the order changed: the device catches up with a sync round.
            engine.handle_frame(
                RelayFrame::Feed {
                    entries: vec![wire::FeedEntry {
                        seq: 1,
                        order: self.id.to_string(),
                        number: None,
                        status: "in_progress".into(),
                        heads: wire::heads_to_wire(&self.relay_doc.get_heads()),
                        voucher: None,
                    }],
                },
                0,
            );
        }
        let mut relay = self.relay_doc.clone();
        let mut state = sync::State::new();
        for _ in 0..8 {
            let from_device = sent_sync(&mut engine, self.id).expect("the device offers a sync");
            relay.receive_sync_message(&mut state, from_device).unwrap();
            let reply = relay.generate_sync_message(&mut state).unwrap();
            if !reply.changes.is_empty() {
                while engine.poll_effect().is_some() {}
                while engine.poll_event().is_some() {}
                return (engine, reply.encode());
            }
            engine
                .handle_sync(&self.id.to_string(), &reply.encode(), 0)
                .unwrap();
        }
        panic!("the relay never sent changes");
    }
}

/// The device restarted from what `engine` asked to store since the exchange: it must start,
/// with the same order.
fn restart(engine: &mut Engine, ex: &Exchange, context: &str) {
    let mut order = stored(ex.id, &ex.device_doc.clone().unwrap_or_default());
    if ex.device_doc.is_none() {
        order.snapshot.clear();
    }
    while let Some(e) = engine.poll_effect() {
        match e {
            Effect::Append { changes, .. } => order.tail.extend(changes),
            Effect::Compact { snapshot, .. } => {
                order.snapshot = snapshot;
                order.tail.clear();
            }
            _ => {}
        }
    }
    let again = Engine::new(identity(), vec![order], 0, EngineConfig::default(), 1)
        .unwrap_or_else(|e| panic!("no restart after {context}: {e}"));
    assert_eq!(
        again.order(ex.id).ok().map(|o| o.heads()),
        engine.order(ex.id).ok().map(|o| o.heads()),
        "another order after the restart: {context}"
    );
}

/// The device's copy of the order: heads and saved bytes (None while it is fetching).
fn device_state(engine: &Engine, id: OrderId) -> Option<(Vec<ChangeHash>, Vec<u8>)> {
    engine.order(id).ok().map(|o| (o.heads(), o.save()))
}

fn exchanges() -> Vec<Exchange> {
    let mut out = Vec::new();
    for o in seed_orders() {
        let n = o.doc().get_changes(&[]).len();
        // Fetching (the relay sends the whole order as one document chunk), half of it, and
        // all but the last change.
        out.push(Exchange {
            device_doc: None,
            relay_doc: o.doc().clone(),
            id: o.id(),
        });
        for k in [n / 2, n - 1] {
            out.push(Exchange {
                device_doc: Some(prefix(&o, k)),
                relay_doc: o.doc().clone(),
                id: o.id(),
            });
        }
    }
    out
}

#[test]
fn damaged_relay_messages_leave_the_device_order_as_it_was() {
    chunks::quiet_automerge_panics();
    let exchanges = exchanges();
    let seeds: Vec<(Engine, Vec<u8>)> = exchanges.iter().map(Exchange::run).collect();
    let inputs: Vec<Vec<u8>> = seeds.iter().map(|s| s.1.clone()).collect();
    let n = chunks::cases(DEFAULT_CASES);
    let mut cases: Vec<(usize, Mutation)> = Vec::new();
    let mut flips = Vec::new();
    for (i, bytes) in inputs.iter().enumerate() {
        flips.extend(chunks::all_flips(bytes).into_iter().map(|m| (i, m)));
        cases.extend(
            chunks::byte_mutations(bytes, (n / 4).div_ceil(inputs.len()), false, 40 + i as u64)
                .into_iter()
                .map(|m| (i, m)),
        );
    }
    println!(
        "{} single-bit flips of {} relay messages; running {} of them and {} byte edits",
        flips.len(),
        inputs.len(),
        n.min(flips.len()),
        cases.len()
    );
    cases.extend(chunks::sample(&flips, n, 4));

    let (mut bare_panics, mut bare_later, mut accepted, mut refused, mut caught) = (0, 0, 0, 0, 0);
    for (i, m) in &cases {
        let ex = &exchanges[*i];
        let bytes = chunks::mutate(&inputs[*i], *m);

        // Bare Automerge on the device's document and a fresh state that has sent one message.
        let mut bare = ex.device_doc.clone().unwrap_or_default();
        let before = bare.get_heads();
        let mut st = sync::State::new();
        let _ = bare.generate_sync_message(&mut st);
        match panics(|| {
            sync::Message::decode(&bytes)
                .is_ok_and(|msg| bare.receive_sync_message(&mut st, msg).is_ok())
        }) {
            Err(()) => bare_panics += 1,
            Ok(true)
                if panics(|| drop(bare.generate_sync_message(&mut st))).is_err()
                    || broken(&bare, &before) =>
            {
                bare_later += 1;
            }
            Ok(_) => {}
        }

        let (mut engine, good) = ex.run();
        let before = device_state(&engine, ex.id);
        let id = ex.id.to_string();
        let outcome = panics(|| engine.handle_sync(&id, &bytes, 1))
            .unwrap_or_else(|()| panic!("the engine panicked on {m:?} of message {i}"));
        match &outcome {
            Ok(()) => {
                accepted += 1;
                let context = format!("{m:?} of message {i}");
                panics(|| drop(engine.view(ex.id)))
                    .unwrap_or_else(|()| panic!("the view panicked after {context}"));
                if let Ok(o) = engine.order(ex.id) {
                    assert_whole(o.doc(), &context);
                }
                restart(&mut engine, ex, &context);
            }
            Err(e) => {
                refused += 1;
                assert!(
                    matches!(e, ReplicatorError::Model(_)),
                    "not the model's error: {e:?}"
                );
                if let ReplicatorError::Model(ModelError::Malformed { detail, .. }) = e
                    && detail.starts_with("automerge panicked")
                {
                    caught += 1;
                }
                assert_eq!(device_state(&engine, ex.id), before, "order moved: {m:?}");
                assert!(
                    sent_sync(&mut engine, ex.id).is_some(),
                    "the sync did not restart after {m:?}"
                );
                // The engine still works: the undamaged message syncs the order.
                engine.handle_sync(&id, &good, 2).unwrap();
                assert_eq!(
                    engine.order(ex.id).unwrap().heads(),
                    ex.relay_doc.get_heads(),
                    "the undamaged message did not sync the order after {m:?}"
                );
            }
        }
    }
    println!(
        "relay messages -> Engine::handle_sync: {} inputs; bare Automerge panicked on \
         {bare_panics} and took {bare_later} more into a document that panics in the next \
         generate_sync_message or whose changes no longer rebuild; through the engine: {accepted} accepted, \
         {refused} refused with a typed error ({caught} caught panics), 0 panics escaped",
        cases.len(),
    );
    assert!(bare_panics > 0, "the corpus does not exercise the guard");
}

#[test]
fn damaged_stored_orders_fail_the_start_with_a_typed_error() {
    chunks::quiet_automerge_panics();
    let docs = seed_documents(&seed_orders());
    let n = chunks::cases(DEFAULT_CASES) / 2;
    let mut flips = Vec::new();
    for (i, bytes) in docs.iter().enumerate() {
        flips.extend(chunks::all_flips(bytes).into_iter().map(|m| (i, m)));
    }
    let id = OrderId::generate(Timestamp(1), &mut SplitMix64::new(5));
    let (mut bare_panics, mut bare_later, mut refused) = (0, 0, 0);
    let cases = chunks::sample(&flips, n, 6);
    for (i, m) in &cases {
        let bytes = chunks::mutate(&docs[*i], *m);
        match panics(|| Automerge::load(&bytes)) {
            Err(()) => bare_panics += 1,
            Ok(Ok(d)) if broken(&d, &[]) => bare_later += 1,
            Ok(_) => {}
        }
        let order = StoredOrder {
            order: id,
            snapshot: bytes,
            tail: Vec::new(),
            record: OrderRecord::new(LocalSyncStatus::Synced, 0),
        };
        let started =
            panics(|| Engine::new(identity(), vec![order], 0, EngineConfig::default(), 1))
                .unwrap_or_else(|()| panic!("the engine's start panicked on {m:?} of {i}"));
        match started {
            Ok(engine) => {
                panics(|| drop(engine.view(id)))
                    .unwrap_or_else(|()| panic!("the view panicked after {m:?} of {i}"));
            }
            Err(ReplicatorError::Corrupt(_)) => refused += 1,
            Err(e) => panic!("not a Corrupt error: {e:?}"),
        }
    }
    println!(
        "stored orders -> Engine::new: {} inputs; bare Automerge panicked on {bare_panics} and \
         loaded {bare_later} more into a document whose changes no longer rebuild; \
         {refused} refused as Corrupt, 0 panics escaped",
        cases.len()
    );
    assert!(bare_panics > 0, "the corpus does not exercise the guard");
}

/// A relay message whose Bloom filter claims entries with zero bits per entry: bare Automerge
/// takes it and divides by zero in the next `generate_sync_message`, which the engine runs right
/// after every receive.
#[test]
fn a_bloom_filter_without_bits_is_refused_by_the_device() {
    chunks::quiet_automerge_panics();
    let orders = seed_orders();
    let o = &orders[2];
    let ex = Exchange {
        device_doc: Some(prefix(o, 3)),
        relay_doc: o.doc().clone(),
        id: o.id(),
    };
    let (mut engine, good) = ex.run();
    let mut msg = sync::Message::decode(&good).unwrap();
    msg.changes = Vec::<Vec<u8>>::new().into();
    msg.have = vec![sync::Have {
        last_sync: Vec::new(),
        // uLEB128 entries = 3, bits per entry = 0, probes = 7, and no bits.
        bloom: sync::BloomFilter::try_from(&[3u8, 0, 7][..]).unwrap(),
    }];
    let bad = msg.encode();

    // Bare Automerge, on the device's document and state.
    let mut bare = prefix(o, 3);
    let mut st = sync::State::new();
    let _ = bare.generate_sync_message(&mut st);
    bare.receive_sync_message(&mut st, sync::Message::decode(&bad).unwrap())
        .unwrap();
    assert!(panics(|| bare.generate_sync_message(&mut st)).is_err());

    let before = device_state(&engine, ex.id);
    let id = ex.id.to_string();
    let err = panics(|| engine.handle_sync(&id, &bad, 1))
        .expect("no panic")
        .unwrap_err();
    assert!(
        matches!(
            err,
            ReplicatorError::Model(ModelError::Malformed {
                what: "sync message",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(device_state(&engine, ex.id), before);
    assert!(sent_sync(&mut engine, ex.id).is_some());
    // Through the frame handler too, as the driver calls it: logged, not panicked.
    panics(|| {
        engine.handle_frame(
            RelayFrame::Sync {
                order: id.clone(),
                data: bad.clone().into(),
            },
            2,
        )
    })
    .expect("no panic");
    assert!(engine.is_online());
    engine.handle_sync(&id, &good, 3).unwrap();
    assert_eq!(
        engine.order(ex.id).unwrap().heads(),
        ex.relay_doc.get_heads()
    );
}
