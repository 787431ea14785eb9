//! Loading arbitrary bytes never panics: it yields an order or a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use crdt_model::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn random_bytes_give_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let w = Term::new(1).writer;
        match Order::load(&bytes, w) {
            Ok(o) => { o.view().unwrap(); }
            Err(
                ModelError::Load(_)
                | ModelError::NotAnOrder(_)
                | ModelError::Automerge(_)
                | ModelError::Malformed { .. },
            ) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn corrupted_orders_give_a_typed_error(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut t = Term::new(2);
        let mut o = t.create();
        t.add_line(&mut o, "Soup", 450, 2);
        t.pay(&mut o, PaymentKind::Cash, 900, PaymentState::Captured).unwrap();
        let mut bytes = o.save();
        for (i, b) in flips {
            let idx = i.index(bytes.len());
            bytes[idx] ^= b;
        }
        let truncated = &bytes[..cut.index(bytes.len() + 1)];
        for input in [&bytes[..], truncated] {
            if let Ok(o) = Order::load(input, t.writer.clone()) {
                // Whatever loads must also view without panicking.
                let _ = o.view();
            }
        }
    }
}
