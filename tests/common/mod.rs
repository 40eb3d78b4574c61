//! Helpers shared by the integration test binaries (parity, training, app): fixture paths and
//! models, tensor comparisons, small generated worlds, script engines, the `matrepl` binary,
//! figure checks. Each binary uses a part of them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rhai::{Dynamic, Engine, EvalAltResult, Scope};

pub fn fixture(area: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(area)
}

/// The fixture teacher (tests/fixtures/teacher: TinyLLaVA layout, made by HF transformers), f32
/// on the CPU.
pub fn teacher() -> matvlm::model::vlm::Vlm {
    matvlm::model::vlm::Vlm::load(
        fixture("teacher").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Decode a PNG file with the `image` crate; it must not be blank. Returns its size.
pub fn check_png(path: &Path) -> (u32, u32) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} is not a valid PNG: {e}", path.display()))
        .to_rgb8();
    let first = *img.get_pixel(0, 0);
    let distinct = img.pixels().filter(|p| **p != first).count();
    assert!(
        distinct > (img.width() * img.height() / 50) as usize,
        "{} is nearly blank",
        path.display()
    );
    img.dimensions()
}

/// An SVG file: one `<svg>` element holding `must_contain`.
pub fn check_svg(path: &Path, must_contain: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.trim_start().starts_with("<svg"), "{}", path.display());
    assert!(text.trim_end().ends_with("</svg>"), "{}", path.display());
    assert!(
        text.contains(must_contain),
        "{} lacks {must_contain:?}",
        path.display()
    );
}

pub fn reference(area: &str, file: &str) -> HashMap<String, Tensor> {
    matvlm::checkpoint::load_safetensors(&fixture(area).join(file), &Device::Cpu)
        .expect("reference tensors")
}

pub fn reference_json(area: &str, file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(area).join(file)).expect("reference json");
    serde_json::from_str(&text).expect("valid json")
}

