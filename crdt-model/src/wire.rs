//! The relay protocol's frames, shared by `replicator` and `relay-server`.
//!
//! One frame per binary WebSocket message, encoded as CBOR (RFC 8949) through serde: a map with a
//! text key `"type"` naming the frame and one key per field. Ids are canonical hyphenated UUID
//! text, hashes and Automerge payloads are CBOR byte strings. `docs/protocol.md` specifies every
//! frame, field and state for implementers in other languages.

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::ModelError;

/// The protocol's major version: peers with a different major cannot talk.
pub const PROTOCOL_MAJOR: u16 = 2;
/// The protocol's minor version: additions a peer may ignore.
pub const PROTOCOL_MINOR: u16 = 1;
/// Largest frame a peer must accept, in bytes (the relay may be configured lower or higher).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Deepest CBOR nesting accepted when decoding (frames are shallow; this bounds stack use).
const MAX_DEPTH: usize = 32;

/// A protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Incompatible changes bump this.
    pub major: u16,
    /// Compatible additions bump this.
    pub minor: u16,
}

impl Version {
    /// The version this build speaks.
    pub const CURRENT: Self = Self {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
    };
}

/// What a device sends to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame on a connection.
    Hello {
        /// The protocol version the device speaks.
        protocol: Version,
        /// The device id the token was issued to (checked against the token).
        device: String,
        /// Free text identifying the app and version, for logs.
        agent: String,
        /// Resume the store feed after this sequence number (0 = from the start).
        feed_since: u64,
        /// The highest order number of its store the device holds (protocol 2.1): after a
        /// restore the relay gives new numbers only above every device's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        highest_number: Option<u64>,
    },
    /// One Automerge sync message for one order.
    Sync {
        /// Order id.
        order: String,
        /// `automerge::sync::Message::encode()` bytes.
        data: ByteBuf,
    },
    /// Changes this device made (or holds) that the relay has not acknowledged, pushed as
    /// they are, with the device's heads once they are applied: the relay answers with a
    /// `receipt` naming those heads once they are durable (protocol 2).
    Changes {
        /// Order id.
        order: String,
        /// Raw change chunks (`Change::raw_bytes`), dependencies first.
        changes: Vec<ByteBuf>,
        /// The device's heads for the order after these changes.
        heads: Vec<ByteBuf>,
        /// After a restore (protocol 2.1): the relay's latest voucher for the order that the
        /// device holds, so the other writers' changes it delivers are accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voucher: Option<Voucher>,
    },
    /// Keep-alive request; the relay answers with `pong` and the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to the relay's `ping`.
    Pong {
        /// The relay's nonce.
        nonce: u64,
    },
    /// Clean close: the device will send nothing more.
    Bye,
}

/// One line of the store feed: an order of the device's store was created or changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    /// Position in the store's feed; strictly increasing.
    pub seq: u64,
    /// Order id.
    pub order: String,
    /// Relay-assigned number, once assigned.
    pub number: Option<u64>,
    /// Effective business status (`in_progress`, ..., `done`, `deleted`).
    pub status: String,
    /// The order's heads as stored, so a device can tell whether it is up to date.
    pub heads: Vec<ByteBuf>,
    /// The relay's voucher for those heads (protocol 2.1; `crdt_model::seal`): a device that
    /// holds them keeps it, to deliver the order again after a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher: Option<ByteBuf>,
}

/// The relay's voucher for an order's heads (see [`FeedEntry::voucher`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The heads vouched for.
    pub heads: Vec<ByteBuf>,
    /// The relay's tag (32 bytes).
    pub tag: ByteBuf,
}

