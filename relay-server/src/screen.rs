//! Screening of a device's sync message before Automerge sees it.
//!
//! Automerge trusts what it decodes: a Bloom filter with zero bits per entry divides by zero, a
//! filter with millions of probes allocates and loops for each of them, a deflated change or
//! document column inflates without bound. [`screen`] walks the encoded message itself (the
//! format of `automerge::sync::Message::encode` in automerge 0.12) and refuses anything outside
//! [`Limits`] before `Message::decode` runs:
//!
//! ```text
//! message   = type(0x42|0x43) hashes(heads) hashes(need) count have* count change* [flags]
//! hashes    = uleb(count) 32-byte-hash*
//! have      = hashes(last_sync) uleb(len) bloom
//! bloom     = <empty> | uleb(entries) uleb(bits_per_entry) uleb(probes) bits(ceil(entries*bpe/8))
//! change    = uleb(len) chunk+
//! chunk     = 85 6f 4a 83, checksum(4), type(1), uleb(len), payload(len)
//! ```
//!
//! Chunk types: 0 document (columns may be deflated), 1 change, 2 deflated change. Every deflated
//! part is inflated here through a bounded reader, so nothing expands past the limits later.

use std::io::Read;

/// Limits on what one device frame may make the relay do. Every field has a documented default
/// (`docs/operations.md`, "Limits").
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most hashes in a message's `heads`, `need`, or one `have` entry's `last_sync`.
    pub max_hashes: usize,
    /// Most `have` entries (Bloom filters) in one message. Automerge sends one.
    pub max_haves: usize,
    /// Accepted Bloom filter bits per entry. Automerge uses 10.
    pub bloom_bits_per_entry: std::ops::RangeInclusive<u32>,
    /// Accepted Bloom filter probes. Automerge uses 7.
    pub bloom_probes: std::ops::RangeInclusive<u32>,
    /// Most change entries in one message.
    pub max_changes: usize,
    /// Largest change, inflated, in bytes.
    pub max_change_bytes: usize,
    /// Largest document chunk (a whole order sent at once), inflated, in bytes.
    pub max_document_bytes: usize,
    /// Most bytes one message may inflate to in total.
    pub max_inflated_bytes: usize,
    /// Most times a deflated part may grow when inflated.
    pub max_inflate_ratio: usize,
    /// Change chunks kept per (order, connection) while they wait for a missing dependency.
    pub max_queued_changes: usize,
    /// Bytes of such chunks kept per (order, connection).
    pub max_queued_bytes: usize,
    /// Bytes of such chunks kept per connection, over all its orders.
    pub max_queued_bytes_per_conn: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_hashes: 256,
            max_haves: 8,
            bloom_bits_per_entry: 1..=64,
            bloom_probes: 1..=32,
            max_changes: 4096,
            max_change_bytes: 1024 * 1024,
            max_document_bytes: 8 * 1024 * 1024,
            max_inflated_bytes: 16 * 1024 * 1024,
            max_inflate_ratio: 64,
            max_queued_changes: 64,
            max_queued_bytes: 4 * 1024 * 1024,
            max_queued_bytes_per_conn: 8 * 1024 * 1024,
        }
    }
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The bytes do not follow the format (or a Bloom filter is insane): `bad_sync_message`.
    Malformed(String),
    /// The message is well formed but asks for more than the limits allow: `limit_exceeded`.
    TooMuch(String),
    /// A change chunk does not decode: `bad_change`.
    BadChange(String),
}

impl Refusal {
    /// The wire error code for this refusal.
    pub fn code(&self) -> &'static str {
        use crdt_model::wire::codes;
        match self {
            Self::Malformed(_) => codes::BAD_SYNC_MESSAGE,
            Self::TooMuch(_) => codes::LIMIT_EXCEEDED,
            Self::BadChange(_) => codes::BAD_CHANGE,
        }
    }

    /// The explanation sent to the device.
    pub fn message(&self) -> &str {
        match self {
            Self::Malformed(m) | Self::TooMuch(m) | Self::BadChange(m) => m,
        }
    }
}

