//! MaTVLM hybrids: which decoder layers hold a Mamba-2 mixer instead of attention, how those
//! mixers start, and how the choice is stored.
//!
//! * [`plan`]: [`LayerPlan`], the resolved kind of every layer ([`MixerKind`]), which the decoder
//!   keeps and everything else reads.
//! * [`placement`]: rules that pick the Mamba layers ([`Placement`], [`Rule`]).
//! * [`init`]: a Mamba-2 mixer initialised from the attention layer it replaces.
//! * [`format`]: upstream's `mamba_config.json`.
//!
//! [`crate::model::vlm::Vlm::hybrid`] builds a hybrid from a [`HybridSpec`]; scripts describe one
//! with a [`HybridRequest`].

pub mod format;
pub mod init;
pub mod placement;
pub mod plan;

use serde::Deserialize;

pub use format::MambaConfigFile;
pub use init::{mixer_from_attention, InitOptions};
pub use placement::{layers_for_ratio, Placement, Rule};
pub use plan::{LayerPlan, MixerKind};

use crate::model::mamba2::Mamba2Config;
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
    /// The MaTVLM recipe at a ratio (0.125, 0.25, 0.5), initialised from attention.
    pub fn ratio(ratio: f64) -> Self {
        Self::new(Placement::ratio(ratio))
    }

    /// Exactly these Mamba layers, initialised from attention.
    pub fn layers(ids: Vec<usize>) -> Self {
        Self::new(Placement::Explicit(ids))
    }

    fn new(placement: Placement) -> Self {
        Self {
            placement,
            init: InitOptions::default(),
            mamba: None,
        }
    }
}

/// How the new mixers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitFrom {
    /// From the attention weights they replace (MaTVLM).
    #[default]
    Attention,
    /// Fresh random weights (the baseline).
    Random,
}

/// A hybrid as scripts ask for one (`m.hybrid(#{ ratio: 0.25 })`): either a `ratio` placed by a
/// [`Rule`] (MaTVLM's by default) or an explicit list of `mamba_layers`, the initialisation and
/// its single switches. Every field left out takes [`InitOptions::default`]'s value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridRequest {
    pub ratio: Option<f64>,
    pub placement: Option<Rule>,
    pub mamba_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub init: InitFrom,
    #[serde(default)]
    pub seed: u64,
    pub copy_x: Option<bool>,
    pub copy_b: Option<bool>,
    pub copy_c: Option<bool>,
    pub copy_out_proj: Option<bool>,
    pub carry_biases: Option<bool>,
}

impl HybridRequest {
    /// The spec this request stands for; a request with both or neither of `ratio` and
    /// `mamba_layers` (or a `placement` rule beside a list) is an error.
    pub fn spec(&self) -> Result<HybridSpec> {
        let placement = match (self.ratio, &self.mamba_layers, self.placement) {
            (Some(ratio), None, rule) => Placement::Ratio {
                rule: rule.unwrap_or_default(),
                ratio,
            },
            (None, Some(ids), None) => Placement::Explicit(ids.clone()),
            (None, Some(_), Some(_)) => {
                return Err(Error::Invalid(
                    "hybrid: `placement` picks layers for a `ratio`; it does not apply to an \
                     explicit `mamba_layers` list"
                        .into(),
                ))
            }
            _ => {
                return Err(Error::Invalid(
                    "hybrid: give either `ratio` or `mamba_layers` (not both)".into(),
                ))
            }
        };
        let mut init = match self.init {
            InitFrom::Attention => InitOptions::default(),
            InitFrom::Random => InitOptions::random(0),
        };
        init.seed = self.seed;
        let switches = [
            (self.copy_x, &mut init.copy_x),
            (self.copy_b, &mut init.copy_b),
            (self.copy_c, &mut init.copy_c),
            (self.copy_out_proj, &mut init.copy_out_proj),
            (self.carry_biases, &mut init.carry_biases),
        ];
        for (given, field) in switches {
            if let Some(v) = given {
                *field = v;
            }
        }
        Ok(HybridSpec {
            placement,
            init,
            mamba: None,
        })
    }
}
