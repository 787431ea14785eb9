//! The card-number guard and the free-text rules, as properties: a Luhn-valid number of 13 to
//! 19 digits is refused wherever it sits and however it is written, by the checker and by the
//! typed API in every free-text field; masked numbers and ordinary text are accepted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::Automerge;
use common::*;
use crdt_model::text::find_card_number;
use crdt_model::*;
use proptest::prelude::*;

/// The Luhn check digit for `body` (most significant digit first).
fn check_digit(body: &[u8]) -> u8 {
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            // The digit next to the check digit is doubled, then every other one.
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// A Luhn-valid number of 13 to 19 digits.
fn card_number() -> impl Strategy<Value = Vec<u8>> {
    (12usize..=18)
        .prop_flat_map(|n| prop::collection::vec(0u8..10, n))
        .prop_map(|mut body| {
            let check = check_digit(&body);
            body.push(check);
            body
        })
}

/// How a digit is written: ASCII, full-width, Arabic-Indic, Devanagari, mathematical bold,
/// superscript.
fn write_digit(d: u8, script: usize) -> char {
    let d32 = u32::from(d);
    let cp = match script {
        1 => 0xFF10 + d32,
        2 => 0x0660 + d32,
        3 => 0x0966 + d32,
        4 => 0x1D7CE + d32,
        5 => match d {
            1 => 0xB9,
            2 => 0xB2,
            3 => 0xB3,
            _ => 0x2070 + d32,
        },
        _ => u32::from(b'0') + d32,
    };
    char::from_u32(cp).unwrap()
}

/// What may stand between two digits of a card number.
const SEPARATORS: [&str; 16] = [
    "", "", "", "", " ", "  ", ".", "-", " - ", "..", "\u{A0}", "\u{3000}", "\t", "\u{200B}",
    "\u{2013}", " \n ",
];

/// A card number written with per-digit scripts and separators, between a prefix and a suffix.
#[derive(Clone, Debug)]
struct Embedded {
    digits: Vec<u8>,
    text: String,
}

fn embedded() -> impl Strategy<Value = Embedded> {
    (
        card_number(),
        // Mostly ASCII, sometimes one script for the whole number, sometimes mixed.
        prop_oneof![
            4 => Just(None),
            2 => (0usize..6).prop_map(Some),
            1 => Just(Some(usize::MAX)),
        ],
        prop::collection::vec((0usize..6, 0..SEPARATORS.len()), 19),
        ".{0,6}",
        ".{0,6}",
    )
        .prop_map(|(digits, script, style, prefix, suffix)| {
            let mut text = prefix;
            for (i, (&d, &(mixed, sep))) in digits.iter().zip(&style).enumerate() {
                if i > 0 {
                    text.push_str(SEPARATORS[sep]);
                }
                let script = match script {
                    None => 0,
                    Some(usize::MAX) => mixed,
                    Some(s) => s,
                };
                text.push(write_digit(d, script));
            }
            text.push_str(&suffix);
            Embedded { digits, text }
        })
}

/// Exactly a GTIN-13/14 with a valid GS1 check digit (the one exception, for a `sku`).
fn is_gtin(s: &str) -> bool {
    matches!(s.len(), 13 | 14)
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.bytes()
            .rev()
            .enumerate()
            .map(|(i, b)| u32::from(b - b'0') * if i % 2 == 1 { 3 } else { 1 })
            .sum::<u32>()
            % 10
            == 0
}

/// An open order with a line and a pending card payment, and a closed one with a late edit.
struct Fixture {
    t: Term,
    open: Order,
    line: LineId,
    payment: PaymentId,
    closed: Order,
    late: String,
}

fn fixture() -> Fixture {
    let mut t = Term::new(60);
    let mut open = t.create();
    let line = t.add_line(&mut open, "Menu", 1_000, 1);
    let payment = t
        .pay(
            &mut open,
            PaymentKind::CardTerminal,
            1_000,
            PaymentState::Pending,
        )
        .unwrap();
    let mut b = Term::new(61);
    let mut closed = t.create();
    t.add_line(&mut closed, "Menu", 1_000, 1);
    let mut replica = b.replica(&closed);
    let at = t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 1_000,
        reference: String::new(),
    };
    closed
        .complete_sale(at, &mut t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    b.add_line(&mut replica, "Late", 100, 1);
    sync(&mut closed, &mut replica);
    let late = closed.view().unwrap().late_edits[0].id.clone();
    Fixture {
        t,
        open,
        line,
        payment,
        closed,
        late,
    }
}

fn line_with(field: TextField, text: &str) -> LineDraft {
    let mut line = LineDraft {
        sku: "menu".into(),
        name: "Menu".into(),
        unit_price: 100,
        quantity: 1,
        ..Default::default()
    };
    match field {
        TextField::Sku => line.sku = text.into(),
        TextField::LineName => line.name = text.into(),
        TextField::LineNote => line.note = text.into(),
        TextField::Modifier => line.modifiers = vec!["no onions".into(), text.into()],
        _ => {}
    }
    line
}

/// Every typed operation that writes `text` into `field`, each with its result.
fn write_everywhere(f: &mut Fixture, field: TextField, text: &str) -> Vec<Result<(), ModelError>> {
    let at = f.t.tick();
    let rng = &mut f.t.rng;
    let o = &mut f.open;
    let draft = |kind: PaymentKind, reference: &str| PaymentDraft {
        kind,
        amount: 100,
        reference: reference.into(),
    };
    match field {
        TextField::Sku | TextField::LineName | TextField::Modifier => {
            vec![o.add_line(at, rng, line_with(field, text)).map(|_| ())]
        }
        TextField::LineNote => vec![
            o.add_line(at, rng, line_with(field, text)).map(|_| ()),
            o.set_note(at, f.line, text),
        ],
        TextField::PaymentKind => vec![
            o.add_payment(
                at,
                rng,
                draft(PaymentKind::Other(text.into()), ""),
                PaymentState::Captured,
            )
            .map(|_| ()),
            o.begin_payment(at, rng, draft(PaymentKind::Other(text.into()), ""))
                .map(|_| ()),
            PaymentKind::other(text).map(|_| ()),
        ],
        TextField::PaymentReference => vec![
            o.add_payment(
                at,
                rng,
                draft(PaymentKind::Cash, text),
                PaymentState::Captured,
            )
            .map(|_| ()),
            o.begin_payment(at, rng, draft(PaymentKind::GiftCard, text))
                .map(|_| ()),
        ],
        TextField::TransitionReference => vec![
            o.authorize_payment(at, rng, f.payment, text),
            o.advance_payment(at, rng, f.payment, PaymentState::Voided, Some(text)),
        ],
        TextField::AckNote => vec![f.closed.acknowledge_late_edit(at, rng, &f.late, text)],
    }
}

/// Completes the open order's sale with a final payment of `kind` and `reference`.
fn close_with(f: &mut Fixture, kind: &str, reference: &str) -> Result<(), ModelError> {
    let at = f.t.tick();
    let last = PaymentDraft {
        kind: PaymentKind::Other(kind.into()),
        amount: 1_000_000,
        reference: reference.into(),
    };
    f.open
        .complete_sale(at, &mut f.t.rng, Some(FinalPayment::New(last)))
        .map(|_| ())
}

proptest! {
    #[test]
    fn a_card_number_is_refused_wherever_and_however_it_is_written(e in embedded()) {
        prop_assert!(find_card_number(&e.text).is_some(), "{:?}", e.text);
        let mut f = fixture();
        let (open, closed) = (f.open.heads(), f.closed.heads());
        for field in TextField::ALL {
            let ascii: String = e.digits.iter().map(|d| char::from(b'0' + d)).collect();
            if field == TextField::Sku && e.text == ascii && is_gtin(&ascii) {
                // A barcode sku: the documented exception.
                prop_assert!(check_free_text(field, &e.text).is_ok());
                continue;
            }
            let checked = check_free_text(field, &e.text);
            if e.text.len() <= field.max_bytes() {
                prop_assert!(
                    matches!(checked, Err(ModelError::CardNumber { .. })),
                    "{:?} in {:?}: {:?}", e.text, field, checked
                );
            } else {
                prop_assert!(checked.is_err());
            }
            for result in write_everywhere(&mut f, field, &e.text) {
                prop_assert!(result.is_err(), "{:?} written into {:?}", e.text, field);
            }
        }
        prop_assert!(close_with(&mut f, "voucher", &e.text).is_err());
        prop_assert!(close_with(&mut f, &e.text, "").is_err());
        prop_assert_eq!(f.open.heads(), open, "refusals write nothing");
        prop_assert_eq!(f.closed.heads(), closed);
    }

    #[test]
    fn masked_numbers_and_ordinary_text_are_accepted(
        masked in masked_reference(),
        words in prop::collection::vec(("[A-Za-zÀ-ÿ'!?()]{1,10}", prop::option::of(0u32..1_000_000)), 0..12),
        kind in "[A-Za-zé_-]{1,8}( [A-Za-z0-9_-]{1,8}){0,2}",
    ) {
        let text = words
            .iter()
            .map(|(w, n)| match n {
                Some(n) => format!("{w} {n}"),
                None => w.clone(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        prop_assert!(!holds_card_number(&masked), "{:?}", masked);
        prop_assert!(!holds_card_number(&text), "{:?}", text);
        let mut f = fixture();
        for field in TextField::ALL {
            let value = match field {
                TextField::PaymentReference | TextField::TransitionReference => &masked,
                TextField::PaymentKind => &kind,
                _ => &text,
            };
            let expect_ok = field != TextField::PaymentKind || !holds_card_number(value);
            prop_assert_eq!(check_free_text(field, value).is_ok(), expect_ok, "{:?} {:?}", field, value);
            let before = f.open.doc().clone();
            let before_closed = f.closed.doc().clone();
            let results = write_everywhere(&mut f, field, value);
            for r in results {
                prop_assert_eq!(r.is_ok(), expect_ok, "{:?} {:?}: {:?}", field, value, r);
            }
            for (b, o) in [(&before, &f.open), (&before_closed, &f.closed)] {
                validate(b, o.doc(), &f.t.author()).unwrap();
                let loaded = Order::load(&o.save(), o.writer().clone()).unwrap();
                prop_assert_eq!(loaded.view().unwrap(), o.view().unwrap());
            }
        }
        let before = f.open.doc().clone();
        let closed = close_with(&mut f, &kind, &masked);
        prop_assert_eq!(closed.is_ok(), !holds_card_number(&kind), "{:?}", closed);
        validate(&before, f.open.doc(), &f.t.author()).unwrap();
        let v = f.open.view().unwrap();
        prop_assert!(v.lines.iter().any(|l| l.note == text && l.sku == "menu"));
        prop_assert!(v.payments.iter().any(|p| p.reference == masked));
        if !holds_card_number(&kind) {
            prop_assert_eq!(v.status, OrderStatus::Done);
            prop_assert!(v.payments.iter().any(|p| p.kind == kind));
        }
    }
}

/// A masked card reference as terminals print them, sometimes after an authorisation code.
fn masked_reference() -> impl Strategy<Value = String> {
    let mask = prop::sample::select(vec!['*', 'X', 'x', '•', '#']);
    let form = prop_oneof![
        // 411111******1111
        ("[0-9]{6}", mask.clone(), 2usize..=9, "[0-9]{4}")
            .prop_map(|(bin, m, n, last)| format!("{bin}{}{last}", m.to_string().repeat(n))),
        // **** **** **** 1111
        (mask.clone(), "[0-9]{4}").prop_map(|(m, last)| {
            let group = m.to_string().repeat(4);
            format!("{group} {group} {group} {last}")
        }),
        // XXXX-1111
        (mask, "[0-9]{4}").prop_map(|(m, last)| format!("{}-{last}", m.to_string().repeat(4))),
    ];
    (prop::option::of("(AUTH )?[0-9]{6}"), form).prop_map(|(auth, form)| match auth {
        Some(a) => format!("{a} {form}"),
        None => form,
    })
}

#[test]
fn the_generated_numbers_are_card_numbers() {
    // Known test PANs: the generator's check digit agrees with them.
    for pan in [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
    ] {
        let digits: Vec<u8> = pan.bytes().map(|b| b - b'0').collect();
        let (body, check) = digits.split_at(digits.len() - 1);
        assert_eq!(check_digit(body), check[0], "{pan}");
        assert!(holds_card_number(pan));
    }
}

/// A raw change (bypassing the typed API) that writes `text` into `field` of the fixture's
/// orders; returns the relay's copy before and after, to be judged by the policy.
fn forge_text(f: &mut Fixture, field: TextField, text: &str) -> (Automerge, Automerge) {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT, ReadDoc, ScalarValue};
    let at = f.t.tick();
    let me = f.t.device.to_string();
    let order = if field == TextField::AckNote {
        &f.closed
    } else {
        &f.open
    };
    let before = order.doc().clone();
    let mut doc = before.clone().with_actor(f.t.writer.actor.clone());
    let get = |doc: &Automerge, o: &automerge::ObjId, k: &str| doc.get(o, k).unwrap().unwrap().1;
    let lines = get(&doc, &ROOT, "lines");
    let payments = get(&doc, &ROOT, "payments");
    let acks = get(&doc, &ROOT, "acks");
    let line = doc.get(&lines, f.line.to_string()).unwrap().map(|(_, o)| o);
    let payment_tr = doc
        .get(&payments, f.payment.to_string())
        .unwrap()
        .map(|(_, p)| get(&doc, &p, "transitions"));
    let fresh = EntryId::generate(at, &mut f.t.rng).to_string();
    let ts = ScalarValue::Timestamp(at.0);
    let mut tx = doc.transaction();
    let put_str = |tx: &mut automerge::transaction::Transaction<'_>,
                   o: &automerge::ObjId,
                   k: &str,
                   v: &str| {
        tx.put(o, k, v).unwrap();
    };
    match field {
        TextField::Sku | TextField::LineName | TextField::Modifier => {
            let l = tx.put_object(&lines, fresh.as_str(), ObjType::Map).unwrap();
            put_str(
                &mut tx,
                &l,
                "sku",
                if field == TextField::Sku { text } else { "sku" },
            );
            put_str(
                &mut tx,
                &l,
                "name",
                if field == TextField::LineName {
                    text
                } else {
                    "name"
                },
            );
            tx.put(&l, "unit_price", 100i64).unwrap();
            tx.put(&l, "qty", ScalarValue::counter(1)).unwrap();
            let m = tx.put_object(&l, "modifiers", ObjType::List).unwrap();
            if field == TextField::Modifier {
                tx.insert(&m, 0, text).unwrap();
            }
            put_str(&mut tx, &l, "note", "");
            put_str(&mut tx, &l, "created_by", &me);
            tx.put(&l, "created_at", ts.clone()).unwrap();
        }
        TextField::LineNote => put_str(&mut tx, line.as_ref().unwrap(), "note", text),
        TextField::PaymentKind | TextField::PaymentReference => {
            let p = tx
                .put_object(&payments, fresh.as_str(), ObjType::Map)
                .unwrap();
            let kind = if field == TextField::PaymentKind {
                text
            } else {
                "gift_card"
            };
            let reference = if field == TextField::PaymentReference {
                text
            } else {
                ""
            };
            put_str(&mut tx, &p, "kind", kind);
            tx.put(&p, "amount", 100i64).unwrap();
            put_str(&mut tx, &p, "currency", "EUR");
            put_str(&mut tx, &p, "reference", reference);
            put_str(&mut tx, &p, "created_by", &me);
            tx.put(&p, "created_at", ts.clone()).unwrap();
            let tr = tx.put_object(&p, "transitions", ObjType::Map).unwrap();
            let tid = format!("{}", EntryId::generate(at, &mut f.t.rng));
            let e = tx.put_object(&tr, tid.as_str(), ObjType::Map).unwrap();
            put_str(&mut tx, &e, "state", "pending");
            tx.put(&e, "at", ts.clone()).unwrap();
            put_str(&mut tx, &e, "by", &me);
        }
        TextField::TransitionReference => {
            let e = tx
                .put_object(payment_tr.as_ref().unwrap(), fresh.as_str(), ObjType::Map)
                .unwrap();
            put_str(&mut tx, &e, "state", "authorized");
            tx.put(&e, "at", ts.clone()).unwrap();
            put_str(&mut tx, &e, "by", &me);
            put_str(&mut tx, &e, "reference", text);
        }
        TextField::AckNote => {
            let e = tx.put_object(&acks, fresh.as_str(), ObjType::Map).unwrap();
            put_str(&mut tx, &e, "edit", &f.late);
            put_str(&mut tx, &e, "by", &me);
            tx.put(&e, "at", ts.clone()).unwrap();
            put_str(&mut tx, &e, "note", text);
        }
    }
    tx.commit();
    (before, doc)
}

proptest! {
    #[test]
    fn the_policy_refuses_a_card_number_in_any_free_text_field(e in embedded()) {
        let mut f = fixture();
        for field in TextField::ALL {
            let ascii: String = e.digits.iter().map(|d| char::from(b'0' + d)).collect();
            if field == TextField::Sku && e.text == ascii && is_gtin(&ascii) {
                continue;
            }
            let (before, after) = forge_text(&mut f, field, &e.text);
            let verdict = validate(&before, &after, &f.t.author());
            let card = matches!(
                verdict,
                Err(PolicyViolation::CardNumberInText(_) | PolicyViolation::CardNumberInReference(_))
            );
            // A text longer than the field allows may be refused for its length instead.
            prop_assert!(
                card || (e.text.len() > field.max_bytes() && verdict.is_err()),
                "{:?} in {:?}: {:?}", e.text, field, verdict
            );
        }
    }
}

#[test]
fn the_forged_text_changes_pass_the_policy_with_ordinary_text() {
    // The forgery itself is well formed: with harmless text every field passes.
    let mut f = fixture();
    for field in TextField::ALL {
        let text = if field == TextField::PaymentKind {
            "voucher"
        } else {
            "no onions"
        };
        let (before, after) = forge_text(&mut f, field, text);
        assert_eq!(validate(&before, &after, &f.t.author()), Ok(1), "{field:?}");
    }
}
