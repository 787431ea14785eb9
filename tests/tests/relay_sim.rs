//! Deterministic simulation of terminals against the real relay core (issue 12).
//!
//! Several replicator engines (`replicator::core::Engine`, sans-IO, each with its
//! `MemoryStore`) talk to two shards of the real [`RelayCore`] (orders routed by id as
//! `Hub::worker` does) over a simulated network, on a virtual clock, with a simulated store
//! behind the cores. Everything is driven by one seed, so a run replays exactly. Two to four
//! terminals; with three or more, the last one works for a second store. Cashiers create and
//! edit orders, take payments, complete, deliver and delete them; now and then a device forges
//! an order number (the relay must refuse it) or asks for another store's order, and the back
//! office changes an order's status through the core. Each core keeps only a few orders in
//! memory, so orders are evicted and loaded again.
//!
//! The parts, all in this file:
//!
//! * **SimStore**: the store semantics of `relay-server/src/store/orders.rs` and `feed.rs` in
//!   memory: per-store numbers from 1, gap-free, assigned on an order's first persist; one feed
//!   position per write (the order's old position leaves the feed); a write whose `base` is not
//!   the stored heads is refused with `Conflict` and writes nothing; compaction replaces
//!   snapshot and tail. Its maps are the durable state: a relay crash loses everything else.
//! * **Committer and loads**: `Output::Commit` goes to one FIFO committer (as the real single
//!   committer thread), answered after a delay; `Output::Load` is answered after a delay and
//!   read from the store when answered. Faults: a commit or load answered with an error (a
//!   failed commit writes nothing), slow disk (long delays), and a relay crash: the cores and
//!   every connection are dropped, each commit in flight either landed or not, and a new pair
//!   of cores starts later from the store.
//! * **Network**: one frame queue per connection and direction with random delays, FIFO within
//!   a connection (TCP) and interleaved at random across connections; cut connections (the
//!   device's frames already sent may or may not reach the relay first), partitions (nothing
//!   moves for a while, connects fail), and duplicated reconnect rounds: a ghost connection of
//!   the same device receives a copy of every frame of the round (its answers are lost, as if
//!   the device had given up on that socket).
//! * **Connection glue** (the driver part, mirroring `relay-server/src/conn.rs`, kept minimal):
//!   `hello` → `welcome`, then the feed catch-up in pages read from the store, one page per
//!   delay; entries published meanwhile are held and sent after the last page (only those past
//!   it), then the connection is live. Sync frames are screened (`screen::screen`), decoded and
//!   handed to the order's core; ping is answered. `Output::Close` sends the fatal error frame
//!   and closes. Everything about orders goes through the real core.
//!
//! **Shared mode** (`relays_on_one_store_converge`, the PostgreSQL deployment of issue 15): the
//! two cores are two relays on one store, each serving the connections made to it (any device
//! to either, again after a cut or a kill) for every order. The store feed reaches each relay's
//! connections as read back from the store (as `hub::shared` does), each entry also told to
//! the relay's core (`RelayCore::handle_changed_elsewhere`); a relay hears of the other's
//! commits by notification (delayed; under faults one in ten is lost) and by a sweep of the
//! feed heads every second; one relay is killed alone (its connections drop, its commits in
//! flight land or not) or both at once. Its extra check, once settled: every order a relay
//! holds in memory is at the stored heads.
//!
//! Checked in every run (a failure names the seed and how to replay it):
//!
//! * safety, while it runs: when the core emits a receipt, the store durably holds every change
//!   it names; every change in a sync message the core sends is durable; a change the core
//!   refuses is not stored when it refuses it, and a forged one (a device writing the order
//!   number) is never stored nor forwarded; a Done or Deleted order never becomes active again; after
//!   every relay crash the store still holds every receipted change;
//! * safety, at the end: order numbers unique and gap-free per store, and each stored document
//!   carries its stored number; every payment captured on a terminal exists exactly once on the
//!   relay, with its amount; no device holds another store's order;
//! * the glue's promise: a device never sees a later feed position before an earlier one on a
//!   connection; and determinism: a seed replays event for event (`a_seed_replays_exactly`);
//! * liveness: after the faults stop and the network heals, within a bounded virtual time every
//!   engine has every order it holds Synced (except orders the relay refused: Blocked), holds the
//!   relay's heads for each, and has learned every order of its store from the feed (bound:
//!   120 s of virtual time, with no connection replaced after the network healed).
//!
//! `RELAY_SIM_SEEDS=N` (or `PROPTEST_CASES=N`) sets the number of seeds (default 256);
//! `RELAY_SIM_SEED=S` runs seed `S` only; `RELAY_SIM_ACTIONS=N` sets the random actions per
//! seed before the network heals (default 120); `SIM_TRACE=1` prints every frame, cut and crash.
//!
//! The relay-core bugs this simulation found (see the `known_bug*` tests, their regressions)
//! are fixed, so runs are strict by default: no connection is replaced to help convergence, and
//! every stored document must carry its number. `RELAY_SIM_LENIENT=1` brings back the
//! workarounds used while the bugs were open (connections replaced when the network heals and
//! every 10 s without convergence; numbers missing from a document tolerated);
//! `RELAY_SIM_RESEND=never|heal-once|watchdog` picks the connection-replacing one alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use automerge::sync;
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use crdt_model::wire::{ClientFrame, FeedEntry, RelayFrame, Version, codes, heads_from_wire};
use crdt_model::{
    ActiveStatus, Currency, DeviceId, Entropy, FinalPayment, LineDraft, OrderId, OrderNumber,
    OrderStatus, PaymentDraft, PaymentId, PaymentKind, PaymentState, SplitMix64, StoreId,
    Timestamp,
};
use relay_server::RelayError;
use relay_server::core::{ConnId, CoreConfig, Origin, Output, RelayCore, RequestId, feed_entry};
use relay_server::screen::Limits;
use relay_server::store::{CommitOutcome, OrderMeta, OrderWrite, StoredOrder, StoredTail};
use replicator::core::{Effect, Engine, EngineConfig};
use replicator::{Identity, LocalSyncStatus, MemoryStore, Store};

/// Relay shards (cores), as the hub's workers.
const SHARDS: usize = 2;
/// Orders each core keeps in memory: small, so orders are evicted and loaded again.
const CAPACITY: usize = 3;
/// Feed entries per catch-up page: small, so catch-ups take several pages.
const FEED_PAGE: usize = 2;
/// Random actions per seed before the network heals.
const ACTIONS: usize = 120;
/// Outside strict mode, how long the healed system may go without converging before every
/// connection is re-established, ms.
const WATCHDOG_MS: i64 = 10_000;
/// Virtual time the healed system gets to converge, ms.
const SETTLE_MS: i64 = 120_000;
/// Shared mode: how often each relay compares the store's feed heads with what it read (the
/// catch-up for missed notifications), ms.
const SWEEP_MS: i64 = 1_000;

