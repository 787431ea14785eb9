//! An `Order` handle caches what its operations read (status, line facts, the parsed view).
//! These tests check the cache never outlives a change it did not make itself: merges,
//! `apply_changes`, the sync protocol and raw writes through `doc_mut` all show up in the next
//! operation and view, and a long-lived handle behaves exactly like a fresh one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use crdt_model::automerge::sync::{self, SyncDoc};
use crdt_model::automerge::transaction::Transactable;
use crdt_model::automerge::{ROOT, ReadDoc, ScalarValue};
use crdt_model::order::MAX_QUANTITY;
use crdt_model::*;

/// An open order on terminal `a` with one line, and `b`'s replica of it. `a` has edited the
/// line once so its cache holds the status and the line.
fn two_terminals() -> (Term, Order, Term, Order, LineId) {
    let mut ta = Term::new(11);
    let mut a = ta.create();
    let line = ta.add_line(&mut a, "Tea", 300, 1);
    let at = ta.tick();
    a.change_quantity(at, line, 1).unwrap();
    let tb = Term::new(12);
    let b = tb.replica(&a);
    (ta, a, tb, b, line)
}

fn close_remotely(tb: &mut Term, b: &mut Order) {
    let due = b.view().unwrap().totals.balance_due;
    let at = tb.tick();
    b.complete_sale(
        at,
        &mut tb.rng,
        Some(FinalPayment::New(PaymentDraft {
            kind: PaymentKind::Cash,
            amount: due,
            reference: String::new(),
        })),
    )
    .unwrap();
}

fn assert_closed(r: Result<(), ModelError>) {
    assert!(
        matches!(
            r,
            Err(ModelError::OrderClosed {
                status: OrderStatus::Done
            })
        ),
        "{r:?}"
    );
}

/// Runs the automerge sync protocol between two documents until neither has anything to say.
fn sync_docs(a: &mut Order, b: &mut Order) {
    let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
    for _ in 0..10 {
        let mut quiet = true;
        if let Some(m) = a.doc_mut().generate_sync_message(&mut sa) {
            b.doc_mut().receive_sync_message(&mut sb, m).unwrap();
            quiet = false;
        }
        if let Some(m) = b.doc_mut().generate_sync_message(&mut sb) {
            a.doc_mut().receive_sync_message(&mut sa, m).unwrap();
            quiet = false;
        }
        if quiet {
            return;
        }
    }
}

#[test]
fn a_remote_done_merged_in_refuses_the_next_edit() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    close_remotely(&mut tb, &mut b);
    a.merge(&mut b).unwrap();
    let at = ta.tick();
    assert_closed(a.change_quantity(at, line, 1));
    assert_closed(a.set_note(at, line, "late"));
    assert_closed(a.set_unit_price(at, line, 1));
    assert_closed(a.remove_line(at, line));
    assert_eq!(a.status().unwrap(), OrderStatus::Done);
    assert_eq!(a.view().unwrap().status, OrderStatus::Done);
}

#[test]
fn a_remote_done_applied_as_changes_refuses_the_next_edit() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    let before = b.heads();
    close_remotely(&mut tb, &mut b);
    let changes = b.doc().get_changes(&before);
    a.apply_changes(changes).unwrap();
    let at = ta.tick();
    assert_closed(a.change_quantity(at, line, 1));
}

#[test]
fn a_remote_done_received_through_doc_mut_refuses_the_next_edit() {
    // The sync layers write through `doc_mut`, without `refresh`.
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    close_remotely(&mut tb, &mut b);
    sync_docs(&mut a, &mut b);
    assert_eq!(a.heads(), b.heads());
    let at = ta.tick();
    assert_closed(a.change_quantity(at, line, 1));
    let at = ta.tick();
    assert!(matches!(
        a.set_status(at, &mut ta.rng, ActiveStatus::Delayed),
        Err(ModelError::OrderClosed { .. })
    ));
}

#[test]
fn a_remote_done_merged_through_doc_mut_refuses_the_next_edit() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    close_remotely(&mut tb, &mut b);
    a.doc_mut().merge(b.doc_mut()).unwrap();
    let at = ta.tick();
    assert_closed(a.change_quantity(at, line, 1));
}

