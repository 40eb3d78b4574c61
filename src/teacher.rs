//! The project's embedded teacher: a tiny TinyLLaVA-shaped VLM trained from scratch on the
//! synthetic world, so that every other part (hybrid building, distillation, evaluation) has a
//! real teacher to work on without downloading 3 B parameters.
//!
//! Its shape follows TinyLLaVA-Phi-2-SigLIP scaled down: a SigLIP-style tower (48 px, patch 16,
//! so that the 3 x 3 patches line up with the world's 3 x 3 grid; features from the hidden state
//! before the last layer; the first patch dropped, as TinyLLaVA does), an `mlp2x_gelu` connector
//! and a Phi-style decoder of 8 parallel blocks (so that hybrid ratios 0.125, 0.25 and 0.5 swap
//! 1, 2 and 4 layers). The trained checkpoint lives in `assets/tiny-teacher` ([`default_teacher_path`]) in the TinyLLaVA
//! layout; `cargo run --release --bin train_teacher` reproduces it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::config::{PhiConfig, SiglipVisionConfig, TinyLlavaConfig};
use crate::data::rng::{derive_seed, SplitMix64};
use crate::data::synthetic::Holdout;
use crate::data::WorldConfig;
use crate::image::ImagePreprocessor;
use crate::model::shapes::ShapeRecorder;
use crate::model::vlm::Vlm;
use crate::tokenize::PromptTokenizer;
use crate::{Error, Result};

/// Standard deviation of the normal initialisation of matrices and embeddings (HF's
/// `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// The environment variable that points at the project's `assets` folder (for a binary run
/// outside its checkout).
pub const ASSETS_ENV: &str = "MATVLM_ASSETS";

