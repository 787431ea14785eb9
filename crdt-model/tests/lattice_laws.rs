//! The status and payment-state lattices obey the join-semilattice laws (property tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crdt_model::*;
use proptest::prelude::*;
use uuid::Uuid;

fn status() -> impl Strategy<Value = OrderStatus> {
    prop::sample::select(OrderStatus::ALL.to_vec())
}

fn entry() -> impl Strategy<Value = StatusEntry> {
    // Small id and clock ranges so ties and equal entries actually occur.
    (status(), 0u64..6, 0u128..8).prop_map(|(status, clock, id)| StatusEntry {
        status,
        clock,
        id: EntryId(Uuid::from_u128(id)),
    })
}

fn element() -> impl Strategy<Value = StatusLattice> {
    prop::collection::vec(entry(), 0..5).prop_map(StatusLattice::from_entries)
}

fn pstate() -> impl Strategy<Value = PaymentState> {
    prop::sample::select(PaymentState::ALL.to_vec())
}

proptest! {
    #[test]
    fn join_is_commutative(a in element(), b in element()) {
        prop_assert_eq!(a.join(b), b.join(a));
    }

    #[test]
    fn join_is_associative(a in element(), b in element(), c in element()) {
        prop_assert_eq!(a.join(b).join(c), a.join(b.join(c)));
    }

    #[test]
    fn join_is_idempotent(a in element()) {
        prop_assert_eq!(a.join(a), a);
    }

    #[test]
    fn join_is_monotone(a in element(), b in element(), c in element()) {
        // An upper bound of both, and a <= b implies a ⊔ c <= b ⊔ c.
        prop_assert!(a.le(a.join(b)));
        prop_assert!(b.le(a.join(b)));
        if a.le(b) {
            prop_assert!(a.join(c).le(b.join(c)));
        }
    }

    #[test]
    fn the_log_reads_the_same_in_any_order(mut entries in prop::collection::vec(entry(), 0..8), seed in any::<u64>()) {
        let forward = StatusLattice::from_entries(entries.clone());
        let mut rng = SplitMix64::new(seed);
        for i in (1..entries.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            entries.swap(i, j);
        }
        let dup: Vec<StatusEntry> = entries.iter().chain(entries.iter()).copied().collect();
        prop_assert_eq!(StatusLattice::from_entries(entries), forward);
        prop_assert_eq!(StatusLattice::from_entries(dup), forward);
    }

    #[test]
    fn terminal_absorbs_active(a in element(), b in element()) {
        // Once terminal, any join stays terminal; Done beats Deleted.
        if a.is_terminal() {
            prop_assert!(a.join(b).is_terminal());
        }
        if a.status() == OrderStatus::Done {
            prop_assert_eq!(a.join(b).status(), OrderStatus::Done);
        }
    }

    #[test]
    fn payment_state_join_laws(a in pstate(), b in pstate(), c in pstate()) {
        prop_assert_eq!(a.join(b), b.join(a));
        prop_assert_eq!(a.join(b).join(c), a.join(b.join(c)));
        prop_assert_eq!(a.join(a), a);
        prop_assert!(a.join(b) >= a);
        // A captured payment never reads as less than captured after any merge.
        if a >= PaymentState::Captured {
            prop_assert!(a.join(b) >= PaymentState::Captured);
        }
    }
}
