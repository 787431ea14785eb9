//! Crafted bytes never panic through the model: thousands of single-bit flips (and some byte
//! edits) of real orders, change chunks and sync messages, each with its chunk checksum
//! recomputed so Automerge decodes the damage, go through `Order::load`, `Order::apply_changes`,
//! `guard::load_incremental` and `guard::receive_sync_message`.
//!
//! For every input the test also runs bare Automerge (inside `catch_unwind`) and counts how
//! often it panics, and how often it takes the input into a document whose changes no longer
//! rebuild (`get_changes` panics in a debug build, hands out unknown hashes in a release one):
//! that is what the guard is for, and the counts are printed (`--nocapture`).
//! With the default sizes, when this was written, bare Automerge 0.12 panicked on 180 of 2,500
//! damaged orders (and loaded 23 more into broken documents), on 185 of 2,500 damaged changes
//! (+68 broken) and on 166 of 2,510 damaged sync messages (+17 broken): the same counts in
//! debug and release builds. With `PANIC_CORPUS_CASES=20000`: 1,447 of 25,000 orders (+265),
//! 2,125 of 25,000 changes (+638), 1,647 of 25,010 messages (+131). Each test asserts that some
//! input panicked bare Automerge, so the corpus keeps exercising the guard.
//!
//! `PANIC_CORPUS_CASES=N` sets the number of bit flips per test (default 2,000); byte edits are
//! a quarter of that on top. `PANIC_CORPUS_LOUD=1` keeps Automerge's panic messages in the
//! output (they are filtered out by default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change};
use common::chunks::{self, Mutation, panics};
use common::corpus::{assert_whole, broken, prefix, seed_documents, seed_orders, sync_case};
use common::*;
use crdt_model::guard;
use crdt_model::*;

const DEFAULT_CASES: usize = 2_000;

/// What happened to the inputs of one corpus.
#[derive(Default, Debug)]
struct Tally {
    inputs: usize,
    bare_panics: usize,
    bare_later: usize,
    accepted: usize,
    refused: usize,
    malformed: usize,
    caught: usize,
}

impl Tally {
    fn report(&self, what: &str) {
        println!(
            "{what}: {} inputs; bare Automerge panicked on {} ({:.1} %) and took {} more into a \
             document whose changes no longer rebuild; through the guard: {} accepted, {} \
             refused with a typed error ({} Malformed, {} of them caught panics), 0 panics \
             escaped",
            self.inputs,
            self.bare_panics,
            100.0 * self.bare_panics as f64 / self.inputs.max(1) as f64,
            self.bare_later,
            self.accepted,
            self.refused,
            self.malformed,
            self.caught,
        );
        assert!(
            self.bare_panics > 0,
            "{what}: no input panicked bare Automerge, so the corpus does not exercise the guard"
        );
        assert_eq!(self.accepted + self.refused, self.inputs);
    }

    /// Counts what bare Automerge did: `run` panicked, or took the input (`Ok(true)`) into a
    /// document that is `broken`.
    fn bare(&mut self, run: Result<bool, ()>, broken: impl FnOnce() -> bool) {
        match run {
            Err(()) => self.bare_panics += 1,
            Ok(true) if broken() => self.bare_later += 1,
            Ok(_) => {}
        }
    }

    fn outcome<T>(&mut self, r: &Result<T, ModelError>) {
        match r {
            Ok(_) => self.accepted += 1,
            Err(e) => {
                self.refused += 1;
                if let ModelError::Malformed { detail, .. } = e {
                    self.malformed += 1;
                    if detail.starts_with("automerge panicked") {
                        self.caught += 1;
                    }
                }
            }
        }
    }
}

/// Every flip of every input, sampled down to `n`, plus `n / 4` byte edits.
fn corpus(inputs: &[Vec<u8>], n: usize, resizable: bool, seed: u64) -> Vec<(usize, Mutation)> {
    let mut flips = Vec::new();
    let mut edits = Vec::new();
    for (i, bytes) in inputs.iter().enumerate() {
        flips.extend(chunks::all_flips(bytes).into_iter().map(|m| (i, m)));
        let per_input = (n / 4).div_ceil(inputs.len());
        edits.extend(
            chunks::byte_mutations(bytes, per_input, resizable, seed ^ i as u64)
                .into_iter()
                .map(|m| (i, m)),
        );
    }
    println!(
        "{} single-bit flips available over {} inputs; running {} of them and {} byte edits",
        flips.len(),
        inputs.len(),
        n.min(flips.len()),
        edits.len()
    );
    let mut out = chunks::sample(&flips, n, seed);
    out.extend(edits);
    out
}

