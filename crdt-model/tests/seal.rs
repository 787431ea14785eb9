//! Seals and vouchers against an attacker (`crdt_model::seal`): a device delivering changes "by
//! the relay" or "by another till" after a restore. A generator makes genuine relay changes and
//! forgeries of every kind it can (another key, another order, a flipped tag, a message copied
//! onto other operations, no seal, random text) and vouchers for other heads, orders and keys; the
//! oracle is the construction itself (only the untouched genuine article may pass), and the seal
//! and voucher tags are also recomputed here with `hmac` directly from the documented format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::{Change, ChangeHash};
use common::*;
use crdt_model::*;
use hmac::{Hmac, KeyInit, Mac};
use proptest::prelude::*;
use sha2::Sha256;

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The seal as `docs/protocol.md` defines it, computed without the crate's code.
fn expected_seal(key: &[u8; 32], order: OrderId, change: &Change) -> String {
    let mut e = change.decode();
    e.message = None;
    e.hash = None;
    let body = serde_json::to_vec(&e).unwrap();
    let tag = hmac(key, &[b"pos-relay seal v1\0", order.as_bytes(), &body]);
    format!("seal1:{}", hex(&tag))
}

/// The relay's number change for `o` (the relay writing with `key`, or unsealed with `None`).
fn number_change(o: &Order, relay: &Writer, number: u64) -> Change {
    let mut r = Order::from_doc(o.doc().clone(), relay.clone()).unwrap();
    let before = r.heads();
    r.assign_number(Timestamp(T0 + 5_000), OrderNumber(number))
        .unwrap();
    let changes = r.doc().get_changes(&before);
    assert_eq!(changes.len(), 1);
    changes[0].clone()
}

#[derive(Clone, Copy, Debug)]
enum Forgery {
    Genuine,
    OtherKey,
    OtherOrder,
    FlippedTag(usize),
    CopiedMessage,
    Unsealed,
    RandomText(u64),
}

fn forgery() -> impl Strategy<Value = Forgery> {
    prop_oneof![
        2 => Just(Forgery::Genuine),
        1 => Just(Forgery::OtherKey),
        1 => Just(Forgery::OtherOrder),
        1 => (0usize..64).prop_map(Forgery::FlippedTag),
        1 => Just(Forgery::CopiedMessage),
        1 => Just(Forgery::Unsealed),
        1 => any::<u64>().prop_map(Forgery::RandomText),
    ]
}

