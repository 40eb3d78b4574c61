//! Data side, in three parts: `llava` (the LLaVA loader: parity with TinyLLaVA on
//! a ShareGPT4V sample, bad records), `loader` (the resumable loader and batching) and `world`
//! (the synthetic world: determinism, balance, answers that follow from what is drawn,
//! tokenizer). Shared helpers here.

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

/// A scratch folder (removed when dropped) named after the test.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("matvlm-data-{name}-"))
        .tempdir()
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    crate::common::fixture("data").join(name)
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

mod holdout;
mod llava;
mod loader;
mod stream;
mod world;
