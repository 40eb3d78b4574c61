//! Bad input and crashes survived: every loader fed seeded mutations of valid files
//! (`loaders`), script option maps with values of the wrong type (`script_args`), rhai's limits
//! and Ctrl-C on runaway scripts (`limits`), training runs killed with SIGKILL and resumed, and
//! failing writes (`crash`).
//!
//! The mutations are a small seeded loop of our own rather than proptest: each case is one
//! mutation of one committed fixture, its seed printed on failure, so a failing case replays
//! with the same seed and nothing is shrunk or persisted.

mod crash;
mod limits;
mod loaders;
mod script_args;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// One way to damage a file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mutation {
    /// Cut at a random length (0 included: an empty file).
    Truncate,
    /// Overwrite 1 to 8 random bytes with random values.
    FlipBytes,
    /// Replace a random JSON node with a value of another type.
    WrongType,
    /// Replace a random JSON number (or any node) with an absurd number.
    Absurd,
    /// Remove a random key of a JSON object.
    DropKey,
}

/// Byte-level mutations, for any file.
pub const BYTES: &[Mutation] = &[Mutation::Truncate, Mutation::FlipBytes];
/// Every mutation, for JSON files.
pub const JSON: &[Mutation] = &[
    Mutation::Truncate,
    Mutation::FlipBytes,
    Mutation::WrongType,
    Mutation::Absurd,
    Mutation::DropKey,
];

/// The bytes of a damaged copy of `valid` (mutation picked from `kinds` by the seeded `rng`),
/// and a description of what was done.
pub fn mutate(rng: &mut StdRng, valid: &[u8], kinds: &[Mutation]) -> (Vec<u8>, String) {
    let kind = kinds[rng.random_range(0..kinds.len())];
    match kind {
        Mutation::Truncate => {
            // Half the cuts land in the first 64 bytes, where headers are.
            let len = if rng.random_bool(0.5) {
                rng.random_range(0..valid.len().min(64))
            } else {
                rng.random_range(0..valid.len())
            };
            (valid[..len].to_vec(), format!("truncated to {len} bytes"))
        }
        Mutation::FlipBytes => {
            let mut out = valid.to_vec();
            let n = rng.random_range(1..=8);
            let mut at = Vec::new();
            for _ in 0..n {
                let i = if rng.random_bool(0.5) {
                    rng.random_range(0..out.len().min(256))
                } else {
                    rng.random_range(0..out.len())
                };
                out[i] = rng.random();
                at.push(i);
            }
            (out, format!("bytes flipped at {at:?}"))
        }
        Mutation::WrongType | Mutation::Absurd | Mutation::DropKey => {
            let mut v: Value = serde_json::from_slice(valid).expect("a valid JSON seed");
            let what = mutate_json(rng, &mut v, kind);
            (serde_json::to_vec_pretty(&v).unwrap(), what)
        }
    }
}

/// JSON pointers of every node of `v` (the root included).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            // Long arrays (vocabularies, merges) would swamp the choice: a few of their items.
            for (i, x) in a.iter().enumerate().take(4) {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn mutate_json(rng: &mut StdRng, v: &mut Value, kind: Mutation) -> String {
    let mut all = Vec::new();
    pointers(v, String::new(), &mut all);
    if kind == Mutation::DropKey {
        let keyed: Vec<&String> = all
            .iter()
            .filter(|p| {
                let parent = &p[..p.rfind('/').unwrap_or(0)];
                !p.is_empty() && v.pointer(parent).is_some_and(Value::is_object)
            })
            .collect();
        if let Some(p) = keyed.get(rng.random_range(0..keyed.len().max(1))) {
            let (parent, key) = p.rsplit_once('/').unwrap();
            let key = key.replace("~1", "/").replace("~0", "~");
            v.pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .unwrap()
                .remove(&key);
            return format!("dropped key {p}");
        }
    }
    let numbers: Vec<&String> = all
        .iter()
        .filter(|p| v.pointer(p).is_some_and(Value::is_number))
        .collect();
    let p = if kind == Mutation::Absurd && !numbers.is_empty() {
        numbers[rng.random_range(0..numbers.len())].clone()
    } else {
        all[rng.random_range(0..all.len())].clone()
    };
    let new = if kind == Mutation::Absurd {
        let choices = [
            serde_json::json!(1u64 << 40),
            serde_json::json!(u64::MAX),
            serde_json::json!(-1),
            serde_json::json!(0),
            serde_json::json!(1e300),
            serde_json::json!(-1e300),
            serde_json::json!(i64::MIN),
        ];
        choices[rng.random_range(0..choices.len())].clone()
    } else {
        let old = v.pointer(&p).unwrap();
        let choices = [
            Value::Null,
            serde_json::json!(true),
            serde_json::json!(7),
            serde_json::json!(-2.5),
            serde_json::json!("x"),
            serde_json::json!([1, "a"]),
            serde_json::json!({"k": 1}),
        ];
        let other: Vec<&Value> = choices
            .iter()
            .filter(|c| std::mem::discriminant(*c) != std::mem::discriminant(old))
            .collect();
        other[rng.random_range(0..other.len())].clone()
    };
    let what = format!("{p} := {new}");
    *v.pointer_mut(&p).unwrap() = new;
    what
}

/// Run one case: `load` must not panic, and an error must mention one of `names` (the file, its
/// folder, or a key/tensor). Returns whether it failed (an accepted mutation is fine: not every
/// flipped byte makes a file invalid).
pub fn check_case<T, E: std::fmt::Display>(
    case: &str,
    names: &[&str],
    load: impl FnOnce() -> Result<T, E>,
) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(load));
    match outcome {
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{case}: panicked instead of returning an error: {msg}")
        }
        Ok(Ok(_)) => false,
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                names.iter().any(|n| msg.contains(n)),
                "{case}: the error names none of {names:?}: {msg}"
            );
            true
        }
    }
}

/// `cases` seeded mutations of the file `name` inside a copy of the folder `seed_dir`: each is
/// written over the copy's file, then `load(copy_dir, mutated_file)` runs under [`check_case`].
/// Returns how many cases were errors (the rest loaded), so a caller can check that the
/// mutations bite.
pub fn fuzz_file<T, E: std::fmt::Display>(
    seed: u64,
    seed_dir: &Path,
    name: &str,
    kinds: &[Mutation],
    cases: usize,
    mut load: impl FnMut(&Path, &Path) -> Result<T, E>,
) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    copy_dir(seed_dir, &dir);
    let file = dir.join(name);
    let valid = std::fs::read(seed_dir.join(name)).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut errors = 0;
    for i in 0..cases {
        let (bytes, what) = mutate(&mut rng, &valid, kinds);
        std::fs::write(&file, &bytes).unwrap();
        let case = format!("{name} case {i} (seed {seed}): {what}");
        let dir_s = dir.display().to_string();
        // A weight of the wrong shape is named by its key (the folder is in the case).
        if check_case(&case, &[&dir_s, "tensor `"], || load(&dir, &file)) {
            errors += 1;
        }
    }
    errors
}

/// Copy the files of `from` (one level, the fixtures are flat) into a new folder `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}
