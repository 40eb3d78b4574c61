//! The training loop shared by every training mode (supervised fine-tuning, distillation): the
//! caller supplies batches and a step function returning a loss; the loop does gradient
//! accumulation, clipping, the learning-rate schedule, AdamW, metrics, progress, evaluation,
//! checkpoints, resume and cancellation. [`Trainer::fit`] holds the whole loop in one place.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::params::{Grads, ParamSet};
use super::progress::{Progress, ProgressMode, StepReport};
use super::run::{CheckpointState, RunDir, CHECKPOINT_FORMAT};
use super::schedule::{LrSchedule, Schedule};
use crate::{Error, Result};

/// Everything that shapes a training run. The defaults are MaTVLM's distillation recipe (AdamW
/// betas (0.9, 0.95), lr 2e-4, weight decay 0.01, clip 0.1, warmup-stable-decay); the warmup
/// ratio (1%) and the decay fraction (10%) are our choices, upstream does not fix them here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps of the whole run; a resumed run continues up to this count.
    pub steps: usize,
    /// Peak (base) learning rate; the schedule scales it.
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Decoupled weight decay (never on 1-D parameters and biases, see [`super::optim::decays`]).
    pub weight_decay: f64,
    /// Maximum global gradient norm; `None` disables clipping (the norm is still logged).
    pub clip: Option<f64>,
    /// Micro-batches per optimiser step; their gradients are averaged.
    pub accum: usize,
    pub schedule: LrSchedule,
    /// Warmup steps; when 0, `ceil(warmup_ratio * steps)` as in the HF Trainer.
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    /// Evaluate every this many steps and at the last step (0: never).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end or on cancel).
    pub save_every: usize,
    /// Checkpoints kept on disk (0: all).
    pub keep_last: usize,
    /// Seeds [`StepCtx::rng`], the randomness a step function may use (dropout, sampling).
    pub seed: u64,
    /// Progress line every this many steps when not on a terminal.
    pub log_every: usize,
    /// Continue from the newest checkpoint of the run directory, if there is one. When false, a
    /// run directory that already holds a checkpoint is refused.
    pub resume: bool,
    pub progress: ProgressMode,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let adamw = AdamWConfig::default();
        Self {
            steps: 1000,
            lr: adamw.lr,
            betas: adamw.betas,
            eps: adamw.eps,
            weight_decay: adamw.weight_decay,
            clip: Some(0.1),
            accum: 1,
            schedule: LrSchedule::default(),
            warmup_steps: 0,
            warmup_ratio: 0.01,
            eval_every: 0,
            save_every: 500,
            keep_last: 2,
            seed: 0,
            log_every: 10,
            resume: true,
            progress: ProgressMode::Auto,
        }
    }
}

impl TrainConfig {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The warmup length in steps.
    pub fn warmup(&self) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * self.steps as f64).ceil() as usize
        }
    }

    pub fn schedule(&self) -> Result<Schedule> {
        Schedule::new(self.schedule.clone(), self.lr, self.warmup(), self.steps)
    }

    /// Reject settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        if self.accum == 0 {
            return Err(Error::Invalid(
                "train config: accum must be at least 1".into(),
            ));
        }
        if let Some(c) = self.clip {
            if c.is_nan() || c <= 0.0 {
                return Err(Error::Invalid(format!(
                    "train config: clip must be > 0 (or null for no clipping), got {c}"
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::Invalid(format!(
                "train config: warmup_ratio must lie in [0, 1], got {}",
                self.warmup_ratio
            )));
        }
        self.schedule()?;
        Ok(())
    }
}

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
}

impl StepOutput {
    /// A loss with no separate terms.
    pub fn new(loss: Tensor, tokens: usize) -> Self {
        Self {
            loss,
            terms: Vec::new(),
            tokens,
        }
    }

    /// Add a named term (builder style).
    pub fn term(mut self, name: impl Into<String>, value: f64) -> Self {
        self.terms.push((name.into(), value));
        self
    }
}

/// Why [`Trainer::fit`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All `steps` are done.
    Completed,
    /// The cancel flag was set; a checkpoint was written.
    Cancelled,
    /// The batch source ran dry.
    DataExhausted,
}

/// The outcome of [`Trainer::fit`].
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub stop: StopReason,
    /// The step the run started from (0, or the resumed checkpoint's step).
    pub start_step: usize,
    /// Steps completed when it returned.
    pub step: usize,
    pub resumed_from: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// Loss of the last step taken in this call.
    pub last_loss: Option<f64>,
    /// Tokens consumed over the whole run (resumed parts included).
    pub tokens: u64,
    pub elapsed_s: f64,
}

/// The checkpoint a run resumed from.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub step: usize,
    pub tokens: u64,
    pub dir: PathBuf,
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

