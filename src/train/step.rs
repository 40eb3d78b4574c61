//! What the training loop exchanges with a training mode: the batches it reads
//! ([`BatchSource`], resumable), where a step is called from ([`StepCtx`]) and what a step
//! returns ([`StepOutput`]).

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::json;

use super::params::Grads;
use crate::{Error, Result};

/// Something whose position can be saved in a checkpoint and restored on resume: a data loader
/// (epoch, index, shuffle seed...). The state is opaque JSON to the trainer.
pub trait Resumable {
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
}

/// A resumable stream of batches. `Ok(None)` means the data is exhausted: the run stops there
/// (a partly filled accumulation still makes its step, averaged over the micro-batches it got).
pub trait BatchSource: Resumable {
    type Batch;
    fn next_batch(&mut self) -> Result<Option<Self::Batch>>;
}

/// Batches as a pure function of their index: `make(i)` builds batch `i` (or `None` past the end).
/// The position is just the next index, so resuming is exact by construction.
pub struct IndexedSource<F> {
    next: usize,
    make: F,
}

impl<F> IndexedSource<F> {
    pub fn new(make: F) -> Self {
        Self { next: 0, make }
    }

    /// The index of the next batch.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl<F> Resumable for IndexedSource<F> {
    fn state(&self) -> serde_json::Value {
        json!({ "next": self.next })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let next = state.get("next").and_then(serde_json::Value::as_u64);
        self.next = next.ok_or_else(|| {
            Error::Invalid(format!(
                "data state {state} has no `next` index for an IndexedSource"
            ))
        })? as usize;
        Ok(())
    }
}

impl<B, F: FnMut(usize) -> Result<Option<B>>> BatchSource for IndexedSource<F> {
    type Batch = B;

    fn next_batch(&mut self) -> Result<Option<B>> {
        let batch = (self.make)(self.next)?;
        if batch.is_some() {
            self.next += 1;
        }
        Ok(batch)
    }
}

/// Where a step function is called from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCtx {
    /// The optimiser step being computed, from 1 (the `step` of its metrics line).
    pub step: usize,
    /// The micro-batch within the step, from 0.
    pub micro: usize,
    pub accum: usize,
    /// The run's seed.
    pub seed: u64,
}

impl StepCtx {
    /// A seed derived from the run seed, the step and the micro-batch: the same at the same
    /// point of a run whether it was interrupted and resumed or not.
    pub fn derived_seed(&self) -> u64 {
        splitmix(splitmix(splitmix(self.seed) ^ self.step as u64) ^ self.micro as u64)
    }

    /// A random generator for this micro-batch, seeded by [`StepCtx::derived_seed`].
    pub fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.derived_seed())
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a step function returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The scalar to differentiate (one element).
    pub loss: Tensor,
    /// Named parts of the loss (e.g. `l2`, `kl`), logged each step; averaged over micro-batches.
    pub terms: Vec<(String, f64)>,
    /// Tokens in the micro-batch, for throughput.
    pub tokens: usize,
    /// The gradients, when the step computed them itself (gradient checkpointing runs its own
    /// backward, block by block); `loss` then only carries the value. `None`: the loop
    /// differentiates `loss`.
    pub grads: Option<Grads>,
}

impl StepOutput {
    /// A loss with no separate terms.
    pub fn new(loss: Tensor, tokens: usize) -> Self {
        Self {
            loss,
            terms: Vec::new(),
            tokens,
            grads: None,
        }
    }

    /// A loss whose gradients the step computed already (its value only, detached).
    pub fn with_grads(loss: Tensor, tokens: usize, grads: Grads) -> Self {
        Self {
            grads: Some(grads),
            ..Self::new(loss.detach(), tokens)
        }
    }

    /// Add a named term (builder style).
    pub fn term(mut self, name: impl Into<String>, value: f64) -> Self {
        self.terms.push((name.into(), value));
        self
    }
}

/// Keys of a train metrics line that loss terms may not take.
const RESERVED: [&str; 9] = [
    "kind",
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "step_s",
    "elapsed_s",
];

/// The value of a one-element loss tensor.
pub(super) fn scalar_value(loss: &Tensor, step: usize) -> Result<f64> {
    if loss.elem_count() != 1 {
        return Err(Error::Invalid(format!(
            "step {step}: the step function returned a loss of shape {:?}; it must be a scalar",
            loss.dims()
        )));
    }
    let v = loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(v[0])
}

/// Add one micro-batch's named terms to the running sums, keeping first-seen order.
pub(super) fn add_terms(sums: &mut Vec<(String, f64)>, terms: &[(String, f64)]) -> Result<()> {
    for (name, v) in terms {
        if RESERVED.contains(&name.as_str()) {
            return Err(Error::Invalid(format!(
                "loss term `{name}` clashes with a metrics field ({RESERVED:?}); rename it"
            )));
        }
        match sums.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => *s += v,
            None => sums.push((name.clone(), *v)),
        }
    }
    Ok(())
}
