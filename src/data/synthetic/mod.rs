//! A synthetic visual-QA world: small images of a few coloured shapes on a grid, with questions
//! about them, written in the LLaVA JSON + PNG format so the real data path reads it unchanged.
//!
//! The world is built so that a tiny VLM can learn it on a CPU in well under two hours and so
//! that the image is needed to answer:
//!
//! * Objects sit in the cells of a `grid x grid` lattice whose cells line up with the vision
//!   tower's patches (48 px images, 3 x 3 cells of 16 px for a patch-16 tower), at most one object
//!   per cell, so "where" is "which patch" and every object fills most of its patch (12-15 px).
//! * A handful of far-apart colours and four shapes with different silhouettes (circle, square,
//!   triangle, cross); no two objects of an image share both colour and shape, so "the red circle"
//!   always names one object.
//! * Short answers: one word (colour, shape, number, yes/no), a position ("top left"), or one
//!   deterministic sentence listing the objects in reading order.
//! * Question types are dealt out in exact proportions per split and yes/no answers alternate, so
//!   a model that ignores the image can only reach the answer priors (about a quarter of the
//!   questions with the default mix).
//!
//! Everything is a function of [`WorldConfig`]: the same config gives byte-identical files.
//! Each sample draws from its own random stream, derived from (seed, split, index).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::rng::{derive_seed, SplitMix64};
use crate::tokenize::{
    encode_conversation, PromptTokenizer, Turn, EOS_TEXT, IMAGE_MARKER, PHI_SYSTEM,
};
use crate::{Error, Result};

mod language;
mod questions;
mod scene;
mod tokenizer;

pub use language::*;
use questions::*;
pub use scene::*;
pub use tokenizer::*;

/// The shapes the world can draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Cross => "crosses",
        }
    }

    /// Whether the pixel whose centre is at `(u, v)`, in units of the shape's bounding box
    /// (`0..1` both ways, `v` downwards), belongs to the shape.
    fn covers(self, u: f32, v: f32) -> bool {
        let (du, dv) = (u - 0.5, v - 0.5);
        match self {
            Shape::Square => true,
            Shape::Circle => du * du + dv * dv <= 0.25,
            // Apex at the top centre, base along the bottom edge.
            Shape::Triangle => du.abs() <= v / 2.0,
            // A plus sign with bars a third of the box thick.
            Shape::Cross => du.abs() <= 1.0 / 6.0 || dv.abs() <= 1.0 / 6.0,
        }
    }
}

/// The colours the world can paint, each far from the others in RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    White,
    Purple,
    Orange,
    Cyan,
}

impl Color {
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::White,
        Color::Purple,
        Color::Orange,
        Color::Cyan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::White => "white",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::Cyan => "cyan",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [230, 30, 30],
            Color::Green => [30, 200, 50],
            Color::Blue => [40, 80, 240],
            Color::Yellow => [245, 225, 20],
            Color::White => [245, 245, 245],
            Color::Purple => [160, 50, 220],
            Color::Orange => [255, 140, 0],
            Color::Cyan => [20, 215, 225],
        }
    }
}

/// The kinds of question the world asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuestionType {
    /// "What color is the circle?" / "What color is the object at the top left?"
    Color,
    /// "What shape is the red object?" / "What shape is the object at the center?"
    Shape,
    /// "How many objects are there?" / "How many circles are there?" / "How many red objects are there?"
    Count,
    /// "Where is the red circle?" -> "top left"
    Position,
    /// "Is there a red circle?" -> "yes" / "no"
    Exists,
    /// "Describe the image in one sentence." -> "a red circle at the top left and a ..."
    Describe,
}

impl QuestionType {
    pub const ALL: [QuestionType; 6] = [
        QuestionType::Color,
        QuestionType::Shape,
        QuestionType::Count,
        QuestionType::Position,
        QuestionType::Exists,
        QuestionType::Describe,
    ];

    /// The name used in the records' `question_type` field.
    pub fn name(self) -> &'static str {
        match self {
            QuestionType::Color => "color",
            QuestionType::Shape => "shape",
            QuestionType::Count => "count",
            QuestionType::Position => "position",
            QuestionType::Exists => "exists",
            QuestionType::Describe => "describe",
        }
    }
}

