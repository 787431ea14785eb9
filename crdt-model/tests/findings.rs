//! Regression tests for the findings of the attacker's review (issue 10, items 4 to 6), one
//! test per finding. They use only the typed API, the view and the policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use crdt_model::*;

/// An open order with one line of 1000 and a pending card payment of 1000.
fn open_order(t: &mut Term) -> (Order, PaymentId) {
    let mut o = t.create();
    t.add_line(&mut o, "Menu", 1_000, 1);
    let p = t
        .pay(
            &mut o,
            PaymentKind::CardTerminal,
            1_000,
            PaymentState::Pending,
        )
        .unwrap();
    (o, p)
}

/// Runs `op` on `o`: refused with the document untouched, or accepted with a document that
/// loads, views and passes the policy as written by `author`. Returns whether it was accepted.
fn refused_or_sound(
    author: &Author,
    o: &mut Order,
    op: impl FnOnce(&mut Order) -> Result<(), ModelError>,
) -> bool {
    let before = o.doc().clone();
    let heads = o.heads();
    match op(o) {
        Err(e) => {
            assert_eq!(o.heads(), heads, "refused ({e}) but the document changed");
            false
        }
        Ok(()) => {
            o.view().expect("an accepted edit leaves a readable order");
            Order::load(&o.save(), o.writer().clone()).expect("and one that loads");
            validate(&before, o.doc(), author).expect("and one the relay accepts");
            true
        }
    }
}

fn draft(kind: PaymentKind, reference: &str) -> PaymentDraft {
    PaymentDraft {
        kind,
        amount: 100,
        reference: reference.into(),
    }
}

#[test]
fn typed_api_other_kind_with_spaces_is_readable_or_refused() {
    let mut t = Term::new(40);
    let (mut o, _) = open_order(&mut t);
    let author = t.author();
    for kind in [
        "gift card",
        "Ticket Restaurant",
        "voucher-2",
        "chèque vacances",
        "gift card!!",
        "a.b",
        " lead",
        "trail ",
        "two  spaces",
        "",
        "tab\there",
        "new\nline",
        &"x".repeat(33),
    ] {
        let at = t.tick();
        let rng = &mut t.rng;
        let accepted = refused_or_sound(&author, &mut o, |o| {
            o.add_payment(
                at,
                rng,
                draft(PaymentKind::Other(kind.into()), ""),
                PaymentState::Captured,
            )
            .map(|_| ())
        });
        if accepted {
            let v = o.view().unwrap();
            assert!(v.payments.iter().any(|p| p.kind == kind), "{kind:?}");
        }
        // What a POS needs is accepted.
        let wanted = [
            "gift card",
            "Ticket Restaurant",
            "voucher-2",
            "chèque vacances",
        ];
        assert_eq!(accepted, wanted.contains(&kind), "{kind:?}");
    }
}

#[test]
fn card_number_after_auth_code_is_refused() {
    let mut t = Term::new(41);
    let (mut o, p) = open_order(&mut t);
    let reference = "123456 4111111111111111";
    let at = t.tick();
    let heads = o.heads();
    let e = o
        .authorize_payment(at, &mut t.rng, p, reference)
        .unwrap_err();
    assert!(e.to_string().contains("card number"), "{e}");
    let e = o
        .add_payment(
            at,
            &mut t.rng,
            draft(PaymentKind::CardTerminal, reference),
            PaymentState::Pending,
        )
        .unwrap_err();
    assert!(e.to_string().contains("card number"), "{e}");
    assert!(
        !e.to_string().contains("4111"),
        "the error repeats no card number: {e}"
    );
    assert_eq!(o.heads(), heads);
    // The masked form the device library writes is fine.
    o.authorize_payment(at, &mut t.rng, p, "123456 **** **** **** 1111")
        .unwrap();
}

#[test]
fn card_number_with_dots_or_fullwidth_digits_is_refused() {
    let mut t = Term::new(42);
    let (mut o, p) = open_order(&mut t);
    let heads = o.heads();
    for reference in [
        "4111.1111.1111.1111",
        "4111  1111  1111  1111",
        "4111 - 1111 - 1111 - 1111",
        "４１１１ １１１１ １１１１ １１１１",
        "4111\u{A0}1111\u{3000}1111\t1111",
        "card 4111\u{2013}1111\u{2013}1111\u{2013}1111",
    ] {
        let at = t.tick();
        assert!(
            o.authorize_payment(at, &mut t.rng, p, reference).is_err(),
            "{reference:?}"
        );
        let at = t.tick();
        let line = LineDraft {
            name: "Menu".into(),
            note: format!("paid with {reference}"),
            unit_price: 100,
            quantity: 1,
            ..Default::default()
        };
        assert!(o.add_line(at, &mut t.rng, line).is_err(), "{reference:?}");
    }
    assert_eq!(o.heads(), heads);
}