fn trace_on() -> bool {
    std::env::var("SIM_TRACE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The simulation's randomness: one seed, everything drawn from it.
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    /// `true` with probability `p` per thousand.
    fn chance(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }
}

fn short(id: &impl ToString) -> String {
    let s = id.to_string();
    s[s.len().saturating_sub(6)..].to_owned()
}

fn shard_of(order: &OrderId) -> usize {
    let b = order.as_bytes();
    let x = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    (x % SHARDS as u64) as usize
}

fn hash_of(change: &[u8]) -> ChangeHash {
    Change::from_bytes(change.to_vec())
        .expect("the core commits whole changes")
        .hash()
}

// ----- the simulated store ----------------------------------------------------------------

/// One stored order.
struct SimOrder {
    meta: OrderMeta,
    snapshot: Vec<u8>,
    tail: Vec<Vec<u8>>,
    /// Every change ever written for the order.
    hashes: HashSet<ChangeHash>,
}

impl SimOrder {
    fn doc(&self) -> Automerge {
        crdt_model::guard::load_with_increments(&self.snapshot, self.tail.iter().map(Vec::as_slice))
            .expect("stored order loads")
    }
}

/// The store semantics of `store/orders.rs` and `store/feed.rs`, in memory. All of it is
/// durable: a relay crash keeps exactly this.
#[derive(Default)]
struct SimStore {
    orders: BTreeMap<OrderId, SimOrder>,
    /// Orders stored with a number their document does not carry yet (the store's
    /// `unnumbered` list): the relay loads them at start.
    unnumbered: BTreeSet<OrderId>,
    /// Per store: (last number, feed head).
    stores: BTreeMap<String, (u64, u64)>,
    /// Per store: feed position → order.
    feed: BTreeMap<(String, u64), OrderId>,
}

impl SimStore {
    fn commit(&mut self, w: &OrderWrite) -> Result<CommitOutcome, RelayError> {
        let prev = self.orders.get(&w.order);
        if let Some(p) = prev
            && p.meta.store != w.store
        {
            return Err(RelayError::Invalid(format!(
                "order {} belongs to store {}",
                w.order, p.meta.store
            )));
        }
        let stored: BTreeSet<[u8; 32]> = prev
            .map(|p| p.meta.heads.iter().copied().collect())
            .unwrap_or_default();
        if stored != w.base.iter().copied().collect::<BTreeSet<_>>() {
            return Err(RelayError::Conflict(format!(
                "order {}: base is not the stored heads",
                w.order
            )));
        }
        let key = w.store.to_string();
        let (mut last, head) = self.stores.get(&key).copied().unwrap_or((0, 0));
        let seq = head + 1;
        let (number, newly, created_at, old_seq) = match prev {
            Some(p) => (
                p.meta.number,
                false,
                p.meta.created_at,
                Some(p.meta.feed_seq),
            ),
            None => match w.number {
                Some(n) => {
                    last = last.max(n.0);
                    (n, false, w.at, None)
                }
                None => {
                    last += 1;
                    (OrderNumber(last), true, w.at, None)
                }
            },
        };
        self.stores.insert(key.clone(), (last, seq));
        if w.number.is_some() {
            self.unnumbered.remove(&w.order);
        } else if newly {
            self.unnumbered.insert(w.order);
        }
        if let Some(old) = old_seq {
            self.feed.remove(&(key.clone(), old));
        }
        self.feed.insert((key, seq), w.order);
        let meta = OrderMeta {
            order: w.order,
            store: w.store.clone(),
            number,
            status: w.status,
            heads: w.heads.clone(),
            created_at,
            updated_at: w.at,
            feed_seq: seq,
            tail_len: 0,
        };
        let o = self.orders.entry(w.order).or_insert_with(|| SimOrder {
            meta: meta.clone(),
            snapshot: Vec::new(),
            tail: Vec::new(),
            hashes: HashSet::new(),
        });
        if let Some(s) = &w.compacted {
            o.snapshot.clone_from(s);
            o.tail.clear();
        } else {
            o.tail.extend(w.changes.iter().cloned());
        }
        o.hashes.extend(w.changes.iter().map(|c| hash_of(c)));
        o.meta = OrderMeta {
            tail_len: o.tail.len() as u32,
            ..meta
        };
        Ok(CommitOutcome {
            order: w.order,
            number,
            newly_numbered: newly,
            feed_seq: seq,
            meta: o.meta.clone(),
        })
    }

    fn load(&self, order: OrderId) -> Option<StoredOrder> {
        self.orders.get(&order).map(|o| StoredOrder {
            meta: o.meta.clone(),
            snapshot: o.snapshot.clone(),
            tail: o.tail.clone(),
        })
    }

    /// As `RelayStore::load_tail`: the metadata and the tail from position `from` on.
    fn load_tail(&self, order: OrderId, from: u32) -> Option<StoredTail> {
        self.orders.get(&order).map(|o| StoredTail {
            meta: o.meta.clone(),
            from,
            changes: o.tail.iter().skip(from as usize).cloned().collect(),
        })
    }

    fn feed_since(&self, store: &StoreId, since: u64, limit: usize) -> Vec<FeedEntry> {
        let s = store.to_string();
        self.feed
            .range((s.clone(), since + 1)..=(s, u64::MAX))
            .take(limit)
            .map(|(_, id)| {
                feed_entry(
                    &self.orders[id].meta,
                    &crdt_model::SealKey::from_bytes([7; 32]),
                )
            })
            .collect()
    }

    fn feed_head(&self, store: &StoreId) -> u64 {
        self.stores.get(store.as_str()).map_or(0, |s| s.1)
    }

    fn holds(&self, order: OrderId, hash: &ChangeHash) -> bool {
        self.orders
            .get(&order)
            .is_some_and(|o| o.hashes.contains(hash))
    }
}

// ----- the network and the connection glue ------------------------------------------------

/// One connection: the two frame queues (FIFO, each frame with its arrival time) and the
/// relay-side state `conn.rs` keeps around the core.
struct Conn {
    term: usize,
    /// A duplicate of a reconnect round: its answers are lost.
    ghost: bool,
    device: DeviceId,
    store: StoreId,
    to_relay: VecDeque<(i64, ClientFrame)>,
    to_device: VecDeque<(i64, RelayFrame)>,
    /// `hello` handled: registered for the feed.
    hello: bool,
    /// The highest feed position delivered to the device on this connection.
    feed_seen: u64,
    /// Catching up from this feed position; the next page is read at `page_at`.
    catching_up: Option<u64>,
    page_at: i64,
    /// Live feed entries held during the catch-up.
    held: Vec<FeedEntry>,
    /// The relay closed it (fatal error frame queued): nothing more is read from the device.
    closed_by_relay: bool,
    /// Shared mode: the relay (core) it is connected to.
    relay: usize,
    /// The highest feed position the relay sent on it (`Peer`'s feed gate: a live entry at
    /// or below it is not sent again).
    sent_upto: u64,
}

struct Terminal {
    engine: Engine,
    store: MemoryStore,
    identity: Identity,
    link: Option<ConnId>,
    ghost: Option<ConnId>,
    /// No frame moves and no connect succeeds before this time.
    partitioned_until: i64,
    rng: SplitMix64,
}

struct Relay {
    cores: Vec<RelayCore>,
}

struct Commit {
    at: i64,
    shard: usize,
    write: Box<OrderWrite>,
}

/// How the healed system gets connections replaced (the workaround for known bugs 1 and 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    /// When the network heals, and every [`WATCHDOG_MS`] while not converged (the default).
    Watchdog,
    /// Once, when the network heals.
    HealOnce,
    /// Never (the default, strict mode).
    Never,
}

/// One simulated world, for one seed.
struct World {
    seed: u64,
    rng: Rng,
    now: i64,
    trace: bool,
    /// Every trace line, when recording (the determinism test).
    recorded: Option<Vec<String>>,
    terms: Vec<Terminal>,
    relay: Option<Relay>,
    relay_device: DeviceId,
    relay_epoch: u32,
    relay_down_until: i64,
    store: SimStore,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    next_request: u64,
    /// The committer's FIFO queue.
    commits: VecDeque<Commit>,
    /// Loads in flight: (answer time, shard, order).
    /// Reads in flight: when, by which relay, which order, and `Some(from)` for a read of the
    /// tail from position `from` (`Output::ReadTail`), `None` for a whole order.
    loads: Vec<(i64, usize, OrderId, Option<u32>)>,
    /// Faults currently injected.
    faults: bool,
    /// One line-adding cashier edit in this many is a busy table (30 edits); 0: never.
    busy_every: u64,
    /// The workaround once used for known bugs 1 and 3 (see the `known_bug*` tests); off by default.
    resend: Resend,
    /// No tolerance for known bug 2: otherwise a stored order's document may still lack its
    /// number at the end (but never carries another one).
    strict_numbers: bool,
    failing_disk: bool,
    slow_disk: bool,
    /// Heads named by receipts, per order.
    receipted: BTreeMap<OrderId, BTreeSet<ChangeHash>>,
    /// Changes the core refused (a legitimate change refused with a forged one in the same
    /// message may be accepted later, alone).
    refused: HashSet<ChangeHash>,
    /// Changes that write an order number on a device: never to be stored nor forwarded.
    forged: HashSet<ChangeHash>,
    /// Payments seen captured on a terminal: amount.
    captured: BTreeMap<PaymentId, i64>,
    stats: Stats,
    /// Shared mode: the cores are separate relays on one store (the PostgreSQL deployment),
    /// each serving the connections made to it, for every order.
    shared: bool,
    /// Shared mode, per relay: the last feed position read, per store (`hub::shared`).
    seen: Vec<BTreeMap<StoreId, u64>>,
    /// Shared mode: feed notifications on their way: (arrival, relay, store).
    notices: Vec<(i64, usize, StoreId)>,
    /// Shared mode: when the relays next compare every store's feed head with what they read.
    next_sweep: i64,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    receipts: u64,
    refusals: u64,
    commits: u64,
    failed_commits: u64,
    failed_loads: u64,
    relay_crashes: u64,
    cuts: u64,
    ghosts: u64,
    term_crashes: u64,
    watchdog: u64,
    compactions: u64,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        backoff_min_ms: 50,
        backoff_max_ms: 2_000,
        retention_ms: i64::MAX / 4,
        compact_every: 16,
        ..EngineConfig::default()
    }
}

fn hs(hashes: &[ChangeHash]) -> String {
    let v: Vec<String> = hashes
        .iter()
        .map(|h| h.to_string()[..6].to_owned())
        .collect();
    format!("[{}]", v.join(" "))
}

/// A sync message in a trace: heads, need, and each change with its dependencies.
fn describe_sync(order: &str, data: &[u8]) -> String {
    let Ok(m) = sync::Message::decode(data) else {
        return format!("sync {} (undecodable)", short(&order));
    };
    let changes: Vec<String> = m
        .changes
        .iter()
        .map(|c| match Change::from_bytes(c.to_vec()) {
            Ok(c) => format!("{}<-{}", &c.hash().to_string()[..6], hs(c.deps())),
            Err(_) => "(chunk)".into(),
        })
        .collect();
    format!(
        "sync {} heads {} need {} changes [{}]",
        short(&order),
        hs(&m.heads),
        hs(&m.need),
        changes.join(" ")
    )
}