/// Relative frequency of each question type (any non-negative weights; normalised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuestionMix {
    pub color: f64,
    pub shape: f64,
    pub count: f64,
    pub position: f64,
    pub exists: f64,
    pub describe: f64,
}

impl Default for QuestionMix {
    /// Equal shares, except the description at half share: it is the only long answer (it sets
    /// the padded length of the batches it is in) and the hardest to get exactly right.
    fn default() -> Self {
        Self {
            color: 2.0,
            shape: 2.0,
            count: 2.0,
            position: 2.0,
            exists: 2.0,
            describe: 1.0,
        }
    }
}

impl QuestionMix {
    pub fn weight(&self, t: QuestionType) -> f64 {
        match t {
            QuestionType::Color => self.color,
            QuestionType::Shape => self.shape,
            QuestionType::Count => self.count,
            QuestionType::Position => self.position,
            QuestionType::Exists => self.exists,
            QuestionType::Describe => self.describe,
        }
    }
}

/// Version of the generator; bumped whenever the same config would give different files, so
/// that [`ensure_world`] regenerates worlds made by older code.
pub const WORLD_VERSION: u32 = 1;

/// Everything that defines a world. Written as `world.json` beside the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorldConfig {
    /// The generator version the world was made with ([`WORLD_VERSION`]).
    pub version: u32,
    pub seed: u64,
    /// Side of the square images, in pixels.
    pub image_size: u32,
    /// The images are cut into `grid x grid` cells; `image_size` must be a multiple of `grid`.
    /// Make the cell the vision tower's patch size so each object lies in one patch.
    pub grid: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    /// Side of a shape's bounding box, drawn uniformly from `min_shape_px..=max_shape_px`.
    pub min_shape_px: u32,
    pub max_shape_px: u32,
    /// Largest shift of a shape from its cell's centre, in pixels (less when it would leave the cell).
    pub jitter_px: u32,
    pub colors: Vec<Color>,
    pub shapes: Vec<Shape>,
    pub background: [u8; 3],
    pub question_mix: QuestionMix,
    /// Number of samples (one image and one question each) per split.
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Upper bound on the BPE vocabulary (merges stop earlier once every word is one token).
    pub vocab_size: usize,
    /// Make the phi system prompt one token (an added token) instead of ~35 BPE tokens: it is the
    /// same in every sample and carries nothing, so this only shortens the sequences.
    pub system_prompt_token: bool,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            version: WORLD_VERSION,
            seed: 0,
            image_size: 48,
            grid: 3,
            min_objects: 1,
            max_objects: 3,
            min_shape_px: 12,
            max_shape_px: 15,
            jitter_px: 1,
            colors: vec![
                Color::Red,
                Color::Green,
                Color::Blue,
                Color::Yellow,
                Color::White,
                Color::Purple,
            ],
            shapes: Shape::ALL.to_vec(),
            background: [0, 0, 0],
            question_mix: QuestionMix::default(),
            train: 20_000,
            val: 1_000,
            test: 2_000,
            vocab_size: 1024,
            system_prompt_token: true,
        }
    }
}

/// The three splits, in the order their images are numbered.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

impl WorldConfig {
    /// Side of one grid cell in pixels.
    pub fn cell_px(&self) -> u32 {
        self.image_size / self.grid.max(1)
    }

    pub fn split_len(&self, split: &str) -> usize {
        match split {
            "train" => self.train,
            "val" => self.val,
            "test" => self.test,
            _ => 0,
        }
    }

