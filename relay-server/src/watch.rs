//! What the relay's drivers tell observers inside the process (the back-office board,
//! `board`): which stores had orders committed, which changes the policy refused, and
//! when each till connected and left.
//!
//! Nothing here is durable or replicated: it is the relay's memory since it started. A commit
//! is announced only once it is on disk (the hub announces it when it publishes
//! the store feed entry, which the core emits after the store's answer), so an observer that
//! reads the store after the announcement finds the commit there.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crdt_model::wire::RelayFrame;
use crdt_model::{DeviceId, StoreId};
use tokio::sync::broadcast;

/// Refusals kept, over all stores (the oldest are forgotten first).
const REFUSALS_KEPT: usize = 500;
/// Commit announcements a slow observer may fall behind by before it is told it lagged.
const ANNOUNCEMENTS: usize = 1024;

/// One change set the policy refused, as the relay told its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalNote {
    /// When, ms since the epoch (relay clock).
    pub at_ms: i64,
    /// The device whose changes were refused.
    pub device: DeviceId,
    /// Its store.
    pub store: StoreId,
    /// The order, as the device named it.
    pub order: String,
    /// The policy's stable code (`PolicyViolation::code`).
    pub code: String,
    /// The policy's sentence.
    pub message: String,
}

/// What the relay knows of one till's connections since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TillSeen {
    /// Connections open now.
    pub connections: usize,
    /// When a connection of it last opened or closed, ms since the epoch (relay clock).
    pub last_seen_ms: i64,
}

#[derive(Default)]
struct Memory {
    refusals: VecDeque<RefusalNote>,
    tills: HashMap<DeviceId, (StoreId, TillSeen)>,
}

/// The announcements, shared by the hub (which tells) and the board (which listens).
pub struct Watch {
    committed: broadcast::Sender<StoreId>,
    memory: Mutex<Memory>,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            committed: broadcast::channel(ANNOUNCEMENTS).0,
            memory: Mutex::new(Memory::default()),
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("observers", &self.committed.receiver_count())
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Orders of `store` were committed (durably). Never blocks.
    pub(crate) fn committed(&self, store: &StoreId) {
        if self.committed.receiver_count() > 0 {
            let _ = self.committed.send(store.clone());
        }
    }

    /// Whether anyone listens to [`Self::subscribe`].
    pub(crate) fn is_watched(&self) -> bool {
        self.committed.receiver_count() > 0
    }

    /// Stores with new commits, as they are announced. A receiver that falls behind by more
    /// than 1,024 announcements gets `Lagged`: it should read its store again.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreId> {
        self.committed.subscribe()
    }

    /// A frame the hub sends `device`: a refusal is remembered.
    pub(crate) fn sent(&self, device: &DeviceId, store: &StoreId, frame: &RelayFrame) {
        let RelayFrame::Rejected {
            order,
            code,
            message,
            ..
        } = frame
        else {
            return;
        };
        let note = RefusalNote {
            at_ms: crate::clock::now_ms(),
            device: *device,
            store: store.clone(),
            order: order.chars().take(64).collect(),
            code: code.clone(),
            message: message.chars().take(500).collect(),
        };
        if let Ok(mut m) = self.memory.lock() {
            if m.refusals.len() >= REFUSALS_KEPT {
                m.refusals.pop_front();
            }
            m.refusals.push_back(note);
        }
    }

    /// A connection of `device` (of `store`) opened (`open`) or closed.
    pub(crate) fn connection(&self, device: DeviceId, store: &StoreId, open: bool) {
        let now = crate::clock::now_ms();
        if let Ok(mut m) = self.memory.lock() {
            let (_, seen) = m
                .tills
                .entry(device)
                .or_insert_with(|| (store.clone(), TillSeen::default()));
            seen.connections = if open {
                seen.connections.saturating_add(1)
            } else {
                seen.connections.saturating_sub(1)
            };
            seen.last_seen_ms = now;
        }
    }

    /// The refusals of `store`'s devices still remembered, newest first.
    pub fn refusals(&self, store: &StoreId) -> Vec<RefusalNote> {
        self.memory
            .lock()
            .map(|m| {
                m.refusals
                    .iter()
                    .rev()
                    .filter(|r| r.store == *store)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What is known of `store`'s tills' connections since the relay started.
    pub fn tills(&self, store: &StoreId) -> HashMap<DeviceId, TillSeen> {
        self.memory
            .lock()
            .map(|m| {
                m.tills
                    .iter()
                    .filter(|(_, (s, _))| s == store)
                    .map(|(d, (_, seen))| (*d, seen.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StoreId {
        StoreId::new("s1").unwrap()
    }

    #[test]
    fn refusals_are_kept_per_store_newest_first_and_bounded() {
        let w = Watch::default();
        let device = DeviceId::generate(
            crdt_model::Timestamp(1),
            &mut crdt_model::SplitMix64::new(1),
        );
        for i in 0..(REFUSALS_KEPT + 3) {
            let frame = RelayFrame::Rejected {
                order: format!("o{i}"),
                code: "edit_after_close".into(),
                message: "closed".into(),
                changes: Vec::new(),
            };
            w.sent(&device, &store(), &frame);
        }
        w.sent(
            &device,
            &store(),
            &RelayFrame::Unavailable { order: "x".into() },
        );
        let r = w.refusals(&store());
        assert_eq!(r.len(), REFUSALS_KEPT);
        assert_eq!(r[0].order, format!("o{}", REFUSALS_KEPT + 2));
        assert!(w.refusals(&StoreId::new("s2").unwrap()).is_empty());
    }

    #[test]
    fn connections_count_up_and_down() {
        let w = Watch::default();
        let device = DeviceId::generate(
            crdt_model::Timestamp(1),
            &mut crdt_model::SplitMix64::new(1),
        );
        w.connection(device, &store(), true);
        w.connection(device, &store(), true);
        w.connection(device, &store(), false);
        assert_eq!(w.tills(&store())[&device].connections, 1);
        w.connection(device, &store(), false);
        w.connection(device, &store(), false);
        assert_eq!(w.tills(&store())[&device].connections, 0);
    }

    #[tokio::test]
    async fn commits_reach_subscribers_only() {
        let w = Watch::default();
        assert!(!w.is_watched());
        w.committed(&store());
        let mut rx = w.subscribe();
        assert!(w.is_watched());
        w.committed(&store());
        assert_eq!(rx.recv().await.unwrap(), store());
    }
}