fn describe_client(f: &ClientFrame) -> String {
    match f {
        ClientFrame::Sync { order, data } => describe_sync(order, data),
        ClientFrame::Hello { feed_since, .. } => format!("hello feed_since {feed_since}"),
        ClientFrame::Changes {
            order,
            changes,
            heads,
            ..
        } => format!(
            "push {} changes {} heads {}",
            short(order),
            changes.len(),
            heads.len()
        ),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn describe_relay(f: &RelayFrame) -> String {
    match f {
        RelayFrame::Sync { order, data } => describe_sync(order, data),
        RelayFrame::Feed { entries } => format!(
            "feed {:?}",
            entries
                .iter()
                .map(|e| (short(&e.order), e.seq, e.status.clone()))
                .collect::<Vec<_>>()
        ),
        RelayFrame::Receipt { order, heads, .. } => {
            format!("receipt {} ({} heads)", short(order), heads.len())
        }
        other => format!("{other:?}").chars().take(90).collect(),
    }
}

impl World {
    fn new(seed: u64) -> Self {
        Self::new_with(seed, false)
    }

    fn new_with(seed: u64, shared: bool) -> Self {
        let mut rng = Rng(SplitMix64::new(seed));
        let n = 2 + rng.below(3) as usize;
        let mut ids = SplitMix64::new(seed ^ 0x5eed);
        let terms = (0..n)
            .map(|i| {
                // The last terminal of three or more works for a second store.
                let store = if n >= 3 && i == n - 1 { "s2" } else { "s1" };
                let identity = Identity {
                    device: DeviceId::generate(Timestamp(0), &mut ids),
                    store: StoreId::new(store).unwrap(),
                    epoch: i as u32 + 1,
                    relay_url: "sim".into(),
                    fallback_urls: Vec::new(),
                    token: "sim".into(),
                };
                let store = MemoryStore::new();
                store.set_identity(&identity).unwrap();
                Terminal {
                    engine: Engine::new(
                        identity.clone(),
                        Vec::new(),
                        0,
                        engine_config(),
                        seed ^ i as u64,
                    )
                    .unwrap(),
                    store,
                    identity,
                    link: None,
                    ghost: None,
                    partitioned_until: 0,
                    rng: SplitMix64::new(seed.wrapping_add(i as u64 * 7919)),
                }
            })
            .collect();
        let relay_device = DeviceId::generate(Timestamp(0), &mut ids);
        let mut w = Self {
            seed,
            rng,
            now: 1_000_000,
            trace: trace_on(),
            recorded: None,
            terms,
            relay: None,
            relay_device,
            relay_epoch: 7,
            relay_down_until: 0,
            store: SimStore::default(),
            conns: BTreeMap::new(),
            next_conn: 0,
            next_request: 0,
            commits: VecDeque::new(),
            loads: Vec::new(),
            faults: true,
            resend: Resend::Watchdog,
            busy_every: 0,
            strict_numbers: false,
            failing_disk: false,
            slow_disk: false,
            receipted: BTreeMap::new(),
            refused: HashSet::new(),
            forged: HashSet::new(),
            captured: BTreeMap::new(),
            stats: Stats::default(),
            shared,
            seen: vec![BTreeMap::new(); SHARDS],
            notices: Vec::new(),
            next_sweep: 0,
        };
        w.start_relay();
        for t in 0..n {
            w.terms[t].engine.handle_timeout(w.now);
            w.pump(t);
        }
        w
    }

    fn log(&mut self, what: impl FnOnce() -> String) {
        if self.trace || self.recorded.is_some() {
            let line = format!("[{:>8}] {}", self.now - 1_000_000, what());
            if self.trace {
                eprintln!("{line}");
            }
            if let Some(r) = self.recorded.as_mut() {
                r.push(line);
            }
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what}\n  replay: RELAY_SIM_SEED={} SIM_TRACE=1 cargo test -p e2e --test relay_sim -- --nocapture{}",
            self.seed,
            self.seed,
            if self.resend == Resend::Watchdog && !self.strict_numbers {
                ""
            } else {
                " (strict mode; RELAY_SIM_LENIENT=1 brings the old workarounds back)"
            }
        );
    }

    // ----- the relay process ----------------------------------------------------------------

    fn start_relay(&mut self) {
        let cores = (0..SHARDS).map(|s| self.new_core(s)).collect();
        self.relay = Some(Relay { cores });
        for s in 0..SHARDS {
            self.seen[s] = self.feed_heads();
        }
        self.log(|| "RELAY START".into());
        // As the hub does at start: orders whose number did not reach their document.
        let now = self.now;
        let unnumbered: Vec<OrderId> = self.store.unnumbered.iter().copied().collect();
        for order in unnumbered {
            let s = shard_of(&order);
            if let Some(r) = self.relay.as_mut() {
                r.cores[s].handle_touch(now, order);
            }
            self.drain(s);
        }
    }

    /// A core: shard `s` of the relay or, shared, relay `s` (its own actor epoch: several
    /// relays write the same orders at once, as each relay process has its own epoch).
    fn new_core(&mut self, s: usize) -> RelayCore {
        let epoch = if self.shared {
            self.relay_epoch + s as u32
        } else {
            self.relay_epoch
        };
        RelayCore::new(
            self.relay_device,
            epoch,
            crdt_model::SealKey::from_bytes([7; 32]),
            Box::new(SplitMix64::new(self.rng.0.next_u64() ^ s as u64)),
            Arc::new(relay_server::metrics::Metrics::default()),
            CoreConfig {
                capacity: CAPACITY,
                limits: Limits::default(),
                shared: self.shared,
            },
        )
        .unwrap()
    }

    /// Every store's feed head (what a relay reads at start, and at each sweep).
    fn feed_heads(&self) -> BTreeMap<StoreId, u64> {
        self.store
            .stores
            .iter()
            .map(|(s, (_, head))| (StoreId::new(s.as_str()).unwrap(), *head))
            .collect()
    }

    /// Shared mode: relay `r` alone dies (SIGKILL) and starts again at once with nothing in
    /// memory; its connections drop (their devices reconnect, to any relay), its commits in
    /// flight land or not, its loads and notifications are lost.
    fn crash_one(&mut self, r: usize) {
        if self.relay.is_none() {
            return;
        }
        self.stats.relay_crashes += 1;
        self.log(|| format!("RELAY {r} CRASH"));
        let in_flight: Vec<Commit> = self.commits.drain(..).collect();
        for c in in_flight {
            if c.shard != r {
                self.commits.push_back(c);
            } else if self.rng.chance(500) {
                self.log(|| {
                    format!(
                        "  commit of {} landed before the crash",
                        short(&c.write.order)
                    )
                });
                let _ = self.apply_commit(&c.write);
            }
        }
        self.loads.retain(|l| l.1 != r);
        self.notices.retain(|n| n.1 != r);
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.relay == r)
            .map(|(id, _)| *id)
            .collect();
        for cid in conns {
            self.drop_conn(cid, true);
        }
        let core = self.new_core(r);
        if let Some(relay) = self.relay.as_mut() {
            relay.cores[r] = core;
        }
        self.seen[r] = self.feed_heads();
        // As the hub does at start: orders whose number did not reach their document.
        let unnumbered: Vec<OrderId> = self.store.unnumbered.iter().copied().collect();
        let now = self.now;
        for order in unnumbered {
            if let Some(relay) = self.relay.as_mut() {
                relay.cores[r].handle_touch(now, order);
            }
            self.drain(r);
        }
        self.check_receipts_survive();
    }

    /// Shared mode: relay `r` reads `store`'s feed from where it left off, as `hub::shared`
    /// does: each entry to the core (another relay may have written the order), and the
    /// entries to its connections of the store.
    fn read_feed(&mut self, r: usize, store: &StoreId) {
        if self.relay.is_none() {
            return;
        }
        let since = self.seen[r].get(store).copied().unwrap_or(0);
        let entries = self.store.feed_since(store, since, usize::MAX);
        let Some(last) = entries.last().map(|e| e.seq) else {
            return;
        };
        self.log(|| {
            format!(
                "relay {r} reads feed {store} after {since}: {} entries",
                entries.len()
            )
        });
        for e in &entries {
            let id: OrderId = e.order.parse().unwrap();
            let heads = heads_from_wire(&e.heads).unwrap();
            let now = self.now;
            if self.trace {
                let held = self
                    .relay
                    .as_ref()
                    .and_then(|relay| relay.cores[r].committed_heads(id));
                let loading = self
                    .relay
                    .as_ref()
                    .is_some_and(|relay| relay.cores[r].is_loading(id));
                self.log(|| {
                    format!(
                        "  relay {r}: {} now at {}, held at {:?}, loading {loading}",
                        short(&id),
                        hs(&heads),
                        held.map(|h| hs(&h))
                    )
                });
            }
            if let Some(relay) = self.relay.as_mut() {
                relay.cores[r].handle_changed_elsewhere(now, id, heads);
            }
            self.drain(r);
        }
        self.seen[r].insert(store.clone(), last);
        self.publish_to(store, &entries, Some(r));
    }

    /// Shared mode: each relay compares every store's feed head with what it read.
    fn sweep(&mut self) {
        let heads = self.feed_heads();
        for r in 0..SHARDS {
            for (store, head) in &heads {
                if *head > self.seen[r].get(store).copied().unwrap_or(0) {
                    self.read_feed(r, store);
                }
            }
        }
    }

    /// The relay process dies: cores and connections gone, each commit in flight either
    /// landed or not, loads lost. Then every receipted change must still be stored.
    fn crash_relay(&mut self) {
        if self.relay.is_none() {
            return;
        }
        self.stats.relay_crashes += 1;
        self.relay = None;
        let in_flight: Vec<Commit> = self.commits.drain(..).collect();
        for c in in_flight {
            if self.rng.chance(500) {
                self.log(|| {
                    format!(
                        "  commit of {} landed before the crash",
                        short(&c.write.order)
                    )
                });
                let _ = self.apply_commit(&c.write);
            }
        }
        self.loads.clear();
        self.notices.clear();
        self.relay_down_until = self.now + self.rng.range(50, 1_500);
        self.log(|| "RELAY CRASH".into());
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for cid in conns {
            self.drop_conn(cid, true);
        }
        self.check_receipts_survive();
    }

    fn check_receipts_survive(&self) {
        for (order, heads) in &self.receipted {
            let Some(o) = self.store.orders.get(order) else {
                self.fail(format!("receipted order {order} is not stored"));
            };
            let doc = o.doc();
            for h in heads {
                if doc.get_change_by_hash(h).is_none() {
                    self.fail(format!(
                        "receipted change {h} of order {order} is not in the stored document"
                    ));
                }
            }
        }
    }

    // ----- connections ----------------------------------------------------------------------

    fn open_conn(&mut self, t: usize, ghost: bool) -> ConnId {
        self.next_conn += 1;
        let cid = ConnId(self.next_conn);
        // Shared: any relay (a device's list of relays, rotated on failure).
        let relay = if self.shared {
            self.rng.below(SHARDS as u64) as usize
        } else {
            0
        };
        let term = &self.terms[t];
        self.conns.insert(
            cid,
            Conn {
                term: t,
                ghost,
                device: term.identity.device,
                store: term.identity.store.clone(),
                to_relay: VecDeque::new(),
                to_device: VecDeque::new(),
                hello: false,
                feed_seen: 0,
                catching_up: None,
                page_at: 0,
                held: Vec::new(),
                closed_by_relay: false,
                relay,
                sent_upto: 0,
            },
        );
        cid
    }

    /// A frame's network delay: usually short, sometimes long.
    fn delay(&mut self) -> i64 {
        if self.faults && self.rng.chance(50) {
            self.rng.range(100, 800)
        } else {
            self.rng.range(0, 20)
        }
    }

    fn send_to_relay(&mut self, cid: ConnId, f: ClientFrame) {
        let d = self.delay();
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&cid) {
            let at = c.to_relay.back().map_or(now, |b| b.0).max(now + d);
            c.to_relay.push_back((at, f));
        }
    }

    fn send_to_device(&mut self, cid: ConnId, f: RelayFrame) {
        let d = self.delay();
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&cid) {
            let at = c.to_device.back().map_or(now, |b| b.0).max(now + d);
            c.to_device.push_back((at, f));
        }
    }

    /// Forgets a connection on both sides. `device_side`: the device learns (its engine is
    /// told the connection dropped), unless it is a ghost.
    fn drop_conn(&mut self, cid: ConnId, device_side: bool) {
        let Some(c) = self.conns.remove(&cid) else {
            return;
        };
        if let Some(r) = self.relay.as_mut() {
            for core in &mut r.cores {
                core.handle_disconnect(cid);
            }
        }
        let t = c.term;
        if self.terms[t].ghost == Some(cid) {
            self.terms[t].ghost = None;
        }
        if self.terms[t].link == Some(cid) {
            self.terms[t].link = None;
            if device_side {
                self.terms[t].engine.handle_disconnected(self.now);
                self.pump(t);
            }
        }
    }

    /// The connection is cut: some of the device's frames already sent still reach the relay,
    /// the rest are lost, as are the relay's frames not delivered yet.
    fn cut(&mut self, t: usize) {
        let links: Vec<ConnId> = [self.terms[t].ghost, self.terms[t].link]
            .into_iter()
            .flatten()
            .collect();
        for cid in links {
            self.stats.cuts += 1;
            let pending = self.conns.get(&cid).map_or(0, |c| c.to_relay.len());
            let reach = self.rng.below(pending as u64 + 1);
            self.log(|| {
                format!("T{t} CUT conn {cid} ({reach} of {pending} frames still reach the relay)")
            });
            for _ in 0..reach {
                self.deliver_to_relay(cid);
            }
            self.drop_conn(cid, true);
        }
    }

    fn reachable(&self, t: usize) -> bool {
        self.relay.is_some() && self.now >= self.terms[t].partitioned_until
    }

    // ----- terminals ------------------------------------------------------------------------

    /// Carries out the engine's effects (storage first), its connect requests, then puts its
    /// frames on the wire.
    fn pump(&mut self, t: usize) {
        loop {
            let mut connect = false;
            let term = &mut self.terms[t];
            while let Some(e) = term.engine.poll_effect() {
                match e {
                    Effect::Append {
                        order,
                        changes,
                        record,
                    } => term.store.append(order, &changes, &record).unwrap(),
                    Effect::Record { order, record } => {
                        let _ = term.store.put_record(order, &record);
                    }
                    Effect::Compact {
                        order,
                        snapshot,
                        record,
                    } => term.store.compact(order, &snapshot, &record).unwrap(),
                    Effect::Remove { order } => term.store.remove(order).unwrap(),
                    Effect::FeedSeq(s) => term.store.set_feed_seq(s).unwrap(),
                    Effect::RelayData(d) => term.store.set_relay_data(&d).unwrap(),
                    Effect::Connect => connect = true,
                }
            }
            while term.engine.poll_event().is_some() {}
            if !connect {
                break;
            }
            if self.reachable(t) {
                let cid = self.open_conn(t, false);
                self.terms[t].link = Some(cid);
                if self.faults && self.rng.chance(150) {
                    let g = self.open_conn(t, true);
                    self.terms[t].ghost = Some(g);
                    self.stats.ghosts += 1;
                    self.log(|| format!("T{t} CONNECT conn {cid} (+ ghost {g})"));
                } else {
                    self.log(|| format!("T{t} CONNECT conn {cid}"));
                }
                self.terms[t].engine.handle_connected(self.now);
            } else {
                self.log(|| format!("T{t} CONNECT fails"));
                self.terms[t].engine.handle_disconnected(self.now);
            }
        }
        while let Some(f) = self.terms[t].engine.poll_transmit() {
            if let Some(g) = self.terms[t].ghost {
                self.send_to_relay(g, f.clone());
            }
            if let Some(cid) = self.terms[t].link {
                self.send_to_relay(cid, f);
            }
        }
    }

    /// Remembers the payments captured in order `id` on terminal `t` (after a cashier's edit).
    fn note_captured(&mut self, t: usize, id: Option<OrderId>) {
        let engine = &self.terms[t].engine;
        if let Some(id) = id
            && let Ok(v) = engine.view(id)
        {
            for p in v
                .payments
                .iter()
                .filter(|p| p.state >= PaymentState::Captured)
            {
                self.captured.insert(p.id, p.amount);
            }
        }
    }

    fn cashier(&mut self, t: usize) {
        let op = self.rng.below(40);
        let x = self.rng.0.next_u64();
        let now = self.now;
        let term = &mut self.terms[t];
        let ids = term.engine.order_ids();
        let pick = (!ids.is_empty()).then(|| ids[(x as usize) % ids.len()]);
        let eur = Currency::new("EUR").unwrap();
        let rng = &mut term.rng;
        let what = match (op, pick) {
            (0..=5, _) | (_, None) => {
                let r = term.engine.create_order(now, rng, eur);
                format!("create {:?}", r.map(|id| short(&id)))
            }
            (6..=17, Some(id)) => {
                // Now and then a busy table: many edits in a row, one change each, so the
                // relay's tail passes `COMPACT_EVERY` and the order is compacted.
                let edits = if self.busy_every > 0 && x.is_multiple_of(self.busy_every) {
                    30
                } else {
                    1
                };
                let mut r = Ok(());
                for i in 0..edits {
                    r = term
                        .engine
                        .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                            o.add_line(
                                Timestamp(now),
                                rng,
                                LineDraft {
                                    name: "item".into(),
                                    unit_price: 100 + ((x + i) % 900) as i64,
                                    quantity: 1,
                                    ..Default::default()
                                },
                            )
                            .map(|_| ())
                        });
                    if r.is_err() {
                        break;
                    }
                }
                format!("add {edits} line(s) to {} {:?}", short(&id), r.is_ok())
            }
            (18..=23, Some(id)) => {
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::PaymentCaptured, |o| {
                        o.add_payment(
                            Timestamp(now),
                            rng,
                            PaymentDraft {
                                kind: PaymentKind::Cash,
                                amount: 50 + (x % 500) as i64,
                                reference: String::new(),
                            },
                            PaymentState::Captured,
                        )
                        .map(|_| ())
                    });
                format!("payment on {} {:?}", short(&id), r.is_ok())
            }
            (24..=28, Some(id)) => {
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                        let due = o.view()?.totals.balance_due;
                        let last = (due > 0).then(|| {
                            FinalPayment::New(PaymentDraft {
                                kind: PaymentKind::Cash,
                                amount: due,
                                reference: String::new(),
                            })
                        });
                        o.complete_sale(Timestamp(now), rng, last).map(|_| ())
                    });
                format!("complete {} {:?}", short(&id), r.is_ok())
            }
            (29..=31, Some(id)) => {
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                        o.set_status(Timestamp(now), rng, ActiveStatus::InDelivery)
                    });
                format!("in delivery {} {:?}", short(&id), r.is_ok())
            }
            (32..=35, Some(id)) => {
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                        let line = o.view()?.lines.first().map(|l| l.id);
                        match line {
                            Some(l) => o.change_quantity(Timestamp(now), l, 1 + (x % 3) as i64),
                            None => Ok(()),
                        }
                    });
                format!("quantity on {} {:?}", short(&id), r.is_ok())
            }
            (36..=37, Some(id)) => {
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::DeleteRequested, |o| {
                        o.delete(Timestamp(now), rng)
                    });
                format!("delete {} {:?}", short(&id), r.is_ok())
            }
            (38, Some(id)) if self.faults => {
                // A device writing the order number: the relay must refuse it.
                let before = term.engine.order(id).map(|o| o.heads()).unwrap_or_default();
                let r = term
                    .engine
                    .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                        o.assign_number(Timestamp(now), OrderNumber(9_000 + x % 100))
                            .map(|_| ())
                    });
                if let Ok(o) = term.engine.order(id) {
                    let forged = o.doc().get_changes(&before);
                    self.forged.extend(forged.iter().map(|c| c.hash()));
                }
                format!("FORGE number on {} {:?}", short(&id), r.is_ok())
            }
            (39, _) if self.faults => {
                // A device asking for an order of another store: answered as an absent one.
                let mine = term.identity.store.clone();
                let Some(id) = self
                    .store
                    .orders
                    .iter()
                    .find(|(_, o)| o.meta.store != mine)
                    .map(|(id, _)| *id)
                else {
                    return;
                };
                term.engine.fetch(id, now);
                format!("FETCH other store's order {}", short(&id))
            }
            _ => return,
        };
        self.log(|| format!("T{t} cashier: {what}"));
        self.note_captured(t, pick);
        self.pump(t);
    }

    fn crash_terminal(&mut self, t: usize) {
        self.stats.term_crashes += 1;
        self.log(|| format!("T{t} CRASH"));
        self.cut(t);
        let term = &mut self.terms[t];
        let store = term.store.crash_copy().unwrap();
        let orders = store.load_orders().unwrap();
        let feed = store.feed_seq().unwrap();
        term.engine = Engine::new(
            term.identity.clone(),
            orders,
            feed,
            engine_config(),
            self.now as u64 ^ t as u64,
        )
        .unwrap()
        .with_relay_data(store.relay_data().unwrap());
        term.store = store;
        term.link = None;
        term.engine.handle_timeout(self.now);
        self.pump(t);
    }

    // ----- the relay side of a connection (conn.rs) -----------------------------------------

    fn deliver_to_relay(&mut self, cid: ConnId) {
        let Some(c) = self.conns.get_mut(&cid) else {
            return;
        };
        let Some((_, f)) = c.to_relay.pop_front() else {
            return;
        };
        if c.closed_by_relay || self.relay.is_none() {
            return;
        }
        let (t, ghost) = (c.term, c.ghost);
        self.log(|| {
            format!(
                "T{t}{} -> {}",
                if ghost { "(ghost)" } else { "" },
                describe_client(&f)
            )
        });
        let c = &self.conns[&cid];
        let origin = Origin {
            conn: cid,
            device: c.device,
            store: c.store.clone(),
        };
        match f {
            ClientFrame::Hello { feed_since, .. } => {
                if c.hello {
                    self.relay_close(cid, codes::PROTOCOL_VIOLATION, "hello sent twice".into());
                    return;
                }
                let feed_seq = self.store.feed_head(&origin.store);
                let welcome = RelayFrame::Welcome {
                    protocol: Version::CURRENT,
                    relay: self.relay_device.to_string(),
                    store: origin.store.to_string(),
                    feed_seq,
                    data: None,
                };
                self.send_to_device(cid, welcome);
                let at = self.now + self.delay();
                let c = self.conns.get_mut(&cid).unwrap();
                c.hello = true;
                c.catching_up = Some(feed_since);
                c.page_at = at;
            }
            ClientFrame::Sync { order, data } => {
                let Some(id) = self.order_id(cid, &order) else {
                    return;
                };
                if let Err(refusal) = relay_server::screen::screen(&data, &Limits::default()) {
                    let e = RelayFrame::error(refusal.code(), refusal.message().to_owned(), false);
                    self.send_to_device(cid, e);
                    return;
                }
                match sync::Message::decode(&data) {
                    Ok(msg) => {
                        let s = self.core_for(cid, &id);
                        let now = self.now;
                        self.relay.as_mut().unwrap().cores[s].handle_sync(now, origin, id, msg);
                        self.drain(s);
                    }
                    Err(e) => {
                        let e = RelayFrame::error(codes::BAD_SYNC_MESSAGE, e.to_string(), false);
                        self.send_to_device(cid, e);
                    }
                }
            }
            ClientFrame::Changes {
                order,
                changes,
                heads,
                voucher,
            } => {
                let Some(id) = self.order_id(cid, &order) else {
                    return;
                };
                match relay_server::screen::decode_push(&changes, &heads, &Limits::default()) {
                    Ok(p) => {
                        let s = self.core_for(cid, &id);
                        let now = self.now;
                        let voucher = voucher.and_then(|v| {
                            let heads = heads_from_wire(&v.heads).ok()?;
                            Some((heads, v.tag.into_vec()))
                        });
                        let push = relay_server::core::Incoming::Push {
                            changes: p.changes,
                            heads: p.heads,
                            voucher,
                        };
                        self.relay.as_mut().unwrap().cores[s]
                            .handle_incoming(now, origin, id, push);
                        self.drain(s);
                    }
                    Err((code, why)) => {
                        self.send_to_device(cid, RelayFrame::error(code, why, false));
                    }
                }
            }
            ClientFrame::Ping { nonce } => self.send_to_device(cid, RelayFrame::Pong { nonce }),
            ClientFrame::Pong { .. } => {}
            ClientFrame::Bye => self.drop_conn(cid, true),
        }
    }

    /// The core handling `order` for connection `cid`: its relay (shared) or the order's shard.
    fn core_for(&self, cid: ConnId, order: &OrderId) -> usize {
        if self.shared {
            self.conns.get(&cid).map_or(0, |c| c.relay)
        } else {
            shard_of(order)
        }
    }

    /// The next catch-up page of a connection, read from the store now; after the last one
    /// the held live entries past it go out and the connection is live.
    fn catch_up_page(&mut self, cid: ConnId) {
        let Some(c) = self.conns.get(&cid) else {
            return;
        };
        let Some(since) = c.catching_up else {
            return;
        };
        let page = self.store.feed_since(&c.store, since, FEED_PAGE);
        let full = page.len() == FEED_PAGE;
        let since = page.last().map_or(since, |e| e.seq);
        if !page.is_empty() {
            self.send_to_device(cid, RelayFrame::Feed { entries: page });
        }
        let at = self.now + self.delay();
        let c = self.conns.get_mut(&cid).unwrap();
        c.sent_upto = c.sent_upto.max(since);
        if full {
            c.catching_up = Some(since);
            c.page_at = at;
            return;
        }
        c.catching_up = None;
        let mut held = std::mem::take(&mut c.held);
        held.retain(|e| e.seq > since);
        held.sort_unstable_by_key(|e| e.seq);
        held.dedup_by(|a, b| a.order == b.order && a.seq == b.seq);
        if let Some(last) = held.last() {
            c.sent_upto = c.sent_upto.max(last.seq);
        }
        if !held.is_empty() {
            self.send_to_device(cid, RelayFrame::Feed { entries: held });
        }
    }

    /// A fatal error frame, then the relay closes the connection.
    fn relay_close(&mut self, cid: ConnId, code: &str, message: String) {
        self.send_to_device(cid, RelayFrame::error(code, message, true));
        if let Some(c) = self.conns.get_mut(&cid) {
            c.closed_by_relay = true;
            c.to_relay.clear();
        }
        if let Some(r) = self.relay.as_mut() {
            for core in &mut r.cores {
                core.handle_disconnect(cid);
            }
        }
    }

    /// Live feed entries for the connections of `store` (of relay `relay` only, when given):
    /// sent, or held while a connection catches up.
    fn publish_to(&mut self, store: &StoreId, entries: &[FeedEntry], relay: Option<usize>) {
        let targets: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.hello && !c.closed_by_relay && &c.store == store)
            .filter(|(_, c)| relay.is_none_or(|r| c.relay == r))
            .map(|(id, _)| *id)
            .collect();
        for cid in targets {
            let c = self.conns.get_mut(&cid).unwrap();
            if c.catching_up.is_some() {
                c.held.extend_from_slice(entries);
            } else {
                // Shared: read back in order, so an entry at or below what went out was sent.
                let upto = if relay.is_some() { c.sent_upto } else { 0 };
                let fresh: Vec<FeedEntry> =
                    entries.iter().filter(|e| e.seq > upto).cloned().collect();
                if let Some(last) = fresh.last() {
                    c.sent_upto = last.seq;
                    self.send_to_device(cid, RelayFrame::Feed { entries: fresh });
                }
            }
        }
    }

    /// Carries out what core `s` asked for, checking every frame it emits.
    fn drain(&mut self, s: usize) {
        loop {
            let Some(out) = self.relay.as_mut().and_then(|r| r.cores[s].poll_output()) else {
                return;
            };
            match out {
                Output::Send { conn, frame } => {
                    self.check_frame(&frame);
                    if self.conns.get(&conn).is_some_and(|c| !c.closed_by_relay) {
                        self.send_to_device(conn, frame);
                    }
                }
                Output::Broadcast { conns, frame } => {
                    self.check_frame(&frame);
                    for conn in conns {
                        if self.conns.get(&conn).is_some_and(|c| !c.closed_by_relay) {
                            self.send_to_device(conn, frame.clone());
                        }
                    }
                }
                Output::Close {
                    conn,
                    code,
                    message,
                } => {
                    self.log(|| format!("relay closes conn {conn}: {code} {message}"));
                    if self.conns.get(&conn).is_some_and(|c| !c.closed_by_relay) {
                        self.relay_close(conn, code, message);
                    }
                }
                Output::Load { order } => {
                    let at = self.now + self.disk_delay();
                    self.loads.push((at, s, order, None));
                }
                Output::ReadTail { order, from } => {
                    let at = self.now + self.disk_delay();
                    self.loads.push((at, s, order, Some(from)));
                }
                Output::Commit { write } => {
                    let at = self
                        .commits
                        .back()
                        .map_or(self.now, |c| c.at)
                        .max(self.now + self.disk_delay());
                    self.commits.push_back(Commit {
                        at,
                        shard: s,
                        write,
                    });
                }
                Output::Publish { store, entry } => {
                    if self.shared {
                        // The feed goes out as read back from the store, in order.
                        let at = self.now + self.rng.range(0, 5);
                        self.notices.push((at, s, store));
                    } else {
                        self.publish_to(&store, &[entry], None);
                    }
                }
                Output::Reply { request, result } => {
                    let r = result.as_ref().as_ref().map(|v| v.status);
                    self.log(|| format!("back office {} answered {r:?}", request.0));
                }
            }
        }
    }

    fn disk_delay(&mut self) -> i64 {
        if self.slow_disk {
            self.rng.range(50, 1_500)
        } else {
            self.rng.range(0, 8)
        }
    }

    /// The store's side of a commit; checks the write before applying it.
    fn apply_commit(&mut self, w: &OrderWrite) -> Result<CommitOutcome, RelayError> {
        for c in &w.changes {
            let h = hash_of(c);
            if self.forged.contains(&h) {
                self.fail(format!(
                    "forged change {h} of order {} is being stored",
                    w.order
                ));
            }
        }
        let before = self.store.orders.get(&w.order).map(|o| o.meta.status);
        let r = self.store.commit(w);
        if let Ok(out) = &r {
            self.stats.commits += 1;
            self.stats.compactions += u64::from(w.compacted.is_some());
            if before.is_some_and(OrderStatus::is_terminal) && !out.meta.status.is_terminal() {
                self.fail(format!(
                    "order {} went from {:?} back to {:?}",
                    w.order, before, out.meta.status
                ));
            }
        }
        r
    }

    fn finish_commit(&mut self) {
        let Some(c) = self.commits.pop_front() else {
            return;
        };
        let result = if self.faults && self.failing_disk && self.rng.chance(400) {
            self.stats.failed_commits += 1;
            Err(RelayError::Internal(
                "injected: the disk refused the write".into(),
            ))
        } else {
            self.apply_commit(&c.write)
        };
        let order = c.write.order;
        let changes = hs(&c
            .write
            .changes
            .iter()
            .map(|c| hash_of(c))
            .collect::<Vec<_>>());
        let by = c.shard;
        self.log(|| match &result {
            Ok(o) => format!(
                "commit {} {changes} by {by} ok: number {} feed {}",
                short(&order),
                o.number.0,
                o.feed_seq
            ),
            Err(e) => format!("commit {} {changes} FAILED: {e}", short(&order)),
        });
        if self.shared
            && let Ok(o) = &result
        {
            // NOTIFY: the other relays hear of the commit after a while, or (faults) never.
            for r in (0..SHARDS).filter(|r| *r != c.shard) {
                if self.faults && self.rng.chance(100) {
                    self.log(|| format!("  relay {r} misses the notification"));
                } else {
                    let at = self.now + self.rng.range(0, 30);
                    self.notices.push((at, r, o.meta.store.clone()));
                }
            }
        }
        let now = self.now;
        if let Some(r) = self.relay.as_mut() {
            r.cores[c.shard].handle_committed(now, order, result);
            self.drain(c.shard);
        }
    }

    fn finish_load(&mut self, i: usize) {
        let (_, s, order, tail_from) = self.loads.swap_remove(i);
        let failed = self.faults && self.failing_disk && self.rng.chance(300);
        if failed {
            self.stats.failed_loads += 1;
        }
        fn injected<T>() -> Result<T, RelayError> {
            Err(RelayError::Internal(
                "injected: the disk could not read".into(),
            ))
        }
        self.log(|| {
            format!(
                "{} {} by {s} {}",
                tail_from.map_or("load".to_owned(), |f| format!("tail read from {f} of")),
                short(&order),
                if failed { "FAILED" } else { "ok" }
            )
        });
        let now = self.now;
        match tail_from {
            None => {
                let result = if failed {
                    injected()
                } else {
                    Ok(self.store.load(order))
                };
                if let Some(r) = self.relay.as_mut() {
                    r.cores[s].handle_loaded(now, order, result);
                    self.drain(s);
                }
            }
            Some(from) => {
                let mut tail = self.store.load_tail(order, from);
                // A read that raced a compaction (positions started over): consistent in
                // length, but it lacks a change the reader needs. The core must see that and
                // read the whole order. (Chosen by a hash of the moment and the order, not by
                // the world's generator: the seeds of the regressions keep their course.)
                let raced = (self.now as u64 ^ order.0.as_u64_pair().0)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    >> 60
                    == 0;
                if self.faults
                    && raced
                    && let Some(t) = tail.as_mut()
                    && !t.changes.is_empty()
                {
                    t.changes.remove(0);
                    t.meta.tail_len -= 1;
                    self.log(|| "  the tail read raced a compaction".to_owned());
                }
                let result = if failed { injected() } else { Ok(tail) };
                if let Some(r) = self.relay.as_mut() {
                    r.cores[s].handle_tail_read(now, order, result);
                    self.drain(s);
                }
            }
        }
    }

    // ----- checks ---------------------------------------------------------------------------

    /// Safety checks on a frame the core emits, at the moment it emits it.
    /// The frame's order id, or `None` after answering `bad_order_id` as the relay does.
    fn order_id(&mut self, cid: ConnId, order: &str) -> Option<OrderId> {
        let parsed = order.parse::<OrderId>().ok();
        if parsed.is_none() {
            let e = RelayFrame::error(
                codes::BAD_ORDER_ID,
                format!("bad order id {order:?}"),
                false,
            );
            self.send_to_device(cid, e);
        }
        parsed
    }

    /// A change the relay sends to a device (forwarded or in a sync message) must be durable
    /// and must not be one the policy should have refused.
    fn check_sent_change(&mut self, id: OrderId, h: &ChangeHash) {
        if !self.store.holds(id, h) {
            self.fail(format!(
                "the relay sent change {h} of order {id} before it was durable"
            ));
        }
        if self.forged.contains(h) {
            self.fail(format!(
                "the relay forwarded forged change {h} of order {id}"
            ));
        }
    }

    fn check_frame(&mut self, frame: &RelayFrame) {
        match frame {
            RelayFrame::Receipt { order, heads, .. } => {
                self.stats.receipts += 1;
                let id: OrderId = order.parse().unwrap();
                let heads = heads_from_wire(heads).unwrap();
                for h in &heads {
                    if !self.store.holds(id, h) {
                        self.fail(format!(
                            "receipt for order {order} names change {h}, not durable"
                        ));
                    }
                }
                self.receipted.entry(id).or_default().extend(heads);
            }
            RelayFrame::Rejected {
                order,
                changes,
                code,
                ..
            } => {
                self.stats.refusals += 1;
                let id: OrderId = order.parse().unwrap();
                self.log(|| format!("relay REFUSES changes of {} ({code})", short(order)));
                for h in heads_from_wire(changes).unwrap() {
                    if self.store.holds(id, &h) {
                        self.fail(format!("refused change {h} of order {order} is stored"));
                    }
                    self.refused.insert(h);
                }
            }
            RelayFrame::Changes { order, changes, .. } => {
                let id: OrderId = order.parse().unwrap();
                for chunk in changes {
                    let c = Change::from_bytes(chunk.to_vec()).unwrap();
                    self.check_sent_change(id, &c.hash());
                }
            }
            RelayFrame::Sync { order, data } => {
                let id: OrderId = order.parse().unwrap();
                let msg = sync::Message::decode(data).unwrap();
                for chunk in msg.changes.iter() {
                    if let Ok(c) = Change::from_bytes(chunk.to_vec()) {
                        self.check_sent_change(id, &c.hash());
                    }
                }
            }
            _ => {}
        }
    }

    // ----- the event loop -------------------------------------------------------------------

    /// Handles everything due at `now`, in a random order (FIFO within a connection).
    fn run_due(&mut self) {
        #[derive(Clone, Copy)]
        enum Due {
            ToRelay(ConnId),
            ToDevice(ConnId),
            Page(ConnId),
            Commit,
            Load(usize),
            Notice(usize),
        }
        for _ in 0..100_000 {
            let now = self.now;
            let mut due = Vec::new();
            for (cid, c) in &self.conns {
                if now < self.terms[c.term].partitioned_until {
                    continue;
                }
                if c.to_relay.front().is_some_and(|f| f.0 <= now) {
                    due.push(Due::ToRelay(*cid));
                }
                if c.to_device.front().is_some_and(|f| f.0 <= now) {
                    due.push(Due::ToDevice(*cid));
                }
                if c.catching_up.is_some() && c.page_at <= now {
                    due.push(Due::Page(*cid));
                }
            }
            if self.commits.front().is_some_and(|c| c.at <= now) {
                due.push(Due::Commit);
            }
            for (i, l) in self.loads.iter().enumerate() {
                if l.0 <= now {
                    due.push(Due::Load(i));
                }
            }
            for (i, n) in self.notices.iter().enumerate() {
                if n.0 <= now {
                    due.push(Due::Notice(i));
                }
            }
            if due.is_empty() {
                return;
            }
            match due[self.rng.below(due.len() as u64) as usize] {
                Due::ToRelay(cid) => self.deliver_to_relay(cid),
                Due::ToDevice(cid) => self.deliver_to_device(cid),
                Due::Page(cid) => self.catch_up_page(cid),
                Due::Commit => self.finish_commit(),
                Due::Load(i) => self.finish_load(i),
                Due::Notice(i) => {
                    let (_, r, store) = self.notices.swap_remove(i);
                    self.read_feed(r, &store);
                }
            }
        }
        self.fail("the event loop does not quiesce".into());
    }

    fn deliver_to_device(&mut self, cid: ConnId) {
        let Some(c) = self.conns.get_mut(&cid) else {
            return;
        };
        let Some((_, f)) = c.to_device.pop_front() else {
            return;
        };
        let (t, ghost, closing) = (c.term, c.ghost, c.closed_by_relay && c.to_device.is_empty());
        if let RelayFrame::Feed { entries } = &f {
            // The device never sees a later feed position before an earlier one.
            for e in entries {
                if e.seq <= c.feed_seen {
                    let seen = c.feed_seen;
                    self.fail(format!(
                        "conn {cid} got feed position {} after {seen}",
                        e.seq
                    ));
                }
                c.feed_seen = e.seq;
            }
        }
        if ghost {
            if closing {
                self.drop_conn(cid, false);
            }
            return;
        }
        self.log(|| format!("T{t} <- {}", describe_relay(&f)));
        let fatal = matches!(f, RelayFrame::Error { fatal: true, .. } | RelayFrame::Bye);
        self.terms[t].engine.handle_frame(f, self.now);
        if fatal || closing {
            // The engine has seen the connection end (fatal frame): forget it without telling
            // it twice.
            if self.terms[t].link == Some(cid) {
                self.terms[t].link = None;
            }
            let ghost = self.terms[t].ghost.take();
            self.drop_conn(cid, false);
            if let Some(g) = ghost {
                self.drop_conn(g, false);
            }
            if !fatal {
                self.terms[t].engine.handle_disconnected(self.now);
            }
        }
        self.pump(t);
    }

    fn timeouts(&mut self) {
        let now = self.now;
        for s in 0..SHARDS {
            let due = self
                .relay
                .as_ref()
                .is_some_and(|r| r.cores[s].poll_timeout().is_some_and(|at| at <= now));
            if due {
                if let Some(r) = self.relay.as_mut() {
                    r.cores[s].handle_timeout(now);
                }
                self.drain(s);
            }
        }
        for t in 0..self.terms.len() {
            if self.terms[t]
                .engine
                .poll_timeout()
                .is_some_and(|at| at <= self.now)
            {
                self.terms[t].engine.handle_timeout(self.now);
                self.pump(t);
            }
        }
        if self.relay.is_none() && self.now >= self.relay_down_until {
            self.start_relay();
        }
        if self.shared && self.now >= self.next_sweep {
            self.next_sweep = self.now + SWEEP_MS;
            self.sweep();
        }
    }

    fn advance(&mut self, ms: i64) {
        self.now += ms;
        self.timeouts();
        self.run_due();
    }

    /// One random action of the faulty phase.
    fn action(&mut self) {
        let n = self.terms.len();
        let t = self.rng.below(n as u64) as usize;
        let r = self.rng.below(1000);
        match r {
            0..=349 => self.cashier(t),
            350..=379 => self.cut(t),
            380..=389 => self.crash_terminal(t),
            390..=399 => {
                let until = self.now + self.rng.range(100, 3_000);
                self.log(|| format!("T{t} PARTITIONED until {}", until - 1_000_000));
                self.terms[t].partitioned_until = until;
            }
            400..=405 if self.shared && self.rng.chance(700) => {
                let r = self.rng.below(SHARDS as u64) as usize;
                self.crash_one(r);
            }
            400..=405 => self.crash_relay(),
            406..=425 => {
                self.failing_disk = !self.failing_disk;
                let on = self.failing_disk;
                self.log(|| format!("DISK FAILURES {}", if on { "on" } else { "off" }));
            }
            426..=440 => {
                self.slow_disk = !self.slow_disk;
                let on = self.slow_disk;
                self.log(|| format!("SLOW DISK {}", if on { "on" } else { "off" }));
            }
            441..=455 => self.back_office(),
            _ => {}
        }
        let dt = self.rng.range(1, 60);
        self.advance(dt);
    }

    /// A back-office status change on a stored order, authored by the relay.
    fn back_office(&mut self) {
        if self.relay.is_none() || self.store.orders.is_empty() {
            return;
        }
        let i = self.rng.below(self.store.orders.len() as u64) as usize;
        let (id, store) = self
            .store
            .orders
            .iter()
            .nth(i)
            .map(|(id, o)| (*id, o.meta.store.clone()))
            .unwrap();
        let status = match self.rng.below(3) {
            0 => OrderStatus::Done,
            1 => OrderStatus::Deleted,
            _ => OrderStatus::InDelivery,
        };
        self.next_request += 1;
        let request = RequestId(self.next_request);
        self.log(|| format!("back office {}: {} -> {status:?}", request.0, short(&id)));
        let s = if self.shared {
            self.rng.below(SHARDS as u64) as usize
        } else {
            shard_of(&id)
        };
        let now = self.now;
        self.relay.as_mut().unwrap().cores[s].handle_back_office(
            now,
            request,
            id,
            Some(store),
            status,
        );
        self.drain(s);
    }

    /// Faults stop, the network heals; runs until nothing moves and every engine is online.
    fn settle(&mut self) {
        self.faults = false;
        self.failing_disk = false;
        self.slow_disk = false;
        for term in &mut self.terms {
            term.partitioned_until = 0;
        }
        self.log(|| "---- faults stop, the network heals ----".into());
        let healed = self.now;
        let deadline = self.now + SETTLE_MS;
        let mut quiet_rounds = 0;
        while self.now < deadline {
            let every = match self.resend {
                Resend::Watchdog => WATCHDOG_MS,
                Resend::HealOnce => SETTLE_MS * 2,
                Resend::Never => 0,
            };
            if every > 0 && (self.now - healed) % every == 0 {
                // Works around known bugs 1 and 3: changes the relay dropped after the device
                // sent them are sent again only on a new connection.
                if self.now > healed {
                    self.stats.watchdog += 1;
                    self.log(|| "WATCHDOG: no convergence yet, reconnecting everyone".into());
                }
                for t in 0..self.terms.len() {
                    self.cut(t);
                }
            }
            self.advance(10);
            let moving = !self.commits.is_empty()
                || !self.loads.is_empty()
                || !self.notices.is_empty()
                || self
                    .relay
                    .as_ref()
                    .is_some_and(|r| r.cores.iter().any(|c| c.poll_timeout().is_some()))
                || self.conns.values().any(|c| {
                    !c.to_relay.is_empty() || !c.to_device.is_empty() || c.catching_up.is_some()
                });
            let offline = self.relay.is_none()
                || self
                    .terms
                    .iter()
                    .any(|t| t.link.is_none() || !t.engine.is_online());
            if moving || offline {
                quiet_rounds = 0;
                continue;
            }
            quiet_rounds += 1;
            // Quiet for a while: a few more rounds let fetches announced by the feed finish
            // (shared: past a sweep, which finds what a missed notification did not say).
            let needed = if self.shared { SWEEP_MS / 10 + 50 } else { 50 };
            if quiet_rounds >= needed {
                return;
            }
        }
        self.fail(format!(
            "the healed system did not settle within {SETTLE_MS} ms of virtual time: {}",
            self.diagnose()
        ));
    }

    /// What is still moving or offline, for a failure message.
    fn diagnose(&self) -> String {
        let mut out = format!(
            "relay {}, {} commits and {} loads in flight",
            if self.relay.is_some() { "up" } else { "down" },
            self.commits.len(),
            self.loads.len()
        );
        for (t, term) in self.terms.iter().enumerate() {
            out += &format!(
                "\n  T{t}: link {:?} online {} partitioned_until {}",
                term.link,
                term.engine.is_online(),
                term.partitioned_until
            );
        }
        for (cid, c) in &self.conns {
            out += &format!(
                "\n  conn {cid} (T{}{}): {} to relay, {} to device, catching up {:?}, closed {}",
                c.term,
                if c.ghost { " ghost" } else { "" },
                c.to_relay.len(),
                c.to_device.len(),
                c.catching_up,
                c.closed_by_relay
            );
        }
        out
    }

    /// The end-of-run checks (safety and liveness).
    fn check_end(&self) {
        self.check_receipts_survive();
        // Numbers: unique and gap-free per store, and in each document.
        let mut by_store: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut docs = BTreeMap::new();
        for (id, o) in &self.store.orders {
            let doc = o.doc();
            let in_doc = crdt_model::number_of(&doc).unwrap();
            // Known bug 2 (`known_bug_2_a_failed_number_write_is_not_retried`): outside strict
            // mode a missing number is tolerated, a wrong one never.
            let tolerated = !self.strict_numbers && in_doc.is_none();
            if in_doc != Some(o.meta.number) && !tolerated {
                self.fail(format!(
                    "order {id} is stored as number {} but its document says {in_doc:?}",
                    o.meta.number.0
                ));
            }
            by_store
                .entry(o.meta.store.to_string())
                .or_default()
                .push(o.meta.number.0);
            docs.insert(*id, doc);
        }
        for (store, mut numbers) in by_store {
            numbers.sort_unstable();
            if numbers != (1..=numbers.len() as u64).collect::<Vec<_>>() {
                self.fail(format!(
                    "numbers of store {store} are not 1..n: {numbers:?}"
                ));
            }
        }
        // Payments: each one seen captured on a terminal that still holds it exists exactly once.
        let mut on_relay: HashMap<PaymentId, Vec<i64>> = HashMap::new();
        for doc in docs.values() {
            for p in crdt_model::view_of(doc).unwrap().payments {
                on_relay.entry(p.id).or_default().push(p.amount);
            }
        }
        for (p, amounts) in &on_relay {
            if amounts.len() != 1 {
                self.fail(format!(
                    "payment {p} exists {} times on the relay",
                    amounts.len()
                ));
            }
        }
        for (t, term) in self.terms.iter().enumerate() {
            let e = &term.engine;
            let store = &term.identity.store;
            for id in e.order_ids() {
                let status = e.sync_status(id);
                let Some(stored) = self.store.orders.get(&id) else {
                    if status != Some(LocalSyncStatus::Blocked) {
                        self.fail(format!(
                            "T{t}: order {id} ({status:?}) never reached the relay"
                        ));
                    }
                    continue;
                };
                if &stored.meta.store != store {
                    self.fail(format!(
                        "T{t} holds order {id} of store {}",
                        stored.meta.store
                    ));
                }
                if status == Some(LocalSyncStatus::Blocked) {
                    continue;
                }
                if status != Some(LocalSyncStatus::Synced) {
                    self.fail(format!("T{t}: order {id} is {status:?}, not Synced"));
                }
                let mut mine: Vec<[u8; 32]> = e
                    .order(id)
                    .unwrap()
                    .doc()
                    .get_heads()
                    .iter()
                    .map(|h| h.0)
                    .collect();
                let mut theirs = stored.meta.heads.clone();
                mine.sort_unstable();
                theirs.sort_unstable();
                if mine != theirs {
                    self.fail(format!("T{t}: order {id} has other heads than the relay"));
                }
                for p in e.view(id).unwrap().payments {
                    if p.state >= PaymentState::Captured {
                        match on_relay.get(&p.id) {
                            Some(a) if a == &vec![p.amount] => {}
                            other => self.fail(format!(
                                "T{t}: captured payment {} of {} is {other:?} on the relay",
                                p.id, p.amount
                            )),
                        }
                    }
                }
            }
            // The feed: every order of the store is known.
            let head = self.store.feed_head(store);
            let seen = term.store.feed_seq().unwrap();
            if seen != head {
                self.fail(format!(
                    "T{t} saw feed position {seen}, the store's is {head}"
                ));
            }
            for (id, o) in &self.store.orders {
                if &o.meta.store == store
                    && !o.meta.status.is_terminal()
                    && e.sync_status(*id).is_none()
                {
                    self.fail(format!(
                        "T{t} never learned of active order {id} of its store"
                    ));
                }
            }
        }
        // Shared: every relay's copy of every order it holds is the stored one.
        if let Some(relay) = self.relay.as_ref() {
            for (r, core) in relay.cores.iter().enumerate() {
                for (id, o) in &self.store.orders {
                    if let Some(mut heads) = core.committed_heads(*id) {
                        let mut heads: Vec<[u8; 32]> = heads.drain(..).map(|h| h.0).collect();
                        let mut stored = o.meta.heads.clone();
                        heads.sort_unstable();
                        stored.sort_unstable();
                        if heads != stored {
                            self.fail(format!(
                                "relay {r} holds order {id} at other heads than the store"
                            ));
                        }
                    }
                }
            }
        }
        for (p, amount) in &self.captured {
            if let Some(a) = on_relay.get(p)
                && a != &vec![*amount]
            {
                self.fail(format!(
                    "captured payment {p} of {amount} is {a:?} on the relay"
                ));
            }
        }
    }
}

