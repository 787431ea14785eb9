//! Order documents and store writes for the store tests (redb and PostgreSQL): real orders
//! as terminals make them, and the writes the relay's core would send for them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use crdt_model::automerge::ChangeHash;
use crdt_model::{
    Currency, DeviceId, FinalPayment, LineDraft, NewOrder, Order, OrderId, PaymentDraft,
    PaymentKind, SplitMix64, StoreId, Timestamp, Writer,
};
use relay_server::store::{OrderWrite, StoredOrder};

pub const T0: i64 = 1_700_000_000_000;

pub struct Maker {
    pub rng: SplitMix64,
    pub writer: Writer,
    pub now: i64,
}

impl Maker {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        Self {
            rng,
            writer: Writer::new(device, 1),
            now: T0,
        }
    }

    pub fn tick(&mut self) -> Timestamp {
        self.now += 1_000;
        Timestamp(self.now)
    }

    pub fn order(&mut self, store: &str) -> Order {
        let at = self.tick();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: sid(store),
            currency: Currency::new("EUR").unwrap(),
        };
        Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap()
    }

    pub fn add_line(&mut self, o: &mut Order, name: &str) {
        let at = self.tick();
        let line = LineDraft {
            name: name.into(),
            unit_price: 250,
            quantity: 1,
            ..Default::default()
        };
        o.add_line(at, &mut self.rng, line).unwrap();
    }

    pub fn complete(&mut self, o: &mut Order) {
        let at = self.tick();
        let total = o.view().unwrap().totals.balance_due;
        let cash = PaymentDraft {
            kind: PaymentKind::Cash,
            amount: total.max(1),
            reference: String::new(),
        };
        o.complete_sale(at, &mut self.rng, Some(FinalPayment::New(cash)))
            .unwrap();
    }

    pub fn delete(&mut self, o: &mut Order) {
        let at = self.tick();
        o.delete(at, &mut self.rng).unwrap();
    }
}

pub fn sid(s: &str) -> StoreId {
    StoreId::new(s).unwrap()
}

pub fn heads(o: &Order) -> Vec<[u8; 32]> {
    o.heads().iter().map(|h| h.0).collect()
}

/// Raw bytes of the changes of `o` not in the causal past of `since`.
pub fn changes_since(o: &Order, since: &[ChangeHash]) -> Vec<Vec<u8>> {
    o.doc()
        .get_changes(since)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

pub fn hashes(h: &[ChangeHash]) -> Vec<[u8; 32]> {
    h.iter().map(|h| h.0).collect()
}

/// A write appending the changes of `o` made after `since`, built on `since` (the stored heads;
/// empty for a new order).
pub fn write(o: &Order, since: &[ChangeHash], at: i64) -> OrderWrite {
    OrderWrite {
        order: o.id(),
        store: o.store().clone(),
        changes: changes_since(o, since),
        compacted: None,
        status: o.status().unwrap(),
        base: hashes(since),
        number: o.number().unwrap(),
        heads: heads(o),
        at,
    }
}

/// A write resending every change of `o` (a retry), built on `base` (the stored heads).
pub fn resend(o: &Order, base: &[ChangeHash], at: i64) -> OrderWrite {
    OrderWrite {
        base: hashes(base),
        ..write(o, &[], at)
    }
}

/// A write replacing snapshot and tail with `o.save()`, built on `base` (the stored heads).
pub fn compact(o: &Order, base: &[ChangeHash], at: i64) -> OrderWrite {
    OrderWrite {
        compacted: Some(o.save()),
        changes: Vec::new(),
        ..resend(o, base, at)
    }
}

pub fn doc_of(stored: &StoredOrder) -> Order {
    Order::from_doc(stored.to_doc().unwrap(), Maker::new(99).writer).unwrap()
}
