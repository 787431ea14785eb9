//! [`Order`]: one order as one Automerge document, with typed, targeted operations.
//!
//! Every operation is one Automerge transaction, so one change: it either commits whole or
//! leaves the document untouched (a refused operation rolls back). Operations write only the
//! keys they mean to change (no whole-struct reconcile), and entries go under fresh unique keys.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue,
    transaction::{CommitOptions, Transactable, Transaction},
};

use crate::error::ModelError;
use crate::guard;
use crate::ids::{
    DeviceId, Entropy, EntryId, LineId, OrderId, OrderNumber, PaymentId, StoreId, Timestamp,
};
use crate::money::{Currency, Money};
use crate::payment::{PaymentKind, PaymentState};
use crate::schema::{self, Header, Reader, Roots, SCHEMA_VERSION, Snapshot, keys};
use crate::status::{ActiveStatus, OrderStatus, StatusLattice, next_clock};
use crate::text::{TextField, check_free_text};
use crate::view::{self, OrderView};

/// Highest unit price accepted, in minor units (10^12: ten billion major units).
pub const MAX_UNIT_PRICE: i64 = 1_000_000_000_000;
/// Highest quantity on one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Highest amount of one payment, in minor units.
pub const MAX_PAYMENT: i64 = 1_000_000_000_000_000;
/// Longest name, sku, modifier or note, in bytes.
pub const MAX_TEXT: usize = 500;

/// Who writes: the device (for `by` fields and the relay's policy) and its Automerge actor.
///
/// The actor id is the 16 bytes of the device id followed by a 4-byte epoch chosen when the
/// device's store was created, so the relay can bind every change to the device that made it
/// and a reinstalled device never reuses an old actor's sequence numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    /// The writing device.
    pub device: DeviceId,
    /// The Automerge actor its changes carry.
    pub actor: ActorId,
}

impl Writer {
    /// A writer for `device` with the given epoch.
    pub fn new(device: DeviceId, epoch: u32) -> Self {
        let mut bytes = device.as_bytes().to_vec();
        bytes.extend_from_slice(&epoch.to_be_bytes());
        Self {
            device,
            actor: ActorId::from(bytes),
        }
    }
}

/// The device an actor id belongs to (its first 16 bytes), if it has our shape.
pub fn device_of_actor(actor: &ActorId) -> Option<DeviceId> {
    let bytes = actor.to_bytes();
    if bytes.len() != 20 {
        return None;
    }
    let id: [u8; 16] = bytes[..16].try_into().ok()?;
    Some(DeviceId(uuid::Uuid::from_bytes(id)))
}

/// Where a change stands relative to the change that closed the order (the winning
/// Done/Deleted entry), from the change graph alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseRelation {
    /// In the causal past of the close: part of the order as closed.
    Before,
    /// The change that wrote the winning terminal entry.
    IsTheClose,
    /// Neither before nor after: made without knowing of the close. Kept, flagged as late.
    Concurrent,
    /// Made by an author who had seen the order closed: only voids, refunds, acknowledgements
    /// and the relay's number are allowed here.
    After,
}

/// The relay-assigned number of the order in `doc`, read without taking the document.
pub fn number_of(doc: &Automerge) -> Result<Option<OrderNumber>, ModelError> {
    schema::read_number(&Reader::new(doc, None))
}

/// The effective business status of the order in `doc`, read without taking the document.
pub fn status_of(doc: &Automerge) -> Result<OrderStatus, ModelError> {
    let r = Reader::new(doc, None);
    let roots = Roots::read(&r)?;
    Ok(schema::lattice(&schema::read_status_log(&r, &roots.status)?).status())
}

/// The store of the order in `doc`.
pub fn store_of(doc: &Automerge) -> Result<StoreId, ModelError> {
    Ok(Header::read(&Reader::new(doc, None))?.store)
}

/// The order id in `doc`'s header (a relay checks it against the id a document is sent under).
pub fn id_of(doc: &Automerge) -> Result<OrderId, ModelError> {
    Ok(Header::read(&Reader::new(doc, None))?.id)
}

/// The view of the order in `doc`, without taking or copying the document.
pub fn view_of(doc: &Automerge) -> Result<OrderView, ModelError> {
    view::build(doc)
}

