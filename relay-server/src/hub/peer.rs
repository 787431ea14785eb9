//! A connected device as the drivers see it: its outbox, its share of the workers (at most
//! [`FRAMES_IN_FLIGHT`] frames being handled at once: backpressure), and its feed gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use crdt_model::wire::{FeedEntry, RelayFrame};
use crdt_model::{DeviceId, StoreId};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::core::ConnId;

/// Frames of one connection handed to the workers and not handled yet. The connection stops
/// reading its socket while this many wait, so a device sending faster than the relay handles
/// its frames is slowed down (TCP backpressure) instead of queueing unbounded work, and a
/// worker's queue holds at most this many frames per connection: another device's frame waits
/// behind at most `FRAMES_IN_FLIGHT` frames of each connection.
pub const FRAMES_IN_FLIGHT: usize = 4;

/// Feed entries held for a connection while it catches up; past this the catch-up reads the
/// store again instead.
const FEED_HELD: usize = 10_000;

/// Live feed entries for a connection that is still catching up: held until the catch-up has
/// sent everything before them, so the device never sees a later position before an earlier
/// one (it persists the highest position it has seen).
#[derive(Debug, Default)]
pub struct FeedGate {
    /// Whether the catch-up is done (live entries go straight out).
    pub live: bool,
    /// Entries published while catching up.
    pub held: Vec<FeedEntry>,
    /// More than `FEED_HELD` entries were published while catching up: read the store again.
    pub overflowed: bool,
    /// The highest feed position sent since going live (or caught up to). With several
    /// relays the live feed is read back from the database, in order, and may repeat what the
    /// catch-up already sent: a live entry at or below it is not sent again. (With one relay
    /// live entries of different workers may come out of order and are all sent.)
    pub sent_upto: u64,
}

/// A connected, authenticated device.
#[derive(Debug)]
pub struct Peer {
    /// The connection.
    pub conn: ConnId,
    /// The device the token belongs to.
    pub device: DeviceId,
    /// Its store.
    pub store: StoreId,
    outbox: mpsc::Sender<Bytes>,
    closed: AtomicBool,
    /// Permits for frames handed to the workers.
    pub(crate) in_flight: Arc<Semaphore>,
    /// The feed gate (see [`FeedGate`]).
    pub(crate) feed: Mutex<FeedGate>,
    /// Woken when the hub gives up on the connection (outbox overflow or a fatal error).
    pub kill: Notify,
}

