//! Byte encodings of stored values. Every decoder returns [`RelayError::Corrupt`] on bad input,
//! never panics.

use crdt_model::{DeviceId, OrderId, OrderNumber, OrderStatus, StoreId};

use super::{OrderMeta, RelayIdentity};
use crate::error::RelayError;

/// Version byte leading an encoded [`OrderMeta`].
const META_CODEC: u8 = 1;

fn corrupt(what: &str) -> RelayError {
    RelayError::Corrupt(what.to_owned())
}

/// The canonical hyphenated text of 16 UUID bytes.
pub(crate) fn uuid_text(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        push_hex(&mut s, *byte);
    }
    s
}

fn push_hex(s: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    s.push(char::from(HEX[usize::from(byte >> 4)]));
    s.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        push_hex(&mut s, *b);
    }
    s
}

/// `true` if `s` is exactly `len` lower-case hex digits.
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An order id from its stored key.
pub(crate) fn order_id(b: &[u8; 16]) -> Result<OrderId, RelayError> {
    uuid_text(b)
        .parse()
        .map_err(|_| corrupt("stored order id is not a UUID"))
}

/// A device id from its stored bytes.
pub(crate) fn device_id(b: &[u8; 16]) -> Result<DeviceId, RelayError> {
    uuid_text(b)
        .parse()
        .map_err(|_| corrupt("stored device id is not a UUID"))
}

/// A random UUID v4 (random bytes with the version and variant bits set) as a device id.
pub(crate) fn random_device_id() -> Result<DeviceId, RelayError> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    device_id(&b)
}

/// `N` bytes from the operating system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], RelayError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| RelayError::Io(std::io::Error::other(format!("os random source: {e}"))))?;
    Ok(b)
}

/// The format version value.
pub(crate) fn encode_format(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Decodes the format version value.
pub(crate) fn decode_format(b: &[u8]) -> Result<u32, RelayError> {
    let arr: [u8; 4] = b
        .try_into()
        .map_err(|_| corrupt("format version is not 4 bytes"))?;
    Ok(u32::from_be_bytes(arr))
}

/// Identity: 16 bytes of device id then the epoch, big-endian.
pub(crate) fn encode_identity(id: &RelayIdentity) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..16].copy_from_slice(id.device.as_bytes());
    out[16..].copy_from_slice(&id.epoch.to_be_bytes());
    out
}

/// Decodes the identity value.
pub(crate) fn decode_identity(b: &[u8]) -> Result<RelayIdentity, RelayError> {
    let mut r = Reader::new(b);
    let device = device_id(&r.array::<16>()?)?;
    let epoch = r.u32()?;
    r.end()?;
    Ok(RelayIdentity { device, epoch })
}

fn status_code(s: OrderStatus) -> u8 {
    match s {
        OrderStatus::InProgress => 0,
        OrderStatus::InDelivery => 1,
        OrderStatus::Delayed => 2,
        OrderStatus::Done => 3,
        OrderStatus::Deleted => 4,
    }
}

fn status_of(code: u8) -> Result<OrderStatus, RelayError> {
    Ok(match code {
        0 => OrderStatus::InProgress,
        1 => OrderStatus::InDelivery,
        2 => OrderStatus::Delayed,
        3 => OrderStatus::Done,
        4 => OrderStatus::Deleted,
        _ => return Err(corrupt("unknown order status code")),
    })
}

