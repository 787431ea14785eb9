//! What the board shows, read from the store: a row per order of the store's working set, the
//! tills, and one order in detail.
//!
//! The working set is every active order, whatever its age, and every order written since the
//! start of yesterday (UTC, relay clock): enough for "closed today" and for late edits that
//! arrived since then. It is read through the store feed ([`Backend::list_orders`], in feed
//! order) and kept current by reading the feed again from the last position seen
//! ([`Snapshot::advance`]): what the board shows is always what is on disk.
//!
//! Stored documents are loaded with `crdt_model::guard` (a damaged one is skipped and logged,
//! it never takes the relay down).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::{Automerge, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use crdt_model::schema::keys;
use crdt_model::{AuditEntry, Currency, DeviceId, OrderId, OrderStatus, OrderView, StoreId};

use crate::backend::Backend;
use crate::error::RelayError;
use crate::records::OrderMeta;
use crate::server::AppState;
use crate::store::StatusFilter;

/// Feed entries read per page.
const PAGE: usize = 500;
/// Orders loaded into a snapshot at most; beyond this the board says it shows a part.
pub(crate) const MAX_ROWS: usize = 2_000;
/// One day, ms.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// The start of the UTC day holding `now_ms`.
pub(crate) fn day_start(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(DAY_MS)
}

/// What needs a person on an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Issue {
    /// A short label: "Refund needed", "Overpayment", "Late payment", "Late edit", "Conflict".
    pub(crate) label: &'static str,
    /// The model's sentence.
    pub(crate) message: String,
    /// The late edit to acknowledge, if this is one (conflicts have no acknowledgement).
    pub(crate) edit: Option<String>,
}

/// One order as the board's tables show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Row {
    /// The order.
    pub(crate) id: OrderId,
    /// Its number, once the relay gave one.
    pub(crate) number: Option<u64>,
    /// Effective status.
    pub(crate) status: OrderStatus,
    /// Lines counted.
    pub(crate) lines: usize,
    /// Currency of every amount below.
    pub(crate) currency: Currency,
    /// Derived totals, minor units.
    pub(crate) totals: crdt_model::Totals,
    /// The device that wrote the order's latest change (the relay's own changes skipped).
    pub(crate) last_till: Option<DeviceId>,
    /// Created, ms since the epoch (the creating till's clock).
    pub(crate) created_at: i64,
    /// When the effective status was set, ms (the setter's clock).
    pub(crate) status_at: i64,
    /// Its position in the store feed.
    pub(crate) feed_seq: u64,
    /// Unacknowledged late edits and conflicts.
    pub(crate) issues: Vec<Issue>,
    /// Payments: kind, effective state, amount (minor units).
    pub(crate) payments: Vec<(String, crdt_model::PaymentState, i64)>,
}

impl Row {
    /// In the active orders table.
    pub(crate) fn is_active(&self) -> bool {
        !self.status.is_terminal()
    }

    /// In the day's closed orders (`today` is the day's start, ms).
    pub(crate) fn is_closed_since(&self, today: i64) -> bool {
        self.status.is_terminal() && self.status_at >= today
    }

    /// In the "needs a person" table.
    pub(crate) fn needs_a_person(&self) -> bool {
        !self.issues.is_empty()
    }
}

/// The label of a late edit, from its kind and the model's sentence.
fn label_of(kind: crdt_model::LateEditKind, message: &str) -> &'static str {
    use crdt_model::LateEditKind as K;
    match kind {
        K::Payment if message.contains("refund needed") => "Refund needed",
        K::Payment if message.contains("overpayment") => "Overpayment",
        K::Payment => "Late payment",
        K::StatusIgnored | K::ConcurrentClose => "Late status",
        K::LineAdded | K::LineChanged | K::LineRemoved => "Late edit",
    }
}

