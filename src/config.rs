//! Configs as the checkpoints store them (serde mirrors of HF `config.json` files).
//!
//! Field names follow HF so that a real TinyLLaVA `config.json` deserialises as is; defaults are
//! Phi-2 / SigLIP-so400m values so that a config trimmed to what differs still loads. Both the
//! transformers 4.x layout (`rope_theta`, `partial_rotary_factor` at top level) and the 5.x one
//! (`rope_parameters: {rope_theta, partial_rotary_factor}`) are read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::read_json;
use crate::{Error, Result};

/// Largest vocabulary a config may declare (real ones are up to a few hundred thousand).
pub const MAX_VOCAB: usize = 1 << 22;
/// Largest hidden or intermediate width (Phi-2: 2560 and 10240).
pub const MAX_DIM: usize = 1 << 17;
/// Most layers or heads.
pub const MAX_LAYERS: usize = 4096;
/// Longest context (position tables are sized by it).
pub const MAX_POSITIONS: usize = 1 << 20;
/// Largest image side in pixels, for vision configs and preprocessor sizes.
pub const MAX_IMAGE_SIDE: usize = 1 << 14;

fn d_phi_vocab() -> usize {
    51200
}
fn d_phi_hidden() -> usize {
    2560
}
fn d_phi_inter() -> usize {
    10240
}
fn d_phi_layers() -> usize {
    32
}
fn d_phi_heads() -> usize {
    32
}
fn d_phi_act() -> String {
    "gelu_new".into()
}
fn d_phi_max_pos() -> usize {
    2048
}
fn d_ln_eps() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    10000.0
}
fn d_partial() -> f64 {
    0.4
}
fn d_eos() -> u32 {
    50256
}

/// RoPE parameters in the transformers 5.x layout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
}

/// HF `PhiConfig` (the decoder).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhiConfig {
    #[serde(default = "d_phi_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_phi_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_phi_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_phi_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_phi_heads")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_phi_act")]
    pub hidden_act: String,
    #[serde(default = "d_phi_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub qk_layernorm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "d_eos")]
    pub bos_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default = "d_phi_model_type")]
    pub model_type: String,
}

fn d_phi_model_type() -> String {
    "phi".into()
}

impl PhiConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or_else(d_theta)
    }
    pub fn partial_rotary_factor(&self) -> f64 {
        self.partial_rotary_factor
            .or(self
                .rope_parameters
                .as_ref()
                .and_then(|r| r.partial_rotary_factor))
            .unwrap_or_else(d_partial)
    }
    /// Dimensions of each head that get rotary embeddings (HF: `int(factor * head_dim)`).
    pub fn rotary_dim(&self) -> usize {
        (self.partial_rotary_factor() * self.head_dim() as f64) as usize
    }
}

fn d_sig_hidden() -> usize {
    1152
}
fn d_sig_inter() -> usize {
    4304
}
fn d_sig_layers() -> usize {
    27
}
fn d_sig_heads() -> usize {
    16
}
fn d_sig_channels() -> usize {
    3
}
fn d_sig_image() -> usize {
    384
}
fn d_sig_patch() -> usize {
    14
}
fn d_sig_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_sig_eps() -> f64 {
    1e-6
}
fn d_sig_model_type() -> String {
    "siglip_vision_model".into()
}

/// HF `SiglipVisionConfig` (the vision tower).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "d_sig_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_sig_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_sig_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_sig_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_sig_channels")]
    pub num_channels: usize,
    #[serde(default = "d_sig_image")]
    pub image_size: usize,
    #[serde(default = "d_sig_patch")]
    pub patch_size: usize,
    #[serde(default = "d_sig_act")]
    pub hidden_act: String,
    #[serde(default = "d_sig_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_sig_model_type")]
    pub model_type: String,
}

impl SiglipVisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

fn d_connector() -> String {
    "mlp2x_gelu".into()
}
fn d_feature_layer() -> i64 {
    -2
}
fn d_select() -> String {
    "patch".into()
}
fn d_max_len() -> usize {
    3072
}
fn d_image_token() -> i64 {
    -200
}
fn d_tinyllava() -> String {
    "tinyllava".into()
}

