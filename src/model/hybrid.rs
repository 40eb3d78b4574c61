//! MaTVLM hybrids: a teacher with some attention mixers swapped for Mamba-2, and the upstream
//! checkpoint format (`mamba_config.json` beside TinyLLaVA-layout weights, Mamba layers under
//! `language_model.model.layers.{i}.mamba.*`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::decoder::Mixer;
use super::mamba2::Mamba2Config;
use super::placement::Placement;
use super::vlm::Vlm;
use crate::config::{read_json, write_json, PhiConfig};
use crate::init::{mixer_from_attention, InitOptions};
use crate::{Error, Result};

/// What to build: which layers, how to initialise them, and optionally a mixer shape other than
/// MaTVLM's (d_state = head_dim, one head and one group per attention head, d_inner = hidden).
#[derive(Debug, Clone)]
pub struct HybridSpec {
    pub placement: Placement,
    pub init: InitOptions,
    pub mamba: Option<Mamba2Config>,
}

impl HybridSpec {
    /// The upstream recipe at a ratio (0.125, 0.25, 0.5), initialised from attention.
    pub fn ratio(ratio: f64) -> Self {
        Self {
            placement: Placement::Upstream(ratio),
            init: InitOptions::default(),
            mamba: None,
        }
    }

    pub fn layers(ids: Vec<usize>) -> Self {
        Self {
            placement: Placement::Explicit(ids),
            init: InitOptions::default(),
            mamba: None,
        }
    }
}

fn d_expand() -> usize {
    1
}
fn d_four() -> usize {
    4
}
fn d_chunk() -> usize {
    256
}
fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "gelu_new".into()
}

/// `ssm_cfg` of upstream's `mamba_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SsmCfg {
    #[serde(default = "d_expand")]
    pub expand: usize,
    pub ngroups: usize,
    pub d_state: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headdim: Option<usize>,
    #[serde(default = "d_four")]
    pub d_conv: usize,
    #[serde(default = "d_chunk")]
    pub chunk_size: usize,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Upstream MaTVLM's `mamba_config.json` (`PhiMambaConfig`), plus our full mixer config under
