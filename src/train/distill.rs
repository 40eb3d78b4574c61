//! The distillation mode of the trainer (MaTVLM's single stage): a frozen teacher and a hybrid
//! student see the same batch; the student learns the teacher's logits and, layer by layer,
//! what each replaced attention mixer did (the losses are in [`crate::loss`]).
//!
//! The whole loop, as [`distill`] runs it:
//! ```text
//! let student = Student::new(&hybrid, &cfg.trainable.selection())?;      // Vars + rebuilt model
//! let mut source = cfg.source(train, &student.vlm)?;                      // shuffled batches
//! fit_student(&student, &cfg.train, setup, &mut source, |batch| {
//!     distill_step(&teacher, &student.model()?, batch, &cfg.loss)       // f32 masters cast here
//! })?;
//! ```
//! Per step, [`distill_step`] runs the teacher once without a graph (its outputs detached), the
//! student with one, and returns the weighted loss plus every term on its own, so that
//! `metrics.jsonl` and the progress line show each of them. Only the trainable tensors are
//! `Var`s, so backward, gradients and optimiser state cover nothing else; the teacher and the
//! frozen part of the student are plain tensors that no step can change.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::parallel::{on_device, run_ranks, Parallel, RankCtx};
use super::params::{Grads, Selection};
use super::schedule::LrSchedule;
use super::student::{fit_student, EvalFn, RunSetup, Student};
use super::supervised::SupervisedSource;
use super::trainer::{BatchSource, StepOutput, TrainConfig, TrainSummary};
use crate::data::{Dataset, Loader, SupervisedBatch};
use crate::eval::{agreement, evaluate, AgreementOptions, EvalMode, EvalOptions};
use crate::loss::{
    distill_grads_checkpointed, distill_loss_with, teacher_outputs, DistillBatch, DistillLoss,
};
use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// Name pattern of every Mamba mixer tensor of a hybrid (`...layers.{i}.mamba.*`); the block's
/// LayerNorm and MLP live under `input_layernorm.*` and `mlp.*` and do not match.
pub const MIXER_PATTERN: &str = "language_model.model.layers.*.mamba.*";
/// Name pattern of the connector (the projector from image features to the decoder).
pub const CONNECTOR_PATTERN: &str = "connector.*";
/// Name pattern of the vision tower.
pub const VISION_PATTERN: &str = "vision_tower.*";

/// Which tensors of the student train; everything else stays frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Only the Mamba mixers of the Mamba layers.
    Mixers,
    /// The Mamba mixers and the connector (upstream MaTVLM).
    #[default]
    MixersConnector,
    /// Everything except the vision tower: mixers, attention, MLPs, norms, embeddings, lm_head,
    /// connector.
    AllButVision,
}

impl Trainable {
    /// The name patterns this choice stands for, over [`Vlm::named_tensors`] names.
    pub fn selection(self) -> Selection {
        match self {
            Trainable::Mixers => Selection::new([MIXER_PATTERN], [""; 0]),
            Trainable::MixersConnector => {
                Selection::new([MIXER_PATTERN, CONNECTOR_PATTERN], [""; 0])
            }
            Trainable::AllButVision => Selection::new([""; 0], [VISION_PATTERN]),
        }
    }

    /// `hybrid` ready to train with this set (refused when it selects mixers of a model that
    /// has none).
    pub fn student(self, hybrid: &Vlm) -> Result<Student> {
        if self != Trainable::AllButVision && hybrid.mamba_layers().is_empty() {
            return Err(Error::Invalid(format!(
                "the student has no Mamba layer, so {self:?} selects no mixer; build it with \
                 `Vlm::hybrid` first"
            )));
        }
        Student::new(hybrid, &self.selection())
    }
}

