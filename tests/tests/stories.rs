//! The POS team's problem stories (`/work/shared/seed/thread-en.md`), one test each, played
//! end to end on replicas of one order: terminals editing offline, the relay judging what it
//! receives with the policy, and every replica converging on the same view after a merge.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use automerge::{Automerge, ROOT, ReadDoc};
use crdt_model::schema::keys;
use crdt_model::*;

const T0: i64 = 1_700_000_000_000;

/// A terminal (or the relay): a device identity, its own entropy and clock.
struct Term {
    device: DeviceId,
    writer: Writer,
    rng: SplitMix64,
    now: i64,
    role: Role,
}

impl Term {
    fn device(seed: u64) -> Self {
        Self::with_role(seed, Role::Device)
    }

    fn relay(seed: u64) -> Self {
        Self::with_role(seed, Role::Relay)
    }

    fn with_role(seed: u64, role: Role) -> Self {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        Self {
            device,
            writer: Writer::new(device, 1),
            rng,
            now: T0,
            role,
        }
    }

    fn tick(&mut self) -> Timestamp {
        self.now += 1_000;
        Timestamp(self.now)
    }

    fn author(&self) -> Author {
        Author {
            device: self.device,
            store: store(),
            role: self.role,
            seal: None,
            vouched: Default::default(),
        }
    }

