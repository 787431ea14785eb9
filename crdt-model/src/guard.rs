//! The one way to run Automerge on bytes from outside: a saved order read back from disk, a
//! change or a sync message from the network. The model, the device library and the relay all
//! go through here; nothing in it is specific to one of them.
//!
//! Automerge 0.12 trusts a chunk once its checksum matches. Given a chunk with one flipped bit
//! and a recomputed checksum, `Automerge::load`, `Change::from_bytes` + `apply_changes`,
//! `load_incremental` and `receive_sync_message` panic on about 7 % of inputs (index, slice and
//! arithmetic checks in its column decoders, op set and change graph), and take another 1-3 %
//! into a document whose changes no longer rebuild: the next `get_changes`, sync message or
//! save panics (debug builds of Automerge) or hands out changes under hashes no peer knows
//! (release builds). A sync message whose Bloom filter claims entries with
//! `bits_per_entry = 0` makes the *next* `generate_sync_message` divide by zero. The counts
//! come from `tests/panic_corpus.rs`. Every function here turns all of that into
//! [`ModelError::Malformed`] and leaves what it was given exactly as it was.
//!
//! **How.** Validating the bytes before Automerge sees them is not sound: the panics come from
//! deep inside its decoders and from how a change meets the document it is applied to, and a
//! validator would have to re-implement both. So each call runs Automerge under
//! [`catch_unwind`], on something a panic may leave half-written only if it is a copy, and
//! checks the result before handing it over:
//!
//! * loading and decoding ([`load`], [`load_with_increments`], [`decode_change`],
//!   [`decode_sync_message`]) builds a new value, dropped on failure;
//! * applying to a document ([`apply_changes`], [`load_incremental`], [`receive_sync_message`]
//!   when the message carries changes, and [`with_copy`] for anything else) runs on a clone of
//!   the document that replaces it only on success. A failure — panic, error or failed check —
//!   leaves the document with the same heads and the same `save()` bytes. Changes the document
//!   already has, and a sync message without changes, touch no document content and run on the
//!   document itself (in Automerge 0.12 `receive_sync_message` writes to the document only
//!   through `load_incremental` of the message's changes);
//! * the check: every change new to the document is rebuilt (`get_changes`) and its hash
//!   compared with the change graph's, which finds the documents that would panic or lie later
//!   (see `rebuilt` in the source);
//! * the sync state is cloned before [`receive_sync_message`] and put back on failure, and a
//!   message whose Bloom filter has entries but no bits is refused before it reaches the state
//!   ([`check_sync_message`]). [`generate_sync_message`] only reads the document; it resets a
//!   state that made Automerge panic.
//!
//! Applying in place after a snapshot would cost the same clone; applying in place and
//! rebuilding from saved bytes after a panic would need those bytes kept current, which costs a
//! save per change. The clone is the cheapest sound copy Automerge offers.
//!
//! **Cost** (`cargo bench -p crdt-model --bench model`, release, three runs on the shared
//! 2-core machine of `docs/performance.md`, medians): the clone is 4.5-7.4 µs for the
//! full-lifecycle order (35 changes, 1.9 KB) and 17-25 µs for an order edited 2,000 times.
//! Applying one incoming change (a line added to a 20-line order) costs 23-32 µs more than bare
//! Automerge (41-88 µs), receiving a sync message carrying it 25-49 µs more (48-87 µs): the
//! clone plus the rebuild of the new change, which the device needed anyway to store it (so
//! its receive path pays only the clone and the hash comparison on top of what it did before).
//! Local edits never come through here. A checked load rebuilds every change: 140-254 µs on
//! top of `Automerge::load` (228-413 µs) for the full-lifecycle order, +70-80 %. That is the
//! price of refusing at load time a document that would break later; it falls on device start
//! (each stored order once) and on `Order::load`.
//!
//! **Limits.** This needs `panic = "unwind"` (the default; nothing in this workspace sets
//! `abort`). The default panic hook still prints each caught panic to stderr: this library
//! installs no hook (the process's hook belongs to the application), and an application that
//! wants quiet logs can filter in its own hook on the panic's location (`automerge`,
//! `hexane`). The corpus covers single-bit flips and byte edits of real orders; other damage
//! may find other panics, which the guard catches all the same, and other ways for a document
//! to break later, which only the rebuild check stands between.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};