#[test]
fn card_number_as_payment_kind_is_refused() {
    let mut t = Term::new(43);
    let (mut o, _) = open_order(&mut t);
    let heads = o.heads();
    let at = t.tick();
    let kind = PaymentKind::Other("4111111111111111".into());
    let e = o
        .add_payment(at, &mut t.rng, draft(kind, ""), PaymentState::Captured)
        .unwrap_err();
    assert!(e.to_string().contains("card number"), "{e}");
    // Nor as any other free text of a line.
    let pan = "4111111111111111".to_owned();
    let lines = [
        LineDraft {
            sku: pan.clone(),
            ..Default::default()
        },
        LineDraft {
            name: pan.clone(),
            ..Default::default()
        },
        LineDraft {
            modifiers: vec!["no onions".into(), pan.clone()],
            ..Default::default()
        },
    ];
    for line in lines {
        let line = LineDraft {
            unit_price: 100,
            quantity: 1,
            ..line
        };
        assert!(o.add_line(at, &mut t.rng, line).is_err());
    }
    assert_eq!(o.heads(), heads);
}

#[test]
fn concurrent_double_capture_is_not_called_overpayment() {
    let mut a = Term::new(44);
    let mut b = Term::new(45);
    let (mut on_a, p) = open_order(&mut a);
    let at = a.tick();
    on_a.authorize_payment(at, &mut a.rng, p, "AUTH 123456")
        .unwrap();
    let mut on_b = b.replica(&on_a);
    // Till A completes the sale by capturing the authorisation; till B, offline, captures the
    // same authorisation.
    let at = a.tick();
    on_a.complete_sale(at, &mut a.rng, Some(FinalPayment::Capture(p)))
        .unwrap();
    let at = b.tick();
    on_b.capture_payment(at, &mut b.rng, p).unwrap();
    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v, on_b.view().unwrap());
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.totals.paid, 1_000, "counted once");
    assert_eq!(v.totals.change_due, 0);
    assert_eq!(v.late_edits.len(), 1, "{:?}", v.late_edits);
    let late = &v.late_edits[0];
    assert_eq!(late.kind, LateEditKind::Payment);
    assert!(!late.message.contains("overpayment"), "{}", late.message);
    assert!(late.message.contains("captured twice"), "{}", late.message);
    let state = format!("payment:{p}.state");
    let conflict = v.conflicts.iter().find(|c| c.subject == state).unwrap();
    assert_eq!(conflict.values, ["captured", "captured"]);
    assert_eq!(conflict.chosen, "captured");

    // A real overpayment keeps its words: a new payment captured concurrently with the close.
    let mut a = Term::new(46);
    let mut b = Term::new(47);
    let (mut on_a, p) = open_order(&mut a);
    let mut on_b = b.replica(&on_a);
    let at = a.tick();
    on_a.complete_sale(at, &mut a.rng, Some(FinalPayment::Capture(p)))
        .unwrap();
    b.pay(&mut on_b, PaymentKind::Cash, 300, PaymentState::Captured)
        .unwrap();
    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.totals.paid, 1_300);
    assert_eq!(v.totals.change_due, 300);
    assert_eq!(v.late_edits.len(), 1);
    assert!(
        v.late_edits[0].message.contains("overpayment"),
        "{}",
        v.late_edits[0].message
    );
    assert!(v.conflicts.is_empty(), "{:?}", v.conflicts);

    // Two tills capturing one authorisation while the order is open: counted once, flagged.
    let mut a = Term::new(48);
    let mut b = Term::new(49);
    let (mut on_a, p) = open_order(&mut a);
    let mut on_b = b.replica(&on_a);
    let at = a.tick();
    on_a.capture_payment(at, &mut a.rng, p).unwrap();
    let at = b.tick();
    on_b.capture_payment(at, &mut b.rng, p).unwrap();
    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.totals.paid, 1_000);
    assert!(v.late_edits.is_empty());
    assert_eq!(v.conflicts.len(), 1, "{:?}", v.conflicts);
    assert_eq!(v.conflicts[0].subject, format!("payment:{p}.state"));
    assert_eq!(v.conflicts[0].values, ["captured", "captured"]);
}