/// `matvlm_mixer` so non-default choices round-trip (upstream readers ignore the extra field).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MambaConfigFile {
    pub d_model: usize,
    pub ssm_cfg: SsmCfg,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub vocab_size: Option<usize>,
    #[serde(default)]
    pub d_inner: Option<usize>,
    #[serde(default)]
    pub d_xb: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    pub n_layer: usize,
    pub attn_layers: Vec<usize>,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub bidirectional: bool,
    #[serde(default)]
    pub is_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matvlm_mixer: Option<Mamba2Config>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl MambaConfigFile {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Describe a hybrid decoder for saving.
    pub fn describe(phi: &PhiConfig, mixer: &Mamba2Config, attn_layers: Vec<usize>) -> Self {
        Self {
            d_model: mixer.d_model,
            ssm_cfg: SsmCfg {
                expand: mixer.d_inner / mixer.d_model.max(1),
                ngroups: mixer.n_groups,
                d_state: mixer.d_state,
                headdim: Some(mixer.head_dim),
                d_conv: mixer.d_conv,
                chunk_size: mixer.chunk_size,
                extra: Default::default(),
            },
            rms_norm_eps: mixer.norm_eps,
            vocab_size: Some(phi.vocab_size),
            d_inner: Some(mixer.d_inner),
            d_xb: Some(mixer.n_groups * mixer.d_state),
            intermediate_size: Some(phi.intermediate_size),
            hidden_act: phi.hidden_act.clone(),
            n_layer: phi.num_hidden_layers,
            attn_layers,
            resid_pdrop: 0.0,
            bidirectional: false,
            is_bias: mixer.in_proj_bias,
            matvlm_mixer: Some(mixer.clone()),
            extra: Default::default(),
        }
    }

    /// The mixer config of every Mamba layer.
    pub fn mixer_config(&self) -> Result<Mamba2Config> {
        if let Some(m) = &self.matvlm_mixer {
            return Ok(m.clone());
        }
        let d_inner = self
            .d_inner
            .unwrap_or(self.d_model * self.ssm_cfg.expand.max(1));
        if let Some(d_xb) = self.d_xb {
            if d_xb != d_inner {
                return Err(Error::Invalid(format!(
                    "mamba_config.json: d_xb = {d_xb} differs from d_inner = {d_inner} \
                     (grouped-query mixers are not supported)"
                )));
            }
        }
        let head_dim = self.ssm_cfg.headdim.unwrap_or(self.ssm_cfg.d_state);
        if head_dim == 0 || !d_inner.is_multiple_of(head_dim) {
            return Err(Error::Invalid(format!(
                "mamba_config.json: head dim {head_dim} does not divide d_inner {d_inner}"
            )));
        }
        let mut cfg = Mamba2Config::new(
            self.d_model,
            d_inner / head_dim,
            head_dim,
            self.ssm_cfg.d_state,
            self.ssm_cfg.ngroups,
        );
        cfg.d_inner = d_inner;
        cfg.d_conv = self.ssm_cfg.d_conv;
        cfg.chunk_size = self.ssm_cfg.chunk_size;
        cfg.norm_eps = self.rms_norm_eps;
        cfg.in_proj_bias = self.is_bias;
        cfg.out_proj_bias = self.is_bias;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The Mamba layer ids: every layer not listed in `attn_layers`.
    pub fn mamba_layers(&self) -> Result<Vec<usize>> {
        if let Some(&bad) = self.attn_layers.iter().find(|&&i| i >= self.n_layer) {
            return Err(Error::Invalid(format!(
                "mamba_config.json: attention layer {bad} is out of range for n_layer = {}",
                self.n_layer
            )));
        }
        Ok((0..self.n_layer)
            .filter(|i| !self.attn_layers.contains(i))
            .collect())
    }
}

impl Vlm {
    /// A hybrid of this model: the layers chosen by `spec.placement` get a Mamba-2 mixer
    /// initialised per `spec.init`; every other weight is shared with `self` (tensors are
    /// reference-counted, nothing is copied). Layers that are Mamba already stay as they are.
    pub fn hybrid(&self, spec: &HybridSpec) -> Result<Vlm> {
        let n = self.decoder.blocks.len();
        let ids = spec.placement.layers(n)?;
        let mut out = self.clone();
        let hidden = self.decoder.cfg.hidden_size;
        for &i in &ids {
            let block = &mut out.decoder.blocks[i];
            let Mixer::Attention(attn) = &block.mixer else {
                continue;
            };
            let cfg = spec
                .mamba
                .clone()
                .unwrap_or_else(|| crate::init::mixer_config_for(attn, hidden));
            let mixer = mixer_from_attention(attn, &cfg, &spec.init, i, self.dtype, &self.device)?;
            block.mixer = Mixer::Mamba2(mixer);
        }
        Ok(out)
    }

    /// Ids of the decoder layers holding a Mamba-2 mixer.
    pub fn mamba_layers(&self) -> Vec<usize> {
        self.decoder.mamba_layers()
    }

    /// The mixer config shared by the Mamba layers (`None` for a teacher).
    pub fn mamba_config(&self) -> Option<Mamba2Config> {
        self.decoder.blocks.iter().find_map(|b| match &b.mixer {
            Mixer::Mamba2(m) => Some(m.cfg.clone()),
            Mixer::Attention(_) => None,
        })
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Bytes the inference cache holds for `batch` sequences of `seq_len` positions: keys and
    /// values (model dtype) for attention layers; conv and SSM states (f32 for half models, as
    /// the mixer keeps them) for Mamba layers, independent of `seq_len`.
    pub fn cache_bytes(&self, batch: usize, seq_len: usize) -> usize {
        let elt = self.dtype.size_in_bytes();
        let state_elt = crate::model::mamba2::compute_dtype(self.dtype).size_in_bytes();
        self.decoder
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => 2 * batch * seq_len * a.num_kv_heads * a.head_dim * elt,
                Mixer::Mamba2(m) => {
                    let c = &m.cfg;
                    batch
                        * (c.conv_dim() * c.d_conv + c.n_heads * c.head_dim * c.d_state)
                        * state_elt
                }
            })
            .sum()
    }

    /// The `mamba_config.json` describing this model (`None` for a teacher).
    pub fn mamba_config_file(&self) -> Option<MambaConfigFile> {
        let mixer = self.mamba_config()?;
        let mamba = self.mamba_layers();
        let attn = (0..self.decoder.blocks.len())
            .filter(|i| !mamba.contains(i))
            .collect();
        Some(MambaConfigFile::describe(&self.decoder.cfg, &mixer, attn))
    }
}

/// Check that `mamba_config.json` and the weights agree on which layer is which, so a mismatch
/// is reported as such instead of as a missing key deep inside a layer.
pub fn check_layers_against_weights(
    file: &MambaConfigFile,
    has: impl Fn(&str) -> bool,
    n_layers: usize,
) -> Result<Vec<usize>> {
    if file.n_layer != n_layers {
        return Err(Error::Invalid(format!(
            "mamba_config.json has n_layer = {} but the decoder has {n_layers} layers",
            file.n_layer
        )));
    }
    let mamba = file.mamba_layers()?;
    for i in 0..n_layers {
        let p = format!("language_model.model.layers.{i}");
        let holds_mamba = has(&format!("{p}.mamba.in_proj.weight"));
        let holds_attn = has(&format!("{p}.self_attn.q_proj.weight"));
        let listed_mamba = mamba.contains(&i);
        if listed_mamba && !holds_mamba && holds_attn {
            return Err(Error::Invalid(format!(
                "mamba_config.json makes layer {i} a Mamba layer (not in attn_layers), but the \
                 weights hold attention there ({p}.self_attn.*) and no {p}.mamba.*"
            )));
        }
        if !listed_mamba && holds_mamba && !holds_attn {
            return Err(Error::Invalid(format!(
                "mamba_config.json lists layer {i} in attn_layers, but the weights hold a Mamba \
                 mixer there ({p}.mamba.*) and no {p}.self_attn.*"
            )));
        }
    }
    Ok(mamba)
}

/// Write `mamba_config.json` next to a saved hybrid.
pub fn save_mamba_config(vlm: &Vlm, dir: &Path) -> Result<()> {
    if let Some(file) = vlm.mamba_config_file() {
        write_json(&dir.join(crate::checkpoint::MAMBA_CONFIG), &file)?;
    }
    Ok(())
}