/// What screening learnt about an accepted message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Screened {
    /// Change entries in the message.
    pub changes: usize,
    /// Bytes all of its chunks take once inflated.
    pub inflated_bytes: usize,
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const HASH_LEN: usize = 32;

struct Cursor<'a> {
    rest: &'a [u8],
}

fn malformed(what: impl Into<String>) -> Refusal {
    Refusal::Malformed(what.into())
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, Refusal> {
        let (&b, rest) = self
            .rest
            .split_first()
            .ok_or_else(|| malformed("message ends early"))?;
        self.rest = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.rest.len() {
            return Err(malformed(format!(
                "wants {n} bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    /// An unsigned LEB128 number of at most 64 bits.
    fn uleb(&mut self) -> Result<u64, Refusal> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(malformed("LEB128 number overflows 64 bits"));
            }
            value |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("LEB128 number too long"))
    }

    fn usize(&mut self) -> Result<usize, Refusal> {
        usize::try_from(self.uleb()?).map_err(|_| malformed("number too large"))
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        u32::try_from(self.uleb()?).map_err(|_| malformed("number exceeds 32 bits"))
    }

    fn hashes(&mut self, what: &str, limits: &Limits) -> Result<(), Refusal> {
        let n = self.usize()?;
        if n > limits.max_hashes {
            return Err(Refusal::TooMuch(format!(
                "{n} hashes in {what}, at most {}",
                limits.max_hashes
            )));
        }
        self.take(n.saturating_mul(HASH_LEN)).map(|_| ())
    }
}

/// Checks one encoded Bloom filter the way automerge 0.12 decodes it.
fn check_bloom(bytes: &[u8], limits: &Limits) -> Result<(), Refusal> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut c = Cursor { rest: bytes };
    let entries = c.u32()?;
    let bits_per_entry = c.u32()?;
    let probes = c.u32()?;
    if !limits.bloom_bits_per_entry.contains(&bits_per_entry) {
        return Err(malformed(format!(
            "Bloom filter with {bits_per_entry} bits per entry"
        )));
    }
    if !limits.bloom_probes.contains(&probes) {
        return Err(malformed(format!("Bloom filter with {probes} probes")));
    }
    // ceil(entries * bits_per_entry / 8), in integers (both are u32, the product fits u64).
    let bits = (u64::from(entries) * u64::from(bits_per_entry)).div_ceil(8);
    let bits = usize::try_from(bits).map_err(|_| malformed("Bloom filter too large"))?;
    if entries == 0 || bits == 0 {
        return Err(malformed("Bloom filter with no bits"));
    }
    if c.rest.len() != bits {
        return Err(malformed(format!(
            "Bloom filter of {entries} entries needs {bits} bytes, has {}",
            c.rest.len()
        )));
    }
    Ok(())
}

/// Inflates `deflated` (raw DEFLATE) into `out`, refusing output over `cap` bytes or
/// [`Limits::max_inflate_ratio`] times the input. Returns the inflated length.
fn bounded_inflate(
    deflated: &[u8],
    cap: usize,
    limits: &Limits,
    mut out: Option<&mut Vec<u8>>,
) -> Result<usize, Refusal> {
    let cap = cap.min(
        deflated
            .len()
            .saturating_mul(limits.max_inflate_ratio)
            .max(4096),
    );
    let decoder = flate2::bufread::DeflateDecoder::new(deflated);
    let mut limited = decoder.take(cap as u64 + 1);
    let mut sink = [0u8; 16 * 1024];
    let mut total = 0usize;
    loop {
        let n = limited
            .read(&mut sink)
            .map_err(|e| Refusal::BadChange(format!("deflated data does not inflate: {e}")))?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
        if let Some(o) = out.as_deref_mut() {
            o.extend_from_slice(&sink[..n]);
        }
        if total > cap {
            return Err(Refusal::TooMuch(format!(
                "{} deflated bytes inflate to more than {cap}",
                deflated.len()
            )));
        }
    }
}

/// Walks a document chunk's payload to its columns and bounds every deflated one.
fn check_document(payload: &[u8], limits: &Limits) -> Result<usize, Refusal> {
    let bad = |m: Refusal| match m {
        Refusal::Malformed(s) => Refusal::BadChange(format!("document chunk: {s}")),
        other => other,
    };
    let mut c = Cursor { rest: payload };
    let actors = c.usize().map_err(bad)?;
    for _ in 0..actors {
        let n = c.usize().map_err(bad)?;
        c.take(n).map_err(bad)?;
    }
    let heads = c.usize().map_err(bad)?;
    c.take(heads.saturating_mul(HASH_LEN)).map_err(bad)?;
    let mut columns: Vec<(u32, usize)> = Vec::new();
    for _ in 0..2 {
        let n = c.usize().map_err(bad)?;
        if n > 1024 {
            return Err(Refusal::BadChange(format!("document with {n} columns")));
        }
        for _ in 0..n {
            let spec = c.u32().map_err(bad)?;
            let len = c.usize().map_err(bad)?;
            columns.push((spec, len));
        }
    }
    let mut inflated = payload.len();
    for (spec, len) in columns {
        let data = c.take(len).map_err(bad)?;
        if spec & 0b1000 != 0 {
            let left = limits.max_document_bytes.saturating_sub(inflated);
            inflated += bounded_inflate(data, left, limits, None)?;
        }
    }
    if inflated > limits.max_document_bytes {
        return Err(Refusal::TooMuch(format!(
            "document chunk inflates to {inflated} bytes, at most {}",
            limits.max_document_bytes
        )));
    }
    Ok(inflated)
}

/// Checks a chunk's checksum: the first 4 bytes of SHA-256 over its type, its length (uLEB128)
/// and its (inflated) payload, as Automerge computes it.
fn check_sum(checksum: &[u8], kind: u8, payload: &[u8]) -> Result<(), Refusal> {
    use sha2::{Digest, Sha256};
    let mut prefix = vec![kind];
    let mut len = payload.len() as u64;
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            prefix.push(b);
            break;
        }
        prefix.push(b | 0x80);
    }
    let mut h = Sha256::new();
    h.update(&prefix);
    h.update(payload);
    let digest = h.finalize();
    if digest.get(..4) == Some(checksum) {
        Ok(())
    } else {
        Err(Refusal::BadChange(
            "a chunk's checksum does not match".into(),
        ))
    }
}

