//! One order's state in the relay core: the committed and working documents, the write in
//! flight and the one waiting behind it, and each connection's sync state for the order.

use std::collections::{HashMap, HashSet};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use crdt_model::{OrderFacts, StoreId};

use super::{ConnId, RequestId};
use crate::records::OrderMeta;
use crate::screen::Limits;

/// Changes accepted by the policy that wait to be made durable, and who waits for them.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// `working` right after the newest of these changes was accepted: what `committed`
    /// becomes once they are durable.
    pub snapshot: Option<Automerge>,
    /// The changes, dependencies first.
    pub changes: Vec<Change>,
    /// Connections whose changes these are (one entry per accepted message).
    pub origins: Vec<ConnId>,
    /// Back-office requests answered once these are durable.
    pub requests: Vec<RequestId>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// A connection's view of one order.
#[derive(Debug)]
pub(super) struct PeerDoc {
    /// Automerge's sync state with this connection.
    pub state: sync::State,
    /// The heads this connection last announced (its own document's heads).
    pub their_heads: Vec<ChangeHash>,
    /// The heads of the last receipt sent to it.
    pub last_receipt: Vec<ChangeHash>,
    /// Change chunks it sent that cannot be applied yet (a dependency is missing, e.g. one
    /// skipped because of a Bloom filter false positive). They are re-applied with its next
    /// message, and replies are generated as if they were applied, so the sync protocol asks
    /// for the missing dependency instead of for the queued change again.
    pub queued: Vec<Vec<u8>>,
    /// Bytes in `queued`.
    pub queued_bytes: usize,
    /// Whether the connection pushes its changes (protocol 2) and is in step: committed
    /// changes are forwarded to it as they are, without a sync message. Cleared while a sync
    /// round with it is under way.
    pub push_mode: bool,
    /// Hashes of the changes it sent that are accepted but not yet durable (not echoed back
    /// when their write is fanned out).
    pub sent: HashSet<ChangeHash>,
    /// Heads of the committed document when the connection was last known to hold all of it
    /// (a sync round ended, or a write was forwarded to it while it was in step).
    pub in_step_at: Vec<ChangeHash>,
}

impl PeerDoc {
    pub fn new() -> Self {
        Self {
            state: sync::State::new(),
            their_heads: Vec::new(),
            last_receipt: Vec::new(),
            queued: Vec::new(),
            queued_bytes: 0,
            push_mode: false,
            sent: HashSet::new(),
            in_step_at: Vec::new(),
        }
    }

    /// A connection with nothing to receive is in step when it waits for no dependency and
    /// holds everything committed: from then on it gets committed changes as they are stored,
    /// without a sync message.
    pub fn step_in_if_level(&mut self, committed: &Automerge, working: &Automerge) {
        if self.queued.is_empty() && !self.lacks_committed(committed, working) {
            self.push_mode = true;
            self.in_step_at = committed.get_heads();
        }
    }

    /// Whether the connection, which announced `heads` (its document's heads), lacks a change
    /// of `committed`. `working` holds every change the heads name, if the relay has them.
    pub fn lacks_committed(&self, committed: &Automerge, working: &Automerge) -> bool {
        let ours = committed.get_heads();
        if ours.is_empty() || ours == self.in_step_at {
            return false;
        }
        if ours.iter().all(|h| self.their_heads.contains(h)) {
            return false;
        }
        if !self.their_heads.iter().all(|h| holds(working, h)) {
            // It holds changes the relay lacks: only a sync round can tell.
            return true;
        }
        working
            .get_changes_meta(&self.their_heads)
            .iter()
            .any(|m| holds(committed, &m.hash))
    }

    /// Starts the sync over and forgets the queued chunks; returns their bytes (to release
    /// from the connection's total).
    pub fn reset(&mut self) -> usize {
        self.state = sync::State::new();
        self.queued.clear();
        std::mem::take(&mut self.queued_bytes)
    }

    /// `doc`, plus the queued chunks when there are any.
    fn view_of(&self, doc: &Automerge) -> Option<Automerge> {
        if self.queued.is_empty() {
            return None;
        }
        let mut d = doc.fork();
        for q in &self.queued {
            let _ = d.load_incremental(q);
        }
        Some(d)
    }

    /// The next message for this connection from `doc` (with its queued chunks).
    pub fn generate(&mut self, doc: &Automerge) -> Option<sync::Message> {
        match self.view_of(doc) {
            Some(with_queue) => with_queue.generate_sync_message(&mut self.state),
            None => doc.generate_sync_message(&mut self.state),
        }
    }

    /// Whether a receipt is due: the connection announced heads the committed document holds
    /// (so they are durable), and it has not been told so yet.
    pub fn receipt_due(&self, committed: &Automerge) -> bool {
        !self.their_heads.is_empty()
            && self.their_heads != self.last_receipt
            && self.their_heads.iter().all(|h| holds(committed, h))
    }
}