/// TinyLLaVA Factory's `TinyLlavaConfig`: the whole VLM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TinyLlavaConfig {
    #[serde(default = "d_tinyllava")]
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub llm_model_name_or_path: String,
    #[serde(default)]
    pub vision_model_name_or_path: String,
    #[serde(default = "d_connector")]
    pub connector_type: String,
    pub text_config: PhiConfig,
    pub vision_config: SiglipVisionConfig,
    /// Which hidden state of the vision encoder feeds the connector (python index, -2 = before
    /// the last layer).
    #[serde(default = "d_feature_layer")]
    pub vision_feature_layer: i64,
    /// `patch` drops the first token (TinyLLaVA does so for SigLIP too), `cls_patch` keeps all.
    #[serde(default = "d_select")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "d_max_len")]
    pub tokenizer_model_max_length: usize,
    #[serde(default = "d_image_token")]
    pub image_token_index: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_padding_side: Option<String>,
    /// Everything else the file holds, kept so that saving writes it back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl TinyLlavaConfig {
    /// The preset name of TinyLLaVA-Phi-2-SigLIP-3.1B, MaTVLM's teacher.
    pub const FULL_SIZE: &'static str = "tinyllava-3.1b";

    /// Read and check a `config.json`: every error names the file and, for a bad value, the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|reason| Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Check that the sizes describe a model that can be built: positive, consistent (heads
    /// divide widths, patches fit images) and within [`MAX_DIM`] and friends, so that a corrupt
    /// or hostile config is an error here and never an allocation of its absurd size later.
    /// The message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let sizes = [
            ("text_config.vocab_size", t.vocab_size, MAX_VOCAB),
            ("text_config.hidden_size", t.hidden_size, MAX_DIM),
            (
                "text_config.intermediate_size",
                t.intermediate_size,
                MAX_DIM,
            ),
            (
                "text_config.num_hidden_layers",
                t.num_hidden_layers,
                MAX_LAYERS,
            ),
            (
                "text_config.num_attention_heads",
                t.num_attention_heads,
                MAX_LAYERS,
            ),
            (
                "text_config.num_key_value_heads",
                t.num_kv_heads(),
                MAX_LAYERS,
            ),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
                MAX_POSITIONS,
            ),
            ("vision_config.hidden_size", v.hidden_size, MAX_DIM),
            (
                "vision_config.intermediate_size",
                v.intermediate_size,
                MAX_DIM,
            ),
            (
                "vision_config.num_hidden_layers",
                v.num_hidden_layers,
                MAX_LAYERS,
            ),
            (
                "vision_config.num_attention_heads",
                v.num_attention_heads,
                MAX_LAYERS,
            ),
            ("vision_config.num_channels", v.num_channels, 16),
            ("vision_config.image_size", v.image_size, MAX_IMAGE_SIDE),
            ("vision_config.patch_size", v.patch_size, MAX_IMAGE_SIDE),
            (
                "tokenizer_model_max_length",
                self.tokenizer_model_max_length,
                MAX_POSITIONS,
            ),
        ];
        for (key, value, max) in sizes {
            if value == 0 || value > max {
                return Err(format!("`{key}` = {value} is outside 1..={max}"));
            }
        }
        let divides = |key: &str, width: usize, heads: usize| {
            if width.is_multiple_of(heads) {
                Ok(())
            } else {
                Err(format!(
                    "`{key}` = {heads} does not divide the width {width}"
                ))
            }
        };
        divides(
            "text_config.num_attention_heads",
            t.hidden_size,
            t.num_attention_heads,
        )?;
        divides(
            "text_config.num_key_value_heads",
            t.num_attention_heads,
            t.num_kv_heads(),
        )?;
        divides(
            "vision_config.num_attention_heads",
            v.hidden_size,
            v.num_attention_heads,
        )?;
        if v.patch_size > v.image_size {
            return Err(format!(
                "`vision_config.patch_size` = {} is larger than `vision_config.image_size` = {}",
                v.patch_size, v.image_size
            ));
        }
        if self.vision_feature_select_strategy == "patch" && v.num_patches() < 2 {
            return Err(format!(
                "`vision_feature_select_strategy` = \"patch\" drops the first of {} patch(es), \
                 leaving none",
                v.num_patches()
            ));
        }
        let factor = t.partial_rotary_factor();
        if !(0.0..=1.0).contains(&factor) {
            return Err(format!(
                "`partial_rotary_factor` = {factor} is outside [0, 1]"
            ));
        }
        let positive = [
            ("rope_theta", t.rope_theta()),
            ("text_config.layer_norm_eps", t.layer_norm_eps),
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
        ];
        for (key, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("`{key}` = {value} must be a positive number"));
            }
        }
        self.vision_layers_used().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// TinyLLaVA-Phi-2-SigLIP-3.1B's config (Phi-2 with SigLIP-so400m-patch14-384 through a
    /// two-layer GELU MLP): the field defaults above are its values.
    pub fn tinyllava_3_1b() -> Self {
        let json = serde_json::json!({
            "llm_model_name_or_path": "microsoft/phi-2",
            "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
            "text_config": {},
            "vision_config": {},
        });
        serde_json::from_value(json).expect("every field of the 3.1B config has a default")
    }

    /// A preset by name ([`Self::FULL_SIZE`]), or else a `config.json` at that path.
    pub fn preset_or_file(name: &str) -> Result<Self> {
        match name {
            Self::FULL_SIZE => Ok(Self::tinyllava_3_1b()),
            path if Path::new(path).exists() => {
                let p = Path::new(path);
                Self::from_file(&if p.is_dir() {
                    p.join("config.json")
                } else {
                    p.to_path_buf()
                })
            }
            other => Err(Error::NotFound(format!(
                "config `{other}`: neither a preset ({}) nor an existing config.json",
                Self::FULL_SIZE
            ))),
        }
    }

    /// Number of image vectors the connector hands to the decoder for one image.
    pub fn image_tokens(&self) -> usize {
        let n = self.vision_config.num_patches();
        if self.vision_feature_select_strategy == "patch" {
            n - 1
        } else {
            n
        }
    }

    /// Resolve `vision_feature_layer` to the number of encoder layers to run (hidden_states has
    /// `layers + 1` entries: the embeddings, then each layer's output).
    pub fn vision_layers_used(&self) -> Result<usize> {
        let total = self.vision_config.num_hidden_layers as i64 + 1;
        let idx = if self.vision_feature_layer < 0 {
            total + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        if idx < 0 || idx >= total {
            return Err(Error::Invalid(format!(
                "vision_feature_layer {} out of range for {} encoder layers",
                self.vision_feature_layer, self.vision_config.num_hidden_layers
            )));
        }
        Ok(idx as usize)
    }
}