/// The project's `assets` folder, found at run time: `$MATVLM_ASSETS` when set; else `assets/`
/// in the current directory or one of its parents; else beside the running executable or one
/// of its parents (so `target/release/matrepl` finds its checkout). The error lists every place
/// tried.
pub fn assets_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(ASSETS_ENV) {
        let dir = PathBuf::from(dir);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::NotFound(format!(
                "${ASSETS_ENV} is {}, which is not a folder",
                dir.display()
            )))
        };
    }
    let mut tried = Vec::new();
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(PathBuf::from)),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let candidate = dir.join("assets");
            if candidate.is_dir() {
                return Ok(candidate);
            }
            tried.push(candidate);
        }
    }
    Err(Error::NotFound(format!(
        "no `assets` folder of matvlm found (tried {}); run from the checkout or set ${ASSETS_ENV}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The committed tiny teacher's folder (`assets/tiny-teacher`, see [`assets_dir`]).
pub fn default_teacher_path() -> Result<PathBuf> {
    Ok(assets_dir()?.join("tiny-teacher"))
}

/// Where the synthetic world the teacher is trained on is generated: `runs/world` beside the
/// `assets` folder (git-ignored; rebuild it with [`crate::data::ensure_world`] and
/// [`teacher_world_config`]).
pub fn default_world_dir() -> Result<PathBuf> {
    Ok(project_dir()?.join("runs/world"))
}

/// The folder holding `assets` (the checkout), under which runs go by default.
pub fn project_dir() -> Result<PathBuf> {
    let assets = assets_dir()?;
    Ok(assets
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from))
}

/// The world the tiny teacher is trained and evaluated on: the default synthetic world
/// (48 x 48 px, 3 x 3 grid) with 100 000 training samples (1 000 val, 2 000 test). With the
/// default 20 000, the GPU recipe (3000 steps of 256 = 38 epochs) fitted the training answers
/// almost perfectly (token accuracy 99.7%) while val exact match was at 84%.
///
/// Training holds out [`teacher_holdout`]'s compositions; half of val and of test show at least
/// one of them, so test accuracy is reported on seen and unseen compositions apart.
pub fn teacher_world_config() -> WorldConfig {
    let base = WorldConfig::default();
    WorldConfig {
        train: TEACHER_TRAIN_SAMPLES,
        holdout: Some(teacher_holdout(&base)),
        ..base
    }
}

/// The teacher world's hold-out: each shape loses one colour and one corner cell
/// ([`Holdout::one_colour_one_corner`]: purple circle, white square, yellow triangle, blue cross;
/// circle at the bottom right, square bottom left, triangle top right, cross top left), and half
/// of val and test is unseen.
pub fn teacher_holdout(world: &WorldConfig) -> Holdout {
    Holdout::one_colour_one_corner(&world.shapes, &world.colors, world.grid, 0.5)
}

/// Training samples in the tiny teacher's world.
pub const TEACHER_TRAIN_SAMPLES: usize = 100_000;

/// The sizes that shape a TinyLLaVA-like VLM; everything else (activations, norms, rotary,
/// connector type, feature layer) is fixed to TinyLLaVA-Phi-2-SigLIP's choices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherDims {
    /// Decoder width, layers, heads and MLP width.
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    /// Vision tower width, layers (including the last one, which TinyLLaVA never runs), heads and
    /// MLP width.
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub vision_intermediate: usize,
    /// Side of the square input image and of the patches, in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    /// TinyLLaVA's `vision_feature_select_strategy`: `patch` drops the first patch's vector
    /// (as TinyLLaVA does for SigLIP), `cls_patch` keeps every patch.
    pub select_strategy: String,
}

impl TeacherDims {
    /// The tiny teacher: decoder 128 wide x 8 layers (4 heads of 32, so 12 rotary dimensions at
    /// Phi's partial factor 0.4), tower 96 wide with 3 layers run (4 configured, the last one
    /// skipped by `vision_feature_layer = -2`), 48 px images cut in 3 x 3 patches of 16 px.
    pub fn tiny() -> Self {
        Self {
            hidden: 128,
            layers: 8,
            heads: 4,
            intermediate: 512,
            vision_hidden: 96,
            vision_layers: 4,
            vision_heads: 4,
            vision_intermediate: 384,
            image_size: 48,
            patch_size: 16,
            // TinyLLaVA's SigLIP setting (`patch`) drops the first of 729 patches, which costs
            // nothing there; here it would hide the grid's top-left cell (1 of 9 patches), and
            // on the GPU sweep `cls_patch` learned faster (val 55% vs 48% after 2000 steps).
            select_strategy: "cls_patch".into(),
        }
    }

    /// A much smaller model of the same shape for fast tests (a few seconds per step at most).
    pub fn reduced() -> Self {
        Self {
            hidden: 32,
            layers: 2,
            heads: 2,
            intermediate: 64,
            vision_hidden: 32,
            vision_layers: 2,
            vision_heads: 2,
            vision_intermediate: 64,
            image_size: 48,
            patch_size: 16,
            select_strategy: "patch".into(),
        }
    }

    /// The TinyLLaVA config of a model with these sizes and the given tokenizer's vocabulary
    /// (its EOS doubles as BOS and pad, as Phi's `<|endoftext|>` does).
    pub fn config(&self, tokenizer: &PromptTokenizer) -> Result<TinyLlavaConfig> {
        self.validate()?;
        let eos = tokenizer.eos_id();
        let text_config: PhiConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": tokenizer.vocab_size(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "hidden_act": "gelu_new",
            "max_position_embeddings": 256,
            "layer_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.4,
            "tie_word_embeddings": false,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "model_type": "phi",
        }))
        .map_err(|e| Error::Other(format!("building the tiny Phi config: {e}")))?;
        let vision_config: SiglipVisionConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "model_type": "siglip_vision_model",
        }))
        .map_err(|e| Error::Other(format!("building the tiny SigLIP config: {e}")))?;
        let config: TinyLlavaConfig = serde_json::from_value(serde_json::json!({
            "model_type": "tinyllava",
            "architectures": ["TinyLlavaForConditionalGeneration"],
            "llm_model_name_or_path": "matvlm/tiny-phi",
            "vision_model_name_or_path": "matvlm/tiny-siglip",
            "connector_type": "mlp2x_gelu",
            "text_config": text_config,
            "vision_config": vision_config,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": self.select_strategy,
            "tokenizer_model_max_length": 256,
            "pad_token": crate::tokenize::EOS_TEXT,
            "tokenizer_padding_side": "right",
        }))
        .map_err(|e| Error::Other(format!("building the tiny TinyLLaVA config: {e}")))?;
        Ok(config)
    }

    /// Reject sizes the model cannot be built with, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("teacher dims: {msg}")));
        let sizes = [
            self.hidden,
            self.layers,
            self.heads,
            self.intermediate,
            self.vision_hidden,
            self.vision_layers,
            self.vision_heads,
            self.vision_intermediate,
            self.image_size,
            self.patch_size,
        ];
        if sizes.contains(&0) {
            return bad(format!("every size must be positive: {self:?}"));
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return bad(format!(
                "hidden ({}) must be a multiple of heads ({})",
                self.hidden, self.heads
            ));
        }
        let head_dim = self.hidden / self.heads;
        let rotary = (0.4 * head_dim as f64) as usize;
        if !rotary.is_multiple_of(2) {
            return bad(format!(
                "head_dim {head_dim} gives {rotary} rotary dimensions at factor 0.4; they must be even"
            ));
        }
        if !self.vision_hidden.is_multiple_of(self.vision_heads) {
            return bad(format!(
                "vision_hidden ({}) must be a multiple of vision_heads ({})",
                self.vision_hidden, self.vision_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size ({}) must be a multiple of patch_size ({})",
                self.image_size, self.patch_size
            ));
        }
        if !["patch", "cls_patch"].contains(&self.select_strategy.as_str()) {
            return bad(format!(
                "select_strategy must be `patch` or `cls_patch`, got `{}`",
                self.select_strategy
            ));
        }
        if (self.image_size / self.patch_size).pow(2) < 2 {
            return bad(
                "the image must have at least two patches (the first may be dropped)".into(),
            );
        }
        if self.vision_layers < 2 {
            return bad(
                "the tower needs at least 2 layers (features come from the one before the last)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The tiny teacher's config for a tokenizer (the world's): [`TeacherDims::tiny`].
pub fn tiny_teacher_config(tokenizer: &PromptTokenizer) -> Result<TinyLlavaConfig> {
    TeacherDims::tiny().config(tokenizer)
}

/// Randomly initialised weights for `config`, under their TinyLLaVA checkpoint names: normal
/// `(0, INIT_STD)` for matrices, convolution kernels and embeddings, ones for LayerNorm weights
/// (the only 1-D weights), zeros for biases. Each tensor draws from its own stream, seeded by
/// `seed` and its name, so a tensor's values do not depend on which other tensors exist.
pub fn init_tensors(config: &TinyLlavaConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    init_tensors_with_std(config, seed, INIT_STD)
}

/// [`init_tensors`] with another standard deviation for the normal draws.
pub fn init_tensors_with_std(
    config: &TinyLlavaConfig,
    seed: u64,
    std: f64,
) -> Result<BTreeMap<String, Tensor>> {
    let preprocessor = ImagePreprocessor::siglip(config.vision_config.image_size);
    let (_, shapes) = ShapeRecorder::record(DType::F32, |vb| {
        Vlm::from_var_builder(vb, config.clone(), None, preprocessor, "shape recorder")
    })?;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let mut rng = SplitMix64::new(derive_seed(seed, &[name_hash(&name)]));
                (0..n)
                    .map(|_| (standard_normal(&mut rng) * std) as f32)
                    .collect()
            };
            let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?;
            Ok((name, t))
        })
        .collect()
}

