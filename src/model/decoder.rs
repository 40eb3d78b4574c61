//! The decoder: token embeddings, blocks, final LayerNorm, lm_head (HF `PhiForCausalLM` names).
//!
//! One block type with two possible mixers: a teacher is a decoder whose blocks all hold
//! attention; a MaTVLM hybrid swaps some of them for Mamba-2 and keeps everything else.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::cache::{Cache, CacheLayout, LayerCache};
use super::hybrid::{mixer_from_attention, InitOptions, LayerPlan, MixerKind};
use super::layers::{LayerNorm, Linear};
use super::mamba2::{Mamba2, Mamba2Config};
use super::phi::{causal_mask, AttentionInputs, KvCache, PhiAttention, PhiMlp, Rotary};
use crate::config::PhiConfig;
use crate::{Error, Result};

/// The sequence mixer of one block.
#[derive(Debug, Clone)]
pub enum Mixer {
    Attention(PhiAttention),
    Mamba2(Mamba2),
}

impl Mixer {
    pub fn kind(&self) -> MixerKind {
        match self {
            Mixer::Attention(_) => MixerKind::Attention,
            Mixer::Mamba2(_) => MixerKind::Mamba2,
        }
    }
}

/// `h = x + mixer(LN(x)) + MLP(LN(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: LayerNorm,
    pub mixer: Mixer,
    pub mlp: PhiMlp,
}

/// What a forward pass should hand back besides the logits. Names of captured tensors:
/// `layers.{i}.input` and `layers.{i}.output` (hidden states around block i),
/// `layers.{i}.mixer_input` (the LayerNorm output the mixer sees), `layers.{i}.mixer_output`,
/// `layers.{i}.attn_weights` (`[B, H, T, T_total]`), `final_hidden` (before the final LayerNorm).
#[derive(Debug, Clone, Default)]
pub struct Capture {
    pub hidden: bool,
    pub mixer: bool,
    pub attn_weights: bool,
    /// Restrict to these layers (all when `None`).
    pub layers: Option<Vec<usize>>,
}

impl Capture {
    pub fn none() -> Self {
        Self::default()
    }
    pub fn hidden_states() -> Self {
        Self {
            hidden: true,
            ..Self::default()
        }
    }
    fn wants(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

pub type Captured = BTreeMap<String, Tensor>;

/// What every block of one forward call shares.
struct StepInputs {
    attention: AttentionInputs,
    /// `[B, T]` f32, 0 at left-padding positions: Mamba layers must not let padding into their
    /// conv or SSM state. `None` when no position of the call is padding.
    keep: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub final_layernorm: LayerNorm,
    pub lm_head: Linear,
    pub rotary: Rotary,
    pub cfg: PhiConfig,
    /// Which mixer each block holds; kept in step with `blocks` by every constructor here.
    plan: LayerPlan,
}

impl Decoder {
    /// Load a decoder whose layers hold the mixers `plan` lists: attention under
    /// `...layers.{i}.self_attn.*`, Mamba-2 under `...layers.{i}.mamba.*`. `vb` is at the
    /// `language_model` prefix.
    pub fn load(vb: VarBuilder, cfg: &PhiConfig, plan: &LayerPlan) -> candle_core::Result<Self> {
        if plan.len() != cfg.num_hidden_layers {
            candle_core::bail!(
                "the layer plan has {} layers but the config {}",
                plan.len(),
                cfg.num_hidden_layers
            );
        }
        let m = vb.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            blocks.push(Block {
                input_layernorm: LayerNorm::load(
                    l.pp("input_layernorm"),
                    cfg.hidden_size,
                    cfg.layer_norm_eps,
                )?,
                mixer: match (plan.kind(i), plan.mixer()) {
                    (Some(MixerKind::Mamba2), Some(mc)) => {
                        Mixer::Mamba2(Mamba2::load(l.pp("mamba"), mc)?)
                    }
                    _ => Mixer::Attention(PhiAttention::load(l.pp("self_attn"), cfg)?),
                },
                mlp: PhiMlp::load(l.pp("mlp"), cfg)?,
            });
        }
        let final_layernorm =
            LayerNorm::load(m.pp("final_layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear {
                weight: embed_tokens.clone(),
                bias: None,
            }
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, true)?
        };
        Ok(Self {
            embed_tokens,
            blocks,
            final_layernorm,
            lm_head,
            rotary: Rotary::new(cfg),
            cfg: cfg.clone(),
            plan: plan.clone(),
        })
    }