fn d_mean() -> Vec<f32> {
    vec![0.5, 0.5, 0.5]
}

/// The image processor's settings (HF `preprocessor_config.json`; SigLIP's when absent).
/// Reading one checks it ([`PreprocessorConfig::validate`]), so a bad file is an error naming it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawPreprocessorConfig")]
pub struct PreprocessorConfig {
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<ImageSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale_factor: Option<f64>,
}

/// What a `preprocessor_config.json` holds, before [`PreprocessorConfig::validate`].
#[derive(Deserialize)]
struct RawPreprocessorConfig {
    #[serde(default = "d_mean")]
    image_mean: Vec<f32>,
    #[serde(default = "d_mean")]
    image_std: Vec<f32>,
    #[serde(default)]
    size: Option<ImageSize>,
    #[serde(default)]
    rescale_factor: Option<f64>,
}

impl TryFrom<RawPreprocessorConfig> for PreprocessorConfig {
    type Error = String;

    fn try_from(raw: RawPreprocessorConfig) -> std::result::Result<Self, String> {
        let cfg = Self {
            image_mean: raw.image_mean,
            image_std: raw.image_std,
            size: raw.size,
            rescale_factor: raw.rescale_factor,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

impl PreprocessorConfig {
    /// The output size is given and within [`MAX_IMAGE_SIDE`], mean and std have three finite
    /// values (R, G, B), std has no 0, the rescale factor is finite. The message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let size = self
            .size
            .as_ref()
            .ok_or("`size` {height, width} is missing")?;
        for (key, v) in [("size.height", size.height), ("size.width", size.width)] {
            if v == 0 || v > MAX_IMAGE_SIDE {
                return Err(format!("`{key}` = {v} is outside 1..={MAX_IMAGE_SIDE}"));
            }
        }
        for (key, v) in [
            ("image_mean", &self.image_mean),
            ("image_std", &self.image_std),
        ] {
            if v.len() != 3 {
                return Err(format!(
                    "`{key}` has {} values, expected 3 (R, G, B)",
                    v.len()
                ));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("`{key}` holds a non-finite value"));
            }
        }
        if self.image_std.contains(&0.0) {
            return Err("`image_std` contains 0".into());
        }
        if let Some(r) = self.rescale_factor.filter(|r| !r.is_finite()) {
            return Err(format!("`rescale_factor` = {r} is not finite"));
        }
        Ok(())
    }

    pub fn siglip_default(image_size: usize) -> Self {
        Self {
            image_mean: d_mean(),
            image_std: d_mean(),
            size: Some(ImageSize {
                height: image_size,
                width: image_size,
            }),
            rescale_factor: Some(1.0 / 255.0),
        }
    }
}
