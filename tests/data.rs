//! Data side: the LLaVA loader (parity with TinyLLaVA on a ShareGPT4V sample, bad records), the
//! resumable loader and batching, and the synthetic world (determinism, balance, answers that
//! follow from what is drawn, tokenizer).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{Rgb, RgbImage};
use serde_json::Value;

use matvlm::data::synthetic::{generate_world, read_world_split, QuestionMix, WorldRecord};
use matvlm::data::*;
use matvlm::tokenize::{
    phi_prompt, PromptTokenizer, EOS_TEXT, IGNORE_INDEX, IMAGE_TOKEN, PHI_SYSTEM,
};
use matvlm::Error;

/// A scratch folder removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("matvlm-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

fn small_world(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        train: 300,
        val: 60,
        test: 90,
        ..WorldConfig::default()
    }
}

fn write_image(path: &Path, color: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(20, 12, Rgb(color)).save(path).unwrap();
}

// ---------------------------------------------------------------- LLaVA format, TinyLLaVA parity

fn expected_records() -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("sharegpt4v_expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["records"].as_array().unwrap().clone()
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// A folder with an image at every path the ShareGPT4V sample names.
fn sample_image_root(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    for r in expected_records() {
        if let Some(rel) = r["image"].as_str() {
            write_image(&dir.path().join(rel), [200, 30, 30]);
        }
    }
    dir
}

#[test]
fn sharegpt4v_sample_matches_tinyllava_token_layout() {
    let tok = PromptTokenizer::from_file(&fixture("tokenizer.json")).unwrap();
    let root = sample_image_root("parity");
    let (ds, bad) = Dataset::load(
        &fixture("sharegpt4v_sample.json"),
        root.path(),
        &tok,
        3072,
        OnBadRecord::Fail,
    )
    .unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let expected = expected_records();
    assert_eq!(ds.len(), expected.len());

    for (i, exp) in expected.iter().enumerate() {
        let rec = &ds.records[i];
        assert_eq!(rec.index as u64, exp["index"].as_u64().unwrap());
        assert_eq!(rec.id, exp["id"].as_str().unwrap());
        assert_eq!(
            phi_prompt(&rec.turns),
            exp["prompt"].as_str().unwrap(),
            "prompt of record {i}"
        );
        let s = ds.sample(i).unwrap();
        assert_eq!(
            s.input_ids,
            ids_of(&exp["input_ids"]),
            "input ids of record {i}"
        );
        assert_eq!(s.labels, ids_of(&exp["labels"]), "labels of record {i}");
        assert_eq!(s.record, rec.index);
        assert_eq!(s.image.is_some(), exp["image"].is_string());
    }
    // The layout itself: each answer ends with EOS, which is learned; the image is never a label.
    let eos = tok.eos_id() as i64;
    let multi = ds.sample(0).unwrap();
    assert_eq!(
        multi.labels.iter().filter(|&&l| l == eos).count(),
        3,
        "three answers, three EOS"
    );
    assert_eq!(
        multi
            .input_ids
            .iter()
            .filter(|&&t| t == IMAGE_TOKEN)
            .count(),
        1
    );
    // The text-only record (first message from gpt, dropped as upstream) has no image.
    let text_only = ds.records.iter().position(|r| r.image.is_none()).unwrap();
    assert_eq!(ds.records[text_only].turns.len(), 2);
    assert!(!ds
        .sample(text_only)
        .unwrap()
        .input_ids
        .contains(&IMAGE_TOKEN));
}

#[test]
fn truncation_keeps_a_prefix_and_reports_samples_it_would_break() {
    let tok = PromptTokenizer::from_file(&fixture("tokenizer.json")).unwrap();
    let root = sample_image_root("truncate");
    let expected = expected_records();
    for (max_len, image_tokens) in [(120usize, 1usize), (120, 9), (4, 1)] {
        let opts = LoadOptions {
            max_len,
            image_tokens,
            ..LoadOptions::default()
        };
        let (ds, bad) =
            Dataset::load_with(&fixture("sharegpt4v_sample.json"), root.path(), &tok, &opts)
                .unwrap();
        let mut kept = 0;
        for exp in &expected {
            let index = exp["index"].as_u64().unwrap() as usize;
            let ids = ids_of(&exp["input_ids"]);
            let labels = ids_of(&exp["labels"]);
            let image_at = ids.iter().position(|&t| t == IMAGE_TOKEN);
            let extra = image_at.map_or(0, |_| image_tokens - 1);
            let keep = if ids.len() + extra > max_len {
                max_len - extra
            } else {
                ids.len()
            };
            let image_cut =
                image_at.is_some_and(|p| ids.len() + extra > max_len && p + image_tokens > max_len);
            let nothing_to_learn = labels[..keep.min(labels.len())]
                .iter()
                .all(|&l| l == IGNORE_INDEX);
            if image_cut || nothing_to_learn {
                let b = bad.iter().find(|b| b.index == index).expect("reported");
                let word = if image_cut {
                    "image"
                } else {
                    "no answer token"
                };
                assert!(b.reason.contains(word), "record {index}: {}", b.reason);
            } else {
                let i = ds
                    .records
                    .iter()
                    .position(|r| r.index == index)
                    .expect("kept");
                let s = ds.sample(i).unwrap();
                assert_eq!(s.input_ids, ids[..keep].to_vec());
                assert_eq!(s.labels, labels[..keep].to_vec());
                kept += 1;
            }
        }
        assert_eq!(kept, ds.len());
        assert_eq!(kept + bad.len(), expected.len());
        if max_len == 4 {
            assert_eq!(ds.records.iter().filter(|r| r.image.is_some()).count(), 0);
        }
    }
}

/// Writes a data file with one record per kind of problem; returns (folder, json path).
fn bad_data_folder() -> (TempDir, PathBuf) {
    let dir = TempDir::new("bad");
    let root = dir.path();
    write_image(&root.join("img/ok.png"), [10, 200, 10]);
    std::fs::write(
        root.join("img/not_an_image.jpg"),
        "this is text, not a JPEG\n",
    )
    .unwrap();
    // A PNG cut inside its pixel data: passes the header check, fails decoding.
    let mut png = Vec::new();
    RgbImage::from_fn(32, 32, |x, y| {
        Rgb([x as u8 * 7, y as u8 * 5, (x * y) as u8])
    })
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    .unwrap();
    png.truncate(png.len() - 40);
    std::fs::write(root.join("img/truncated.png"), &png).unwrap();

    let q = |v: &str| serde_json::json!({"from": "human", "value": v});
    let a = |v: &str| serde_json::json!({"from": "gpt", "value": v});
    let records = serde_json::json!([
        {"id": "good", "image": "img/ok.png", "conversations": [q("<image>\nWhat colour?"), a("green")]},
        {"id": "missing", "image": "img/nowhere.png", "conversations": [q("<image>\nWhat?"), a("x")]},
        {"id": "malformed", "image": "img/ok.png", "conversations": "<image>\nnot a list"},
        {"id": "notimage", "image": "img/not_an_image.jpg", "conversations": [q("<image>\nWhat?"), a("x")]},
        {"id": "empty", "image": "img/ok.png", "conversations": []},
        {"id": "nomarker", "image": "img/ok.png", "conversations": [q("What?"), a("x")]},
        {"id": "unanswered", "conversations": [q("Hello?"), a("Hi."), q("And?")]},
        {"id": "noimage", "conversations": [q("<image>\nWhat?"), a("x")]},
        42,
        {"id": "roles", "conversations": [q("A?"), q("B?")]},
        {"id": "text", "conversations": [q("Say hi."), a("hi")]},
        {"id": "twomarkers", "image": "img/ok.png", "conversations": [q("<image>\nA?"), a("x"), q("<image>\nB?"), a("y")]},
        {"id": "value", "conversations": [q("A?"), {"from": "gpt", "value": 7}]},
        {"id": "truncated", "image": "img/truncated.png", "conversations": [q("<image>\nWhat?"), a("x")]},
    ]);
    let json = root.join("data.json");
    std::fs::write(&json, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    (dir, json)
}

#[test]
fn bad_records_are_reported_with_their_index() {
    let tok = PromptTokenizer::from_file(&fixture("tokenizer.json")).unwrap();
    let (dir, json) = bad_data_folder();
    // (index, id, a word the reason must contain)
    let expected_bad: &[(usize, Option<&str>, &str)] = &[
        (1, Some("missing"), "not found"),
        (2, Some("malformed"), "conversations"),
        (3, Some("notimage"), "not a readable image"),
        (4, Some("empty"), "no turns"),
        (5, Some("nomarker"), "<image>"),
        (6, Some("unanswered"), "no answer"),
        (7, Some("noimage"), "no image"),
        (8, None, "object"),
        (9, Some("roles"), "\"human\""),
        (11, Some("twomarkers"), "2 `<image>`"),
        (12, Some("value"), "value"),
    ];
    let check = |bad: &[BadRecord], decode: bool| {
        let mut want: Vec<(usize, Option<&str>, &str)> = expected_bad.to_vec();
        if decode {
            want.push((13, Some("truncated"), "not a readable image"));
        }
        assert_eq!(
            bad.iter().map(|b| b.index).collect::<Vec<_>>(),
            want.iter().map(|w| w.0).collect::<Vec<_>>()
        );
        for (b, (index, id, word)) in bad.iter().zip(&want) {
            assert_eq!(b.id.as_deref(), *id, "record {index}");
            assert!(
                b.reason.contains(word),
                "record {index}: {:?} lacks {word:?}",
                b.reason
            );
        }
    };

    // Header check (default): the truncated PNG passes loading but fails when its batch is made.
    let (ds, bad) = Dataset::load(&json, dir.path(), &tok, 512, OnBadRecord::Skip).unwrap();
    check(&bad, false);
    assert_eq!(
        ds.records.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 10, 13]
    );
    assert!(ds.batch(&[0, 1]).is_ok());
    match ds.batch(&[2]) {
        Err(Error::BadImage { path, reason }) => {
            assert!(path.ends_with("img/truncated.png"));
            assert!(reason.contains("record 13"), "{reason}");
        }
        other => panic!("expected a BadImage error, got {other:?}"),
    }

    // Full decode at load time catches it there.
    let opts = LoadOptions {
        max_len: 512,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let (ds, bad) = Dataset::load_with(&json, dir.path(), &tok, &opts).unwrap();
    check(&bad, true);
    assert_eq!(ds.len(), 2);

    // Fail mode: one error listing them all.
    match Dataset::load(&json, dir.path(), &tok, 512, OnBadRecord::Fail) {
        Err(Error::BadRecords {
            path,
            count,
            summary,
        }) => {
            assert_eq!(path, json);
            assert_eq!(count, expected_bad.len());
            assert!(
                summary.starts_with("record 1 (id \"missing\")"),
                "{summary}"
            );
        }
        other => panic!("expected BadRecords, got {other:?}"),
    }
}

#[test]
fn broken_files_are_errors_and_jsonl_lines_are_records() {
    let dir = TempDir::new("files");
    let not_json = dir.path().join("broken.json");
    std::fs::write(&not_json, "[{\"id\": 1,").unwrap();
    assert!(matches!(
        read_llava_json(&not_json),
        Err(Error::BadConfig { .. })
    ));
    let not_array = dir.path().join("object.json");
    std::fs::write(&not_array, "{\"id\": 1}").unwrap();
    assert!(matches!(
        read_llava_json(&not_array),
        Err(Error::BadConfig { .. })
    ));
    assert!(matches!(
        read_llava_json(&dir.path().join("absent.json")),
        Err(Error::Io { .. })
    ));

    let lines = dir.path().join("data.jsonl");
    let good = r#"{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#;
    std::fs::write(
        &lines,
        format!("{good}\n{{\"id\": \"b\", \"conversations\": [\n{good}\n"),
    )
    .unwrap();
    let (records, bad) = read_llava_json(&lines).unwrap();
    assert_eq!(
        records.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].index, 1);
    assert!(bad[0].reason.contains("not valid JSON"));
}

// ---------------------------------------------------------------- loader and batches

fn run(loader: &mut Loader, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|_| loader.next_indices()).collect()
}