/// What needs a person in `view`.
pub(crate) fn issues_of(view: &OrderView) -> Vec<Issue> {
    let late = view.unacknowledged_late_edits().map(|e| Issue {
        label: label_of(e.kind, &e.message),
        message: e.message.clone(),
        edit: Some(e.id.clone()),
    });
    let conflicts = view.conflicts.iter().map(|c| Issue {
        label: "Conflict",
        message: format!(
            "{}: written concurrently as {}; {} shown",
            c.subject,
            c.values.join(", "),
            c.chosen
        ),
        edit: None,
    });
    late.chain(conflicts).collect()
}

/// Loads a stored order's document, guarded; `None` if it is not stored.
async fn load_doc(
    store: &Backend,
    order: OrderId,
) -> Result<Option<(OrderMeta, Automerge)>, RelayError> {
    let Some(stored) = store.load_order(order).await? else {
        return Ok(None);
    };
    let doc = crdt_model::guard::load_with_increments(
        &stored.snapshot,
        stored.tail.iter().map(Vec::as_slice),
    )?;
    Ok(Some((stored.meta, doc)))
}

/// The device of the latest change not written by the relay itself.
fn last_till(doc: &Automerge, relay: DeviceId) -> Option<DeviceId> {
    doc.get_changes(&[])
        .iter()
        .rev()
        .filter_map(|c| crdt_model::order::device_of_actor(c.actor_id()))
        .find(|d| *d != relay)
}

fn row_of(meta: &OrderMeta, doc: &Automerge, relay: DeviceId) -> Result<Row, RelayError> {
    let view = crdt_model::view_of(doc)?;
    let currency = Currency::new(&view.currency)?;
    Ok(Row {
        id: meta.order,
        number: view.number.or(Some(meta.number.0)).filter(|n| *n > 0),
        status: view.status,
        lines: view.lines.len(),
        currency,
        totals: view.totals,
        last_till: last_till(doc, relay),
        created_at: view.created_at.0,
        status_at: view.status_at.0,
        feed_seq: meta.feed_seq,
        issues: issues_of(&view),
        payments: view
            .payments
            .iter()
            .map(|p| (p.kind.clone(), p.state, p.amount))
            .collect(),
    })
}

/// A store's working set, as of a feed position.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The store.
    pub(crate) store: StoreId,
    /// The last feed position read.
    pub(crate) upto: u64,
    /// The orders of the working set, by id.
    pub(crate) rows: BTreeMap<OrderId, Row>,
    /// Device names of the store, for "last till".
    pub(crate) names: HashMap<DeviceId, String>,
    /// Whether orders were left out ([`MAX_ROWS`]).
    pub(crate) truncated: bool,
    /// The relay's own device (its changes are the back office's).
    pub(crate) relay: DeviceId,
}

impl Snapshot {
    /// Reads `store`'s working set from the start of its feed.
    pub(crate) async fn read(state: &AppState, store: StoreId) -> Result<Self, RelayError> {
        let names = device_names(&state.store, &store).await?;
        let mut s = Self {
            store,
            upto: 0,
            rows: BTreeMap::new(),
            names,
            truncated: false,
            relay: state.hub.relay_id(),
        };
        s.advance(&state.store).await?;
        Ok(s)
    }

    /// Reads the feed after [`Self::upto`]; returns the orders whose rows changed, came or
    /// went.
    pub(crate) async fn advance(&mut self, store: &Backend) -> Result<Vec<OrderId>, RelayError> {
        let mut changed = Vec::new();
        let mut unknown_device = false;
        loop {
            let metas = store
                .list_orders(self.store.clone(), StatusFilter::Any, self.upto, PAGE)
                .await?;
            let full = metas.len() == PAGE;
            let since = day_start(crate::clock::now_ms()) - DAY_MS;
            for meta in metas {
                self.upto = self.upto.max(meta.feed_seq);
                let wanted = !meta.status.is_terminal() || meta.updated_at >= since;
                let had = self.rows.remove(&meta.order).is_some();
                if wanted && self.rows.len() >= MAX_ROWS {
                    self.truncated = true;
                } else if wanted {
                    match load_doc(store, meta.order).await {
                        Ok(Some((meta, doc))) => match row_of(&meta, &doc, self.relay) {
                            Ok(row) => {
                                unknown_device |=
                                    row.last_till.is_some_and(|d| !self.names.contains_key(&d));
                                self.rows.insert(meta.order, row);
                            }
                            Err(e) => {
                                tracing::warn!(order = %meta.order, error = %e, "board: order not shown")
                            }
                        },
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(order = %meta.order, error = %e, "board: order not shown")
                        }
                    }
                }
                if had || self.rows.contains_key(&meta.order) {
                    changed.push(meta.order);
                }
            }
            if !full {
                break;
            }
        }
        if unknown_device {
            self.names = device_names(store, &self.store).await?;
        }
        Ok(changed)
    }

    /// The name of `device` in this store, or a short form of its id.
    pub(crate) fn device_name(&self, device: Option<DeviceId>) -> String {
        name_of(&self.names, self.relay, device)
    }

    /// Rows in the order the tables list them (by number, unnumbered last, then by id).
    pub(crate) fn sorted(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.values().collect();
        rows.sort_by_key(|r| (r.number.unwrap_or(u64::MAX), r.id));
        rows
    }
}

