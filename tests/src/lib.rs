//! Cross-crate test support: helpers shared by the merge conformance and story tests.
