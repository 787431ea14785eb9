//! What an [`Order`] remembers between operations: the heads it last read at, the parsed
//! status and the lines it touched, and the whole-document parse; dropped whenever the heads
//! move under it (a merge, an apply, a raw write).
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use automerge::{Automerge, ChangeHash, ObjId};

use super::*;

impl Order {
    pub(super) fn read_status(&self) -> Result<StatusState, ModelError> {
        let log = schema::read_status_log(&Reader::new(&self.doc, None), &self.roots.status)?;
        Ok(StatusState {
            lattice: schema::lattice(&log),
            next_clock: next_clock(log.iter().map(|r| &r.entry)),
        })
    }

    /// The cache, made valid for the current heads.
    pub(super) fn cache(&mut self) -> &mut Cache {
        self.cache.validate(self.doc.get_heads());
        &mut self.cache
    }

    /// The status facts at the current heads (cached).
    pub(super) fn status_state(&mut self) -> Result<StatusState, ModelError> {
        if let Some(st) = self.cache().status {
            return Ok(st);
        }
        let st = self.read_status()?;
        self.cache.status = Some(st);
        Ok(st)
    }
}

/// What this handle has already read from the document, valid only while the document's heads
/// are `heads`.
///
/// Heads name the exact set of changes, and the document's content is a function of that set,
/// so equal heads mean equal content: a merge, `apply_changes`, a sync message or any write
/// through [`Order::doc_mut`] changes the heads and so drops the cache. This handle's own
/// operations carry the cache over to the heads they produce, updating what they changed
/// ([`Order::commit`]); the cache is never trusted across anything else.
#[derive(Debug, Clone, Default)]
pub(super) struct Cache {
    /// The heads the cached facts describe (empty: nothing checked yet).
    pub(super) heads: Vec<ChangeHash>,
    /// The join of the status log and the clock a new entry must carry.
    pub(super) status: Option<StatusState>,
    /// Lines read (strictly parsed) at `heads`, by id.
    pub(super) lines: HashMap<LineId, LineState>,
    /// The whole order parsed at `heads` (filled by a load or a view; shared by clones).
    pub(super) snapshot: OnceLock<Arc<Snapshot>>,
}

/// The status facts an operation needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct StatusState {
    pub(super) lattice: StatusLattice,
    pub(super) next_clock: u64,
}

/// The line facts an edit needs.
#[derive(Debug, Clone)]
pub(super) struct LineState {
    pub(super) obj: ObjId,
    pub(super) qty: i64,
    pub(super) removed: bool,
}

impl Cache {
    /// An empty cache for the document's current heads.
    pub(super) fn at(doc: &Automerge) -> Self {
        Self {
            heads: doc.get_heads(),
            ..Self::default()
        }
    }

    /// Makes the cache describe `heads`: kept if it already does, emptied otherwise.
    pub(super) fn validate(&mut self, heads: Vec<ChangeHash>) {
        if self.heads != heads {
            *self = Self {
                heads,
                ..Self::default()
            };
        }
    }
}