/// What the relay sends to a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayFrame {
    /// Answer to `hello`: the connection is ready.
    Welcome {
        /// The version the relay speaks.
        protocol: Version,
        /// The relay's own device id (author of numbers and back-office changes).
        relay: String,
        /// The store the device belongs to.
        store: String,
        /// The store feed's latest sequence number.
        feed_seq: u64,
        /// The relay data's id (protocol 2.1): it changes when the data is restored from a
        /// backup, and a device that saw another id before sends everything it holds again and
        /// reads the feed from the start.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// One Automerge sync message for one order.
    Sync {
        /// Order id.
        order: String,
        /// Sync message bytes.
        data: ByteBuf,
    },
    /// Committed changes of an order, forwarded as they were stored (protocol 2): the same
    /// encoded frame goes to every connection that follows the order. A device that lacks a
    /// dependency of one of them runs a sync round for the order.
    Changes {
        /// Order id.
        order: String,
        /// Raw change chunks, dependencies first.
        changes: Vec<ByteBuf>,
        /// The order's heads as stored with these changes (protocol 2.1), and
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        heads: Vec<ByteBuf>,
        /// the relay's voucher for them (`crdt_model::seal`): a device that holds the heads
        /// once the changes are applied keeps it, so it can deliver every change under them
        /// (another till's too) after a restore of the relay, whether or not the feed entry
        /// reached it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voucher: Option<ByteBuf>,
    },
    /// Durable receipt: the relay has committed (fsynced) the order up to these heads.
    Receipt {
        /// Order id.
        order: String,
        /// Heads of the order as stored.
        heads: Vec<ByteBuf>,
        /// The relay's voucher for these heads (protocol 2.1; `crdt_model::seal`), as in
        /// [`FeedEntry::voucher`]: the device holds the heads (it announced them), so it keeps
        /// the voucher at once, and can deliver every change under them after a restore,
        /// another till's too, even if the feed entry never reached it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voucher: Option<ByteBuf>,
    },
    /// Changes the relay refused; nothing of them was stored.
    Rejected {
        /// Order id.
        order: String,
        /// Stable reason code (`PolicyViolation::code`).
        code: String,
        /// Human-readable reason.
        message: String,
        /// Hashes of the refused changes.
        changes: Vec<ByteBuf>,
    },
    /// Orders of the device's store created or changed since the device's `feed_since`.
    Feed {
        /// Entries in sequence order.
        entries: Vec<FeedEntry>,
    },
    /// The relay has no such order (or it belongs to another store: the answer is the same).
    Unavailable {
        /// Order id as asked.
        order: String,
    },
    /// Something about the connection or a frame was wrong.
    Error {
        /// Stable error code.
        code: String,
        /// Human-readable explanation.
        message: String,
        /// Whether the relay closes the connection after this frame.
        fatal: bool,
    },
    /// Keep-alive request.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a device's `ping`.
    Pong {
        /// The device's nonce.
        nonce: u64,
    },
    /// The relay is shutting down or closing this connection cleanly.
    Bye,
}

/// Error codes used in [`RelayFrame::Error`].
pub mod codes {
    /// The frame did not decode.
    pub const MALFORMED_FRAME: &str = "malformed_frame";
    /// The first frame was not `hello`, or `hello` came twice.
    pub const PROTOCOL_VIOLATION: &str = "protocol_violation";
    /// The device's major version is not the relay's.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// `hello` named another device than the token's.
    pub const WRONG_DEVICE: &str = "wrong_device";
    /// The frame exceeded the size limit.
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
    /// The device sent faster than its rate limit.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The sync payload was not an Automerge sync message.
    pub const BAD_SYNC_MESSAGE: &str = "bad_sync_message";
    /// The order id did not parse.
    pub const BAD_ORDER_ID: &str = "bad_order_id";
    /// The relay could not store the change; retry later.
    pub const STORAGE: &str = "storage_error";
    /// The relay is shutting down.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// The device's token was revoked: its connections are closed and it cannot connect again.
    /// The device shows its unsynced orders Blocked instead of retrying.
    pub const REVOKED: &str = "revoked";
    /// The token is unknown or malformed (HTTP 401 at the upgrade).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A sync message asks for more than the relay's limits allow (too many hashes or Bloom
    /// filters, changes that inflate too far, too many changes waiting for a dependency).
    pub const LIMIT_EXCEEDED: &str = "limit_exceeded";
    /// A change in a sync message does not decode; nothing of the message was applied.
    pub const BAD_CHANGE: &str = "bad_change";
    /// The document sent for an order carries another order id in its header.
    pub const WRONG_ORDER_ID: &str = "wrong_order_id";
    /// The relay failed while handling the frame; its effects were undone (fatal).
    pub const UNPROCESSABLE: &str = "unprocessable";
}

fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail, and every frame type serialises (no maps with
    // non-string keys, no unsupported types); an error here would be a bug in this module.
    if let Err(e) = ciborium::into_writer(frame, &mut out) {
        debug_assert!(false, "frame encoding failed: {e}");
    }
    out
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ModelError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(ModelError::Frame(format!(
            "{} bytes exceeds {MAX_FRAME_BYTES}",
            bytes.len()
        )));
    }
    let mut cursor = bytes;
    let frame = ciborium::de::from_reader_with_recursion_limit(&mut cursor, MAX_DEPTH)
        .map_err(|e| ModelError::Frame(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(ModelError::Frame(format!(
            "{} trailing bytes",
            cursor.len()
        )));
    }
    Ok(frame)
}