    fn create(&mut self) -> Order {
        let at = self.tick();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: store(),
            currency: eur(),
        };
        Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap()
    }

    /// This terminal's replica of `other` (as if fetched through the relay).
    fn replica(&self, other: &Order) -> Order {
        Order::load(&other.save(), self.writer.clone()).unwrap()
    }

    fn add_line(&mut self, o: &mut Order, name: &str, price: i64, qty: i64) -> LineId {
        let at = self.tick();
        o.add_line(
            at,
            &mut self.rng,
            LineDraft {
                sku: name.to_lowercase(),
                name: name.into(),
                unit_price: price,
                quantity: qty,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn pay(&mut self, o: &mut Order, kind: PaymentKind, amount: i64) -> PaymentId {
        let at = self.tick();
        o.add_payment(
            at,
            &mut self.rng,
            draft(kind, amount),
            PaymentState::Captured,
        )
        .unwrap()
    }

    /// A card payment through the terminal: pending, authorised, captured.
    fn card(&mut self, o: &mut Order, amount: i64) -> PaymentId {
        let p = self.card_authorized(o, amount);
        let at = self.tick();
        o.capture_payment(at, &mut self.rng, p).unwrap();
        p
    }

    /// A card payment authorised by the terminal but not captured yet.
    fn card_authorized(&mut self, o: &mut Order, amount: i64) -> PaymentId {
        let at = self.tick();
        let p = o
            .begin_payment(at, &mut self.rng, draft(PaymentKind::CardTerminal, amount))
            .unwrap();
        let at = self.tick();
        o.authorize_payment(at, &mut self.rng, p, "AUTH 482913")
            .unwrap();
        p
    }

    fn complete_with_cash(&mut self, o: &mut Order, amount: i64) -> PaymentId {
        let at = self.tick();
        let last = FinalPayment::New(draft(PaymentKind::Cash, amount));
        o.complete_sale(at, &mut self.rng, Some(last))
            .unwrap()
            .expect("a final payment was recorded")
    }

    fn set_status(&mut self, o: &mut Order, status: ActiveStatus) {
        let at = self.tick();
        o.set_status(at, &mut self.rng, status).unwrap();
    }

    fn set_status_any(&mut self, o: &mut Order, status: OrderStatus) {
        let at = self.tick();
        o.set_status_any(at, &mut self.rng, status).unwrap();
    }

    fn delete(&mut self, o: &mut Order) {
        let at = self.tick();
        o.delete(at, &mut self.rng).unwrap();
    }
}

fn store() -> StoreId {
    StoreId::new("store-1").unwrap()
}

fn eur() -> Currency {
    Currency::new("EUR").unwrap()
}

fn draft(kind: PaymentKind, amount: i64) -> PaymentDraft {
    PaymentDraft {
        kind,
        amount,
        reference: String::new(),
    }
}

/// Two-way merge so both replicas hold the same changes.
fn sync(a: &mut Order, b: &mut Order) {
    a.merge(b).unwrap();
    b.merge(a).unwrap();
}

/// Every replica holds the same changes and shows the same order, byte for byte.
fn assert_converged(replicas: &[&Order]) {
    let (first, rest) = replicas.split_first().expect("at least one replica");
    let mut heads = first.heads();
    heads.sort();
    let view = first.view().unwrap();
    for other in rest {
        let mut h = other.heads();
        h.sort();
        assert_eq!(h, heads, "replicas hold different changes");
        assert_eq!(
            other.view().unwrap(),
            view,
            "replicas show different orders"
        );
        assert_eq!(
            other.view().unwrap().to_json().unwrap(),
            view.to_json().unwrap()
        );
    }
}

/// The raw status log, read straight from the document.
fn status_log(o: &Order) -> Vec<(StatusEntry, DeviceId)> {
    let doc = o.doc();
    let (_, log) = doc.get(ROOT, keys::STATUS).unwrap().unwrap();
    doc.keys(&log)
        .map(|k| {
            let (_, e) = doc.get(&log, k.as_str()).unwrap().unwrap();
            let field = |f: &str| doc.get(&e, f).unwrap().unwrap().0;
            let entry = StatusEntry {
                status: field(keys::STATUS).as_str().unwrap().parse().unwrap(),
                clock: field(keys::CLOCK).as_u64().unwrap(),
                id: k.parse().unwrap(),
            };
            let by = field(keys::BY).as_str().unwrap().parse().unwrap();
            (entry, by)
        })
        .collect()
}

fn late_kinds(v: &OrderView) -> Vec<LateEditKind> {
    let mut kinds: Vec<LateEditKind> = v.late_edits.iter().map(|e| e.kind).collect();
    kinds.sort();
    kinds
}

fn payment(v: &OrderView, id: PaymentId) -> &PaymentView {
    v.payments
        .iter()
        .find(|p| p.id == id)
        .expect("payment present")
}

fn line(v: &OrderView, id: LineId) -> &LineView {
    v.lines.iter().find(|l| l.id == id).expect("line counted")
}

/// The relay's judgement of what `incoming` adds to its stored copy `stored`.
fn relay_accepts(stored: &Automerge, incoming: &Order, author: &Author) -> usize {
    let mut after = stored.clone();
    after.merge(&mut incoming.doc().clone()).unwrap();
    validate(stored, &after, author).unwrap()
}

/// Story: "An order can be paid in several sittings rather than at once ... the user may pay
/// part of it and then come back and add more to it."
#[test]
fn order_paid_in_two_sittings_with_items_added_between() {
    let mut a = Term::device(1);
    let mut b = Term::device(2);
    let mut on_a = a.create();
    let pizza = a.add_line(&mut on_a, "Pizza", 1_200, 1);
    let mut on_b = b.replica(&on_a);

    // First sitting on A: a partial cash payment.
    let first = a.pay(&mut on_a, PaymentKind::Cash, 500);
    // Meanwhile the guests order more on B.
    let cola = b.add_line(&mut on_b, "Cola", 300, 2);
    let tiramisu = b.add_line(&mut on_b, "Tiramisu", 450, 1);

    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.status, OrderStatus::InProgress);
    assert_eq!(v.lines.len(), 3);
    assert_eq!(v.totals.total, 1_200 + 600 + 450);
    assert_eq!(v.totals.paid, 500);
    assert_eq!(v.totals.balance_due, 1_750);
    assert_converged(&[&on_a, &on_b]);

    // Second sitting on A: the old balance is no longer enough to close.
    let at = a.tick();
    let short = FinalPayment::New(draft(PaymentKind::CardTerminal, 700));
    assert!(matches!(
        on_a.complete_sale(at, &mut a.rng, Some(short)),
        Err(ModelError::BalanceDue {
            due_minor: 1_050,
            ..
        })
    ));
    let at = a.tick();
    let last = FinalPayment::New(draft(PaymentKind::CardTerminal, 1_750));
    let second = on_a
        .complete_sale(at, &mut a.rng, Some(last))
        .unwrap()
        .unwrap();

    sync(&mut on_a, &mut on_b);
    let v = on_b.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.status_by, a.device);
    assert_eq!(v.totals.total, 2_250);
    assert_eq!(v.totals.paid, 2_250);
    assert_eq!(v.totals.balance_due, 0);
    assert_eq!(v.totals.change_due, 0);
    assert_eq!(v.payments.len(), 2);
    assert_eq!(payment(&v, first).state, PaymentState::Captured);
    assert_eq!(payment(&v, first).amount, 500);
    assert_eq!(payment(&v, second).state, PaymentState::Captured);
    assert_eq!(payment(&v, second).amount, 1_750);
    assert_eq!(line(&v, pizza).line_total, 1_200);
    assert_eq!(line(&v, cola).line_total, 600);
    assert_eq!(line(&v, tiramisu).line_total, 450);
    assert!(v.late_edits.is_empty(), "{:?}", v.late_edits);
    assert!(v.conflicts.is_empty(), "{:?}", v.conflicts);
    assert_converged(&[&on_a, &on_b]);

    // Closed: B can no longer add to it.
    let at = b.tick();
    let more = LineDraft {
        name: "Coffee".into(),
        unit_price: 250,
        quantity: 1,
        ..Default::default()
    };
    assert!(matches!(
        on_b.add_line(at, &mut b.rng, more),
        Err(ModelError::OrderClosed {
            status: OrderStatus::Done
        })
    ));
}

