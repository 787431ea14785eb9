//! What a device sends for an order in memory — a sync message, or changes it pushes
//! (protocol 2) — applied to the working document, judged by the policy at the changes'
//! dependencies, and either accepted into the next write or undone and answered with the
//! refusal.

use std::sync::atomic::Ordering;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use crdt_model::wire::{RelayFrame, codes, heads_to_wire};
use crdt_model::{OrderId, PolicyViolation, validate_changes, validate_changes_with};

use super::doc::{
    PeerDoc, fresh_changes, holds, last_accepted, new_changes_in, within_queue_limits,
};
use super::{Origin, Output, RelayCore};

/// What a device sent for an order.
#[derive(Clone, Debug)]
pub enum Incoming {
    /// An Automerge sync message (catch-up: a fetch, a reconnect, a follower that missed
    /// something).
    Sync(sync::Message),
    /// Changes the device pushed, with its heads once they are applied (protocol 2).
    Push {
        /// The changes, decoded (the driver screened and decoded them).
        changes: Vec<Change>,
        /// The device's heads after them.
        heads: Vec<ChangeHash>,
        /// The relay's voucher the device holds for the order (heads, tag), sent after a
        /// restore: changes by other writers in those heads' history are accepted.
        voucher: Option<(Vec<ChangeHash>, Vec<u8>)>,
    },
}

impl Incoming {
    fn has_changes(&self) -> bool {
        match self {
            Incoming::Sync(m) => !m.changes.is_empty(),
            Incoming::Push { changes, .. } => !changes.is_empty(),
        }
    }

    fn heads(&self) -> &[ChangeHash] {
        match self {
            Incoming::Sync(m) => &m.heads,
            Incoming::Push { heads, .. } => heads,
        }
    }
}

