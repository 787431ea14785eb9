//! What one change did, read from its own operations: the decoded ops with their ids, the
//! objects the change created, the scalars it wrote into them, and the paths of the objects
//! it wrote into.

use std::collections::HashMap;

use automerge::{ActorId, Automerge, Change, ObjId, Prop, ReadDoc, ScalarValue, legacy};

use crate::error::PolicyViolation;

/// An operation id as (counter, actor).
pub(super) type OpKey = (u64, ActorId);

pub(super) fn op_key(id: &legacy::OpId) -> OpKey {
    (id.0, id.1.clone())
}

pub(super) fn ex_id(k: &OpKey) -> ObjId {
    // The actor index is a hint; a wrong one makes Automerge look the actor up.
    ObjId::Id(k.0, k.1.clone(), usize::MAX)
}

/// What one change did, read from its own operations.
pub(super) struct ChangeOps {
    pub(super) ops: Vec<legacy::Op>,
    /// Id of each operation (same order as `ops`).
    pub(super) ids: Vec<OpKey>,
    /// Objects the change created: id -> (parent object, key).
    pub(super) made: HashMap<OpKey, (legacy::ObjectId, String)>,
    /// Scalar values the change wrote into the objects it created: object -> key -> value.
    pub(super) fields: HashMap<OpKey, HashMap<String, ScalarValue>>,
}

impl ChangeOps {
    pub(super) fn decode(change: &Change) -> Self {
        let expanded = change.decode();
        let start = expanded.start_op.get();
        let actor = expanded.actor_id;
        let ops = expanded.operations;
        let mut ids = Vec::with_capacity(ops.len());
        let mut made = HashMap::new();
        let mut fields: HashMap<OpKey, HashMap<String, ScalarValue>> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            let id = (start + i as u64, actor.clone());
            if let (legacy::OpType::Make(_), legacy::Key::Map(k)) = (&op.action, &op.key) {
                made.insert(id.clone(), (op.obj.clone(), k.to_string()));
            }
            ids.push(id);
        }
        for op in &ops {
            if let (legacy::ObjectId::Id(o), legacy::Key::Map(k), legacy::OpType::Put(v)) =
                (&op.obj, &op.key, &op.action)
            {
                let o = op_key(o);
                if made.contains_key(&o) {
                    fields
                        .entry(o)
                        .or_default()
                        .insert(k.to_string(), v.clone());
                }
            }
        }
        Self {
            ops,
            ids,
            made,
            fields,
        }
    }

    pub(super) fn made_here(&self, obj: &legacy::ObjectId) -> bool {
        matches!(obj, legacy::ObjectId::Id(o) if self.made.contains_key(&op_key(o)))
    }

    /// Whether an operation id belongs to this change.
    pub(super) fn is_mine(&self, id: &ObjId) -> bool {
        match (id, self.ids.first(), self.ids.last()) {
            (ObjId::Id(ctr, actor, _), Some(first), Some(last)) => {
                *actor == first.1 && (first.0..=last.0).contains(ctr)
            }
            _ => false,
        }
    }

    /// A scalar this change wrote into `obj`, an object it created.
    pub(super) fn field(&self, obj: &legacy::ObjectId, key: &str) -> Option<&ScalarValue> {
        match obj {
            legacy::ObjectId::Id(o) => self.fields.get(&op_key(o))?.get(key),
            legacy::ObjectId::Root => None,
        }
    }
}

/// Paths of objects, resolved once per validation.
pub(super) struct Paths<'a> {
    pub(super) doc: &'a Automerge,
    pub(super) known: HashMap<OpKey, Vec<String>>,
}

impl Paths<'_> {
    /// The path of `obj`, which `ops`' change created or which exists in the document.
    pub(super) fn of(
        &mut self,
        obj: &legacy::ObjectId,
        ops: &ChangeOps,
    ) -> Result<Vec<String>, PolicyViolation> {
        let legacy::ObjectId::Id(id) = obj else {
            return Ok(Vec::new());
        };
        let key = op_key(id);
        if let Some((parent, k)) = ops.made.get(&key) {
            let mut p = self.of(parent, ops)?;
            p.push(k.clone());
            return Ok(p);
        }
        if let Some(p) = self.known.get(&key) {
            return Ok(p.clone());
        }
        let parents = self
            .doc
            .parents(ex_id(&key))
            .map_err(|e| PolicyViolation::NotAnOrder(format!("unknown object: {e}")))?;
        let mut path: Vec<String> = parents
            .map(|p| match p.prop {
                Prop::Map(k) => k,
                Prop::Seq(i) => i.to_string(),
            })
            .collect();
        path.reverse();
        self.known.insert(key, path.clone());
        Ok(path)
    }
}