/// Everything that shapes a distillation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    pub loss: DistillLoss,
    pub trainable: Trainable,
    pub train: TrainConfig,
    /// Samples per micro-batch (the global batch is `batch_size * train.accum`).
    pub batch_size: usize,
    /// Evaluate on at most this many validation samples (all when `None`).
    pub eval_limit: Option<usize>,
    /// Keep the trainable weights and their AdamW state in f32 under a half-precision student
    /// (upstream's DeepSpeed bf16 setting), the forward in the student's dtype; off, they train
    /// in the student's own dtype (pure bf16 on a bf16 model). No effect on an f32 student.
    pub master_f32: bool,
    /// Gradient checkpointing of the student's blocks: keep only each block's input during the
    /// forward and recompute one block at a time in the backward
    /// ([`crate::loss::distill_grads_checkpointed`]); about one more student forward per step
    /// for the activations of one block instead of all of them.
    pub checkpoint_blocks: bool,
    /// Data parallelism ([`super::parallel`]): `batch_size` is then the global micro-batch,
    /// shared equally by the ranks, and an epoch's last batch is dropped when it is short (so
    /// that every rank gets an equal share).
    pub parallel: Parallel,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self::upstream(TrainConfig::default().steps)
    }
}

/// Peak learning rate of [`DistillConfig::upstream`]. Upstream distils Phi-2 (2560 wide) at
/// 2e-4 for about 10k steps of batch 64; the tiny teacher is 128 wide and a CPU run has a few
/// hundred steps. AdamW's per-element step is about `lr` whatever the width, and both models
/// start from weights of the same scale (init std 0.02), so at 2e-4 the mixers would move a
/// twentieth of upstream's distance in that budget. 1e-3 is the rate the tiny teacher itself
/// trained at without instability, and it still sits well below the width-scaled (muP-style)
/// equivalent of upstream's rate (2e-4 * 2560 / 128 = 4e-3).
pub const TINY_DISTILL_LR: f64 = 1e-3;

impl DistillConfig {
    /// MaTVLM's recipe over `steps` optimiser steps: loss KL (T = 1) + layer-wise L2, mixers and
    /// connector trainable, AdamW betas (0.9, 0.95), weight decay 0.01, gradient clip 0.1, a
    /// warmup-stable-decay schedule, global batch 64; the learning rate is
    /// [`TINY_DISTILL_LR`] (see there why it is not upstream's 2e-4).
    pub fn upstream(steps: usize) -> Self {
        Self {
            loss: DistillLoss::default(),
            trainable: Trainable::MixersConnector,
            train: TrainConfig {
                steps,
                lr: TINY_DISTILL_LR,
                betas: (0.9, 0.95),
                weight_decay: 0.01,
                clip: Some(0.1),
                schedule: LrSchedule::default(),
                // Upstream does not fix the warmup; 5% gives short runs a few warmup steps.
                warmup_ratio: 0.05,
                ..TrainConfig::default()
            },
            batch_size: 64,
            eval_limit: None,
            master_f32: false,
            checkpoint_blocks: false,
            parallel: Parallel::default(),
        }
    }

    /// The batches a run of this config reads: `train` shuffled by a loader seeded with the
    /// run's seed, preprocessed for `student`. A run resumed from a checkpoint continues this
    /// exact stream.
    pub fn source(&self, train: Arc<Dataset>, student: &Vlm) -> Result<SupervisedSource> {
        let loader = Loader::new(train.len(), self.batch_size, self.train.seed)?
            .with_drop_last(self.parallel.is_parallel());
        Ok(SupervisedSource::for_model(train, loader, student))
    }
}

/// Refuse a teacher and student that cannot be compared position by position.
pub fn check_pair(teacher: &Vlm, student: &Vlm) -> Result<()> {
    let (t, s) = (&teacher.decoder.cfg, &student.decoder.cfg);
    if t.vocab_size != s.vocab_size {
        return Err(Error::Invalid(format!(
            "teacher vocabulary {} differs from the student's {}",
            t.vocab_size, s.vocab_size
        )));
    }
    if teacher.decoder.blocks.len() != student.decoder.blocks.len() {
        return Err(Error::Invalid(format!(
            "teacher has {} decoder layers, the student {}; the layer-wise loss pairs them one to one",
            teacher.decoder.blocks.len(),
            student.decoder.blocks.len()
        )));
    }
    let (ti, si) = (teacher.config.image_tokens(), student.config.image_tokens());
    if ti != si {
        return Err(Error::Invalid(format!(
            "teacher turns an image into {ti} tokens, the student into {si}"
        )));
    }
    Ok(())
}