    /// This decoder with layers `ids` turned into Mamba-2 layers, each mixer built from the
    /// attention it replaces per `init` (config `mixer`, or MaTVLM's from the attention shape).
    /// Every other tensor is shared with `self`; layers that are Mamba already stay as they are.
    pub fn hybrid(
        &self,
        ids: &[usize],
        mixer: Option<&Mamba2Config>,
        init: &InitOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut out = self.clone();
        let mut new_cfg: Option<Mamba2Config> = None;
        for &i in ids {
            let block = out
                .blocks
                .get_mut(i)
                .ok_or_else(|| Error::Invalid(format!("no decoder layer {i}")))?;
            let Mixer::Attention(attn) = &block.mixer else {
                continue;
            };
            let cfg = mixer.cloned().unwrap_or_else(|| {
                Mamba2Config::from_attention(self.cfg.hidden_size, attn.num_heads, attn.head_dim)
            });
            block.mixer = Mixer::Mamba2(mixer_from_attention(attn, &cfg, init, i, dtype, device)?);
            new_cfg.get_or_insert(cfg);
        }
        if let Some(cfg) = new_cfg {
            out.plan = self.plan.with_mamba(ids, &cfg)?;
        }
        Ok(out)
    }

    /// Which mixer each layer holds.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// A fresh, empty cache with one entry per block, sized by what is written.
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.blocks.len())
                .map(|i| self.new_layer_cache(i))
                .collect(),
            seq_len: 0,
            layout: None,
        }
    }

    /// A cache for generating from `left_pad.len()` rows, each left-padded by `left_pad[b]`
    /// positions, holding `capacity` positions in all: key/value buffers allocated once in
    /// `dtype` on `device`, rotary tables and the key-padding mask made there once.
    pub fn cache_for(
        &self,
        capacity: usize,
        left_pad: Vec<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Cache> {
        let batch = left_pad.len();
        let mut layout = CacheLayout::new(capacity, left_pad, device)?;
        let (cos, sin) = self.rotary.tables(0, capacity, device)?;
        layout.rotary = Some((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?));
        let layers = self
            .blocks
            .iter()
            .map(|block| {
                Ok(match &block.mixer {
                    Mixer::Attention(a) => LayerCache::Attention(Some(KvCache::with_capacity(
                        batch,
                        a.num_kv_heads,
                        capacity,
                        a.head_dim,
                        dtype,
                        device,
                    )?)),
                    Mixer::Mamba2(_) => LayerCache::Mamba(None),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Cache {
            layers,
            seq_len: 0,
            layout: Some(layout),
        })
    }

    /// The rotary tables and mask every attention layer of a call over `t` positions uses.
    fn attention_inputs(
        &self,
        cache: &Cache,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<AttentionInputs> {
        let offset = cache.seq_len;
        let total = offset + t;
        let layout = cache.layout.as_ref();
        if let Some(l) = layout {
            if total > l.capacity {
                return Err(Error::Invalid(format!(
                    "the cache holds {} positions but this step needs {total}",
                    l.capacity
                )));
            }
        }
        let (cos, sin) = match layout.and_then(|l| l.rotary.as_ref()) {
            Some((cos, sin)) => (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?),
            None => {
                let (cos, sin) = self.rotary.tables(offset, t, device)?;
                (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?)
            }
        };
        let causal = if t > 1 {
            Some(causal_mask(t, total, offset, device)?)
        } else {
            None
        };
        let key_mask = match layout.and_then(|l| l.key_mask.as_ref()) {
            Some(m) => Some(m.narrow(3, 0, total)?),
            None => None,
        };
        let mask = match (causal, key_mask) {
            (Some(c), Some(k)) => Some(k.broadcast_add(&c)?),
            (c, k) => c.or(k),
        };
        let key_start = layout.and_then(|l| l.key_start.clone());
        Ok(AttentionInputs {
            cos,
            sin,
            mask,
            key_start,
        })
    }

    /// Embeddings of token ids `[B, T]` (u32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?)
    }

    /// Run the blocks over input embeddings `[B, T, hidden]` continuing from `cache`, and return
    /// the final hidden states (after the final LayerNorm).
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        capture: &Capture,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        let h = self.blocks_forward(embeds, cache, capture, captured)?;
        Ok(self.final_layernorm.forward(&h)?)
    }

    /// The blocks alone (no final LayerNorm), advancing `cache` by the embeddings' length.
    fn blocks_forward(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        capture: &Capture,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Invalid(format!(
                "the cache has {} layers but the decoder has {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let step = StepInputs {
            attention: self.attention_inputs(cache, t, embeds.dtype(), embeds.device())?,
            keep: match &cache.layout {
                Some(l) => l.keep_mask(cache.seq_len, t, DType::F32, embeds.device())?,
                None => None,
            },
        };
        let mut h = embeds.clone();
        for (i, layer_cache) in cache.layers.iter_mut().enumerate() {
            h = self.block_step(i, &h, &step, layer_cache, capture, captured)?;
        }
        cache.seq_len += t;
        if capture.hidden {
            captured.insert("final_hidden".into(), h.clone());
        }
        Ok(h)
    }

    /// Logits `[B, vocab]` of the last position only: a generation step computes the lm_head
    /// for the position it samples from, not for the whole prompt.
    pub fn forward_last(&self, embeds: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.blocks_forward(embeds, cache, &Capture::none(), &mut Captured::new())?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
        Ok(self
            .lm_head
            .forward(&self.final_layernorm.forward(&last)?)?)
    }

    /// Run block `i` on hidden states `h: [B, T, hidden]`, continuing from `layer_cache` at
    /// position `offset`. Distillation calls this alone, to run a student block on a teacher's
    /// hidden state.
    pub fn block_forward(
        &self,
        i: usize,
        h: &Tensor,
        offset: usize,
        layer_cache: &mut LayerCache,
        capture: &Capture,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        let probe = Cache {
            layers: Vec::new(),
            seq_len: offset,
            layout: None,
        };
        let step = StepInputs {
            attention: self.attention_inputs(&probe, h.dim(1)?, h.dtype(), h.device())?,
            keep: None,
        };
        self.block_step(i, h, &step, layer_cache, capture, captured)
    }

    fn block_step(
        &self,
        i: usize,
        h: &Tensor,
        step: &StepInputs,
        layer_cache: &mut LayerCache,
        capture: &Capture,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        let block = self
            .blocks
            .get(i)
            .ok_or_else(|| Error::Invalid(format!("no decoder layer {i}")))?;
        let t = h.dim(1)?;
        let wants = capture.wants(i);
        if wants && capture.hidden {
            captured.insert(format!("layers.{i}.input"), h.clone());
        }
        let normed = block.input_layernorm.forward(h)?;
        let mixed = match (&block.mixer, layer_cache) {
            (Mixer::Attention(attn), LayerCache::Attention(kv)) => {
                let (out, weights) = attn.forward(
                    &normed,
                    &self.rotary,
                    &step.attention,
                    kv,
                    wants && capture.attn_weights,
                )?;
                if let Some(w) = weights {
                    captured.insert(format!("layers.{i}.attn_weights"), w);
                }
                out
            }
            (Mixer::Mamba2(m), LayerCache::Mamba(state)) => match state {
                // One new token after a prefill: the single-step recurrence.
                Some(st) if t == 1 => m.step(&normed.squeeze(1)?, st)?.unsqueeze(1)?,
                _ => {
                    let (out, next) = m.forward_masked(&normed, state.as_ref(), step.keep.as_ref())?;
                    *state = Some(next);
                    out
                }
            },
            (mixer, _) => {
                return Err(Error::Invalid(format!(
                    "cache entry of layer {i} does not fit its {} mixer (a cache made for another model?)",
                    mixer.kind()
                )))
            }
        };
        if wants && capture.mixer {
            captured.insert(format!("layers.{i}.mixer_input"), normed.clone());
            captured.insert(format!("layers.{i}.mixer_output"), mixed.clone());
        }
        let mlp = block.mlp.forward(&normed)?;
        let out = ((h + mixed)? + mlp)?;
        if wants && capture.hidden {
            captured.insert(format!("layers.{i}.output"), out.clone());
        }
        Ok(out)
    }

    /// A fresh cache entry for block `i` (attention or Mamba).
    pub fn new_layer_cache(&self, i: usize) -> LayerCache {
        match self.plan.kind(i) {
            Some(MixerKind::Mamba2) => LayerCache::Mamba(None),
            _ => LayerCache::Attention(None),
        }
    }

    /// Logits `[B, T, vocab]` for input embeddings.
    pub fn forward(
        &self,
        embeds: &Tensor,
        cache: &mut Cache,
        capture: &Capture,
        captured: &mut Captured,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(embeds, cache, capture, captured)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Every parameter under its checkpoint name relative to `language_model.`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        let linear = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                block.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("{p}.input_layernorm.bias"),
                block.input_layernorm.bias.clone(),
            ));
            match &block.mixer {
                Mixer::Attention(a) => {
                    linear(&mut out, format!("{p}.self_attn.q_proj"), &a.q_proj);
                    linear(&mut out, format!("{p}.self_attn.k_proj"), &a.k_proj);
                    linear(&mut out, format!("{p}.self_attn.v_proj"), &a.v_proj);
                    linear(&mut out, format!("{p}.self_attn.dense"), &a.dense);
                }
                Mixer::Mamba2(m) => out.extend(
                    m.named_tensors()
                        .into_iter()
                        .map(|(k, t)| (format!("{p}.mamba.{k}"), t)),
                ),
            }
            linear(&mut out, format!("{p}.mlp.fc1"), &block.mlp.fc1);
            linear(&mut out, format!("{p}.mlp.fc2"), &block.mlp.fc2);
        }
        out.push((
            "model.final_layernorm.weight".into(),
            self.final_layernorm.weight.clone(),
        ));
        out.push((
            "model.final_layernorm.bias".into(),
            self.final_layernorm.bias.clone(),
        ));
        if !self.cfg.tie_word_embeddings {
            linear(&mut out, "lm_head".into(), &self.lm_head);
        }
        out
    }

    /// Ids of the Mamba layers, ascending.
    pub fn mamba_layers(&self) -> &[usize] {
        self.plan.mamba_layers()
    }

    /// The mixer kind of each layer, in order.
    pub fn layer_kinds(&self) -> &[MixerKind] {
        self.plan.kinds()
    }
}