#[test]
fn loader_shuffles_per_epoch_deterministically() {
    let mut a = Loader::new(10, 3, 7).unwrap();
    let epoch0 = run(&mut a, 4);
    assert_eq!(
        epoch0.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    let mut seen: Vec<usize> = epoch0.concat();
    assert_ne!(seen, (0..10).collect::<Vec<_>>(), "shuffled");
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<_>>(),
        "each sample once per epoch"
    );
    let epoch1 = run(&mut a, 4);
    assert_ne!(epoch0, epoch1, "a new order each epoch");
    assert_eq!(
        a.state(),
        LoaderState {
            seed: 7,
            epoch: 1,
            position: 10
        }
    );

    let mut same = Loader::new(10, 3, 7).unwrap();
    assert_eq!(run(&mut same, 8), [epoch0.clone(), epoch1].concat());
    let mut other = Loader::new(10, 3, 8).unwrap();
    assert_ne!(run(&mut other, 4), epoch0);

    let mut in_order = Loader::new(10, 4, 7).unwrap().with_shuffle(false);
    assert_eq!(
        run(&mut in_order, 3),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
    let mut full = Loader::new(10, 4, 7).unwrap().with_drop_last(true);
    assert_eq!(full.batches_per_epoch(), 2);
    assert!(run(&mut full, 9).iter().all(|b| b.len() == 4));
    assert!(Loader::new(0, 4, 1).is_err());
    assert!(Loader::new(4, 0, 1).is_err());
}

#[test]
fn loader_resumes_from_a_saved_state() {
    let mut uninterrupted = Loader::new(23, 5, 99).unwrap();
    let all = run(&mut uninterrupted, 20);
    for k in [0, 1, 4, 5, 7, 13] {
        let mut first = Loader::new(23, 5, 99).unwrap();
        run(&mut first, k);
        let saved = serde_json::to_string(&first.state()).unwrap();
        // A fresh loader (even one made with another seed) continues where the first stopped.
        let mut resumed = Loader::new(23, 5, 0).unwrap();
        resumed
            .restore(serde_json::from_str(&saved).unwrap())
            .unwrap();
        assert_eq!(
            run(&mut resumed, 20 - k),
            all[k..].to_vec(),
            "resumed after {k} batches"
        );
    }
    let mut l = Loader::new(23, 5, 99).unwrap();
    let too_far = LoaderState {
        seed: 1,
        epoch: 0,
        position: 24,
    };
    assert!(matches!(l.restore(too_far), Err(Error::Invalid(_))));
}

#[test]
fn batches_pad_mask_and_share_decoded_images() {
    let dir = TempDir::new("batch");
    generate_world(&small_world(3), dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let opts = LoadOptions {
        max_len: 64,
        image_check: ImageCheck::Decode,
        ..LoadOptions::default()
    };
    let (ds, bad) =
        Dataset::load_with(&dir.path().join("train.json"), dir.path(), &tok, &opts).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(ds.len(), 300);
    assert_eq!(
        ds.records[5]
            .question_type
            .as_deref()
            .map(|t| !t.is_empty()),
        Some(true)
    );

    let mut loader = Loader::new(ds.len(), 8, 1).unwrap();
    let indices = loader.next_indices();
    let batch = ds.batch(&indices).unwrap();
    assert_eq!(batch.len(), 8);
    let width = indices
        .iter()
        .map(|&i| ds.sample_len(i).unwrap())
        .max()
        .unwrap();
    assert_eq!(batch.seq_len(), width);
    let mask = batch.attention_mask();
    for (row, &i) in indices.iter().enumerate() {
        let s = ds.sample(i).unwrap();
        let n = s.input_ids.len();
        assert_eq!(batch.lengths[row], n);
        assert_eq!(batch.records[row], s.record);
        assert_eq!(batch.input_ids[row][..n], s.input_ids[..]);
        assert!(batch.input_ids[row][n..]
            .iter()
            .all(|&t| t == tok.eos_id() as i64));
        assert_eq!(batch.labels[row][..n], s.labels[..]);
        assert!(batch.labels[row][n..].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(mask[row].iter().map(|&m| m as usize).sum::<usize>(), n);
        assert_eq!(s.input_ids.iter().filter(|&&t| t == IMAGE_TOKEN).count(), 1);
        let img = batch.images[row].as_ref().unwrap();
        assert_eq!(img.dimensions(), (48, 48));
        // Decoded once: the cache hands out the same pixels.
        assert!(Arc::ptr_eq(img, &ds.image(i).unwrap().unwrap()));
        let on_disk = image::open(s.image.as_ref().unwrap()).unwrap().to_rgb8();
        assert_eq!(**img, on_disk);
    }
    assert!(ds.batch(&[ds.len()]).is_err());
}

#[test]
fn length_grouping_cuts_padding_and_stays_resumable() {
    let dir = TempDir::new("group");
    generate_world(&small_world(4), dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let (ds, _) = Dataset::load(
        &dir.path().join("train.json"),
        dir.path(),
        &tok,
        64,
        OnBadRecord::Fail,
    )
    .unwrap();
    let lengths = ds.lengths();
    let padded = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
            .sum()
    };
    let per_epoch = ds.len().div_ceil(16);
    let plain = run(&mut Loader::new(ds.len(), 16, 9).unwrap(), per_epoch);
    let make = || {
        Loader::new(ds.len(), 16, 9)
            .unwrap()
            .with_length_grouping(lengths.clone(), 4)
            .unwrap()
    };
    let mut grouped_loader = make();
    let grouped = run(&mut grouped_loader, per_epoch);
    let mut seen = grouped.concat();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..ds.len()).collect::<Vec<_>>(),
        "still each sample once per epoch"
    );
    assert!(
        grouped[..per_epoch - 1].iter().all(|b| b.len() == 16),
        "only the last batch is short"
    );
    let real: usize = lengths.iter().sum();
    println!(
        "padded tokens per epoch: {} shuffled, {} grouped, {real} real",
        padded(&plain),
        padded(&grouped)
    );
    assert!(padded(&grouped) < padded(&plain));

    let all = run(&mut make(), 3 * per_epoch);
    let mut first = make();
    run(&mut first, per_epoch + 5);
    let mut resumed = make();
    resumed.restore(first.state()).unwrap();
    assert_eq!(
        run(&mut resumed, 2 * per_epoch - 5),
        all[per_epoch + 5..].to_vec()
    );
    assert!(Loader::new(ds.len(), 16, 9)
        .unwrap()
        .with_length_grouping(vec![1; 3], 4)
        .is_err());
}

// ---------------------------------------------------------------- synthetic world

fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn world_is_byte_identical_from_the_same_seed() {
    let (a, b, c) = (
        TempDir::new("det-a"),
        TempDir::new("det-b"),
        TempDir::new("det-c"),
    );
    let t = std::time::Instant::now();
    let summary = generate_world(&small_world(11), a.path()).unwrap();
    let elapsed = t.elapsed();
    generate_world(&small_world(11), b.path()).unwrap();
    generate_world(&small_world(12), c.path()).unwrap();
    let (fa, fb, fc) = (
        files_under(a.path()),
        files_under(b.path()),
        files_under(c.path()),
    );
    assert_eq!(
        fa.len(),
        300 + 60 + 90 + 5,
        "images + 3 splits + tokenizer + world.json"
    );
    assert!(fa == fb, "same seed, same bytes");
    assert_ne!(fa[Path::new("train.json")], fc[Path::new("train.json")]);
    assert_ne!(
        fa[Path::new("images/000000.png")],
        fc[Path::new("images/000000.png")]
    );
    let written: WorldConfig = serde_json::from_slice(&fa[Path::new("world.json")]).unwrap();
    assert_eq!(written, small_world(11));
    println!("{summary:?}, generated in {elapsed:?}");
}

#[test]
fn world_splits_have_the_configured_sizes_and_balanced_question_types() {
    let dir = TempDir::new("balance");
    let cfg = WorldConfig {
        question_mix: QuestionMix {
            describe: 1.0,
            count: 3.0,
            ..QuestionMix::default()
        },
        ..small_world(5)
    };
    let summary = generate_world(&cfg, dir.path()).unwrap();
    let weights: BTreeMap<&str, f64> = [
        ("color", cfg.question_mix.color),
        ("shape", cfg.question_mix.shape),
        ("count", cfg.question_mix.count),
        ("position", cfg.question_mix.position),
        ("exists", cfg.question_mix.exists),
        ("describe", cfg.question_mix.describe),
    ]
    .into();
    let total: f64 = weights.values().sum();
    for (split, n) in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)] {
        let records = read_world_split(&dir.path().join(format!("{split}.json"))).unwrap();
        assert_eq!(records.len(), n);
        assert_eq!(summary.split_sizes[split], n);
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{split}.json"))).unwrap(),
        )
        .unwrap();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let (mut yes, mut no) = (0, 0);
        for r in raw.as_array().unwrap() {
            let t = r["question_type"].as_str().unwrap().to_string();
            if t == "exists" {
                match r["conversations"][1]["value"].as_str().unwrap() {
                    "yes" => yes += 1,
                    "no" => no += 1,
                    other => panic!("yes/no answer {other:?}"),
                }
            }
            *counts.entry(t).or_default() += 1;
        }
        for (t, w) in &weights {
            let share = w / total * n as f64;
            let got = counts.get(*t).copied().unwrap_or(0) as f64;
            assert!(
                (got - share).abs() < 1.0,
                "{split}: {t} has {got}, expected {share:.2}"
            );
        }
        assert!(
            (yes as i64 - no as i64).abs() <= 1,
            "{split}: {yes} yes vs {no} no"
        );
    }
    assert!(dir
        .path()
        .join("images")
        .join(format!("{:06}.png", cfg.train + cfg.val + cfg.test - 1))
        .is_file());
}

