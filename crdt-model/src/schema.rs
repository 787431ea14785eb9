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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use automerge::iter::DocItem;
use automerge::{
    Automerge, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ScalarValueRef, Value,
    ValueRef,
};

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
    /// Every map and list of the document at `heads`, read in one pass ([`DocIndex`]); when
    /// present, [`Self::fields`] and [`Self::list_strings`] read from it.
    index: Option<&'a DocIndex<'a>>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(doc: &'a Automerge, heads: Option<&'a [ChangeHash]>) -> Self {
        Self {
            doc,
            heads,
            index: None,
        }
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
        if let Some(index) = self.index {
            return index
                .list(obj)
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    ValueRef::Scalar(ScalarValueRef::Str(s)) => Ok(s.to_string()),
                    _ => Err(bad(&format!("{path}[{i}]"), "a string")),
                })
                .collect();
        }
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

/// One entry of a map: its key, winning value, whether other values conflict with it, and the
/// object id when the value is a container.
#[derive(Clone, Debug)]
pub(crate) struct FieldEntry<'a> {
    key: Cow<'a, str>,
    value: ValueRef<'a>,
    obj: Option<ObjId>,
    conflict: bool,
}

impl<'a> FieldEntry<'a> {
    fn of(item: automerge::iter::MapRangeItem<'a>) -> Self {
        let obj = matches!(item.value, ValueRef::Object(_)).then(|| item.id());
        Self {
            key: item.key,
            value: item.value,
            obj,
            conflict: item.conflict,
        }
    }
}

/// Every map and list of a document, read in one pass of [`ReadDoc::iter_at`] (one traversal
/// of the op set instead of one range query per object), keyed by object id.
pub(crate) struct DocIndex<'a> {
    maps: Vec<FieldEntry<'a>>,
    lists: Vec<ValueRef<'a>>,
    map_ranges: HashMap<ObjId, Range<usize>>,
    list_ranges: HashMap<ObjId, Range<usize>>,
}

impl<'a> DocIndex<'a> {
    /// Reads the whole document at `heads` (current heads when `None`).
    pub(crate) fn read(doc: &'a Automerge, heads: Option<&[ChangeHash]>) -> Self {
        let mut index = Self {
            maps: Vec::new(),
            lists: Vec::new(),
            map_ranges: HashMap::new(),
            list_ranges: HashMap::new(),
        };
        // Items of one object come together (the iterator hands out one `Arc` per object), so
        // each object's entries are one range, recorded when the next object starts. An object
        // without visible entries never shows up and reads as empty.
        let mut open: Option<(Arc<ObjId>, bool, usize)> = None;
        for item in doc.iter_at(ROOT, heads) {
            let is_list = match &item.item {
                DocItem::Map(_) => false,
                DocItem::List(_) => true,
                // The schema has no text objects: where one stands, the parser refuses its
                // container type or expects a scalar, without reading its content.
                DocItem::Text(_) => continue,
            };
            if !open
                .as_ref()
                .is_some_and(|(o, l, _)| Arc::ptr_eq(o, &item.obj) && *l == is_list)
            {
                index.close(open.take());
                let start = if is_list {
                    index.lists.len()
                } else {
                    index.maps.len()
                };
                open = Some((Arc::clone(&item.obj), is_list, start));
            }
            match item.item {
                DocItem::Map(m) => index.maps.push(FieldEntry::of(m)),
                DocItem::List(l) => index.lists.push(l.value),
                DocItem::Text(_) => {}
            }
        }
        index.close(open);
        index
    }

    /// Records the range of the object whose entries were just read.
    fn close(&mut self, open: Option<(Arc<ObjId>, bool, usize)>) {
        if let Some((obj, is_list, start)) = open {
            let (ranges, end) = if is_list {
                (&mut self.list_ranges, self.lists.len())
            } else {
                (&mut self.map_ranges, self.maps.len())
            };
            ranges.insert(ObjId::clone(&obj), start..end);
        }
    }

    fn map(&self, obj: &ObjId) -> &[FieldEntry<'a>] {
        self.map_ranges
            .get(obj)
            .and_then(|r| self.maps.get(r.clone()))
            .unwrap_or_default()
    }