/// `max |a - b|` over all elements, computed in f64 (so that f64 results compare at f64
/// precision, and f32 or half ones exactly).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Token ids as a `[1, n]` u32 tensor (a batch of one), as the decoder embeds them.
pub fn ids_tensor(ids: &[i64]) -> Tensor {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Greedy decoding of `steps` tokens after `prompt` through `dec`'s cache (prefill, then one
/// token a step), asserting at every step that the cached logits of the last position equal a
/// full recomputation over the whole sequence (within 1e-5). Returns the generated ids and the
/// cache, which then holds every token but the last generated one.
pub fn greedy_decode_checked(
    dec: &matvlm::model::decoder::Decoder,
    prompt: &[i64],
    steps: usize,
) -> (Vec<i64>, matvlm::model::cache::Cache) {
    use matvlm::model::decoder::{Capture, Captured};
    let mut ids = prompt.to_vec();
    let mut cache = dec.new_cache();
    let mut input = dec.embed(&ids_tensor(&ids)).unwrap();
    let mut generated = Vec::new();
    for _ in 0..steps {
        let logits = dec
            .forward(&input, &mut cache, &Capture::none(), &mut Captured::new())
            .unwrap();
        let last = logits
            .get(0)
            .unwrap()
            .get(logits.dim(1).unwrap() - 1)
            .unwrap();
        let full = dec
            .forward(
                &dec.embed(&ids_tensor(&ids)).unwrap(),
                &mut dec.new_cache(),
                &Capture::none(),
                &mut Captured::new(),
            )
            .unwrap();
        let full_last = full.get(0).unwrap().get(ids.len() - 1).unwrap();
        let diff = max_abs_diff(&last, &full_last);
        assert!(
            diff <= 1e-5,
            "step {}: cached logits differ from recomputation by {diff}",
            generated.len()
        );
        let next = last.argmax(0).unwrap().to_scalar::<u32>().unwrap() as i64;
        generated.push(next);
        ids.push(next);
        input = dec.embed(&ids_tensor(&[next])).unwrap();
    }
    (generated, cache)
}

pub fn ids_i64(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

pub fn json_i64s(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

/// Copy a fixture folder into a fresh temporary folder that tests may damage.
pub fn scratch_copy(area: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(area)).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// Generate a small synthetic world into `dir` (default layout: 48 px, 3 x 3 grid) with the given
/// seed and split sizes; returns the world's own tokenizer.
pub fn small_world(
    dir: &Path,
    seed: u64,
    (train, val, test): (usize, usize, usize),
) -> matvlm::tokenize::PromptTokenizer {
    let cfg = matvlm::data::WorldConfig {
        seed,
        train,
        val,
        test,
        vocab_size: 400,
        ..matvlm::data::WorldConfig::default()
    };
    matvlm::data::generate_world(&cfg, dir).unwrap();
    matvlm::tokenize::PromptTokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
}

/// One split of a world made by [`small_world`], images decoded and cached.
pub fn load_split(
    dir: &Path,
    split: &str,
    tok: &matvlm::tokenize::PromptTokenizer,
    image_tokens: usize,
) -> std::sync::Arc<matvlm::data::Dataset> {
    let opts = matvlm::data::LoadOptions {
        max_len: 256,
        on_bad: matvlm::data::OnBadRecord::Fail,
        image_check: matvlm::data::ImageCheck::Decode,
        image_tokens,
        cache_images: true,
    };
    let path = dir.join(format!("{split}.json"));
    std::sync::Arc::new(
        matvlm::data::Dataset::load_with(&path, dir, tok, &opts)
            .unwrap()
            .0,
    )
}

/// The elements of a rhai array of strings.
pub fn strings(v: Dynamic) -> Vec<String> {
    v.into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.into_string().unwrap())
        .collect()
}

/// `TEACHER` (the fixture teacher's folder) and `IMAGE` (its test image): the constants scripts
/// in the tests use to reach the fixture.
pub fn teacher_constants() -> Vec<(&'static str, String)> {
    let dir = fixture("teacher");
    vec![
        ("TEACHER", dir.display().to_string()),
        ("IMAGE", dir.join("test_image.png").display().to_string()),
    ]
}

/// Evaluate `code` with `engine` in a fresh scope holding the string `constants`.
pub fn eval_with_constants(
    engine: &Engine,
    constants: &[(&str, String)],
    code: &str,
) -> Result<Dynamic, Box<EvalAltResult>> {
    let mut scope = Scope::new();
    for (name, value) in constants {
        scope.push_constant(*name, value.clone());
    }
    engine.eval_with_scope::<Dynamic>(&mut scope, code)
}

/// The `matrepl` binary of this build, told where the checkout's assets are: it finds them from
/// its working directory or its own location, and neither is in the checkout when a test runs it
/// in a temporary folder from a target directory elsewhere (`CARGO_TARGET_DIR`).
pub fn matrepl_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrepl"));
    cmd.env(
        "MATVLM_ASSETS",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"),
    );
    cmd
}

// ---------------------------------------------------------------------------------------------
// `matrepl serve`: models, questions and an HTTP client for the server tests.

/// The embedded tiny teacher (f32, CPU) and its 0.25 hybrid initialised from attention, as the
/// server serves them: `tiny-teacher` and `tiny-hybrid`.
pub fn served_tiny_models() -> Vec<matvlm::serve::ServedModel> {
    use std::sync::Arc;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-teacher");
    let teacher =
        matvlm::model::vlm::Vlm::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let hybrid = teacher
        .hybrid(&matvlm::model::hybrid::HybridSpec::ratio(0.25))
        .unwrap();
    vec![
        matvlm::serve::ServedModel::new("tiny-teacher", Arc::new(teacher)),
        matvlm::serve::ServedModel::new("tiny-hybrid", Arc::new(hybrid)),
    ]
}

/// A question about an image of the synthetic world.
#[derive(Debug, Clone)]
pub struct WorldQuestion {
    pub question: String,
    pub image: PathBuf,
    /// The world's reference answer.
    pub answer: String,
}

/// `n` test questions of a small generated world (in `dir`), each about its own image, all about
/// scenes of compositions the tiny teacher's training shows (the world holds the teacher's
/// compositions out, and only its seen records are taken): a retrained teacher answers them as
/// well as its test split's seen part, whatever it makes of held-out compositions.
pub fn world_questions(dir: &Path, n: usize) -> Vec<WorldQuestion> {
    let base = matvlm::data::WorldConfig::default();
    let cfg = matvlm::data::WorldConfig {
        seed: 7,
        train: 1,
        val: 1,
        test: 4 * n,
        vocab_size: 400,
        holdout: Some(matvlm::teacher::teacher_holdout(&base)),
        ..base
    };
    matvlm::data::generate_world(&cfg, dir).unwrap();
    let text = std::fs::read_to_string(dir.join("test.json")).unwrap();
    let records: Vec<matvlm::data::WorldRecord> = serde_json::from_str(&text).unwrap();
    let seen: Vec<&matvlm::data::WorldRecord> = records
        .iter()
        .filter(|r| r.composition == Some(matvlm::data::Composition::Seen))
        .take(n)
        .collect();
    assert_eq!(seen.len(), n, "{n} seen questions among {}", records.len());
    seen.into_iter()
        .map(|r| WorldQuestion {
            question: r.question().to_string(),
            image: dir.join(&r.image),
            answer: r.answer().to_string(),
        })
        .collect()
}

/// A file as a `data:` URI (base64).
pub fn data_uri(path: &Path, mime: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A chat request body asking `question` about the image at `image_url`.
pub fn chat_body(
    model: &str,
    question: &str,
    image_url: &str,
    max_tokens: usize,
) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{
            "role": "user",
            "content": [
                { "type": "image_url", "image_url": { "url": image_url } },
                { "type": "text", "text": question },
            ],
        }],
        "max_tokens": max_tokens,
    })
}

