//! Helpers shared by the integration tests: fixture paths and models, tensor comparisons,
//! figure checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

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

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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