/// What a new order starts with.
#[derive(Clone, Debug)]
pub struct NewOrder {
    /// Generated on the device ([`OrderId::generate`]).
    pub id: OrderId,
    /// The store the device belongs to.
    pub store: StoreId,
    /// The currency every amount of the order is in.
    pub currency: Currency,
}

/// A line to add.
#[derive(Clone, Debug, Default)]
pub struct LineDraft {
    /// Stock keeping unit.
    pub sku: String,
    /// Name shown on the ticket.
    pub name: String,
    /// Price of one unit, in minor units of the order's currency.
    pub unit_price: i64,
    /// How many (at least 1).
    pub quantity: i64,
    /// Modifiers ("no onions"), fixed once the line exists.
    pub modifiers: Vec<String>,
    /// Free-text note; editable.
    pub note: String,
}

/// A payment to record.
#[derive(Clone, Debug)]
pub struct PaymentDraft {
    /// The tender.
    pub kind: PaymentKind,
    /// Amount in minor units of the order's currency; positive.
    pub amount: i64,
    /// External reference known so far (masked card/gift card number, cheque number); may be empty.
    pub reference: String,
}

/// The last payment of a sale, recorded in the same change that makes the order Done.
#[derive(Clone, Debug)]
pub enum FinalPayment {
    /// A new payment, recorded as captured (cash handed over, a card already charged).
    New(PaymentDraft),
    /// Capture an existing pending or authorised payment.
    Capture(PaymentId),
}

/// One order: an Automerge document plus the writer's identity.
#[derive(Debug, Clone)]
pub struct Order {
    doc: Automerge,
    writer: Writer,
    roots: Roots,
    header: Header,
    cache: Cache,
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
struct Cache {
    /// The heads the cached facts describe (empty: nothing checked yet).
    heads: Vec<ChangeHash>,
    /// The join of the status log and the clock a new entry must carry.
    status: Option<StatusState>,
    /// Lines read (strictly parsed) at `heads`, by id.
    lines: HashMap<LineId, LineState>,
    /// The whole order parsed at `heads` (filled by a load or a view; shared by clones).
    snapshot: OnceLock<Arc<Snapshot>>,
}

/// The status facts an operation needs.
#[derive(Debug, Clone, Copy)]
struct StatusState {
    lattice: StatusLattice,
    next_clock: u64,
}

/// The line facts an edit needs.
#[derive(Debug, Clone)]
struct LineState {
    obj: ObjId,
    qty: i64,
    removed: bool,
}

impl Cache {
    /// An empty cache for the document's current heads.
    fn at(doc: &Automerge) -> Self {
        Self {
            heads: doc.get_heads(),
            ..Self::default()
        }
    }

    /// Makes the cache describe `heads`: kept if it already does, emptied otherwise.
    fn validate(&mut self, heads: Vec<ChangeHash>) {
        if self.heads != heads {
            *self = Self {
                heads,
                ..Self::default()
            };
        }
    }
}

impl Order {
    /// Creates an order: the first change writes the header, every container, and the initial
    /// InProgress status entry, so no container is ever created twice.
    pub fn create(
        new: NewOrder,
        writer: Writer,
        at: Timestamp,
        rng: &mut dyn Entropy,
    ) -> Result<Self, ModelError> {
        let mut doc = Automerge::new().with_actor(writer.actor.clone());
        let entry = EntryId::generate(at, rng);
        let device = writer.device.to_string();
        doc.transact_with(
            |_| CommitOptions::default().with_time(at.as_secs()),
            |tx| -> Result<(), ModelError> {
                tx.put(ROOT, keys::SCHEMA, SCHEMA_VERSION)?;
                tx.put(ROOT, keys::ID, new.id.to_string())?;
                tx.put(ROOT, keys::STORE, new.store.as_str())?;
                tx.put(ROOT, keys::CURRENCY, new.currency.code())?;
                tx.put(ROOT, keys::CREATED_BY, device.as_str())?;
                tx.put(ROOT, keys::CREATED_AT, ScalarValue::Timestamp(at.0))?;
                tx.put_object(ROOT, keys::LINES, ObjType::Map)?;
                tx.put_object(ROOT, keys::PAYMENTS, ObjType::Map)?;
                let status = tx.put_object(ROOT, keys::STATUS, ObjType::Map)?;
                tx.put_object(ROOT, keys::ACKS, ObjType::Map)?;
                put_status(tx, &status, entry, OrderStatus::InProgress, 1, at, &device)?;
                Ok(())
            },
        )
        .map_err(|f| f.error)?;
        Self::from_doc(doc, writer)
    }

