//! Which mixer each decoder layer holds: the one description of a model's layers that loading,
//! saving, caches, distillation and display all read.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::placement::validate_layers;
use crate::model::mamba2::Mamba2Config;
use crate::{Error, Result};

/// The sequence mixer of one decoder layer. Scripts and files spell them `"attn"` and `"mamba"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MixerKind {
    #[serde(rename = "attn")]
    Attention,
    #[serde(rename = "mamba")]
    Mamba2,
}

impl MixerKind {
    /// The name scripts, figures and tables use.
    pub fn name(self) -> &'static str {
        match self {
            MixerKind::Attention => "attn",
            MixerKind::Mamba2 => "mamba",
        }
    }
}

impl fmt::Display for MixerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `kind == "mamba"`: lets tests and callers holding names compare without a lookup table.
impl PartialEq<&str> for MixerKind {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl PartialEq<MixerKind> for &str {
    fn eq(&self, other: &MixerKind) -> bool {
        *self == other.name()
    }
}

/// The layers of a decoder: a kind per layer, and the one mixer config every Mamba layer shares.
/// Built once (from a placement, a `mamba_config.json`, or a teacher's layer count) and kept by
/// the decoder; a plan with Mamba layers always carries their config.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    kinds: Vec<MixerKind>,
    mamba_layers: Vec<usize>,
    mixer: Option<Mamba2Config>,
}

impl LayerPlan {
    /// Every layer attention (a teacher).
    pub fn attention(n_layers: usize) -> Self {
        Self {
            kinds: vec![MixerKind::Attention; n_layers],
            mamba_layers: Vec::new(),
            mixer: None,
        }
    }

    /// Layers `mamba_layers` (checked: in range, none twice) hold a Mamba-2 mixer of config
    /// `mixer`, the others attention.
    pub fn hybrid(n_layers: usize, mamba_layers: &[usize], mixer: Mamba2Config) -> Result<Self> {
        validate_layers(mamba_layers, n_layers)?;
        if mamba_layers.is_empty() {
            return Ok(Self::attention(n_layers));
        }
        mixer.validate()?;
        let mut kinds = vec![MixerKind::Attention; n_layers];
        for &i in mamba_layers {
            kinds[i] = MixerKind::Mamba2;
        }
        let mut ids = mamba_layers.to_vec();
        ids.sort_unstable();
        Ok(Self {
            kinds,
            mamba_layers: ids,
            mixer: Some(mixer),
        })
    }

    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// The kind of each layer, in order.
    pub fn kinds(&self) -> &[MixerKind] {
        &self.kinds
    }

    /// The kind of layer `i` (`None` past the last layer).
    pub fn kind(&self, i: usize) -> Option<MixerKind> {
        self.kinds.get(i).copied()
    }

    /// Ids of the Mamba layers, ascending.
    pub fn mamba_layers(&self) -> &[usize] {
        &self.mamba_layers
    }

    /// Ids of the attention layers, ascending (what upstream's `attn_layers` lists).
    pub fn attention_layers(&self) -> Vec<usize> {
        (0..self.kinds.len())
            .filter(|&i| self.kinds[i] == MixerKind::Attention)
            .collect()
    }

    /// The config of the Mamba layers (`None` for a teacher).
    pub fn mixer(&self) -> Option<&Mamba2Config> {
        self.mixer.as_ref()
    }

    pub fn is_hybrid(&self) -> bool {
        !self.mamba_layers.is_empty()
    }

    /// This plan with `layers` turned into Mamba layers of config `mixer` as well. Layers that
    /// are Mamba already keep theirs, so the new config must be the same as the plan's.
    pub fn with_mamba(&self, layers: &[usize], mixer: &Mamba2Config) -> Result<Self> {
        if let Some(own) = &self.mixer {
            if own != mixer {
                return Err(Error::Invalid(format!(
                    "the model's Mamba layers {:?} have another mixer config than the new ones \
                     would ({own:?} vs {mixer:?}); one model holds one mixer config",
                    self.mamba_layers
                )));
            }
        }
        let mut ids = self.mamba_layers.clone();
        ids.extend(layers.iter().filter(|i| !self.mamba_layers.contains(i)));
        Self::hybrid(self.len(), &ids, mixer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixer() -> Mamba2Config {
        Mamba2Config::new(32, 4, 8, 8, 4)
    }

    #[test]
    fn a_hybrid_plan_lists_its_layers_both_ways() {
        let p = LayerPlan::hybrid(4, &[2, 0], mixer()).unwrap();
        assert_eq!(p.mamba_layers(), &[0, 2]);
        assert_eq!(p.attention_layers(), vec![1, 3]);
        assert_eq!(p.kinds(), vec!["mamba", "attn", "mamba", "attn"]);
        assert!(p.is_hybrid());
        assert!(!LayerPlan::attention(4).is_hybrid());
        assert_eq!(
            LayerPlan::hybrid(4, &[], mixer()).unwrap(),
            LayerPlan::attention(4)
        );
    }

    #[test]
    fn bad_plans_are_errors() {
        let e = LayerPlan::hybrid(4, &[4], mixer()).unwrap_err();
        assert!(e.to_string().contains("layer id 4"), "{e}");
        let p = LayerPlan::hybrid(4, &[0], mixer()).unwrap();
        let mut other = mixer();
        other.d_conv = 2;
        let e = p.with_mamba(&[1], &other).unwrap_err();
        assert!(e.to_string().contains("one mixer config"), "{e}");
        assert_eq!(
            p.with_mamba(&[1, 0], &mixer()).unwrap().mamba_layers(),
            &[0, 1]
        );
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        let json = serde_json::to_string(&[MixerKind::Attention, MixerKind::Mamba2]).unwrap();
        assert_eq!(json, r#"["attn","mamba"]"#);
        let back: Vec<MixerKind> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![MixerKind::Attention, MixerKind::Mamba2]);
    }
}
