//! The document schema: key names, and a strict parser from an Automerge document (at its
//! current heads or any historical heads) into typed records.
//!
//! ```text
//! ROOT
//! ├─ schema      uint   = 1                          immutable
//! ├─ id          str    order id (UUID v7)           immutable
//! ├─ store       str    store (tenant) id            immutable
//! ├─ currency    str    ISO 4217                     immutable
//! ├─ created_by  str    device id                    immutable
//! ├─ created_at  ts                                  immutable
//! ├─ number      uint   relay-assigned, write-once   relay only
//! ├─ lines       map  line id -> line                created in the first change
//! ├─ payments    map  payment id -> payment          created in the first change
//! ├─ status      map  entry id -> status entry       created in the first change
//! └─ acks        map  entry id -> acknowledgement    created in the first change
//! ```
//!
//! See `docs/model.md` for every entry's fields and who may write them.

use std::collections::BTreeMap;

use automerge::{Automerge, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use crate::error::ModelError;
use crate::ids::{DeviceId, EntryId, LineId, OrderId, OrderNumber, PaymentId, StoreId, Timestamp};
use crate::money::Currency;
use crate::payment::{PaymentKind, PaymentState};
use crate::status::{StatusEntry, StatusLattice};

/// The schema version written in every order's first change.
pub const SCHEMA_VERSION: u64 = 1;

/// Key names used in the document.
pub mod keys {
    /// Root: schema version.
    pub const SCHEMA: &str = "schema";
    /// Root: order id.
    pub const ID: &str = "id";
    /// Root: store id.
    pub const STORE: &str = "store";
    /// Root: currency.
    pub const CURRENCY: &str = "currency";
    /// Root and entries: creating device.
    pub const CREATED_BY: &str = "created_by";
    /// Root and entries: creation time.
    pub const CREATED_AT: &str = "created_at";
    /// Root: relay-assigned number.
    pub const NUMBER: &str = "number";
    /// Root: the lines map.
    pub const LINES: &str = "lines";
    /// Root: the payments map (the sale).
    pub const PAYMENTS: &str = "payments";
    /// Root: the status log.
    pub const STATUS: &str = "status";
    /// Root: acknowledgements of late edits.
    pub const ACKS: &str = "acks";
    /// Line: stock keeping unit.
    pub const SKU: &str = "sku";
    /// Line: display name.
    pub const NAME: &str = "name";
    /// Line: unit price in minor units.
    pub const UNIT_PRICE: &str = "unit_price";
    /// Line: quantity (a counter).
    pub const QTY: &str = "qty";
    /// Line: modifiers (a list of strings, fixed at creation).
    pub const MODIFIERS: &str = "modifiers";
    /// Line and acknowledgement: free text.
    pub const NOTE: &str = "note";
    /// Line: removal marker (device), write-once.
    pub const REMOVED_BY: &str = "removed_by";
    /// Line: removal marker (time), write-once.
    pub const REMOVED_AT: &str = "removed_at";
    /// Payment: kind of tender.
    pub const KIND: &str = "kind";
    /// Payment: amount in minor units.
    pub const AMOUNT: &str = "amount";
    /// Payment and transition: external reference.
    pub const REFERENCE: &str = "reference";
    /// Payment: its transitions log.
    pub const TRANSITIONS: &str = "transitions";
    /// Transition: the state entered.
    pub const STATE: &str = "state";
    /// Entries: writing device.
    pub const BY: &str = "by";
    /// Entries: writing time.
    pub const AT: &str = "at";
    /// Status entry: Lamport clock.
    pub const CLOCK: &str = "clock";
    /// Acknowledgement: the late edit acknowledged.
    pub const EDIT: &str = "edit";
}

/// Reads a document at its current heads or at historical heads.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a> {
    pub(crate) doc: &'a Automerge,
    pub(crate) heads: Option<&'a [ChangeHash]>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(doc: &'a Automerge, heads: Option<&'a [ChangeHash]>) -> Self {
        Self { doc, heads }
    }

    pub(crate) fn get(
        &self,
        obj: &ObjId,
        key: &str,
    ) -> Result<Option<(Value<'a>, ObjId)>, ModelError> {
        Ok(match self.heads {
            None => self.doc.get(obj, key)?,
            Some(h) => self.doc.get_at(obj, key, h)?,
        })
    }

    pub(crate) fn get_all(
        &self,
        obj: &ObjId,
        key: &str,
    ) -> Result<Vec<(Value<'a>, ObjId)>, ModelError> {
        Ok(match self.heads {
            None => self.doc.get_all(obj, key)?,
            Some(h) => self.doc.get_all_at(obj, key, h)?,
        })
    }

    pub(crate) fn list_strings(&self, obj: &ObjId, path: &str) -> Result<Vec<String>, ModelError> {
        let len = match self.heads {
            None => self.doc.length(obj),
            Some(h) => self.doc.length_at(obj, h),
        };
        (0..len)
            .map(|i| {
                let v = match self.heads {
                    None => self.doc.get(obj, i)?,
                    Some(h) => self.doc.get_at(obj, i, h)?,
                };
                match v {
                    Some((Value::Scalar(s), _)) => match s.as_ref() {
                        ScalarValue::Str(s) => Ok(s.to_string()),
                        _ => Err(bad(&format!("{path}[{i}]"), "a string")),
                    },
                    _ => Err(bad(&format!("{path}[{i}]"), "a string")),
                }
            })
            .collect()
    }

    /// The one container at `key`; a missing or duplicated container is not an order.
    pub(crate) fn container(
        &self,
        obj: &ObjId,
        key: &str,
        ty: ObjType,
        path: &str,
    ) -> Result<ObjId, ModelError> {
        let all = self.get_all(obj, key)?;
        match all.as_slice() {
            [(Value::Object(t), id)] if *t == ty => Ok(id.clone()),
            [] => Err(bad(path, "a container")),
            [_] => Err(bad(path, "a container of the right type")),
            _ => Err(ModelError::NotAnOrder(format!(
                "{path}: container created more than once"
            ))),
        }
    }

    pub(crate) fn opt_scalar(
        &self,
        obj: &ObjId,
        key: &str,
    ) -> Result<Option<ScalarValue>, ModelError> {
        match self.get(obj, key)? {
            None => Ok(None),
            Some((Value::Scalar(s), _)) => Ok(Some(s.into_owned())),
            Some((Value::Object(_), _)) => Err(bad(key, "a scalar")),
        }
    }

    pub(crate) fn opt_uint(
        &self,
        obj: &ObjId,
        key: &str,
        path: &str,
    ) -> Result<Option<u64>, ModelError> {
        match self.opt_scalar(obj, key)? {
            None => Ok(None),
            Some(ScalarValue::Uint(u)) => Ok(Some(u)),
            Some(_) => Err(bad(&format!("{path}.{key}"), "an unsigned integer")),
        }
    }

    /// Every value written concurrently at `key` (more than one means a conflict).
    pub(crate) fn scalar_values(
        &self,
        obj: &ObjId,
        key: &str,
    ) -> Result<Vec<ScalarValue>, ModelError> {
        Ok(self
            .get_all(obj, key)?
            .into_iter()
            .filter_map(|(v, _)| match v {
                Value::Scalar(s) => Some(s.into_owned()),
                Value::Object(_) => None,
            })
            .collect())
    }
}

