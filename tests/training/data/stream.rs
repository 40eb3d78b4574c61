//! The lazy LLaVA stream: records read on demand equal the eager reader's, batches prepared on
//! worker threads equal the eager source's batch for batch, resume continues exactly, bad
//! records are skipped and counted.

use super::*;
use candle_core::Device;
use matvlm::image::ImagePreprocessor;
use matvlm::train::supervised::SupervisedSource;
use matvlm::train::{BatchSource, Resumable};

/// Every record of a file full of awkward JSON (braces, brackets and escaped quotes inside
/// strings, nested arrays, non-object elements, pretty and compact layouts, JSON Lines) reads
/// as the eager reader reads it, with the same index, or fails as it fails.
#[test]
fn lazy_records_equal_the_eager_reader() {
    let (dir, json) = super::llava::bad_data_folder();
    let tricky = serde_json::json!([
        {"id": "brace{", "conversations": [
            {"from": "human", "value": "a \"quoted\" ] and } and \\ backslash"},
            {"from": "gpt", "value": "[{ok}]"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
         "extra": [[1, 2], {"k": [3]}]},
        "a string element",
        {"id": "last", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    ]);
    let compact = dir.path().join("compact.json");
    std::fs::write(&compact, serde_json::to_string(&tricky).unwrap()).unwrap();
    let lines = dir.path().join("lines.jsonl");
    let jsonl: Vec<String> = tricky
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    std::fs::write(&lines, format!("{}\n\n", jsonl.join("\n"))).unwrap();
    for file in [json, compact, lines] {
        let (records, bad) = read_llava_json(&file).unwrap();
        let lazy = LazyLlava::open(&file, dir.path()).unwrap();
        assert_eq!(lazy.len(), records.len() + bad.len(), "{}", file.display());
        for r in &records {
            assert_eq!(&lazy.record(r.index).unwrap().unwrap(), r);
        }
        for b in &bad {
            let reason = lazy.record(b.index).unwrap().unwrap_err();
            assert_eq!(reason, b.reason, "record {} of {}", b.index, file.display());
        }
        assert!(lazy.record(lazy.len()).is_err());
    }
    let cut = dir.path().join("cut.json");
    std::fs::write(&cut, &serde_json::to_string(&tricky).unwrap()[..40]).unwrap();
    assert!(LazyLlava::open(&cut, dir.path()).is_err());
}

fn stream_opts(workers: usize, image_tokens: usize) -> StreamOptions {
    StreamOptions {
        workers,
        prefetch: 3,
        load: LoadOptions {
            max_len: 64,
            on_bad: OnBadRecord::Fail,
            ..LoadOptions::default()
        },
        image_tokens,
    }
}

/// On a generated world, 1 or 3 workers hand out exactly the eager source's batches (rows,
/// lengths, labels, token counts, pixels bit for bit); a stream restored from the state after
/// batch 2 continues with batch 3.
#[test]
fn stream_batches_equal_the_eager_source_and_resume() {
    let dir = scratch("stream");
    generate_world(&small_world(5), dir.path()).unwrap();
    let tok = PromptTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let json = dir.path().join("train.json");
    let (ds, bad) = Dataset::load(&json, dir.path(), &tok, 64, OnBadRecord::Fail).unwrap();
    assert!(bad.is_empty());
    let pre = ImagePreprocessor::siglip(32);
    let image_tokens = 5;
    let mut eager = SupervisedSource::new(
        Arc::new(ds),
        Loader::new(300, 8, 3).unwrap(),
        pre.clone(),
        image_tokens,
        Device::Cpu,
    );
    let expected: Vec<SupervisedBatch> = (0..6)
        .map(|_| eager.next_batch().unwrap().unwrap())
        .collect();
    let lazy = Arc::new(LazyLlava::open(&json, dir.path()).unwrap());
    let tok = Arc::new(tok);
    let open = |workers| {
        LlavaStream::new(
            lazy.clone(),
            Loader::new(300, 8, 3).unwrap(),
            tok.clone(),
            pre.clone(),
            stream_opts(workers, image_tokens),
            Device::Cpu,
        )
        .unwrap()
    };
    let same = |a: &SupervisedBatch, b: &SupervisedBatch| {
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.rows, b.rows);
        assert_eq!(a.lengths, b.lengths);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.tokens, b.tokens);
        let pixels = |x: &SupervisedBatch| -> Vec<u32> {
            let t = x.pixel_values.as_ref().unwrap().flatten_all().unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(pixels(a), pixels(b));
    };
    let mut state = None;
    for workers in [1, 3] {
        let mut stream = open(workers);
        for (k, want) in expected.iter().enumerate() {
            same(&stream.next_batch().unwrap(), want);
            if k == 2 {
                state = Some(Resumable::state(&stream));
            }
        }
        assert_eq!(stream.skipped(), 0);
    }
    let mut resumed = open(2);
    // Batches dealt before the restore are forgotten.
    resumed.next_batch().unwrap();
    Resumable::restore(&mut resumed, state.as_ref().unwrap()).unwrap();
    for want in &expected[3..] {
        same(
            &BatchSource::next_batch(&mut resumed).unwrap().unwrap(),
            want,
        );
    }
}

/// Bad records are left out of their batch and counted (Skip), or fail the batch naming the
/// record (Fail).
#[test]
fn unusable_records_are_skipped_or_fail() {
    let (dir, json) = super::llava::bad_data_folder();
    let tok = Arc::new(PromptTokenizer::from_file(&fixture("tokenizer.json")).unwrap());
    let lazy = Arc::new(LazyLlava::open(&json, dir.path()).unwrap());
    let n = lazy.len();
    let open = |on_bad| {
        let mut opts = stream_opts(2, 4);
        opts.load.on_bad = on_bad;
        LlavaStream::new(
            lazy.clone(),
            Loader::new(n, n, 0).unwrap().with_shuffle(false),
            tok.clone(),
            ImagePreprocessor::siglip(16),
            opts,
            Device::Cpu,
        )
        .unwrap()
    };
    let mut skip = open(OnBadRecord::Skip);
    let batch = skip.next_batch().unwrap();
    let (records, _) = read_llava_json(&json).unwrap();
    // Usable: structurally fine records whose image decodes (or that have none).
    let usable: Vec<usize> = records
        .iter()
        .filter(|r| !matches!(r.id.as_str(), "missing" | "notimage" | "truncated"))
        .map(|r| r.index)
        .collect();
    assert_eq!(batch.indices, usable);
    assert_eq!(skip.skipped(), n - usable.len());
    let err = open(OnBadRecord::Fail)
        .next_batch()
        .unwrap_err()
        .to_string();
    assert!(err.contains("record 1"), "{err}");
}
