//! Merge conformance vectors: language-neutral JSON scenarios that any client can replay or read
//! (`docs/conformance.md` is the format's specification).
//!
//! A vector names its replicas, lists the steps they took (typed model operations with their
//! arguments and times, raw forged changes, deliveries of changes between replicas, some judged
//! by the relay's policy) with what each step gave, and ends with what every replica holds: its
//! saved document, its heads and the view derived from it as canonical JSON.
//!
//! * [`format`](mod@format): the vector's types, as they are written to JSON.
//! * [`json`]: the view as canonical JSON, independent of how `OrderView` serialises itself.
//! * [`sim`]: the executor: runs steps on the real model and records (or checks) what they gave.
//! * [`scenarios`], [`forged`], [`generated`]: the vectors shipped in `tests/conformance/vectors`.
//!
//! Regenerate them with `REGENERATE_VECTORS=1 cargo test -p e2e --test conformance`; without the
//! variable that test replays every shipped vector and checks that regenerating gives the same
//! bytes.

pub mod forged;
pub mod format;
pub mod generated;
pub mod json;
pub mod scenarios;
pub mod sim;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

pub use format::{FORMAT, Vector};

/// Every vector this build generates, by name (names are unique; a name is the file's path
/// under the vectors directory, without `.json`).
pub fn generate_all() -> Result<BTreeMap<String, Vector>> {
    let mut all = BTreeMap::new();
    let groups = [
        scenarios::stories()?,
        scenarios::laws()?,
        scenarios::late_edits()?,
        scenarios::conflicts()?,
        forged::rejections()?,
        generated::vectors()?,
    ];
    for v in groups.into_iter().flatten() {
        let name = v.name.clone();
        ensure!(
            all.insert(name.clone(), v).is_none(),
            "two vectors are named {name}"
        );
    }
    Ok(all)
}

/// The directory the vectors are shipped in (`tests/conformance/vectors`).
pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance")
        .join("vectors")
}

/// The file a vector is written to.
pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The bytes of a vector's file: pretty JSON, one trailing newline.
pub fn to_file_bytes(v: &Vector) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// Every vector file under `dir`, by name (relative path without `.json`, `/`-separated).
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    read_into(dir, dir, &mut out)?;
    Ok(out)
}

fn read_into(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            read_into(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            let rel = path.strip_prefix(root)?.with_extension("");
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.insert(name, std::fs::read(&path)?);
        }
    }
    Ok(())
}

/// Writes every vector under `dir` and removes vector files no longer generated.
pub fn write_all(dir: &Path, vectors: &BTreeMap<String, Vector>) -> Result<()> {
    let existing = if dir.exists() {
        read_dir(dir)?
    } else {
        BTreeMap::new()
    };
    for name in existing.keys() {
        if !vectors.contains_key(name) {
            std::fs::remove_file(path_of(dir, name))?;
        }
    }
    for (name, v) in vectors {
        let path = path_of(dir, name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let bytes = to_file_bytes(v)?;
        if existing.get(name) != Some(&bytes) {
            std::fs::write(&path, bytes)?;
        }
    }
    Ok(())
}

/// Replays a vector read from a file through the model and checks every recorded outcome, the
/// final documents, heads and views, and that each saved document loads to the same view.
pub fn check(bytes: &[u8]) -> Result<Vector> {
    let v: Vector = serde_json::from_slice(bytes).context("not a vector")?;
    if v.format != FORMAT {
        bail!("format {:?}, this runner reads {FORMAT:?}", v.format);
    }
    sim::replay(&v).with_context(|| format!("vector {}", v.name))?;
    Ok(v)
}