/// Decodes one change chunk (sizes are already bounded), so a corrupt change is refused with
/// an error instead of being dropped silently by Automerge's partial load.
fn parse_change(chunk: &[u8]) -> Result<(), Refusal> {
    automerge::Change::from_bytes(chunk.to_vec())
        .map(|_| ())
        .map_err(|e| Refusal::BadChange(format!("a change does not decode: {e}")))
}

/// Checks the chunks of one change entry; returns the bytes they take once inflated.
fn check_chunks(mut entry: &[u8], limits: &Limits) -> Result<usize, Refusal> {
    if entry.is_empty() {
        return Err(Refusal::BadChange("empty change entry".into()));
    }
    let mut total = 0usize;
    while !entry.is_empty() {
        let mut c = Cursor { rest: entry };
        let header = (|| -> Result<(&[u8], u8, &[u8]), Refusal> {
            let magic = c.take(4)?;
            if magic != MAGIC {
                return Err(malformed("not an Automerge chunk (bad magic bytes)"));
            }
            let checksum = c.take(4)?;
            let kind = c.byte()?;
            let len = c.usize()?;
            Ok((checksum, kind, c.take(len)?))
        })();
        let (checksum, kind, payload) =
            header.map_err(|e| Refusal::BadChange(e.message().to_owned()))?;
        let chunk = &entry[..entry.len() - c.rest.len()];
        let size = match kind {
            1 => {
                if payload.len() > limits.max_change_bytes {
                    return Err(Refusal::TooMuch(format!(
                        "a change of {} bytes, at most {}",
                        payload.len(),
                        limits.max_change_bytes
                    )));
                }
                check_sum(checksum, 1, payload)?;
                parse_change(chunk)?;
                payload.len()
            }
            2 => {
                let mut inflated = Vec::new();
                let n = bounded_inflate(
                    payload,
                    limits.max_change_bytes,
                    limits,
                    Some(&mut inflated),
                )?;
                check_sum(checksum, 1, &inflated)?;
                parse_change(chunk)?;
                n
            }
            0 => {
                check_sum(checksum, 0, payload)?;
                check_document(payload, limits)?
            }
            other => {
                return Err(Refusal::BadChange(format!(
                    "chunk type {other} is not accepted from devices"
                )));
            }
        };
        total = total.saturating_add(size);
        if total > limits.max_inflated_bytes {
            return Err(Refusal::TooMuch(format!(
                "changes inflate to more than {} bytes",
                limits.max_inflated_bytes
            )));
        }
        entry = c.rest;
    }
    Ok(total)
}