/// One map's entries, read in a single pass (much cheaper than one `get` per key).
pub(crate) struct Fields {
    entries: Vec<(String, Value<'static>, ObjId, bool)>,
    path: String,
}

impl Reader<'_> {
    /// Every entry of the map `obj` (winning values, with the conflict flag).
    pub(crate) fn fields(&self, obj: &ObjId, path: &str) -> Fields {
        let items: Vec<_> = match self.heads {
            None => self
                .doc
                .map_range(obj, ..)
                .map(|i| (i.key.to_string(), i.id(), i.conflict, i.value.into_value()))
                .collect(),
            Some(h) => self
                .doc
                .map_range_at(obj, .., h)
                .map(|i| (i.key.to_string(), i.id(), i.conflict, i.value.into_value()))
                .collect(),
        };
        Fields {
            entries: items
                .into_iter()
                .map(|(k, id, c, v)| (k, v, id, c))
                .collect(),
            path: path.to_owned(),
        }
    }
}

impl Fields {
    fn find(&self, key: &str) -> Option<&(String, Value<'static>, ObjId, bool)> {
        self.entries.iter().find(|e| e.0 == key)
    }

    fn bad(&self, key: &str, expected: &str) -> ModelError {
        bad(&format!("{}.{key}", self.path), expected)
    }

