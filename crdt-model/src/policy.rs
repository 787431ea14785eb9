//! The policy: which changes an order accepts, judged with the author's identity.
//!
//! The relay applies incoming changes to its working copy of the order and calls
//! [`validate`] (or [`validate_changes`]) with the document before and after; it persists and
//! fans out only on `Ok`. Each new change is judged by **its own decoded operations**, never by
//! what is visible after it (a change can hide what it replaced):
//!
//! * an operation that names predecessors (an overwrite, a delete, an increment) passes only
//!   where a field's rule allows replacing: a line's `unit_price` and `note`
//!   (last-writer-wins) and its `qty` (increments); inside an object the same change created,
//!   it may replace only that change's own operations;
//! * an operation without predecessors on a key that takes one value (header, containers,
//!   number, entry keys, write-once fields) must be that key's only value in the merged
//!   document, so it can neither shadow an existing entry nor sit beside it;
//! * what the author had seen (was the order closed? which state does a payment move from?)
//!   is read at the change's dependencies. A change whose author had seen the order
//!   Done/Deleted may only void or refund a payment or acknowledge a late edit (the relay may
//!   also write the number): anything else is [`PolicyViolation::EditAfterClose`]. A change
//!   *concurrent* with the close passes and is flagged as a late edit by the view.
//!
//! Reading a document at historical heads is the expensive part, so it happens only where the
//! current document cannot answer exactly. Nothing can hide a status entry or a removal
//! marker (the two rules above), so an order that is not terminal now was never terminal, and
//! a line without a marker written by others was never removed.
//!
//! Structure and types are checked on the merged result with the same strict parser the view
//! uses, so a document that passes always loads and views. The full table of who may write
//! what is in `docs/model.md`.
mod decode;
mod rules;

use std::collections::{BTreeSet, HashMap};

use automerge::{Automerge, Change, ChangeHash};

use crate::error::{ModelError, PolicyViolation};
use crate::ids::{DeviceId, StoreId};
use crate::order::device_of_actor;
use crate::schema::{self, Header, Reader, Snapshot, keys};
use crate::seal::RelaySeal;

use decode::Paths;
use rules::check_change;

/// What the author of a batch of changes is allowed to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A terminal of a store.
    Device,
    /// The relay itself (order numbers, back-office status changes).
    Relay,
}

/// The authenticated author of incoming changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    /// The device the connection authenticated as; every change's actor must belong to it.
    pub device: DeviceId,
    /// The store the device belongs to.
    pub store: StoreId,
    /// Device or relay.
    pub role: Role,
    /// The relay whose sealed changes a device may deliver ([`crate::seal`]): a change by
    /// that relay's device id with a valid seal for the order is judged as the relay's. `None`
    /// refuses every change not by `device`.
    pub seal: Option<RelaySeal>,
    /// Changes by other writers that the relay vouched for ([`crate::seal`]: it committed
    /// them before a restore, and the device delivers them again with the relay's voucher).
    /// Each is judged as written by its own writer (a device of the same store, or the relay).
    pub vouched: BTreeSet<ChangeHash>,
}

/// Judges the changes `after` has and `before` lacks, as written by `author`.
///
/// `before` is the relay's stored document (empty for an order it has never seen); `after` is
/// `before` with the incoming changes applied. Returns the number of new changes judged.
pub fn validate(
    before: &Automerge,
    after: &Automerge,
    author: &Author,
) -> Result<usize, PolicyViolation> {
    let new_changes = after.get_changes(&before.get_heads());
    validate_changes(before, after, &new_changes, author)
}

/// [`validate`] for callers that already hold the new changes: `changes` must be exactly the
/// changes `after` has and `before` lacks (in any order).
pub fn validate_changes(
    before: &Automerge,
    after: &Automerge,
    new_changes: &[Change],
    author: &Author,
) -> Result<usize, PolicyViolation> {
    validate_changes_with(
        before,
        after,
        new_changes,
        author,
        &mut OrderFacts::default(),
    )
}

/// What [`validate_changes_with`] learnt about an order and may reuse for its next batch:
/// facts that cannot change once accepted, so a caller that keeps one per order (the relay)
/// spares the policy re-reading them. Today that is the header, which is immutable. (Whether
/// the order is closed is not kept: reading the status log is also where a damaged status
/// container is found, and the refusal's code must not depend on what a relay remembers.)
/// Keep one only for a document that grows by accepted changes; if the accepted state is ever
/// rolled back (a failed write), start afresh with `OrderFacts::default()`.
#[derive(Clone, Debug, Default)]
pub struct OrderFacts {
    header: Option<Header>,
}

