//! The policy against forged history: an adversarial property test.
//!
//! A realistic order is built by three terminals and the relay through the typed API (lines,
//! quantities, prices, notes, removals, payments in every state, active statuses, a close or a
//! delete, the relay's number, acknowledgements), with the terminals syncing through a relay
//! copy at random moments. Every honest push is judged by [`validate`] and must pass.
//!
//! Then one terminal turns attacker: it takes a random past state of the order (before the
//! close, at it, after it, or concurrent with it), and writes one or two changes of raw
//! Automerge operations at random paths (put, put_object, delete, increment, insert, splice,
//! and whole entries shaped like real ones), authored with its own device's actor. The relay
//! judges them. If the policy accepts, an oracle that does **not** use the model's reader or the
//! policy checks the promises, on the merged document, with plain Automerge reads:
//!
//! * the header, the root containers and the number are unchanged (the relay alone may add a
//!   number where there was none);
//! * every entry present before is still there, as the same object, with every field it had,
//!   except the fields a rule lets a device change (`unit_price`, `note`, `qty` of a line);
//! * so: a terminal order stays terminal, a payment keeps amount, currency, kind and reference,
//!   no payment state moves backwards, a removed line stays removed;
//! * everything new that names a device names the author;
//! * if the author had seen the order closed, the change only added void/refund transitions,
//!   acknowledgements or (the relay) the number;
//! * the merged order saves, loads and views.
//!
//! 1,000 cases by default (`FORGED_CASES`); the long run is `PROPTEST_CASES=100000`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{
    ActorId, Automerge, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value,
};
use common::*;
use crdt_model::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// The honest history.

/// One honest step by terminal `who` (0 = creator, 1 = another till, 2 = the future attacker).
#[derive(Clone, Debug)]
enum Step {
    AddLine {
        who: usize,
        price: i64,
        qty: i64,
    },
    Qty {
        who: usize,
        line: usize,
        delta: i64,
    },
    Price {
        who: usize,
        line: usize,
        price: i64,
    },
    Note {
        who: usize,
        line: usize,
    },
    Remove {
        who: usize,
        line: usize,
    },
    Pay {
        who: usize,
        kind: usize,
        amount: i64,
        state: usize,
    },
    Advance {
        who: usize,
        pay: usize,
        to: usize,
    },
    Status {
        who: usize,
        status: usize,
    },
    Close {
        who: usize,
    },
    Delete {
        who: usize,
    },
    Ack {
        who: usize,
    },
    Number,
}

#[derive(Clone, Debug)]
struct HonestStep {
    step: Step,
    /// Push the terminal's changes to the relay after the step.
    push: bool,
    /// Pull the relay's state into the terminal after the step.
    pull: bool,
}

const STATES: [PaymentState; 5] = [
    PaymentState::Pending,
    PaymentState::Authorized,
    PaymentState::Captured,
    PaymentState::Voided,
    PaymentState::Refunded,
];

fn step() -> impl Strategy<Value = Step> {
    let who = 0usize..3;
    prop_oneof![
        3 => (who.clone(), 0i64..2_000, 1i64..5).prop_map(|(who, price, qty)| Step::AddLine { who, price, qty }),
        1 => (who.clone(), any::<usize>(), -3i64..4).prop_map(|(who, line, delta)| Step::Qty { who, line, delta }),
        1 => (who.clone(), any::<usize>(), 0i64..3_000).prop_map(|(who, line, price)| Step::Price { who, line, price }),
        1 => (who.clone(), any::<usize>()).prop_map(|(who, line)| Step::Note { who, line }),
        1 => (who.clone(), any::<usize>()).prop_map(|(who, line)| Step::Remove { who, line }),
        3 => (who.clone(), 0usize..5, 1i64..3_000, 0usize..3).prop_map(|(who, kind, amount, state)| Step::Pay { who, kind, amount, state }),
        2 => (who.clone(), any::<usize>(), 0usize..5).prop_map(|(who, pay, to)| Step::Advance { who, pay, to }),
        1 => (who.clone(), 0usize..3).prop_map(|(who, status)| Step::Status { who, status }),
        1 => who.clone().prop_map(|who| Step::Close { who }),
        1 => who.clone().prop_map(|who| Step::Delete { who }),
        1 => who.prop_map(|who| Step::Ack { who }),
        1 => Just(Step::Number),
    ]
}

fn honest_step() -> impl Strategy<Value = HonestStep> {
    (step(), prop::bool::weighted(0.7), prop::bool::weighted(0.6))
        .prop_map(|(step, push, pull)| HonestStep { step, push, pull })
}