    /// Like [`Self::from_doc`], but hands the document back when it is not an order.
    pub fn try_from_doc(
        doc: Automerge,
        writer: Writer,
    ) -> Result<Self, Box<(Automerge, ModelError)>> {
        let r = Reader::new(&doc, None);
        let parsed = Header::read(&r).and_then(|h| Ok((h, Roots::read(&r)?)));
        match parsed {
            Ok((header, roots)) => Ok(Self {
                cache: Cache::at(&doc),
                doc: doc.with_actor(writer.actor.clone()),
                writer,
                roots,
                header,
            }),
            Err(e) => Err(Box::new((doc, e))),
        }
    }

    /// Wraps a document that already holds an order (after a load or a sync).
    pub fn from_doc(doc: Automerge, writer: Writer) -> Result<Self, ModelError> {
        let doc = doc.with_actor(writer.actor.clone());
        let r = Reader::new(&doc, None);
        let header = Header::read(&r)?;
        let roots = Roots::read(&r)?;
        Ok(Self {
            cache: Cache::at(&doc),
            doc,
            writer,
            roots,
            header,
        })
    }

    /// Loads a saved order. Arbitrary bytes give a typed error, never a panic; the whole
    /// document is checked against the schema.
    pub fn load(bytes: &[u8], writer: Writer) -> Result<Self, ModelError> {
        let doc = guard::load(bytes)?.with_actor(writer.actor.clone());
        // The strict parse that checks the document is kept for the first view.
        let snapshot = Snapshot::read(&Reader::new(&doc, None))?;
        let cache = Cache::at(&doc);
        let order = Self {
            writer,
            roots: snapshot.roots.clone(),
            header: snapshot.header.clone(),
            cache,
            doc,
        };
        // Cannot fail: the cell was just made empty.
        let _ = order.cache.snapshot.set(Arc::new(snapshot));
        Ok(order)
    }

    /// The compacted document bytes.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The underlying Automerge document (read-only).
    pub fn doc(&self) -> &Automerge {
        &self.doc
    }

    /// The underlying document, for the sync layers (Automerge sync protocol). Writing business
    /// data through it bypasses the model: use the typed operations instead.
    pub fn doc_mut(&mut self) -> &mut Automerge {
        &mut self.doc
    }

    /// Takes the document out.
    pub fn into_doc(self) -> Automerge {
        self.doc
    }

    /// The writer this handle commits as.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The order's id.
    pub fn id(&self) -> OrderId {
        self.header.id
    }

    /// The store the order belongs to.
    pub fn store(&self) -> &StoreId {
        &self.header.store
    }

    /// The order's currency.
    pub fn currency(&self) -> Currency {
        self.header.currency
    }

    /// Current heads of the document.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The relay-assigned number, once the relay has given one.
    pub fn number(&self) -> Result<Option<OrderNumber>, ModelError> {
        Ok(Reader::new(&self.doc, None)
            .opt_uint(&ROOT, keys::NUMBER, "")?
            .map(OrderNumber))
    }

    /// The effective business status (the join of the status log).
    pub fn status(&self) -> Result<OrderStatus, ModelError> {
        if let Some(st) = self.cache.status
            && self.cache.heads == self.doc.get_heads()
        {
            return Ok(st.lattice.status());
        }
        Ok(self.read_status()?.lattice.status())
    }

    fn read_status(&self) -> Result<StatusState, ModelError> {
        let log = schema::read_status_log(&Reader::new(&self.doc, None), &self.roots.status)?;
        Ok(StatusState {
            lattice: schema::lattice(&log),
            next_clock: next_clock(log.iter().map(|r| &r.entry)),
        })
    }

    /// The cache, made valid for the current heads.
    fn cache(&mut self) -> &mut Cache {
        self.cache.validate(self.doc.get_heads());
        &mut self.cache
    }

    /// The status facts at the current heads (cached).
    fn status_state(&mut self) -> Result<StatusState, ModelError> {
        if let Some(st) = self.cache().status {
            return Ok(st);
        }
        let st = self.read_status()?;
        self.cache.status = Some(st);
        Ok(st)
    }