impl Peer {
    pub(crate) fn new(
        conn: ConnId,
        device: DeviceId,
        store: StoreId,
        outbox: mpsc::Sender<Bytes>,
    ) -> Self {
        Self {
            conn,
            device,
            store,
            outbox,
            closed: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(FRAMES_IN_FLIGHT)),
            feed: Mutex::new(FeedGate::default()),
            kill: Notify::new(),
        }
    }

    /// Queues a frame for the connection. A connection that cannot keep up is closed rather
    /// than letting its queue grow without bound.
    pub fn send(&self, frame: RelayFrame) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        self.send_encoded(Bytes::from(frame.encode()));
    }

    /// Queues an already encoded frame (a broadcast encodes once for every connection).
    pub fn send_encoded(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.outbox.try_send(frame).is_err() {
            self.closed.store(true, Ordering::Relaxed);
            self.kill.notify_one();
        }
    }

    /// Sends a fatal error frame, then closes the connection (the frame goes out first).
    pub fn fail(&self, code: &str, message: impl Into<String>) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let frame = RelayFrame::error(code, message, true);
        let _ = self.outbox.try_send(Bytes::from(frame.encode()));
        self.kill.notify_one();
    }

    /// Whether the hub gave up on this connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// A feed frame from the live feed: sent if the connection has caught up, else held.
    pub(crate) fn offer_feed(&self, encoded: &Bytes, entries: &[FeedEntry], in_order: bool) {
        let Ok(mut gate) = self.feed.lock() else {
            return;
        };
        if gate.live {
            // Sent under the gate's lock, so it cannot overtake the catch-up's last page.
            let upto = gate.sent_upto;
            let last = entries.iter().map(|e| e.seq).max().unwrap_or(0);
            if !in_order || entries.iter().all(|e| e.seq > upto) {
                self.send_encoded(encoded.clone());
            } else {
                let fresh: Vec<FeedEntry> =
                    entries.iter().filter(|e| e.seq > upto).cloned().collect();
                if fresh.is_empty() {
                    return;
                }
                self.send(RelayFrame::Feed { entries: fresh });
            }
            gate.sent_upto = upto.max(last);
        } else if gate.held.len() + entries.len() > FEED_HELD {
            gate.held.clear();
            gate.overflowed = true;
        } else if !gate.overflowed {
            gate.held.extend_from_slice(entries);
        }
    }

    /// Ends the catch-up after the store was read up to `since`: sends the held entries after
    /// `since` and goes live. `false` if entries were dropped while holding (read again).
    pub(crate) fn go_live(&self, since: u64) -> bool {
        let Ok(mut gate) = self.feed.lock() else {
            return true;
        };
        if gate.overflowed {
            gate.overflowed = false;
            return false;
        }
        let mut held = std::mem::take(&mut gate.held);
        held.retain(|e| e.seq > since);
        held.sort_unstable_by_key(|e| e.seq);
        held.dedup_by(|a, b| a.order == b.order && a.seq == b.seq);
        gate.sent_upto = held.last().map_or(since, |e| e.seq.max(since));
        if !held.is_empty() {
            self.send(RelayFrame::Feed { entries: held });
        }
        gate.live = true;
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crdt_model::{SplitMix64, Timestamp};

    fn entry(seq: u64) -> FeedEntry {
        FeedEntry {
            seq,
            order: format!("order-{seq}"),
            number: Some(seq),
            status: "in_progress".into(),
            heads: Vec::new(),
            voucher: None,
        }
    }

    fn peer() -> (Peer, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(64);
        let device = DeviceId::generate(Timestamp(1), &mut SplitMix64::new(1));
        let store = StoreId::new("s1").unwrap();
        (Peer::new(ConnId(1), device, store, tx), rx)
    }

    fn feed(entries: Vec<FeedEntry>) -> (Bytes, Vec<FeedEntry>) {
        let frame = RelayFrame::Feed {
            entries: entries.clone(),
        };
        (Bytes::from(frame.encode()), entries)
    }

    fn seqs(rx: &mut mpsc::Receiver<Bytes>) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            if let RelayFrame::Feed { entries } = RelayFrame::decode(&b).unwrap() {
                out.push(entries.iter().map(|e| e.seq).collect());
            }
        }
        out
    }

    /// Issue 12, defect 2: a live entry published while the connection catches up must not
    /// reach the device before the catch-up's pages (the device keeps the highest position it
    /// saw; a dropped socket would then skip the rest of the catch-up for good).
    #[test]
    fn live_entries_wait_for_the_catch_up() {
        let (p, mut rx) = peer();
        let (bytes, entries) = feed(vec![entry(7), entry(4)]);
        p.offer_feed(&bytes, &entries, true);
        assert!(seqs(&mut rx).is_empty(), "held while catching up");
        // The catch-up read the store up to 5 (4 came with its pages): only 7 is new.
        assert!(p.go_live(5));
        assert_eq!(seqs(&mut rx), vec![vec![7]]);
        let (bytes, entries) = feed(vec![entry(8)]);
        p.offer_feed(&bytes, &entries, true);
        assert_eq!(seqs(&mut rx), vec![vec![8]], "live now");
    }

    /// With several relays the live feed is read back from the database: an entry the
    /// catch-up already sent (or one sent live before) is not sent again.
    #[test]
    fn live_entries_already_sent_are_not_repeated() {
        let (p, mut rx) = peer();
        assert!(p.go_live(6));
        let (bytes, entries) = feed(vec![entry(5), entry(6), entry(7)]);
        p.offer_feed(&bytes, &entries, true);
        assert_eq!(seqs(&mut rx), vec![vec![7]]);
        let (bytes, entries) = feed(vec![entry(7)]);
        p.offer_feed(&bytes, &entries, true);
        assert!(seqs(&mut rx).is_empty(), "7 was sent already");
        let (bytes, entries) = feed(vec![entry(8), entry(9)]);
        p.offer_feed(&bytes, &entries, true);
        assert_eq!(seqs(&mut rx), vec![vec![8, 9]]);
    }

    /// Too many entries while catching up: the gate drops them and asks for another read.
    #[test]
    fn an_overflowing_catch_up_reads_again() {
        let (p, mut rx) = peer();
        let many: Vec<FeedEntry> = (1..=FEED_HELD as u64 + 1).map(entry).collect();
        let (bytes, entries) = feed(many);
        p.offer_feed(&bytes, &entries, true);
        assert!(!p.go_live(0), "read the store again");
        assert!(p.go_live(FEED_HELD as u64 + 1));
        assert!(seqs(&mut rx).is_empty());
    }
}
