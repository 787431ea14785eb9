//! The relay core driven directly, with no socket, thread or clock: the regressions of issue
//! 12's defects that live in the core (1: a write built on a failed one; 3: eviction dropping
//! followers; 6: a receipt overtaking the change it names), and protocol 2's pushed changes
//! (fan-out encoded once, duplicates, reordering, a pusher that lacks a committed change),
//! against a real redb store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use automerge::sync::{self, SyncDoc};
use automerge::{ChangeHash, ReadDoc};
use crdt_model::wire::{RelayFrame, codes, heads_from_wire};
use crdt_model::*;
use relay_server::RelayError;
use relay_server::core::{ConnId, CoreConfig, Origin, Output, RelayCore};
use relay_server::metrics::Metrics;
use relay_server::store::{OrderWrite, RelayStore};

const T0: i64 = 1_700_000_000_000;

/// A core, a real store, and what the core sent to each connection.
struct Rig {
    core: RelayCore,
    metrics: Arc<Metrics>,
    store: RelayStore,
    _dir: tempfile::TempDir,
    /// Frames per connection, in the order the core emitted them.
    sent: HashMap<ConnId, Vec<RelayFrame>>,
    /// Writes the core asked for; committed by [`Rig::step`] unless `hold` is set.
    commits: VecDeque<OrderWrite>,
    hold: bool,
    now: i64,
    /// The connections of every broadcast (one frame, encoded once, for all of them).
    broadcasts: Vec<Vec<ConnId>>,
    /// Loads fail (the disk refuses reads).
    fail_loads: bool,
}

impl Rig {
    fn new(capacity: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = RelayStore::open(dir.path()).unwrap();
        let id = store.identity().unwrap();
        let metrics = Arc::new(Metrics::default());
        let core = RelayCore::new(
            id.device,
            id.epoch,
            store.seal_key(),
            Box::new(SplitMix64::new(5)),
            Arc::clone(&metrics),
            CoreConfig {
                capacity,
                limits: Default::default(),
                shared: false,
            },
        )
        .unwrap();
        Self {
            core,
            metrics,
            store,
            _dir: dir,
            sent: HashMap::new(),
            commits: VecDeque::new(),
            hold: false,
            now: T0,
            broadcasts: Vec::new(),
            fail_loads: false,
        }
    }

    /// A new core on the same store, as after a relay restart (outputs of the old one lost).
    fn restart(&mut self) {
        let id = self.store.identity().unwrap();
        self.core = RelayCore::new(
            id.device,
            id.epoch,
            self.store.seal_key(),
            Box::new(SplitMix64::new(6)),
            Arc::clone(&self.metrics),
            CoreConfig::default(),
        )
        .unwrap();
        self.commits.clear();
        self.sent.clear();
    }

    /// Carries out everything the core asked for, until it asks for nothing more.
    fn step(&mut self) {
        loop {
            while let Some(out) = self.core.poll_output() {
                match out {
                    Output::Send { conn, frame } => self.sent.entry(conn).or_default().push(frame),
                    Output::Broadcast { conns, frame } => {
                        self.broadcasts.push(conns.clone());
                        for conn in conns {
                            self.sent.entry(conn).or_default().push(frame.clone());
                        }
                    }
                    Output::Close {
                        conn,
                        code,
                        message,
                    } => self
                        .sent
                        .entry(conn)
                        .or_default()
                        .push(RelayFrame::error(code, message, true)),
                    Output::Load { order } => {
                        let loaded = if self.fail_loads {
                            Err(RelayError::Internal("the disk refuses reads".into()))
                        } else {
                            self.store.load_order(order)
                        };
                        self.core.handle_loaded(self.now, order, loaded);
                    }
                    Output::ReadTail { order, from } => {
                        let read = if self.fail_loads {
                            Err(RelayError::Internal("the disk refuses reads".into()))
                        } else {
                            self.store.load_tail(order, from)
                        };
                        self.core.handle_tail_read(self.now, order, read);
                    }
                    Output::Commit { write } => self.commits.push_back(*write),
                    Output::Publish { .. } | Output::Reply { .. } => {}
                }
            }
            if self.hold || self.commits.is_empty() {
                return;
            }
            while let Some(w) = self.commits.pop_front() {
                self.resolve(w, true);
            }
        }
    }