use crate::error::ModelError;

/// What a panic payload says, for the error.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "no message".to_owned()
    }
}

/// Runs `f`; a panic inside it comes back as `Err` with the panic's message.
///
/// This is the containment every guarded call uses, for callers (the relay's hub) whose unit
/// of work is larger than one Automerge call. The caller must treat every state `f` touched as
/// suspect after an `Err` and restore it from a last good copy.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// Runs `f`, turning a panic into [`ModelError::Malformed`] about `what`.
fn guarded<T>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    contain(f).unwrap_or_else(|message| {
        Err(ModelError::Malformed {
            what,
            detail: format!("automerge panicked: {message}"),
        })
    })
}

/// The changes of `doc` that are not in the history of `before`, rebuilt from the document.
///
/// This is the check that the document is whole. Automerge keeps operations in columns and
/// rebuilds a change's bytes from them on demand (to save, sync or hand changes out). Damaged
/// input can decode to operations that do not rebuild into the change they came from: such a
/// document loads or applies without complaint and then, in a debug build of Automerge, panics
/// in the next `get_changes`, sync message or edit; in a release build it hands out changes
/// whose hashes are not the ones its change graph (and every peer) knows. Rebuilding the new
/// changes here, under the guard, and comparing their hashes with the change graph's finds both.
fn rebuilt(
    doc: &Automerge,
    before: &[ChangeHash],
    what: &'static str,
) -> Result<Vec<Change>, ModelError> {
    let changes = doc.get_changes(before);
    let mut known: Vec<ChangeHash> = doc
        .get_changes_meta(before)
        .iter()
        .map(|m| m.hash)
        .collect();
    let mut hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
    known.sort_unstable();
    hashes.sort_unstable();
    if hashes == known {
        Ok(changes)
    } else {
        Err(ModelError::Malformed {
            what,
            detail: "changes do not rebuild to their hashes".to_owned(),
        })
    }
}

/// Runs `f` on a copy of `doc` under the guard, checks the copy is whole, and swaps it in only
/// if all went well: a panic or an error leaves `doc` as it was. Returns what `f` returned and
/// the changes new to `doc`. `what` names the input in the error. Use it to apply foreign
/// changes and check the result (schema, policy) as one step.
pub fn with_copy<T>(
    doc: &mut Automerge,
    what: &'static str,
    f: impl FnOnce(&mut Automerge) -> Result<T, ModelError>,
) -> Result<(T, Vec<Change>), ModelError> {
    let before = doc.get_heads();
    let copy = doc.clone();
    // The copy moves into the closure, so a panic drops it while unwinding, inside the catch.
    let (copy, out, new) = guarded(what, move || {
        let mut copy = copy;
        let out = f(&mut copy)?;
        let new = rebuilt(&copy, &before, what)?;
        Ok((copy, out, new))
    })?;
    *doc = copy;
    Ok((out, new))
}

/// Loads a saved document (one or more chunks), checked whole.
pub fn load(bytes: &[u8]) -> Result<Automerge, ModelError> {
    guarded("document", || {
        let doc = Automerge::load(bytes).map_err(|e| ModelError::Load(e.to_string()))?;
        rebuilt(&doc, &[], "document")?;
        Ok(doc)
    })
}

/// Loads a saved document and then each increment (changes or incremental saves) in order, as
/// stores keep them: a compacted snapshot and the tail written since. An empty snapshot is an
/// empty document. One guard and one check for the whole rebuild: on failure nothing is kept,
/// so nothing is copied.
pub fn load_with_increments<'a>(
    snapshot: &[u8],
    increments: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Automerge, ModelError> {
    guarded("document", move || {
        let mut doc = if snapshot.is_empty() {
            Automerge::new()
        } else {
            Automerge::load(snapshot).map_err(|e| ModelError::Load(e.to_string()))?
        };
        for bytes in increments {
            doc.load_incremental(bytes)
                .map_err(|e| ModelError::Load(e.to_string()))?;
        }
        rebuilt(&doc, &[], "document")?;
        Ok(doc)
    })
}

