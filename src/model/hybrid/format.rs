//! The MaTVLM checkpoint format: `mamba_config.json` beside TinyLLaVA-layout weights, Mamba
//! layers under `language_model.model.layers.{i}.mamba.*`. The only code that reads or writes
//! that file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::plan::LayerPlan;
use crate::checkpoint::MAMBA_CONFIG;
use crate::config::PhiConfig;
use crate::io::{read_json, write_json};
use crate::model::mamba2::Mamba2Config;
use crate::{Error, Result};

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

    /// Describe a hybrid decoder for saving (`None` for a teacher's plan).
    pub fn describe(phi: &PhiConfig, plan: &LayerPlan) -> Option<Self> {
        let mixer = plan.mixer()?;
        Some(Self {
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
            n_layer: plan.len(),
            attn_layers: plan.attention_layers(),
            resid_pdrop: 0.0,
            bidirectional: false,
            is_bias: mixer.in_proj_bias,
            matvlm_mixer: Some(mixer.clone()),
            extra: Default::default(),
        })
    }

    /// The mixer config of every Mamba layer.
    pub fn mixer_config(&self) -> Result<Mamba2Config> {
        if let Some(m) = &self.matvlm_mixer {
            return Ok(m.clone());
        }
        let d_inner = self
            .d_inner
            .unwrap_or(self.d_model.saturating_mul(self.ssm_cfg.expand.max(1)));
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

/// The layer plan of a checkpoint: read `path` (its `mamba_config.json`) and check that it and
/// the weights agree on which layer is which, so a mismatch is reported as such instead of as a
/// missing key deep inside a layer. `has` tells whether the weights hold a tensor name.
pub fn read_plan(path: &Path, has: impl Fn(&str) -> bool, n_layers: usize) -> Result<LayerPlan> {
    let file = MambaConfigFile::from_file(path)?;
    // The checks below report bare messages; here they get the file's full path.
    let in_file = |e: Error| match e {
        Error::Invalid(reason) => Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    };
    let mamba = check_layers_against_weights(&file, has, n_layers).map_err(in_file)?;
    let mixer = file.mixer_config().map_err(in_file)?;
    LayerPlan::hybrid(n_layers, &mamba, mixer).map_err(in_file)
}

/// Write `mamba_config.json` into the checkpoint folder `dir` for a hybrid's plan; for a
/// teacher's, remove one left there by an earlier save (a stale layer map would turn the
/// teacher into a hybrid on the next load).
pub fn write_plan(dir: &Path, phi: &PhiConfig, plan: &LayerPlan) -> Result<()> {
    let path = dir.join(MAMBA_CONFIG);
    match MambaConfigFile::describe(phi, plan) {
        Some(file) => write_json(&path, &file),
        None if path.exists() => std::fs::remove_file(&path).map_err(|e| Error::io(&path, e)),
        None => Ok(()),
    }
}

fn check_layers_against_weights(
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
