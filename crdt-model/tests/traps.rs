//! The Automerge traps the model is designed around, each with a test that would catch it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ROOT, ReadDoc};
use common::*;
use crdt_model::*;

/// Trap 1, shown on raw Automerge: one status register lets an active status beat Done,
/// depending only on which actor id sorts higher.
#[test]
fn a_single_status_register_can_lose_done() {
    let mut lost = false;
    for (a, b) in [([1u8; 16], [2u8; 16]), ([2u8; 16], [1u8; 16])] {
        let mut base = AutoCommit::new().with_actor(ActorId::from(a.to_vec()));
        base.put(ROOT, "status", "in_progress").unwrap();
        let mut other = base.fork().with_actor(ActorId::from(b.to_vec()));
        base.put(ROOT, "status", "done").unwrap();
        other.put(ROOT, "status", "in_delivery").unwrap();
        base.merge(&mut other).unwrap();
        let (v, _) = base.get(ROOT, "status").unwrap().unwrap();
        lost |= v.to_string().contains("in_delivery");
    }
    assert!(
        lost,
        "with one register, some actor order lets in_delivery win over done"
    );
}

/// ...and the model's status log makes Done win whatever the actor order.
#[test]
fn the_status_log_keeps_done_for_every_actor_order() {
    for (sa, sb) in [(1, 2), (2, 1), (7, 3), (3, 7)] {
        let mut a = Term::new(sa);
        let mut b = Term::new(sb);
        let mut oa = a.create();
        let mut ob = b.replica(&oa);
        let at = a.tick();
        oa.complete_sale(at, &mut a.rng, None).unwrap();
        let at = b.tick();
        ob.set_status(at, &mut b.rng, ActiveStatus::InDelivery)
            .unwrap();
        sync(&mut oa, &mut ob);
        assert_eq!(oa.status().unwrap(), OrderStatus::Done);
        assert_eq!(ob.status().unwrap(), OrderStatus::Done);
    }
}

/// Trap 2, shown on raw Automerge: a container created in two places hides one side's entries.
#[test]
fn a_container_created_twice_hides_entries() {
    let mut a = AutoCommit::new().with_actor(ActorId::from(vec![1u8; 16]));
    let mut b = AutoCommit::new().with_actor(ActorId::from(vec![2u8; 16]));
    let pa = a.put_object(ROOT, "payments", ObjType::Map).unwrap();
    a.put(&pa, "p1", 100).unwrap();
    let pb = b.put_object(ROOT, "payments", ObjType::Map).unwrap();
    b.put(&pb, "p2", 200).unwrap();
    a.merge(&mut b).unwrap();
    let (_, shown) = a.get(ROOT, "payments").unwrap().unwrap();
    assert_eq!(
        a.keys(&shown).count(),
        1,
        "one payment is hidden behind the conflict"
    );
    assert_eq!(a.get_all(ROOT, "payments").unwrap().len(), 2);
}

/// ...and in the model every container exists once, made in the first change, so payments
/// added concurrently on two replicas are all visible.
#[test]
fn containers_are_created_once_so_no_entry_hides() {
    let mut a = Term::new(1);
    let mut b = Term::new(2);
    let mut oa = a.create();
    let mut ob = b.replica(&oa);
    a.pay(&mut oa, PaymentKind::Cash, 100, PaymentState::Captured)
        .unwrap();
    b.pay(
        &mut ob,
        PaymentKind::CardTerminal,
        200,
        PaymentState::Captured,
    )
    .unwrap();
    sync(&mut oa, &mut ob);
    let v = oa.view().unwrap();
    assert_eq!(v.payments.len(), 2);
    assert_eq!(v.totals.paid, 300);
    for key in ["lines", "payments", "status", "acks"] {
        assert_eq!(
            oa.doc().get_all(ROOT, key).unwrap().len(),
            1,
            "{key} exists once"
        );
    }
    let first = oa.doc().get_changes(&[])[0].clone();
    assert!(first.deps().is_empty());
    assert!(
        first.len() >= 10,
        "the first change holds the header and every container"
    );
}

/// Trap 3: a payment's state is the join of its transitions, not one overwritten field, so a
/// stale replica cannot move it backwards by merging.
#[test]
fn a_stale_replica_cannot_move_a_payment_back() {
    let mut a = Term::new(1);
    let mut b = Term::new(2);
    let mut oa = a.create();
    let p = a
        .pay(
            &mut oa,
            PaymentKind::CardTerminal,
            500,
            PaymentState::Pending,
        )
        .unwrap();
    let mut ob = b.replica(&oa);
    let at = a.tick();
    oa.capture_payment(at, &mut a.rng, p).unwrap();
    let at = b.tick();
    ob.authorize_payment(at, &mut b.rng, p, "AUTH 1").unwrap();
    sync(&mut oa, &mut ob);
    let v = oa.view().unwrap();
    assert_eq!(v.payments[0].state, PaymentState::Captured);
    assert_eq!(v.payments[0].history.len(), 3, "every transition is kept");
    assert_eq!(v.totals.paid, 500, "totals are derived from the payments");
}

/// Trap 4: hot-path edits are targeted, one op each, not a whole-struct reconcile.
#[test]
fn edits_write_only_the_ops_they_mean() {
    let mut t = Term::new(1);
    let mut o = t.create();
    let lines: Vec<LineId> = (0..20)
        .map(|i| t.add_line(&mut o, &format!("item {i}"), 100, 1))
        .collect();
    let ops_of_last = |o: &Order| o.doc().get_changes(&[]).last().unwrap().len();
    let at = t.tick();
    o.set_unit_price(at, lines[3], 150).unwrap();
    assert_eq!(ops_of_last(&o), 1);
    let at = t.tick();
    o.change_quantity(at, lines[7], 2).unwrap();
    assert_eq!(ops_of_last(&o), 1);
    let at = t.tick();
    o.set_note(at, lines[9], "no ice").unwrap();
    assert_eq!(ops_of_last(&o), 1);
}

/// The change graph tells a change made after seeing the close from one made concurrently.
#[test]
fn changes_are_classified_against_the_close() {
    let mut a = Term::new(1);
    let mut b = Term::new(2);
    let mut oa = a.create();
    let first = oa.heads()[0];
    let mut ob = b.replica(&oa);
    let at = a.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 1,
        reference: String::new(),
    };
    let p = oa
        .complete_sale(at, &mut a.rng, Some(FinalPayment::New(cash)))
        .unwrap()
        .unwrap();
    let close = oa.heads()[0];
    let at = a.tick();
    oa.refund_payment(at, &mut a.rng, p).unwrap();
    let after = oa.heads()[0];
    b.add_line(&mut ob, "Late", 100, 1);
    let concurrent = ob.heads()[0];
    sync(&mut oa, &mut ob);
    assert_eq!(
        oa.change_vs_close(&first).unwrap(),
        Some(CloseRelation::Before)
    );
    assert_eq!(
        oa.change_vs_close(&close).unwrap(),
        Some(CloseRelation::IsTheClose)
    );
    assert_eq!(
        oa.change_vs_close(&after).unwrap(),
        Some(CloseRelation::After)
    );
    assert_eq!(
        oa.change_vs_close(&concurrent).unwrap(),
        Some(CloseRelation::Concurrent)
    );
    assert_eq!(
        ob.change_vs_close(&concurrent).unwrap(),
        Some(CloseRelation::Concurrent)
    );
}