/// Decodes one change chunk.
pub fn decode_change(bytes: &[u8]) -> Result<Change, ModelError> {
    guarded("change", || {
        Change::from_bytes(bytes.to_vec()).map_err(|e| ModelError::Malformed {
            what: "change",
            detail: e.to_string(),
        })
    })
}

/// Decodes a sync message and checks its Bloom filters ([`check_sync_message`]).
pub fn decode_sync_message(bytes: &[u8]) -> Result<sync::Message, ModelError> {
    let msg = guarded("sync message", || {
        sync::Message::decode(bytes).map_err(|e| ModelError::Malformed {
            what: "sync message",
            detail: e.to_string(),
        })
    })?;
    check_sync_message(&msg)?;
    Ok(msg)
}

/// Refuses a sync message that would make a later `generate_sync_message` panic: a Bloom
/// filter that claims entries but has no bits (`bits_per_entry = 0`) makes Automerge 0.12
/// divide by zero when it probes the filter; one of 2^29 bytes or more overflows its bit count.
pub fn check_sync_message(msg: &sync::Message) -> Result<(), ModelError> {
    for have in &msg.have {
        // Encoded as uLEB128 entries, bits per entry, probes, then the bits; nothing at all when
        // the filter has no entries (and is never probed).
        let bytes = have.bloom.to_bytes();
        let Some(bits) = skip_leb128(&bytes, 3) else {
            continue;
        };
        if bits.is_empty() || bits.len() >= 1 << 29 {
            return Err(ModelError::Malformed {
                what: "sync message",
                detail: format!("Bloom filter with entries and {} bytes of bits", bits.len()),
            });
        }
    }
    Ok(())
}

/// `bytes` after `n` uLEB128 numbers, or `None` if it does not hold them.
fn skip_leb128(bytes: &[u8], n: usize) -> Option<&[u8]> {
    let mut rest = bytes;
    for _ in 0..n {
        let end = rest.iter().position(|b| b & 0x80 == 0)?;
        rest = rest.get(end + 1..)?;
    }
    Some(rest)
}

/// Whether `doc` already has every one of `changes` (so applying them changes nothing).
pub fn has_all(doc: &Automerge, changes: &[Change]) -> bool {
    changes
        .iter()
        .all(|c| doc.get_change_meta_by_hash(&c.hash()).is_some())
}

/// Applies changes from elsewhere; returns those new to `doc`. On failure the document is as
/// it was.
pub fn apply_changes(doc: &mut Automerge, changes: Vec<Change>) -> Result<Vec<Change>, ModelError> {
    if has_all(doc, &changes) {
        // Nothing new: Automerge would skip each of them.
        return Ok(Vec::new());
    }
    with_copy(doc, "change", move |d| Ok(d.apply_changes(changes)?)).map(|((), new)| new)
}

/// Loads changes or a saved document into `doc` (Automerge's `load_incremental`); returns the
/// changes new to `doc`. On failure the document is as it was.
pub fn load_incremental(doc: &mut Automerge, bytes: &[u8]) -> Result<Vec<Change>, ModelError> {
    with_copy(doc, "change", |d| {
        d.load_incremental(bytes)
            .map_err(|e| ModelError::Load(e.to_string()))
    })
    .map(|(_, new)| new)
}

/// Receives a sync message into `doc` and its peer's `state`; returns the changes new to
/// `doc`. On failure both are as they were; the caller may want to reset the state (start the
/// sync over) rather than keep it.
pub fn receive_sync_message(
    doc: &mut Automerge,
    state: &mut sync::State,
    msg: sync::Message,
) -> Result<Vec<Change>, ModelError> {
    check_sync_message(&msg)?;
    let before = state.clone();
    let outcome = if msg.changes.is_empty() {
        // No changes: Automerge only reads the document and updates the state.
        guarded("sync message", || {
            doc.receive_sync_message(state, msg)?;
            Ok(Vec::new())
        })
    } else {
        with_copy(doc, "sync message", |d| {
            Ok(d.receive_sync_message(state, msg)?)
        })
        .map(|((), new)| new)
    };
    if outcome.is_err() {
        *state = before;
    } else {
        resend_what_peer_needs(doc, state);
    }
    outcome
}