    /// Entry keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    /// Whether concurrent writes left more than one value at `key`.
    pub(crate) fn conflicted(&self, key: &str) -> bool {
        self.find(key).is_some_and(|e| e.3)
    }

    fn scalar(&self, key: &str) -> Result<Option<&ScalarValue>, ModelError> {
        match self.find(key) {
            None => Ok(None),
            Some((_, Value::Scalar(s), _, _)) => Ok(Some(s.as_ref())),
            Some(_) => Err(self.bad(key, "a scalar")),
        }
    }

    /// The one container of type `ty` at `key`; a duplicated container is not an order.
    pub(crate) fn container(&self, key: &str, ty: ObjType) -> Result<ObjId, ModelError> {
        match self.find(key) {
            Some((_, Value::Object(t), id, false)) if *t == ty => Ok(id.clone()),
            Some((_, Value::Object(_), _, true)) => Err(ModelError::NotAnOrder(format!(
                "{}.{key}: container created more than once",
                self.path
            ))),
            Some(_) => Err(self.bad(key, "a container of the right type")),
            None => Err(self.bad(key, "a container")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValue::Str(s)) => Ok(Some(s.to_string())),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<String, ModelError> {
        self.opt_str(key)?.ok_or_else(|| self.bad(key, "a string"))
    }

    pub(crate) fn int(&self, key: &str) -> Result<i64, ModelError> {
        match self.scalar(key)? {
            Some(ScalarValue::Int(i)) => Ok(*i),
            _ => Err(self.bad(key, "an integer")),
        }
    }

    pub(crate) fn opt_uint(&self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValue::Uint(u)) => Ok(Some(*u)),
            Some(_) => Err(self.bad(key, "an unsigned integer")),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Result<u64, ModelError> {
        self.opt_uint(key)?
            .ok_or_else(|| self.bad(key, "an unsigned integer"))
    }

    pub(crate) fn counter(&self, key: &str) -> Result<i64, ModelError> {
        match self.scalar(key)? {
            Some(ScalarValue::Counter(c)) => Ok(i64::from(c)),
            _ => Err(self.bad(key, "a counter")),
        }
    }

    pub(crate) fn opt_ts(&self, key: &str) -> Result<Option<Timestamp>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValue::Timestamp(t)) => Ok(Some(Timestamp(*t))),
            Some(_) => Err(self.bad(key, "a timestamp")),
        }
    }

    pub(crate) fn ts(&self, key: &str) -> Result<Timestamp, ModelError> {
        self.opt_ts(key)?
            .ok_or_else(|| self.bad(key, "a timestamp"))
    }

    pub(crate) fn parse<T: std::str::FromStr<Err = ModelError>>(
        &self,
        key: &str,
    ) -> Result<T, ModelError> {
        parse(&self.str(key)?, &format!("{}.{key}", self.path))
    }
}

pub(crate) fn bad(path: &str, expected: &str) -> ModelError {
    ModelError::NotAnOrder(format!("{path}: expected {expected}"))
}

fn parse<T: std::str::FromStr<Err = ModelError>>(s: &str, path: &str) -> Result<T, ModelError> {
    s.parse()
        .map_err(|e: ModelError| ModelError::NotAnOrder(format!("{path}: {e}")))
}

/// The relay-assigned number, if any.
pub(crate) fn read_number(r: &Reader<'_>) -> Result<Option<OrderNumber>, ModelError> {
    Ok(r.opt_uint(&ROOT, keys::NUMBER, "")?.map(OrderNumber))
}

/// Object ids of the root containers.
#[derive(Clone, Debug)]
pub(crate) struct Roots {
    pub(crate) lines: ObjId,
    pub(crate) payments: ObjId,
    pub(crate) status: ObjId,
    pub(crate) acks: ObjId,
}