/// Three terminals, the relay's copy, and every state the relay's copy went through.
struct World {
    terms: Vec<Term>,
    replicas: Vec<Order>,
    relay_term: Term,
    relay: Automerge,
    /// Past heads that the relay holds every change of, in the order they occurred.
    history: Vec<Vec<ChangeHash>>,
    next_number: u64,
    /// What the relay's policy learnt of the order, carried from batch to batch as the relay
    /// does ([`OrderFacts`]); every verdict is checked against the one without it.
    facts: OrderFacts,
}

impl World {
    fn build(steps: &[HonestStep]) -> Self {
        let mut terms = vec![Term::new(1), Term::new(2), Term::new(3)];
        let first = terms[0].create();
        let relay = first.doc().clone();
        let replicas = vec![
            first.clone(),
            terms[1].replica(&first),
            terms[2].replica(&first),
        ];
        let _ = &mut terms;
        let mut w = World {
            terms,
            replicas,
            relay_term: Term::new(4),
            relay,
            history: Vec::new(),
            next_number: 1,
            facts: OrderFacts::default(),
        };
        w.history.push(w.relay.get_heads());
        for s in steps {
            let who = w.apply(&s.step);
            if let Some(who) = who {
                w.history.push(w.replicas[who].heads());
                if s.push {
                    w.push(who);
                }
                if s.pull {
                    w.pull(who);
                }
            }
            w.history.push(w.relay.get_heads());
        }
        // Only states whose changes the relay holds can be a base.
        let relay = w.relay.clone();
        w.history
            .retain(|h| h.iter().all(|c| relay.get_change_by_hash(c).is_some()));
        w.history.dedup();
        w
    }

    fn author(&self, who: usize) -> Author {
        self.terms[who].author()
    }

    fn relay_author(&self) -> Author {
        Author {
            device: self.relay_term.device,
            store: store(),
            role: Role::Relay,
            seal: None,
            vouched: Default::default(),
        }
    }

    /// Applies an honest step; returns the terminal that acted (None for the relay).
    fn apply(&mut self, step: &Step) -> Option<usize> {
        if let Step::Number = step {
            let mut o =
                Order::from_doc(self.relay.clone(), self.relay_term.writer.clone()).unwrap();
            if o.number().unwrap().is_none() {
                let at = self.relay_term.tick();
                o.assign_number(at, OrderNumber(self.next_number)).unwrap();
                self.next_number += 1;
                let after = o.doc().clone();
                let verdict = validate(&self.relay, &after, &self.relay_author());
                assert!(verdict.is_ok(), "the relay's number refused: {verdict:?}");
                self.judge_with_facts(&after, &self.relay_author(), &verdict);
                self.relay = after;
            }
            return None;
        }
        let who = step.who();
        typed_step(&mut self.terms[who], &mut self.replicas[who], step);
        Some(who)
    }

    /// The terminal's changes reach the relay, which judges them like an honest device's.
    fn push(&mut self, who: usize) {
        let mut after = self.relay.clone();
        after.merge(&mut self.replicas[who].doc().clone()).unwrap();
        // The relay and other terminals' changes the replica holds are the relay's already
        // (replicas only pull from the relay), so only the terminal's own changes are new.
        let verdict = validate(&self.relay, &after, &self.author(who));
        assert!(
            verdict.is_ok(),
            "an honest push by terminal {who} was refused: {verdict:?}"
        );
        self.judge_with_facts(&after, &self.author(who), &verdict);
        self.relay = after;
    }

    /// The verdict with the relay's carried facts must be `verdict`; they learn from it.
    fn judge_with_facts(
        &mut self,
        after: &Automerge,
        author: &Author,
        verdict: &Result<usize, PolicyViolation>,
    ) {
        let new = after.get_changes(&self.relay.get_heads());
        let with = validate_changes_with(&self.relay, after, &new, author, &mut self.facts);
        assert_eq!(&with, verdict, "the carried facts changed the verdict");
    }

    fn pull(&mut self, who: usize) {
        let changes = self
            .relay
            .get_changes(&self.replicas[who].heads())
            .into_iter()
            .collect::<Vec<_>>();
        self.replicas[who].apply_changes(changes).unwrap();
    }
}

impl Step {
    fn who(&self) -> usize {
        match *self {
            Step::AddLine { who, .. }
            | Step::Qty { who, .. }
            | Step::Price { who, .. }
            | Step::Note { who, .. }
            | Step::Remove { who, .. }
            | Step::Pay { who, .. }
            | Step::Advance { who, .. }
            | Step::Status { who, .. }
            | Step::Close { who }
            | Step::Delete { who }
            | Step::Ack { who } => who,
            Step::Number => 0,
        }
    }
}