/// The heads a document chunk declares, if `entry` is a document chunk. Automerge loads a
/// document into a non-empty one change by change and drops silently what does not load; a
/// head it declares that the document lacks afterwards shows such a loss.
pub fn document_heads(entry: &[u8]) -> Option<Vec<automerge::ChangeHash>> {
    let mut c = Cursor { rest: entry };
    if c.take(4).ok()? != MAGIC {
        return None;
    }
    c.take(4).ok()?;
    if c.byte().ok()? != 0 {
        return None;
    }
    let len = c.usize().ok()?;
    let mut p = Cursor {
        rest: c.take(len).ok()?,
    };
    let actors = p.usize().ok()?;
    for _ in 0..actors {
        let n = p.usize().ok()?;
        p.take(n).ok()?;
    }
    let n = p.usize().ok()?;
    let mut heads = Vec::new();
    for _ in 0..n {
        heads.push(automerge::ChangeHash(
            p.take(HASH_LEN).ok()?.try_into().ok()?,
        ));
    }
    Some(heads)
}

/// `total` plus `more` inflated bytes, refused past [`Limits::max_inflated_bytes`].
fn add_inflated(total: usize, more: usize, limits: &Limits) -> Result<usize, Refusal> {
    let total = total.saturating_add(more);
    if total > limits.max_inflated_bytes {
        return Err(Refusal::TooMuch(format!(
            "changes inflate to more than {} bytes",
            limits.max_inflated_bytes
        )));
    }
    Ok(total)
}

/// Checks an encoded sync message against `limits` without decoding it through Automerge.
pub fn screen(data: &[u8], limits: &Limits) -> Result<Screened, Refusal> {
    let mut c = Cursor { rest: data };
    let kind = c.byte()?;
    if kind != 0x42 && kind != 0x43 {
        return Err(malformed(format!(
            "not a sync message (type byte {kind:#04x})"
        )));
    }
    c.hashes("heads", limits)?;
    c.hashes("need", limits)?;
    let haves = c.usize()?;
    if haves > limits.max_haves {
        return Err(Refusal::TooMuch(format!(
            "{haves} Bloom filters, at most {}",
            limits.max_haves
        )));
    }
    for _ in 0..haves {
        c.hashes("last_sync", limits)?;
        let len = c.usize()?;
        check_bloom(c.take(len)?, limits)?;
    }
    let changes = c.usize()?;
    if changes > limits.max_changes {
        return Err(Refusal::TooMuch(format!(
            "{changes} changes in one message, at most {}",
            limits.max_changes
        )));
    }
    let mut inflated = 0usize;
    for _ in 0..changes {
        let len = c.usize()?;
        let entry = c.take(len)?;
        inflated = add_inflated(inflated, check_chunks(entry, limits)?, limits)?;
    }
    Ok(Screened {
        changes,
        inflated_bytes: inflated,
    })
}