/// One distillation micro-batch: the teacher's outputs (detached, computed once), the student's
/// forward and the losses of `loss`. The step's loss is their weighted sum; each term is
/// reported under its own name (`kl`, `reverse_kl`, `jsd`, `ce_teacher`, `ce_labels`,
/// `hidden`). Padding is left out of every term; labels (answer positions, `ce_labels`) are the
/// batch's expanded labels.
pub fn distill_step(
    teacher: &Vlm,
    student: &Vlm,
    batch: &SupervisedBatch,
    loss: &DistillLoss,
) -> Result<StepOutput> {
    let rows = batch.unpadded_rows();
    let labels = labels_tensor(&batch.labels, &student.device)?;
    let inputs = DistillBatch {
        rows: &rows,
        pixel_values: batch.pixel_values.as_ref(),
        labels: Some(&labels),
    };
    let teach = teacher_outputs(teacher, &inputs, student.mamba_layers())?;
    let out = distill_loss_with(&teach, student, &inputs, loss)?;
    Ok(out.terms.into_iter().fold(
        StepOutput::new(out.loss, batch.tokens),
        |step, (name, v)| step.term(name, v),
    ))
}

/// [`distill_step`] for a [`Student`], with its blocks checkpointed when `checkpoint` is set:
/// the step then returns the gradients of its trainable set itself
/// ([`StepOutput::with_grads`]), the same as differentiating [`distill_step`]'s loss up to f32
/// summation order.
pub fn student_step(
    teacher: &Vlm,
    student: &Student,
    batch: &SupervisedBatch,
    loss: &DistillLoss,
    checkpoint: bool,
) -> Result<StepOutput> {
    let model = student.model()?;
    if !checkpoint {
        return distill_step(teacher, &model, batch, loss);
    }
    let rows = batch.unpadded_rows();
    let labels = labels_tensor(&batch.labels, &model.device)?;
    let inputs = DistillBatch {
        rows: &rows,
        pixel_values: batch.pixel_values.as_ref(),
        labels: Some(&labels),
    };
    let teach = teacher_outputs(teacher, &inputs, model.mamba_layers())?;
    let vars: Vec<Tensor> = student
        .params
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let (out, grads) = distill_grads_checkpointed(&teach, &model, &inputs, loss, &vars)?;
    let grads = Grads::from_vec(&student.params, grads)?;
    Ok(out.terms.into_iter().fold(
        StepOutput::with_grads(out.loss, batch.tokens, grads),
        |step, (name, v)| step.term(name, v),
    ))
}

/// Expanded label rows as a `[B, T]` i64 tensor.
fn labels_tensor(labels: &[Vec<i64>], device: &candle_core::Device) -> Result<Tensor> {
    let width = labels.first().map_or(0, Vec::len);
    if let Some((b, row)) = labels.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(Error::Invalid(format!(
            "label row {b} has {} positions, row 0 has {width}",
            row.len()
        )));
    }
    let flat: Vec<i64> = labels.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (labels.len(), width), device)?)
}