/// POST `body` as JSON to `url`: the status, the `Retry-After` header and the body as JSON
/// (`Null` when it is not JSON).
pub fn post_json(
    url: &str,
    body: &serde_json::Value,
    key: Option<&str>,
) -> (u16, Option<String>, serde_json::Value) {
    post_raw(url, &body.to_string(), key)
}

pub fn post_raw(
    url: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, Option<String>, serde_json::Value) {
    let mut req = ureq::post(url)
        .timeout(std::time::Duration::from_secs(300))
        .set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    (
        status,
        retry,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

pub fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = match ureq::get(url)
        .timeout(std::time::Duration::from_secs(60))
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(serde_json::Value::Null))
}

/// A streamed chat completion: the text of its deltas in order, its chunks, and whether the
/// stream ended with `data: [DONE]`.
pub struct Streamed {
    pub text: String,
    pub chunks: Vec<serde_json::Value>,
    pub done: bool,
}

pub fn post_stream(url: &str, body: &serde_json::Value) -> Streamed {
    use std::io::BufRead;
    let mut body = body.clone();
    body["stream"] = serde_json::Value::Bool(true);
    let resp = ureq::post(url)
        .timeout(std::time::Duration::from_secs(300))
        .send_json(body)
        .unwrap_or_else(|e| panic!("POST {url} (stream): {e}"));
    assert_eq!(resp.content_type(), "text/event-stream");
    let mut out = Streamed {
        text: String::new(),
        chunks: Vec::new(),
        done: false,
    };
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            assert!(line.is_empty(), "not an event line: {line:?}");
            continue;
        };
        assert!(!out.done, "data after [DONE]: {data}");
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            out.text.push_str(piece);
        }
        out.chunks.push(chunk);
    }
    out
}

/// Wait until `cond` holds, checking every 20 ms, for at most `timeout`; panics naming `what`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