fn run(seed: u64) -> Stats {
    // Strict by default: no connection is replaced to help the system converge, and every
    // stored document must carry its number. `RELAY_SIM_LENIENT=1` brings the workarounds back
    // (to tell a liveness bug within one connection from another failure).
    let strict = !std::env::var("RELAY_SIM_LENIENT").is_ok_and(|v| v == "1");
    let resend = match std::env::var("RELAY_SIM_RESEND").as_deref() {
        Ok("never") => Resend::Never,
        Ok("heal-once") => Resend::HealOnce,
        Ok("watchdog") => Resend::Watchdog,
        _ if strict => Resend::Never,
        _ => Resend::Watchdog,
    };
    run_with(seed, resend, strict)
}

fn run_with(seed: u64, resend: Resend, strict_numbers: bool) -> Stats {
    run_busy(seed, resend, strict_numbers, 0)
}

fn run_busy(seed: u64, resend: Resend, strict_numbers: bool, busy_every: u64) -> Stats {
    run_world(World::new(seed), resend, strict_numbers, busy_every)
}

fn run_world(mut w: World, resend: Resend, strict_numbers: bool, busy_every: u64) -> Stats {
    w.busy_every = busy_every;
    w.resend = resend;
    w.strict_numbers = strict_numbers;
    let actions = std::env::var("RELAY_SIM_ACTIONS")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(ACTIONS);
    for _ in 0..actions {
        w.action();
    }
    w.settle();
    w.check_end();
    w.stats
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("RELAY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n: u64 = std::env::var("RELAY_SIM_SEEDS")
        .or_else(|_| std::env::var("PROPTEST_CASES"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    (0..n)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x00c0_ffee)
        .collect()
}

#[test]
fn terminals_converge_against_the_real_relay_core() {
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let seeds = seeds();
    for &seed in &seeds {
        let s = match std::panic::catch_unwind(|| run(seed)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "relay_sim: seed {seed} failed; replay with RELAY_SIM_SEED={seed} SIM_TRACE=1 cargo test -p e2e --test relay_sim -- --nocapture"
                );
                std::panic::resume_unwind(e);
            }
        };
        total.receipts += s.receipts;
        total.refusals += s.refusals;
        total.commits += s.commits;
        total.failed_commits += s.failed_commits;
        total.failed_loads += s.failed_loads;
        total.relay_crashes += s.relay_crashes;
        total.cuts += s.cuts;
        total.ghosts += s.ghosts;
        total.term_crashes += s.term_crashes;
        total.watchdog += s.watchdog;
        total.compactions += s.compactions;
    }
    eprintln!(
        "{} seeds in {:.1?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
}

/// Several relays on one store (the PostgreSQL deployment): the two cores are two relays,
/// each serving the connections made to it (devices connect to either at random, and again
/// after a cut or a relay kill), all of them writing the same orders. A relay learns of the
/// other's commits by notification (delayed; under faults, one in ten lost) and by a sweep of
/// the feed heads every second; a relay is killed alone (its connections drop, its commits
/// in flight land or not) or both at once. Every check of the single relay holds, plus: once
/// settled, every order a relay holds in memory is at the stored heads.
#[test]
fn relays_on_one_store_converge() {
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let seeds = seeds();
    for &seed in &seeds {
        let s = match std::panic::catch_unwind(|| {
            run_world(World::new_with(seed, true), Resend::Never, true, 0)
        }) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relay_sim: shared seed {seed} failed");
                std::panic::resume_unwind(e);
            }
        };
        total.receipts += s.receipts;
        total.commits += s.commits;
        total.relay_crashes += s.relay_crashes;
        total.cuts += s.cuts;
    }
    eprintln!(
        "{} seeds, two relays on one store, in {:.1?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(total.commits > 0);
    assert!(
        seeds.len() < 16 || total.relay_crashes > 0,
        "no relay was killed"
    );
}

