//! Test helpers shared by this crate's integration tests, and by
//! `replicator/tests/panic_corpus.rs`, which includes this module by path.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod chunks;
pub mod corpus;

use crdt_model::*;

pub const T0: i64 = 1_700_000_000_000;

/// A terminal: a device identity, its own entropy and clock, and one order replica.
pub struct Term {
    pub device: DeviceId,
    pub writer: Writer,
    pub rng: SplitMix64,
    pub now: i64,
}

impl Term {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        Self {
            device,
            writer: Writer::new(device, seed as u32),
            rng,
            now: T0,
        }
    }

    pub fn tick(&mut self) -> Timestamp {
        self.now += 1_000;
        Timestamp(self.now)
    }

    pub fn author(&self) -> Author {
        Author {
            device: self.device,
            store: store(),
            role: Role::Device,
            seal: None,
            vouched: Default::default(),
        }
    }

    pub fn create(&mut self) -> Order {
        let at = self.tick();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: store(),
            currency: eur(),
        };
        Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap()
    }

    /// This terminal's replica of `other` (as if fetched through the relay).
    pub fn replica(&self, other: &Order) -> Order {
        Order::load(&other.save(), self.writer.clone()).unwrap()
    }

    pub fn add_line(&mut self, o: &mut Order, name: &str, price: i64, qty: i64) -> LineId {
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

    pub fn pay(
        &mut self,
        o: &mut Order,
        kind: PaymentKind,
        amount: i64,
        state: PaymentState,
    ) -> Result<PaymentId, ModelError> {
        let at = self.tick();
        o.add_payment(
            at,
            &mut self.rng,
            PaymentDraft {
                kind,
                amount,
                reference: String::new(),
            },
            state,
        )
    }
}

pub fn store() -> StoreId {
    StoreId::new("store-1").unwrap()
}

pub fn eur() -> Currency {
    Currency::new("EUR").unwrap()
}

/// Two-way merge so both replicas hold the same changes.
pub fn sync(a: &mut Order, b: &mut Order) {
    a.merge(b).unwrap();
    b.merge(a).unwrap();
}