/// One typed operation of a terminal on its replica; refusals by the typed API are ignored
/// (they leave no change).
fn typed_step(t: &mut Term, o: &mut Order, step: &Step) {
    match *step {
        Step::Number => {}
        Step::AddLine { price, qty, .. } => {
            let at = t.tick();
            let draft = LineDraft {
                sku: "sku-1".into(),
                name: "Burger".into(),
                unit_price: price,
                quantity: qty,
                modifiers: vec!["no onions".into()],
                note: String::new(),
            };
            let _ = o.add_line(at, &mut t.rng, draft);
        }
        Step::Qty { line, delta, .. } => {
            if let Some(l) = pick_line(o, line) {
                let at = t.tick();
                let _ = o.change_quantity(at, l, delta);
            }
        }
        Step::Price { line, price, .. } => {
            if let Some(l) = pick_line(o, line) {
                let at = t.tick();
                let _ = o.set_unit_price(at, l, price);
            }
        }
        Step::Note { line, .. } => {
            if let Some(l) = pick_line(o, line) {
                let at = t.tick();
                let _ = o.set_note(at, l, "well done");
            }
        }
        Step::Remove { line, .. } => {
            if let Some(l) = pick_line(o, line) {
                let at = t.tick();
                let _ = o.remove_line(at, l);
            }
        }
        Step::Pay {
            kind,
            amount,
            state,
            ..
        } => {
            let kind = [
                PaymentKind::Cash,
                PaymentKind::CardTerminal,
                PaymentKind::Check,
                PaymentKind::GiftCard,
                PaymentKind::Other("voucher".into()),
            ][kind]
                .clone();
            let reference = if kind == PaymentKind::CardTerminal {
                "****1111".to_owned()
            } else {
                String::new()
            };
            let at = t.tick();
            let draft = PaymentDraft {
                kind,
                amount,
                reference,
            };
            let _ = o.add_payment(at, &mut t.rng, draft, STATES[state]);
        }
        Step::Advance { pay, to, .. } => {
            let payments = match o.view() {
                Ok(v) => v.payments,
                Err(_) => return,
            };
            if !payments.is_empty() {
                let p = payments[pay % payments.len()].id;
                let at = t.tick();
                let _ = o.advance_payment(at, &mut t.rng, p, STATES[to], None);
            }
        }
        Step::Status { status, .. } => {
            let s = [
                ActiveStatus::InProgress,
                ActiveStatus::InDelivery,
                ActiveStatus::Delayed,
            ][status];
            let at = t.tick();
            let _ = o.set_status(at, &mut t.rng, s);
        }
        Step::Close { .. } => {
            let at = t.tick();
            let due = match o.view() {
                Ok(v) => v.totals.balance_due,
                Err(_) => return,
            };
            let last = (due > 0).then(|| {
                FinalPayment::New(PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: due,
                    reference: String::new(),
                })
            });
            let _ = o.complete_sale(at, &mut t.rng, last);
        }
        Step::Delete { .. } => {
            let at = t.tick();
            let _ = o.delete(at, &mut t.rng);
        }
        Step::Ack { .. } => {
            let edits = match o.view() {
                Ok(v) => v.late_edits,
                Err(_) => return,
            };
            if let Some(e) = edits.first() {
                let at = t.tick();
                let _ = o.acknowledge_late_edit(at, &mut t.rng, &e.id.clone(), "seen");
            }
        }
    }
}

fn pick_line(o: &Order, i: usize) -> Option<LineId> {
    let v = o.view().ok()?;
    let all: Vec<LineId> = v
        .lines
        .iter()
        .chain(&v.removed_lines)
        .chain(&v.late_lines)
        .map(|l| l.id)
        .collect();
    (!all.is_empty()).then(|| all[i % all.len()])
}

// ---------------------------------------------------------------------------------------------
// The forged changes.

/// A scalar the attacker writes: valid-looking for the field most of the time.
#[derive(Clone, Debug)]
enum Sc {
    Plausible,
    Str(usize),
    Int(i64),
    Uint(u64),
    Counter(i64),
    Ts(i64),
    Bool,
    Null,
    F64,
}

#[derive(Clone, Debug)]
enum KeyChoice {
    /// A key the object has in the relay's current copy (so maybe not at the base).
    Existing(usize),
    /// A field name of the schema.
    Field(usize),
    /// A fresh entry id.
    Fresh,
}

#[derive(Clone, Debug)]
enum Act {
    Put(Sc),
    MakeMap,
    MakeList,
    MakeText,
    Delete,
    Increment(i64),
    Insert(usize, Sc),
    Splice(usize),
    /// A whole entry shaped like the container's real ones, with `bias` choosing how honest
    /// its fields look.
    Entry {
        bias: u8,
        state: usize,
    },
}

