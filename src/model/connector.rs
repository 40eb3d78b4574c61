//! The TinyLLaVA connector between the vision tower and the decoder.
//!
//! TinyLLaVA Factory names connectors by `connector_type`:
//! * `linear`: one `nn.Linear(vision_hidden, text_hidden)` stored directly at `_connector`;
//! * `mlp{N}x_gelu`: an `nn.Sequential` of N Linears with exact (erf) GELUs between them, so the
//!   Linears sit at indices 0, 2, 4, ... (`_connector.0`, `_connector.2`, ...); the first maps
//!   vision_hidden -> text_hidden, the others text_hidden -> text_hidden. The teacher uses
//!   `mlp2x_gelu`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::classify_candle;
use crate::model::layers::{Activation, Linear};
use crate::{Error, Result};

/// The projection of vision features into the decoder's embedding space.
#[derive(Debug, Clone)]
pub struct Connector {
    connector_type: String,
    /// The Linears with their key prefix relative to `_connector` (`""` for `linear`).
    linears: Vec<(String, Linear)>,
    act: Activation,
}

/// Number of Linears of a connector type, or `None` if the type is not supported.
fn depth(connector_type: &str) -> Option<usize> {
    if connector_type == "linear" {
        return Some(1);
    }
    let n = connector_type.strip_prefix("mlp")?.strip_suffix("x_gelu")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|&n| n >= 1)
}

impl Connector {
    /// Load from `vb` at the `_connector` prefix (`vb.pp("connector").pp("_connector")` in a
    /// TinyLLaVA checkpoint). An unsupported type is [`Error::UnknownConnector`]; a missing or
    /// misshapen weight is [`Error::MissingKey`] / [`Error::ShapeMismatch`].
    pub fn load(
        vb: VarBuilder,
        connector_type: &str,
        vision_hidden: usize,
        text_hidden: usize,
    ) -> Result<Self> {
        let n = depth(connector_type)
            .ok_or_else(|| Error::UnknownConnector(connector_type.to_string()))?;
        let err = |e| classify_candle(e, "connector");
        let linears = if connector_type == "linear" {
            let l = Linear::load(vb, vision_hidden, text_hidden, true).map_err(err)?;
            vec![(String::new(), l)]
        } else {
            (0..n)
                .map(|i| {
                    let in_dim = if i == 0 { vision_hidden } else { text_hidden };
                    let key = (2 * i).to_string();
                    let l = Linear::load(vb.pp(&key), in_dim, text_hidden, true).map_err(err)?;
                    Ok((key, l))
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            connector_type: connector_type.to_string(),
            linears,
            act: Activation::GeluErf,
        })
    }

    /// The `connector_type` it was loaded as.
    pub fn connector_type(&self) -> &str {
        &self.connector_type
    }

    /// `[..., vision_hidden]` -> `[..., text_hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (_, linear)) in self.linears.iter().enumerate() {
            if i > 0 {
                h = self.act.forward(&h)?;
            }
            h = linear.forward(&h)?;
        }
        Ok(h)
    }

    /// The weights under their names relative to the `_connector` prefix
    /// (`0.weight`, `0.bias`, `2.weight`, ... or `weight`, `bias` for `linear`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (key, l) in &self.linears {
            let name = |leaf: &str| {
                if key.is_empty() {
                    leaf.to_string()
                } else {
                    format!("{key}.{leaf}")
                }
            };
            out.push((name("weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((name("bias"), b.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::depth;

    #[test]
    fn connector_type_names() {
        assert_eq!(depth("linear"), Some(1));
        assert_eq!(depth("mlp1x_gelu"), Some(1));
        assert_eq!(depth("mlp2x_gelu"), Some(2));
        assert_eq!(depth("mlp12x_gelu"), Some(12));
        for bad in [
            "mlp0x_gelu",
            "mlpx_gelu",
            "mlp2x_relu",
            "mlp-1x_gelu",
            "resampler",
            "",
        ] {
            assert_eq!(depth(bad), None, "{bad}");
        }
    }
}