/// The header of an entry that is exactly one change chunk (plain or deflated).
struct ChangeChunk<'a> {
    checksum: &'a [u8],
    kind: u8,
    len: usize,
}

impl<'a> ChangeChunk<'a> {
    fn parse(entry: &'a [u8]) -> Option<Self> {
        let mut c = Cursor { rest: entry };
        if c.take(4).ok()? != MAGIC {
            return None;
        }
        let checksum = c.take(4).ok()?;
        let kind = c.byte().ok()?;
        let len = c.usize().ok()?;
        c.take(len).ok()?;
        ((kind == 1 || kind == 2) && c.rest.is_empty()).then_some(Self {
            checksum,
            kind,
            len,
        })
    }
}

/// Screens and decodes the changes of a pushed `changes` frame (protocol 2) against `limits`:
/// at most [`Limits::max_changes`] entries, each exactly one change chunk (plain or deflated; a
/// whole document is not a change), with a valid checksum, that decodes, within the size
/// limits. A plain change is parsed once: its hash (SHA-256 over the chunk) gives the checksum
/// to compare; a deflated one is inflated through the bounded reader first.
pub fn screen_changes<B: AsRef<[u8]>>(
    chunks: &[B],
    limits: &Limits,
) -> Result<Vec<automerge::Change>, Refusal> {
    if chunks.len() > limits.max_changes {
        return Err(Refusal::TooMuch(format!(
            "{} changes in one frame, at most {}",
            chunks.len(),
            limits.max_changes
        )));
    }
    let mut inflated = 0usize;
    let mut out = Vec::with_capacity(chunks.len());
    for entry in chunks {
        let entry = entry.as_ref();
        let Some(ChangeChunk {
            checksum,
            kind,
            len,
        }) = ChangeChunk::parse(entry)
        else {
            return Err(Refusal::BadChange(
                "each pushed entry must be exactly one change chunk".into(),
            ));
        };
        let size = if kind == 1 {
            if len > limits.max_change_bytes {
                return Err(Refusal::TooMuch(format!(
                    "a change of {len} bytes, at most {}",
                    limits.max_change_bytes
                )));
            }
            len
        } else {
            check_chunks(entry, limits)?
        };
        inflated = add_inflated(inflated, size, limits)?;
        let change = crdt_model::guard::decode_change(entry)
            .map_err(|e| Refusal::BadChange(format!("a change does not decode: {e}")))?;
        if kind == 1 && change.hash().0.get(..4) != Some(checksum) {
            return Err(Refusal::BadChange(
                "a chunk's checksum does not match".into(),
            ));
        }
        out.push(change);
    }
    Ok(out)
}

/// Screens and decodes a pushed `changes` frame (its changes and the device's heads); the
/// error is a wire code and a reason for the device.
pub fn decode_push(
    changes: &[serde_bytes::ByteBuf],
    heads: &[serde_bytes::ByteBuf],
    limits: &Limits,
) -> Result<Pushed, (&'static str, String)> {
    if heads.len() > limits.max_hashes {
        return Err((
            crdt_model::wire::codes::LIMIT_EXCEEDED,
            format!("{} heads, at most {}", heads.len(), limits.max_hashes),
        ));
    }
    let heads = crdt_model::wire::heads_from_wire(heads)
        .map_err(|e| (crdt_model::wire::codes::BAD_CHANGE, e.to_string()))?;
    let changes =
        screen_changes(changes, limits).map_err(|r| (r.code(), r.message().to_owned()))?;
    Ok(Pushed { changes, heads })
}