/// Encodes order metadata:
/// `version u8 | order [16] | store len u8 + bytes | number u64 | status u8 | created_at i64 |
/// updated_at i64 | feed_seq u64 | tail_len u32 | heads count u16 + 32 bytes each`, integers
/// big-endian.
pub(crate) fn encode_meta(m: &OrderMeta) -> Result<Vec<u8>, RelayError> {
    let store = m.store.as_str().as_bytes();
    let store_len =
        u8::try_from(store.len()).map_err(|_| RelayError::Invalid("store id too long".into()))?;
    let heads = u16::try_from(m.heads.len())
        .map_err(|_| RelayError::Invalid(format!("too many heads ({})", m.heads.len())))?;
    let mut out =
        Vec::with_capacity(1 + 16 + 1 + store.len() + 8 + 1 + 24 + 4 + 2 + 32 * m.heads.len());
    out.push(META_CODEC);
    out.extend_from_slice(m.order.as_bytes());
    out.push(store_len);
    out.extend_from_slice(store);
    out.extend_from_slice(&m.number.0.to_be_bytes());
    out.push(status_code(m.status));
    out.extend_from_slice(&m.created_at.to_be_bytes());
    out.extend_from_slice(&m.updated_at.to_be_bytes());
    out.extend_from_slice(&m.feed_seq.to_be_bytes());
    out.extend_from_slice(&m.tail_len.to_be_bytes());
    out.extend_from_slice(&heads.to_be_bytes());
    for h in &m.heads {
        out.extend_from_slice(h);
    }
    Ok(out)
}

/// Decodes order metadata written by [`encode_meta`].
pub(crate) fn decode_meta(b: &[u8]) -> Result<OrderMeta, RelayError> {
    let mut r = Reader::new(b);
    if r.u8()? != META_CODEC {
        return Err(corrupt("unknown order metadata encoding"));
    }
    let order = order_id(&r.array::<16>()?)?;
    let store_len = usize::from(r.u8()?);
    let store = std::str::from_utf8(r.take(store_len)?)
        .map_err(|_| corrupt("stored store id is not UTF-8"))?;
    let store = StoreId::new(store).map_err(|_| corrupt("stored store id is invalid"))?;
    let number = OrderNumber(r.u64()?);
    let status = status_of(r.u8()?)?;
    let created_at = r.i64()?;
    let updated_at = r.i64()?;
    let feed_seq = r.u64()?;
    let tail_len = r.u32()?;
    let count = usize::from(r.u16()?);
    let mut heads = Vec::with_capacity(count);
    for _ in 0..count {
        heads.push(r.array::<32>()?);
    }
    r.end()?;
    Ok(OrderMeta {
        order,
        store,
        number,
        status,
        heads,
        created_at,
        updated_at,
        feed_seq,
        tail_len,
    })
}

/// A JSON value from stored bytes.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    b: &[u8],
) -> Result<T, RelayError> {
    serde_json::from_slice(b).map_err(|e| RelayError::Corrupt(format!("{what}: {e}")))
}

/// JSON bytes of a value.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, RelayError> {
    serde_json::to_vec(v).map_err(|e| RelayError::Internal(format!("encode: {e}")))
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { rest: b }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RelayError> {
        if self.rest.len() < n {
            return Err(corrupt("stored value is truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RelayError> {
        self.take(N)?
            .try_into()
            .map_err(|_| corrupt("stored value is truncated"))
    }

    fn u8(&mut self) -> Result<u8, RelayError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, RelayError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, RelayError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, RelayError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, RelayError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn end(&self) -> Result<(), RelayError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt("stored value has trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn meta() -> OrderMeta {
        OrderMeta {
            order: "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap(),
            store: StoreId::new("store-1").unwrap(),
            number: OrderNumber(42),
            status: OrderStatus::Delayed,
            heads: vec![[7; 32], [9; 32]],
            created_at: -5,
            updated_at: 1_700_000_000_000,
            feed_seq: 17,
            tail_len: 3,
        }
    }

    #[test]
    fn meta_round_trips_and_every_truncation_is_corrupt() {
        let m = meta();
        let bytes = encode_meta(&m).unwrap();
        assert_eq!(decode_meta(&bytes).unwrap(), m);
        for n in 0..bytes.len() {
            assert!(matches!(
                decode_meta(&bytes[..n]),
                Err(RelayError::Corrupt(_))
            ));
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_meta(&longer), Err(RelayError::Corrupt(_))));
    }

    #[test]
    fn uuid_text_is_canonical() {
        let id: OrderId = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        assert_eq!(uuid_text(id.as_bytes()), id.to_string());
        let d = random_device_id().unwrap();
        assert_eq!(d.0.get_version_num(), 4);
    }
}