/// Everything the core keeps about one order while it is in memory.
#[derive(Debug)]
pub(super) struct DocState {
    /// Exactly what the store holds. Outgoing sync messages come from it only, so nothing
    /// reaches another party before it is durable.
    pub committed: Automerge,
    /// `committed` plus every change the policy accepted that is not durable yet.
    pub working: Automerge,
    /// The stored metadata (number, feed position), once stored.
    pub meta: Option<OrderMeta>,
    /// The order's store, once known.
    pub store: Option<StoreId>,
    /// Sync states by connection.
    pub peers: HashMap<ConnId, PeerDoc>,
    /// The write being committed (at most one per order: the next builds on its result).
    pub inflight: Option<Batch>,
    /// Accepted changes waiting for `inflight` to finish.
    pub pending: Batch,
    /// Changes in the stored tail after the snapshot.
    pub tail_len: u32,
    /// Recency, for the cache.
    pub last_used: u64,
    /// What the policy learnt of the order (its header), valid for the accepted state;
    /// reset whenever the accepted state is rolled back.
    pub facts: OrderFacts,
    /// A new order of a store in recovery: `pending` waits for numbering to resume.
    pub held: bool,
    /// The store holds changes `committed` lacks (another relay wrote the order): these
    /// heads, or an empty list with `stale_unknown` when only a refused write said so.
    pub stale_heads: Vec<ChangeHash>,
    /// The store refused a write as built on old heads: read the order again.
    pub stale_unknown: bool,
    /// The order is being read again from the store ([`super::RelayCore::refresh`]).
    pub refreshing: bool,
    /// Writes refused in a row as built on old heads (bounded: see `MAX_CONFLICT_RETRIES`).
    pub conflicts: u32,
    /// This relay gave the order its number and the number is not in the committed document
    /// yet: writing it is this relay's job (with several relays, no other one does it).
    pub numbering: bool,
}

impl DocState {
    pub fn empty() -> Self {
        Self {
            committed: Automerge::new(),
            working: Automerge::new(),
            meta: None,
            store: None,
            peers: HashMap::new(),
            inflight: None,
            pending: Batch::default(),
            tail_len: 0,
            last_used: 0,
            facts: OrderFacts::default(),
            held: false,
            stale_heads: Vec::new(),
            stale_unknown: false,
            refreshing: false,
            conflicts: 0,
            numbering: false,
        }
    }

    /// Notes that the store holds `heads` (empty: something newer, heads unknown).
    pub fn mark_stale(&mut self, heads: Vec<ChangeHash>) {
        if heads.is_empty() {
            self.stale_unknown = true;
        } else {
            self.stale_heads = heads;
        }
    }

    /// Whether the store is known to hold changes `committed` lacks.
    pub fn is_stale(&self) -> bool {
        self.stale_unknown || self.stale_heads.iter().any(|h| !holds(&self.committed, h))
    }

    /// Whether the order exists (stored or being created).
    pub fn exists(&self) -> bool {
        !self.working.get_heads().is_empty()
    }

    /// Whether a write is being committed or waits to be, or the order is being read again.
    pub fn busy(&self) -> bool {
        self.inflight.is_some() || !self.pending.is_empty() || self.refreshing
    }

    /// The last state the policy accepted.
    pub fn last_accepted(&self) -> &Automerge {
        last_accepted(&self.pending, self.inflight.as_ref(), &self.committed)
    }
}

/// The last state the policy accepted: the pending write's, the one in flight, or the
/// committed document (a function of the fields, so `working` can change while it is borrowed).
pub(super) fn last_accepted<'a>(
    pending: &'a Batch,
    inflight: Option<&'a Batch>,
    committed: &'a Automerge,
) -> &'a Automerge {
    if let Some(s) = &pending.snapshot {
        return s;
    }
    match inflight.and_then(|b| b.snapshot.as_ref()) {
        Some(s) => s,
        None => committed,
    }
}

/// Whether `doc` holds change `hash`. Only for documents with no pending (unapplied)
/// changes; unlike `get_change_by_hash`, which rebuilds the change from the op set in
/// automerge 0.12, this is a lookup.
pub(super) fn holds(doc: &Automerge, hash: &ChangeHash) -> bool {
    !doc.get_missing_deps(std::slice::from_ref(hash))
        .contains(hash)
}

/// The changes among `chunks` that `before` lacks and `after` holds, dependencies first;
/// `None` if a chunk is not a single change or a document has pending (unapplied) changes
/// (the caller then asks the document).
pub(super) fn new_changes_in(
    chunks: &[Vec<u8>],
    before: &Automerge,
    after: &Automerge,
) -> Option<Vec<Change>> {
    let mut changes = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        changes.push(Change::from_bytes(chunk.clone()).ok()?);
    }
    fresh_changes(changes, before, after)
}

/// The changes among `changes` that `before` lacks and `after` holds, dependencies first;
/// `None` if a document has pending (unapplied) changes.
pub(super) fn fresh_changes(
    changes: Vec<Change>,
    before: &Automerge,
    after: &Automerge,
) -> Option<Vec<Change>> {
    if !before.get_missing_deps(&[]).is_empty() || !after.get_missing_deps(&[]).is_empty() {
        return None;
    }
    let mut fresh: Vec<Change> = Vec::with_capacity(changes.len());
    for change in changes {
        let hash = change.hash();
        if !holds(before, &hash) && holds(after, &hash) && !fresh.iter().any(|c| c.hash() == hash) {
            fresh.push(change);
        }
    }
    let mut ordered = Vec::with_capacity(fresh.len());
    while !fresh.is_empty() {
        let ready = fresh.iter().position(|c| {
            c.deps()
                .iter()
                .all(|d| !fresh.iter().any(|o| o.hash() == *d))
        })?;
        ordered.push(fresh.swap_remove(ready));
    }
    Some(ordered)
}

/// Bytes a connection holds queued per order and in total, against [`Limits`].
pub(super) fn within_queue_limits(pd: &PeerDoc, conn_total: usize, limits: &Limits) -> bool {
    pd.queued.len() <= limits.max_queued_changes
        && pd.queued_bytes <= limits.max_queued_bytes
        && conn_total <= limits.max_queued_bytes_per_conn
}