    /// Reject configurations that cannot be generated, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("world config: {msg}")));
        if self.version != WORLD_VERSION {
            return bad(format!(
                "version {} was made by another generator; this one makes version {WORLD_VERSION}",
                self.version
            ));
        }
        if self.grid == 0 || self.image_size == 0 || !self.image_size.is_multiple_of(self.grid) {
            return bad(format!(
                "image_size ({}) must be a positive multiple of grid ({})",
                self.image_size, self.grid
            ));
        }
        let cells = (self.grid * self.grid) as usize;
        if self.min_objects == 0 || self.min_objects > self.max_objects || self.max_objects > cells
        {
            return bad(format!(
                "need 1 <= min_objects ({}) <= max_objects ({}) <= grid cells ({cells})",
                self.min_objects, self.max_objects
            ));
        }
        if self.min_shape_px == 0
            || self.min_shape_px > self.max_shape_px
            || self.max_shape_px > self.cell_px()
        {
            return bad(format!(
                "need 1 <= min_shape_px ({}) <= max_shape_px ({}) <= cell size ({})",
                self.min_shape_px,
                self.max_shape_px,
                self.cell_px()
            ));
        }
        if has_duplicates(&self.colors) || has_duplicates(&self.shapes) {
            return bad("colors and shapes must not repeat".into());
        }
        let kinds = self.colors.len() * self.shapes.len();
        if kinds < self.max_objects {
            return bad(format!(
                "{} colours x {} shapes cannot make {} distinct objects",
                self.colors.len(),
                self.shapes.len(),
                self.max_objects
            ));
        }
        if self.question_mix.exists > 0.0 && kinds <= self.max_objects {
            return bad("`exists` questions need a colour/shape pair absent from every image: add colours or shapes".into());
        }
        if self.colors.iter().any(|c| c.rgb() == self.background) {
            return bad("an object colour equals the background".into());
        }
        let weights: Vec<f64> = QuestionType::ALL
            .iter()
            .map(|&t| self.question_mix.weight(t))
            .collect();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            return bad(format!(
                "question_mix weights must be >= 0 with a positive sum, got {weights:?}"
            ));
        }
        if self.train == 0 {
            return bad(
                "the train split must not be empty (the tokenizer is trained on it)".into(),
            );
        }
        if self.vocab_size < 300 {
            return bad(format!(
                "vocab_size {} is below the 256 byte tokens plus room for merges",
                self.vocab_size
            ));
        }
        Ok(())
    }
}

fn has_duplicates<T: Ord>(items: &[T]) -> bool {
    items.iter().collect::<BTreeSet<_>>().len() != items.len()
}

/// One drawn object. `x`, `y` are the top-left corner of its `size x size` bounding box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub shape: Shape,
    pub color: Color,
    pub row: u32,
    pub col: u32,
    pub x: u32,
    pub y: u32,
    pub size: u32,
}

/// What an image shows: its objects in reading order (row by row, left to right).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<SceneObject>,
}

/// One message of a conversation, LLaVA style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub from: String,
    pub value: String,
}

/// A record of the world's JSON files: the LLaVA fields plus the question type and the scene,
/// so that answers can be checked and accuracy broken down per type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldRecord {
    pub id: String,
    pub image: String,
    pub conversations: Vec<Message>,
    pub question_type: QuestionType,
    pub scene: Scene,
}

impl WorldRecord {
    /// The question without the `<image>` marker.
    pub fn question(&self) -> &str {
        self.conversations.first().map_or("", |m| {
            m.value.trim_start_matches(IMAGE_MARKER).trim_start()
        })
    }

    /// The reference answer.
    pub fn answer(&self) -> &str {
        self.conversations.get(1).map_or("", |m| m.value.as_str())
    }
}