impl Roots {
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        Self::from_fields(&r.fields(&ROOT, ""))
    }

    pub(crate) fn from_fields(f: &Fields) -> Result<Self, ModelError> {
        Ok(Self {
            lines: f.container(keys::LINES, ObjType::Map)?,
            payments: f.container(keys::PAYMENTS, ObjType::Map)?,
            status: f.container(keys::STATUS, ObjType::Map)?,
            acks: f.container(keys::ACKS, ObjType::Map)?,
        })
    }
}

/// The immutable header of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) id: OrderId,
    pub(crate) store: StoreId,
    pub(crate) currency: Currency,
    pub(crate) created_by: DeviceId,
    pub(crate) created_at: Timestamp,
}

impl Header {
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        Self::from_fields(&r.fields(&ROOT, ""))
    }

    pub(crate) fn from_fields(f: &Fields) -> Result<Self, ModelError> {
        let schema = f.uint(keys::SCHEMA)?;
        if schema != SCHEMA_VERSION {
            return Err(ModelError::NotAnOrder(format!(
                "unsupported schema version {schema}"
            )));
        }
        let currency = f.str(keys::CURRENCY)?;
        Ok(Self {
            id: f.parse(keys::ID)?,
            store: f.parse(keys::STORE)?,
            currency: Currency::new(&currency)
                .map_err(|e| ModelError::NotAnOrder(format!("currency: {e}")))?,
            created_by: f.parse(keys::CREATED_BY)?,
            created_at: f.ts(keys::CREATED_AT)?,
        })
    }
}

/// One status log entry with its metadata.
#[derive(Clone, Debug)]
pub(crate) struct StatusRec {
    pub(crate) entry: StatusEntry,
    pub(crate) at: Timestamp,
    pub(crate) by: DeviceId,
    pub(crate) obj: ObjId,
}

/// One status entry, by key.
pub(crate) fn read_status_entry(
    r: &Reader<'_>,
    status: &ObjId,
    key: &str,
) -> Result<StatusRec, ModelError> {
    let obj = r.container(status, key, ObjType::Map, &format!("status.{key}"))?;
    status_from(r, key, obj)
}

fn status_from(r: &Reader<'_>, key: &str, obj: ObjId) -> Result<StatusRec, ModelError> {
    let path = format!("status.{key}");
    let id: EntryId = parse(key, &path)?;
    let f = r.fields(&obj, &path);
    Ok(StatusRec {
        entry: StatusEntry {
            status: f.parse(keys::STATUS)?,
            clock: f.uint(keys::CLOCK)?,
            id,
        },
        at: f.ts(keys::AT)?,
        by: f.parse(keys::BY)?,
        obj,
    })
}

/// One acknowledgement, by key.
pub(crate) fn read_ack(r: &Reader<'_>, acks: &ObjId, key: &str) -> Result<AckRec, ModelError> {
    let o = r.container(acks, key, ObjType::Map, &format!("acks.{key}"))?;
    ack_from(r, key, &o)
}

fn ack_from(r: &Reader<'_>, key: &str, obj: &ObjId) -> Result<AckRec, ModelError> {
    let path = format!("acks.{key}");
    let _: EntryId = parse(key, &path)?;
    let f = r.fields(obj, &path);
    f.ts(keys::AT)?;
    f.str(keys::NOTE)?;
    Ok(AckRec {
        edit: f.str(keys::EDIT)?,
        by: f.parse(keys::BY)?,
    })
}

pub(crate) fn read_status_log(
    r: &Reader<'_>,
    status: &ObjId,
) -> Result<Vec<StatusRec>, ModelError> {
    let log = r.fields(status, "status");
    log.keys()
        .map(|k| status_from(r, k, log.container(k, ObjType::Map)?))
        .collect()
}

pub(crate) fn lattice(log: &[StatusRec]) -> StatusLattice {
    StatusLattice::from_entries(log.iter().map(|r| r.entry))
}

/// One line item.
#[derive(Clone, Debug)]
pub(crate) struct LineRec {
    pub(crate) sku: String,
    pub(crate) name: String,
    pub(crate) unit_price: i64,
    pub(crate) qty: i64,
    pub(crate) modifiers: Vec<String>,
    pub(crate) note: String,
    pub(crate) added_by: DeviceId,
    pub(crate) added_at: Timestamp,
    pub(crate) removed: Option<(DeviceId, Timestamp)>,
    /// Fields written concurrently by several replicas (`unit_price`, `note`).
    pub(crate) conflicted: Vec<&'static str>,
    pub(crate) obj: ObjId,
}

