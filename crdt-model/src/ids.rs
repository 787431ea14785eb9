//! Identifiers: newtypes over UUIDs (orders, lines, payments, devices), the tenant id, the
//! relay-assigned order number, timestamps and the caller-supplied entropy that makes ids.
//!
//! The model never reads a clock or an OS random source: [`Timestamp`]s and an [`Entropy`]
//! come in as arguments, so simulations are reproducible from a seed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ModelError;

/// Milliseconds since the Unix epoch, as given by the caller (the model has no clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The timestamp in whole seconds, as Automerge stores a change's time.
    pub fn as_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }
}

/// A source of randomness supplied by the caller: the replicator feeds it from the OS, tests
/// and simulations from a seed.
pub trait Entropy {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;
}

/// A small deterministic generator (SplitMix64) for tests, simulations and benchmarks.
///
/// Not cryptographic; production devices seed ids from the OS instead.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator that yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
}

impl Entropy for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A UUID version 7 (time-ordered) made from a timestamp and caller entropy.
fn uuid_v7(at: Timestamp, entropy: &mut dyn Entropy) -> Uuid {
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&entropy.next_u64().to_le_bytes());
    random[8..].copy_from_slice(&entropy.next_u64().to_le_bytes()[..2]);
    let millis = u64::try_from(at.0).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered id (UUID v7) from the caller's clock and entropy.
            pub fn generate(at: Timestamp, entropy: &mut dyn Entropy) -> Self {
                Self(uuid_v7(at, entropy))
            }

            /// The 16 raw bytes of the id.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = ModelError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                // Only the canonical hyphenated form is accepted, so one id has one spelling.
                if s.len() != 36 {
                    return Err(ModelError::InvalidId { what: $what, value: s.to_owned() });
                }
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| ModelError::InvalidId { what: $what, value: s.to_owned() })
            }
        }
    };
}

uuid_id!(
    /// An order's id, generated on the device that creates the order.
    OrderId,
    "order id"
);
uuid_id!(
    /// A line item's id, the key of the line in the order's `lines` map.
    LineId,
    "line id"
);
uuid_id!(
    /// A payment transaction's id, the key of the payment in the order's `payments` map.
    PaymentId,
    "payment id"
);
uuid_id!(
    /// The id of one entry of a log (status entry, payment transition, acknowledgement).
    EntryId,
    "entry id"
);
uuid_id!(
    /// A device (terminal, or the relay itself) as provisioned on the relay.
    DeviceId,
    "device id"
);

/// The store (tenant) an order belongs to: a short opaque name chosen at provisioning.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreId(String);

impl StoreId {
    /// Longest store id accepted.
    pub const MAX_LEN: usize = 64;

    /// A store id: 1 to 64 characters of ASCII letters, digits, `-`, `_` or `.`.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(s))
        } else {
            Err(ModelError::InvalidId {
                what: "store id",
                value: s,
            })
        }
    }

    /// The store id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StoreId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The human-readable order number the relay assigns on first persist (1, 2, 3, ... per store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderNumber(pub u64);

impl fmt::Display for OrderNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let mut e = SplitMix64::new(7);
        let id = OrderId::generate(Timestamp(1_700_000_000_000), &mut e);
        assert_eq!(id.0.get_version_num(), 7);
        let back: OrderId = id.to_string().parse().unwrap();
        assert_eq!(back, id);
        assert!("not-a-uuid".parse::<OrderId>().is_err());
        assert!(
            id.0.simple().to_string().parse::<OrderId>().is_err(),
            "one spelling only"
        );
    }

    #[test]
    fn ids_are_time_ordered_and_distinct() {
        let mut e = SplitMix64::new(1);
        let a = LineId::generate(Timestamp(1_000), &mut e);
        let b = LineId::generate(Timestamp(2_000), &mut e);
        let c = LineId::generate(Timestamp(2_000), &mut e);
        assert!(a < b);
        assert_ne!(b, c);
    }

    #[test]
    fn store_ids_are_checked() {
        assert!(StoreId::new("store-1").is_ok());
        assert!(StoreId::new("").is_err());
        assert!(StoreId::new("a b").is_err());
        assert!(StoreId::new("x".repeat(65)).is_err());
    }
}