/// Distil `teacher` into `student_hybrid` on `train` per `cfg`, writing config, metrics and
/// checkpoints into `run_dir`; a run directory holding a checkpoint is resumed (when
/// `cfg.train.resume`), ending with exactly the weights of an uninterrupted run on the CPU.
///
/// With `val`, every `cfg.train.eval_every` steps (and at the last step) an eval line records
/// teacher agreement on the answer tokens (`val_agree`), the mean KL(teacher || student) per
/// answer position (`val_kl`), the student's teacher-forced exact-match accuracy (`val_acc`,
/// `val_acc_{type}`) and, for reference, the teacher's (`val_teacher_acc`, computed once).
///
/// `cancel` stops the run at the next step boundary with a checkpoint. Returns the distilled
/// student (plain tensors) and the run's summary.
pub fn distill(
    teacher: &Vlm,
    student_hybrid: &Vlm,
    train: Arc<Dataset>,
    val: Option<Arc<Dataset>>,
    cfg: &DistillConfig,
    run_dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<(Vlm, TrainSummary)> {
    let source = |shard: Shard, student: &Vlm| -> Result<SupervisedSource> {
        let source = cfg.source(train.clone(), student)?;
        Ok(match shard {
            Some((rank, world)) => source.with_shard(rank, world),
            None => source,
        })
    };
    distill_from(teacher, student_hybrid, &source, val, cfg, run_dir, cancel)
}

/// This rank's `(rank, world)` under data parallelism, `None` without.
pub type Shard = Option<(usize, usize)>;

/// [`distill`] over batches from `source(shard, student)`, called once per rank (on the
/// rank's thread) with the rank's share and the student it trains: e.g. a
/// [`crate::data::LlavaStream`] over a file too large to load (`with_shard` gives each rank
/// its share; the loader must deal `cfg.batch_size` samples, the global micro-batch).
pub fn distill_from<S: BatchSource<Batch = SupervisedBatch>>(
    teacher: &Vlm,
    student_hybrid: &Vlm,
    source: &(dyn Fn(Shard, &Vlm) -> Result<S> + Sync),
    val: Option<Arc<Dataset>>,
    cfg: &DistillConfig,
    run_dir: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<(Vlm, TrainSummary)> {
    check_pair(teacher, student_hybrid)?;
    if !cfg.parallel.is_parallel() {
        return distill_rank(
            teacher,
            student_hybrid,
            source,
            val,
            cfg,
            run_dir,
            cancel,
            None,
        );
    }
    cfg.parallel.check(cfg.batch_size)?;
    let mut results = run_ranks(&cfg.parallel, &student_hybrid.device, |ctx| {
        let teacher = on_device(teacher, &ctx.device)?;
        let hybrid = on_device(student_hybrid, &ctx.device)?;
        // Only rank 0 evaluates (its metrics are the run's); the others would repeat it.
        let val = val.clone().filter(|_| ctx.rank == 0);
        distill_rank(
            &teacher,
            &hybrid,
            source,
            val,
            cfg,
            run_dir,
            cancel,
            Some(&ctx),
        )
    })?;
    if results.is_empty() {
        return Err(Error::Other("parallel: no rank ran".into()));
    }
    Ok(results.swap_remove(0))
}

/// One rank of [`distill`] (the only one without data parallelism).
#[allow(clippy::too_many_arguments)]
fn distill_rank<S: BatchSource<Batch = SupervisedBatch>>(
    teacher: &Vlm,
    student_hybrid: &Vlm,
    source: &(dyn Fn(Shard, &Vlm) -> Result<S> + Sync),
    val: Option<Arc<Dataset>>,
    cfg: &DistillConfig,
    run_dir: &Path,
    cancel: Option<&AtomicBool>,
    rank: Option<&RankCtx<'_>>,
) -> Result<(Vlm, TrainSummary)> {
    let student = if cfg.master_f32 {
        Student::with_master(student_hybrid, &cfg.trainable.selection(), DType::F32)?
    } else {
        cfg.trainable.student(student_hybrid)?
    };
    let mut source = source(rank.map(|ctx| (ctx.rank, ctx.world)), &student.vlm)?;

    let mut teacher_acc: Option<f64> = None;
    let student_ref = &student;
    let eval = val.as_deref().map(|val| -> EvalFn<'_> {
        Box::new(move |_| {
            let eval_student = student_ref.detached()?;
            let agree = AgreementOptions {
                limit: cfg.eval_limit,
                ..AgreementOptions::default()
            };
            let exact = EvalOptions {
                mode: EvalMode::TeacherForced,
                limit: cfg.eval_limit,
                ..EvalOptions::default()
            };
            let mut values = agreement(teacher, &eval_student, val, &agree)?.metrics("val_");
            values.extend(evaluate(&eval_student, val, &exact)?.metrics("val_"));
            let t_acc = match teacher_acc {
                Some(a) => a,
                None => *teacher_acc.insert(evaluate(teacher, val, &exact)?.accuracy),
            };
            values.push(("val_teacher_acc".into(), t_acc));
            Ok(values)
        })
    });
    let setup = RunSetup {
        dir: run_dir,
        config: cfg,
        cancel,
        eval,
        comm: rank.map(|ctx| (ctx.comm, ctx.bucket_bytes)),
    };
    let summary = fit_student(&student, &cfg.train, setup, &mut source, |batch| {
        student_step(teacher, &student, batch, &cfg.loss, cfg.checkpoint_blocks)
    })?;
    Ok((student.detached()?, summary))
}