    fn list(&self, obj: &ObjId) -> &[ValueRef<'a>] {
        self.list_ranges
            .get(obj)
            .and_then(|r| self.lists.get(r.clone()))
            .unwrap_or_default()
    }

    /// A reader of `doc` at `heads` that reads maps and lists from this index.
    pub(crate) fn reader(
        &'a self,
        doc: &'a Automerge,
        heads: Option<&'a [ChangeHash]>,
    ) -> Reader<'a> {
        Reader {
            doc,
            heads,
            index: Some(self),
        }
    }
}

/// One map's entries, read in a single pass (much cheaper than one `get` per key).
pub(crate) struct Fields<'a, 'p> {
    entries: Cow<'a, [FieldEntry<'a>]>,
    path: &'p str,
}

impl<'a> Reader<'a> {
    /// Every entry of the map `obj` (winning values, with the conflict flag).
    pub(crate) fn fields<'p>(&self, obj: &ObjId, path: &'p str) -> Fields<'a, 'p> {
        let entries = match (self.index, self.heads) {
            (Some(index), _) => Cow::Borrowed(index.map(obj)),
            (None, None) => Cow::Owned(self.doc.map_range(obj, ..).map(FieldEntry::of).collect()),
            (None, Some(h)) => Cow::Owned(
                self.doc
                    .map_range_at(obj, .., h)
                    .map(FieldEntry::of)
                    .collect(),
            ),
        };
        Fields { entries, path }
    }
}

