//! Mutating Automerge chunks the way a crafted input would: change bits of a chunk's payload and
//! recompute its checksum, so Automerge goes past its integrity check and decodes the damage.
//!
//! A chunk is `magic (85 6f 4a 83) | checksum (4) | type (1) | length (uLEB128) | payload`; the
//! checksum is the first 4 bytes of SHA-256 over type, length and payload. Type 0 is a document,
//! 1 a change, 2 a deflated change (not mutated: its payload is compressed). Saved documents,
//! change bytes and sync messages all hold such chunks. Shared with `replicator`'s tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::ops::Range;
use std::sync::Once;

use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// A chunk found in a byte string.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Where its magic starts.
    pub start: usize,
    /// Its type byte.
    pub kind: u8,
    /// Its payload.
    pub payload: Range<usize>,
}

fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn read_leb128(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for (i, b) in bytes.iter().enumerate().take(9) {
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

fn checksum(covered: &[u8]) -> [u8; 4] {
    let h = Sha256::digest(covered);
    [h[0], h[1], h[2], h[3]]
}

/// The chunks of `bytes` whose checksum holds, wherever they sit (top level or inside a sync
/// message), in order.
pub fn chunks(bytes: &[u8]) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 9 < bytes.len() {
        if bytes[i..i + 4] != MAGIC {
            i += 1;
            continue;
        }
        let found = read_leb128(&bytes[i + 9..]).and_then(|(len, n)| {
            let payload = i + 9 + n..i + 9 + n + len;
            (payload.end <= bytes.len()
                && checksum(&bytes[i + 8..payload.end]) == bytes[i + 4..i + 8])
                .then_some(Chunk {
                    start: i,
                    kind: bytes[i + 8],
                    payload,
                })
        });
        match found {
            Some(c) => {
                i = c.payload.end;
                out.push(c);
            }
            None => i += 1,
        }
    }
    out
}

/// Recomputes the checksum of `c` in `bytes`.
pub fn fix_checksum(bytes: &mut [u8], c: &Chunk) {
    let sum = checksum(&bytes[c.start + 8..c.payload.end]);
    bytes[c.start + 4..c.start + 8].copy_from_slice(&sum);
}

/// A whole chunk of `kind` around `payload`, checksum included.
pub fn chunk(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut covered = vec![kind];
    leb128(payload.len(), &mut covered);
    covered.extend_from_slice(payload);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&checksum(&covered));
    out.extend_from_slice(&covered);
    out
}

/// One damage to one chunk's payload. `Insert` and `Delete` change the chunk's length (the
/// header is rewritten), so they only suit chunks that are not framed inside something else.
#[derive(Clone, Copy, Debug)]
pub enum Mutation {
    Flip { chunk: usize, bit: usize },
    Set { chunk: usize, at: usize, value: u8 },
    Insert { chunk: usize, at: usize, value: u8 },
    Delete { chunk: usize, at: usize },
}

/// `bytes` with `m` applied and the damaged chunk's checksum recomputed.
pub fn mutate(bytes: &[u8], m: Mutation) -> Vec<u8> {
    let cs = chunks(bytes);
    let mut out = bytes.to_vec();
    let resize = |c: &Chunk, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut payload = bytes[c.payload.clone()].to_vec();
        edit(&mut payload);
        let mut out = bytes[..c.start].to_vec();
        out.extend(chunk(c.kind, &payload));
        out.extend_from_slice(&bytes[c.payload.end..]);
        out
    };
    match m {
        Mutation::Flip { chunk, bit } => {
            let c = &cs[chunk];
            out[c.payload.start + bit / 8] ^= 1 << (bit % 8);
            fix_checksum(&mut out, c);
        }
        Mutation::Set { chunk, at, value } => {
            let c = &cs[chunk];
            out[c.payload.start + at] = value;
            fix_checksum(&mut out, c);
        }
        Mutation::Insert { chunk, at, value } => {
            out = resize(&cs[chunk], &|p| p.insert(at, value));
        }
        Mutation::Delete { chunk, at } => {
            out = resize(&cs[chunk], &|p| {
                p.remove(at);
            });
        }
    }
    out
}

/// Every single-bit flip of the payloads of `bytes`'s uncompressed chunks.
pub fn all_flips(bytes: &[u8]) -> Vec<Mutation> {
    let mut out = Vec::new();
    for (i, c) in chunks(bytes).iter().enumerate() {
        if c.kind <= 1 {
            out.extend((0..c.payload.len() * 8).map(|bit| Mutation::Flip { chunk: i, bit }));
        }
    }
    out
}

/// `n` byte-level mutations of the uncompressed chunks of `bytes`: bytes set to 0x00, 0xff,
/// 0x7f, 0x80 or a random value and, if `resizable`, bytes inserted or deleted.
pub fn byte_mutations(bytes: &[u8], n: usize, resizable: bool, seed: u64) -> Vec<Mutation> {
    let cs: Vec<(usize, usize)> = chunks(bytes)
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind <= 1 && !c.payload.is_empty())
        .map(|(i, c)| (i, c.payload.len()))
        .collect();
    let mut rng = crdt_model::SplitMix64::new(seed);
    let mut next = move |below: usize| {
        use crdt_model::Entropy;
        (rng.next_u64() % below as u64) as usize
    };
    (0..n)
        .map(|_| {
            let (chunk, len) = cs[next(cs.len())];
            let at = next(len);
            let value = [0x00, 0xff, 0x7f, 0x80, next(256) as u8][next(5)];
            match next(if resizable { 4 } else { 2 }) {
                0 | 1 => Mutation::Set { chunk, at, value },
                2 => Mutation::Insert { chunk, at, value },
                _ => Mutation::Delete { chunk, at },
            }
        })
        .collect()
}

/// `n` of `all`, spread evenly by a seeded shuffle (all of them if `n` is larger).
pub fn sample<T: Clone>(all: &[T], n: usize, seed: u64) -> Vec<T> {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    let mut rng = crdt_model::SplitMix64::new(seed);
    for i in (1..idx.len()).rev() {
        use crdt_model::Entropy;
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n);
    idx.sort_unstable();
    idx.into_iter().map(|i| all[i].clone()).collect()
}

/// How many cases a corpus runs: `PANIC_CORPUS_CASES` if set, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("PANIC_CORPUS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Keeps the panics Automerge raises on the corpus (caught, expected, thousands of them) out of
/// the test output; every other panic still goes to the default hook. `PANIC_CORPUS_LOUD=1`
/// keeps them all.
pub fn quiet_automerge_panics() {
    static ONCE: Once = Once::new();
    if std::env::var_os("PANIC_CORPUS_LOUD").is_some() {
        return;
    }
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let inside = info.location().is_some_and(|l| {
                let f = l.file();
                f.contains("automerge-0.") || f.contains("hexane-")
            });
            if !inside {
                default(info);
            }
        }));
    });
}

/// Runs `f`, reporting whether it panicked instead of unwinding further.
pub fn panics<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| ())
}
