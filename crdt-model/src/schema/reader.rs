//! The strict reader: typed field access on an Automerge document at its current heads or at
//! historical heads, and a one-pass index of the document so a whole order is parsed without
//! a lookup per field.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use automerge::iter::DocItem;
use automerge::{
    Automerge, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ScalarValueRef, Value,
    ValueRef,
};

use crate::error::ModelError;
use crate::ids::Timestamp;

/// Reads a document at its current heads or at historical heads.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a> {
    pub(crate) doc: &'a Automerge,
    pub(crate) heads: Option<&'a [ChangeHash]>,
    /// Every map and list of the document at `heads`, read in one pass ([`DocIndex`]); when
    /// present, [`Self::fields`] and [`Self::list_strings`] read from it.
    pub(super) index: Option<&'a DocIndex<'a>>,
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

pub(crate) fn parse<T: std::str::FromStr<Err = ModelError>>(
    s: &str,
    path: &str,
) -> Result<T, ModelError> {
    s.parse()
        .map_err(|e: ModelError| ModelError::NotAnOrder(format!("{path}: {e}")))
}