    /// How the change `hash` relates to the order's close, read from the change graph:
    /// `None` while the order is open or if the change is unknown.
    pub fn change_vs_close(&self, hash: &ChangeHash) -> Result<Option<CloseRelation>, ModelError> {
        let log = schema::read_status_log(&Reader::new(&self.doc, None), &self.roots.status)?;
        let Some((_, close)) = view::close_of(&self.doc, &log) else {
            return Ok(None);
        };
        let Some(change) = self.doc.get_change_by_hash(hash) else {
            return Ok(None);
        };
        if *hash == close {
            return Ok(Some(CloseRelation::IsTheClose));
        }
        // Before: in the causal past of the close.
        if self
            .doc
            .get_changes(std::slice::from_ref(&close))
            .iter()
            .all(|c| c.hash() != *hash)
        {
            return Ok(Some(CloseRelation::Before));
        }
        // After: its author had seen a terminal status.
        let r = Reader::new(&self.doc, Some(change.deps()));
        let seen = match Roots::read(&r) {
            Ok(roots) => schema::lattice(&schema::read_status_log(&r, &roots.status)?),
            Err(_) => return Ok(Some(CloseRelation::Concurrent)),
        };
        Ok(Some(if seen.is_terminal() {
            CloseRelation::After
        } else {
            CloseRelation::Concurrent
        }))
    }

    /// The hydrated read-only view with totals, late edits and conflicts.
    ///
    /// The parsed document is kept for the next view at the same heads.
    pub fn view(&self) -> Result<OrderView, ModelError> {
        if self.cache.heads != self.doc.get_heads() {
            return view::build(&self.doc);
        }
        let snapshot = match self.cache.snapshot.get() {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(Snapshot::read(&Reader::new(&self.doc, None))?);
                // Another clone of the cell may have been filled meanwhile: same heads, same parse.
                let _ = self.cache.snapshot.set(Arc::clone(&s));
                s
            }
        };
        view::build_from(&self.doc, &snapshot)
    }

    /// Merges another replica of the same order; returns the hashes of changes new to `self`.
    pub fn merge(&mut self, other: &mut Order) -> Result<Vec<ChangeHash>, ModelError> {
        if other.header.id != self.header.id {
            return Err(ModelError::NotAnOrder(format!(
                "cannot merge order {} into order {}",
                other.header.id, self.header.id
            )));
        }
        let changes = self.doc.get_changes_added(&other.doc);
        let added = changes.iter().map(Change::hash).collect();
        self.apply_changes(changes)?;
        Ok(added)
    }

    /// Applies changes received from elsewhere (the relay applies them to a fork and runs the
    /// policy first). All or nothing: changes Automerge cannot take, or that leave no readable
    /// order header, leave the order as it was ([`guard::with_copy`]).
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> Result<(), ModelError> {
        if guard::has_all(&self.doc, &changes) {
            return Ok(());
        }
        let ((header, roots), _) = guard::with_copy(&mut self.doc, "change", |doc| {
            doc.apply_changes(changes)?;
            let r = Reader::new(doc, None);
            Ok((Header::read(&r)?, Roots::read(&r)?))
        })?;
        self.header = header;
        self.roots = roots;
        self.cache = Cache::at(&self.doc);
        Ok(())
    }

    /// Re-reads the cached header and containers after the document changed underneath.
    pub fn refresh(&mut self) -> Result<(), ModelError> {
        let r = Reader::new(&self.doc, None);
        self.header = Header::read(&r)?;
        self.roots = Roots::read(&r)?;
        self.cache = Cache::at(&self.doc);
        Ok(())
    }

    fn ensure_open(&mut self) -> Result<(), ModelError> {
        let status = self.status_state()?.lattice.status();
        if status.is_terminal() {
            Err(ModelError::OrderClosed { status })
        } else {
            Ok(())
        }
    }

    /// Runs `f` as one transaction and commits it. On success, `update` brings the cache from
    /// the heads before to the heads after: it must record every cached fact the transaction
    /// changed (status entries written, lines added, quantities, removals). If the cache did
    /// not describe the heads before, it is emptied instead.
    fn commit<O>(
        &mut self,
        at: Timestamp,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<O, ModelError>,
        update: impl FnOnce(&mut Cache, &O),
    ) -> Result<O, ModelError> {
        let cache_valid = self.cache.heads == self.doc.get_heads();
        let result = self
            .doc
            .transact_with(|_| CommitOptions::default().with_time(at.as_secs()), f)
            .map(|s| s.result)
            .map_err(|f| f.error)?;
        if cache_valid {
            self.cache.heads = self.doc.get_heads();
            // The parse of the whole document is not carried over.
            self.cache.snapshot = OnceLock::new();
            update(&mut self.cache, &result);
        } else {
            self.cache = Cache::at(&self.doc);
        }
        Ok(result)
    }