/// Runs the first 64 default seeds in a stricter mode (or `RELAY_SIM_SEED` only).
fn run_strict(resend: Resend, strict_numbers: bool) {
    let seeds = seeds();
    for &seed in seeds.iter().take(64) {
        if std::panic::catch_unwind(|| run_with(seed, resend, strict_numbers)).is_err() {
            panic!("seed {seed} fails in mode resend {resend:?}, strict numbers {strict_numbers}");
        }
    }
}

/// Known bugs 1 and 3 (found by this simulation, fixed in the core since), no workaround: the
/// regression test. It failed before the fixes.
///
/// 1. After a failed commit the relay core resets its own sync state for the order and answers
///    the origin with a non-fatal `storage_error`, but the device's Automerge sync state still
///    counts the lost changes as sent (`sent_hashes`): on the same connection it never sends
///    them again, while the relay answers `need [h]` to each of its messages. The order stays
///    Syncing (and the two sides exchange sync messages without end while anything moves)
///    until the connection is replaced. A failed load does the same to the parked messages.
/// 3. An order whose connection holds queued change chunks (waiting for a dependency,
///    `PeerDoc::queued`) counts as idle and can be evicted; the queued chunks go with it, the
///    device counts them as sent, and after the reload the relay asks for them forever.
///
/// The fixes in the core (with the `ensure_number` call of known bug 2): on a failed commit, each peer's sync state is replaced by one with
/// `needs_reset` set (capabilities kept) and offered a message from the committed document at
/// once; a failed load closes the parked connections (`Output::Close`, `storage_error`) instead
/// of a non-fatal error; `evict_if_full` skips orders whose peers hold queued chunks.
#[test]
fn known_bugs_1_and_3_dropped_changes_are_never_sent_again() {
    run_strict(Resend::Never, false);
}