#[test]
fn a_remote_removal_refuses_the_next_edit_of_that_line() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    let at = tb.tick();
    b.remove_line(at, line).unwrap();
    sync_docs(&mut a, &mut b);
    let at = ta.tick();
    assert!(matches!(
        a.change_quantity(at, line, 1),
        Err(ModelError::LineRemoved(_))
    ));
}

#[test]
fn remote_increments_count_in_the_next_set_quantity() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    // a sees 2; b adds 5 (7 in all).
    let at = tb.tick();
    b.change_quantity(at, line, 5).unwrap();
    a.merge(&mut b).unwrap();
    let at = ta.tick();
    a.set_quantity(at, line, 3).unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, 3);
    // The bound is checked against the merged quantity.
    let at = tb.tick();
    b.change_quantity(at, line, MAX_QUANTITY - 7).unwrap();
    sync_docs(&mut a, &mut b);
    assert_eq!(a.view().unwrap().lines[0].quantity, MAX_QUANTITY - 4);
    let at = ta.tick();
    assert!(matches!(
        a.change_quantity(at, line, 5),
        Err(ModelError::InvalidValue { .. })
    ));
    let at = ta.tick();
    a.change_quantity(at, line, 4).unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, MAX_QUANTITY);
}

#[test]
fn a_raw_write_through_doc_mut_is_seen() {
    let (mut ta, mut a, _, _, line) = two_terminals();
    let lines = a.doc().get(ROOT, "lines").unwrap().unwrap().1;
    let obj = a.doc().get(&lines, line.to_string()).unwrap().unwrap().1;
    a.doc_mut()
        .transact(|tx| tx.increment(&obj, "qty", 10))
        .unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, 12);
    let at = ta.tick();
    a.set_quantity(at, line, 1).unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, 1);
    // A raw removal marker.
    let device = ta.device.to_string();
    a.doc_mut()
        .transact(|tx| {
            tx.put(&obj, "removed_by", device.as_str())?;
            tx.put(&obj, "removed_at", ScalarValue::Timestamp(ta.now))
        })
        .unwrap();
    let at = ta.tick();
    assert!(matches!(
        a.change_quantity(at, line, 1),
        Err(ModelError::LineRemoved(_))
    ));
}

#[test]
fn views_follow_merges_and_own_edits() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    let v1 = a.view().unwrap();
    assert_eq!(a.view().unwrap(), v1);
    let at = tb.tick();
    b.change_quantity(at, line, 2).unwrap();
    a.merge(&mut b).unwrap();
    let v2 = a.view().unwrap();
    assert_eq!(v2.lines[0].quantity, 4);
    let at = ta.tick();
    a.set_note(at, line, "hot").unwrap();
    assert_eq!(a.view().unwrap().lines[0].note, "hot");
    // A view, then an own edit at the cached heads, then a view again.
    let at = ta.tick();
    a.change_quantity(at, line, 1).unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, 5);
    let at = ta.tick();
    a.change_quantity(at, line, 1).unwrap();
    assert_eq!(a.view().unwrap().lines[0].quantity, 6);
    close_remotely(&mut tb, &mut b);
    sync_docs(&mut a, &mut b);
    let v3 = a.view().unwrap();
    assert_eq!(v3.status, OrderStatus::Done);
    // a's last edits were concurrent with the close: listed, not counted.
    assert_eq!(v3.late_edits.len(), 1);
    assert_eq!(v3.lines[0].quantity, 4);
    assert_eq!(v3, view_of(b.doc()).unwrap());
    // Loaded orders start from the snapshot parsed while loading.
    let loaded = Order::load(&a.save(), ta.writer.clone()).unwrap();
    assert_eq!(loaded.view().unwrap(), v3);
}

