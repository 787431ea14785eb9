//! A worker: the tokio task that drives one [`RelayCore`] shard. It feeds the core the frames
//! and requests of its orders, loads from redb on a blocking thread, hands writes to the
//! committer, and carries out what the core asks (frames, closes, feed entries, replies).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crdt_model::{OrderId, OrderView, StoreId};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::committer::{CommitJob, CommitReply, Committer};
use super::feed::Registry;
use super::peer::Peer;
use crate::backend::Backend;
use crate::clock::now_ms;
use crate::core::{BackOfficeOp, ConnId, Incoming, Origin, Output, RelayCore, RequestId};
use crate::error::RelayError;
use crate::store::{CommitOutcome, StoredOrder, StoredTail};

pub(crate) type ViewReply = oneshot::Sender<Result<OrderView, RelayError>>;

/// What a worker is asked to do.
pub(crate) enum WorkerMsg {
    Sync {
        peer: Arc<Peer>,
        order: OrderId,
        msg: Incoming,
        /// Held until the frame is handled (the connection's backpressure).
        permit: Option<OwnedSemaphorePermit>,
    },
    BackOffice {
        order: OrderId,
        store: Option<StoreId>,
        op: BackOfficeOp,
        reply: ViewReply,
    },
    Disconnect {
        conn: ConnId,
    },
    /// Load the order so a number its document lacks is written (at start).
    Touch {
        order: OrderId,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// The store holds `heads` for `order` (another relay may have written it).
    ChangedElsewhere {
        order: OrderId,
        heads: Vec<automerge::ChangeHash>,
    },
    /// A store entered or left recovery after a restore.
    Recovering {
        store: StoreId,
        on: bool,
    },
    Stop,
}

/// What the store reports back.
pub(crate) enum Event {
    Committed {
        order: OrderId,
        result: Result<CommitOutcome, RelayError>,
    },
    Loaded {
        order: OrderId,
        result: Result<Option<StoredOrder>, RelayError>,
    },
    TailRead {
        order: OrderId,
        result: Result<Option<StoredTail>, RelayError>,
    },
}

pub(crate) struct Worker {
    pub(crate) core: RelayCore,
    pub(crate) store: Backend,
    pub(crate) registry: Arc<Registry>,
    pub(crate) committer: Arc<Committer>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) peers: HashMap<ConnId, Arc<Peer>>,
    pub(crate) replies: HashMap<RequestId, ViewReply>,
    pub(crate) next_request: u64,
    pub(crate) flush_waiters: Vec<oneshot::Sender<()>>,
    /// Backpressure permits of frames waiting for their order's load.
    pub(crate) parked: HashMap<OrderId, Vec<OwnedSemaphorePermit>>,
}

impl Worker {
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<WorkerMsg>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut stopping = false;
        while !stopping {
            let timer = self.core.poll_timeout();
            let wait = timer.map_or(Duration::ZERO, |at| {
                Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
            });
            tokio::select! {
                biased;
                Some(e) = events.recv() => self.on_event(e),
                msg = rx.recv() => match msg {
                    Some(WorkerMsg::Stop) | None => stopping = true,
                    Some(m) => self.on_msg(m),
                },
                () = tokio::time::sleep(wait), if timer.is_some() => {
                    self.core.handle_timeout(now_ms());
                }
            }
            self.drive();
        }
        // Finish what is in flight so its receipts go out before the worker stops.
        while !self.core.is_idle() {
            match events.recv().await {
                Some(e) => self.on_event(e),
                None => break,
            }
            self.drive();
        }
        self.release_flush_waiters();
    }

    fn on_msg(&mut self, msg: WorkerMsg) {
        let now = now_ms();
        match msg {
            WorkerMsg::Sync {
                peer,
                order,
                msg,
                permit,
            } => {
                let origin = Origin {
                    conn: peer.conn,
                    device: peer.device,
                    store: peer.store.clone(),
                };
                if !peer.is_closed() {
                    self.peers.entry(peer.conn).or_insert(peer);
                    self.core.handle_incoming(now, origin, order, msg);
                }
                // A frame waiting for its order's load still counts against its connection.
                match permit {
                    Some(p) if self.core.is_loading(order) => {
                        self.parked.entry(order).or_default().push(p);
                    }
                    other => drop(other),
                }
            }
            WorkerMsg::BackOffice {
                order,
                store,
                op,
                reply,
            } => {
                self.next_request += 1;
                let request = RequestId(self.next_request);
                self.replies.insert(request, reply);
                self.core
                    .handle_back_office_op(now, request, order, store, op);
            }
            WorkerMsg::Disconnect { conn } => {
                self.peers.remove(&conn);
                self.core.handle_disconnect(conn);
            }
            WorkerMsg::Touch { order } => self.core.handle_touch(now, order),
            WorkerMsg::Flush { reply } => self.flush_waiters.push(reply),
            WorkerMsg::Recovering { store, on } => self.core.set_recovering(now, store, on),
            WorkerMsg::ChangedElsewhere { order, heads } => {
                self.core.handle_changed_elsewhere(now, order, heads);
            }
            WorkerMsg::Stop => {}
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = now_ms();
        match event {
            Event::Committed { order, result } => self.core.handle_committed(now, order, result),
            Event::TailRead { order, result } => self.core.handle_tail_read(now, order, result),
            Event::Loaded { order, result } => {
                self.core.handle_loaded(now, order, result);
                self.parked.remove(&order);
            }
        }
    }

    /// Carries out everything the core asked for.
    fn drive(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Send { conn, frame } => {
                    if let Some(p) = self.peers.get(&conn) {
                        self.registry.watch.sent(&p.device, &p.store, &frame);
                        p.send(frame);
                    }
                }
                Output::Broadcast { conns, frame } => {
                    let encoded = axum::body::Bytes::from(frame.encode());
                    for conn in conns {
                        if let Some(p) = self.peers.get(&conn) {
                            p.send_encoded(encoded.clone());
                        }
                    }
                }
                Output::Close {
                    conn,
                    code,
                    message,
                } => {
                    if let Some(p) = self.peers.get(&conn) {
                        p.fail(code, message);
                    }
                }
                Output::Load { order } => {
                    let store = self.store.clone();
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let result = store.load_order(order).await;
                        let _ = events.send(Event::Loaded { order, result });
                    });
                }
                Output::ReadTail { order, from } => {
                    let store = self.store.clone();
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let result = store.load_tail(order, from).await;
                        let _ = events.send(Event::TailRead { order, result });
                    });
                }
                Output::Commit { write } => {
                    let reply = CommitReply::new(write.order, self.events.clone());
                    self.committer.submit(CommitJob {
                        write: *write,
                        reply,
                    });
                }
                Output::Publish { store, entry } => self.registry.publish(store, entry),
                Output::Reply { request, result } => {
                    if let Some(r) = self.replies.remove(&request) {
                        let _ = r.send(*result);
                    }
                }
            }
        }
        self.release_flush_waiters();
    }

    fn release_flush_waiters(&mut self) {
        if !self.flush_waiters.is_empty() && self.core.is_idle() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}