/// Position names of a 3 x 3 grid, written out here independently of the generator.
const POSITIONS: [[&str; 3]; 3] = [
    ["top left", "top middle", "top right"],
    ["middle left", "center", "middle right"],
    ["bottom left", "bottom middle", "bottom right"],
];

#[derive(Debug, Clone)]
struct Obj {
    shape: String,
    color: String,
    pos: &'static str,
    row: u32,
    col: u32,
    x: u32,
    y: u32,
    size: u32,
}

fn objects_of(record: &Value) -> Vec<Obj> {
    record["scene"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let n = |k: &str| o[k].as_u64().unwrap() as u32;
            Obj {
                shape: o["shape"].as_str().unwrap().into(),
                color: o["color"].as_str().unwrap().into(),
                pos: POSITIONS[n("row") as usize][n("col") as usize],
                row: n("row"),
                col: n("col"),
                x: n("x"),
                y: n("y"),
                size: n("size"),
            }
        })
        .collect()
}

fn plural(shape: &str) -> String {
    if shape.ends_with('s') {
        format!("{shape}es")
    } else {
        format!("{shape}s")
    }
}

fn count_word(n: usize) -> &'static str {
    [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ][n]
}

/// The answer to `question` about `objs`, worked out from the scene metadata alone.
fn derive_answer(question: &str, objs: &[Obj]) -> String {
    let one = |f: &dyn Fn(&Obj) -> bool| -> Obj {
        let found: Vec<&Obj> = objs.iter().filter(|o| f(o)).collect();
        assert_eq!(
            found.len(),
            1,
            "{question:?} must name exactly one object of {objs:?}"
        );
        found[0].clone()
    };
    let q = question
        .strip_suffix('?')
        .or_else(|| question.strip_suffix('.'))
        .unwrap();
    if let Some(p) = q.strip_prefix("What color is the object at the ") {
        return one(&|o| o.pos == p).color;
    }
    if let Some(s) = q.strip_prefix("What color is the ") {
        return one(&|o| o.shape == s).color;
    }
    if let Some(p) = q.strip_prefix("What shape is the object at the ") {
        return one(&|o| o.pos == p).shape;
    }
    if let Some(c) = q
        .strip_prefix("What shape is the ")
        .and_then(|r| r.strip_suffix(" object"))
    {
        return one(&|o| o.color == c).shape;
    }
    if q == "How many objects are there" {
        return count_word(objs.len()).into();
    }
    if let Some(what) = q
        .strip_prefix("How many ")
        .and_then(|r| r.strip_suffix(" are there"))
    {
        let n = match what.strip_suffix(" objects") {
            Some(c) => objs.iter().filter(|o| o.color == c).count(),
            None => objs.iter().filter(|o| plural(&o.shape) == what).count(),
        };
        return count_word(n).into();
    }
    if let Some(cs) = q.strip_prefix("Where is the ") {
        let (c, s) = cs.split_once(' ').unwrap();
        return one(&|o| o.color == c && o.shape == s).pos.into();
    }
    if let Some(cs) = q
        .strip_prefix("Is there a ")
        .or_else(|| q.strip_prefix("Is there an "))
    {
        let (c, s) = cs.split_once(' ').unwrap();
        let n = objs.iter().filter(|o| o.color == c && o.shape == s).count();
        return if n > 0 { "yes" } else { "no" }.into();
    }
    if q == "Describe the image in one sentence" {
        let mut sorted = objs.to_vec();
        sorted.sort_by_key(|o| (o.row, o.col));
        let parts: Vec<String> = sorted
            .iter()
            .map(|o| {
                let art = if "aeiou".contains(&o.color[..1]) {
                    "an"
                } else {
                    "a"
                };
                format!("{art} {} {} at the {}", o.color, o.shape, o.pos)
            })
            .collect();
        let body = match parts.len() {
            1 => parts[0].clone(),
            n => format!("{} and {}", parts[..n - 1].join(", "), parts[n - 1]),
        };
        return format!("{body}.");
    }
    panic!("unknown question {question:?}");
}

