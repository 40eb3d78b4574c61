//! The SigLIP vision tower.
//!
//! HF `SiglipVisionModel` up to the hidden state TinyLLaVA takes its image features from:
//! patch embedding (a stride-`patch` convolution, done here as one matmul over the unfolded
//! patches) plus learned position embeddings, then pre-LayerNorm encoder layers
//! (`x + Attn(LN1(x))`, then `x + MLP(LN2(x))`). TinyLLaVA reads `hidden_states[-2]`, the output
//! of the second-to-last layer, so the last layer, `post_layernorm` and the pooling `head` are
//! never used: only the layers needed are loaded and run.
//!
//! Every op goes through [`crate::model::layers`], so the tower is differentiable when its
//! inputs or weights track gradients (it is frozen in MaTVLM, but probes may want gradients).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::config::SiglipVisionConfig;
use crate::error::classify_candle;
use crate::model::layers::{softmax_last_dim, upcast, Activation, LayerNorm, Linear};
use crate::{Error, Result};

const LOCATION: &str = "SigLIP vision tower";

fn load_err(e: candle_core::Error) -> Error {
    classify_candle(e, LOCATION)
}

/// Multi-head self-attention without mask (every patch sees every patch).
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, hidden: usize, num_heads: usize) -> candle_core::Result<Self> {
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::load(vb.pp("out_proj"), hidden, hidden, true)?,
            num_heads,
            head_dim: hidden / num_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores and softmax in f32 even for half-precision weights: 729 patches of logits
        // overflow f16 sums otherwise.
        let scores = (upcast(&q)?.matmul(&upcast(&k)?.t()?.contiguous()?)? * scale)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn load(
        vb: VarBuilder,
        cfg: &SiglipVisionConfig,
        act: Activation,
    ) -> candle_core::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, eps)?,
            self_attn: Attention::load(vb.pp("self_attn"), d, cfg.num_attention_heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, eps)?,
            mlp: Mlp {
                fc1: Linear::load(vb.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true)?,
                fc2: Linear::load(vb.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true)?,
                act,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let m = self.layer_norm2.forward(&h)?;
        let m = self
            .mlp
            .fc2
            .forward(&self.mlp.act.forward(&self.mlp.fc1.forward(&m)?)?)?;
        h + m
    }
}

/// How the vision features are taken from the chosen hidden state
/// (TinyLLaVA's `vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// `patch`: drop the first token (TinyLLaVA does so for SigLIP too, although SigLIP has no
    /// CLS token: 729 patches give 728 image tokens).
    Patch,
    /// `cls_patch`: keep every token.
    ClsPatch,
}

impl FeatureSelect {
    /// Parse TinyLLaVA's strategy name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "patch" => Ok(Self::Patch),
            "cls_patch" => Ok(Self::ClsPatch),
            other => Err(Error::Invalid(format!(
                "unknown vision_feature_select_strategy `{other}` (supported: patch, cls_patch)"
            ))),
        }
    }
}

/// The SigLIP vision encoder, truncated after the layer TinyLLaVA reads its features from.
#[derive(Debug, Clone)]
pub struct SiglipVisionTower {
    cfg: SiglipVisionConfig,
    /// The patch convolution as a linear map over flattened `(channel, row, col)` patches.
    patch_embedding: Linear,
    /// `[num_patches, hidden]`.
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
}

