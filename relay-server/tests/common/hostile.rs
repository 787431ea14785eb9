//! Builders of hostile frames for the hostile-device suites (`hostile.rs` against an in-process
//! relay, `hostile_process.rs` against the relay process): sync messages encoded by hand so they
//! can say what Automerge never would, and a seeded generator of them.

use crdt_model::OrderId;
use crdt_model::wire::ClientFrame;
use serde_bytes::ByteBuf;

pub fn leb(out: &mut Vec<u8>, mut v: u64) {
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

pub fn hashes(out: &mut Vec<u8>, hs: &[automerge::ChangeHash]) {
    leb(out, hs.len() as u64);
    for h in hs {
        out.extend(h.0);
    }
}

/// An encoded sync message, built by hand so it can say what Automerge would never say.
pub fn raw_message(
    heads: &[automerge::ChangeHash],
    haves: &[Vec<u8>],
    changes: &[Vec<u8>],
) -> Vec<u8> {
    let mut m = vec![0x42];
    hashes(&mut m, heads);
    hashes(&mut m, &[]);
    leb(&mut m, haves.len() as u64);
    for bloom in haves {
        hashes(&mut m, &[]);
        leb(&mut m, bloom.len() as u64);
        m.extend(bloom);
    }
    leb(&mut m, changes.len() as u64);
    for c in changes {
        leb(&mut m, c.len() as u64);
        m.extend(c);
    }
    m
}

/// Bloom filter bytes with the given parameters and `bits` bytes of bits.
pub fn bloom(entries: u64, bits_per_entry: u64, probes: u64, bits: usize) -> Vec<u8> {
    let mut b = Vec::new();
    leb(&mut b, entries);
    leb(&mut b, bits_per_entry);
    leb(&mut b, probes);
    b.extend(std::iter::repeat_n(0xffu8, bits));
    b
}

pub fn sync_frame(order: OrderId, data: Vec<u8>) -> ClientFrame {
    ClientFrame::Sync {
        order: order.to_string(),
        data: ByteBuf::from(data),
    }
}

/// A small seeded generator of hostile sync messages: structured ones (random counts, Bloom
/// parameters, chunk headers) and mutations of real ones.
pub struct Gen(pub u64);

impl Gen {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A sync message: a mutation of a real one, random Bloom filters, a random chunk, or
    /// random bytes behind a sync message's first byte.
    pub fn sync_message(&mut self, real: &[u8], heads: &[automerge::ChangeHash]) -> Vec<u8> {
        match self.below(4) {
            0 => {
                let mut m = real.to_vec();
                for _ in 0..=self.below(4) {
                    if !m.is_empty() {
                        let at = self.below(m.len() as u64) as usize;
                        m[at] = self.next() as u8;
                    }
                }
                m
            }
            1 => {
                let haves: Vec<Vec<u8>> = (0..self.below(12))
                    .map(|_| {
                        let (e, b, p) = (self.below(40), self.below(70), self.below(40));
                        let bits = ((e * b).div_ceil(8)) as usize;
                        let bits = if self.below(3) == 0 {
                            self.below(64) as usize
                        } else {
                            bits
                        };
                        bloom(e, b, p, bits)
                    })
                    .collect();
                raw_message(heads, &haves, &[])
            }
            2 => {
                let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83];
                let rest = self.below(300) as usize;
                chunk.extend(self.bytes(4));
                chunk.push(self.below(5) as u8);
                leb(&mut chunk, rest as u64);
                chunk.extend(self.bytes(rest));
                raw_message(heads, &[], &[chunk])
            }
            _ => {
                let n = self.below(200) as usize;
                let mut m = vec![0x42 + self.below(2) as u8];
                m.extend(self.bytes(n));
                m
            }
        }
    }

    /// A pushed `changes` frame's contents (protocol 2): mutations of real change chunks,
    /// random chunk headers (documents, unknown types, lying lengths), real changes out of
    /// order or twice, and heads of the wrong size or naming changes nobody has.
    pub fn push(
        &mut self,
        real: &[Vec<u8>],
        heads: &[automerge::ChangeHash],
    ) -> (Vec<ByteBuf>, Vec<ByteBuf>) {
        let mut changes: Vec<Vec<u8>> = Vec::new();
        for _ in 0..=self.below(4) {
            let pick = real
                .get(self.below(real.len() as u64) as usize)
                .cloned()
                .unwrap_or_default();
            let entry = match self.below(5) {
                0 => pick,
                1 => {
                    let mut m = pick;
                    for _ in 0..=self.below(4) {
                        if !m.is_empty() {
                            let at = self.below(m.len() as u64) as usize;
                            m[at] = self.next() as u8;
                        }
                    }
                    m
                }
                2 => {
                    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83];
                    let rest = self.below(300) as usize;
                    chunk.extend(self.bytes(4));
                    chunk.push(self.below(5) as u8);
                    leb(&mut chunk, (rest + self.below(3) as usize) as u64);
                    chunk.extend(self.bytes(rest));
                    chunk
                }
                3 => {
                    let mut m = pick.clone();
                    m.extend(pick);
                    m
                }
                _ => {
                    let n = self.below(100) as usize;
                    self.bytes(n)
                }
            };
            changes.push(entry);
        }
        let heads = match self.below(4) {
            0 => heads.iter().map(|h| ByteBuf::from(h.0.to_vec())).collect(),
            1 => vec![ByteBuf::from(self.bytes(32))],
            2 => {
                let n = self.below(40) as usize;
                vec![ByteBuf::from(self.bytes(n))]
            }
            _ => Vec::new(),
        };
        (changes.into_iter().map(ByteBuf::from).collect(), heads)
    }
}
