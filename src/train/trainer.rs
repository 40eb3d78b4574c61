//! The training loop shared by every training mode (supervised fine-tuning, distillation): the
//! caller supplies batches and a step function returning a loss; the loop does gradient
//! accumulation, clipping, the learning-rate schedule, AdamW, metrics, progress, evaluation,
//! checkpoints, resume and cancellation. [`Trainer::fit`] holds the whole loop in one place.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::collective::{all_reduce_grads, Collective};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::params::{Grads, ParamSet};
use super::progress::{Progress, ProgressMode, StepReport};
use super::run::{CheckpointState, RunDir, CHECKPOINT_FORMAT};
use super::schedule::{LrSchedule, Schedule};
use super::step::{add_terms, scalar_value};
pub use super::step::{BatchSource, IndexedSource, Resumable, StepCtx, StepOutput};
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
    /// Data parallelism: the group this trainer is one rank of, and the all-reduce bucket size.
    comm: Option<(&'a dyn Collective, usize)>,
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
            comm: None,
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

    /// Train as one rank of `comm` (data parallelism): each rank reads its own share of every
    /// batch, the step's gradients are summed over the ranks in buckets of `bucket_bytes`
    /// ([`all_reduce_grads`]) and divided by the micro-batches of all ranks together, so every
    /// rank applies the same update. Rank 0 alone writes metrics, checkpoints and progress;
    /// every rank resumes from the run directory's newest checkpoint; a cancel seen by any rank
    /// stops all of them at the same step.
    pub fn with_collective(mut self, comm: &'a dyn Collective, bucket_bytes: usize) -> Self {
        self.comm = Some((comm, bucket_bytes));
        self
    }

    /// Whether this trainer writes the run directory (no group, or rank 0 of one).
    pub fn is_writer(&self) -> bool {
        self.comm.is_none_or(|(c, _)| c.rank() == 0)
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

    /// Whether any rank was cancelled (one collective per step under data parallelism).
    fn cancelled_anywhere(&self) -> Result<bool> {
        let mine = self.cancelled();
        let Some((comm, _)) = self.comm else {
            return Ok(mine);
        };
        let flag = Tensor::new(&[f64::from(u8::from(mine))], &self.params.device())?;
        let any = comm.all_reduce_sum(&flag)?.to_vec1::<f64>()?[0];
        Ok(any > 0.0)
    }

    /// The step's scalars summed over the ranks: loss sum, micro-batches, tokens, each term's
    /// sum, and which parameters got a gradient on some rank. Without a group, the local values.
    fn reduce_scalars(
        &self,
        loss_sum: f64,
        micro_done: usize,
        tokens: usize,
        terms: &mut [(String, f64)],
        grads: Option<&Grads>,
    ) -> Result<(f64, usize, usize, Vec<bool>)> {
        let present: Vec<bool> = (0..self.params.len())
            .map(|i| grads.is_some_and(|g| g.get(i).is_some()))
            .collect();
        let Some((comm, _)) = self.comm else {
            return Ok((loss_sum, micro_done, tokens, present));
        };
        let mut v = vec![loss_sum, micro_done as f64, tokens as f64];
        v.extend(terms.iter().map(|(_, x)| *x));
        v.extend(present.iter().map(|&p| f64::from(u8::from(p))));
        let n = v.len();
        let sum = comm
            .all_reduce_sum(&Tensor::from_vec(v, n, &self.params.device())?)?
            .to_vec1::<f64>()?;
        for (k, (_, x)) in terms.iter_mut().enumerate() {
            *x = sum[3 + k];
        }
        let present = sum[3 + terms.len()..].iter().map(|&p| p > 0.0).collect();
        Ok((sum[0], sum[1] as usize, sum[2] as usize, present))
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
        if self.is_writer() {
            self.run.truncate_metrics_after(ck.state.step)?;
        }
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
        let writer = self.is_writer();
        let (rank, world) = self
            .comm
            .map_or((0, 1), |(c, _)| (c.rank(), c.world_size()));
        if writer && self.run.read_config()?.is_none() {
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
        if resumed_from.is_none() && writer {
            // A run killed before its first checkpoint logged steps that this start redoes.
            self.run.truncate_metrics_after(0)?;
        }
        let start_step = step;
        let mut saved_at = resumed_from.as_ref().map(|_| step);
        let mut last_checkpoint = resumed_from.clone();

        let shown = if writer {
            cfg.progress
        } else {
            ProgressMode::Silent
        };
        let mut progress = Progress::new(shown, step, cfg.steps, cfg.log_every);
        if let Some(dir) = &resumed_from {
            progress.message(&format!("resumed from {} at step {step}", dir.display()));
        }
        let started = Instant::now();
        let mut last_loss = None;

        let stop = loop {
            if step >= cfg.steps {
                break StopReason::Completed;
            }
            if self.cancelled_anywhere()? {
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
                // Numbered across ranks: rank r's micro-batches are those a single rank
                // accumulating `world * accum` of them would see from `r * accum` on.
                let ctx = StepCtx {
                    step: step + 1,
                    micro: rank * cfg.accum + micro,
                    accum: cfg.accum * world,
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
                let g = match out.grads {
                    Some(g) => g,
                    None => self.params.grads(&out.loss.backward()?),
                };
                match grads.as_mut() {
                    Some(acc) => acc.accumulate(g)?,
                    None => grads = Some(g),
                }
            }
            let (loss_sum, micro_done, tokens, present) =
                self.reduce_scalars(loss_sum, micro_done, tokens, &mut term_sums, grads.as_ref())?;
            if micro_done == 0 {
                break StopReason::DataExhausted;
            }
            let Some(mut grads) = grads else {
                return Err(Error::Other(format!(
                    "rank {rank} ran out of data at step {} while other ranks did not (shards of \
                     unequal length?)",
                    step + 1
                )));
            };
            if let Some((comm, bucket_bytes)) = self.comm {
                all_reduce_grads(comm, self.params, &mut grads, &present, bucket_bytes)?;
            }
            // The mean over every micro-batch of the step, all ranks together: with `accum`
            // micro-batches of equal size and a loss that is a mean over its micro-batch's
            // samples, the gradient of one batch `accum` times as large.
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
            if writer {
                self.run.log(&record)?;
            }
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

            let eval_now =
                cfg.eval_every > 0 && (step.is_multiple_of(cfg.eval_every) || step == cfg.steps);
            if writer && eval_now {
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
            if writer && cfg.save_every > 0 && step.is_multiple_of(cfg.save_every) {
                last_checkpoint = Some(self.save(step, lr, data, tokens_total)?);
                saved_at = Some(step);
            }
        };

        if writer && step > 0 && saved_at != Some(step) {
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