/// Story: "The sale cannot be sent to the server before the order itself has been sent ... its
/// transactions live only inside the order, and the server drops them." Here the whole order is
/// created, paid and sold offline, and the relay's first sight of it keeps every payment.
#[test]
fn sale_recorded_while_the_order_was_never_sent() {
    let mut t = Term::device(10);
    let mut relay = Term::relay(11);

    let mut device = t.create();
    t.add_line(&mut device, "Burger", 1_250, 1);
    t.add_line(&mut device, "Fries", 550, 2);
    let card = t.card(&mut device, 1_000);
    let gift = t.pay(&mut device, PaymentKind::GiftCard, 500);
    let cash = t.complete_with_cash(&mut device, 1_000);
    assert_eq!(device.number().unwrap(), None, "never sent: no number yet");
    let on_device = device.view().unwrap();
    assert_eq!(on_device.status, OrderStatus::Done);
    assert_eq!(on_device.totals.total, 2_350);
    assert_eq!(on_device.totals.paid, 2_500);
    assert_eq!(on_device.totals.change_due, 150);

    // First sync: the relay has never seen the order and judges every change.
    let empty = Automerge::new();
    let all = device.doc().get_changes(&[]).len();
    assert_eq!(all, 8, "create, 2 lines, card x3, gift card, sale");
    assert_eq!(relay_accepts(&empty, &device, &t.author()), all);
    let mut stored = empty.clone();
    stored.merge(&mut device.doc().clone()).unwrap();
    let mut at_relay = Order::from_doc(stored, relay.writer.clone()).unwrap();

    let v = at_relay.view().unwrap();
    assert_eq!(v, on_device, "the relay gets the order exactly as sold");
    assert_eq!(v.payments.len(), 3, "no transaction is dropped");
    for p in [card, gift, cash] {
        assert_eq!(payment(&v, p).state, PaymentState::Captured);
    }
    assert_eq!(payment(&v, card).history.len(), 3);
    assert_eq!(payment(&v, card).reference, "AUTH 482913");
    assert_eq!(v.totals.paid, 2_500);

    // The relay hands out the number; its policy accepts it from the relay on a closed order.
    let before = at_relay.doc().clone();
    let at = relay.tick();
    assert!(at_relay.assign_number(at, OrderNumber(1_042)).unwrap());
    assert_eq!(validate(&before, at_relay.doc(), &relay.author()), Ok(1));
    // The same change from a device would be refused.
    let as_device = Author {
        role: Role::Device,
        ..relay.author()
    };
    assert!(matches!(
        validate(&before, at_relay.doc(), &as_device),
        Err(PolicyViolation::NumberWrittenByDevice)
    ));

    // The number syncs back.
    sync(&mut device, &mut at_relay);
    let v = device.view().unwrap();
    assert_eq!(v.number, Some(1_042));
    assert_eq!(device.number().unwrap(), Some(OrderNumber(1_042)));
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.totals, on_device.totals);
    assert!(v.late_edits.is_empty(), "the number is no late edit");
    assert!(v.conflicts.is_empty());
    assert_converged(&[&device, &at_relay]);
}