    /// The facts about an editable line at the current heads (cached): refused when the line
    /// does not exist or was removed.
    fn line(&mut self, line: LineId) -> Result<LineState, ModelError> {
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

    fn payment(&self, payment: PaymentId) -> Result<schema::PaymentRec, ModelError> {
        let r = Reader::new(&self.doc, None);
        let key = payment.to_string();
        if r.get(&self.roots.payments, &key)?.is_none() {
            return Err(ModelError::PaymentNotFound(payment));
        }
        schema::read_payment(&r, &self.roots.payments, &key, self.header.currency)
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

    /// Moves an open order between active statuses (a new status log entry).
    pub fn set_status(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: ActiveStatus,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        self.push_status(at, rng, status.into())
    }

    fn push_status(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: OrderStatus,
    ) -> Result<(), ModelError> {
        let (obj, entry, clock, device) = self.status_entry_args(at, rng)?;
        self.commit(
            at,
            |tx| put_status(tx, &obj, entry, status, clock, at, &device),
            // A new status entry: read the log again when next needed.
            |c, _| c.status = None,
        )
    }

    fn status_entry_args(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
    ) -> Result<(ObjId, EntryId, u64, String), ModelError> {
        let clock = self.status_state()?.next_clock;
        Ok((
            self.roots.status.clone(),
            EntryId::generate(at, rng),
            clock,
            self.writer.device.to_string(),
        ))
    }

    /// Records a payment in state `initial` (pending before a card terminal is asked; captured
    /// for cash already in the drawer).
    pub fn add_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        draft: PaymentDraft,
        initial: PaymentState,
    ) -> Result<PaymentId, ModelError> {
        self.ensure_open()?;
        let id = PaymentId::generate(at, rng);
        let tid = EntryId::generate(at, rng);
        self.check_payment_draft(&draft, initial)?;
        let args = PaymentArgs {
            id,
            tid,
            draft,
            initial,
            at,
            currency: self.header.currency,
        };
        let payments = self.roots.payments.clone();
        let device = self.writer.device.to_string();
        // Payments are not cached.
        self.commit(
            at,
            |tx| put_payment(tx, &payments, &args, &device),
            |_, _| {},
        )?;
        Ok(id)
    }

    fn check_payment_draft(
        &self,
        draft: &PaymentDraft,
        initial: PaymentState,
    ) -> Result<(), ModelError> {
        if draft.amount <= 0 || draft.amount > MAX_PAYMENT {
            return Err(ModelError::InvalidAmount(draft.amount));
        }
        if !initial.is_initial() {
            return Err(ModelError::InvalidValue {
                field: "initial payment state",
                value: initial.to_string(),
            });
        }
        check_free_text(TextField::PaymentKind, draft.kind.as_str())?;
        check_free_text(TextField::PaymentReference, &draft.reference)
    }

    /// Records `pending` for a payment about to be taken.
    pub fn begin_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        draft: PaymentDraft,
    ) -> Result<PaymentId, ModelError> {
        self.add_payment(at, rng, draft, PaymentState::Pending)
    }