type EvalFn<'a> = Box<dyn FnMut(usize) -> Result<Vec<(String, f64)>> + 'a>;

/// A training run over a [`ParamSet`], writing into a [`RunDir`]. Owns its AdamW, built from the
/// config.
pub struct Trainer<'a> {
    cfg: TrainConfig,
    params: &'a ParamSet,
    opt: AdamW,
    run: RunDir,
    cancel: Option<&'a AtomicBool>,
    eval: Option<EvalFn<'a>>,
}

impl<'a> Trainer<'a> {
    pub fn new(cfg: TrainConfig, params: &'a ParamSet, run: RunDir) -> Result<Self> {
        cfg.validate()?;
        let opt = AdamW::new(params, cfg.adamw())?;
        Ok(Self {
            cfg,
            params,
            opt,
            run,
            cancel: None,
            eval: None,
        })
    }

    /// Stop cleanly (checkpoint, return) at the next step boundary once `flag` is set. The flag is
    /// only read, never reset: a caller reusing it stores `false` before the next run.
    pub fn with_cancel(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Run `eval(step)` every `eval_every` steps and at the last step; the named values it returns
    /// go to `metrics.jsonl` as a `"kind": "eval"` line.
    pub fn with_eval(mut self, eval: impl FnMut(usize) -> Result<Vec<(String, f64)>> + 'a) -> Self {
        self.eval = Some(Box::new(eval));
        self
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Restore weights, optimiser state, step and data position from the newest checkpoint of
    /// the run directory; `None` for a fresh run. Metrics lines logged after that checkpoint are
    /// dropped (the resumed run redoes those steps).
    pub fn resume<S: Resumable>(&mut self, data: &mut S) -> Result<Option<Resumed>> {
        let Some(ck) = self.run.load_latest(&self.params.device())? else {
            return Ok(None);
        };
        let location = ck.dir.display().to_string();
        self.params.load(&ck.weights, &location)?;
        self.opt.load_state_tensors(&ck.optimizer, &location)?;
        data.restore(&ck.state.data)?;
        self.run.truncate_metrics_after(ck.state.step)?;
        Ok(Some(Resumed {
            step: ck.state.step,
            tokens: ck.state.tokens,
            dir: ck.dir,
        }))
    }

    /// Train until `steps` are done, the data runs out or the cancel flag is set; always leave a
    /// checkpoint of the final state. `step_fn` computes one micro-batch's loss from the model that
    /// the [`ParamSet`] belongs to.
    ///
    /// Bit-exactness: on the CPU, a run interrupted at any step boundary and resumed gives
    /// exactly the weights of an uninterrupted run, provided `step_fn` is deterministic given its
    /// batch and [`StepCtx`] (use [`StepCtx::rng`] for randomness).
    pub fn fit<S, F>(&mut self, data: &mut S, mut step_fn: F) -> Result<TrainSummary>
    where
        S: BatchSource,
        F: FnMut(&StepCtx, &S::Batch) -> Result<StepOutput>,
    {
        let cfg = self.cfg.clone();
        let schedule = cfg.schedule()?;
        if self.run.read_config()?.is_none() {
            self.run.write_config(&json!({ "train": cfg }))?;
        }

        let mut step = 0;
        let mut tokens_total: u64 = 0;
        let mut resumed_from = None;
        if cfg.resume {
            if let Some(r) = self.resume(data)? {
                step = r.step;
                tokens_total = r.tokens;
                resumed_from = Some(r.dir);
            }
        } else if let Some(existing) = self.run.latest_dir()? {
            // Starting over would interleave two runs' metrics and checkpoints.
            return Err(Error::Invalid(format!(
                "{} already holds checkpoint {}; resume it or use a new run directory",
                self.run.path().display(),
                existing.display()
            )));
        }
        if resumed_from.is_none() {
            // A run killed before its first checkpoint logged steps that this start redoes.
            self.run.truncate_metrics_after(0)?;
        }
        let start_step = step;
        let mut saved_at = resumed_from.as_ref().map(|_| step);
        let mut last_checkpoint = resumed_from.clone();

        let mut progress = Progress::new(cfg.progress, step, cfg.steps, cfg.log_every);
        if let Some(dir) = &resumed_from {
            progress.message(&format!("resumed from {} at step {step}", dir.display()));
        }
        let started = Instant::now();
        let mut last_loss = None;

        let stop = loop {
            if step >= cfg.steps {
                break StopReason::Completed;
            }
            if self.cancelled() {
                break StopReason::Cancelled;
            }
            let t0 = Instant::now();
            let lr = schedule.lr(step);

            // Forward and backward over the micro-batches, summing gradients.
            let mut grads: Option<Grads> = None;
            let (mut loss_sum, mut tokens, mut micro_done) = (0.0, 0usize, 0usize);
            let mut term_sums: Vec<(String, f64)> = Vec::new();
            for micro in 0..cfg.accum {
                let Some(batch) = data.next_batch()? else {
                    break;
                };
                let ctx = StepCtx {
                    step: step + 1,
                    micro,
                    accum: cfg.accum,
                    seed: cfg.seed,
                };
                let out = step_fn(&ctx, &batch)?;
                let loss = scalar_value(&out.loss, step + 1)?;
                if !loss.is_finite() {
                    return Err(Error::Other(format!(
                        "loss is {loss} at step {} (micro-batch {micro}); stopped without \
                         applying it, the last checkpoint is intact",
                        step + 1
                    )));
                }
                add_terms(&mut term_sums, &out.terms)?;
                loss_sum += loss;
                tokens += out.tokens;
                micro_done += 1;
                let g = self.params.grads(&out.loss.backward()?);
                match grads.as_mut() {
                    Some(acc) => acc.accumulate(g)?,
                    None => grads = Some(g),
                }
            }
            let Some(mut grads) = grads else {
                break StopReason::DataExhausted;
            };
            if micro_done > 1 {
                grads.scale(1.0 / micro_done as f64)?;
            }
            let grad_norm = match cfg.clip {
                Some(max) => clip_grad_norm(&mut grads, max)?,
                None => grads.total_norm()?,
            };
            if !grad_norm.is_finite() {
                return Err(Error::Other(format!(
                    "gradient norm is {grad_norm} at step {}; stopped without applying it, the \
                     last checkpoint is intact",
                    step + 1
                )));
            }
            self.opt.set_lr(lr);
            self.opt.step(&grads)?;
            step += 1;

            // Report.
            let n = micro_done as f64;
            let loss = loss_sum / n;
            let terms: Vec<(String, f64)> =
                term_sums.into_iter().map(|(k, v)| (k, v / n)).collect();
            tokens_total += tokens as u64;
            let step_s = t0.elapsed().as_secs_f64();
            let tokens_per_s = tokens as f64 / step_s.max(1e-9);
            let mut record = json!({
                "kind": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "step_s": step_s,
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            for (k, v) in &terms {
                record[k.as_str()] = json!(v);
            }
            self.run.log(&record)?;
            progress.step(&StepReport {
                step,
                total: cfg.steps,
                loss,
                terms: &terms,
                lr,
                grad_norm,
                tokens_per_s,
            });
            last_loss = Some(loss);

            if cfg.eval_every > 0 && (step.is_multiple_of(cfg.eval_every) || step == cfg.steps) {
                if let Some(eval) = self.eval.as_mut() {
                    let values = eval(step)?;
                    let mut record = json!({ "kind": "eval", "step": step });
                    let mut shown = format!("eval @ {step}:");
                    for (k, v) in &values {
                        if k == "kind" || k == "step" {
                            return Err(Error::Invalid(format!(
                                "evaluation value `{k}` clashes with a metrics field; rename it"
                            )));
                        }
                        record[k.as_str()] = json!(v);
                        shown.push_str(&format!(" {k} {v:.4}"));
                    }
                    self.run.log(&record)?;
                    progress.message(&shown);
                }
            }
            if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every) {
                last_checkpoint = Some(self.save(step, lr, data, tokens_total)?);
                saved_at = Some(step);
            }
        };

        if step > 0 && saved_at != Some(step) {
            let lr = schedule.lr(step - 1);
            last_checkpoint = Some(self.save(step, lr, data, tokens_total)?);
        }
        match stop {
            StopReason::Cancelled => progress.message(&format!("cancelled at step {step}")),
            StopReason::DataExhausted => {
                progress.message(&format!("data exhausted at step {step}"))
            }
            StopReason::Completed => {}
        }
        progress.finish();
        Ok(TrainSummary {
            stop,
            start_step,
            step,
            resumed_from,
            last_checkpoint,
            last_loss,
            tokens: tokens_total,
            elapsed_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Write a checkpoint of the current state after `step` steps.
    fn save<S: Resumable>(
        &mut self,
        step: usize,
        lr: f64,
        data: &S,
        tokens: u64,
    ) -> Result<PathBuf> {
        let state = CheckpointState {
            format: CHECKPOINT_FORMAT,
            step,
            lr,
            data: data.state(),
            train_config: serde_json::to_value(&self.cfg)
                .map_err(|e| Error::Other(format!("serialising the train config: {e}")))?,
            tokens,
            extra: serde_json::Value::Null,
        };
        self.run.save_checkpoint(
            &self.params.named_tensors(),
            &self.opt.state_tensors()?,
            &state,
            self.cfg.keep_last,
        )
    }
}

/// The value of a one-element loss tensor.
fn scalar_value(loss: &Tensor, step: usize) -> Result<f64> {
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
fn add_terms(sums: &mut Vec<(String, f64)>, terms: &[(String, f64)]) -> Result<()> {
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