#[derive(Clone, Debug)]
struct ForgedOp {
    /// Index into the objects of the base state (sorted by path).
    target: usize,
    key: KeyChoice,
    act: Act,
}

/// One forged change: raw operations, or an operation of the typed API made at a stale state
/// (a till that had not seen what happened since), which is what honest concurrency looks like.
#[derive(Clone, Debug)]
enum Forged {
    Raw(Vec<ForgedOp>),
    Typed(Step),
}

#[derive(Clone, Debug)]
struct Attack {
    /// Index into the honest history: the state the attacker pretends to have seen.
    base: usize,
    /// One to three changes, each built on the previous one.
    changes: Vec<Forged>,
    /// Forge as the relay instead of a terminal (the relay is trusted less than nothing: it
    /// still must not rewrite history).
    as_relay: bool,
}

const FIELDS: [&str; 31] = [
    "schema",
    "id",
    "store",
    "currency",
    "created_by",
    "created_at",
    "number",
    "lines",
    "payments",
    "status",
    "acks",
    "sku",
    "name",
    "unit_price",
    "qty",
    "modifiers",
    "note",
    "removed_by",
    "removed_at",
    "kind",
    "amount",
    "reference",
    "transitions",
    "state",
    "by",
    "at",
    "clock",
    "edit",
    "0",
    "",
    "extra",
];

const WORDS: [&str; 22] = [
    "done",
    "deleted",
    "in_progress",
    "in_delivery",
    "delayed",
    "pending",
    "authorized",
    "captured",
    "voided",
    "refunded",
    "cash",
    "card_terminal",
    "gift_card",
    "EUR",
    "USD",
    "",
    "4111111111111111",
    "store-1",
    "store-2",
    "****1111",
    "@attacker",
    "@victim",
];

fn sc() -> impl Strategy<Value = Sc> {
    prop_oneof![
        6 => Just(Sc::Plausible),
        2 => (0..WORDS.len()).prop_map(Sc::Str),
        1 => prop_oneof![Just(0i64), Just(-1), Just(1), Just(i64::MAX), any::<i64>(), 1i64..10_000].prop_map(Sc::Int),
        1 => prop_oneof![Just(0u64), Just(1), Just(u64::MAX), 1u64..100].prop_map(Sc::Uint),
        1 => (-5i64..10).prop_map(Sc::Counter),
        1 => (0i64..2_000_000_000_000).prop_map(Sc::Ts),
        1 => Just(Sc::Bool),
        1 => Just(Sc::Null),
        1 => Just(Sc::F64),
    ]
}

fn key_choice() -> impl Strategy<Value = KeyChoice> {
    prop_oneof![
        4 => any::<usize>().prop_map(KeyChoice::Existing),
        3 => (0..FIELDS.len()).prop_map(KeyChoice::Field),
        2 => Just(KeyChoice::Fresh),
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => sc().prop_map(Act::Put),
        1 => Just(Act::MakeMap),
        1 => Just(Act::MakeList),
        1 => Just(Act::MakeText),
        2 => Just(Act::Delete),
        2 => (-3i64..4).prop_map(Act::Increment),
        1 => (any::<usize>(), sc()).prop_map(|(i, s)| Act::Insert(i, s)),
        1 => any::<usize>().prop_map(Act::Splice),
        5 => (any::<u8>(), 0usize..5).prop_map(|(bias, state)| Act::Entry { bias, state }),
    ]
}

fn forged_op() -> impl Strategy<Value = ForgedOp> {
    (any::<usize>(), key_choice(), act()).prop_map(|(target, key, act)| ForgedOp {
        target,
        key,
        act,
    })
}

fn attack() -> impl Strategy<Value = Attack> {
    (
        any::<usize>(),
        prop::collection::vec(
            prop_oneof![
                3 => prop::collection::vec(forged_op(), 1..5).prop_map(Forged::Raw),
                2 => step().prop_map(Forged::Typed),
            ],
            1..4,
        ),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(base, changes, as_relay)| Attack {
            base,
            changes,
            as_relay,
        })
}

