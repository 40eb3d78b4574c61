//! Models at any size without a checkpoint: every weight drawn on the target device, in the
//! model dtype, by the same loaders that read real checkpoints.
//!
//! Speed and memory at the paper's scale (TinyLLaVA-Phi-2-SigLIP-3.1B) do not depend on what the
//! weights are, only on their shapes and dtype, and no 6 GB download may happen in a test or a
//! benchmark. [`RandomWeights`] is a `VarBuilder` backend that answers every `get(shape, name)`
//! with a fresh tensor, so the model files build a teacher or any hybrid exactly as they build one
//! from safetensors: the names and shapes are theirs, not a copy kept here.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::hybrid::LayerPlan;
use super::mamba2::Mamba2Config;
use super::vlm::Vlm;
use crate::config::{PreprocessorConfig, TinyLlavaConfig};
use crate::image::ImagePreprocessor;
use crate::{Error, Result};

/// Standard deviation of projection and embedding weights (Phi-2's `initializer_range`).
const WEIGHT_STD: f64 = 0.02;

/// A `VarBuilder` backend that makes up every tensor it is asked for.
///
/// Values follow the role the name gives: norm weights and Mamba-2's `D` are ones, biases zeros,
/// `A_log` and `dt_bias` the log-spaced values upstream's init draws from, everything else normal
/// with std 0.02. On a CUDA device the draw is curand's (seeded once, so the same seed and call
/// order give the same model); on the CPU each tensor is seeded from its name.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    /// A backend for `device`; on CUDA this seeds the device's generator.
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        if device.is_cuda() {
            device.set_seed(seed)?;
        }
        Ok(Self { seed })
    }

    fn normal(&self, shape: &Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        if dev.is_cuda() {
            // curand draws f32 (or f64) only: draw on the device and convert there.
            let t = Tensor::randn(0f32, WEIGHT_STD as f32, shape, dev)?;
            return Ok(t.to_dtype(dtype)?);
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ name_hash(name));
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                // Box-Muller: two uniforms give one standard normal.
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos() * WEIGHT_STD as f32
            })
            .collect();
        Ok(Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)
    }

    fn tensor(&self, shape: Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_norm_weight = leaf == "weight" && name.contains("norm");
        if is_norm_weight || leaf == "D" {
            return Ok(Tensor::ones(shape, dtype, dev)?);
        }
        if leaf == "bias" {
            return Ok(Tensor::zeros(shape, dtype, dev)?);
        }
        if leaf == "A_log" || leaf == "dt_bias" {
            // A = -exp(A_log) spread over [1, 16] and dt = softplus(dt_bias) over [1e-3, 1e-1],
            // as upstream draws them, but evenly spaced so that no head is degenerate.
            let n = shape.elem_count();
            let frac = |i: usize| {
                if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.5
                }
            };
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    if leaf == "A_log" {
                        (1.0 + 15.0 * frac(i)).ln() as f32
                    } else {
                        let dt = (1e-3f64.ln() + frac(i) * (1e-1f64.ln() - 1e-3f64.ln())).exp();
                        (dt + (-(-dt).exp_m1()).ln()) as f32
                    }
                })
                .collect();
            return Ok(Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?);
        }
        self.normal(&shape, name, dtype, dev)
    }
}

/// FNV-1a: a stable per-name seed (std's hasher may change between releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(s, name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(format!("random tensor `{name}`: {e}")))
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// What [`random_model`] builds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomModelOptions {
    /// A preset name ([`TinyLlavaConfig::preset`]) or the path of a TinyLLaVA `config.json`.
    pub config: String,
    /// Decoder layers holding a Mamba-2 mixer (MaTVLM's mixer shape for the config); none for a
    /// teacher.
    pub mamba_layers: Vec<usize>,
    /// `"bf16"`, `"f16"` or `"f32"`.
    pub dtype: String,
    pub seed: u64,
}

impl Default for RandomModelOptions {
    fn default() -> Self {
        Self {
            config: TinyLlavaConfig::FULL_SIZE.into(),
            mamba_layers: Vec::new(),
            dtype: "bf16".into(),
            seed: 0,
        }
    }
}

/// A VLM with random weights at the dimensions `opts.config` names, built directly on `device`:
/// the teacher, or a hybrid whose `mamba_layers` hold MaTVLM's mixer. No tokenizer (callers pass
/// token ids).
pub fn random_model(opts: &RandomModelOptions, device: &Device) -> Result<Vlm> {
    let config = TinyLlavaConfig::preset_or_file(&opts.config)?;
    let dtype = crate::device::parse_dtype(&opts.dtype)?;
    let text = &config.text_config;
    let mixer =
        Mamba2Config::from_attention(text.hidden_size, text.num_attention_heads, text.head_dim());
    let plan = LayerPlan::hybrid(text.num_hidden_layers, &opts.mamba_layers, mixer)?;
    let vb = VarBuilder::from_backend(
        Box::new(RandomWeights::new(opts.seed, device)?),
        dtype,
        device.clone(),
    );
    let preprocessor = ImagePreprocessor::from_config(&PreprocessorConfig::siglip_default(
        config.vision_config.image_size,
    ))?;
    let location = format!("random weights for {}", opts.config);
    Vlm::from_var_builder_with_plan(vb, config, None, preprocessor, &location, &plan).map_err(|e| {
        match e {
            Error::Candle(c) => Error::Other(format!("{location}: {c}")),
            other => other,
        }
    })
}