    /// Answers one write: committed to the store, or failed.
    fn resolve(&mut self, w: OrderWrite, ok: bool) {
        self.now += 1;
        let result = if ok {
            self.store
                .commit(std::slice::from_ref(&w))
                .map(|mut o| o.remove(0))
        } else {
            Err(RelayError::Internal("disk on fire".into()))
        };
        self.core.handle_committed(self.now, w.order, result);
    }

    fn frames(&mut self, conn: ConnId) -> Vec<RelayFrame> {
        self.sent.remove(&conn).unwrap_or_default()
    }
}

/// A till: an order and its sync state with the relay.
struct Till {
    origin: Origin,
    writer: Writer,
    rng: SplitMix64,
    order: Order,
    state: sync::State,
    at: i64,
}

impl Till {
    fn new(rig: &Rig, conn: u64, seed: u64) -> (Self, DeviceId) {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        let store = StoreId::new("s1").unwrap();
        let writer = Writer::new(device, 1);
        let new = NewOrder {
            id: OrderId::generate(Timestamp(T0 + seed as i64), &mut rng),
            store: store.clone(),
            currency: Currency::new("EUR").unwrap(),
        };
        let order = Order::create(new, writer.clone(), Timestamp(T0), &mut rng).unwrap();
        let _ = rig;
        let origin = Origin {
            conn: ConnId(conn),
            device,
            store,
        };
        let till = Self {
            origin,
            writer,
            rng,
            order,
            state: sync::State::new(),
            at: T0,
        };
        (till, device)
    }

    /// Another till's view of the same order (a fresh document fetched later).
    fn follower(&self, conn: u64, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        let writer = Writer::new(device, 1);
        let order = Order::from_doc(self.order.doc().clone(), writer.clone()).unwrap();
        Self {
            origin: Origin {
                conn: ConnId(conn),
                device,
                store: self.origin.store.clone(),
            },
            writer,
            rng,
            order,
            state: sync::State::new(),
            at: T0,
        }
    }

    fn add_line(&mut self, price: i64) -> ChangeHash {
        self.at += 1;
        let draft = LineDraft {
            name: format!("item {price}"),
            unit_price: price,
            quantity: 1,
            ..Default::default()
        };
        self.order
            .add_line(Timestamp(self.at), &mut self.rng, draft)
            .unwrap();
        self.order.heads()[0]
    }

    /// Sends the till's next sync message, if it has one.
    fn push(&mut self, rig: &mut Rig) -> bool {
        let Some(m) = self.order.doc().generate_sync_message(&mut self.state) else {
            return false;
        };
        rig.core
            .handle_sync(rig.now, self.origin.clone(), self.order.id(), m);
        rig.step();
        true
    }

    /// Pushes `changes` with `heads` as the till's heads (protocol 2).
    fn push_changes(&mut self, rig: &mut Rig, changes: &[ChangeHash], heads: Vec<ChangeHash>) {
        let changes = changes
            .iter()
            .map(|h| self.order.doc().get_change_by_hash(h).unwrap().clone())
            .collect();
        rig.core.handle_push(
            rig.now,
            self.origin.clone(),
            self.order.id(),
            changes,
            heads,
        );
        rig.step();
    }