impl Fields<'_, '_> {
    fn find(&self, key: &str) -> Option<&FieldEntry<'_>> {
        self.entries.iter().find(|e| e.key == key)
    }

    fn bad(&self, key: &str, expected: &str) -> ModelError {
        bad(&format!("{}.{key}", self.path), expected)
    }

    /// Entry keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_ref())
    }

    /// Whether concurrent writes left more than one value at `key`.
    pub(crate) fn conflicted(&self, key: &str) -> bool {
        self.find(key).is_some_and(|e| e.conflict)
    }

    fn scalar(&self, key: &str) -> Result<Option<&ScalarValueRef<'_>>, ModelError> {
        match self.find(key) {
            None => Ok(None),
            Some(FieldEntry {
                value: ValueRef::Scalar(s),
                ..
            }) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a scalar")),
        }
    }

    /// The one container of type `ty` at `key`; a duplicated container is not an order.
    pub(crate) fn container(&self, key: &str, ty: ObjType) -> Result<ObjId, ModelError> {
        match self.find(key) {
            Some(FieldEntry {
                value: ValueRef::Object(t),
                obj: Some(id),
                conflict: false,
                ..
            }) if *t == ty => Ok(id.clone()),
            Some(FieldEntry {
                value: ValueRef::Object(_),
                conflict: true,
                ..
            }) => Err(ModelError::NotAnOrder(format!(
                "{}.{key}: container created more than once",
                self.path
            ))),
            Some(_) => Err(self.bad(key, "a container of the right type")),
            None => Err(self.bad(key, "a container")),
        }
    }

    /// The string at `key`, borrowed.
    fn opt_str_ref(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValueRef::Str(s)) => Ok(Some(s.as_ref())),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>, ModelError> {
        Ok(self.opt_str_ref(key)?.map(str::to_owned))
    }

    pub(crate) fn str(&self, key: &str) -> Result<String, ModelError> {
        self.opt_str(key)?.ok_or_else(|| self.bad(key, "a string"))
    }

    pub(crate) fn int(&self, key: &str) -> Result<i64, ModelError> {
        match self.scalar(key)? {
            Some(ScalarValueRef::Int(i)) => Ok(*i),
            _ => Err(self.bad(key, "an integer")),
        }
    }

    pub(crate) fn opt_uint(&self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValueRef::Uint(u)) => Ok(Some(*u)),
            Some(_) => Err(self.bad(key, "an unsigned integer")),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Result<u64, ModelError> {
        self.opt_uint(key)?
            .ok_or_else(|| self.bad(key, "an unsigned integer"))
    }

    pub(crate) fn counter(&self, key: &str) -> Result<i64, ModelError> {
        match self.scalar(key)? {
            Some(ScalarValueRef::Counter(c)) => Ok(*c),
            _ => Err(self.bad(key, "a counter")),
        }
    }

    pub(crate) fn opt_ts(&self, key: &str) -> Result<Option<Timestamp>, ModelError> {
        match self.scalar(key)? {
            None => Ok(None),
            Some(ScalarValueRef::Timestamp(t)) => Ok(Some(Timestamp(*t))),
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
        let s = self
            .opt_str_ref(key)?
            .ok_or_else(|| self.bad(key, "a string"))?;
        s.parse()
            .map_err(|e: ModelError| ModelError::NotAnOrder(format!("{}.{key}: {e}", self.path)))
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

    pub(crate) fn from_fields(f: &Fields<'_, '_>) -> Result<Self, ModelError> {
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

    pub(crate) fn from_fields(f: &Fields<'_, '_>) -> Result<Self, ModelError> {
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
    /// Parses the whole order, reading the document in one pass ([`DocIndex`]).
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        if r.index.is_some() {
            return Self::parse(r);
        }
        let index = DocIndex::read(r.doc, r.heads);
        Self::parse(&index.reader(r.doc, r.heads))
    }

    /// Parses the whole order through `r` (from its index if it has one, else one range query
    /// per object).
    fn parse(r: &Reader<'_>) -> Result<Self, ModelError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, Entropy, OrderId, SplitMix64, StoreId};
    use crate::money::Currency;
    use crate::order::{FinalPayment, LineDraft, NewOrder, Order, PaymentDraft, Writer};
    use crate::payment::{PaymentKind, PaymentState};
    use crate::status::{ActiveStatus, OrderStatus};
    use automerge::transaction::Transactable;

    /// The one-pass parse and the per-object parse agree, result and error alike.
    fn same_parse(doc: &Automerge, heads: Option<&[ChangeHash]>) {
        let indexed = Snapshot::read(&Reader::new(doc, heads));
        let per_object = Snapshot::parse(&Reader::new(doc, heads));
        assert_eq!(format!("{indexed:?}"), format!("{per_object:?}"));
    }

    /// Every historical state of `doc` (after each change) and the current one.
    fn same_parse_everywhere(doc: &Automerge) {
        same_parse(doc, None);
        for c in doc.get_changes(&[]) {
            same_parse(doc, Some(&[c.hash()]));
        }
    }

    fn writer(seed: u64) -> (Writer, SplitMix64) {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(1), &mut rng);
        (Writer::new(device, 1), rng)
    }

    fn line(name: &str, qty: i64, modifiers: &[&str]) -> LineDraft {
        LineDraft {
            sku: name.to_lowercase(),
            name: name.into(),
            unit_price: 250,
            quantity: qty,
            modifiers: modifiers.iter().map(|m| (*m).to_owned()).collect(),
            note: String::new(),
        }
    }

    /// Two replicas with concurrent edits (conflicting prices and notes, concurrent statuses,
    /// counter overshoot), a payment history and a close, merged.
    fn busy_order() -> Order {
        let (wa, mut ra) = writer(1);
        let (wb, mut rb) = writer(2);
        let t = |n: i64| Timestamp(1_700_000_000_000 + n * 1_000);
        let new = NewOrder {
            id: OrderId::generate(t(0), &mut ra),
            store: StoreId::new("s1").unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        let mut a = Order::create(new, wa, t(0), &mut ra).unwrap();
        let l1 = a.add_line(t(1), &mut ra, line("Tea", 2, &[])).unwrap();
        let l2 = a
            .add_line(t(2), &mut ra, line("Soup", 1, &["no salt", "hot"]))
            .unwrap();
        let mut b = Order::load(&a.save(), wb).unwrap();
        a.set_unit_price(t(3), l1, 300).unwrap();
        b.set_unit_price(t(3), l1, 350).unwrap();
        a.set_note(t(4), l2, "a").unwrap();
        b.set_note(t(4), l2, "b").unwrap();
        a.change_quantity(t(5), l1, -1).unwrap();
        b.change_quantity(t(5), l1, -1).unwrap();
        a.set_status(t(6), &mut ra, ActiveStatus::Delayed).unwrap();
        b.set_status(t(6), &mut rb, ActiveStatus::InDelivery)
            .unwrap();
        let p = b
            .add_payment(
                t(7),
                &mut rb,
                PaymentDraft {
                    kind: PaymentKind::CardTerminal,
                    amount: 100,
                    reference: "**** 1234".into(),
                },
                PaymentState::Pending,
            )
            .unwrap();
        b.authorize_payment(t(8), &mut rb, p, "AUTH 1").unwrap();
        b.remove_line(t(9), l2).unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        let due = a.view().unwrap().totals.balance_due;
        a.complete_sale(
            t(10),
            &mut ra,
            Some(FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: due.max(1),
                reference: String::new(),
            })),
        )
        .unwrap();
        b.add_line(t(10), &mut rb, line("Late", 1, &["x"])).unwrap();
        b.void_payment(t(11), &mut rb, p).unwrap();
        a.merge(&mut b).unwrap();
        assert_eq!(a.status().unwrap(), OrderStatus::Done);
        a
    }

    #[test]
    fn one_pass_parse_matches_per_object_parse() {
        same_parse_everywhere(busy_order().doc());
    }

    #[test]
    fn one_pass_parse_matches_on_malformed_documents() {
        let base = busy_order();
        let v = base.view().unwrap();
        let lines = base.doc().get(ROOT, keys::LINES).unwrap().unwrap().1;
        let line = |id: &str| base.doc().get(&lines, id).unwrap().unwrap().1;
        let l1 = line(&v.lines[0].id.to_string());
        let late = line(&v.late_lines[0].id.to_string());
        type Forge = Box<dyn Fn(&mut automerge::transaction::Transaction<'_>)>;
        let (l1a, l1b, l1c, l1d, latea) = (l1.clone(), l1.clone(), l1.clone(), l1, late);
        let forgeries: Vec<Forge> = vec![
            // A text object where a string belongs.
            Box::new(move |tx| {
                tx.put_object(&l1a, keys::NOTE, ObjType::Text).unwrap();
            }),
            // A map where the modifiers list belongs.
            Box::new(move |tx| {
                tx.put_object(&l1b, keys::MODIFIERS, ObjType::Map).unwrap();
            }),
            // A modifier that is not a string.
            Box::new(move |tx| {
                let m = tx.put_object(&l1c, keys::MODIFIERS, ObjType::List).unwrap();
                tx.insert(&m, 0, "ok").unwrap();
                tx.insert(&m, 1, 7_i64).unwrap();
            }),
            // The quantity as a plain integer, and an unknown field.
            Box::new(move |tx| {
                tx.put(&l1d, keys::QTY, 3_i64).unwrap();
                tx.put(&l1d, "extra", "x").unwrap();
            }),
            // A half removal marker.
            Box::new(move |tx| {
                tx.put(&latea, keys::REMOVED_BY, "nobody").unwrap();
            }),
            // A bad entry key and a second status container.
            Box::new(|tx| {
                let s = tx.put_object(ROOT, "junk", ObjType::Map).unwrap();
                tx.put(&s, "k", 1_u64).unwrap();
            }),
        ];
        for forge in &forgeries {
            let mut doc = base.doc().clone();
            doc.transact(|tx| {
                forge(tx);
                Ok::<_, automerge::AutomergeError>(())
            })
            .unwrap();
            same_parse_everywhere(&doc);
        }
        // A container created concurrently twice: one of them is hidden.
        let mut x = base.doc().fork();
        let mut y = base.doc().fork();
        for d in [&mut x, &mut y] {
            d.transact(|tx| {
                let m = tx.put_object(ROOT, keys::ACKS, ObjType::Map)?;
                tx.put(&m, "k", "v")
            })
            .unwrap();
        }
        x.merge(&mut y).unwrap();
        same_parse_everywhere(&x);
        // Random bytes in the document's strings do not matter; random entries might.
        let mut rng = SplitMix64::new(5);
        let mut doc = base.doc().clone();
        let status = doc.get(ROOT, keys::STATUS).unwrap().unwrap().1;
        doc.transact(|tx| {
            let e = tx.put_object(&status, format!("{:x}", rng.next_u64()), ObjType::Map)?;
            tx.put(&e, keys::STATUS, "done")
        })
        .unwrap();
        same_parse_everywhere(&doc);
    }
}
