//! Real orders, documents and sync messages to damage: the seeds of the panic corpora (this
//! crate's `panic_corpus.rs` and `replicator`'s).
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use automerge::Automerge;
use automerge::sync::{self, SyncDoc};
use crdt_model::*;

use super::{Term, sync};

/// Real orders built with the typed API: open, paid, closed, deleted, edited on two terminals
/// and numbered.
pub fn seed_orders() -> Vec<Order> {
    let mut a = Term::new(11);
    let mut b = Term::new(12);

    let mut open = a.create();
    a.add_line(&mut open, "Soup", 450, 2);
    a.add_line(&mut open, "Bread", 120, 1);

    let mut paid = a.create();
    let l = a.add_line(&mut paid, "Tea", 300, 3);
    let at = a.tick();
    paid.set_note(at, l, "no sugar").unwrap();
    a.pay(&mut paid, PaymentKind::Cash, 500, PaymentState::Captured)
        .unwrap();
    let at = a.tick();
    paid.set_status(at, &mut a.rng, ActiveStatus::InDelivery)
        .unwrap();

    let mut done = a.create();
    for i in 0..8 {
        a.add_line(&mut done, &format!("Item {i}"), 100 + i * 10, 1 + i % 3);
    }
    let due = done.view().unwrap().totals.balance_due;
    let card = {
        let at = a.tick();
        let p = done
            .begin_payment(
                at,
                &mut a.rng,
                PaymentDraft {
                    kind: PaymentKind::CardTerminal,
                    amount: due / 2,
                    reference: String::new(),
                },
            )
            .unwrap();
        let at = a.tick();
        done.authorize_payment(at, &mut a.rng, p, "AUTH 1234 **** 4242")
            .unwrap();
        p
    };
    let at = a.tick();
    done.capture_payment(at, &mut a.rng, card).unwrap();
    let rest = done.view().unwrap().totals.balance_due;
    let at = a.tick();
    done.complete_sale(
        at,
        &mut a.rng,
        Some(FinalPayment::New(PaymentDraft {
            kind: PaymentKind::GiftCard,
            amount: rest,
            reference: "**** 9876".into(),
        })),
    )
    .unwrap();

    let mut deleted = a.create();
    let l = a.add_line(&mut deleted, "Cake", 400, 1);
    let at = a.tick();
    deleted.remove_line(at, l).unwrap();
    let at = a.tick();
    deleted.delete(at, &mut a.rng).unwrap();

    // Two terminals, concurrent edits, then a number.
    let mut shared = a.create();
    a.add_line(&mut shared, "Pizza", 1200, 1);
    let mut theirs = b.replica(&shared);
    b.add_line(&mut theirs, "Cola", 250, 2);
    a.add_line(&mut shared, "Salad", 800, 1);
    sync(&mut shared, &mut theirs);
    let at = a.tick();
    shared.assign_number(at, OrderNumber(42)).unwrap();

    vec![open, paid, done, deleted, shared]
}

/// Saved orders, and saved orders followed by the raw change chunks of later edits (as a store
/// keeps a snapshot and its tail).
pub fn seed_documents(orders: &[Order]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = orders.iter().map(Order::save).collect();
    for o in orders {
        let changes = o.doc().get_changes(&[]);
        let half = changes.len() / 2;
        let mut base = Automerge::new();
        base.apply_changes(changes[..half].iter().cloned()).unwrap();
        let mut bytes = base.save();
        for c in &changes[half..] {
            bytes.extend_from_slice(c.raw_bytes());
        }
        out.push(bytes);
    }
    out
}

/// The document made of the first `n` changes of `o`.
pub fn prefix(o: &Order, n: usize) -> Automerge {
    let mut doc = Automerge::new();
    doc.apply_changes(o.doc().get_changes(&[])[..n].iter().cloned())
        .unwrap();
    doc
}

/// A sync message from a peer with the whole order to one with a prefix of it: the first message
/// of the exchange that carries changes.
pub fn sync_case(full: &Order, k: usize) -> (Automerge, sync::State, Vec<u8>) {
    let mut theirs = full.doc().clone();
    let mut mine = prefix(full, k);
    let (mut st_theirs, mut st_mine) = (sync::State::new(), sync::State::new());
    for _ in 0..8 {
        if let Some(m) = mine.generate_sync_message(&mut st_mine) {
            theirs.receive_sync_message(&mut st_theirs, m).unwrap();
        }
        let m = theirs.generate_sync_message(&mut st_theirs).unwrap();
        if !m.changes.is_empty() {
            return (mine, st_mine, m.encode());
        }
        mine.receive_sync_message(&mut st_mine, m).unwrap();
    }
    panic!("no message with changes after 8 rounds");
}

/// What the guard promises of a document it let through: every change rebuilds (no panic in
/// `get_changes`), and what it saves loads back with the same heads.
pub fn assert_whole(doc: &Automerge, context: &str) {
    let all = super::chunks::panics(|| doc.get_changes(&[]))
        .unwrap_or_else(|()| panic!("get_changes panicked on an accepted document: {context}"));
    let saved = doc.save();
    let back = Automerge::load(&saved)
        .unwrap_or_else(|e| panic!("an accepted document does not reload ({e}): {context}"));
    assert_eq!(
        back.get_heads(),
        doc.get_heads(),
        "heads after reload: {context}"
    );
    assert_eq!(all.len(), back.get_changes(&[]).len(), "{context}");
}

/// Whether the changes of `doc` after `before` no longer rebuild: `get_changes` panics (debug
/// builds of Automerge cross-check there) or hands out hashes the change graph does not have.
pub fn broken(doc: &Automerge, before: &[automerge::ChangeHash]) -> bool {
    super::chunks::panics(|| {
        let mut rebuilt: Vec<_> = doc.get_changes(before).iter().map(|c| c.hash()).collect();
        let mut known: Vec<_> = doc
            .get_changes_meta(before)
            .iter()
            .map(|m| m.hash)
            .collect();
        rebuilt.sort_unstable();
        known.sort_unstable();
        rebuilt != known
    })
    .unwrap_or(true)
}