    /// Moves a payment forward to `to`, optionally with the reference learnt at that step (an
    /// authorisation code). On a closed order only voids and refunds are accepted.
    pub fn advance_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
        to: PaymentState,
        reference: Option<&str>,
    ) -> Result<(), ModelError> {
        let status = self.status_state()?.lattice.status();
        if status.is_terminal() && !to.allowed_after_close() {
            return Err(ModelError::OrderClosed { status });
        }
        if let Some(r) = reference {
            check_free_text(TextField::TransitionReference, r)?;
        }
        let rec = self.payment(payment)?;
        let from = rec.state();
        if !from.can_move_to(to) {
            return Err(ModelError::InvalidTransition { payment, from, to });
        }
        let tid = EntryId::generate(at, rng);
        let transitions = self.transitions_obj(payment)?;
        let device = self.writer.device.to_string();
        self.commit(
            at,
            |tx| put_transition(tx, &transitions, tid, to, at, &device, reference),
            |_, _| {},
        )
    }

    fn transitions_obj(&self, payment: PaymentId) -> Result<ObjId, ModelError> {
        let r = Reader::new(&self.doc, None);
        let p = r.container(
            &self.roots.payments,
            &payment.to_string(),
            ObjType::Map,
            "payment",
        )?;
        r.container(&p, keys::TRANSITIONS, ObjType::Map, "payment.transitions")
    }

    /// pending -> authorized, with the terminal's authorisation reference.
    pub fn authorize_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
        reference: &str,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Authorized, Some(reference))
    }

    /// -> captured: the money is taken.
    pub fn capture_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Captured, None)
    }

    /// -> voided: cancelled before money moved (also allowed on a closed order).
    pub fn void_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Voided, None)
    }

    /// captured -> refunded (also allowed on a closed order).
    pub fn refund_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Refunded, None)
    }

    /// Completes the sale: records the final payment (if any) and makes the order Done in
    /// **one** change, so there is no moment where the order is closed but unpaid or paid but
    /// open. Refused while a balance would remain due.
    pub fn complete_sale(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        last: Option<FinalPayment>,
    ) -> Result<Option<PaymentId>, ModelError> {
        self.ensure_open()?;
        let view = self.view()?;
        let currency = self.header.currency;
        let extra = match &last {
            None => 0,
            Some(FinalPayment::New(d)) => {
                self.check_payment_draft(d, PaymentState::Captured)?;
                d.amount
            }
            Some(FinalPayment::Capture(pid)) => {
                let rec = self.payment(*pid)?;
                let from = rec.state();
                if !from.can_move_to(PaymentState::Captured) {
                    return Err(ModelError::InvalidTransition {
                        payment: *pid,
                        from,
                        to: PaymentState::Captured,
                    });
                }
                rec.amount
            }
        };
        let paid =
            Money::new(view.totals.paid, currency).checked_add(Money::new(extra, currency))?;
        let due = Money::new(view.totals.total, currency).checked_sub(paid)?;
        if due.minor > 0 {
            return Err(ModelError::BalanceDue {
                due_minor: due.minor,
                currency: currency.code().to_owned(),
            });
        }
        let (status_obj, entry, clock, device) = self.status_entry_args(at, rng)?;
        let payments = self.roots.payments.clone();
        let plan = match last {
            None => None,
            Some(FinalPayment::New(draft)) => Some(Ok(PaymentArgs {
                id: PaymentId::generate(at, rng),
                tid: EntryId::generate(at, rng),
                draft,
                initial: PaymentState::Captured,
                at,
                currency,
            })),
            Some(FinalPayment::Capture(pid)) => Some(Err((
                pid,
                self.transitions_obj(pid)?,
                EntryId::generate(at, rng),
            ))),
        };
        self.commit(
            at,
            |tx| {
                let paid_with = match &plan {
                    None => None,
                    Some(Ok(args)) => {
                        put_payment(tx, &payments, args, &device)?;
                        Some(args.id)
                    }
                    Some(Err((pid, transitions, tid))) => {
                        put_transition(
                            tx,
                            transitions,
                            *tid,
                            PaymentState::Captured,
                            at,
                            &device,
                            None,
                        )?;
                        Some(*pid)
                    }
                };
                put_status(
                    tx,
                    &status_obj,
                    entry,
                    OrderStatus::Done,
                    clock,
                    at,
                    &device,
                )?;
                Ok(paid_with)
            },
            // A new status entry (payments are not cached).
            |c, _| c.status = None,
        )
    }

    /// Deletes (cancels) the order. Refused while a payment is captured and not refunded, or
    /// pending/authorised and not voided: money is settled first.
    pub fn delete(&mut self, at: Timestamp, rng: &mut dyn Entropy) -> Result<(), ModelError> {
        self.ensure_open()?;
        let view = self.view()?;
        let open = view
            .payments
            .iter()
            .filter(|p| {
                matches!(
                    p.state,
                    PaymentState::Pending | PaymentState::Authorized | PaymentState::Captured
                )
            })
            .count();
        if open > 0 {
            return Err(ModelError::OutstandingPayments(open));
        }
        self.push_status(at, rng, OrderStatus::Deleted)
    }

    /// Writes the relay-assigned number. Only the relay calls this (its policy refuses a number
    /// written by a device); allowed on closed orders. Returns `false` if the same number was
    /// already there.
    pub fn assign_number(
        &mut self,
        at: Timestamp,
        number: OrderNumber,
    ) -> Result<bool, ModelError> {
        match self.number()? {
            Some(n) if n == number => Ok(false),
            Some(n) => Err(ModelError::NumberAlreadyAssigned(n.0)),
            // The number is not cached.
            None => self.commit(
                at,
                |tx| {
                    tx.put(ROOT, keys::NUMBER, number.0)?;
                    Ok(true)
                },
                |_, _| {},
            ),
        }
    }

    /// A back-office status change, applied through the lattice: an active status is refused on
    /// a closed order, Done/Deleted are recorded as entries (a terminal order stays terminal).
    pub fn set_status_any(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: OrderStatus,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        self.push_status(at, rng, status)
    }

    /// A manager acknowledges a late edit (allowed on closed orders).
    pub fn acknowledge_late_edit(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        edit: &str,
        note: &str,
    ) -> Result<(), ModelError> {
        check_free_text(TextField::AckNote, note)?;
        let view = self.view()?;
        if !view.late_edits.iter().any(|e| e.id == edit) {
            return Err(ModelError::LateEditNotFound(edit.to_owned()));
        }
        let id = EntryId::generate(at, rng);
        let acks = self.roots.acks.clone();
        let device = self.writer.device.to_string();
        // Acknowledgements are not cached.
        self.commit(
            at,
            |tx| {
                let o = tx.put_object(&acks, id.to_string(), ObjType::Map)?;
                tx.put(&o, keys::EDIT, edit)?;
                tx.put(&o, keys::BY, device.as_str())?;
                tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
                tx.put(&o, keys::NOTE, note)?;
                Ok(())
            },
            |_, _| {},
        )
    }
}

