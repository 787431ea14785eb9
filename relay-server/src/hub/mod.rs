//! The hub: the tokio driver of the relay's core ([`crate::core`]).
//!
//! Orders are sharded over a few worker tasks by order id; each worker owns one
//! [`RelayCore`] outright, so no document is ever locked. The pieces:
//!
//! * [`peer`]: a connected device (outbox, backpressure permits, feed gate);
//! * `feed`: connections by store and the coalesced live feed;
//! * `committer`: folds queued writes into one transaction (a thread for redb, a task for
//!   PostgreSQL);
//! * `worker`: the task that feeds a core its inputs and carries out its outputs;
//! * `shared`: with PostgreSQL, what other relays committed: it listens for their
//!   notifications, reads the store feed from the database and refreshes cached orders.

mod committer;
mod feed;
pub mod peer;
#[cfg(feature = "postgres")]
mod shared;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use crdt_model::{DeviceId, OrderId, OrderStatus, OrderView, StoreId};
use tokio::sync::{mpsc, oneshot};

use crate::backend::Backend;
use crate::clock::OsEntropy;
use crate::core::{BackOfficeOp, ConnId, CoreConfig, RelayCore};
use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::screen::Limits;
use committer::Committer;
use feed::Registry;
pub use peer::Peer;
use worker::{Worker, WorkerMsg};

pub use crate::clock::now_ms;
pub use crate::core::feed_entry;

/// Frames queued for one connection before it is considered too slow and closed.
pub const OUTBOX_CAPACITY: usize = 4096;

/// Tunables of the hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Worker tasks (document shards).
    pub workers: usize,
    /// Orders kept in memory across all workers; idle ones beyond this are dropped.
    pub cache_orders: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            cache_orders: 10_000,
        }
    }
}

/// The worker (shard) that owns `order`, of `n`.
fn shard_of(order: &OrderId, n: usize) -> usize {
    let b = order.as_bytes();
    let x = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    (x % n.max(1) as u64) as usize
}

/// Handle to the hub, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    workers: Vec<mpsc::Sender<WorkerMsg>>,
    registry: Arc<Registry>,
    next_conn: AtomicU64,
    metrics: Arc<Metrics>,
    limits: Limits,
    relay: DeviceId,
    /// The data's id, sent in `welcome`.
    data_id: String,
    /// Stores in recovery after a restore (mirrors the cores').
    recovering: std::sync::Mutex<std::collections::HashSet<StoreId>>,
    handles: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    feed_task: tokio::task::JoinHandle<()>,
    committer: std::sync::Mutex<Option<Arc<Committer>>>,
}