#[test]
fn damaged_saved_orders_load_or_give_a_typed_error() {
    chunks::quiet_automerge_panics();
    let orders = seed_orders();
    let docs = seed_documents(&orders);
    let writer = Term::new(99).writer;
    let mut tally = Tally::default();
    for (i, m) in corpus(&docs, chunks::cases(DEFAULT_CASES), true, 1) {
        let bytes = chunks::mutate(&docs[i], m);
        tally.inputs += 1;
        let mut bare = None;
        let run = panics(|| Automerge::load(&bytes).map(|d| bare = Some(d)).is_ok());
        tally.bare(run, || bare.is_some_and(|d| broken(&d, &[])));
        let loaded = panics(|| Order::load(&bytes, writer.clone()))
            .unwrap_or_else(|()| panic!("Order::load panicked on {m:?} of document {i}"));
        if let Ok(o) = &loaded {
            // What loads must also read and save.
            let context = format!("{m:?} of document {i}");
            panics(|| drop(o.view()))
                .unwrap_or_else(|()| panic!("a loaded order panicked: {context}"));
            assert_whole(o.doc(), &context);
        }
        tally.outcome(&loaded);
    }
    tally.report("saved orders -> Order::load");
}

/// One damaged change applied to an order holding everything before it.
#[test]
fn damaged_changes_leave_the_order_as_it_was() {
    chunks::quiet_automerge_panics();
    let orders = seed_orders();
    // Each change after the first (the first creates the order), with the order before it.
    let mut inputs = Vec::new();
    let mut bases = Vec::new();
    for o in &orders {
        let changes = o.doc().get_changes(&[]);
        for (k, c) in changes.iter().enumerate().skip(1) {
            inputs.push(c.raw_bytes().to_vec());
            bases.push(Order::from_doc(prefix(o, k), o.writer().clone()).unwrap());
        }
    }
    let mut tally = Tally::default();
    for (n, (i, m)) in corpus(&inputs, chunks::cases(DEFAULT_CASES), true, 2)
        .into_iter()
        .enumerate()
    {
        let bytes = chunks::mutate(&inputs[i], m);
        tally.inputs += 1;
        let base = &bases[i];
        let mut bare = base.doc().clone();
        let run = panics(|| {
            if n % 2 == 0 {
                Change::from_bytes(bytes.clone()).is_ok_and(|c| bare.apply_changes([c]).is_ok())
            } else {
                bare.load_incremental(&bytes).is_ok()
            }
        });
        let before = base.heads();
        tally.bare(run, || broken(&bare, &before));

        let mut order = base.clone();
        let (heads, saved) = (order.heads(), order.save());
        // Half through the model's apply, half through load_incremental on the bare document.
        let outcome = if n % 2 == 0 {
            panics(|| guard::decode_change(&bytes).and_then(|c| order.apply_changes(vec![c])))
        } else {
            panics(|| guard::load_incremental(order.doc_mut(), &bytes).map(drop))
        }
        .unwrap_or_else(|()| panic!("the guarded apply panicked on {m:?} of change {i}"));
        match &outcome {
            Ok(()) => {
                let context = format!("{m:?} of change {i}");
                panics(|| drop(order.view()))
                    .unwrap_or_else(|()| panic!("an applied change panicked: {context}"));
                assert_whole(order.doc(), &context);
            }
            Err(_) => {
                assert_eq!(order.heads(), heads, "heads moved after a refused {m:?}");
                assert_eq!(order.save(), saved, "content moved after a refused {m:?}");
            }
        }
        tally.outcome(&outcome);
    }
    tally.report("change chunks -> Order::apply_changes / guard::load_incremental");
}