/// Known bug 2 (found by this simulation; the regression test, it failed before the fix): when
/// the relay's write of an order's number into the document (`ensure_number` after the first
/// commit) failed, it was not tried again until the order was loaded again: the store and the
/// feed carried the number, the document (what devices get) did not. Fixed by calling
/// `ensure_number` after a failed commit.
///
/// The crash variant (seed 15583534651427268673): the first commit lands just before a relay
/// crash and after the restart no device touches the order (its author's copy is Blocked, the
/// others do not fetch a Done order). Fixed by the store's list of orders whose number has not
/// reached their document (`RelayStore::unnumbered`), which the relay loads at start.
#[test]
fn known_bug_2_a_failed_number_write_is_not_retried() {
    run_strict(Resend::Watchdog, true);
}

/// Busy tables: orders with many changes, so the relay compacts them (snapshot replaces the
/// tail) while faults go on; every check holds after compaction too.
#[test]
fn busy_tables_are_compacted_under_faults() {
    let mut compactions = 0;
    for &seed in seeds().iter().take(12) {
        let s = match std::panic::catch_unwind(|| run_busy(seed, Resend::Never, true, 3)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relay_sim: busy-table seed {seed} failed");
                std::panic::resume_unwind(e);
            }
        };
        compactions += s.compactions;
    }
    assert!(compactions > 0, "no order was compacted");
}