/// A change as the attacker delivers it, built from pieces it could have: genuine sealed
/// changes (of this order or another), its own relay-actor changes.
fn forge(
    kind: Forgery,
    o: &Order,
    other: &Order,
    relay_device: DeviceId,
    key: &SealKey,
    number: u64,
) -> Change {
    let sealed = Writer::new(relay_device, 9).with_seal(key.clone());
    let unsealed = Writer::new(relay_device, 9);
    let with_message = |c: &Change, m: Option<String>| {
        let mut e = c.decode();
        e.message = m;
        e.hash = None;
        Change::from(e)
    };
    match kind {
        Forgery::Genuine => number_change(o, &sealed, number),
        Forgery::OtherKey => {
            let mut k2 = *key.as_bytes();
            k2[0] = !k2[0];
            let k2 = SealKey::from_bytes(k2);
            number_change(o, &Writer::new(relay_device, 9).with_seal(k2), number)
        }
        Forgery::OtherOrder => {
            // A seal the relay really made, for the same operations on another order.
            let plain = number_change(o, &unsealed, number);
            let theirs = key.seal(other.id(), &plain).unwrap();
            with_message(&plain, theirs.message().map(str::to_owned))
        }
        Forgery::FlippedTag(i) => {
            let genuine = number_change(o, &sealed, number);
            let mut m: Vec<u8> = genuine.message().unwrap().as_bytes().to_vec();
            let at = "seal1:".len() + i;
            m[at] = if m[at] == b'0' { b'1' } else { b'0' };
            with_message(&genuine, Some(String::from_utf8(m).unwrap()))
        }
        Forgery::CopiedMessage => {
            // The genuine seal for number N, put on a change writing N + 1.
            let genuine = number_change(o, &sealed, number);
            let other_number = number_change(o, &unsealed, number + 1);
            with_message(&other_number, genuine.message().map(str::to_owned))
        }
        Forgery::Unsealed => number_change(o, &unsealed, number),
        Forgery::RandomText(x) => {
            let plain = number_change(o, &unsealed, number);
            with_message(&plain, Some(format!("seal1:{x:064x}")))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
    ))]

    /// Only the relay's genuine sealed change passes, delivered by a device; every forgery is
    /// `foreign_actor`, and the seal equals the one computed from the documented format.
    #[test]
    fn only_genuine_relay_changes_pass(kind in forgery(), seed in 1u64..1_000, number in 1u64..10_000) {
        let mut till = Term::new(seed);
        let o = till.create();
        let other = till.create();
        let relay_device = DeviceId::generate(Timestamp(T0), &mut SplitMix64::new(seed ^ 77));
        let key_bytes = [seed as u8; 32];
        let key = SealKey::from_bytes(key_bytes);
        let change = forge(kind, &o, &other, relay_device, &key, number);
        let genuine = matches!(kind, Forgery::Genuine);

        let mut after = o.doc().clone();
        after.apply_changes([change.clone()]).unwrap();
        let author = Author {
            seal: Some(RelaySeal { relay: relay_device, key: key.clone() }),
            ..till.author()
        };
        let verdict = validate(o.doc(), &after, &author);
        if genuine {
            prop_assert_eq!(verdict, Ok(1));
            let plain = number_change(&o, &Writer::new(relay_device, 9), number);
            let want = expected_seal(&key_bytes, o.id(), &plain);
            prop_assert_eq!(change.message(), Some(want.as_str()));
        } else {
            prop_assert!(matches!(verdict, Err(PolicyViolation::ForeignActor(_))), "{kind:?}: {verdict:?}");
        }
        // Without the relay's seal in the author, even the genuine change is refused.
        prop_assert!(matches!(validate(o.doc(), &after, &till.author()), Err(PolicyViolation::ForeignActor(_))));
    }

    /// A voucher passes only for the exact order and set of heads it was made for, under the
    /// relay's key; the tag equals HMAC(key, domain, order, sorted heads) computed here.
    #[test]
    fn vouchers_bind_order_heads_and_key(
        seed in 1u64..1_000,
        heads in proptest::collection::vec(any::<[u8; 32]>(), 1..4),
        change_order in any::<bool>(),
        drop_one in any::<bool>(),
        other_key in any::<bool>(),
    ) {
        let mut rng = SplitMix64::new(seed);
        let order = OrderId::generate(Timestamp(T0), &mut rng);
        let other = OrderId::generate(Timestamp(T0 + 1), &mut rng);
        let key_bytes = [seed as u8 ^ 0x5A; 32];
        let key = SealKey::from_bytes(key_bytes);
        let hs: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        let tag = key.vouch(order, &hs);
        let mut sorted = heads.clone();
        sorted.sort();
        sorted.dedup();
        let mut parts: Vec<&[u8]> = vec![b"pos-relay voucher v1\0", order.as_bytes()];
        parts.extend(sorted.iter().map(|h| &h[..]));
        prop_assert_eq!(tag, hmac(&key_bytes, &parts));
        // Any order of the heads is the same set.
        let mut reversed = hs.clone();
        reversed.reverse();
        prop_assert!(key.vouches(order, &reversed, &tag));

        let mut asked = hs.clone();
        let mut at = order;
        let mut by = key.clone();
        let mut tampered = false;
        if change_order { at = other; tampered = true; }
        if drop_one && sorted.len() > 1 { asked.retain(|h| h.0 != sorted[0]); tampered = true; }
        if other_key { by = SealKey::from_bytes([!(seed as u8 ^ 0x5A); 32]); tampered = true; }
        prop_assert_eq!(by.vouches(at, &asked, &tag), !tampered);
    }
}