/// Story: "You cannot first close the order and then make the sale (to hide it from active
/// orders at once): the old server answers 423 Locked." Here the final payment and Done are one
/// change: nobody ever sees one without the other.
#[test]
fn close_and_sale_are_one_atomic_change() {
    let mut t = Term::device(20);
    let other = Term::device(21);
    let mut o = t.create();
    t.add_line(&mut o, "Steak", 2_400, 1);
    let gift = t.pay(&mut o, PaymentKind::GiftCard, 900);
    let card = t.card_authorized(&mut o, 1_500);
    let mut peer = other.replica(&o);
    let v = peer.view().unwrap();
    assert_eq!(v.status, OrderStatus::InProgress);
    assert_eq!(payment(&v, card).state, PaymentState::Authorized);
    assert_eq!(v.totals.balance_due, 1_500);

    let heads_before = o.heads();
    let count_before = o.doc().get_changes(&[]).len();
    let at = t.tick();
    let paid_with = o
        .complete_sale(at, &mut t.rng, Some(FinalPayment::Capture(card)))
        .unwrap();
    assert_eq!(paid_with, Some(card));
    assert_eq!(o.doc().get_changes(&[]).len(), count_before + 1);

    let new = o.doc().get_changes(&heads_before);
    assert_eq!(new.len(), 1, "capture and Done are a single change");
    let mut deps = new[0].deps().to_vec();
    deps.sort();
    let mut expected_deps = heads_before.clone();
    expected_deps.sort();
    assert_eq!(deps, expected_deps);

    // A replica that receives only that change sees the capture and the close together.
    peer.apply_changes(new).unwrap();
    let v = peer.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(payment(&v, card).state, PaymentState::Captured);
    assert_eq!(payment(&v, gift).state, PaymentState::Captured);
    assert_eq!(v.totals.paid, 2_400);
    assert_eq!(v.totals.balance_due, 0);
    assert!(v.late_edits.is_empty());
    assert_converged(&[&o, &peer]);

    // Replaying the history change by change: Done never shows with a balance due.
    let mut replay = Automerge::new();
    let mut seen_done = 0;
    for change in o.doc().get_changes(&[]) {
        replay.apply_changes([change]).unwrap();
        let v = Order::from_doc(replay.clone(), other.writer.clone())
            .unwrap()
            .view()
            .unwrap();
        if v.status == OrderStatus::Done {
            seen_done += 1;
            assert_eq!(v.totals.balance_due, 0);
            assert_eq!(payment(&v, card).state, PaymentState::Captured);
        } else {
            assert!(
                v.payments
                    .iter()
                    .all(|p| p.id != card || p.state < PaymentState::Captured)
            );
        }
    }
    assert_eq!(seen_done, 1, "only the last prefix is Done");
}

