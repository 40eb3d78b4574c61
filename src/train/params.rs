//! Which parameters train: a [`ParamSet`] of named [`Var`]s chosen by name patterns, and the
//! [`Grads`] that line up with it.
//!
//! The model is built from plain tensors (a checkpoint); [`ParamSet::select`] turns the tensors whose
//! names match the trainable patterns into `Var`s and hands back a name -> tensor map in which those
//! entries are the `Var`s themselves. Building the model from that map (e.g. with
//! `VarBuilder::from_tensors`) makes the trainable weights tracked by autograd while the frozen ones
//! stay plain tensors, so backward never spends work on them.

use std::collections::{BTreeMap, HashMap};

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Name patterns choosing the trainable parameters. A name trains when it matches at least one
/// `include` pattern (an empty list includes everything) and no `exclude` pattern.
///
/// Patterns are whole-name globs where `*` stands for any run of characters, dots included:
/// `"*.mamba.*"` matches `language_model.model.layers.0.mamba.in_proj.weight`, `"connector.*"`
/// matches every connector tensor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selection {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl Selection {
    /// Every parameter trains.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn new<I: Into<String>, E: Into<String>>(
        include: impl IntoIterator<Item = I>,
        exclude: impl IntoIterator<Item = E>,
    ) -> Self {
        Self {
            include: include.into_iter().map(Into::into).collect(),
            exclude: exclude.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the parameter `name` is trainable under this selection.
    pub fn matches(&self, name: &str) -> bool {
        let included = self.include.is_empty() || self.include.iter().any(|p| glob(p, name));
        included && !self.exclude.iter().any(|p| glob(p, name))
    }
}

/// Whole-string glob match where `*` matches any (possibly empty) run of characters.
pub fn glob(pattern: &str, name: &str) -> bool {
    // Classic greedy matcher with one backtrack point: on a mismatch, let the last `*` swallow
    // one more character. Linear in practice for the short patterns used here.
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The trainable parameters, by name, in name order (the order of optimiser state, gradient
/// norms and checkpoints, so that runs are repeatable).
#[derive(Debug, Clone)]
pub struct ParamSet {
    entries: Vec<(String, Var)>,
}

impl ParamSet {
    /// A set from named variables. Names must be unique; the set is kept sorted by name.
    pub fn new(entries: Vec<(String, Var)>) -> Result<Self> {
        let mut entries = entries;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::Invalid(format!(
                "parameter `{}` appears twice in the parameter set",
                w[0].0
            )));
        }
        Ok(Self { entries })
    }

    /// Split a model's tensors into trainable and frozen. Returns the trainable set and the full
    /// name -> tensor map to build the model from: trainable entries are the new `Var`s (copies
    /// of the given tensors), frozen entries are the given tensors untouched.
    ///
    /// It is an error when the selection matches nothing, which is nearly always a typo.
    pub fn select(
        tensors: &BTreeMap<String, Tensor>,
        selection: &Selection,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        Self::select_as(tensors, selection, None)
    }

    /// [`ParamSet::select`] with the `Var`s made in `dtype` (master weights) instead of each
    /// tensor's own.
    pub fn select_as(
        tensors: &BTreeMap<String, Tensor>,
        selection: &Selection,
        dtype: Option<candle_core::DType>,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        let mut entries = Vec::new();
        let mut all = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            if selection.matches(name) {
                let t = match dtype {
                    Some(d) => t.detach().to_dtype(d)?,
                    None => t.detach(),
                };
                let var = Var::from_tensor(&t)?;
                all.insert(name.clone(), var.as_tensor().clone());
                entries.push((name.clone(), var));
            } else {
                all.insert(name.clone(), t.clone());
            }
        }
        if entries.is_empty() {
            return Err(Error::Invalid(format!(
                "no parameter matches the trainable patterns (include {:?}, exclude {:?}) among {} tensors",
                selection.include,
                selection.exclude,
                tensors.len()
            )));
        }
        Ok((Self::new(entries)?, all))
    }

    /// The trainable subset of the variables of a `candle_nn::VarMap` (a model created with fresh
    /// weights). Variables left out stay `Var`s, so autograd still computes their gradients, but
    /// nothing updates them.
    pub fn from_var_map(vars: &candle_nn::VarMap, selection: &Selection) -> Result<Self> {
        let data = vars
            .data()
            .lock()
            .map_err(|_| Error::Other("the VarMap lock is poisoned".into()))?;
        let entries: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| selection.matches(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        if entries.is_empty() {
            return Err(Error::Invalid(format!(
                "no variable matches the trainable patterns (include {:?}, exclude {:?}) among {}",
                selection.include,
                selection.exclude,
                data.len()
            )));
        }
        Self::new(entries)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of scalar parameters (elements) across all tensors.
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The device of the parameters (all are expected on one device).
    pub fn device(&self) -> candle_core::Device {
        self.entries
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu)
    }

    /// The current values, detached. They share storage with the variables, so they change when
    /// the optimiser steps; serialise them right away or use [`ParamSet::snapshot`].
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.entries
            .iter()
            .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// A copy of the current values that later training does not change.
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.entries
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_detached_tensor().copy()?)))
            .collect()
    }

    /// The same names, as a `VarMap`-like map of variables (shares the variables).
    pub fn to_var_map(&self) -> HashMap<String, Var> {
        self.entries.iter().cloned().collect()
    }

    /// Overwrite every parameter with the tensor of the same name from `tensors` (e.g. a
    /// checkpoint), converted to the parameter's dtype. `location` names the source in errors.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, location: &str) -> Result<()> {
        for (name, var) in &self.entries {
            let t = tensors.get(name).ok_or_else(|| Error::MissingKey {
                key: name.clone(),
                location: location.to_string(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    key: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The gradients of this set's parameters from a backward pass.
    pub fn grads(&self, store: &GradStore) -> Grads {
        Grads {
            grads: self
                .entries
                .iter()
                .map(|(_, v)| store.get(v.as_tensor()).map(Tensor::detach))
                .collect(),
        }
    }
}

/// Gradients lined up with a [`ParamSet`]: entry `i` belongs to parameter `i`; `None` where a
/// parameter got no gradient (it did not take part in the loss).
#[derive(Debug, Clone)]
pub struct Grads {
    grads: Vec<Option<Tensor>>,
}

impl Grads {
    /// Gradients given by parameter name (tests, or gradients computed elsewhere). Names unknown
    /// to `params` are an error; parameters without an entry get `None`.
    pub fn from_named(params: &ParamSet, named: &HashMap<String, Tensor>) -> Result<Self> {
        if let Some(unknown) = named.keys().find(|k| params.get(k).is_none()) {
            return Err(Error::MissingKey {
                key: unknown.clone(),
                location: "the parameter set".into(),
            });
        }
        let grads = params
            .iter()
            .map(|(name, var)| match named.get(name) {
                Some(g) if g.dims() != var.dims() => Err(Error::ShapeMismatch {
                    key: name.to_string(),
                    expected: var.dims().to_vec(),
                    found: g.dims().to_vec(),
                }),
                g => Ok(g.cloned()),
            })
            .collect::<Result<_>>()?;
        Ok(Self { grads })
    }

    /// Gradients in the order of `params` (as [`ParamSet::iter`] lists them).
    pub fn from_vec(params: &ParamSet, grads: Vec<Option<Tensor>>) -> Result<Self> {
        if grads.len() != params.len() {
            return Err(Error::Invalid(format!(
                "{} gradients for a parameter set of {}",
                grads.len(),
                params.len()
            )));
        }
        for ((name, var), g) in params.iter().zip(&grads) {
            if let Some(g) = g.as_ref().filter(|g| g.dims() != var.dims()) {
                return Err(Error::ShapeMismatch {
                    key: format!("gradient of {name}"),
                    expected: var.dims().to_vec(),
                    found: g.dims().to_vec(),
                });
            }
        }
        Ok(Self { grads })
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.grads.get(i).and_then(Option::as_ref)
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<&Tensor>> {
        self.grads.iter().map(Option::as_ref)
    }

    /// Add another micro-batch's gradients (gradient accumulation). A parameter missing from one
    /// side counts as a zero gradient there.
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        if other.grads.len() != self.grads.len() {
            return Err(Error::Invalid(format!(
                "cannot add gradients of {} parameters to gradients of {}",
                other.grads.len(),
                self.grads.len()
            )));
        }
        for (mine, theirs) in self.grads.iter_mut().zip(other.grads) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    /// Multiply every gradient by `factor` (e.g. 1/accum, or the clipping coefficient).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// The global L2 norm over all gradients, as `torch.nn.utils.clip_grad_norm_` computes it:
    /// the norm of the per-tensor norms, in f32, with one device sync.
    pub fn total_norm(&self) -> Result<f64> {
        let norms: Vec<Tensor> = self
            .grads
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt())
            .collect::<candle_core::Result<_>>()?;
        if norms.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?;
        Ok(total.to_scalar::<f32>()? as f64)
    }
}