/// What [`generate_world`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldSummary {
    pub dir: PathBuf,
    /// Samples per split.
    pub split_sizes: BTreeMap<String, usize>,
    /// Samples per split and question type.
    pub type_counts: BTreeMap<String, BTreeMap<QuestionType, usize>>,
    pub vocab_size: usize,
    pub eos_id: u32,
    /// Token ids per train sample with the phi template (the image placeholder counting one).
    pub mean_tokens: f64,
    pub max_tokens: usize,
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Generate the world described by `cfg` into `out_dir`: `train.json`, `val.json`, `test.json`,
/// `images/NNNNNN.png`, `tokenizer.json` and, last, `world.json` (the config; its presence marks a
/// complete world). Existing files of an earlier world there are replaced.
pub fn generate_world(cfg: &WorldConfig, out_dir: &Path) -> Result<WorldSummary> {
    cfg.validate()?;
    let images_dir = out_dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    let world_json = out_dir.join("world.json");
    if world_json.exists() {
        std::fs::remove_file(&world_json).map_err(|e| Error::io(&world_json, e))?;
    }
    remove_old_images(&images_dir)?;

    let mut split_sizes = BTreeMap::new();
    let mut type_counts = BTreeMap::new();
    let mut first_image = 0usize;
    let mut train_texts: Vec<String> = Vec::new();
    let mut train_turns: Vec<Vec<Turn>> = Vec::new();
    for (split_id, split) in SPLITS.iter().enumerate() {
        let n = cfg.split_len(split);
        let records = make_split(cfg, split_id as u64, n, first_image);
        first_image += n;

        let mut json = String::from("[\n");
        let mut counts: BTreeMap<QuestionType, usize> = BTreeMap::new();
        for (i, (record, scene)) in records.iter().enumerate() {
            let img = render_scene(cfg, scene);
            let path = out_dir.join(&record.image);
            img.save_with_format(&path, image::ImageFormat::Png)
                .map_err(|e| Error::BadImage {
                    path: path.clone(),
                    reason: format!("cannot write: {e}"),
                })?;
            let line = serde_json::to_string(record)
                .map_err(|e| Error::Other(format!("serialising record {}: {e}", record.id)))?;
            json.push_str(&line);
            json.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
            *counts.entry(record.question_type).or_default() += 1;
            if *split == "train" {
                let turn = Turn {
                    question: record.conversations[0].value.clone(),
                    answer: Some(record.answer().to_string()),
                };
                train_texts.push(crate::tokenize::phi_prompt(std::slice::from_ref(&turn)));
                train_turns.push(vec![turn]);
            }
        }
        json.push_str("]\n");
        write_file(&out_dir.join(format!("{split}.json")), json.as_bytes())?;
        split_sizes.insert(split.to_string(), n);
        type_counts.insert(split.to_string(), counts);
    }

    train_texts.extend(vocabulary_sheet(cfg));
    let whole: Vec<&str> = if cfg.system_prompt_token {
        vec![PHI_SYSTEM]
    } else {
        vec![]
    };
    let tokenizer = train_world_tokenizer(&train_texts, cfg.vocab_size, &whole)?;
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("serialising the world tokenizer: {e}")))?;
    write_file(&out_dir.join("tokenizer.json"), tok_json.as_bytes())?;

    let prompt_tok = PromptTokenizer::new(tokenizer)?;
    let mut total = 0usize;
    let mut max_tokens = 0usize;
    for turns in &train_turns {
        let (ids, _) = encode_conversation(&prompt_tok, turns)?;
        total += ids.len();
        max_tokens = max_tokens.max(ids.len());
    }

    let cfg_json = serde_json::to_string_pretty(cfg)
        .map_err(|e| Error::Other(format!("serialising the world config: {e}")))?;
    write_file(&world_json, format!("{cfg_json}\n").as_bytes())?;

    Ok(WorldSummary {
        dir: out_dir.to_path_buf(),
        split_sizes,
        type_counts,
        vocab_size: prompt_tok.vocab_size(),
        eos_id: prompt_tok.eos_id(),
        mean_tokens: total as f64 / train_turns.len().max(1) as f64,
        max_tokens,
    })
}

/// Delete the `NNNNNN.png` files an earlier generation left (and nothing else).
fn remove_old_images(images_dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(images_dir).map_err(|e| Error::io(images_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(images_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name
            .strip_suffix(".png")
            .is_some_and(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Make sure `dir` holds the world of `cfg`: generate it when it is missing, incomplete, or was
/// made from a different config. Processes sharing `dir` (parallel tests, a REPL beside a run)
/// take turns through a lock file there, so one generates and the others find it done.
pub fn ensure_world(dir: &Path, cfg: &WorldConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock_path = dir.join(".generating.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    let complete = ["train.json", "val.json", "test.json", "tokenizer.json"]
        .iter()
        .all(|f| dir.join(f).is_file());
    let same_config = std::fs::read_to_string(dir.join("world.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<WorldConfig>(&text).ok())
        .is_some_and(|existing| existing == *cfg);
    if complete && same_config {
        return Ok(());
    }
    generate_world(cfg, dir).map(|_| ())
}

/// Read one of the world's split files with its scene metadata.
pub fn read_world_split(path: &Path) -> Result<Vec<WorldRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: format!("not a world split file: {e}"),
    })
}