/// [`validate_changes`] reusing and updating `facts` about the order (see [`OrderFacts`]).
/// The verdict is the same as without them; `facts` changes only when the changes pass.
pub fn validate_changes_with(
    before: &Automerge,
    after: &Automerge,
    new_changes: &[Change],
    author: &Author,
    facts: &mut OrderFacts,
) -> Result<usize, PolicyViolation> {
    if new_changes.is_empty() {
        return Ok(0);
    }
    // Which changes are the author's own and which claim to be the relay's (their seals are
    // checked once the order's id is known, below).
    let mut relays = Vec::new();
    let mut others: Vec<(usize, DeviceId)> = Vec::new();
    for (i, change) in new_changes.iter().enumerate() {
        match device_of_actor(change.actor_id()) {
            Some(d) if d == author.device => {}
            Some(d) if author.vouched.contains(&change.hash()) => others.push((i, d)),
            Some(d) if author.seal.as_ref().is_some_and(|s| s.relay == d) => relays.push(i),
            _ => {
                return Err(PolicyViolation::ForeignActor(
                    change.actor_id().to_hex_string(),
                ));
            }
        }
    }
    let existing = !before.get_heads().is_empty();
    // Root header fields can only be written by a change with no dependencies (the rules
    // below refuse them otherwise), so without such a change the header is the stored one.
    let creates = new_changes.iter().any(|c| c.deps().is_empty());
    let header = if existing && !creates {
        match &facts.header {
            Some(h) => h.clone(),
            None => Header::read(&Reader::new(before, None)).map_err(not_an_order)?,
        }
    } else {
        let header = Header::read(&Reader::new(after, None)).map_err(not_an_order)?;
        if existing {
            let old = Header::read(&Reader::new(before, None)).map_err(not_an_order)?;
            if old != header {
                return Err(PolicyViolation::ImmutableField("header".into()));
            }
        }
        header
    };
    if author.role == Role::Device && header.store != author.store {
        return Err(PolicyViolation::ForeignStore);
    }
    let relay_author = match &author.seal {
        Some(seal) if !relays.is_empty() => {
            for &i in &relays {
                let change = &new_changes[i];
                if !seal.key.verifies(header.id, change) {
                    return Err(PolicyViolation::ForeignActor(format!(
                        "{} (the relay's actor, without a valid seal)",
                        change.actor_id().to_hex_string()
                    )));
                }
            }
            Some(Author {
                device: seal.relay,
                store: author.store.clone(),
                role: Role::Relay,
                seal: None,
                vouched: BTreeSet::new(),
            })
        }
        _ => None,
    };
    let r = Reader::new(after, None);
    let terminal_now = if existing {
        let roots = schema::Roots::read(&r).map_err(not_an_order)?;
        let log = schema::read_status_log(&r, &roots.status).map_err(not_an_order)?;
        schema::lattice(&log).is_terminal()
    } else {
        false
    };
    let mut touched = Touched::default();
    let mut paths = Paths {
        doc: after,
        known: HashMap::new(),
    };
    // A vouched change by another writer is judged as that writer's: the relay's if it is
    // the relay's actor, else a device of the author's store.
    let relay_device = author.seal.as_ref().map(|s| s.relay);
    let writers: Vec<(usize, Author)> = others
        .iter()
        .map(|&(i, d)| {
            let role = if Some(d) == relay_device {
                Role::Relay
            } else {
                Role::Device
            };
            (
                i,
                Author {
                    device: d,
                    store: author.store.clone(),
                    role,
                    seal: None,
                    vouched: BTreeSet::new(),
                },
            )
        })
        .collect();
    for (i, change) in new_changes.iter().enumerate() {
        let judged_as = match (&relay_author, writers.iter().find(|(j, _)| *j == i)) {
            (_, Some((_, writer))) => writer,
            (Some(relay), None) if relays.contains(&i) => relay,
            _ => author,
        };
        check_change(
            after,
            change,
            judged_as,
            &header,
            terminal_now,
            &mut paths,
            &mut touched,
        )?;
    }
    // Structure and types of the merged result, with the parser the view uses. The stored
    // order was valid, so only the entries the new changes touched need parsing; a new order
    // is parsed whole.
    if existing {
        touched.check(&r, header.currency).map_err(not_an_order)?;
    } else {
        Snapshot::read(&r).map_err(not_an_order)?;
    }
    facts.header = Some(header);
    Ok(new_changes.len())
}

/// The entries (by root container and key) that new changes wrote to.
#[derive(Default)]
struct Touched {
    entries: BTreeSet<(String, String)>,
}

impl Touched {
    fn note(&mut self, path: &[&str]) {
        if let [container, key, ..] = path {
            self.entries
                .insert(((*container).to_owned(), (*key).to_owned()));
        }
    }

    /// Parses every touched entry of the merged order strictly.
    fn check(&self, r: &Reader<'_>, currency: crate::money::Currency) -> Result<(), ModelError> {
        let roots = schema::Roots::read(r)?;
        for (container, key) in &self.entries {
            match container.as_str() {
                keys::LINES => {
                    schema::read_line(r, &roots.lines, key)?;
                }
                keys::PAYMENTS => {
                    schema::read_payment(r, &roots.payments, key, currency)?;
                }
                keys::STATUS => schema::read_status_entry(r, &roots.status, key).map(|_| ())?,
                keys::ACKS => schema::read_ack(r, &roots.acks, key).map(|_| ())?,
                _ => {}
            }
        }
        Ok(())
    }
}

fn not_an_order(e: ModelError) -> PolicyViolation {
    PolicyViolation::NotAnOrder(e.to_string())
}