/// Story: "the user may delete the order" while another terminal, offline, is taking a card
/// payment for it.
#[test]
fn delete_concurrent_with_a_payment() {
    // A deletes while B captures a card payment.
    let mut a = Term::device(30);
    let mut b = Term::device(31);
    let mut on_a = a.create();
    a.add_line(&mut on_a, "Salad", 1_000, 1);
    let mut on_b = b.replica(&on_a);
    a.delete(&mut on_a);
    let card = b.card(&mut on_b, 1_000);
    // The relay accepts the payment: B had not seen the delete.
    assert_eq!(relay_accepts(on_a.doc(), &on_b, &b.author()), 3);

    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.status, OrderStatus::Deleted);
    assert_eq!(v.status_by, a.device);
    assert_eq!(v.payments.len(), 1);
    assert_eq!(payment(&v, card).state, PaymentState::Captured);
    assert_eq!(v.totals.paid, 1_000, "money taken is never dropped");
    assert_eq!(v.totals.refunded, 0);
    assert_eq!(v.totals.total, 0, "a deleted order owes nothing");
    assert_eq!(v.totals.balance_due, 0);
    assert_eq!(v.totals.change_due, 1_000, "the captured money is due back");
    assert_eq!(late_kinds(&v), vec![LateEditKind::Payment]);
    let late = &v.late_edits[0];
    assert_eq!(late.id, format!("payment:{card}"));
    assert!(late.message.contains("refund needed"), "{}", late.message);
    assert!(!late.acknowledged);
    assert_converged(&[&on_a, &on_b]);

    // B, now seeing the delete, refunds: allowed on a closed order, and accepted by the relay.
    let stored = on_a.doc().clone();
    let at = b.tick();
    on_b.refund_payment(at, &mut b.rng, card).unwrap();
    assert_eq!(relay_accepts(&stored, &on_b, &b.author()), 1);
    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.status, OrderStatus::Deleted);
    assert_eq!(payment(&v, card).state, PaymentState::Refunded);
    assert_eq!(v.totals.paid, 0);
    assert_eq!(v.totals.refunded, 1_000);
    assert_eq!((v.totals.balance_due, v.totals.change_due), (0, 0));
    assert_eq!(late_kinds(&v), vec![LateEditKind::Payment]);
    assert!(
        v.late_edits[0].message.contains("settled"),
        "{}",
        v.late_edits[0].message
    );
    assert_converged(&[&on_a, &on_b]);

    // A deletes while B completes the sale: Done wins over Deleted.
    let mut a = Term::device(32);
    let mut b = Term::device(33);
    let mut on_a = a.create();
    a.add_line(&mut on_a, "Soup", 650, 2);
    let mut on_b = b.replica(&on_a);
    a.delete(&mut on_a);
    let cash = b.complete_with_cash(&mut on_b, 1_300);

    sync(&mut on_a, &mut on_b);
    let v = on_b.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.status_by, b.device);
    assert_eq!(payment(&v, cash).state, PaymentState::Captured);
    assert_eq!(v.totals.total, 1_300);
    assert_eq!(v.totals.paid, 1_300);
    assert_eq!(v.totals.balance_due, 0);
    assert_eq!(v.totals.change_due, 0);
    assert_eq!(late_kinds(&v), vec![LateEditKind::ConcurrentClose]);
    assert!(
        v.late_edits[0].message.contains("deleted"),
        "{}",
        v.late_edits[0].message
    );
    assert_converged(&[&on_a, &on_b]);
}

/// Story: "several devices change the same entity".
#[test]
fn two_terminals_editing_one_order() {
    let mut a = Term::device(40);
    let mut b = Term::device(41);
    let mut on_a = a.create();
    let burger = a.add_line(&mut on_a, "Burger", 900, 1);
    let mut on_b = b.replica(&on_a);

    // Concurrent adds both survive.
    let fries = a.add_line(&mut on_a, "Fries", 300, 1);
    let cola = b.add_line(&mut on_b, "Cola", 250, 1);
    sync(&mut on_a, &mut on_b);
    let v = on_a.view().unwrap();
    assert_eq!(v.lines.len(), 3);
    assert_eq!(v.totals.total, 900 + 300 + 250);
    assert_converged(&[&on_a, &on_b]);

    // "+1" on the same line on both terminals: both count.
    let at = a.tick();
    on_a.change_quantity(at, burger, 1).unwrap();
    let at = b.tick();
    on_b.change_quantity(at, burger, 1).unwrap();
    sync(&mut on_a, &mut on_b);
    let v = on_b.view().unwrap();
    assert_eq!(line(&v, burger).quantity, 3);
    assert_eq!(line(&v, burger).line_total, 2_700);
    assert!(v.conflicts.is_empty(), "{:?}", v.conflicts);
    assert_converged(&[&on_a, &on_b]);

    // Concurrent price overrides: one is shown, both are flagged.
    let at = a.tick();
    on_a.set_unit_price(at, fries, 350).unwrap();
    let at = b.tick();
    on_b.set_unit_price(at, fries, 380).unwrap();
    sync(&mut on_a, &mut on_b);
    let va = on_a.view().unwrap();
    let vb = on_b.view().unwrap();
    assert_eq!(va.conflicts, vb.conflicts);
    assert_eq!(va.conflicts.len(), 1, "{:?}", va.conflicts);
    let c = &va.conflicts[0];
    assert_eq!(c.subject, format!("line:{fries}.unit_price"));
    assert_eq!(c.values, vec!["350".to_owned(), "380".to_owned()]);
    let shown = line(&va, fries).unit_price;
    assert!(shown == 350 || shown == 380);
    assert_eq!(c.chosen, shown.to_string());
    assert_eq!(va.totals.total, 2_700 + shown + 250);
    assert_converged(&[&on_a, &on_b]);

    // Remove on A, quantity edit on B: the line stays removed.
    let at = a.tick();
    on_a.remove_line(at, cola).unwrap();
    let at = b.tick();
    on_b.change_quantity(at, cola, 2).unwrap();
    sync(&mut on_a, &mut on_b);
    let v = on_b.view().unwrap();
    assert!(v.lines.iter().all(|l| l.id != cola));
    let removed: Vec<LineId> = v.removed_lines.iter().map(|l| l.id).collect();
    assert_eq!(removed, vec![cola]);
    assert!(v.removed_lines[0].removed);
    assert_eq!(v.totals.total, 2_700 + shown);
    assert_eq!(v.status, OrderStatus::InProgress);
    assert!(v.late_edits.is_empty());
    assert_converged(&[&on_a, &on_b]);
    let at = b.tick();
    assert!(matches!(
        on_b.change_quantity(at, cola, 1),
        Err(ModelError::LineRemoved(l)) if l == cola
    ));
}