pub(crate) fn read_line(r: &Reader<'_>, lines: &ObjId, key: &str) -> Result<LineRec, ModelError> {
    let path = format!("lines.{key}");
    let obj = r.container(lines, key, ObjType::Map, &path)?;
    line_from(r, obj, &path)
}

fn line_from(r: &Reader<'_>, obj: ObjId, path: &str) -> Result<LineRec, ModelError> {
    let f = r.fields(&obj, path);
    let modifiers_obj = f.container(keys::MODIFIERS, ObjType::List)?;
    let removed = match (f.opt_str(keys::REMOVED_BY)?, f.opt_ts(keys::REMOVED_AT)?) {
        (Some(by), Some(at)) => Some((parse(&by, path)?, at)),
        (None, None) => None,
        _ => return Err(bad(path, "removed_by and removed_at together")),
    };
    let unit_price = f.int(keys::UNIT_PRICE)?;
    if unit_price < 0 {
        return Err(bad(&format!("{path}.unit_price"), "a non-negative amount"));
    }
    let conflicted = [keys::UNIT_PRICE, keys::NOTE]
        .into_iter()
        .filter(|k| f.conflicted(k))
        .collect();
    Ok(LineRec {
        sku: f.str(keys::SKU)?,
        name: f.str(keys::NAME)?,
        unit_price,
        qty: f.counter(keys::QTY)?,
        modifiers: r.list_strings(&modifiers_obj, &format!("{path}.modifiers"))?,
        note: f.str(keys::NOTE)?,
        added_by: f.parse(keys::CREATED_BY)?,
        added_at: f.ts(keys::CREATED_AT)?,
        removed,
        conflicted,
        obj,
    })
}

pub(crate) fn read_lines(
    r: &Reader<'_>,
    lines: &ObjId,
) -> Result<BTreeMap<LineId, LineRec>, ModelError> {
    let all = r.fields(lines, "lines");
    all.keys()
        .map(|k| {
            let path = format!("lines.{k}");
            let obj = all.container(k, ObjType::Map)?;
            Ok((parse(k, &path)?, line_from(r, obj, &path)?))
        })
        .collect()
}

/// One transition of a payment.
#[derive(Clone, Debug)]
pub(crate) struct TransitionRec {
    pub(crate) state: PaymentState,
    pub(crate) at: Timestamp,
    pub(crate) by: DeviceId,
    pub(crate) reference: Option<String>,
}

/// One payment transaction.
#[derive(Clone, Debug)]
pub(crate) struct PaymentRec {
    pub(crate) kind: PaymentKind,
    pub(crate) amount: i64,
    pub(crate) currency: Currency,
    pub(crate) reference: String,
    pub(crate) created_by: DeviceId,
    pub(crate) created_at: Timestamp,
    pub(crate) transitions: BTreeMap<EntryId, TransitionRec>,
}

impl PaymentRec {
    /// The effective state: the join of all transitions.
    pub(crate) fn state(&self) -> PaymentState {
        self.transitions
            .values()
            .map(|t| t.state)
            .fold(PaymentState::Pending, PaymentState::join)
    }

    /// Whether a capture and a void were recorded concurrently.
    pub(crate) fn captured_and_voided(&self) -> bool {
        let has = |s| self.transitions.values().any(|t| t.state == s);
        has(PaymentState::Voided) && (has(PaymentState::Captured) || has(PaymentState::Refunded))
    }

    /// The latest reference: from the highest-ranked transition that carries one, else the
    /// one given at creation.
    pub(crate) fn latest_reference(&self) -> String {
        let mut ts: Vec<&TransitionRec> = self.transitions.values().collect();
        ts.sort_by_key(|t| t.state);
        ts.iter()
            .rev()
            .find_map(|t| t.reference.clone())
            .unwrap_or_else(|| self.reference.clone())
    }
}

