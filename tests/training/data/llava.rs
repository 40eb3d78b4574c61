//! The LLaVA format: TinyLLaVA parity, truncation, bad records, broken files.

use super::*;

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
fn sample_image_root(name: &str) -> tempfile::TempDir {
    let dir = scratch(name);
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
pub(super) fn bad_data_folder() -> (tempfile::TempDir, PathBuf) {
    let dir = scratch("bad");
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
    let dir = scratch("files");
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
