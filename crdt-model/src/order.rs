//! [`Order`]: one order as one Automerge document, with typed, targeted operations.
//!
//! Every operation is one Automerge transaction, so one change: it either commits whole or
//! leaves the document untouched (a refused operation rolls back). Operations write only the
//! keys they mean to change (no whole-struct reconcile), and entries go under fresh unique keys.

use std::sync::{Arc, OnceLock};

use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjType, ROOT, ReadDoc, ScalarValue,
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
use crate::seal::SealKey;
use crate::status::{ActiveStatus, OrderStatus, StatusLattice, next_clock};
use crate::text::{TextField, check_free_text};
use crate::view::{self, OrderView};

mod cache;
mod lifecycle;
mod lines;
mod payments;

use cache::{Cache, LineState};
use lifecycle::put_status;
use payments::{PaymentArgs, put_payment, put_transition};

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
    /// The relay's sealing key: every change this writer commits is sealed with it
    /// ([`crate::seal`]). Devices have none.
    pub seal: Option<SealKey>,
}

impl Writer {
    /// A writer for `device` with the given epoch.
    pub fn new(device: DeviceId, epoch: u32) -> Self {
        let mut bytes = device.as_bytes().to_vec();
        bytes.extend_from_slice(&epoch.to_be_bytes());
        Self {
            device,
            actor: ActorId::from(bytes),
            seal: None,
        }
    }

    /// The same writer sealing every change it commits with `key` (the relay's writer).
    #[must_use]
    pub fn with_seal(mut self, key: SealKey) -> Self {
        self.seal = Some(key);
        self
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
        let result = match &self.writer.seal {
            None => self
                .doc
                .transact_with(|_| CommitOptions::default().with_time(at.as_secs()), f)
                .map(|s| s.result)
                .map_err(|f| f.error)?,
            Some(key) => {
                // The change is made on a copy, sealed, and the sealed change applied here:
                // its seal covers the change as made, so it cannot be written directly.
                let mut scratch = self.doc.fork().with_actor(self.writer.actor.clone());
                let result = scratch
                    .transact_with(|_| CommitOptions::default().with_time(at.as_secs()), f)
                    .map(|s| s.result)
                    .map_err(|f| f.error)?;
                let made = scratch.get_changes(&self.doc.get_heads());
                let sealed = made
                    .iter()
                    .map(|c| key.seal(self.header.id, c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ModelError::Seal)?;
                self.doc.apply_changes(sealed)?;
                result
            }
        };
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
}
