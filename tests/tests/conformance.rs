//! The merge conformance vectors (`tests/conformance/vectors`, format in `docs/conformance.md`):
//! every shipped vector replays through the model with every recorded result, saved document,
//! heads and view; regenerating them on this model gives the same bytes; every policy
//! rejection code and every late-edit kind appears; and the JavaScript reader
//! (`tests/conformance/js`) derives the same views from the saved documents when Node.js and
//! its packages are installed.
//!
//! Regenerate after a model change (the diff of the vectors is the change's effect):
//! `REGENERATE_VECTORS=1 cargo test -p e2e --test conformance`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

use crdt_model::PolicyViolation;
use e2e::conformance::format::Verdict;
use e2e::conformance::{check, generate_all, read_dir, to_file_bytes, vectors_dir, write_all};

const REGENERATE: &str = "REGENERATE_VECTORS=1 cargo test -p e2e --test conformance";

#[test]
fn vectors_replay_regenerate_identically_and_cover_every_code() {
    let dir = vectors_dir();
    let generated = generate_all().unwrap();
    if std::env::var_os("REGENERATE_VECTORS").is_some() {
        write_all(&dir, &generated).unwrap();
        println!("wrote {} vectors to {}", generated.len(), dir.display());
    }
    let files = read_dir(&dir).unwrap();

    // Regenerating on this model gives exactly the shipped files.
    let names: BTreeSet<&String> = generated.keys().collect();
    let shipped: BTreeSet<&String> = files.keys().collect();
    assert_eq!(
        names, shipped,
        "the shipped vectors are not the generated ones; run {REGENERATE}"
    );
    for (name, v) in &generated {
        assert!(
            to_file_bytes(v).unwrap() == files[name],
            "vector {name} differs from what this model generates; run {REGENERATE} and \
             review the diff"
        );
    }

    // Every vector replays from its file alone.
    let mut codes = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for (name, bytes) in &files {
        let v = check(bytes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for step in &v.steps {
            if let Some(Verdict::Rejected(code)) = &step.result.verdict {
                codes.insert(code.clone());
            }
        }
        for out in &v.expected {
            for e in out.view["late_edits"].as_array().into_iter().flatten() {
                kinds.insert(e["kind"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    let missing: Vec<&&str> = PolicyViolation::CODES
        .iter()
        .filter(|c| !codes.contains(**c))
        .collect();
    assert!(missing.is_empty(), "no vector rejects with {missing:?}");
    for kind in [
        "line_added",
        "line_changed",
        "line_removed",
        "payment",
        "status_ignored",
        "concurrent_close",
    ] {
        assert!(kinds.contains(kind), "no vector has a {kind} late edit");
    }
    assert!(files.len() >= 200, "only {} vectors", files.len());
}

/// The second implementation of the read side: `node tests/conformance/js/run.mjs` loads every
/// saved document with the `@automerge/automerge` npm package and derives the view from the
/// documented schema alone.
#[test]
fn the_javascript_reader_derives_the_same_views() {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance")
        .join("js");
    if Command::new("node").arg("--version").output().is_err() {
        println!("SKIPPED: node not found; the JavaScript conformance reader did not run");
        return;
    }
    if !js.join("node_modules").join("@automerge").exists() {
        println!(
            "SKIPPED: run `npm ci` in {} to run the JavaScript conformance reader",
            js.display()
        );
        return;
    }
    let out = Command::new("node")
        .arg(js.join("run.mjs"))
        .arg(vectors_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}");
}
