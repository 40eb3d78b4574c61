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
//! * Optionally ([`WorldConfig::holdout`], on in the teacher's world) a rule-defined set of
//!   compositions never appears in training; val and test are part seen, part unseen, each record
//!   tagged, and no val or test sample repeats a train one ([`Holdout`], [`world_overlap`]).
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

mod generate;
mod holdout;
mod language;
mod overlap;
mod questions;
mod scene;
mod tokenizer;

pub use generate::*;
pub use holdout::*;
pub use language::*;
pub use overlap::*;
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
    /// Compositions kept out of training, and the share of val and test that shows them (see
    /// [`Holdout`]). `None` (the default, and what a `world.json` without the field reads as):
    /// every split draws from the same scenes, and the files are those of worlds made before
    /// hold-outs existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout: Option<Holdout>,
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
            holdout: None,
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
        if let Some(h) = &self.holdout {
            h.validate(self).or_else(bad)?;
        }
        Ok(())
    }
}

/// The records (and scenes) of the three splits, in [`SPLITS`] order, images numbered across them.
/// With a hold-out, val and test are drawn first so that train can leave their samples out.
pub fn make_world_records(cfg: &WorldConfig) -> Result<Vec<Vec<(WorldRecord, Scene)>>> {
    cfg.validate()?;
    let first_image =
        |split_id: usize| -> usize { SPLITS[..split_id].iter().map(|s| cfg.split_len(s)).sum() };
    let Some(holdout) = &cfg.holdout else {
        return Ok((0..SPLITS.len())
            .map(|id| make_split(cfg, id as u64, cfg.split_len(SPLITS[id]), first_image(id)))
            .collect());
    };
    let none = HashSet::new();
    let mut eval = Vec::new();
    for (id, split) in SPLITS.iter().enumerate().skip(1) {
        let n = cfg.split_len(split);
        eval.push(make_held_out_split(
            cfg,
            holdout,
            id as u64,
            n,
            first_image(id),
            &none,
        )?);
    }
    let exclude: HashSet<SampleKey> = eval
        .iter()
        .flatten()
        .map(|(record, _)| sample_key(record))
        .collect();
    let train = make_held_out_split(cfg, holdout, 0, cfg.train, 0, &exclude)?;
    Ok(std::iter::once(train).chain(eval).collect())
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
    /// Seen or unseen in a world with a hold-out; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<Composition>,
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
