//! Panic containment: a panic while handling one frame ends that frame's work, not the worker.
//!
//! Automerge 0.12 panics on some hostile inputs (a Bloom filter with zero bits, for one). The
//! hub runs each frame's synchronous work through [`contain`] and undoes the frame's effects
//! when it reports a panic.
//!
//! TODO: switch to `crdt_model::guard` (panic-proof Automerge wrappers) once it is merged; this
//! module is the relay's stopgap until then.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f`; a panic inside it comes back as `Err` with the panic's message.
///
/// The caller must treat every state `f` touched as suspect after an `Err` and restore it
/// (the hub puts the order's last good state back and drops the connection's sync state).
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
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
}
