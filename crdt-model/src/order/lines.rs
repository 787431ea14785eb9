//! Line items: adding a line, quantity (a counter), price and note (last-writer-wins), and
//! removal (a write-once marker).

use automerge::transaction::Transactable;
use automerge::{ObjType, ScalarValue};

use super::*;

impl Order {
    /// The facts about an editable line at the current heads (cached): refused when the line
    /// does not exist or was removed.
    pub(super) fn line(&mut self, line: LineId) -> Result<LineState, ModelError> {
        let state = match self.cache().lines.get(&line) {
            Some(state) => state.clone(),
            None => {
                let r = Reader::new(&self.doc, None);
                let key = line.to_string();
                if r.get(&self.roots.lines, &key)?.is_none() {
                    return Err(ModelError::LineNotFound(line));
                }
                let rec = schema::read_line(&r, &self.roots.lines, &key)?;
                let state = LineState {
                    obj: rec.obj,
                    qty: rec.qty,
                    removed: rec.removed.is_some(),
                };
                self.cache.lines.insert(line, state.clone());
                state
            }
        };
        if state.removed {
            return Err(ModelError::LineRemoved(line));
        }
        Ok(state)
    }

    /// Adds a line under a fresh id. Concurrent adds on other terminals never collide.
    pub fn add_line(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        draft: LineDraft,
    ) -> Result<LineId, ModelError> {
        self.ensure_open()?;
        check_price(draft.unit_price)?;
        check_quantity(draft.quantity)?;
        check_free_text(TextField::Sku, &draft.sku)?;
        check_free_text(TextField::LineName, &draft.name)?;
        check_free_text(TextField::LineNote, &draft.note)?;
        for m in &draft.modifiers {
            check_free_text(TextField::Modifier, m)?;
        }
        let id = LineId::generate(at, rng);
        let lines = self.roots.lines.clone();
        let device = self.writer.device.to_string();
        let quantity = draft.quantity;
        let (id, _) = self.commit(
            at,
            |tx| {
                let line = tx.put_object(&lines, id.to_string(), ObjType::Map)?;
                tx.put(&line, keys::SKU, draft.sku.as_str())?;
                tx.put(&line, keys::NAME, draft.name.as_str())?;
                tx.put(&line, keys::UNIT_PRICE, draft.unit_price)?;
                tx.put(&line, keys::QTY, ScalarValue::counter(draft.quantity))?;
                let mods = tx.put_object(&line, keys::MODIFIERS, ObjType::List)?;
                for (i, m) in draft.modifiers.iter().enumerate() {
                    tx.insert(&mods, i, m.as_str())?;
                }
                tx.put(&line, keys::NOTE, draft.note.as_str())?;
                tx.put(&line, keys::CREATED_BY, device.as_str())?;
                tx.put(&line, keys::CREATED_AT, ScalarValue::Timestamp(at.0))?;
                Ok((id, line))
            },
            |c, (id, obj)| {
                c.lines.insert(
                    *id,
                    LineState {
                        obj: obj.clone(),
                        qty: quantity,
                        removed: false,
                    },
                );
            },
        )?;
        Ok(id)
    }

    /// Changes a line's quantity by `delta` (the "+"/"-" buttons). Quantity is a counter:
    /// concurrent changes from two terminals add up, none is lost.
    pub fn change_quantity(
        &mut self,
        at: Timestamp,
        line: LineId,
        delta: i64,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        let rec = self.line(line)?;
        let new = rec
            .qty
            .checked_add(delta)
            .ok_or(ModelError::InvalidAmount(delta))?;
        check_quantity(new)?;
        if delta == 0 {
            return Ok(());
        }
        self.commit(
            at,
            |tx| Ok(tx.increment(&rec.obj, keys::QTY, delta)?),
            |c, _| {
                if let Some(l) = c.lines.get_mut(&line) {
                    l.qty = new;
                }
            },
        )
    }

    /// Sets a line's quantity to `quantity`, recorded as the difference from what this replica
    /// sees (so a concurrent "+1" elsewhere still counts).
    pub fn set_quantity(
        &mut self,
        at: Timestamp,
        line: LineId,
        quantity: i64,
    ) -> Result<(), ModelError> {
        check_quantity(quantity)?;
        let current = self.line(line)?.qty;
        self.change_quantity(at, line, quantity - current)
    }

    /// Overrides a line's unit price (last writer wins; concurrent overrides are flagged).
    pub fn set_unit_price(
        &mut self,
        at: Timestamp,
        line: LineId,
        unit_price: i64,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        check_price(unit_price)?;
        let rec = self.line(line)?;
        // Price and note are not cached.
        self.commit(
            at,
            |tx| Ok(tx.put(&rec.obj, keys::UNIT_PRICE, unit_price)?),
            |_, _| {},
        )
    }

    /// Replaces a line's note (last writer wins; concurrent notes are flagged).
    pub fn set_note(&mut self, at: Timestamp, line: LineId, note: &str) -> Result<(), ModelError> {
        self.ensure_open()?;
        check_free_text(TextField::LineNote, note)?;
        let rec = self.line(line)?;
        self.commit(at, |tx| Ok(tx.put(&rec.obj, keys::NOTE, note)?), |_, _| {})
    }

    /// Removes a line: a write-once removal marker, so the line stays in the document (and in
    /// the audit trail) and a concurrent edit of it cannot bring it back.
    pub fn remove_line(&mut self, at: Timestamp, line: LineId) -> Result<(), ModelError> {
        self.ensure_open()?;
        let rec = self.line(line)?;
        let device = self.writer.device.to_string();
        self.commit(
            at,
            |tx| {
                tx.put(&rec.obj, keys::REMOVED_BY, device.as_str())?;
                tx.put(&rec.obj, keys::REMOVED_AT, ScalarValue::Timestamp(at.0))?;
                Ok(())
            },
            |c, _| {
                if let Some(l) = c.lines.get_mut(&line) {
                    l.removed = true;
                }
            },
        )
    }
}

pub(super) fn check_price(p: i64) -> Result<(), ModelError> {
    if (0..=MAX_UNIT_PRICE).contains(&p) {
        Ok(())
    } else {
        Err(ModelError::InvalidAmount(p))
    }
}

pub(super) fn check_quantity(q: i64) -> Result<(), ModelError> {
    if (1..=MAX_QUANTITY).contains(&q) {
        Ok(())
    } else {
        Err(ModelError::InvalidValue {
            field: "quantity",
            value: q.to_string(),
        })
    }
}