fn check_price(p: i64) -> Result<(), ModelError> {
    if (0..=MAX_UNIT_PRICE).contains(&p) {
        Ok(())
    } else {
        Err(ModelError::InvalidAmount(p))
    }
}

fn check_quantity(q: i64) -> Result<(), ModelError> {
    if (1..=MAX_QUANTITY).contains(&q) {
        Ok(())
    } else {
        Err(ModelError::InvalidValue {
            field: "quantity",
            value: q.to_string(),
        })
    }
}

fn put_status(
    tx: &mut Transaction<'_>,
    status: &ObjId,
    entry: EntryId,
    st: OrderStatus,
    clock: u64,
    at: Timestamp,
    device: &str,
) -> Result<(), ModelError> {
    let o = tx.put_object(status, entry.to_string(), ObjType::Map)?;
    tx.put(&o, keys::STATUS, st.as_str())?;
    tx.put(&o, keys::CLOCK, clock)?;
    tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
    tx.put(&o, keys::BY, device)?;
    Ok(())
}

struct PaymentArgs {
    id: PaymentId,
    tid: EntryId,
    draft: PaymentDraft,
    initial: PaymentState,
    at: Timestamp,
    currency: Currency,
}

fn put_payment(
    tx: &mut Transaction<'_>,
    payments: &ObjId,
    a: &PaymentArgs,
    device: &str,
) -> Result<(), ModelError> {
    let p = tx.put_object(payments, a.id.to_string(), ObjType::Map)?;
    tx.put(&p, keys::KIND, a.draft.kind.as_str())?;
    tx.put(&p, keys::AMOUNT, a.draft.amount)?;
    tx.put(&p, keys::CURRENCY, a.currency.code())?;
    tx.put(&p, keys::REFERENCE, a.draft.reference.as_str())?;
    tx.put(&p, keys::CREATED_BY, device)?;
    tx.put(&p, keys::CREATED_AT, ScalarValue::Timestamp(a.at.0))?;
    let t = tx.put_object(&p, keys::TRANSITIONS, ObjType::Map)?;
    put_transition(tx, &t, a.tid, a.initial, a.at, device, None)
}

fn put_transition(
    tx: &mut Transaction<'_>,
    transitions: &ObjId,
    tid: EntryId,
    state: PaymentState,
    at: Timestamp,
    device: &str,
    reference: Option<&str>,
) -> Result<(), ModelError> {
    let o = tx.put_object(transitions, tid.to_string(), ObjType::Map)?;
    tx.put(&o, keys::STATE, state.as_str())?;
    tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
    tx.put(&o, keys::BY, device)?;
    if let Some(r) = reference {
        tx.put(&o, keys::REFERENCE, r)?;
    }
    Ok(())
}