/// The same seed gives the same run, event for event.
#[test]
fn a_seed_replays_exactly() {
    let trace = |seed: u64| {
        let mut w = World::new(seed);
        w.recorded = Some(Vec::new());
        for _ in 0..ACTIONS {
            w.action();
        }
        w.settle();
        w.check_end();
        w.recorded.take().unwrap()
    };
    for seed in [1, 2] {
        let first = trace(seed);
        assert!(first.len() > 100, "{} events", first.len());
        assert_eq!(first, trace(seed), "seed {seed} ran differently twice");
    }
}

/// Regression (found by the 10,000-seed run of `relays_on_one_store_converge`): relay 0 is
/// killed just after an order's first commit lands (its number stored, not yet in its
/// document); the relay that starts in its place touches the order to write the number, the
/// touch's load fails (injected), and the order is loaded by a device's message and read again
/// after the other relay's commits instead. The touch was forgotten on the failed load (and its
/// retry timer taken over by a refresh's), so the document kept lacking its number. Fixed: an
/// order stays touched until a load of it succeeds, whichever load that is.
#[test]
fn a_touched_order_keeps_its_number_job_across_failed_loads_and_refreshes() {
    run_world(
        World::new_with(16_559_413_595_592_076_854, true),
        Resend::Never,
        true,
        0,
    );
}

/// Regression (found by the 10,000-seed run of `relays_on_one_store_converge`): a till on a
/// relay whose copy of an order is stale (its reads of the order fail, injected) pushes a
/// change built on another till's change that only the other relay has stored; the stale relay
/// queues it waiting for the dependency and, once its read finally succeeds, asks the till for
/// the change by hash. The till had sent it on that sync state already, and Automerge never
/// sends a change twice on one state: the two looped on one sync round forever. Fixed in
/// `crdt_model::guard::receive_sync_message`: a change the peer names in its `need` is sent
/// again.
#[test]
fn a_change_the_relay_asks_for_again_is_sent_again() {
    run_world(
        World::new_with(11_788_964_530_557_765_291, true),
        Resend::Never,
        true,
        0,
    );
}