impl SiglipVisionTower {
    /// Load the embeddings and the first `layers_used` encoder layers from `vb`, which must
    /// point at the `vision_model` prefix (in a TinyLLaVA checkpoint:
    /// `vb.pp("vision_tower").pp("_vision_tower").pp("vision_model")`). Later layers,
    /// `post_layernorm` and `head` are not read, so checkpoints without them load too.
    /// `layers_used` is usually [`crate::config::TinyLlavaConfig::vision_layers_used`].
    pub fn load(vb: VarBuilder, cfg: &SiglipVisionConfig, layers_used: usize) -> Result<Self> {
        if layers_used > cfg.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "{LOCATION}: {layers_used} layers requested but the config has {}",
                cfg.num_hidden_layers
            )));
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::Invalid(format!(
                "{LOCATION}: hidden size {} is not a multiple of {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.patch_size == 0 || cfg.patch_size > cfg.image_size {
            return Err(Error::Invalid(format!(
                "{LOCATION}: patch size {} does not fit image size {}",
                cfg.patch_size, cfg.image_size
            )));
        }
        let act = Activation::from_hf(&cfg.hidden_act)?;
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);

        let emb = vb.pp("embeddings");
        let conv = emb.pp("patch_embedding");
        let weight = conv.get((d, c, p, p), "weight").map_err(load_err)?;
        let patch_embedding = Linear {
            weight: weight.reshape((d, c * p * p))?,
            bias: Some(conv.get(d, "bias").map_err(load_err)?),
        };
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.num_patches(), d), "weight")
            .map_err(load_err)?;

        let enc = vb.pp("encoder").pp("layers");
        let layers = (0..layers_used)
            .map(|i| EncoderLayer::load(enc.pp(i), cfg, act).map_err(load_err))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embedding,
            position_embedding,
            layers,
        })
    }

    /// The config the tower was built from.
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// How many encoder layers run (the output is the hidden state after them).
    pub fn layers_used(&self) -> usize {
        self.layers.len()
    }

    /// Number of tokens per image before any selection (`(image_size / patch_size)^2`).
    pub fn num_patches(&self) -> usize {
        self.cfg.num_patches()
    }

    /// Patch + position embeddings: `[B, 3, H, W]` -> `[B, num_patches, hidden]`.
    pub fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = self.check_input(pixel_values)?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        // A stride-p convolution ignores the last `h % p` rows and `w % p` columns
        // (SigLIP-so400m: 384 px, patch 14 -> 27 x 27 patches over 378 px).
        let pixel_values = if h % p != 0 || w % p != 0 {
            pixel_values.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?
        } else {
            pixel_values.clone()
        };
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p]: each row is one patch flattened in the
        // conv weight's (channel, row, col) order; patches in row-major grid order as HF's
        // `flatten(2).transpose(1, 2)`.
        let patches = pixel_values
            .reshape(vec![b, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((b, gh * gw, c * p * p))?;
        let x = self.patch_embedding.forward(&patches)?;
        Ok(x.broadcast_add(&self.position_embedding)?)
    }

    /// The hidden state after `layers_used` encoder layers: `[B, 3, H, W]` ->
    /// `[B, num_patches, hidden]` (HF `hidden_states[layers_used]`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(pixel_values)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// Every hidden state on the way: element 0 is the embeddings, element `i` the output of
    /// layer `i` (HF `hidden_states[0..=layers_used]`).
    pub fn forward_hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let mut states = vec![self.embed(pixel_values)?];
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"))?;
            states.push(next);
        }
        Ok(states)
    }

    /// The image features TinyLLaVA hands to the connector: [`Self::forward`], then the
    /// selection `strategy` (`patch` drops the first token, `cls_patch` keeps all).
    pub fn features(&self, pixel_values: &Tensor, strategy: &str) -> Result<Tensor> {
        let select = FeatureSelect::parse(strategy)?;
        let x = self.forward(pixel_values)?;
        match select {
            FeatureSelect::Patch => {
                let n = x.dim(1)?;
                Ok(x.narrow(1, 1, n - 1)?)
            }
            FeatureSelect::ClsPatch => Ok(x),
        }
    }

    /// The loaded weights under their checkpoint names relative to the `vision_model` prefix
    /// (`embeddings.*`, `encoder.layers.{i}.*` for the layers used). Layers past `layers_used`,
    /// `post_layernorm` and `head` are not held and so not listed.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let d = self.cfg.hidden_size;
        let (c, p) = (self.cfg.num_channels, self.cfg.patch_size);
        let mut out = Vec::new();
        // The conv weight goes back to its 4-D shape; the reshape of a contiguous tensor
        // cannot fail, but stay panic-free and keep the 2-D form if it somehow does.
        let conv_w = self.patch_embedding.weight.reshape((d, c, p, p));
        out.push((
            "embeddings.patch_embedding.weight".to_string(),
            conv_w.unwrap_or_else(|_| self.patch_embedding.weight.clone()),
        ));
        if let Some(b) = &self.patch_embedding.bias {
            out.push(("embeddings.patch_embedding.bias".to_string(), b.clone()));
        }
        out.push((
            "embeddings.position_embedding.weight".to_string(),
            self.position_embedding.clone(),
        ));
        let linear = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        let norm = |out: &mut Vec<(String, Tensor)>, name: String, n: &LayerNorm| {
            out.push((format!("{name}.weight"), n.weight.clone()));
            out.push((format!("{name}.bias"), n.bias.clone()));
        };
        for (i, l) in self.layers.iter().enumerate() {
            let pre = format!("encoder.layers.{i}");
            norm(&mut out, format!("{pre}.layer_norm1"), &l.layer_norm1);
            linear(
                &mut out,
                format!("{pre}.self_attn.q_proj"),
                &l.self_attn.q_proj,
            );
            linear(
                &mut out,
                format!("{pre}.self_attn.k_proj"),
                &l.self_attn.k_proj,
            );
            linear(
                &mut out,
                format!("{pre}.self_attn.v_proj"),
                &l.self_attn.v_proj,
            );
            linear(
                &mut out,
                format!("{pre}.self_attn.out_proj"),
                &l.self_attn.out_proj,
            );
            norm(&mut out, format!("{pre}.layer_norm2"), &l.layer_norm2);
            linear(&mut out, format!("{pre}.mlp.fc1"), &l.mlp.fc1);
            linear(&mut out, format!("{pre}.mlp.fc2"), &l.mlp.fc2);
        }
        out
    }

    /// Check a `[B, C, H, W]` input against the config (no position interpolation here).
    fn check_input(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let dims = x.dims();
        let expected = [
            self.cfg.num_channels,
            self.cfg.image_size,
            self.cfg.image_size,
        ];
        match dims {
            &[b, c, h, w] if [c, h, w] == expected && b > 0 => Ok((b, c, h, w)),
            _ => Err(Error::Invalid(format!(
                "{LOCATION}: pixel values of shape {dims:?}, expected [batch, {}, {}, {}]",
                expected[0], expected[1], expected[2]
            ))),
        }
    }
}