/// Makes the next sync message carry again every change the peer asks for by hash (its
/// `need`) that `doc` holds, even if it was sent before. Automerge never sends a change twice
/// on one sync state: a change that was sent but never applied (the peer dropped it, or
/// refused it and later could take it) would otherwise be asked for forever, each side
/// repeating the same message. A peer that names a change in `need` does not have it, so
/// sending it again is always right. Returns whether anything is to be sent again.
pub fn resend_what_peer_needs(doc: &Automerge, state: &mut sync::State) -> bool {
    let Some(need) = &state.their_need else {
        return false;
    };
    let mut again = false;
    for h in need {
        if state.sent_hashes.contains(h) && doc.get_change_by_hash(h).is_some() {
            state.sent_hashes.remove(h);
            again = true;
        }
    }
    again
}

/// Generates the next sync message for the peer of `state`. The document is only read; if
/// Automerge panics on what the state holds from the peer, the state is reset (the sync starts
/// over) and the error returned.
pub fn generate_sync_message(
    doc: &Automerge,
    state: &mut sync::State,
) -> Result<Option<sync::Message>, ModelError> {
    let outcome = guarded("sync state", || Ok(doc.generate_sync_message(state)));
    if outcome.is_err() {
        *state = sync::State::new();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let r: Result<(), String> = contain(|| panic!("boom {}", 7));
        assert_eq!(r, Err("boom 7".to_owned()));
        assert_eq!(contain(|| 5), Ok(5));
    }

    /// A peer that dropped a change it was sent and asks for it by hash gets it again; bare
    /// Automerge would answer with the same empty message forever.
    #[test]
    fn a_change_asked_for_again_is_sent_again() {
        use automerge::transaction::Transactable;
        let mut a = Automerge::new();
        let mut tx = a.transaction();
        tx.put(automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        let mut b = Automerge::new();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        // One full round so both know each other, then `a` edits and sends the change.
        for _ in 0..4 {
            if let Some(m) = generate_sync_message(&a, &mut sa).unwrap() {
                receive_sync_message(&mut b, &mut sb, m).unwrap();
            }
            if let Some(m) = generate_sync_message(&b, &mut sb).unwrap() {
                receive_sync_message(&mut a, &mut sa, m).unwrap();
            }
        }
        let mut tx = a.transaction();
        tx.put(automerge::ROOT, "k", 2).unwrap();
        tx.commit();
        let lost = a.get_heads()[0];
        let sent = generate_sync_message(&a, &mut sa).unwrap().unwrap();
        assert_eq!(sent.changes.len(), 1);
        // `b` never gets it. It learns `a`'s heads from a message without changes and asks.
        let mut announce = sent.clone();
        announce.changes = Vec::<Vec<u8>>::new().into();
        receive_sync_message(&mut b, &mut sb, announce).unwrap();
        let ask = generate_sync_message(&b, &mut sb).unwrap().unwrap();
        assert_eq!(ask.need, vec![lost]);

        // Bare Automerge, on a copy of `a`'s state: nothing is sent again.
        let mut bare = sa.clone();
        a.receive_sync_message(&mut bare, ask.clone()).unwrap();
        let again = a.generate_sync_message(&mut bare);
        assert!(again.is_none_or(|m| m.changes.is_empty()));

        // Through the guard the change travels again and `b` catches up.
        receive_sync_message(&mut a, &mut sa, ask).unwrap();
        let again = generate_sync_message(&a, &mut sa).unwrap().unwrap();
        assert_eq!(again.changes.len(), 1);
        receive_sync_message(&mut b, &mut sb, again).unwrap();
        assert_eq!(b.get_heads(), a.get_heads());
    }
}