/// A pushed `changes` frame, screened and decoded.
#[derive(Debug)]
pub struct Pushed {
    /// The changes, in the order sent.
    pub changes: Vec<automerge::Change>,
    /// The device's heads after them.
    pub heads: Vec<automerge::ChangeHash>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{self, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    fn doc_with(n: usize) -> Automerge {
        let mut d = Automerge::new();
        for i in 0..n {
            let mut tx = d.transaction();
            tx.put(ROOT, format!("k{i}"), i as i64).unwrap();
            tx.commit();
        }
        d
    }

    #[test]
    fn real_messages_pass() {
        let a = doc_with(20);
        let b = doc_with(3);
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let limits = Limits::default();
        for _ in 0..6 {
            if let Some(m) = a.generate_sync_message(&mut sa) {
                screen(&m.encode(), &limits).unwrap();
            }
            if let Some(m) = b.generate_sync_message(&mut sb) {
                let bytes = m.encode();
                screen(&bytes, &limits).unwrap();
                let mut a2 = a.clone();
                a2.receive_sync_message(&mut sa, sync::Message::decode(&bytes).unwrap())
                    .unwrap();
            }
        }
        // A whole document (V2 messages carry one) passes too.
        let mut whole = vec![0x43, 0, 0, 0, 1];
        let saved = doc_with(200).save();
        leb(&mut whole, saved.len() as u64);
        whole.extend(&saved);
        assert_eq!(screen(&whole, &limits).unwrap().changes, 1);
    }

    fn leb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn with_bloom(entries: u64, bpe: u64, probes: u64, bits: usize) -> Vec<u8> {
        let mut bloom = Vec::new();
        leb(&mut bloom, entries);
        leb(&mut bloom, bpe);
        leb(&mut bloom, probes);
        bloom.extend(std::iter::repeat_n(0xffu8, bits));
        let mut m = vec![0x42, 0, 0, 1, 0];
        leb(&mut m, bloom.len() as u64);
        m.extend(bloom);
        m.push(0);
        m
    }

    #[test]
    fn insane_bloom_filters_are_refused() {
        let l = Limits::default();
        assert!(screen(&with_bloom(1, 10, 7, 2), &l).is_ok());
        assert!(matches!(
            screen(&with_bloom(3, 0, 7, 0), &l),
            Err(Refusal::Malformed(_))
        ));
        assert!(screen(&with_bloom(1, 10, 100_000, 2), &l).is_err());
        assert!(screen(&with_bloom(1, 10, 7, 5), &l).is_err());
        assert!(screen(&with_bloom(0, 10, 7, 0), &l).is_err());
    }

    #[test]
    fn a_deflate_bomb_is_refused_before_it_inflates() {
        use std::io::Write;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 64 * 1024 * 1024]).unwrap();
        let deflated = enc.finish().unwrap();
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0, 0, 0, 0, 2]);
        leb(&mut chunk, deflated.len() as u64);
        chunk.extend(&deflated);
        // Pushed as a change (protocol 2), it is refused the same way.
        assert!(matches!(
            screen_changes(std::slice::from_ref(&chunk), &Limits::default()),
            Err(Refusal::TooMuch(_))
        ));
        let mut m = vec![0x42, 0, 0, 0, 1];
        leb(&mut m, chunk.len() as u64);
        m.extend(chunk);
        assert!(matches!(
            screen(&m, &Limits::default()),
            Err(Refusal::TooMuch(_))
        ));
    }

    fn message_with(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![0x42, 0, 0, 0];
        leb(&mut m, chunks.len() as u64);
        for c in chunks {
            leb(&mut m, c.len() as u64);
            m.extend(c);
        }
        m
    }

    /// Every change of `d`, as raw chunks.
    fn raw_changes(d: &Automerge) -> Vec<Vec<u8>> {
        d.get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    #[test]
    fn corrupt_changes_are_refused() {
        let d = doc_with(3);
        let good = raw_changes(&d);
        let l = Limits::default();
        assert!(screen(&message_with(&good), &l).is_ok());
        let compressed: Vec<Vec<u8>> = doc_with(40)
            .get_changes(&[])
            .iter()
            .map(|c| c.clone().bytes().to_vec())
            .collect();
        assert!(screen(&message_with(&compressed), &l).is_ok());
        for at in [12, 20, good[1].len() - 1] {
            let mut bad = good.clone();
            bad[1][at] ^= 0x55;
            assert!(
                matches!(screen(&message_with(&bad), &l), Err(Refusal::BadChange(_))),
                "flip at {at}"
            );
        }
    }

    #[test]
    fn pushed_changes_are_screened() {
        let d = doc_with(3);
        let good = raw_changes(&d);
        let l = Limits::default();
        assert_eq!(screen_changes(&good, &l).unwrap().len(), 3);
        // Two changes in one entry, a whole document, a flipped byte, too many entries.
        let joined = vec![[good[0].clone(), good[1].clone()].concat()];
        assert!(matches!(
            screen_changes(&joined, &l),
            Err(Refusal::BadChange(_))
        ));
        assert!(matches!(
            screen_changes(&[d.save()], &l),
            Err(Refusal::BadChange(_))
        ));
        let mut bad = good.clone();
        bad[2][15] ^= 0x55;
        assert!(screen_changes(&bad, &l).is_err());
        // A checksum that does not match the change (the change itself parses).
        let mut bad = good.clone();
        bad[0][4] ^= 0x01;
        assert!(matches!(
            screen_changes(&bad, &l),
            Err(Refusal::BadChange(_))
        ));
        // Deflated changes pass through the bounded inflater and decode.
        let big: Vec<Vec<u8>> = doc_with(40)
            .get_changes(&[])
            .iter()
            .map(|c| c.clone().bytes().to_vec())
            .collect();
        assert_eq!(screen_changes(&big, &l).unwrap().len(), 40);
        let few = Limits {
            max_changes: 2,
            ..Limits::default()
        };
        assert!(matches!(
            screen_changes(&good, &few),
            Err(Refusal::TooMuch(_))
        ));
    }

    /// Mutated and spliced change chunks against the push screen: it never panics, and what
    /// it accepts is exactly one chunk whose checksum holds by SHA-256 computed here (over the
    /// chunk after magic and checksum), handed back byte for byte.
    #[test]
    fn mutated_pushed_changes_are_refused_or_sound() {
        use sha2::{Digest, Sha256};
        let real = raw_changes(&doc_with(6));
        let l = Limits::default();
        let mut x = 0x0bad_c0de_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..3000 {
            let mut entry = real[(next() % real.len() as u64) as usize].clone();
            match next() % 4 {
                0 => {}
                1 => {
                    for _ in 0..=next() % 3 {
                        let at = (next() % entry.len() as u64) as usize;
                        entry[at] = next() as u8;
                    }
                }
                2 => entry.truncate((next() % entry.len() as u64) as usize),
                _ => entry.extend(real[(next() % real.len() as u64) as usize].clone()),
            }
            match screen_changes(std::slice::from_ref(&entry), &l) {
                Ok(changes) => {
                    accepted += 1;
                    assert_eq!(changes.len(), 1);
                    assert_eq!(changes[0].raw_bytes(), &entry[..]);
                    let digest = Sha256::digest(&entry[8..]);
                    assert_eq!(&digest[..4], &entry[4..8], "checksum accepted wrongly");
                }
                Err(_) => refused += 1,
            }
        }
        assert!(accepted > 0 && refused > 0, "{accepted} / {refused}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let l = Limits::default();
        for n in 0..2000 {
            let mut bytes = vec![0x42];
            for _ in 0..(n % 97) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            let _ = screen(&bytes, &l);
        }
    }
}
