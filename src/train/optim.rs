//! AdamW computed as `torch.optim.AdamW` computes it (single-tensor path, the CPU default), and
//! global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! Per parameter, with gradient `g`, step count `t` (after increment) and learning rate `lr`:
//! ```text
//! p <- p * (1 - lr * wd)                       (decoupled decay; skipped for 1-D and *bias)
//! m <- lerp(m, g, 1 - beta1)
//! v <- v * beta2 + (1 - beta2) * g * g
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//! The arithmetic runs in f32 in torch's order, so results agree with torch to rounding (the
//! vectorised torch kernels use fused multiply-adds in places; the difference is an ulp or two).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::params::{Grads, ParamSet};
use crate::{Error, Result};

/// Hyper-parameters of AdamW. The defaults are MaTVLM's distillation recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate (a schedule scales it per step through [`AdamW::set_lr`]).
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Decoupled weight decay, applied only where [`decays`] says so.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether weight decay applies to a parameter: not to 1-D (or scalar) tensors such as norm
/// weights, `A_log`, `D` and `dt_bias`, and not to anything named `*bias` whatever its rank: the
/// usual LLM-training convention.
pub fn decays(name: &str, rank: usize) -> bool {
    rank > 1 && !name.ends_with("bias")
}

/// One parameter's optimiser state.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    /// First moment (`exp_avg`), f32.
    m: Tensor,
    /// Second moment (`exp_avg_sq`), f32.
    v: Tensor,
    /// Number of updates this parameter received (parameters without a gradient skip a step).
    step: u64,
    decay: bool,
}

/// AdamW over a [`ParamSet`]. Moments are kept in f32 whatever the parameter dtype; the update is
/// computed in f32 and written back in the parameter's dtype.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    lr: f64,
    slots: Vec<Slot>,
}

const EXP_AVG: &str = "exp_avg.";
const EXP_AVG_SQ: &str = "exp_avg_sq.";
const STEP: &str = "step.";