impl RelayCore {
    /// [`Self::apply_sync`] with a panic contained: the order goes back to its last accepted
    /// state and only the sending connection is closed.
    pub(super) fn sync_loaded(&mut self, now: i64, origin: &Origin, order: OrderId, msg: Incoming) {
        if let Err(why) = crdt_model::guard::contain(|| self.apply_sync(now, origin, order, msg)) {
            self.metrics.frame_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%order, device = %origin.device, conn = %origin.conn, panic = %why,
                "handling a sync frame panicked; its effects are undone and the connection closed");
            if let Some(d) = self.docs.get_mut(&order) {
                d.working = d.last_accepted().clone();
                d.facts = crdt_model::OrderFacts::default();
            }
            self.unfollow(origin.conn, order);
            self.outputs.push_back(Output::Close {
                conn: origin.conn,
                code: codes::UNPROCESSABLE,
                message: format!("the relay could not process a sync frame for order {order}"),
            });
        }
    }

    fn apply_sync(&mut self, now: i64, origin: &Origin, order: OrderId, msg: Incoming) {
        let conn = origin.conn;
        // With several relays a refusal may come from this relay's stale copy (the device
        // forwards another till's change that another relay stored and this one has not read
        // yet): the message is kept to be judged again once the order is read again.
        let spare =
            (self.config.shared && !self.retrying && msg.has_changes()).then(|| msg.clone());
        let Some(d) = self.docs.get(&order) else {
            return;
        };
        let has_changes = msg.has_changes();
        if let Some(store) = &d.store
            && *store != origin.store
        {
            // Another store's order: answered exactly as an order the relay does not have,
            // so no message tells a device which ids exist in other stores.
            match msg {
                Incoming::Sync(m) => self.answer_as_absent(origin, order, m),
                Incoming::Push { changes, heads, .. } => {
                    let m = sync::Message {
                        heads,
                        need: Vec::new(),
                        have: Vec::new(),
                        changes: changes
                            .into_iter()
                            .map(|c| c.raw_bytes().to_vec())
                            .collect::<Vec<_>>()
                            .into(),
                        flags: None,
                        version: sync::MessageVersion::V1,
                    };
                    self.answer_as_absent(origin, order, m);
                }
            }
            return;
        }
        // A device asking for an order nobody has (and has none of it either): unavailable. A
        // device announcing heads of an order the relay lacks is creating it: sync normally.
        // (Not while the order is being read again: another relay may have created it; the
        // device follows it, and the refresh sends it what is stored.)
        if !d.exists() && !has_changes && msg.heads().is_empty() && !d.is_stale() && !d.refreshing {
            self.send(
                conn,
                RelayFrame::Unavailable {
                    order: order.to_string(),
                },
            );
            return;
        }
        self.follow(conn, order);
        let limits = self.config.limits.clone();
        let conn_queued = self.conns.get(&conn).map_or(0, |c| c.queued_bytes);
        let relay_actor = self.writer.actor.clone();
        let mut author = self.device_author(origin);
        let voucher = match &msg {
            Incoming::Push {
                voucher: Some((heads, tag)),
                ..
            } if self.seal.key.vouches(order, heads, tag) => Some(heads.clone()),
            _ => None,
        };
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let busy = d.busy();
        let pd = d.peers.entry(conn).or_insert_with(PeerDoc::new);
        pd.their_heads = msg.heads().to_vec();
        pd.push_mode = matches!(msg, Incoming::Push { .. });
        if !has_changes {
            if let Incoming::Sync(m) = msg
                && let Err(e) = d.committed.receive_sync_message(&mut pd.state, m)
            {
                let frame = RelayFrame::error(codes::BAD_SYNC_MESSAGE, e.to_string(), false);
                self.send(conn, frame);
                return;
            }
            if pd.push_mode && pd.lacks_committed(&d.committed, &d.working) {
                // The device lacks a committed change, or counts on changes the relay lacks:
                // a sync round finds them.
                pd.push_mode = false;
            }
            // While a write of this order is being committed, the committed document lacks
            // changes the peer may already have sent: a reply now would ask for them again.
            // Every peer of the order gets a message (and any receipt due) after each commit.
            if !busy {
                self.reply(order, conn);
            }
            return;
        }
        // The common case applies the message straight to `working` and puts `working` back
        // from the last accepted state if the policy refuses it; a peer with queued chunks (a
        // dependency went missing) gets a fork, so nothing unapplied lingers in `working`.
        let base = last_accepted(&d.pending, d.inflight.as_ref(), &d.committed);
        let before_heads = d.working.get_heads();
        let direct = pd.queued.is_empty();
        let mut fork = if direct {
            None
        } else {
            let mut f = d.working.fork();
            for q in &pd.queued {
                let _ = f.load_incremental(q);
            }
            Some(f)
        };
        let target = match fork.as_mut() {
            Some(f) => f,
            None => &mut d.working,
        };
        // A sync message's change chunks (a push's are only copied if they must wait for a
        // dependency, below).
        let chunks: Vec<Vec<u8>> = match &msg {
            Incoming::Sync(m) => m.changes.iter().map(<[u8]>::to_vec).collect(),
            Incoming::Push { .. } => Vec::new(),
        };
        // A push's changes are decoded already: kept, so they need not be decoded again.
        let mut pushed = None;
        let received = match msg {
            Incoming::Sync(m) => target
                .receive_sync_message(&mut pd.state, m)
                .map_err(|e| (codes::BAD_SYNC_MESSAGE, e.to_string())),
            Incoming::Push { changes, .. } => {
                let applied = target
                    .apply_changes(changes.iter().cloned())
                    .map_err(|e| (codes::BAD_CHANGE, e.to_string()));
                pushed = Some(changes);
                applied
            }
        };
        if let Err((code, e)) = received {
            let freed = pd.reset();
            if direct {
                d.working = base.clone();
            }
            self.release_queued(conn, freed);
            self.metrics.sync_refused(code);
            self.send(conn, RelayFrame::error(code, e, false));
            return;
        }
        // A document chunk loads into a non-empty document change by change, and what does not
        // load is dropped silently: every head it declares must be there now.
        let lost = chunks
            .iter()
            .filter_map(|c| crate::screen::document_heads(c))
            .flatten()
            .any(|h| !holds(target, &h));
        if lost {
            let freed = pd.reset();
            if direct {
                d.working = base.clone();
            }
            self.release_queued(conn, freed);
            self.metrics.sync_refused(codes::BAD_CHANGE);
            let message = format!("order {order}: a document chunk did not load completely");
            self.send(conn, RelayFrame::error(codes::BAD_CHANGE, message, false));
            return;
        }
        // Keep what could not be applied yet; drop the queue once everything applied.
        let mut conn_delta: isize = 0;
        let complete = target.get_missing_deps(&[]).is_empty();
        if complete {
            conn_delta -= pd.queued_bytes as isize;
            pd.queued.clear();
            pd.queued_bytes = 0;
        } else {
            if direct {
                // Rebuild `working` with only what applied, so it holds no pending chunk.
                let applied = target.get_changes(&before_heads);
                let mut clean = base.clone();
                if let Err(e) = clean.apply_changes(applied) {
                    tracing::error!(%order, error = %e, "cannot re-apply accepted changes");
                }
                d.working = clean;
            }
            let waiting: Vec<Vec<u8>> = match &pushed {
                Some(changes) => changes.iter().map(|c| c.raw_bytes().to_vec()).collect(),
                None => chunks.clone(),
            };
            let bytes: usize = waiting.iter().map(Vec::len).sum();
            pd.queued.extend(waiting);
            pd.queued_bytes += bytes;
            conn_delta += bytes as isize;
        }
        let conn_total = conn_queued.saturating_add_signed(conn_delta);
        if !complete && !within_queue_limits(pd, conn_total, &limits) {
            // Changes withheld from their dependency past the limits: the connection goes,
            // and its queue with it (`working` holds none of it).
            let held = pd.queued.len();
            self.add_queued(conn, conn_delta);
            self.unfollow(conn, order);
            self.metrics.sync_refused(codes::LIMIT_EXCEEDED);
            tracing::warn!(%order, device = %origin.device, conn = %conn, held,
                "too many changes waiting for a missing dependency; closing the connection");
            self.outputs.push_back(Output::Close {
                conn,
                code: codes::LIMIT_EXCEEDED,
                message: format!(
                    "order {order}: too many changes wait for a dependency that never came"
                ),
            });
            return;
        }
        let queue_empty = pd.queued.is_empty();
        let after: &Automerge = fork.as_ref().unwrap_or(&d.working);
        // What the message added. Automerge rebuilds changes from its op set in `get_changes`
        // (~20 µs here), so in the common case the chunks the peer sent are decoded instead.
        let from_chunks = if direct && queue_empty {
            match pushed {
                Some(changes) => fresh_changes(changes, base, after),
                None => new_changes_in(&chunks, base, after),
            }
        } else {
            None
        };
        let new_changes = from_chunks.unwrap_or_else(|| after.get_changes(&before_heads));
        if pd.push_mode && pd.lacks_committed(&d.committed, after) {
            // The device pushed from heads the relay lacks (a dependency is missing, or it
            // counts on a change the relay never stored), or it lacks a committed change: a
            // sync round finds what is missing.
            pd.push_mode = false;
        }
        if new_changes.is_empty() {
            // Everything was known already (a retry): its receipt comes now if it is durable,
            // else after the commit under way.
            self.add_queued(conn, conn_delta);
            if !busy {
                self.reply(order, conn);
            }
            return;
        }
        // The document must be the order it is sent as: one document stored under several ids
        // would be several orders sharing every change. The header is immutable (policy), so
        // checking it when the order is created is enough.
        if base.get_heads().is_empty()
            && let Ok(inside) = crdt_model::id_of(after)
            && inside != order
        {
            let freed = pd.reset();
            if direct {
                d.working = base.clone();
            }
            self.add_queued(conn, conn_delta);
            self.release_queued(conn, freed);
            self.refuse_wrong_order_id(origin, order, inside);
            return;
        }
        if let Some(heads) = &voucher {
            author.vouched = vouched_among(&new_changes, heads);
        }
        if let Err(violation) =
            validate_changes_with(base, after, &new_changes, &author, &mut d.facts)
        {
            pd.state = sync::State::new();
            if direct {
                d.working = base.clone();
            }
            self.add_queued(conn, conn_delta);
            if violation == PolicyViolation::ForeignStore {
                // Another store's order: the same answer as for an order that does not exist.
                self.send(
                    conn,
                    RelayFrame::Unavailable {
                        order: order.to_string(),
                    },
                );
                return;
            }
            if let Some(m) = spare {
                self.after_refresh
                    .entry(order)
                    .or_default()
                    .push((origin.clone(), m));
                if let Some(d) = self.docs.get_mut(&order) {
                    d.mark_stale(Vec::new());
                }
                self.refresh(now, order);
                return;
            }
            let hashes: Vec<ChangeHash> = new_changes.iter().map(Change::hash).collect();
            tracing::warn!(%order, device = %origin.device, code = violation.code(), reason = %violation, "changes rejected");
            self.metrics.rejected(violation.code());
            self.send(
                conn,
                RelayFrame::Rejected {
                    order: order.to_string(),
                    code: violation.code().to_owned(),
                    message: violation.to_string(),
                    changes: heads_to_wire(&hashes),
                },
            );
            return;
        }
        if let Some(f) = fork {
            d.working = f.with_actor(relay_actor);
        }
        // Not echoed back to this connection when the write is fanned out.
        pd.sent.extend(new_changes.iter().map(Change::hash));
        self.add_queued(conn, conn_delta);
        self.metrics
            .receipts_pending
            .fetch_add(1, Ordering::Relaxed);
        self.accept(now, order, new_changes, Some(conn), None);
    }

    fn add_queued(&mut self, conn: super::ConnId, delta: isize) {
        if let Some(info) = self.conns.get_mut(&conn) {
            info.queued_bytes = info.queued_bytes.saturating_add_signed(delta);
        }
    }

    fn release_queued(&mut self, conn: super::ConnId, bytes: usize) {
        self.add_queued(conn, -(bytes as isize));
    }

    /// Sends what the peer is missing from the committed document, then a receipt if one is
    /// due (in that order, so the receipt never names a change still on its way).
    pub(super) fn reply(&mut self, order: OrderId, conn: super::ConnId) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let Some(pd) = d.peers.get_mut(&conn) else {
            return;
        };
        // A pushing connection is answered with its receipt only, unless a sync round is
        // under way (it lacks something, or the relay does).
        let msg = if pd.push_mode && pd.queued.is_empty() {
            None
        } else {
            let m = pd.generate(&d.committed);
            let sends_changes = m.as_ref().is_some_and(|m| !m.changes.is_empty());
            if !sends_changes {
                // In step if it announced heads that hold everything committed, and the
                // relay has nothing to send.
                pd.step_in_if_level(&d.committed, &d.working);
            }
            m
        };
        let receipt = pd.receipt_due(&d.committed).then(|| {
            pd.last_receipt.clone_from(&pd.their_heads);
            pd.their_heads.clone()
        });
        if let Some(m) = msg {
            self.send_sync(conn, order, m);
        }
        if let Some(heads) = receipt {
            self.send_receipt(conn, order, &heads);
        }
    }

    pub(super) fn send_receipt(
        &mut self,
        conn: super::ConnId,
        order: OrderId,
        heads: &[ChangeHash],
    ) {
        self.metrics.receipts_sent.fetch_add(1, Ordering::Relaxed);
        // Vouched, so the device can deliver everything under these heads after a restore
        // (another till's changes too) without waiting for the feed entry.
        let voucher = serde_bytes::ByteBuf::from(self.seal.key.vouch(order, heads).to_vec());
        self.send(
            conn,
            RelayFrame::Receipt {
                order: order.to_string(),
                heads: heads_to_wire(heads),
                voucher: Some(voucher),
            },
        );
    }

    /// Refuses a document sent as `order` whose header says it is `inside`.
    fn refuse_wrong_order_id(&mut self, origin: &Origin, order: OrderId, inside: OrderId) {
        self.metrics.sync_refused(codes::WRONG_ORDER_ID);
        tracing::warn!(%order, %inside, device = %origin.device, "document sent under another order id");
        self.send(
            origin.conn,
            RelayFrame::error(
                codes::WRONG_ORDER_ID,
                format!("the document is order {inside}, sent as {order}"),
                false,
            ),
        );
    }

    /// The answer to `msg` for an order the relay does not have, without touching the stored
    /// order of that id (another store's): the message is played against an empty document,
    /// as it would be for an absent order, and answered the same way — `unavailable` for a
    /// fetch, a sync message for announced heads, the same error or rejection for bad changes.
    /// Only changes that would create the order get `unavailable`: the id is taken.
    fn answer_as_absent(&mut self, origin: &Origin, order: OrderId, msg: sync::Message) {
        let conn = origin.conn;
        let has_changes = !msg.changes.is_empty();
        if !has_changes && msg.heads.is_empty() {
            self.send(
                conn,
                RelayFrame::Unavailable {
                    order: order.to_string(),
                },
            );
            return;
        }
        let mut empty = Automerge::new();
        let mut state = sync::State::new();
        if let Err(e) = empty.receive_sync_message(&mut state, msg) {
            self.send(
                conn,
                RelayFrame::error(codes::BAD_SYNC_MESSAGE, e.to_string(), false),
            );
            return;
        }
        let applied = empty.get_heads();
        if !has_changes || applied.is_empty() || !empty.get_missing_deps(&[]).is_empty() {
            if let Some(m) = empty.generate_sync_message(&mut state) {
                self.send_sync(conn, order, m);
            }
            return;
        }
        if let Ok(inside) = crdt_model::id_of(&empty)
            && inside != order
        {
            self.refuse_wrong_order_id(origin, order, inside);
            return;
        }
        let author = self.device_author(origin);
        let new_changes = empty.get_changes(&[]);
        match validate_changes(&Automerge::new(), &empty, &new_changes, &author) {
            Err(v) if v != PolicyViolation::ForeignStore => {
                self.metrics.rejected(v.code());
                let hashes: Vec<ChangeHash> = new_changes.iter().map(Change::hash).collect();
                self.send(
                    conn,
                    RelayFrame::Rejected {
                        order: order.to_string(),
                        code: v.code().to_owned(),
                        message: v.to_string(),
                        changes: heads_to_wire(&hashes),
                    },
                );
            }
            _ => self.send(
                conn,
                RelayFrame::Unavailable {
                    order: order.to_string(),
                },
            ),
        }
    }
}

/// The changes among `new` in the history of `heads` (the relay vouched for those heads):
/// walked from the heads through dependencies, only through new changes (the older ones the
/// relay holds already).
fn vouched_among(new: &[Change], heads: &[ChangeHash]) -> std::collections::BTreeSet<ChangeHash> {
    let by_hash: std::collections::HashMap<ChangeHash, &Change> =
        new.iter().map(|c| (c.hash(), c)).collect();
    let mut out = std::collections::BTreeSet::new();
    let mut stack: Vec<ChangeHash> = heads.to_vec();
    while let Some(h) = stack.pop() {
        if let Some(c) = by_hash.get(&h)
            && out.insert(h)
        {
            stack.extend(c.deps().iter().copied());
        }
    }
    out
}