/// Story: "several devices change the same entity, and so does the server."
#[test]
fn server_edit_concurrent_with_a_device_edit() {
    let mut t = Term::device(50);
    let mut relay = Term::relay(51);
    let mut device = t.create();
    t.add_line(&mut device, "Pasta", 1_100, 1);
    assert_eq!(relay_accepts(&Automerge::new(), &device, &t.author()), 2);
    let mut at_relay = Order::from_doc(device.doc().clone(), relay.writer.clone()).unwrap();

    // Round 1: the relay numbers the order and moves it to delivery; the device, concurrently,
    // adds a line and delays it. Both status entries carry clock 2: the entry id decides.
    let stored = at_relay.doc().clone();
    let at = relay.tick();
    at_relay.assign_number(at, OrderNumber(7)).unwrap();
    relay.set_status_any(&mut at_relay, OrderStatus::InDelivery);
    assert_eq!(validate(&stored, at_relay.doc(), &relay.author()), Ok(2));
    let wine = t.add_line(&mut device, "Wine", 800, 1);
    t.set_status(&mut device, ActiveStatus::Delayed);
    assert_eq!(relay_accepts(at_relay.doc(), &device, &t.author()), 2);

    sync(&mut device, &mut at_relay);
    let v = device.view().unwrap();
    assert_eq!(v.number, Some(7), "the relay's edit survives");
    assert_eq!(line(&v, wine).name, "Wine", "the device's edit survives");
    assert_eq!(v.totals.total, 1_900);
    let log = status_log(&device);
    assert_eq!(log.len(), 3);
    let (winner, winner_by) = log
        .iter()
        .max_by_key(|(e, _)| (e.clock, e.id))
        .copied()
        .unwrap();
    assert_eq!(winner.clock, 2);
    assert_eq!(
        StatusLattice::from_entries(log.iter().map(|(e, _)| *e)).top(),
        Some(winner)
    );
    assert_eq!(v.status, winner.status);
    assert_eq!(v.status_by, winner_by);
    let conflict = v.conflicts.iter().find(|c| c.subject == "status").unwrap();
    assert_eq!(
        conflict.values,
        vec!["delayed".to_owned(), "in_delivery".to_owned()]
    );
    assert_eq!(conflict.chosen, winner.status.as_str());
    assert_converged(&[&device, &at_relay]);

    // Round 2: the device moves twice while the relay moves once: the higher clock wins,
    // whatever the entry ids.
    relay.set_status_any(&mut at_relay, OrderStatus::Delayed);
    t.set_status(&mut device, ActiveStatus::InProgress);
    t.set_status(&mut device, ActiveStatus::InDelivery);
    sync(&mut device, &mut at_relay);
    let v = at_relay.view().unwrap();
    assert_eq!(v.status, OrderStatus::InDelivery);
    assert_eq!(v.status_by, t.device);
    let clocks: Vec<u64> = status_log(&at_relay)
        .iter()
        .filter(|(e, _)| e.status == v.status)
        .map(|(e, _)| e.clock)
        .collect();
    assert!(clocks.contains(&4), "{clocks:?}");
    assert!(v.conflicts.is_empty(), "{:?}", v.conflicts);
    assert_converged(&[&device, &at_relay]);

    // Round 3: the device sells while the relay sets InDelivery: Done wins.
    let stored = at_relay.doc().clone();
    relay.set_status_any(&mut at_relay, OrderStatus::InDelivery);
    assert_eq!(validate(&stored, at_relay.doc(), &relay.author()), Ok(1));
    let cash = t.complete_with_cash(&mut device, 2_000);
    assert_eq!(relay_accepts(at_relay.doc(), &device, &t.author()), 1);
    sync(&mut device, &mut at_relay);
    let v = at_relay.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.status_by, t.device);
    assert_eq!(v.number, Some(7));
    assert_eq!(payment(&v, cash).state, PaymentState::Captured);
    assert_eq!(v.totals.total, 1_900);
    assert_eq!(v.totals.paid, 2_000);
    assert_eq!(v.totals.change_due, 100);
    assert_eq!(late_kinds(&v), vec![LateEditKind::StatusIgnored]);
    assert!(
        v.late_edits[0].message.contains("in_delivery"),
        "{}",
        v.late_edits[0].message
    );
    assert_converged(&[&device, &at_relay]);
}

