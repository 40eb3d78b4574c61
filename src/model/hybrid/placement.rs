//! Which decoder layers become Mamba-2 layers.
//!
//! MaTVLM's released models use fixed lists for Phi-2's 32 layers (0.125 -> [0, 6, 12, 18],
//! 0.25 -> every 4th layer from 0, 0.5 -> every 2nd from 0). A researcher prototyping placements
//! wants more: evenly spread, first, last, an explicit list, or any rule of their own.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How [`Placement::Ratio`] spreads its layers over the stack; scripts spell them in snake case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The upstream MaTVLM lists, generalised to any depth (see [`upstream_layers`]).
    #[default]
    Upstream,
    /// Spread evenly, centred in equal segments of the stack.
    #[serde(alias = "evenly")]
    Even,
    /// The first layers.
    First,
    /// The last layers.
    Last,
}

impl std::str::FromStr for Rule {
    type Err = Error;

    /// A rule by its name, as scripts and command lines spell it.
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::Invalid(format!(
                "unknown placement rule `{s}` (upstream, even, first, last)"
            ))
        })
    }
}

impl Rule {
    /// The `k = ratio * n_layers` layers this rule picks (unsorted, unchecked).
    fn pick(self, ratio: f64, k: usize, n_layers: usize) -> Result<Vec<usize>> {
        Ok(match self {
            Rule::Upstream => upstream_layers(ratio, n_layers)?,
            Rule::Even => (0..k).map(|i| ((2 * i + 1) * n_layers) / (2 * k)).collect(),
            Rule::First => (0..k).collect(),
            Rule::Last => (n_layers.saturating_sub(k)..n_layers).collect(),
        })
    }
}

/// Which decoder layers become Mamba layers, as a rule or a list.
#[derive(Clone)]
pub enum Placement {
    /// `ratio * n_layers` layers (a whole number of them) placed by `rule`.
    Ratio { rule: Rule, ratio: f64 },
    /// Exactly these layer ids.
    Explicit(Vec<usize>),
    /// A user rule: given the layer count, return the Mamba layer ids.
    Custom(std::sync::Arc<dyn Fn(usize) -> Result<Vec<usize>> + Send + Sync>),
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Ratio { rule, ratio } => write!(f, "{rule:?}({ratio})"),
            Placement::Explicit(v) => write!(f, "Explicit({v:?})"),
            Placement::Custom(_) => write!(f, "Custom(..)"),
        }
    }
}

impl Placement {
    /// MaTVLM's own placement at `ratio` (the default [`Rule`]).
    pub fn ratio(ratio: f64) -> Self {
        Self::Ratio {
            rule: Rule::default(),
            ratio,
        }
    }

    /// The sorted Mamba layer ids for a decoder of `n_layers` layers, checked.
    pub fn layers(&self, n_layers: usize) -> Result<Vec<usize>> {
        let mut ids = match self {
            Placement::Ratio { rule, ratio } => {
                let k = layers_for_ratio(*ratio, n_layers)?;
                rule.pick(*ratio, k, n_layers)?
            }
            Placement::Explicit(v) => v.clone(),
            Placement::Custom(f) => f(n_layers)?,
        };
        validate_layers(&ids, n_layers)?;
        ids.sort_unstable();
        Ok(ids)
    }
}

/// `ratio * n_layers`, which must be a whole number of layers.
pub fn layers_for_ratio(ratio: f64, n_layers: usize) -> Result<usize> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::Invalid(format!("ratio {ratio} is not in [0, 1]")));
    }
    let k = ratio * n_layers as f64;
    if (k - k.round()).abs() > 1e-9 {
        return Err(Error::Invalid(format!(
            "ratio {ratio} of {n_layers} layers is {k} layers, not a whole number"
        )));
    }
    Ok(k.round() as usize)
}

/// The MaTVLM lists. For Phi-2's 32 layers: 0.125 -> [0, 6, 12, 18], 0.25 -> [0, 4, .., 28],
/// 0.5 -> [0, 2, .., 30]. Other depths keep the same rule: `k = ratio * n` layers from 0 with a
/// stride of `n / k`, except 0.125, whose upstream stride is 6/32 of the depth (at least 1).
pub fn upstream_layers(ratio: f64, n_layers: usize) -> Result<Vec<usize>> {
    let k = layers_for_ratio(ratio, n_layers)?;
    if k == 0 {
        return Ok(vec![]);
    }
    let stride = if (ratio - 0.125).abs() < 1e-12 {
        ((6 * n_layers) / 32).max(1)
    } else {
        if !n_layers.is_multiple_of(k) {
            return Err(Error::Invalid(format!(
                "ratio {ratio}: {k} Mamba layers do not divide {n_layers} layers evenly"
            )));
        }
        n_layers / k
    };
    Ok((0..k).map(|i| i * stride).collect())
}

/// Every id in range and none twice.
pub fn validate_layers(ids: &[usize], n_layers: usize) -> Result<()> {
    for &i in ids {
        if i >= n_layers {
            return Err(Error::Invalid(format!(
                "layer id {i} is out of range for a decoder of {n_layers} layers"
            )));
        }
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!("layer id {} is listed twice", w[0])));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_lists_for_phi2() {
        assert_eq!(upstream_layers(0.125, 32).unwrap(), vec![0, 6, 12, 18]);
        assert_eq!(
            upstream_layers(0.25, 32).unwrap(),
            (0..32).step_by(4).collect::<Vec<_>>()
        );
        assert_eq!(
            upstream_layers(0.5, 32).unwrap(),
            (0..32).step_by(2).collect::<Vec<_>>()
        );
    }

    fn at(rule: Rule, ratio: f64) -> Placement {
        Placement::Ratio { rule, ratio }
    }

    #[test]
    fn rules_on_eight_layers() {
        assert_eq!(at(Rule::Upstream, 0.125).layers(8).unwrap(), vec![0]);
        assert_eq!(Placement::ratio(0.25).layers(8).unwrap(), vec![0, 4]);
        assert_eq!(at(Rule::Upstream, 0.5).layers(8).unwrap(), vec![0, 2, 4, 6]);
        assert_eq!(at(Rule::Even, 0.25).layers(8).unwrap(), vec![2, 6]);
        assert_eq!(at(Rule::First, 0.375).layers(8).unwrap(), vec![0, 1, 2]);
        assert_eq!(at(Rule::Last, 0.25).layers(8).unwrap(), vec![6, 7]);
    }

    #[test]
    fn bad_placements_are_clear_errors() {
        let e = Placement::Explicit(vec![1, 9]).layers(8).unwrap_err();
        assert!(e.to_string().contains("layer id 9"), "{e}");
        let e = Placement::ratio(0.3).layers(8).unwrap_err();
        assert!(e.to_string().contains("not a whole number"), "{e}");
        let e = Placement::Explicit(vec![2, 2]).layers(8).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = "diagonal".parse::<Rule>().unwrap_err();
        assert!(e.to_string().contains("unknown placement rule"), "{e}");
        assert_eq!("evenly".parse::<Rule>().unwrap(), Rule::Even);
    }
}