impl ClientFrame {
    /// CBOR bytes of the frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes one frame; anything else is a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        decode(bytes)
    }
}

impl RelayFrame {
    /// CBOR bytes of the frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes one frame; anything else is a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        decode(bytes)
    }

    /// A non-fatal or fatal error frame.
    pub fn error(code: &str, message: impl Into<String>, fatal: bool) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
            fatal,
        }
    }
}

/// Heads as wire byte strings.
pub fn heads_to_wire(heads: &[ChangeHash]) -> Vec<ByteBuf> {
    heads.iter().map(|h| ByteBuf::from(h.0.to_vec())).collect()
}

/// Heads from wire byte strings; each must be 32 bytes.
pub fn heads_from_wire(heads: &[ByteBuf]) -> Result<Vec<ChangeHash>, ModelError> {
    heads
        .iter()
        .map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map(ChangeHash)
                .map_err(|_| {
                    ModelError::Frame(format!("a change hash must be 32 bytes, got {}", b.len()))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frames() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Hello {
                protocol: Version::CURRENT,
                device: "018bcfe5-73b8-76c9-9a3b-782b29572a06".into(),
                agent: "till/1.0".into(),
                feed_since: 42,
                highest_number: None,
            },
            ClientFrame::Sync {
                order: "o".into(),
                data: ByteBuf::from(vec![0x42, 1, 2, 3]),
            },
            ClientFrame::Changes {
                order: "o".into(),
                changes: vec![ByteBuf::from(vec![0x85, 0x6f])],
                heads: vec![ByteBuf::from(vec![9u8; 32])],
                voucher: None,
            },
            ClientFrame::Ping { nonce: u64::MAX },
            ClientFrame::Pong { nonce: 0 },
            ClientFrame::Bye,
        ]
    }

    #[test]
    fn client_frames_round_trip() {
        for f in client_frames() {
            assert_eq!(ClientFrame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn relay_frames_round_trip() {
        let h = vec![ByteBuf::from(vec![7u8; 32])];
        let frames = vec![
            RelayFrame::Welcome {
                protocol: Version::CURRENT,
                relay: "r".into(),
                store: "s".into(),
                feed_seq: 9,
                data: None,
            },
            RelayFrame::Sync {
                order: "o".into(),
                data: ByteBuf::from(vec![1, 2]),
            },
            RelayFrame::Receipt {
                order: "o".into(),
                heads: h.clone(),
                voucher: Some(ByteBuf::from(vec![7; 32])),
            },
            RelayFrame::Changes {
                order: "o".into(),
                changes: vec![ByteBuf::from(vec![1, 2, 3])],
                heads: h.clone(),
                voucher: Some(ByteBuf::from(vec![9; 32])),
            },
            RelayFrame::Rejected {
                order: "o".into(),
                code: "c".into(),
                message: "m".into(),
                changes: h.clone(),
            },
            RelayFrame::Feed {
                entries: vec![FeedEntry {
                    seq: 1,
                    order: "o".into(),
                    number: Some(3),
                    status: "done".into(),
                    heads: h,
                    voucher: None,
                }],
            },
            RelayFrame::Unavailable { order: "o".into() },
            RelayFrame::error(codes::MALFORMED_FRAME, "bad", true),
            RelayFrame::Ping { nonce: 1 },
            RelayFrame::Pong { nonce: 2 },
            RelayFrame::Bye,
        ];
        for f in frames {
            assert_eq!(RelayFrame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn the_encoding_is_a_cbor_map_with_a_type_key() {
        let bytes = ClientFrame::Bye.encode();
        // map(1) { "type": "bye" }
        assert_eq!(
            bytes,
            [0xa1, 0x64, b't', b'y', b'p', b'e', 0x63, b'b', b'y', b'e']
        );
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for bad in [
            &b""[..],
            b"\xff\xff",
            b"\xa1\x64type\x65hello",
            &[0x9f; 200],
            &ClientFrame::Bye.encode()[..5],
        ] {
            assert!(
                matches!(ClientFrame::decode(bad), Err(ModelError::Frame(_))),
                "{bad:?}"
            );
        }
        let mut trailing = ClientFrame::Bye.encode();
        trailing.push(0);
        assert!(ClientFrame::decode(&trailing).is_err());
    }

    #[test]
    fn heads_must_be_32_bytes() {
        assert!(heads_from_wire(&[ByteBuf::from(vec![1; 31])]).is_err());
        let h = ChangeHash([3; 32]);
        assert_eq!(heads_from_wire(&heads_to_wire(&[h])).unwrap(), vec![h]);
    }
}
