//! Accepted changes on their way to disk: the write of an order (one in flight at a time),
//! what a durable write releases (receipts, fan-out, the feed entry, the order number) and what
//! a failed one undoes. Also the back-office status change, which takes the same path.

use std::sync::atomic::Ordering;

use automerge::{Change, ChangeHash};
use crdt_model::wire::{RelayFrame, codes};
use crdt_model::{Order, OrderId, OrderNumber, StoreId, Timestamp, validate};
use serde_bytes::ByteBuf;

use super::doc::Batch;
use super::{BackOfficeOp, COMPACT_EVERY, ConnId, Output, RelayCore, RequestId};
use crate::error::RelayError;
use crate::records::{CommitOutcome, OrderWrite};

/// What a durable write sends one connection of its order, besides a receipt.
enum Out {
    Nothing,
    Sync(automerge::sync::Message),
    Changes(Vec<ByteBuf>),
}

impl RelayCore {
    /// Adds `changes` (already in `working`) to the order's next write.
    pub(super) fn accept(
        &mut self,
        now: i64,
        order: OrderId,
        changes: Vec<Change>,
        origin: Option<ConnId>,
        request: Option<RequestId>,
    ) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let p = &mut d.pending;
        p.changes.extend(changes);
        p.origins.extend(origin);
        p.requests.extend(request);
        p.snapshot = Some(d.working.clone());
        self.dispatch(now, order);
    }

    /// Sends the order's pending changes to the store unless a write is already in flight.
    pub(super) fn dispatch(&mut self, now: i64, order: OrderId) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        // Not while the order is being read again: the write would build on old heads. A
        // stale order with nothing in flight is read again first, whatever made it stale.
        if d.inflight.is_none() && !d.refreshing && d.is_stale() {
            self.refresh(now, order);
            return;
        }
        if d.inflight.is_some() || d.pending.is_empty() || d.refreshing {
            return;
        }
        let batch = std::mem::take(&mut d.pending);
        let Some(snapshot) = batch.snapshot.as_ref() else {
            return;
        };
        let built = (|| {
            let status = crdt_model::status_of(snapshot)?;
            let number = crdt_model::number_of(snapshot)?;
            let store = match &d.store {
                Some(s) => s.clone(),
                None => crdt_model::store_of(snapshot)?,
            };
            Ok::<_, crdt_model::ModelError>((status, number, store))
        })();
        let (status, number, store) = match built {
            Ok(v) => v,
            Err(e) => {
                // The policy accepted the document, so it parses; if not, refuse loudly.
                tracing::error!(%order, error = %e, "accepted document does not parse");
                d.working = d.committed.clone();
                d.facts = crdt_model::OrderFacts::default();
                let why = std::sync::Arc::new(RelayError::Internal(format!(
                    "order {order}: the accepted document does not parse: {e}"
                )));
                self.fail_batch(order, batch, &why);
                return;
            }
        };
        d.store = Some(store.clone());
        if d.meta.is_none() && number.is_none() && self.recovering.contains(&store) {
            // A new order in a store recovering from a restore: its number waits until every
            // till has told the relay the numbers it holds (see `set_recovering`).
            d.pending = batch;
            d.held = true;
            return;
        }
        let n = u32::try_from(batch.changes.len()).unwrap_or(u32::MAX);
        let compacted = (d.tail_len.saturating_add(n) > COMPACT_EVERY).then(|| snapshot.save());
        let write = OrderWrite {
            order,
            store,
            // One write per order is in flight, so each builds on what is stored.
            base: d.committed.get_heads().iter().map(|h| h.0).collect(),
            number,
            changes: batch
                .changes
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect(),
            compacted,
            status,
            heads: snapshot.get_heads().iter().map(|h| h.0).collect(),
            at: now,
        };
        d.inflight = Some(batch);
        self.outputs.push_back(Output::Commit {
            write: Box::new(write),
        });
    }

    /// Tells everyone waiting on `batch` that it will not be durable.
    fn fail_batch(&mut self, order: OrderId, batch: Batch, why: &std::sync::Arc<RelayError>) {
        self.metrics
            .receipts_pending
            .fetch_sub(batch.origins.len() as i64, Ordering::Relaxed);
        for conn in batch.origins {
            self.send(
                conn,
                RelayFrame::error(
                    codes::STORAGE,
                    format!("order {order}: not stored ({why}); retry"),
                    false,
                ),
            );
        }
        for request in batch.requests {
            self.answer(request, Err(RelayError::Shared(std::sync::Arc::clone(why))));
        }
    }

    pub(super) fn committed(
        &mut self,
        now: i64,
        order: OrderId,
        result: Result<CommitOutcome, RelayError>,
    ) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let Some(batch) = d.inflight.take() else {
            return;
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e)
                if matches!(e.inner(), RelayError::Conflict(_))
                    && d.conflicts < super::MAX_CONFLICT_RETRIES =>
            {
                // Another relay committed the order since this one read it (several relays
                // on one database): nothing of this write is stored. Its changes stay
                // accepted, go back in front of the waiting ones, and are written again on
                // top of the order as stored once it is read again; nobody waiting is told
                // anything but the receipt, later.
                d.conflicts += 1;
                tracing::debug!(%order, error = %e, "write refused by the store; reading the order again");
                let later = std::mem::take(&mut d.pending);
                let mut merged = batch;
                merged.changes.extend(later.changes);
                merged.origins.extend(later.origins);
                merged.requests.extend(later.requests);
                if later.snapshot.is_some() {
                    merged.snapshot = later.snapshot;
                }
                d.pending = merged;
                d.mark_stale(Vec::new());
                self.refresh(now, order);
                return;
            }
            Err(e) => {
                self.abandon(now, order, batch, e);
                return;
            }
        };
        let Some(snapshot) = batch.snapshot else {
            return;
        };
        tracing::debug!(%order, changes = batch.changes.len(), "committed");
        d.conflicts = 0;
        let before = d.committed.get_heads();
        d.committed = snapshot;
        d.tail_len = outcome.meta.tail_len;
        self.metrics
            .changes_accepted
            .fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
        self.metrics
            .receipts_pending
            .fetch_sub(batch.origins.len() as i64, Ordering::Relaxed);
        let replies: Vec<_> = batch
            .requests
            .iter()
            .map(|r| {
                (
                    *r,
                    crdt_model::view_of(&d.committed).map_err(RelayError::from),
                )
            })
            .collect();
        let store = outcome.meta.store.clone();
        let entry = super::feed_entry(&outcome.meta, &self.seal.key);
        let newly = outcome.newly_numbered;
        if newly {
            d.numbering = true;
        } else if d.numbering {
            let n = outcome.meta.number;
            d.numbering = crdt_model::number_of(&d.committed).ok().flatten() != Some(n);
        }
        d.meta = Some(outcome.meta);
        self.fan_out(order, &before, &batch.changes);
        for (request, result) in replies {
            self.answer(request, result);
        }
        self.outputs.push_back(Output::Publish { store, entry });
        if newly {
            self.ensure_number(now, order);
        }
        self.refresh(now, order);
        self.dispatch(now, order);
    }

    /// A write of `order` will not be durable (`batch`, with `e` as the reason): nothing of it
    /// is on disk, and the changes accepted after it build on it, so the order falls back to
    /// what is stored and everyone waiting is told. Sync states are reset, since they count
    /// those changes as received.
    pub(super) fn abandon(&mut self, now: i64, order: OrderId, batch: Batch, e: RelayError) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let later = std::mem::take(&mut d.pending);
        d.working = d.committed.clone();
        d.facts = crdt_model::OrderFacts::default();
        d.conflicts = 0;
        // A fresh round with every connection of the order: its devices learn what the relay
        // holds, and send what it lacks again (the retry needs no timer).
        let mut rounds = Vec::new();
        for (conn, pd) in &mut d.peers {
            pd.push_mode = false;
            pd.sent.clear();
            let caps = pd.state.their_capabilities.take();
            pd.state = automerge::sync::State::new();
            pd.state.their_capabilities = caps;
            // Asks the device to forget what it counts as sent (Automerge's sync reset).
            pd.state.needs_reset = true;
            if let Ok(Some(m)) = crdt_model::guard::contain(|| pd.generate(&d.committed)) {
                rounds.push((*conn, m));
            }
        }
        let why = std::sync::Arc::new(e);
        self.fail_batch(order, batch, &why);
        self.fail_batch(order, later, &why);
        rounds.sort_by_key(|(conn, _)| *conn);
        for (conn, m) in rounds {
            self.send_sync(conn, order, m);
        }
        // A failed number write is written again (the store holds the number; with several
        // relays, only by the relay that gave it: another's may be in flight).
        if !self.config.shared || self.docs.get(&order).is_some_and(|d| d.numbering) {
            self.ensure_number(now, order);
        }
        // Another relay's commit may have been announced while this write was in flight.
        self.refresh(now, order);
    }

    /// Sends every connection of `order` what `changes` (just made durable, taking the
    /// committed document from `before`) gives it, then any receipt due: a receipt never
    /// overtakes the changes it names. A connection in step (it pushes, and had everything
    /// before these changes) gets them as stored, minus those it sent, in one frame encoded
    /// once for all of them; any other gets a sync message from its own sync state, which its
    /// own messages shaped: a panic there is that connection's.
    pub(super) fn fan_out(&mut self, order: OrderId, before: &[ChangeHash], changes: &[Change]) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let after = d.committed.get_heads();
        let hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
        let mut everyone = Vec::new();
        let mut sends = Vec::new();
        let mut failed = Vec::new();
        for (conn, pd) in &mut d.peers {
            let out = if pd.push_mode && pd.queued.is_empty() {
                let theirs = hashes.iter().filter(|h| pd.sent.contains(h)).count();
                pd.state.sent_hashes.extend(hashes.iter().copied());
                if pd.in_step_at == before {
                    pd.in_step_at.clone_from(&after);
                }
                if theirs == 0 {
                    everyone.push(*conn);
                    Out::Nothing
                } else if theirs == hashes.len() {
                    Out::Nothing
                } else {
                    let rest = changes
                        .iter()
                        .filter(|c| !pd.sent.contains(&c.hash()))
                        .map(|c| ByteBuf::from(c.raw_bytes().to_vec()))
                        .collect();
                    Out::Changes(rest)
                }
            } else {
                match crdt_model::guard::contain(|| pd.generate(&d.committed)) {
                    Ok(Some(m)) => Out::Sync(m),
                    Ok(None) => {
                        pd.step_in_if_level(&d.committed, &d.working);
                        Out::Nothing
                    }
                    Err(why) => {
                        failed.push((*conn, why));
                        continue;
                    }
                }
            };
            for h in &hashes {
                pd.sent.remove(h);
            }
            let receipt = pd.receipt_due(&d.committed).then(|| {
                pd.last_receipt.clone_from(&pd.their_heads);
                pd.their_heads.clone()
            });
            sends.push((*conn, out, receipt));
        }
        sends.sort_by_key(|(conn, _, _)| *conn);
        // The stored heads after these changes, vouched: a device that holds them can deliver
        // all of it again after a restore.
        let vouched_heads = crdt_model::wire::heads_to_wire(&after);
        let voucher = Some(ByteBuf::from(self.seal.key.vouch(order, &after).to_vec()));
        if !everyone.is_empty() && !changes.is_empty() {
            everyone.sort_unstable();
            let changes = changes
                .iter()
                .map(|c| ByteBuf::from(c.raw_bytes().to_vec()))
                .collect();
            self.outputs.push_back(Output::Broadcast {
                conns: everyone,
                frame: RelayFrame::Changes {
                    order: order.to_string(),
                    changes,
                    heads: vouched_heads.clone(),
                    voucher: voucher.clone(),
                },
            });
        }
        for (conn, out, receipt) in sends {
            match out {
                Out::Sync(m) => self.send_sync(conn, order, m),
                Out::Changes(changes) => self.send(
                    conn,
                    RelayFrame::Changes {
                        order: order.to_string(),
                        changes,
                        heads: vouched_heads.clone(),
                        voucher: voucher.clone(),
                    },
                ),
                Out::Nothing => {}
            }
            if let Some(heads) = receipt {
                self.send_receipt(conn, order, &heads);
            }
        }
        for (conn, why) in failed {
            self.metrics.frame_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%order, conn = %conn, panic = %why,
                "generating a sync message panicked; the connection is closed");
            self.unfollow(conn, order);
            self.outputs.push_back(Output::Close {
                conn,
                code: codes::UNPROCESSABLE,
                message: format!("the relay could not process a sync frame for order {order}"),
            });
        }
    }

    /// Writes the stored number into the document if it is not there yet (after the first
    /// commit, or after a restart that came between the first commit and this change).
    pub(super) fn ensure_number(&mut self, now: i64, order: OrderId) {
        let writer = self.writer.clone();
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let Some(number) = d.meta.as_ref().map(|m| m.number) else {
            return;
        };
        let mut o = match Order::from_doc(d.working.clone(), writer) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(%order, error = %e, "stored order does not parse");
                return;
            }
        };
        let before = o.heads();
        match o.assign_number(Timestamp(now), OrderNumber(number.0)) {
            Ok(true) => {
                let changes = o.doc().get_changes(&before);
                d.working = o.into_doc();
                // Until it is committed, writing this number is this relay's job.
                d.numbering = true;
                self.accept(now, order, changes, None, None);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(%order, error = %e, "order carries another number than stored")
            }
        }
    }

    pub(super) fn back_office_loaded(
        &mut self,
        now: i64,
        request: RequestId,
        order: OrderId,
        store: Option<StoreId>,
        op: BackOfficeOp,
    ) {
        let writer = self.writer.clone();
        let mut author = self.relay_author.clone();
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let visible = d.exists()
            && d.meta.is_some()
            && store.as_ref().is_none_or(|s| d.store.as_ref() == Some(s));
        let result = if visible {
            Order::from_doc(d.working.clone(), writer).map_err(RelayError::from)
        } else {
            Err(RelayError::NotFound(format!("order {order}")))
        };
        let mut o = match result {
            Ok(o) => o,
            Err(e) => {
                self.answer(request, Err(e));
                return;
            }
        };
        let before = o.heads();
        let written = match op {
            BackOfficeOp::Status(status) => {
                o.set_status_any(Timestamp(now), &mut *self.rng, status)
            }
            BackOfficeOp::Acknowledge { edit, note } => {
                o.acknowledge_late_edit(Timestamp(now), &mut *self.rng, &edit, &note)
            }
        };
        if let Err(e) = written {
            self.answer(request, Err(e.into()));
            return;
        }
        author.store = o.store().clone();
        if let Err(v) = validate(&d.working, o.doc(), &author) {
            let e = crdt_model::ModelError::from(v).into();
            self.answer(request, Err(e));
            return;
        }
        let changes = o.doc().get_changes(&before);
        d.working = o.into_doc();
        self.accept(now, order, changes, None, Some(request));
    }
}
