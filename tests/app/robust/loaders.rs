//! Every loader, fed seeded mutations of a valid file: an error naming the file (or the tensor),
//! never a panic; absurd sizes fail fast, before any allocation; non-finite weights are an error
//! naming the tensor unless allowed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use matvlm::checkpoint::{self, CheckpointFiles};
use matvlm::data::{Dataset, ImageCheck, LoadOptions, OnBadRecord};
use matvlm::model::vlm::Vlm;
use matvlm::tokenize::PromptTokenizer;
use matvlm::train::{CheckpointState, RunDir};
use matvlm::Error;

use super::*;
use crate::common::fixture;

/// Mutated cases per file; the whole module runs in a few seconds (see each test).
const CASES: usize = 24;

fn load_vlm(dir: &Path) -> matvlm::Result<Vlm> {
    Vlm::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
}

/// At least one case of `cases` must have been an error: the mutations reach the loader.
fn bites(what: &str, errors: usize) {
    eprintln!("{what}: {errors} mutated cases rejected");
    assert!(errors > 0, "{what}: no mutation was rejected");
}

#[test]
fn damaged_safetensors_shards_are_errors_naming_the_file() {
    let teacher = fixture("teacher");
    for (seed, shard) in [
        (1, "model-00001-of-00002.safetensors"),
        (2, "model-00002-of-00002.safetensors"),
    ] {
        let e = fuzz_file(seed, &teacher, shard, BYTES, CASES, |dir, _| load_vlm(dir));
        bites(shard, e);
        let e = fuzz_file(seed + 10, &teacher, shard, BYTES, CASES, |_, file| {
            checkpoint::load_safetensors(file, &Device::Cpu)
        });
        bites(shard, e);
    }
}

#[test]
fn damaged_configs_are_errors_naming_the_file() {
    let teacher = fixture("teacher");
    for (seed, name) in [
        (3, "model.safetensors.index.json"),
        (4, "config.json"),
        (5, "preprocessor_config.json"),
    ] {
        let e = fuzz_file(seed, &teacher, name, JSON, 2 * CASES, |dir, _| {
            load_vlm(dir)
        });
        bites(name, e);
    }
    let e = fuzz_file(
        6,
        &fixture("hybrid"),
        "mamba_config.json",
        JSON,
        2 * CASES,
        |dir, _| load_vlm(dir),
    );
    bites("mamba_config.json", e);
}

#[test]
fn damaged_tokenizer_is_an_error_naming_the_file() {
    let e = fuzz_file(
        7,
        &fixture("data"),
        "tokenizer.json",
        JSON,
        CASES,
        |_, file| PromptTokenizer::from_file(file),
    );
    bites("tokenizer.json", e);
}