impl Hub {
    /// Starts the committer and the worker tasks (on the current tokio runtime); with a
    /// shared store (PostgreSQL), also the listener for other relays' commits.
    pub async fn start(
        store: impl Into<Backend>,
        metrics: Arc<Metrics>,
        config: &HubConfig,
    ) -> Result<Self, RelayError> {
        let store: Backend = store.into();
        let identity = store.identity()?;
        let committer = Arc::new(Committer::start(&store, Arc::clone(&metrics)));
        let registry = Arc::new(Registry::new(store.is_shared()));
        let n = config.workers.max(1);
        let core_config = CoreConfig {
            capacity: (config.cache_orders / n).max(16),
            limits: Limits::default(),
            shared: store.is_shared(),
        };
        let recovering = store.recovering_stores().await?;
        if !recovering.is_empty() {
            tracing::warn!(
                stores = recovering.len(),
                "restored data: new orders of these stores get their numbers once every till \
                 of the store has connected (or an operator releases the store)"
            );
        }
        let mut workers = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(4096);
            let (events, events_rx) = mpsc::unbounded_channel();
            let mut core = RelayCore::new(
                identity.device,
                identity.epoch,
                store.seal_key(),
                Box::new(OsEntropy),
                Arc::clone(&metrics),
                core_config.clone(),
            )?;
            for s in &recovering {
                core.set_recovering(now_ms(), s.clone(), true);
            }
            let w = Worker {
                core,
                store: store.clone(),
                registry: Arc::clone(&registry),
                committer: Arc::clone(&committer),
                events,
                peers: std::collections::HashMap::new(),
                replies: std::collections::HashMap::new(),
                next_request: 0,
                flush_waiters: Vec::new(),
                parked: std::collections::HashMap::new(),
            };
            handles.push(tokio::spawn(w.run(rx, events_rx)));
            workers.push(tx);
        }
        let feed_task = match &store {
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => tokio::spawn(shared::run(
                Arc::clone(pg),
                Arc::clone(&registry),
                workers.clone(),
                Arc::clone(&metrics),
            )),
            _ => tokio::spawn(Arc::clone(&registry).run_feed()),
        };
        // Orders stored with a number their document lacks (the relay stopped between the
        // first commit and the number change): loading them writes it.
        let unnumbered = store.unnumbered(100_000).await?;
        if !unnumbered.is_empty() {
            tracing::info!(
                orders = unnumbered.len(),
                "writing order numbers that did not reach their documents"
            );
        }
        for order in unnumbered {
            let idx = shard_of(&order, workers.len());
            if workers[idx].try_send(WorkerMsg::Touch { order }).is_err() {
                tracing::warn!(%order, "worker queue full at start; its number is written on next use");
            }
        }
        Ok(Self {
            inner: Arc::new(HubInner {
                workers,
                registry,
                next_conn: AtomicU64::new(1),
                metrics,
                limits: core_config.limits,
                relay: identity.device,
                data_id: store.data_id(),
                recovering: std::sync::Mutex::new(recovering.into_iter().collect()),
                handles: std::sync::Mutex::new(handles),
                feed_task,
                committer: std::sync::Mutex::new(Some(committer)),
            }),
        })
    }

    /// The limits device frames are held to.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Whether every worker task is still running (a worker that ended outside shutdown has
    /// taken its share of the orders with it: the relay is unhealthy).
    pub fn workers_alive(&self) -> bool {
        self.inner
            .handles
            .lock()
            .map(|h| h.iter().all(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// What the hub announces to observers in the process (see [`crate::watch`]).
    pub fn watch(&self) -> &Arc<crate::watch::Watch> {
        &self.inner.registry.watch
    }

    /// The relay's own device id.
    pub fn relay_id(&self) -> DeviceId {
        self.inner.relay
    }

    /// The relay data's id (new after every restore).
    pub fn data_id(&self) -> &str {
        &self.inner.data_id
    }

    /// Whether `store` is in recovery after a restore.
    pub fn is_recovering(&self, store: &StoreId) -> bool {
        self.inner
            .recovering
            .lock()
            .map(|r| r.contains(store))
            .unwrap_or(false)
    }

    /// `store` left recovery (its store record says so already): its held new orders are
    /// written and numbered.
    pub async fn recovered(&self, store: &StoreId) {
        if let Ok(mut r) = self.inner.recovering.lock() {
            r.remove(store);
        }
        for w in &self.inner.workers {
            let _ = w
                .send(WorkerMsg::Recovering {
                    store: store.clone(),
                    on: false,
                })
                .await;
        }
    }

    fn worker(&self, order: &OrderId) -> &mpsc::Sender<WorkerMsg> {
        &self.inner.workers[shard_of(order, self.inner.workers.len())]
    }

    /// Registers a connection of `device` (store `store`); frames for it go to `outbox`.
    pub fn connect(
        &self,
        device: DeviceId,
        store: StoreId,
        outbox: mpsc::Sender<Bytes>,
    ) -> Arc<Peer> {
        let conn = ConnId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let peer = Arc::new(Peer::new(conn, device, store, outbox));
        self.inner.registry.add(&peer);
        self.inner.metrics.connections.inc();
        peer
    }

    /// Forgets a connection everywhere.
    pub async fn disconnect(&self, peer: &Peer) {
        self.inner.registry.remove(peer);
        self.inner.metrics.connections.dec();
        for w in &self.inner.workers {
            let _ = w.send(WorkerMsg::Disconnect { conn: peer.conn }).await;
        }
    }

    /// Hands one sync message or push to the order's worker. Waits while the connection already has
    /// [`peer::FRAMES_IN_FLIGHT`] frames being handled (backpressure: the caller stops reading
    /// its socket meanwhile).
    pub async fn sync(
        &self,
        peer: &Arc<Peer>,
        order: OrderId,
        msg: crate::core::Incoming,
    ) -> Result<(), RelayError> {
        let permit = Arc::clone(&peer.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| RelayError::ShuttingDown)?;
        self.worker(&order)
            .send(WorkerMsg::Sync {
                peer: Arc::clone(peer),
                order,
                msg,
                permit: Some(permit),
            })
            .await
            .map_err(|_| RelayError::ShuttingDown)
    }

    /// A back-office status change, authored by the relay, applied through the lattice and
    /// committed before the answer. `store` restricts it to one store's orders.
    pub async fn set_status(
        &self,
        order: OrderId,
        store: Option<StoreId>,
        status: OrderStatus,
    ) -> Result<OrderView, RelayError> {
        self.back_office(order, store, BackOfficeOp::Status(status))
            .await
    }

    /// A back-office write (a status change, an acknowledgement), authored by the relay,
    /// checked by the policy and committed before the answer. `store` restricts it to one
    /// store's orders.
    pub async fn back_office(
        &self,
        order: OrderId,
        store: Option<StoreId>,
        op: BackOfficeOp,
    ) -> Result<OrderView, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.worker(&order)
            .send(WorkerMsg::BackOffice {
                order,
                store,
                op,
                reply,
            })
            .await
            .map_err(|_| RelayError::ShuttingDown)?;
        rx.await.map_err(|_| RelayError::ShuttingDown)?
    }

    /// Stops the workers (after their in-flight commits) and the committer, releasing the store.
    pub async fn shutdown(&self) {
        for w in &self.inner.workers {
            let _ = w.send(WorkerMsg::Stop).await;
        }
        let handles: Vec<_> = self
            .inner
            .handles
            .lock()
            .map(|mut h| h.drain(..).collect())
            .unwrap_or_default();
        for h in handles {
            let _ = h.await;
        }
        self.inner.feed_task.abort();
        self.inner.registry.flush_feed();
        let committer = self.inner.committer.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = committer {
            // The workers are gone, so this is the last handle: stop and join the thread.
            if let Ok(mut c) = Arc::try_unwrap(c) {
                let (thread, task) = c.stop();
                if let Some(thread) = thread {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
                if let Some(task) = task {
                    let _ = task.await;
                }
            }
        }
    }

    /// Waits until every accepted change has been committed and receipted.
    pub async fn flush(&self) {
        for w in &self.inner.workers {
            let (reply, rx) = oneshot::channel();
            if w.send(WorkerMsg::Flush { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Starts the live feed for `peer` after its catch-up read the store up to `since`; `false`
    /// if entries were dropped while it caught up (read the store again).
    pub fn go_live(&self, peer: &Peer, since: u64) -> bool {
        peer.go_live(since)
    }
}