/// Checks that what is drawn is what the scene says: each object's box holds one colour in the
/// silhouette of its shape, everything else is background.
fn check_pixels(
    img: &RgbImage,
    objs: &[Obj],
    cell: u32,
    background: [u8; 3],
    palette: &mut HashMap<String, [u8; 3]>,
) {
    let bg = Rgb(background);
    let inside = |x: u32, y: u32| {
        objs.iter()
            .any(|o| x >= o.x && x < o.x + o.size && y >= o.y && y < o.y + o.size)
    };
    for (x, y, p) in img.enumerate_pixels() {
        if !inside(x, y) {
            assert_eq!(*p, bg, "pixel ({x},{y}) outside every object");
        }
    }
    for o in objs {
        assert!(
            o.x >= o.col * cell && o.x + o.size <= (o.col + 1) * cell,
            "{o:?} leaves its cell"
        );
        assert!(
            o.y >= o.row * cell && o.y + o.size <= (o.row + 1) * cell,
            "{o:?} leaves its cell"
        );
        let at = |dx: u32, dy: u32| *img.get_pixel(o.x + dx, o.y + dy);
        let c = at(o.size / 2, o.size / 2);
        assert_ne!(c, bg, "{o:?}: nothing drawn at its centre");
        // A colour name always means the same RGB, and two names never share one.
        let known = *palette.entry(o.color.clone()).or_insert(c.0);
        assert_eq!(known, c.0, "{} drawn in two ways", o.color);
        let row_fill = |dy: u32| (0..o.size).filter(|&dx| at(dx, dy) == c).count();
        let s = o.size as usize;
        let (top, mid, bottom) = (row_fill(0), row_fill(o.size / 2), row_fill(o.size - 1));
        let corner = at(0, 0) == c;
        match o.shape.as_str() {
            "square" => assert!(top == s && bottom == s && corner, "{o:?}"),
            "circle" => assert!(
                !corner && mid == s && top < s / 2 && bottom < s / 2,
                "{o:?}"
            ),
            "triangle" => assert!(!corner && top <= 2 && bottom >= s - 1, "{o:?}"),
            "cross" => assert!(
                !corner && mid == s && top >= 3 && top < s / 2 && bottom == top,
                "{o:?}"
            ),
            other => panic!("unknown shape {other}"),
        }
        for dy in 0..o.size {
            for dx in 0..o.size {
                let p = at(dx, dy);
                assert!(p == c || p == bg, "{o:?}: stray colour {p:?}");
            }
        }
    }
}