#[test]
fn damaged_llava_json_and_images_are_errors_naming_the_file() {
    let world = tempfile::tempdir().unwrap();
    let tok = crate::common::small_world(world.path(), 3, (6, 0, 0));
    let opts = LoadOptions {
        on_bad: OnBadRecord::Fail,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let e = fuzz_file(8, world.path(), "train.json", JSON, CASES, |dir, file| {
        Dataset::load_with(file, dir, &tok, &opts)
    });
    bites("train.json", e);

    // The images of that world, damaged under the records that use them.
    let records: Value =
        serde_json::from_str(&std::fs::read_to_string(world.path().join("train.json")).unwrap())
            .unwrap();
    let image = records[0]["image"].as_str().unwrap().to_string();
    let image_dir = world.path().join(&image);
    let image_dir = image_dir.parent().unwrap();
    let name = Path::new(&image).file_name().unwrap().to_str().unwrap();
    let e = fuzz_file(9, image_dir, name, BYTES, CASES, |_, file| {
        matvlm::image::load_image(file)
    });
    bites(name, e);
    let e = fuzz_file(
        10,
        &fixture("teacher"),
        "test_image.png",
        BYTES,
        CASES,
        |_, file| matvlm::image::load_image(file),
    );
    bites("test_image.png", e);
}

/// A run directory with one checkpoint of a few tensors and some metrics lines.
pub(super) fn small_run(dir: &Path) {
    let mut run = RunDir::open(dir).unwrap();
    let t = |n: usize| Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
    let weights = BTreeMap::from([("w".to_string(), t(6)), ("b".to_string(), t(2))]);
    let optim = BTreeMap::from([
        ("exp_avg.w".to_string(), t(6)),
        (
            "step.w".to_string(),
            Tensor::new(3i64, &Device::Cpu).unwrap(),
        ),
    ]);
    let state = CheckpointState {
        format: matvlm::train::run::CHECKPOINT_FORMAT,
        step: 3,
        lr: 0.001,
        data: serde_json::json!({"next": 6, "epoch": 0}),
        train_config: serde_json::json!({"steps": 10}),
        tokens: 120,
        extra: Value::Null,
    };
    run.save_checkpoint(&weights, &optim, &state, 0).unwrap();
    for step in 1..=4 {
        run.log(&serde_json::json!({"kind": "train", "step": step, "loss": 1.5}))
            .unwrap();
    }
}

#[test]
fn damaged_run_directories_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    small_run(tmp.path());
    let ck = tmp.path().join("checkpoints/step-000003");
    let load = |run_dir: &Path| -> matvlm::Result<()> {
        let mut run = RunDir::open(run_dir)?;
        run.load_latest(&Device::Cpu)?;
        run.read_metrics()?;
        run.truncate_metrics_after(3)
    };
    let run_root = tmp.path();
    let mut rng = StdRng::seed_from_u64(14);
    let valid = std::fs::read(run_root.join("metrics.jsonl")).unwrap();
    let mut errors = 0;
    for i in 0..CASES {
        let (bytes, what) = mutate(&mut rng, &valid, BYTES);
        std::fs::write(run_root.join("metrics.jsonl"), &bytes).unwrap();
        let case = format!("metrics.jsonl case {i}: {what}");
        let path = run_root.join("metrics.jsonl").display().to_string();
        errors += check_case(&case, &[&path], || load(run_root)) as usize;
    }
    bites("metrics.jsonl", errors);
    std::fs::write(run_root.join("metrics.jsonl"), &valid).unwrap();
    for pointer in ["", "step-999999", "../../etc", "\u{0}", "step-000003\n\n"] {
        std::fs::write(run_root.join("checkpoints/latest"), pointer).unwrap();
        let case = format!("latest = {pointer:?}");
        check_case(&case, &[""], || load(run_root));
        let latest = RunDir::open(run_root).unwrap().latest_dir().unwrap();
        assert_eq!(latest.as_deref(), Some(ck.as_path()), "{case}");
    }
}

/// The checkpoint files are fuzzed in their real place too (a run whose newest checkpoint is
/// damaged), so the run-level reader is what meets them.
#[test]
fn damaged_checkpoint_in_place_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    small_run(tmp.path());
    let ck = tmp.path().join("checkpoints/step-000003");
    let mut rng = StdRng::seed_from_u64(15);
    let mut errors = 0;
    for name in ["state.json", "model.safetensors", "optimizer.safetensors"] {
        let path = ck.join(name);
        let valid = std::fs::read(&path).unwrap();
        let kinds = if name.ends_with(".json") { JSON } else { BYTES };
        for i in 0..CASES / 2 {
            let (bytes, what) = mutate(&mut rng, &valid, kinds);
            std::fs::write(&path, &bytes).unwrap();
            let case = format!("{name} case {i}: {what}");
            let p = path.display().to_string();
            errors += check_case(&case, &[&p], || {
                RunDir::open(tmp.path())?.load_latest(&Device::Cpu)
            }) as usize;
        }
        std::fs::write(&path, &valid).unwrap();
    }
    bites("checkpoint files", errors);
}