#[test]
fn damaged_sync_messages_leave_document_and_state_as_they_were() {
    chunks::quiet_automerge_panics();
    let orders = seed_orders();
    let mut cases = Vec::new();
    for o in &orders {
        let n = o.doc().get_changes(&[]).len();
        // Nothing yet (the whole order comes as one document chunk), half, all but the last.
        for k in [0, n / 2, n - 1] {
            cases.push(sync_case(o, k));
        }
    }
    let inputs: Vec<Vec<u8>> = cases.iter().map(|c| c.2.clone()).collect();
    let mut tally = Tally::default();
    for (i, m) in corpus(&inputs, chunks::cases(DEFAULT_CASES), false, 3) {
        let bytes = chunks::mutate(&inputs[i], m);
        let (doc, state, _) = &cases[i];
        tally.inputs += 1;
        let (mut bare, mut bare_state) = (doc.clone(), state.clone());
        let run = panics(|| {
            sync::Message::decode(&bytes)
                .is_ok_and(|msg| bare.receive_sync_message(&mut bare_state, msg).is_ok())
        });
        tally.bare(run, || {
            panics(|| drop(bare.generate_sync_message(&mut bare_state))).is_err()
                || broken(&bare, &doc.get_heads())
        });

        let (mut mine, mut st) = (doc.clone(), state.clone());
        // Which step refused: a refused decode or receive must leave everything as it was; a
        // refused generate resets the state.
        let mut received = false;
        let outcome = panics(|| {
            let msg = guard::decode_sync_message(&bytes)?;
            guard::receive_sync_message(&mut mine, &mut st, msg)?;
            received = true;
            guard::generate_sync_message(&mine, &mut st).map(drop)
        })
        .unwrap_or_else(|()| panic!("the guarded receive panicked on {m:?} of message {i}"));
        match (&outcome, received) {
            (Err(_), false) => {
                assert_eq!(mine.get_heads(), doc.get_heads(), "heads moved: {m:?}");
                assert_eq!(mine.save(), doc.save(), "content moved: {m:?}");
                assert_eq!(&st, state, "sync state moved: {m:?}");
            }
            (Err(_), true) => assert_eq!(st, sync::State::new(), "state kept: {m:?}"),
            (Ok(()), _) => {
                let context = format!("{m:?} of message {i}");
                panics(|| drop(view_of(&mine)))
                    .unwrap_or_else(|()| panic!("a received message panicked later: {context}"));
                assert_whole(&mine, &context);
            }
        }
        tally.outcome(&outcome);
    }
    tally.report("sync messages -> guard::receive_sync_message");
}

/// A Bloom filter that claims entries with zero bits per entry: Automerge takes the message and
/// then divides by zero in the next `generate_sync_message`.
#[test]
fn a_bloom_filter_without_bits_is_refused() {
    chunks::quiet_automerge_panics();
    let orders = seed_orders();
    let (doc, state, _) = sync_case(&orders[2], 3);
    let mut have_peer = orders[2].doc().clone();
    let msg = zero_bits_message(&mut have_peer);

    let (mut bare, mut bare_state) = (doc.clone(), state.clone());
    bare.receive_sync_message(&mut bare_state, msg.clone())
        .unwrap();
    assert!(
        panics(|| bare.generate_sync_message(&mut bare_state)).is_err(),
        "bare Automerge 0.12 divides by zero here"
    );

    let (mut mine, mut st) = (doc.clone(), state.clone());
    let err = guard::receive_sync_message(&mut mine, &mut st, msg.clone()).unwrap_err();
    assert!(matches!(err, ModelError::Malformed { .. }), "{err:?}");
    assert_eq!(mine.get_heads(), doc.get_heads());
    assert_eq!(st, state);
    assert!(guard::decode_sync_message(&msg.encode()).is_err());
    // Had the state taken it anyway, generating resets the state instead of panicking.
    let err = guard::generate_sync_message(&bare, &mut bare_state).unwrap_err();
    assert!(matches!(err, ModelError::Malformed { .. }), "{err:?}");
    assert_eq!(bare_state, sync::State::new());
    assert!(guard::generate_sync_message(&bare, &mut bare_state).is_ok());
}

/// A real message of `peer` whose Bloom filter is replaced by one with `bits_per_entry = 0`.
fn zero_bits_message(peer: &mut Automerge) -> sync::Message {
    let mut st = sync::State::new();
    let mut msg = peer.generate_sync_message(&mut st).unwrap();
    // Make the peer's message carry a Have: it needs one round with the other side first.
    if msg.have.is_empty() {
        msg.have.push(sync::Have::default());
    }
    // uLEB128 entries = 3, bits per entry = 0, probes = 7, and no bits.
    let bloom = sync::BloomFilter::try_from(&[3u8, 0, 7][..]).unwrap();
    msg.have[0].bloom = bloom;
    msg.have[0].last_sync = Vec::new();
    msg
}

#[test]
fn guarded_loads_of_good_bytes_match_automerge() {
    let orders = seed_orders();
    for bytes in seed_documents(&orders) {
        let a = Automerge::load(&bytes).unwrap();
        let b = guard::load(&bytes).unwrap();
        assert_eq!(a.get_heads(), b.get_heads());
        assert_eq!(a.save(), b.save());
    }
    for o in &orders {
        let changes = o.doc().get_changes(&[]);
        let mut doc = Automerge::new();
        for c in &changes {
            guard::load_incremental(&mut doc, c.raw_bytes()).unwrap();
        }
        assert_eq!(doc.get_heads(), o.heads());
        let snapshot = prefix(o, 1).save();
        let rebuilt =
            guard::load_with_increments(&snapshot, changes[1..].iter().map(Change::raw_bytes))
                .unwrap();
        assert_eq!(rebuilt.get_heads(), o.heads());
    }
}
