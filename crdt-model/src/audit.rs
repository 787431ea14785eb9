//! The audit trail of an order: who changed what, when, read from the Automerge change history.
//!
//! Every change carries its author's actor id (device id + epoch, see [`crate::Writer`]) and
//! time; what it changed is read as the patches between its dependencies and itself, i.e. from
//! its author's point of view, the same way the relay's policy judges a change.

use automerge::{Automerge, Change, PatchAction, Prop};
use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::order::device_of_actor;

/// Most paths listed per change.
const MAX_PATHS: usize = 50;

/// One change of the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Change hash (hex).
    pub hash: String,
    /// Automerge actor (hex).
    pub actor: String,
    /// The device that wrote it, when the actor has our shape.
    pub device: Option<DeviceId>,
    /// Sequence number of the change for its actor.
    pub seq: u64,
    /// Time the author gave the change (seconds since the epoch).
    pub time: i64,
    /// Hashes of the changes it was made on top of.
    pub deps: Vec<String>,
    /// Number of operations.
    pub ops: usize,
    /// Dotted paths it wrote (`lines.<id>.qty`), at most 50.
    pub changed: Vec<String>,
}

/// The dotted path a patch writes to, and the action's own key if it has one.
pub fn patch_path(patch: &automerge::Patch) -> Vec<String> {
    let mut path: Vec<String> = patch
        .path
        .iter()
        .map(|(_, prop)| match prop {
            Prop::Map(k) => k.clone(),
            Prop::Seq(i) => i.to_string(),
        })
        .collect();
    match &patch.action {
        PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => path.push(key.clone()),
        PatchAction::Increment {
            prop: Prop::Map(k), ..
        } => path.push(k.clone()),
        _ => {}
    }
    path
}

/// The audit entry of one change of `doc`.
pub fn audit_entry(doc: &Automerge, change: &Change) -> AuditEntry {
    let mut changed: Vec<String> = doc
        .diff(change.deps(), &[change.hash()])
        .iter()
        .map(|p| patch_path(p).join("."))
        .collect();
    changed.dedup();
    changed.truncate(MAX_PATHS);
    AuditEntry {
        hash: change.hash().to_string(),
        actor: change.actor_id().to_hex_string(),
        device: device_of_actor(change.actor_id()),
        seq: change.seq(),
        time: change.timestamp(),
        deps: change.deps().iter().map(ToString::to_string).collect(),
        ops: change.len(),
        changed,
    }
}

/// The whole audit trail of `doc`, in causal order.
pub fn audit_trail(doc: &Automerge) -> Vec<AuditEntry> {
    doc.get_changes(&[])
        .iter()
        .map(|c| audit_entry(doc, c))
        .collect()
}