impl AdamW {
    /// Fresh state (zero moments, step 0) for every parameter of `params`.
    pub fn new(params: &ParamSet, cfg: AdamWConfig) -> Result<Self> {
        let (b1, b2) = cfg.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(Error::Invalid(format!(
                "AdamW betas must lie in [0, 1), got ({b1}, {b2})"
            )));
        }
        if !(cfg.lr >= 0.0 && cfg.eps >= 0.0 && cfg.weight_decay >= 0.0) {
            return Err(Error::Invalid(format!(
                "AdamW lr, eps and weight_decay must be >= 0, got {}, {}, {}",
                cfg.lr, cfg.eps, cfg.weight_decay
            )));
        }
        let slots = params
            .iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot {
                    name: name.to_string(),
                    var: var.clone(),
                    m: zeros.clone(),
                    v: zeros,
                    step: 0,
                    decay: decays(name, var.rank()),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            lr: cfg.lr,
            cfg,
            slots,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The learning rate the next [`AdamW::step`] uses.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// How many updates the parameter `name` has received.
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.step)
    }

    /// Names of the parameters that receive weight decay.
    pub fn decayed_names(&self) -> impl Iterator<Item = &str> {
        self.slots
            .iter()
            .filter(|s| s.decay)
            .map(|s| s.name.as_str())
    }

    /// One update with gradients lined up with the parameter set this optimiser was built on.
    /// Parameters without a gradient are left alone, state included (as torch skips `grad is None`).
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Invalid(format!(
                "AdamW holds {} parameters but got {} gradients",
                self.slots.len(),
                grads.len()
            )));
        }
        let (b1, b2) = self.cfg.betas;
        let (lr, eps, wd) = (self.lr, self.cfg.eps, self.cfg.weight_decay);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(g) = grads.get(i) else { continue };
            if g.dims() != slot.var.dims() {
                return Err(Error::ShapeMismatch {
                    key: format!("gradient of {}", slot.name),
                    expected: slot.var.dims().to_vec(),
                    found: g.dims().to_vec(),
                });
            }
            slot.step += 1;
            let g = g.to_dtype(DType::F32)?;
            let mut p = slot.var.as_detached_tensor().to_dtype(DType::F32)?;
            if slot.decay && wd != 0.0 {
                p = p.affine(1.0 - lr * wd, 0.0)?;
            }
            slot.m = lerp(&slot.m, &g, 1.0 - b1)?;
            // v * beta2 + ((1 - beta2) * g) * g, the operand order of torch's addcmul.
            slot.v = (slot.v.affine(b2, 0.0)? + (g.affine(1.0 - b2, 0.0)? * &g)?)?;
            let t = slot.step as f64;
            let step_size = lr / (1.0 - b1.powf(t));
            let bc2_sqrt = Tensor::new((1.0 - b2.powf(t)).sqrt() as f32, g.device())?;
            let denom = slot.v.sqrt()?.broadcast_div(&bc2_sqrt)?.affine(1.0, eps)?;
            let update = (&slot.m / denom)?.affine(-step_size, 0.0)?;
            let p = (p + update)?.to_dtype(slot.var.dtype())?;
            slot.var.set(&p)?;
        }
        Ok(())
    }

    /// The state as named tensors: `exp_avg.{name}`, `exp_avg_sq.{name}` (f32) and `step.{name}`
    /// (an i64 scalar), the layout of `optimizer.safetensors` in a checkpoint.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("{EXP_AVG}{}", s.name), s.m.clone());
            out.insert(format!("{EXP_AVG_SQ}{}", s.name), s.v.clone());
            let step = Tensor::new(s.step as i64, s.m.device())?;
            out.insert(format!("{STEP}{}", s.name), step);
        }
        Ok(out)
    }

    /// Restore the state written by [`AdamW::state_tensors`]. Every parameter must be present
    /// with the right shape; `location` names the source in errors.
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        location: &str,
    ) -> Result<()> {
        let get = |key: String| {
            tensors.get(&key).ok_or_else(|| Error::MissingKey {
                key,
                location: location.to_string(),
            })
        };
        for s in self.slots.iter_mut() {
            let m = get(format!("{EXP_AVG}{}", s.name))?;
            let v = get(format!("{EXP_AVG_SQ}{}", s.name))?;
            for (key, t) in [(EXP_AVG, m), (EXP_AVG_SQ, v)] {
                if t.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch {
                        key: format!("{key}{}", s.name),
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
            }
            let step = get(format!("{STEP}{}", s.name))?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            let step = match step.as_slice() {
                [n] if *n >= 0 => *n as u64,
                other => {
                    return Err(Error::Invalid(format!(
                        "{location}: {STEP}{} should be one non-negative count, got {other:?}",
                        s.name
                    )))
                }
            };
            let device = s.var.device();
            s.m = m.to_dtype(DType::F32)?.to_device(device)?;
            s.v = v.to_dtype(DType::F32)?.to_device(device)?;
            s.step = step;
        }
        Ok(())
    }

    /// Write the state as one safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        super::run::write_tensors(path, &self.state_tensors()?)
    }

    /// Read the state written by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = crate::checkpoint::load_safetensors(path, &device)?;
        self.load_state_tensors(&tensors, &path.display().to_string())
    }
}

/// `a + w * (b - a)`, evaluated as torch's CPU `lerp` does: from the nearer end, so that w = 1
/// gives exactly `b`.
fn lerp(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    let diff = (b - a)?;
    let out = if w < 0.5 {
        (a + diff.affine(w, 0.0)?)?
    } else {
        (b - diff.affine(1.0 - w, 0.0)?)?
    };
    Ok(out)
}

/// Scale `grads` in place so that their global L2 norm is at most `max_norm`, exactly as
/// `torch.nn.utils.clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, applied only when
/// below 1. Returns the norm before clipping (not finite when a gradient is not).
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let total = grads.total_norm()?;
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        grads.scale(coef)?;
    }
    Ok(total)
}
