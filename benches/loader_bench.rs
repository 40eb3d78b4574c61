//! The lazy LLaVA loader ([`matvlm::data::LlavaStream`]): samples/s with 1..N worker threads
//! on a generated LLaVA-format data set whose every record has its own JPEG (ShareGPT4V-like:
//! 640x480 photos-sized images, a long caption as the answer), preprocessed for SigLIP-384.
//!
//! `cargo bench --bench loader_bench -- [options]`; one JSON object per line on stdout (also
//! appended to `--out FILE`): `env` (cores, data set), then per worker count `loader` with
//! `samples_per_s`, `samples_per_s_per_worker`, `batches_per_s` and the time to the first
//! batch. A GPU step at batch `B` taking `s` seconds needs `B / s` samples/s from the loader.
//!
//! Options: `--records 256`, `--workers 1,2`, `--batch 8`, `--batches 24` (timed, after the
//! first), `--prefetch 4`, `--size 640x480`, `--dir DIR` (keep / reuse the generated data;
//! default a temporary folder), `--tokenizer FILE` (default the tiny teacher's), `--out FILE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use image::{Rgb, RgbImage};
use matvlm::data::{LazyLlava, LlavaStream, LoadOptions, Loader, OnBadRecord, StreamOptions};
use matvlm::image::ImagePreprocessor;
use matvlm::tokenize::PromptTokenizer;
use serde_json::{json, Value};

#[path = "common/cli.rs"]
mod cli;

const CLI: cli::Cli = cli::Cli {
    bench: "loader_bench",
};

struct Args {
    records: usize,
    workers: Vec<usize>,
    batch: usize,
    batches: usize,
    prefetch: usize,
    size: (u32, u32),
    dir: Option<PathBuf>,
    tokenizer: PathBuf,
    out: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        records: 256,
        workers: vec![1, 2],
        batch: 8,
        batches: 24,
        prefetch: 4,
        size: (640, 480),
        dir: None,
        tokenizer: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("assets/tiny-teacher/tokenizer.json"),
        out: None,
    };
    for (flag, v) in CLI.args(&[]) {
        let v = v.unwrap_or_default();
        match flag.as_str() {
            "--records" => a.records = CLI.num(&flag, &v),
            "--workers" => a.workers = CLI.list(&flag, &v),
            "--batch" => a.batch = CLI.num(&flag, &v),
            "--batches" => a.batches = CLI.num(&flag, &v),
            "--prefetch" => a.prefetch = CLI.num(&flag, &v),
            "--size" => {
                let (w, h) = v
                    .split_once('x')
                    .unwrap_or_else(|| CLI.usage("--size: WxH, e.g. 640x480"));
                a.size = (CLI.num(&flag, w), CLI.num(&flag, h));
            }
            "--dir" => a.dir = Some(v.into()),
            "--tokenizer" => a.tokenizer = v.into(),
            "--out" => a.out = Some(v.into()),
            other => CLI.usage(&format!("unknown option {other}")),
        }
    }
    a
}

/// A photo-like picture: smooth colour fields, edges and noise (JPEG decoding time depends on
/// the content; a flat image would decode unrealistically fast).
fn picture(i: usize, (w, h): (u32, u32)) -> RgbImage {
    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 48) as i32 - 24
    };
    RgbImage::from_fn(w, h, |x, y| {
        let cell = ((x / 37 + y / 29 + i as u32) % 5) as i32 * 30;
        let mut px = |base: i32| (base + noise()).clamp(0, 255) as u8;
        Rgb([
            px((x * 255 / w) as i32 / 2 + cell),
            px((y * 255 / h) as i32 / 2 + 60),
            px(200 - cell),
        ])
    })
}

/// The data set: `data.json` and one JPEG per record under `dir`, unless already there.
fn generate(dir: &Path, records: usize, size: (u32, u32)) -> PathBuf {
    let json = dir.join("data.json");
    if json.exists() {
        return json;
    }
    std::fs::create_dir_all(dir.join("images")).unwrap_or_else(|e| CLI.usage(&e.to_string()));
    let words = [
        "the", "image", "shows", "a", "red", "bus", "parked", "near", "tall", "building", "with",
        "people", "walking", "on", "sidewalk", "under", "cloudy", "sky", "and", "trees",
    ];
    let mut items = Vec::with_capacity(records);
    for i in 0..records {
        let rel = format!("images/{i:06}.jpg");
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(dir.join(&rel)).unwrap_or_else(|e| CLI.usage(&e.to_string())),
        );
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 90)
            .encode_image(&picture(i, size))
            .unwrap_or_else(|e| CLI.usage(&e.to_string()));
        // About 150 words, a ShareGPT4V caption's length.
        let answer: Vec<&str> = (0..150)
            .map(|k| words[(i * 7 + k * 3) % words.len()])
            .collect();
        items.push(json!({
            "id": format!("{i:06}"),
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe this image in detail."},
                {"from": "gpt", "value": answer.join(" ")},
            ],
        }));
    }
    std::fs::write(
        &json,
        serde_json::to_vec(&Value::Array(items)).unwrap_or_default(),
    )
    .unwrap_or_else(|e| CLI.usage(&e.to_string()));
    json
}

fn main() -> matvlm::Result<()> {
    let args = parse_args();
    let tmp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().unwrap_or_else(|e| CLI.usage(&e.to_string()));
            tmp.path().to_path_buf()
        }
    };
    let mut out = CLI.output(args.out.as_deref());
    let mut emit = |v: Value| out.emit(&v);
    let t0 = Instant::now();
    let json_path = generate(&dir, args.records, args.size);
    let generate_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let data = Arc::new(LazyLlava::open(&json_path, &dir)?);
    let index_s = t0.elapsed().as_secs_f64();
    let tok = Arc::new(PromptTokenizer::from_file(&args.tokenizer)?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    emit(json!({
        "record": "env", "cores": cores, "records": data.len(), "size": [args.size.0, args.size.1],
        "batch": args.batch, "prefetch": args.prefetch, "generate_s": generate_s, "index_s": index_s,
    }));
    for &workers in &args.workers {
        let loader = Loader::new(data.len(), args.batch, 0)?;
        let opts = StreamOptions {
            workers,
            prefetch: args.prefetch,
            load: LoadOptions {
                max_len: 2048,
                on_bad: OnBadRecord::Fail,
                ..LoadOptions::default()
            },
            image_tokens: 729,
        };
        let t0 = Instant::now();
        let mut stream = LlavaStream::new(
            data.clone(),
            loader,
            tok.clone(),
            ImagePreprocessor::siglip(384),
            opts,
            Device::Cpu,
        )?;
        stream.next_batch()?;
        let first_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut samples = 0;
        for _ in 0..args.batches {
            samples += stream.next_batch()?.rows.len();
        }
        let s = t0.elapsed().as_secs_f64();
        let rate = samples as f64 / s;
        emit(json!({
            "record": "loader", "workers": workers, "samples": samples, "seconds": s,
            "samples_per_s": rate, "samples_per_s_per_worker": rate / workers as f64,
            "batches_per_s": args.batches as f64 / s, "first_batch_s": first_s,
        }));
    }
    Ok(())
}