/// Story: "After the sale ends the status must change, so that the order no longer shows among
/// the active orders and can no longer be edited" - even when a stale terminal disagrees.
#[test]
fn a_terminal_order_never_reverts() {
    let mut a = Term::device(60);
    let b = Term::device(61);
    let mut c = Term::device(62);
    let mut on_a = a.create();
    a.add_line(&mut on_a, "Ramen", 1_350, 1);
    let mut on_b = b.replica(&on_a);
    let mut stale = c.replica(&on_a);

    a.complete_with_cash(&mut on_a, 1_350);
    sync(&mut on_a, &mut on_b);
    assert_eq!(on_b.view().unwrap().status, OrderStatus::Done);

    // The stale terminal never saw the sale and keeps moving the order, with ever higher clocks.
    c.set_status(&mut stale, ActiveStatus::InDelivery);
    c.set_status(&mut stale, ActiveStatus::Delayed);
    c.set_status(&mut stale, ActiveStatus::InProgress);
    assert_eq!(stale.status().unwrap(), OrderStatus::InProgress);
    assert_eq!(relay_accepts(on_a.doc(), &stale, &c.author()), 3);

    on_a.merge(&mut stale).unwrap();
    assert_eq!(on_a.status().unwrap(), OrderStatus::Done);
    sync(&mut on_a, &mut on_b);
    sync(&mut on_a, &mut stale);
    for o in [&on_a, &on_b, &stale] {
        let v = o.view().unwrap();
        assert_eq!(v.status, OrderStatus::Done);
        assert_eq!(v.status_by, a.device);
        assert_eq!(v.totals.paid, 1_350);
        assert_eq!(v.totals.balance_due, 0);
        assert_eq!(late_kinds(&v), vec![LateEditKind::StatusIgnored; 3]);
        assert!(v.late_edits.iter().all(|e| e.message.contains("ignored")));
    }
    assert!(status_log(&on_a).iter().any(|(e, _)| e.clock == 4));
    assert_converged(&[&on_a, &on_b, &stale]);

    // Having seen the close, the stale terminal can no longer move it.
    let at = c.tick();
    assert!(matches!(
        stale.set_status(at, &mut c.rng, ActiveStatus::InDelivery),
        Err(ModelError::OrderClosed {
            status: OrderStatus::Done
        })
    ));

    // The same holds for a deleted order.
    let mut on_a = a.create();
    a.add_line(&mut on_a, "Gyoza", 600, 1);
    let mut stale = c.replica(&on_a);
    a.delete(&mut on_a);
    c.set_status(&mut stale, ActiveStatus::Delayed);
    sync(&mut on_a, &mut stale);
    let v = stale.view().unwrap();
    assert_eq!(v.status, OrderStatus::Deleted);
    assert_eq!(late_kinds(&v), vec![LateEditKind::StatusIgnored]);
    assert_converged(&[&on_a, &stale]);
}