/// Write a safetensors file whose header declares `shape` for a tensor of 4 bytes.
fn lying_header(path: &Path, shape: &[u64]) {
    let header = serde_json::json!({
        "w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn absurd_sizes_fail_fast_without_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let fast = |what: &str, f: &mut dyn FnMut() -> bool| {
        let t0 = Instant::now();
        assert!(f(), "{what}: not rejected");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{what}: took {:?}",
            t0.elapsed()
        );
    };
    // A safetensors header claiming a terabyte tensor, or an overflowing one.
    let st = tmp.path().join("huge.safetensors");
    for shape in [
        vec![1u64 << 20, 1 << 20],
        vec![u64::MAX, 2],
        vec![1 << 62, 1 << 62],
    ] {
        lying_header(&st, &shape);
        fast(&format!("shape {shape:?}"), &mut || {
            let p = st.display().to_string();
            check_case("huge safetensors", &[&p], || {
                checkpoint::load_safetensors(&st, &Device::Cpu)
            })
        });
    }
    // A header length of 2^63: the header is not read into memory.
    let mut bytes = (1u64 << 63).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&st, bytes).unwrap();
    fast("header length", &mut || {
        let p = st.display().to_string();
        check_case("huge header", &[&p], || {
            checkpoint::load_safetensors(&st, &Device::Cpu)
        })
    });

    // A PNG whose header claims 2^30 x 2^30 pixels (CRC fixed, so only the size is wrong).
    let png = tmp.path().join("huge.png");
    let mut bytes = std::fs::read(fixture("teacher").join("test_image.png")).unwrap();
    bytes[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
    bytes[20..24].copy_from_slice(&(1u32 << 30).to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&png, bytes).unwrap();
    fast("png size", &mut || {
        let err = matvlm::image::load_image(&png).unwrap_err().to_string();
        assert!(err.contains(&png.display().to_string()), "{err}");
        assert!(err.contains("limit"), "rejected for its size: {err}");
        true
    });

    // Configs with absurd sizes, each key alone.
    let dir = tmp.path().join("teacher");
    copy_dir(&fixture("teacher"), &dir);
    let valid: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for key in [
        "/text_config/hidden_size",
        "/text_config/vocab_size",
        "/text_config/max_position_embeddings",
        "/text_config/num_hidden_layers",
        "/text_config/intermediate_size",
        "/vision_config/image_size",
        "/vision_config/hidden_size",
        "/vision_config/num_hidden_layers",
    ] {
        let mut v = valid.clone();
        match v.pointer_mut(key) {
            Some(x) => *x = serde_json::json!(1u64 << 40),
            None => {
                let (parent, k) = key.rsplit_once('/').unwrap();
                v.pointer_mut(parent).unwrap()[k] = serde_json::json!(1u64 << 40);
            }
        }
        std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
        let leaf = key.rsplit('/').next().unwrap();
        fast(key, &mut || {
            let err = load_vlm(&dir).map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains("config.json") && err.contains(leaf),
                "{key}: {err}"
            );
            true
        });
    }
    std::fs::write(dir.join("config.json"), valid.to_string()).unwrap();
    let pre: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    let mut v = pre.clone();
    v["size"]["height"] = serde_json::json!(1u64 << 40);
    std::fs::write(dir.join("preprocessor_config.json"), v.to_string()).unwrap();
    fast("preprocessor size", &mut || {
        let err = load_vlm(&dir).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("preprocessor_config.json") && err.contains("height"),
            "{err}"
        );
        true
    });

    // mamba_config.json with absurd mixer sizes.
    let hybrid = tmp.path().join("hybrid");
    copy_dir(&fixture("hybrid"), &hybrid);
    let mc: Value =
        serde_json::from_str(&std::fs::read_to_string(hybrid.join("mamba_config.json")).unwrap())
            .unwrap();
    for key in [
        "/d_model",
        "/d_inner",
        "/d_xb",
        "/ssm_cfg/d_state",
        "/ssm_cfg/ngroups",
        "/ssm_cfg/chunk_size",
        "/n_layer",
    ] {
        let mut v = mc.clone();
        *v.pointer_mut(key).unwrap() = serde_json::json!(u64::MAX >> 1);
        std::fs::write(hybrid.join("mamba_config.json"), v.to_string()).unwrap();
        fast(key, &mut || {
            let err = load_vlm(&hybrid).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("mamba_config.json"), "{key}: {err}");
            true
        });
    }
}

