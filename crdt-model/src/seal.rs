//! Seals: proof that a change was written by the relay, carried inside the change itself.
//!
//! The relay writes some changes of every order (its number, back-office status changes,
//! acknowledgements). A device may not write as the relay, so the policy refuses changes whose
//! actor is not the pushing device ([`crate::PolicyViolation::ForeignActor`]). After a restore
//! from an older backup, though, the relay's own changes made after the backup exist only on
//! the tills, and they must come back through them. A sealed change lets them: the relay puts
//! an HMAC-SHA-256 of the change (under a secret key only relays of that data hold, kept in its
//! store and its backups) into the change's message, so any relay holding the key can tell its
//! own changes from forgeries no matter who delivers them.
//!
//! What is authenticated is the change as decoded ([`automerge::ExpandedChange`]: actor, seq,
//! start op, time, dependencies and every operation) with the message left out, bound to the
//! order's id: a seal cannot be moved to other operations, another position in the history or
//! another order. The message is covered by the change hash, so the seal cannot be stripped or
//! replaced without making a different change.
//!
//! A **voucher** covers what a seal cannot: changes by *other devices* that a till delivers
//! after a restore. The relay vouches for an order's heads in every feed entry it sends
//! ([`SealKey::vouch`]); a till keeps the latest voucher whose heads it holds, and pushes it
//! with its changes after a restore; the relay then accepts every change in those heads'
//! history whoever wrote it, since it had committed each of them once (judged by the policy).
//!
//! Everything here is pure: the key comes from the caller, and decoding foreign bytes runs
//! under [`crate::guard::contain`].

use std::fmt;

use automerge::{Change, ChangeHash, ExpandedChange};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::ids::OrderId;

/// Prefix of a sealed change's message, followed by 64 lowercase hex digits.
pub const SEAL_PREFIX: &str = "seal1:";

/// Domain separation for the MAC input.
const DOMAIN: &[u8] = b"pos-relay seal v1\0";
/// Domain separation for vouchers.
const VOUCH_DOMAIN: &[u8] = b"pos-relay voucher v1\0";

type HmacSha256 = Hmac<Sha256>;

/// The relay's secret sealing key (32 bytes). `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey([u8; 32]);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// A key from its 32 bytes (made by the relay from the operating system's randomness).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes, for storing it.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, order: OrderId, unsealed: &ExpandedChange) -> Result<HmacSha256, String> {
        let body = serde_json::to_vec(unsealed).map_err(|e| e.to_string())?;
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.0).map_err(|e| e.to_string())?;
        mac.update(DOMAIN);
        mac.update(order.as_bytes());
        mac.update(&body);
        Ok(mac)
    }

    /// The message that seals `unsealed` (a change decoded, with no message) for `order`.
    pub(crate) fn message_for(
        &self,
        order: OrderId,
        unsealed: &ExpandedChange,
    ) -> Result<String, String> {
        let tag = self.mac(order, unsealed)?.finalize().into_bytes();
        let mut out = String::with_capacity(SEAL_PREFIX.len() + 64);
        out.push_str(SEAL_PREFIX);
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        Ok(out)
    }

    /// Whether `change` carries a valid seal of this key for `order`. Never panics: a change
    /// Automerge cannot decode is simply not sealed.
    pub fn verifies(&self, order: OrderId, change: &Change) -> bool {
        let Some(tag) = change
            .message()
            .and_then(|m| m.strip_prefix(SEAL_PREFIX))
            .and_then(parse_hex32)
        else {
            return false;
        };
        let Ok(Some(unsealed)) = crate::guard::contain(|| {
            let mut e = change.decode();
            e.message = None;
            e.hash = None;
            Some(e)
        }) else {
            return false;
        };
        match self.mac(order, &unsealed) {
            Ok(mac) => mac.verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }

    /// `change` (just made by this key's holder, without a message) with its seal added. The
    /// sealed change has the same actor, seq, operations and dependencies, so it takes the
    /// unsealed one's place in the history.
    pub fn seal(&self, order: OrderId, change: &Change) -> Result<Change, String> {
        crate::guard::contain(|| {
            let mut e = change.decode();
            e.message = None;
            e.hash = None;
            let message = self.message_for(order, &e)?;
            e.message = Some(message);
            Ok(Change::from(e))
        })?
    }
}

impl SealKey {
    fn vouch_mac(&self, order: OrderId, heads: &[ChangeHash]) -> Result<HmacSha256, String> {
        let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.0).map_err(|e| e.to_string())?;
        mac.update(VOUCH_DOMAIN);
        mac.update(order.as_bytes());
        for h in sorted {
            mac.update(&h.0);
        }
        Ok(mac)
    }

    /// A voucher: the relay's word that it committed the order up to `heads` (every change in
    /// their history passed its policy). Devices keep the latest they hold the heads of and
    /// present it after a restore, so the changes of other devices they deliver are accepted.
    pub fn vouch(&self, order: OrderId, heads: &[ChangeHash]) -> [u8; 32] {
        self.vouch_mac(order, heads)
            .map(|m| m.finalize().into_bytes().into())
            .unwrap_or([0; 32])
    }

    /// Whether `tag` is this key's voucher for `order` at `heads`.
    pub fn vouches(&self, order: OrderId, heads: &[ChangeHash], tag: &[u8]) -> bool {
        match self.vouch_mac(order, heads) {
            Ok(mac) => mac.verify_slice(tag).is_ok(),
            Err(_) => false,
        }
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The relay a device's batch may carry sealed changes of: its device id and key. Changes by
/// that device with a valid seal are judged as the relay's ([`crate::Role::Relay`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySeal {
    /// The relay's device id (any epoch of it).
    pub relay: crate::ids::DeviceId,
    /// Its sealing key.
    pub key: SealKey,
}