/// A randomly initialised VLM (see [`init_tensors`]) with `tokenizer` and SigLIP preprocessing,
/// in f32 on `device`.
pub fn init_vlm(
    config: &TinyLlavaConfig,
    tokenizer: &PromptTokenizer,
    seed: u64,
    device: &Device,
) -> Result<Vlm> {
    let tensors = init_tensors(config, seed)?;
    vlm_from_tensors(config, tokenizer, tensors.into_iter().collect(), device)
}

/// Build a VLM from a name -> tensor map (e.g. the map [`crate::train::ParamSet::select`]
/// returns, whose trainable entries are `Var`s), with `tokenizer` and SigLIP preprocessing.
pub fn vlm_from_tensors(
    config: &TinyLlavaConfig,
    tokenizer: &PromptTokenizer,
    tensors: std::collections::HashMap<String, Tensor>,
    device: &Device,
) -> Result<Vlm> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Vlm::from_var_builder(
        vb,
        config.clone(),
        Some(tokenizer.clone()),
        ImagePreprocessor::siglip(config.vision_config.image_size),
        "initial weights",
    )
}

/// FNV-1a of a tensor name, to seed its random stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One standard normal draw (Box-Muller; the 53-bit uniform is kept away from 0 for the log).
fn standard_normal(rng: &mut SplitMix64) -> f64 {
    let uniform =
        |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