    /// Applies the relay's sync and forwarded frames among `frames`; returns the other frames.
    fn take(&mut self, frames: Vec<RelayFrame>) -> Vec<RelayFrame> {
        let mut rest = Vec::new();
        for f in frames {
            match f {
                RelayFrame::Changes { changes, .. } => {
                    let changes: Vec<automerge::Change> = changes
                        .iter()
                        .map(|c| automerge::Change::from_bytes(c.to_vec()).unwrap())
                        .collect();
                    self.order.doc_mut().apply_changes(changes).unwrap();
                    self.order.refresh().unwrap();
                }
                RelayFrame::Sync { data, .. } => {
                    let m = sync::Message::decode(&data).unwrap();
                    self.order
                        .doc_mut()
                        .receive_sync_message(&mut self.state, m)
                        .unwrap();
                    self.order.refresh().unwrap();
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Runs the sync loop until neither side has anything to say.
    fn settle(&mut self, rig: &mut Rig) -> Vec<RelayFrame> {
        let mut others = Vec::new();
        for _ in 0..20 {
            let pushed = self.push(rig);
            let frames = rig.frames(self.origin.conn);
            let quiet = frames.is_empty();
            others.extend(self.take(frames));
            if !pushed && quiet {
                break;
            }
        }
        let _ = &self.writer;
        others
    }
}

fn receipts(frames: &[RelayFrame]) -> Vec<Vec<ChangeHash>> {
    frames
        .iter()
        .filter_map(|f| match f {
            RelayFrame::Receipt { heads, .. } => Some(heads_from_wire(heads).unwrap()),
            _ => None,
        })
        .collect()
}

fn stored_has(rig: &Rig, order: OrderId, h: &ChangeHash) -> bool {
    rig.store
        .load_order(order)
        .unwrap()
        .is_some_and(|s| s.to_doc().unwrap().get_change_by_hash(h).is_some())
}

/// Defect 1: a write queued behind a failed one must not commit (it builds on changes that are
/// not on disk) nor be receipted. The core keeps one write per order in flight, so the later
/// change waits; when the first fails, both senders are told and nothing reaches the store.
#[test]
fn a_write_behind_a_failed_commit_is_never_stored_or_receipted() {
    let mut rig = Rig::new(100);
    let (mut a, _) = Till::new(&rig, 1, 1);
    a.settle(&mut rig);
    let id = a.order.id();
    assert!(rig.store.load_order(id).unwrap().is_some(), "created");
    rig.hold = true;
    let c2 = a.add_line(100);
    // A Bloom filter false positive can keep c2 out of the first message: sync until the
    // relay has it (its write is then in flight).
    for _ in 0..5 {
        if !rig.commits.is_empty() {
            break;
        }
        a.push(&mut rig);
        let frames = rig.frames(ConnId(1));
        a.take(frames);
    }
    assert_eq!(rig.commits.len(), 1, "the first write is in flight");
    let c3 = a.add_line(200);
    // A second till sends c3 too (same order, another connection), while c2 is in flight.
    let mut b = a.follower(2, 2);
    b.push(&mut rig);
    a.push(&mut rig);
    assert_eq!(
        rig.commits.len(),
        1,
        "nothing more goes to disk while a write is in flight"
    );
    let w = rig.commits.pop_front().unwrap();
    rig.resolve(w, false);
    rig.step();
    assert!(
        rig.commits.is_empty(),
        "no write built on the failed one: {:?}",
        rig.commits.len()
    );
    let fa = rig.frames(ConnId(1));
    let fb = rig.frames(ConnId(2));
    for f in fa.iter().chain(&fb) {
        assert!(
            !matches!(f, RelayFrame::Receipt { .. }),
            "receipt after a failed commit: {f:?}"
        );
    }
    assert!(
        fa.iter()
            .any(|f| matches!(f, RelayFrame::Error { code, .. } if code == codes::STORAGE)),
        "the sender of c2 is told: {fa:?}"
    );
    assert!(!stored_has(&rig, id, &c2) && !stored_has(&rig, id, &c3));
    // The relay starts a fresh round with the till (no timer needed): answering it, the till
    // sends what the relay lacks again, and both changes are stored.
    assert!(
        fa.iter().any(|f| matches!(f, RelayFrame::Sync { .. })),
        "a fresh sync round follows the failure: {fa:?}"
    );
    rig.hold = false;
    a.take(fa);
    let others = a.settle(&mut rig);
    assert!(stored_has(&rig, id, &c2) && stored_has(&rig, id, &c3));
    let last = receipts(&others).pop().expect("a receipt after the retry");
    // Issue 14, finding 6: the gauge of receipts awaited returns to zero, failures included.
    assert_eq!(
        rig.metrics
            .receipts_pending
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(last.contains(&c3) || a.order.heads().iter().all(|h| last.contains(h)));
}

/// Defect 6: a receipt names only heads the device has (those it announced), and comes after
/// any sync message the relay sends it in the same round.
#[test]
fn a_receipt_never_names_a_change_the_device_lacks() {
    let mut rig = Rig::new(100);
    let (mut a, _) = Till::new(&rig, 1, 3);
    // The till sends its order and, before reading anything, a line: the relay's number change
    // is committed meanwhile and the till has not seen it.
    a.push(&mut rig);
    a.add_line(100);
    a.push(&mut rig);
    let mut checked = 0;
    for _ in 0..10 {
        let frames = rig.frames(ConnId(1));
        let mut frames = frames;
        // Apply in order, checking each receipt against the document at that point.
        for f in frames.drain(..) {
            match f {
                RelayFrame::Receipt { heads, .. } => {
                    for h in heads_from_wire(&heads).unwrap() {
                        assert!(
                            a.order.doc().get_change_by_hash(&h).is_some(),
                            "receipt names {h}, not (yet) on the device"
                        );
                    }
                    checked += 1;
                }
                other => {
                    a.take(vec![other]);
                }
            }
        }
        if !a.push(&mut rig) && rig.sent.is_empty() {
            break;
        }
    }
    assert!(
        checked >= 2,
        "receipts for the order and for the line: {checked}"
    );
    let number = a.order.number().unwrap();
    assert_eq!(number.map(|n| n.0), Some(1), "the number arrived");
}

/// Defect 3: an order that leaves the cache keeps its followers: when another till changes it,
/// the follower gets the change without asking again.
#[test]
fn eviction_keeps_followers_subscribed() {
    let mut rig = Rig::new(2);
    let (mut a, _) = Till::new(&rig, 1, 4);
    a.settle(&mut rig);
    let mut b = a.follower(2, 5);
    b.settle(&mut rig);
    // Other orders push it out of the cache (capacity 2).
    for i in 0..6u64 {
        let (mut o, _) = Till::new(&rig, 10 + i, 100 + i);
        o.settle(&mut rig);
    }
    assert!(rig.core.orders_in_memory() <= 3, "the cache is bounded");
    rig.frames(ConnId(2));
    let c = a.add_line(700);
    a.settle(&mut rig);
    assert!(stored_has(&rig, a.order.id(), &c));
    let to_b = rig.frames(ConnId(2));
    assert!(
        to_b.iter().any(|f| matches!(f, RelayFrame::Sync { .. })),
        "the follower heard of the change: {to_b:?}"
    );
    b.take(to_b);
    b.settle(&mut rig);
    assert!(b.order.doc().get_change_by_hash(&c).is_some(), "and got it");
}

fn forwarded(frames: &[RelayFrame]) -> Vec<ChangeHash> {
    frames
        .iter()
        .filter_map(|f| match f {
            RelayFrame::Changes { changes, .. } => Some(changes),
            _ => None,
        })
        .flatten()
        .map(|c| automerge::Change::from_bytes(c.to_vec()).unwrap().hash())
        .collect()
}

/// Protocol 2: a pushed change is committed, receipted with the pusher's heads, and forwarded
/// to the followers in step as it was stored, in one frame encoded once for all of them; the
/// pusher does not get its own change back.
#[test]
fn a_pushed_change_is_receipted_and_forwarded_once_to_followers_in_step() {
    let mut rig = Rig::new(100);
    let (mut a, _) = Till::new(&rig, 1, 1);
    let created = a.order.heads();
    a.push_changes(&mut rig, &created, created.clone());
    let frames = rig.frames(ConnId(1));
    assert_eq!(receipts(&frames), vec![created.clone()]);
    // The relay's number change reaches the pusher as a forwarded change.
    let number = forwarded(&frames);
    assert_eq!(number.len(), 1, "{frames:?}");
    a.take(frames);
    assert!(a.order.number().unwrap().is_some());
    // Two followers fetch the order with a sync round and are then in step.
    let mut b = a.follower(2, 2);
    let mut c = a.follower(3, 3);
    b.settle(&mut rig);
    c.settle(&mut rig);
    rig.broadcasts.clear();

    let line = a.add_line(450);
    a.push_changes(&mut rig, &[line], vec![line]);
    let to_a = rig.frames(ConnId(1));
    assert_eq!(receipts(&to_a), vec![vec![line]]);
    assert!(forwarded(&to_a).is_empty(), "not echoed: {to_a:?}");
    assert_eq!(rig.broadcasts, vec![vec![ConnId(2), ConnId(3)]]);
    for t in [&mut b, &mut c] {
        let frames = rig.frames(t.origin.conn);
        assert_eq!(forwarded(&frames), vec![line]);
        assert!(
            frames.iter().all(|f| !matches!(f, RelayFrame::Sync { .. })),
            "no sync message for a follower in step: {frames:?}"
        );
        t.take(frames);
        assert_eq!(t.order.heads(), a.order.heads());
    }
    assert!(stored_has(&rig, a.order.id(), &line));
}

/// Protocol 2: a change pushed before its dependency waits (nothing is stored or receipted),
/// the relay asks with a sync message; once the dependency comes, both are stored, and pushing
/// the same changes again stores nothing more and refuses nothing.
#[test]
fn pushed_changes_out_of_order_and_twice_are_stored_once() {
    let mut rig = Rig::new(100);
    let (mut a, _) = Till::new(&rig, 1, 1);
    let created = a.order.heads();
    a.push_changes(&mut rig, &created, created.clone());
    let frames = rig.frames(ConnId(1));
    a.take(frames);
    let c2 = a.add_line(100);
    let c3 = a.add_line(200);
    let heads = a.order.heads();
    assert_eq!(heads, vec![c3]);
    // c3 first: its dependency c2 is missing.
    a.push_changes(&mut rig, &[c3], heads.clone());
    let frames = rig.frames(ConnId(1));
    assert!(receipts(&frames).is_empty(), "{frames:?}");
    assert!(
        frames.iter().any(|f| matches!(f, RelayFrame::Sync { .. })),
        "the relay asks for what is missing: {frames:?}"
    );
    assert!(!stored_has(&rig, a.order.id(), &c3));
    // Then c2, and both again.
    a.push_changes(&mut rig, &[c2], heads.clone());
    a.push_changes(&mut rig, &[c2, c3], heads.clone());
    let frames = rig.frames(ConnId(1));
    assert!(
        frames
            .iter()
            .all(|f| !matches!(f, RelayFrame::Rejected { .. } | RelayFrame::Error { .. })),
        "{frames:?}"
    );
    assert_eq!(receipts(&frames), vec![heads.clone()]);
    assert!(stored_has(&rig, a.order.id(), &c2));
    assert!(stored_has(&rig, a.order.id(), &c3));
    let accepted = rig
        .metrics
        .changes_accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    // The order's creation, its number, c2 and c3: each once.
    assert_eq!(accepted, 4);
}

/// Protocol 2: a device that pushes from heads lacking a committed change (it missed the
/// relay's number change while its connection was down) is answered with a sync round, which
/// brings it the change; it is not left waiting for a forward that will never come.
#[test]
fn a_pusher_that_lacks_a_committed_change_gets_a_sync_round() {
    let mut rig = Rig::new(100);
    let (mut a, _) = Till::new(&rig, 1, 1);
    let created = a.order.heads();
    a.push_changes(&mut rig, &created, created.clone());
    // The connection drops before the number change is delivered.
    let _lost = rig.frames(ConnId(1));
    rig.core.handle_disconnect(ConnId(1));
    assert!(a.order.number().unwrap().is_none());
    // A new connection; the till edits and pushes from what it has.
    a.origin.conn = ConnId(7);
    a.state = sync::State::new();
    let line = a.add_line(300);
    a.push_changes(&mut rig, &[line], vec![line]);
    let frames = rig.frames(ConnId(7));
    assert!(
        frames.iter().any(|f| matches!(f, RelayFrame::Sync { .. })),
        "{frames:?}"
    );
    a.take(frames);
    a.settle(&mut rig);
    assert!(a.order.number().unwrap().is_some(), "the number arrived");
    assert!(stored_has(&rig, a.order.id(), &line));
}

/// An order stored and numbered whose number change did not reach the disk before a crash is
/// touched at start; when that load fails, the core loads it again later by itself (a device
/// may never come back to the order), and the number is written.
#[test]
fn a_touched_order_whose_load_failed_is_loaded_again_later() {
    let mut rig = Rig::new(100);
    let (a, _) = Till::new(&rig, 1, 1);
    let created = a.order.heads();
    rig.hold = true;
    let changes = created
        .iter()
        .map(|h| a.order.doc().get_change_by_hash(h).unwrap().clone())
        .collect();
    rig.core.handle_push(
        rig.now,
        a.origin.clone(),
        a.order.id(),
        changes,
        created.clone(),
    );
    rig.step();
    let first = rig.commits.pop_front().unwrap();
    rig.resolve(first, true);
    rig.step();
    // The number change's write is in flight when the relay dies.
    assert_eq!(rig.commits.len(), 1);
    let id = a.order.id();
    assert_eq!(rig.store.unnumbered(10).unwrap(), vec![id]);
    rig.restart();
    rig.hold = false;
    rig.fail_loads = true;
    rig.core.handle_touch(rig.now, id);
    rig.step();
    let at = rig.core.poll_timeout().expect("a retry is scheduled");
    assert!(at > rig.now);
    // Not due yet: nothing happens.
    rig.core.handle_timeout(at - 1);
    rig.step();
    assert_eq!(rig.store.unnumbered(10).unwrap(), vec![id]);
    rig.fail_loads = false;
    rig.now = at;
    rig.core.handle_timeout(at);
    rig.step();
    assert_eq!(rig.core.poll_timeout(), None);
    assert!(rig.store.unnumbered(10).unwrap().is_empty());
    let stored = rig.store.load_order(id).unwrap().unwrap().to_doc().unwrap();
    assert_eq!(number_of(&stored).unwrap(), Some(OrderNumber(1)));
}
