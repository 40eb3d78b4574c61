//! The shape and numerics of one Mamba-2 mixer, serialisable next to a checkpoint.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn d_norm_eps() -> f64 {
    1e-5
}
fn d_dt_min() -> f64 {
    1e-3
}
fn d_dt_max() -> f64 {
    0.1
}
fn d_dt_floor() -> f64 {
    1e-4
}
fn d_a_range() -> (f64, f64) {
    (1.0, 16.0)
}
fn d_true() -> bool {
    true
}

/// Configuration of a Mamba-2 mixer (upstream `mamba_ssm.modules.mamba2.Mamba2` vocabulary).
///
/// `in_proj` produces, in this row order, `z [d_inner] | x [d_inner] | B [n_groups*d_state] |
/// C [n_groups*d_state] | dt [n_heads]`; the causal depthwise conv runs over the `x|B|C` block
/// (`conv_dim` channels). Heads `g*(n_heads/n_groups) .. (g+1)*(n_heads/n_groups)` share group
/// `g`'s B and C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mamba2Config {
    pub d_model: usize,
    /// Width of the SSM path; must equal `n_heads * head_dim`.
    pub d_inner: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub d_state: usize,
    pub n_groups: usize,
    pub d_conv: usize,
    #[serde(default = "d_true")]
    pub conv_bias: bool,
    #[serde(default)]
    pub in_proj_bias: bool,
    #[serde(default)]
    pub out_proj_bias: bool,
    pub chunk_size: usize,
    /// Clamp of dt after softplus (upstream `dt_limit`); `None` is upstream's `(0, inf)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dt_limit: Option<(f64, f64)>,
    /// Channels per RMSNorm group; `None` means `d_inner / n_groups` (upstream's choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_group_size: Option<usize>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Initialisation: dt is sampled log-uniformly in `[dt_min, dt_max]`, floored at `dt_init_floor`.
    #[serde(default = "d_dt_min")]
    pub dt_min: f64,
    #[serde(default = "d_dt_max")]
    pub dt_max: f64,
    #[serde(default = "d_dt_floor")]
    pub dt_init_floor: f64,
    /// Initialisation: `A = -U(a_init_range)`, stored as `A_log = log(-A)`.
    #[serde(default = "d_a_range")]
    pub a_init_range: (f64, f64),
}

impl Mamba2Config {
    /// A config with upstream defaults for everything but the sizes (`d_inner = n_heads * head_dim`,
    /// d_conv 4, chunk 256, conv bias, no projection biases, no dt limit).
    pub fn new(
        d_model: usize,
        n_heads: usize,
        head_dim: usize,
        d_state: usize,
        n_groups: usize,
    ) -> Self {
        Self {
            d_model,
            d_inner: n_heads * head_dim,
            n_heads,
            head_dim,
            d_state,
            n_groups,
            d_conv: 4,
            conv_bias: true,
            in_proj_bias: false,
            out_proj_bias: false,
            chunk_size: 256,
            dt_limit: None,
            norm_group_size: None,
            norm_eps: d_norm_eps(),
            dt_min: d_dt_min(),
            dt_max: d_dt_max(),
            dt_init_floor: d_dt_floor(),
            a_init_range: d_a_range(),
        }
    }

    /// The mixer MaTVLM puts in place of an attention layer with `n_heads` heads of `head_dim`:
    /// one SSM head and one B/C group per attention head, `d_state = head_dim` (so C, B and x can
    /// start as q, k and v), `d_inner = hidden`.
    pub fn from_attention(hidden: usize, n_heads: usize, head_dim: usize) -> Self {
        let mut cfg = Self::new(hidden, n_heads, head_dim, head_dim, n_heads);
        cfg.d_inner = hidden;
        cfg
    }

    /// Channels of the causal conv: `x | B | C`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.n_groups * self.d_state
    }

    /// Rows of `in_proj`: `z | x | B | C | dt`.
    pub fn in_proj_dim(&self) -> usize {
        self.d_inner + self.conv_dim() + self.n_heads
    }

    /// Channels per RMSNorm group (`norm_group_size` or `d_inner / n_groups`).
    pub fn norm_group(&self) -> usize {
        self.norm_group_size
            .unwrap_or(self.d_inner / self.n_groups.max(1))
    }

    /// Check the sizes fit together; every constructor of a mixer calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("Mamba2Config: {msg}")));
        let sizes = [
            ("d_model", self.d_model),
            ("d_inner", self.d_inner),
            ("n_heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("d_state", self.d_state),
            ("n_groups", self.n_groups),
            ("d_conv", self.d_conv),
            ("chunk_size", self.chunk_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
            // Bounded first, so that no product below can overflow and a corrupt config is
            // an error instead of an allocation of its size.
            if v > crate::config::MAX_DIM {
                return bad(format!(
                    "{name} = {v} is larger than {}",
                    crate::config::MAX_DIM
                ));
            }
        }
        if self.n_heads * self.head_dim != self.d_inner {
            return bad(format!(
                "n_heads * head_dim = {} * {} != d_inner = {}",
                self.n_heads, self.head_dim, self.d_inner
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_groups) {
            return bad(format!(
                "n_heads = {} is not a multiple of n_groups = {}",
                self.n_heads, self.n_groups
            ));
        }
        let gs = self.norm_group();
        if gs == 0 || !self.d_inner.is_multiple_of(gs) {
            return bad(format!(
                "norm group size {gs} does not divide d_inner = {}",
                self.d_inner
            ));
        }
        if let Some((lo, hi)) = self.dt_limit {
            if !(lo >= 0.0 && lo <= hi) {
                return bad(format!("dt_limit ({lo}, {hi}) must satisfy 0 <= lo <= hi"));
            }
        }
        if !(self.dt_min > 0.0 && self.dt_min <= self.dt_max) {
            return bad(format!(
                "dt init range ({}, {}) must satisfy 0 < dt_min <= dt_max",
                self.dt_min, self.dt_max
            ));
        }
        let (a_lo, a_hi) = self.a_init_range;
        if !(a_lo > 0.0 && a_lo <= a_hi) {
            return bad(format!(
                "a_init_range ({a_lo}, {a_hi}) must satisfy 0 < lo <= hi"
            ));
        }
        Ok(())
    }
}