#[test]
fn an_edit_concurrent_with_the_close_is_a_late_edit_after_merge() {
    let (mut ta, mut a, mut tb, mut b, line) = two_terminals();
    let v = a.view().unwrap();
    assert!(v.late_edits.is_empty());
    close_remotely(&mut tb, &mut b);
    // a has not seen the close: its edit is accepted locally...
    let at = ta.tick();
    a.change_quantity(at, line, 1).unwrap();
    assert!(b.view().unwrap().late_edits.is_empty());
    sync_docs(&mut a, &mut b);
    // ...and both replicas list it as late, counting the closed quantity.
    for o in [&a, &b] {
        let v = o.view().unwrap();
        assert_eq!(v.late_edits.len(), 1, "{v:#?}");
        assert_eq!(v.late_edits[0].kind, LateEditKind::LineChanged);
        assert_eq!(v.lines[0].quantity, 2);
    }
    let at = ta.tick();
    assert_closed(a.change_quantity(at, line, 1));
}

/// One step of the differential test.
fn step(o: &mut Order, t: &mut Term, choice: u64, lines: &[LineId]) -> Result<(), ModelError> {
    let line = lines
        .get((choice >> 8) as usize % lines.len().max(1))
        .copied();
    let at = t.tick();
    match (choice % 12, line) {
        (0, _) => t
            .pay(o, PaymentKind::Cash, 100, PaymentState::Captured)
            .map(|_| ()),
        (1, Some(l)) => o.change_quantity(at, l, 1),
        (2, Some(l)) => o.change_quantity(at, l, -1),
        (3, Some(l)) => o.set_quantity(at, l, 1 + (choice >> 20) as i64 % 4),
        (4, Some(l)) => o.set_unit_price(at, l, (choice >> 20) as i64 % 500),
        (5, Some(l)) => o.set_note(at, l, "note"),
        (6, Some(l)) => o.remove_line(at, l),
        (7, _) => o.set_status(at, &mut t.rng, ActiveStatus::Delayed),
        (8, _) if choice.is_multiple_of(5) => o.complete_sale(at, &mut t.rng, None).map(|_| ()),
        (9, _) if choice.is_multiple_of(7) => o.delete(at, &mut t.rng),
        (10, _) => {
            let p = t.pay(o, PaymentKind::CardTerminal, 50, PaymentState::Pending)?;
            let at = t.tick();
            o.void_payment(at, &mut t.rng, p)
        }
        _ => o
            .add_line(
                at,
                &mut t.rng,
                LineDraft {
                    name: "X".into(),
                    unit_price: 10,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .map(|_| ()),
    }
}

#[test]
fn a_long_lived_handle_behaves_like_a_fresh_one() {
    for seed in 0..12u64 {
        let mut rng = SplitMix64::new(seed);
        let mut ta = Term::new(21);
        let mut tb = Term::new(22);
        let mut a = ta.create();
        let mut b = tb.replica(&a);
        for _ in 0..60 {
            let choice = rng.next_u64();
            // Mostly edits on a; sometimes b edits, sometimes the replicas exchange changes.
            match choice % 10 {
                0 | 1 => {
                    let lines: Vec<LineId> = b.view().unwrap().lines.iter().map(|l| l.id).collect();
                    let _ = step(&mut b, &mut tb, rng.next_u64(), &lines);
                }
                2 => sync_docs(&mut a, &mut b),
                3 => {
                    a.merge(&mut b).unwrap();
                }
                _ => {
                    let v = a.view().unwrap();
                    let lines: Vec<LineId> = v
                        .lines
                        .iter()
                        .chain(&v.removed_lines)
                        .map(|l| l.id)
                        .collect();
                    let op = rng.next_u64();
                    // The same operation on a handle built fresh from the same document, with
                    // the same clock and entropy, must give the same outcome and document.
                    let mut fresh = Order::from_doc(a.doc().clone(), ta.writer.clone()).unwrap();
                    let mut tf = Term {
                        device: ta.device,
                        writer: ta.writer.clone(),
                        rng: ta.rng.clone(),
                        now: ta.now,
                    };
                    let got = step(&mut a, &mut ta, op, &lines).map_err(|e| e.to_string());
                    let want = step(&mut fresh, &mut tf, op, &lines).map_err(|e| e.to_string());
                    assert_eq!(got, want, "seed {seed}");
                    assert_eq!(a.heads(), fresh.heads(), "seed {seed}");
                    assert_eq!(a.status().unwrap(), fresh.status().unwrap());
                    assert_eq!(a.view().unwrap(), view_of(fresh.doc()).unwrap());
                }
            }
        }
    }
}