/// The name of `device`: its provisioned name, "back office" for the relay, or a short id.
pub(crate) fn name_of(
    names: &HashMap<DeviceId, String>,
    relay: DeviceId,
    device: Option<DeviceId>,
) -> String {
    match device {
        None => "–".into(),
        Some(d) if d == relay => "back office".into(),
        Some(d) => names.get(&d).cloned().unwrap_or_else(|| {
            let s = d.to_string();
            format!("device {}", s.get(..8).unwrap_or(&s))
        }),
    }
}

async fn device_names(
    store: &Backend,
    of: &StoreId,
) -> Result<HashMap<DeviceId, String>, RelayError> {
    Ok(store
        .list_devices(Some(of.clone()))
        .await?
        .into_iter()
        .map(|d| (d.device, d.name))
        .collect())
}

/// Stores with provisioned devices (the admin's store picker).
pub(crate) async fn known_stores(state: &AppState) -> Result<Vec<StoreId>, RelayError> {
    let stores: BTreeSet<StoreId> = state
        .store
        .list_devices(None)
        .await?
        .into_iter()
        .map(|d| d.store)
        .collect();
    Ok(stores.into_iter().collect())
}

/// One till of the store as the relay knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Till {
    /// The device.
    pub(crate) device: DeviceId,
    /// Its provisioned name.
    pub(crate) name: String,
    /// Connections open now.
    pub(crate) connections: usize,
    /// When a connection of it last opened or closed (since the relay started), ms.
    pub(crate) last_seen_ms: Option<i64>,
    /// Revoked: it cannot connect any more.
    pub(crate) revoked: bool,
}

/// The store's tills and what the policy refused them (since the relay started).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tills {
    /// Provisioned tills, by name.
    pub(crate) tills: Vec<Till>,
    /// Refusals, newest first.
    pub(crate) refusals: Vec<crate::watch::RefusalNote>,
    /// Device names (for the refusals).
    pub(crate) names: HashMap<DeviceId, String>,
}

/// Reads the store's tills; a failure leaves the list empty (and is logged).
pub(crate) async fn tills(state: &AppState, store: &StoreId) -> Tills {
    let devices = match state.store.list_devices(Some(store.clone())).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%store, error = %e, "board: cannot list the store's devices");
            Vec::new()
        }
    };
    let seen = state.hub.watch().tills(store);
    let mut tills: Vec<Till> = devices
        .iter()
        .map(|d| {
            let s = seen.get(&d.device);
            Till {
                device: d.device,
                name: d.name.clone(),
                connections: s.map_or(0, |s| s.connections),
                last_seen_ms: s.map(|s| s.last_seen_ms),
                revoked: d.revoked,
            }
        })
        .collect();
    tills.sort_by(|a, b| a.name.cmp(&b.name).then(a.device.cmp(&b.device)));
    Tills {
        tills,
        refusals: state.hub.watch().refusals(store),
        names: devices.into_iter().map(|d| (d.device, d.name)).collect(),
    }
}