/// One value of `name` in the safetensors file `path` set to `value`.
fn poison(path: &Path, name: &str, value: f32) {
    let mut tensors = checkpoint::load_safetensors(path, &Device::Cpu).unwrap();
    let t = &tensors[name];
    let (dims, dtype) = (t.dims().to_vec(), t.dtype());
    let mut data = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mid = data.len() / 2;
    data[mid] = value;
    let t = Tensor::from_vec(data, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    tensors.insert(name.to_string(), t);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn non_finite_weights_are_an_error_naming_the_tensor_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    // f32 shards of the fixture teacher, NaN in one and +Inf in the other.
    let dir = tmp.path().join("teacher");
    copy_dir(&fixture("teacher"), &dir);
    let shard = dir.join("model-00002-of-00002.safetensors");
    let names: Vec<String> = {
        let mut n: Vec<String> = checkpoint::load_safetensors(&shard, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        n.sort();
        n
    };
    let victim = &names[names.len() / 2];
    poison(&shard, victim, f32::NAN);
    let err = load_vlm(&dir).map(|_| ()).unwrap_err();
    match &err {
        Error::NonFinite {
            path,
            tensor,
            count,
        } => {
            assert_eq!((path, tensor, *count), (&shard, victim, 1), "{err}");
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    assert!(err.to_string().contains(victim.as_str()), "{err}");
    // Loaded anyway for inspection: the NaN is there.
    let files = CheckpointFiles::from_dir(&dir)
        .unwrap()
        .allowing_non_finite();
    let vlm = Vlm::from_files(&files, DType::F32, &Device::Cpu).unwrap();
    drop(vlm);
    let raw = checkpoint::load_safetensors_with(&shard, &Device::Cpu, true).unwrap();
    let v = raw[victim.as_str()]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(v.iter().filter(|x| x.is_nan()).count(), 1);

    // bf16 (the embedded teacher's dtype) and f16: Inf found through the 16-bit exponent test.
    for dtype in [DType::BF16, DType::F16] {
        let path = tmp.path().join(format!("{dtype:?}.safetensors"));
        let t = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let map = std::collections::HashMap::from([("a.weight".to_string(), t)]);
        candle_core::safetensors::save(&map, &path).unwrap();
        checkpoint::load_safetensors(&path, &Device::Cpu).unwrap();
        poison(&path, "a.weight", f32::NEG_INFINITY);
        let err = checkpoint::load_safetensors(&path, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { tensor, count: 1, .. } if tensor == "a.weight"),
            "{dtype:?}: {err}"
        );
    }

    // From a script: an error naming the tensor, or the tensors with `allow_non_finite`.
    let engine = matvlm::script::engine(&matvlm::script::Session::default());
    let consts = [("SHARD", shard.display().to_string())];
    let err = crate::common::eval_with_constants(&engine, &consts, "load_safetensors(SHARD)")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(victim.as_str()) && err.contains("non-finite"),
        "{err}"
    );
    let n = crate::common::eval_with_constants(
        &engine,
        &consts,
        "load_safetensors(SHARD, #{ allow_non_finite: true }).len()",
    )
    .unwrap();
    assert_eq!(n.as_int().unwrap() as usize, names.len());
    let consts = [("DIR", dir.display().to_string())];
    let err = crate::common::eval_with_constants(&engine, &consts, "load_model(DIR, #{})")
        .unwrap_err()
        .to_string();
    assert!(err.contains(victim.as_str()), "{err}");
    let loaded = crate::common::eval_with_constants(
        &engine,
        &consts,
        "load_model(DIR, #{ allow_non_finite: true }).layers().len()",
    )
    .unwrap();
    assert!(loaded.as_int().unwrap() > 0);

    // A training checkpoint holding NaN: resuming from it is the error, naming the tensor.
    let run_dir = tmp.path().join("run");
    small_run(&run_dir);
    poison(
        &run_dir.join("checkpoints/step-000003/model.safetensors"),
        "w",
        f32::NAN,
    );
    let err = RunDir::open(&run_dir)
        .unwrap()
        .load_latest(&Device::Cpu)
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, .. } if tensor == "w"),
        "{err}"
    );
    let ck =
        RunDir::load_checkpoint_with(&run_dir.join("checkpoints/step-000003"), &Device::Cpu, true)
            .unwrap();
    let w = ck.weights["w"].to_vec1::<f32>().unwrap();
    assert_eq!(w.iter().filter(|x| x.is_nan()).count(), 1);
}

/// CRC-32 (IEEE) of a PNG chunk's type and data.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