pub(crate) fn read_payment(
    r: &Reader<'_>,
    payments: &ObjId,
    key: &str,
    order_currency: Currency,
) -> Result<PaymentRec, ModelError> {
    let path = format!("payments.{key}");
    let obj = r.container(payments, key, ObjType::Map, &path)?;
    payment_from(r, &obj, &path, order_currency)
}

fn payment_from(
    r: &Reader<'_>,
    obj: &ObjId,
    path: &str,
    order_currency: Currency,
) -> Result<PaymentRec, ModelError> {
    let f = r.fields(obj, path);
    let amount = f.int(keys::AMOUNT)?;
    if amount <= 0 {
        return Err(bad(&format!("{path}.amount"), "a positive amount"));
    }
    let currency = Currency::new(&f.str(keys::CURRENCY)?)
        .map_err(|e| ModelError::NotAnOrder(format!("{path}.currency: {e}")))?;
    if currency != order_currency {
        return Err(bad(&format!("{path}.currency"), "the order's currency"));
    }
    let tpath = format!("{path}.transitions");
    let tobj = f.container(keys::TRANSITIONS, ObjType::Map)?;
    let tf = r.fields(&tobj, &tpath);
    let transitions = tf
        .keys()
        .map(|k| {
            let p = format!("{tpath}.{k}");
            let id: EntryId = parse(k, &p)?;
            let o = tf.container(k, ObjType::Map)?;
            let t = r.fields(&o, &p);
            Ok((
                id,
                TransitionRec {
                    state: t.parse(keys::STATE)?,
                    at: t.ts(keys::AT)?,
                    by: t.parse(keys::BY)?,
                    reference: t.opt_str(keys::REFERENCE)?,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>, ModelError>>()?;
    if transitions.is_empty() {
        return Err(bad(&tpath, "at least one transition"));
    }
    Ok(PaymentRec {
        kind: f.parse(keys::KIND)?,
        amount,
        currency,
        reference: f.str(keys::REFERENCE)?,
        created_by: f.parse(keys::CREATED_BY)?,
        created_at: f.ts(keys::CREATED_AT)?,
        transitions,
    })
}

pub(crate) fn read_payments(
    r: &Reader<'_>,
    payments: &ObjId,
    currency: Currency,
) -> Result<BTreeMap<PaymentId, PaymentRec>, ModelError> {
    let all = r.fields(payments, "payments");
    all.keys()
        .map(|k| {
            let path = format!("payments.{k}");
            let obj = all.container(k, ObjType::Map)?;
            Ok((parse(k, &path)?, payment_from(r, &obj, &path, currency)?))
        })
        .collect()
}

/// A manager's acknowledgement of a late edit.
#[derive(Clone, Debug)]
pub(crate) struct AckRec {
    pub(crate) edit: String,
    pub(crate) by: DeviceId,
}

pub(crate) fn read_acks(
    r: &Reader<'_>,
    acks: &ObjId,
) -> Result<BTreeMap<EntryId, AckRec>, ModelError> {
    let all = r.fields(acks, "acks");
    all.keys()
        .map(|k| {
            Ok((
                parse(k, &format!("acks.{k}"))?,
                ack_from(r, k, &all.container(k, ObjType::Map)?)?,
            ))
        })
        .collect()
}

/// Everything in an order document, parsed and type-checked.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) header: Header,
    pub(crate) roots: Roots,
    pub(crate) number: Option<OrderNumber>,
    pub(crate) lines: BTreeMap<LineId, LineRec>,
    pub(crate) payments: BTreeMap<PaymentId, PaymentRec>,
    pub(crate) status: Vec<StatusRec>,
    pub(crate) acks: BTreeMap<EntryId, AckRec>,
}

impl Snapshot {
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        let root = r.fields(&ROOT, "");
        let header = Header::from_fields(&root)?;
        let roots = Roots::from_fields(&root)?;
        let status = read_status_log(r, &roots.status)?;
        if status.is_empty() {
            return Err(bad("status", "at least one entry"));
        }
        Ok(Self {
            number: root.opt_uint(keys::NUMBER)?.map(OrderNumber),
            lines: read_lines(r, &roots.lines)?,
            payments: read_payments(r, &roots.payments, header.currency)?,
            status,
            acks: read_acks(r, &roots.acks)?,
            header,
            roots,
        })
    }
}