/// One entry of an order's status log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StatusStep {
    /// The status set.
    pub(crate) status: String,
    /// When, ms (the writer's clock).
    pub(crate) at: i64,
    /// By which device.
    pub(crate) by: Option<DeviceId>,
    /// Its Lamport clock.
    pub(crate) clock: u64,
}

/// The status log of `doc`, oldest first (by clock, then time). Entries that do not read as
/// the schema says are left out: the view already refuses such a document.
fn status_log(doc: &Automerge) -> Vec<StatusStep> {
    let map = |obj: &automerge::ObjId, key: &str| match doc.get(obj, key) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
        _ => None,
    };
    let scalar = |obj: &automerge::ObjId, key: &str| match doc.get(obj, key) {
        Ok(Some((Value::Scalar(s), _))) => Some(s.into_owned()),
        _ => None,
    };
    let Some(log) = map(&ROOT, keys::STATUS) else {
        return Vec::new();
    };
    let mut steps: Vec<StatusStep> = doc
        .keys(&log)
        .filter_map(|k| {
            let e = map(&log, &k)?;
            let status = match scalar(&e, keys::STATUS)? {
                ScalarValue::Str(s) => s.to_string(),
                _ => return None,
            };
            let at = match scalar(&e, keys::AT) {
                Some(ScalarValue::Timestamp(t) | ScalarValue::Int(t)) => t,
                _ => 0,
            };
            let by = match scalar(&e, keys::BY) {
                Some(ScalarValue::Str(s)) => s.parse().ok(),
                _ => None,
            };
            let clock = match scalar(&e, keys::CLOCK) {
                Some(ScalarValue::Uint(c)) => c,
                _ => 0,
            };
            Some(StatusStep {
                status,
                at,
                by,
                clock,
            })
        })
        .collect();
    steps.sort_by_key(|s| (s.clock, s.at));
    steps
}

/// One order in full, for its page.
#[derive(Debug)]
pub(crate) struct Detail {
    /// The order.
    pub(crate) id: OrderId,
    /// Its store.
    pub(crate) store: StoreId,
    /// The model's view.
    pub(crate) view: OrderView,
    /// Its status log.
    pub(crate) statuses: Vec<StatusStep>,
    /// Every change: who, when, what.
    pub(crate) audit: Vec<AuditEntry>,
    /// Device names of the store.
    pub(crate) names: HashMap<DeviceId, String>,
    /// The relay's device (the back office's changes).
    pub(crate) relay: DeviceId,
}

impl Detail {
    /// Reads `order`; `None` if it is not stored.
    pub(crate) async fn read(state: &AppState, order: OrderId) -> Result<Option<Self>, RelayError> {
        let Some((meta, doc)) = load_doc(&state.store, order).await? else {
            return Ok(None);
        };
        let view = crdt_model::view_of(&doc)?;
        let audit = crdt_model::guard::contain(|| crdt_model::audit_trail(&doc))
            .map_err(RelayError::Corrupt)?;
        Ok(Some(Self {
            id: order,
            names: device_names(&state.store, &meta.store).await?,
            store: meta.store,
            statuses: status_log(&doc),
            view,
            audit,
            relay: state.hub.relay_id(),
        }))
    }

    /// The name of `device`.
    pub(crate) fn device_name(&self, device: Option<DeviceId>) -> String {
        name_of(&self.names, self.relay, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_start_at_utc_midnight() {
        assert_eq!(day_start(0), 0);
        assert_eq!(day_start(DAY_MS + 5), DAY_MS);
        assert_eq!(day_start(DAY_MS - 1), 0);
    }

    #[test]
    fn late_payments_are_labelled_by_what_to_do() {
        use crdt_model::LateEditKind as K;
        assert_eq!(
            label_of(K::Payment, "card payment ... deleted: refund needed"),
            "Refund needed"
        );
        assert_eq!(
            label_of(
                K::Payment,
                "... done: overpayment: refund or hand back change"
            ),
            "Overpayment"
        );
        assert_eq!(
            label_of(K::Payment, "... void or capture it"),
            "Late payment"
        );
        assert_eq!(label_of(K::LineAdded, "line"), "Late edit");
    }
}