#[test]
fn every_answer_follows_from_what_is_drawn() {
    let dir = TempDir::new("answers");
    let cfg = small_world(21);
    generate_world(&cfg, dir.path()).unwrap();
    let mut palette = HashMap::new();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for split in ["train", "val", "test"] {
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{split}.json"))).unwrap(),
        )
        .unwrap();
        for r in raw.as_array().unwrap() {
            let conv = r["conversations"].as_array().unwrap();
            assert_eq!(conv.len(), 2);
            assert_eq!(conv[0]["from"], "human");
            assert_eq!(conv[1]["from"], "gpt");
            let question = conv[0]["value"]
                .as_str()
                .unwrap()
                .strip_prefix("<image>\n")
                .unwrap();
            let answer = conv[1]["value"].as_str().unwrap();
            let objs = objects_of(r);
            assert!((cfg.min_objects..=cfg.max_objects).contains(&objs.len()));
            assert_eq!(
                derive_answer(question, &objs),
                answer,
                "{} {question:?}",
                r["id"]
            );
            if r["question_type"] == "count" && question == "How many objects are there?" {
                assert_eq!(answer, count_word(objs.len()));
            }
            let img = image::open(dir.path().join(r["image"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            assert_eq!(img.dimensions(), (cfg.image_size, cfg.image_size));
            check_pixels(&img, &objs, cfg.cell_px(), cfg.background, &mut palette);
            *by_type
                .entry(r["question_type"].as_str().unwrap().into())
                .or_default() += 1;
        }
    }
    assert_eq!(by_type.len(), 6, "{by_type:?}");
    let mut colours: Vec<[u8; 3]> = palette.values().copied().collect();
    colours.sort_unstable();
    colours.dedup();
    assert_eq!(
        colours.len(),
        palette.len(),
        "distinct colour names, distinct RGB: {palette:?}"
    );
}

#[test]
fn the_image_is_needed_to_answer() {
    // A model that ignores the image can at best answer each question with its most frequent
    // answer in training; measure that on the test split (the bar asks for <= 35%).
    let dir = TempDir::new("blind");
    let cfg = WorldConfig {
        train: 4000,
        val: 0,
        test: 1000,
        ..WorldConfig::default()
    };
    generate_world(&cfg, dir.path()).unwrap();
    let train: Vec<WorldRecord> = read_world_split(&dir.path().join("train.json")).unwrap();
    let test: Vec<WorldRecord> = read_world_split(&dir.path().join("test.json")).unwrap();
    let mut answers: HashMap<&str, HashMap<&str, usize>> = HashMap::new();
    for r in &train {
        *answers
            .entry(r.question())
            .or_default()
            .entry(r.answer())
            .or_default() += 1;
    }
    let guess = |q: &str| -> Option<&str> {
        let counts = answers.get(q)?;
        counts
            .iter()
            .max_by_key(|(a, n)| (**n, std::cmp::Reverse(**a)))
            .map(|(a, _)| *a)
    };
    let right = test
        .iter()
        .filter(|r| guess(r.question()) == Some(r.answer()))
        .count();
    let blind = right as f64 / test.len() as f64;
    println!("blind (question-only) accuracy on test: {blind:.3}");
    assert!(
        blind <= 0.35,
        "the world can be answered without looking: {blind:.3}"
    );
    assert!(
        blind > 0.05,
        "suspiciously low, the answer priors should give something: {blind:.3}"
    );
}

#[test]
fn world_tokenizer_round_trips_and_has_phi_eos() {
    let dir = TempDir::new("tok");
    let cfg = small_world(2);
    let summary = generate_world(&cfg, dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(Some(tok.eos_id()), tok.inner().token_to_id(EOS_TEXT));
    assert_eq!(summary.eos_id, tok.eos_id());
    assert_eq!(summary.vocab_size, tok.vocab_size());
    assert!(tok.vocab_size() <= cfg.vocab_size + 1);
    assert_eq!(tok.encode_text(EOS_TEXT).unwrap(), vec![tok.eos_id()]);
    // The system prompt, the same in every sample, is a single token.
    assert_eq!(tok.encode_text(PHI_SYSTEM).unwrap().len(), 1);

    let records = read_world_split(&dir.path().join("test.json")).unwrap();
    for r in &records {
        let text = format!(
            "{} USER: {} ASSISTANT: {}",
            PHI_SYSTEM,
            r.question(),
            r.answer()
        );
        let ids = tok.encode_text(&text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Every word of the world is one token (with its leading space; a question's first word
        // follows the newline after `<image>`, so it is only ever seen without one).
        for word in r.question().split(' ').skip(1).chain(r.answer().split(' ')) {
            let word = word.trim_end_matches(['?', '.', ',']);
            assert_eq!(
                tok.encode_text(&format!(" {word}")).unwrap().len(),
                1,
                "{word:?}"
            );
        }
    }
    // Text from outside the world still encodes (byte-level), and decodes back.
    let foreign = "Caf\u{e9} \u{1F415} — 42 ZZZ\n\ttabs";
    assert_eq!(
        tok.decode(&tok.encode_text(foreign).unwrap()).unwrap(),
        foreign
    );
    // EOS is special: decoding skips it.
    let mut ids = tok.encode_text("yes").unwrap();
    ids.push(tok.eos_id());
    assert_eq!(tok.decode(&ids).unwrap(), "yes");

    // Typical length with the phi template: the ids the trainer sees (image placeholder = 1).
    println!(
        "world tokens per sample: mean {:.1}, max {}",
        summary.mean_tokens, summary.max_tokens
    );
    assert!(
        summary.mean_tokens < 30.0 && summary.max_tokens < 48,
        "{summary:?}"
    );

    // Without the one-token system prompt the BPE still makes each of its words one token.
    let plain = train_world_tokenizer(
        [format!(
            "{PHI_SYSTEM} USER: What color is the circle? ASSISTANT: red"
        )],
        cfg.vocab_size,
        &[],
    )
    .unwrap();
    let sys = plain.encode(PHI_SYSTEM, false).unwrap();
    let pre_tokens = PHI_SYSTEM.split(' ').count() + PHI_SYSTEM.matches([',', '.', '\'']).count();
    assert_eq!(sys.get_ids().len(), pre_tokens, "{:?}", sys.get_tokens());
}

#[test]
fn ensure_world_generates_only_when_needed() {
    let dir = TempDir::new("ensure");
    let cfg = WorldConfig {
        train: 40,
        val: 10,
        test: 10,
        ..WorldConfig::default()
    };
    let world = dir.path().join("w");
    ensure_world(&world, &cfg).unwrap();
    let train = world.join("train.json");
    let original = std::fs::read(&train).unwrap();
    // A marker shows whether a second call rewrote the files.
    std::fs::write(&train, b"[]").unwrap();
    ensure_world(&world, &cfg).unwrap();
    assert_eq!(
        std::fs::read(&train).unwrap(),
        b"[]",
        "same config: left alone"
    );

    let other = WorldConfig {
        seed: 1,
        ..cfg.clone()
    };
    ensure_world(&world, &other).unwrap();
    let regenerated = std::fs::read(&train).unwrap();
    assert_ne!(regenerated, b"[]");
    assert_ne!(regenerated, original);
    let written: WorldConfig =
        serde_json::from_str(&std::fs::read_to_string(world.join("world.json")).unwrap()).unwrap();
    assert_eq!(written, other);

    // An incomplete world (interrupted generation) is made again.
    std::fs::remove_file(world.join("tokenizer.json")).unwrap();
    ensure_world(&world, &other).unwrap();
    assert!(world.join("tokenizer.json").is_file());
    assert_eq!(std::fs::read(&train).unwrap(), regenerated);

    let bad = WorldConfig { grid: 5, ..cfg };
    assert!(matches!(ensure_world(&world, &bad), Err(Error::Invalid(_))));
}

#[test]
fn answers_normalise_for_exact_match() {
    assert_eq!(normalize_answer("  Top   Left. "), "top left");
    assert_eq!(normalize_answer("Yes!"), "yes");
    assert_eq!(
        normalize_answer("A red circle at the top left, and a blue square."),
        "a red circle at the top left and a blue square"
    );
}