/// Every object of a document with its path, sorted by path.
fn objects(doc: &Automerge) -> Vec<(Vec<String>, ObjId, ObjType)> {
    let mut out = vec![(Vec::new(), ROOT, ObjType::Map)];
    let mut i = 0;
    while i < out.len() {
        let (path, obj, ty) = out[i].clone();
        i += 1;
        if matches!(ty, ObjType::Text) {
            continue;
        }
        for (prop, _) in props(doc, &obj, ty) {
            for (v, id) in doc.get_all(&obj, prop.clone()).unwrap() {
                if let Value::Object(t) = v {
                    let mut p = path.clone();
                    p.push(prop_str(&prop));
                    out.push((p, id, t));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn props(doc: &Automerge, obj: &ObjId, ty: ObjType) -> Vec<(Prop, ())> {
    match ty {
        ObjType::Map | ObjType::Table => doc.keys(obj).map(|k| (Prop::Map(k), ())).collect(),
        ObjType::List => (0..doc.length(obj)).map(|i| (Prop::Seq(i), ())).collect(),
        ObjType::Text => Vec::new(),
    }
}

fn prop_str(p: &Prop) -> String {
    match p {
        Prop::Map(k) => k.clone(),
        Prop::Seq(i) => format!("#{i}"),
    }
}

/// Values for the attacker's puts.
struct Ctx {
    me: String,
    victim: String,
    now: i64,
    counter: u64,
}

impl Ctx {
    fn scalar(&mut self, s: &Sc, field: &str, state: usize) -> ScalarValue {
        match s {
            Sc::Plausible => self.plausible(field, state),
            Sc::Str(i) => match WORDS[*i] {
                "@attacker" => ScalarValue::Str(self.me.clone().into()),
                "@victim" => ScalarValue::Str(self.victim.clone().into()),
                w => ScalarValue::Str(w.into()),
            },
            Sc::Int(i) => ScalarValue::Int(*i),
            Sc::Uint(u) => ScalarValue::Uint(*u),
            Sc::Counter(c) => ScalarValue::counter(*c),
            Sc::Ts(t) => ScalarValue::Timestamp(*t),
            Sc::Bool => ScalarValue::Boolean(true),
            Sc::Null => ScalarValue::Null,
            Sc::F64 => ScalarValue::F64(0.5),
        }
    }

    fn plausible(&mut self, field: &str, state: usize) -> ScalarValue {
        self.counter += 1;
        match field {
            "status" => ScalarValue::Str(
                ["in_progress", "done", "deleted", "delayed", "in_delivery"][state % 5].into(),
            ),
            "state" => ScalarValue::Str(STATES[state % 5].as_str().into()),
            "clock" => ScalarValue::Uint(1_000 + self.counter),
            "at" | "created_at" | "removed_at" => ScalarValue::Timestamp(self.now),
            "by" | "created_by" | "removed_by" => ScalarValue::Str(self.me.clone().into()),
            "amount" => ScalarValue::Int(100 * (state as i64 + 1)),
            "unit_price" => ScalarValue::Int(50),
            "qty" => ScalarValue::counter(1),
            "currency" => ScalarValue::Str("EUR".into()),
            "kind" => ScalarValue::Str("cash".into()),
            "reference" | "note" => ScalarValue::Str("".into()),
            "sku" | "name" => ScalarValue::Str("forged".into()),
            "edit" => ScalarValue::Str("line:x".into()),
            "number" => ScalarValue::Uint(1 + self.counter),
            "schema" => ScalarValue::Uint(1),
            _ => ScalarValue::Str("x".into()),
        }
    }
}

fn fresh_key(ctx: &mut Ctx) -> String {
    ctx.counter += 1;
    let mut rng = SplitMix64::new(ctx.counter.wrapping_mul(0x9E37_79B9));
    EntryId::generate(Timestamp(ctx.now), &mut rng).to_string()
}

/// Field lists of the entries of each root container.
fn entry_fields(container: &str) -> &'static [&'static str] {
    match container {
        "lines" => &[
            "sku",
            "name",
            "unit_price",
            "qty",
            "modifiers",
            "note",
            "created_by",
            "created_at",
        ],
        "payments" => &[
            "kind",
            "amount",
            "currency",
            "reference",
            "created_by",
            "created_at",
            "transitions",
        ],
        "transitions" => &["state", "at", "by"],
        "status" => &["status", "clock", "at", "by"],
        "acks" => &["edit", "by", "at", "note"],
        _ => &["state", "at", "by"],
    }
}

/// Writes one forged operation into the transaction; errors from Automerge (writing a key of a
/// list, etc.) just mean the attacker could not express that op.
fn forge_op(
    tx: &mut automerge::transaction::Transaction<'_>,
    objs: &[(Vec<String>, ObjId, ObjType)],
    relay: &Automerge,
    op: &ForgedOp,
    ctx: &mut Ctx,
) {
    let (path, obj, ty) = &objs[op.target % objs.len()];
    match ty {
        ObjType::Map | ObjType::Table => {
            let key = match &op.key {
                KeyChoice::Existing(i) => {
                    // Keys of the object at the same path in the relay's copy (the attacker
                    // has seen the order since, or guesses).
                    let mut keys: BTreeSet<String> = tx.keys(obj).collect();
                    if let Some(o) = resolve(relay, path) {
                        keys.extend(relay.keys(&o));
                    }
                    if keys.is_empty() {
                        fresh_key(ctx)
                    } else {
                        keys.iter().nth(i % keys.len()).unwrap().clone()
                    }
                }
                KeyChoice::Field(i) => FIELDS[*i].to_owned(),
                KeyChoice::Fresh => fresh_key(ctx),
            };
            let _ = match &op.act {
                Act::Put(s) => {
                    let v = ctx.scalar(s, &key, 0);
                    tx.put(obj, key.as_str(), v).map(|_| ())
                }
                Act::MakeMap => tx.put_object(obj, key.as_str(), ObjType::Map).map(|_| ()),
                Act::MakeList => tx.put_object(obj, key.as_str(), ObjType::List).map(|_| ()),
                Act::MakeText => tx.put_object(obj, key.as_str(), ObjType::Text).map(|_| ()),
                Act::Delete => tx.delete(obj, key.as_str()),
                Act::Increment(n) => tx.increment(obj, key.as_str(), *n),
                Act::Insert(..) | Act::Splice(_) => Ok(()),
                Act::Entry { bias, state } => {
                    forge_entry(tx, obj, path, &key, *bias, *state, ctx);
                    Ok(())
                }
            };
        }
        ObjType::List => {
            let len = tx.length(obj);
            let _ = match &op.act {
                Act::Insert(i, s) if len < 100 => {
                    let v = ctx.scalar(s, "modifier", 0);
                    tx.insert(obj, i % (len + 1), v)
                }
                Act::Entry { state, .. } if len < 100 => {
                    let v = ctx.plausible("modifier", 0);
                    tx.insert(obj, state % (len + 1), v)
                }
                Act::Put(s) if len > 0 => {
                    let v = ctx.scalar(s, "modifier", 0);
                    tx.put(obj, key_index(&op.key) % len, v)
                }
                Act::Delete if len > 0 => tx.delete(obj, key_index(&op.key) % len),
                Act::Increment(n) if len > 0 => tx.increment(obj, key_index(&op.key) % len, *n),
                Act::MakeMap => tx.insert_object(obj, 0, ObjType::Map).map(|_| ()),
                Act::Splice(i) if len > 0 => tx.splice(obj, i % len, 1, Vec::<ScalarValue>::new()),
                _ => Ok(()),
            };
        }
        ObjType::Text => {
            let len = tx.length(obj);
            let _ = tx.splice_text(obj, key_index(&op.key) % (len + 1), 0, "x");
        }
    }
}

fn key_index(k: &KeyChoice) -> usize {
    match k {
        KeyChoice::Existing(i) | KeyChoice::Field(i) => *i,
        KeyChoice::Fresh => 0,
    }
}

/// A whole entry at `key` of `obj`, shaped after the container it is in.
fn forge_entry(
    tx: &mut automerge::transaction::Transaction<'_>,
    obj: &ObjId,
    path: &[String],
    key: &str,
    bias: u8,
    state: usize,
    ctx: &mut Ctx,
) {
    let container = path.last().map(String::as_str).unwrap_or("");
    let Ok(entry) = tx.put_object(obj, key, ObjType::Map) else {
        return;
    };
    for (i, field) in entry_fields(container).iter().enumerate() {
        // Each bit of `bias` spoils one field (or leaves it out).
        let spoil = bias & (1 << (i % 8)) != 0 && bias.is_multiple_of(3);
        if spoil && bias.is_multiple_of(2) {
            continue;
        }
        match *field {
            "modifiers" => {
                let _ = tx.put_object(&entry, *field, ObjType::List);
            }
            "transitions" => {
                if let Ok(t) = tx.put_object(&entry, *field, ObjType::Map) {
                    let tid = fresh_key(ctx);
                    if let Ok(te) = tx.put_object(&t, tid.as_str(), ObjType::Map) {
                        for f in ["state", "at", "by"] {
                            let v = ctx.plausible(f, state % 3);
                            let _ = tx.put(&te, f, v);
                        }
                    }
                }
            }
            f => {
                let v = if spoil {
                    ctx.scalar(&Sc::Str(bias as usize % WORDS.len()), f, state)
                } else {
                    ctx.plausible(f, state)
                };
                let _ = tx.put(&entry, f, v);
            }
        }
    }
}

fn resolve(doc: &Automerge, path: &[String]) -> Option<ObjId> {
    let mut o = ROOT;
    for k in path {
        let prop: Prop = match k.strip_prefix('#') {
            Some(i) => Prop::Seq(i.parse().ok()?),
            None => Prop::Map(k.clone()),
        };
        o = match doc.get(&o, prop).ok()?? {
            (Value::Object(_), id) => id,
            _ => return None,
        };
    }
    Some(o)
}

// ---------------------------------------------------------------------------------------------
// The oracle: plain Automerge reads, none of the model's reader or policy.

/// Every visible value of a document, conflicts included: path -> set of (op id, value).
fn flatten(doc: &Automerge) -> BTreeMap<Vec<String>, BTreeSet<(String, String)>> {
    let mut out = BTreeMap::new();
    for (path, obj, ty) in objects(doc) {
        if matches!(ty, ObjType::Text) {
            out.insert(
                [path.clone(), vec!["#text".into()]].concat(),
                BTreeSet::from([(String::new(), doc.text(&obj).unwrap())]),
            );
            continue;
        }
        for (prop, _) in props(doc, &obj, ty) {
            let mut p = path.clone();
            p.push(prop_str(&prop));
            let vals = doc
                .get_all(&obj, prop)
                .unwrap()
                .into_iter()
                .map(|(v, id)| {
                    let v = match v {
                        Value::Object(t) => format!("object {t:?}"),
                        Value::Scalar(s) => format!("{:?}", s.as_ref()),
                    };
                    (id.to_string(), v)
                })
                .collect();
            out.insert(p, vals);
        }
    }
    out
}

/// Whether a field may be changed by a later change, by the rules (`docs/model.md`).
fn mutable(path: &[String]) -> bool {
    matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["lines", _, "unit_price" | "note" | "qty"]
    )
}

/// The status entries of a flattened document: entry id -> status word.
fn status_words(flat: &BTreeMap<Vec<String>, BTreeSet<(String, String)>>) -> Vec<String> {
    flat.iter()
        .filter(|(p, _)| p.len() == 3 && p[0] == "status" && p[2] == "status")
        .flat_map(|(_, v)| v.iter().map(|(_, s)| s.clone()))
        .collect()
}

fn terminal(flat: &BTreeMap<Vec<String>, BTreeSet<(String, String)>>) -> bool {
    status_words(flat)
        .iter()
        .any(|s| s.contains("\"done\"") || s.contains("\"deleted\""))
}

/// Checks the promises on `after` = `before` + the accepted forged changes.
fn oracle(
    before: &Automerge,
    after: &Automerge,
    changes: &[automerge::Change],
    author: &Author,
) -> Result<(), String> {
    let fb = flatten(before);
    let fa = flatten(after);
    let me = author.device.to_string();
    // Nothing that was there is gone or rewritten (bar the mutable line fields).
    for (path, vals) in &fb {
        if mutable(path) {
            if !fa.contains_key(path) {
                return Err(format!("{path:?} disappeared"));
            }
            continue;
        }
        match fa.get(path) {
            None => return Err(format!("{path:?} disappeared (was {vals:?})")),
            Some(now) if now != vals => {
                let removal = matches!(
                    path.last().map(String::as_str),
                    Some("removed_by" | "removed_at")
                ) && path.len() == 3
                    && vals.is_subset(now);
                if !removal {
                    return Err(format!("{path:?} changed from {vals:?} to {now:?}"));
                }
            }
            Some(_) => {}
        }
    }
    // New keys at the root: only the relay's number, and only where there was none.
    for path in fa.keys().filter(|p| p.len() == 1 && !fb.contains_key(*p)) {
        if !(path[0] == "number" && author.role == Role::Relay) {
            return Err(format!("new root key {path:?}"));
        }
    }
    // Everything new that names a device names the author (the relay may name anyone).
    if author.role == Role::Device {
        for (path, vals) in &fa {
            if fb.get(path) == Some(vals) {
                continue;
            }
            if matches!(
                path.last().map(String::as_str),
                Some("by" | "created_by" | "removed_by")
            ) {
                let old = fb.get(path).cloned().unwrap_or_default();
                for (id, v) in vals.difference(&old) {
                    if *v != format!("{:?}", ScalarValue::Str(me.clone().into())) {
                        return Err(format!("{path:?} = {v} ({id}) names another device"));
                    }
                }
            }
        }
    }
    if terminal(&fb) && !terminal(&fa) {
        return Err("a terminal order is no longer terminal".into());
    }
    // Had the author seen the close? Read at each change's dependencies, with plain reads;
    // then what that change alone did (the state before it, against the state after it).
    let mut cur = before.clone();
    for change in changes {
        let mut next = cur.clone();
        next.apply_changes([change.clone()])
            .map_err(|e| e.to_string())?;
        let deps = change.deps().to_vec();
        let seen_close = !deps.is_empty()
            && terminal(&flatten(&after.fork_at(&deps).map_err(|e| e.to_string())?));
        if seen_close {
            let (fc, fnext) = (flatten(&cur), flatten(&next));
            for (path, vals) in &fnext {
                if fc.get(path) == Some(vals) {
                    continue;
                }
                let p: Vec<&str> = path.iter().map(String::as_str).collect();
                let ok = match p.as_slice() {
                    ["number"] => author.role == Role::Relay,
                    ["acks", ..] => true,
                    ["payments", _, "transitions", tid] => {
                        !fc.contains_key(path) && !tid.is_empty()
                    }
                    ["payments", _, "transitions", _, "state"] => vals
                        .iter()
                        .all(|(_, v)| v.contains("\"voided\"") || v.contains("\"refunded\"")),
                    ["payments", _, "transitions", _, _] => !fc.contains_key(&path[..4]),
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "{path:?} = {vals:?} written by a change whose author had seen the close"
                    ));
                }
            }
        }
        cur = next;
    }
    // The merged order saves, loads and views, on a fresh replica too.
    let bytes = after.save();
    let loaded = Automerge::load(&bytes).map_err(|e| format!("reload: {e}"))?;
    view_of(&loaded).map_err(|e| format!("view: {e}"))?;
    view_of(after).map_err(|e| format!("view: {e}"))?;
    Ok(())
}

/// Builds the attack on the chosen past state and returns the forged changes.
fn forge(w: &World, attack: &Attack) -> (Vec<automerge::Change>, Author) {
    let base = &w.history[attack.base % w.history.len()];
    let (author, device) = if attack.as_relay {
        (w.relay_author(), w.relay_term.device)
    } else {
        (w.author(2), w.terms[2].device)
    };
    let mut ctx = Ctx {
        me: device.to_string(),
        victim: w.terms[0].device.to_string(),
        now: T0 + 10_000_000,
        counter: attack.base as u64,
    };
    let mut doc = w.relay.fork_at(base).unwrap();
    // A fresh epoch so the attacker's sequence numbers never clash with its earlier changes.
    let epoch = 0xA77A_C000 + (attack.base as u32 & 0xfff);
    let mut actor = device.0.as_bytes().to_vec();
    actor.extend_from_slice(&epoch.to_be_bytes());
    doc.set_actor(ActorId::from(actor));
    let mut out = Vec::new();
    let mut term = Term::new(0xA77A);
    term.device = device;
    term.writer = Writer::new(device, epoch);
    term.now = ctx.now;
    for forged in &attack.changes {
        let before = doc.get_heads();
        match forged {
            Forged::Raw(ops) => {
                let objs = objects(&doc);
                let mut tx = doc.transaction();
                for op in ops {
                    forge_op(&mut tx, &objs, &w.relay, op, &mut ctx);
                }
                tx.commit();
            }
            Forged::Typed(step) => {
                let Ok(mut order) = Order::from_doc(doc.clone(), term.writer.clone()) else {
                    continue;
                };
                typed_step(&mut term, &mut order, step);
                doc = order.into_doc();
            }
        }
        out.extend(doc.get_changes(&before));
    }
    (out, author)
}

fn run(steps: &[HonestStep], attack: &Attack) -> Result<(), TestCaseError> {
    let w = World::build(steps);
    let (changes, author) = forge(&w, attack);
    if changes.is_empty() {
        return Ok(());
    }
    let mut after = w.relay.clone();
    after.apply_changes(changes.clone()).unwrap();
    let verdict = validate(&w.relay, &after, &author);
    // The relay judges with the facts it carried from the honest history: same verdict.
    let new = after.get_changes(&w.relay.get_heads());
    let with = validate_changes_with(&w.relay, &after, &new, &author, &mut w.facts.clone());
    prop_assert_eq!(&with, &verdict, "the carried facts changed the verdict");
    if std::env::var_os("FORGED_TRACE").is_some() {
        eprintln!(
            "verdict: {}",
            match &verdict {
                Ok(_) => "accepted".to_owned(),
                Err(e) => format!("{} {}", e.code(), e),
            }
        );
    }
    if verdict.is_ok() {
        oracle(&w.relay, &after, &changes, &author).map_err(|e| {
            TestCaseError::fail(format!(
                "the policy accepted a forged change that breaks a promise: {e}"
            ))
        })?;
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .or_else(|_| std::env::var("FORGED_CASES"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn accepted_forged_changes_keep_every_promise(
        steps in prop::collection::vec(honest_step(), 0..24),
        attack in attack(),
    ) {
        run(&steps, &attack)?;
    }
}
