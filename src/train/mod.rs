//! Training: the parts shared by every training mode.
//!
//! - [`params`]: which tensors train ([`ParamSet`], chosen by name patterns) and their [`Grads`].
//! - [`optim`]: AdamW and gradient clipping, numerically as torch.
//! - [`schedule`]: learning-rate schedules with warmup, as transformers.
//! - [`run`]: the run directory: config, metrics, atomic checkpoints.
//! - [`trainer`]: the loop ([`Trainer::fit`]), with accumulation, evaluation, resume and cancel.
//! - [`student`]: the model over its trainable `Var`s and [`fit_student`], the run skeleton every
//!   mode calls.
//! - [`supervised`], [`distill`]: the two training modes (cross-entropy; teacher -> hybrid).
//! - [`progress`], [`cancel`]: what the user sees, and Ctrl-C.
//!
//! A run in a few lines:
//! ```text
//! let (params, tensors) = ParamSet::select(&weights, &Selection::new(["*.mamba.*"], [""; 0]))?;
//! let model = build_model(VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
//! let mut trainer = Trainer::new(cfg, &params, RunDir::open("runs/x")?)?.with_cancel(&flag);
//! let summary = trainer.fit(&mut loader, |ctx, batch| model.loss(batch))?;
//! ```

pub mod cancel;
pub mod collective;
pub mod distill;
pub mod memory;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod step;
pub mod student;
pub mod supervised;
pub mod trainer;

pub use cancel::ctrlc_flag;
pub use optim::{clip_grad_norm, decays, AdamW, AdamWConfig};
pub use params::{glob, Grads, ParamSet, Selection};
pub use progress::{Progress, ProgressMode, StepReport};
pub use run::{Checkpoint, CheckpointState, RunDir};
pub use schedule::{LrSchedule, Ramp, Schedule};
pub use student::{fit_student, EvalFn, RunSetup, Student};
pub use trainer::{
    BatchSource, IndexedSource, Resumable, Resumed, StepCtx, StepOutput, StopReason, TrainConfig,
    TrainSummary, Trainer,
};

/// How flat option maps (scripts, notebooks) reach a training config: the fields of its `train`
/// section at the top level, `batch` for `batch_size`.
pub const OPTION_LAYOUT: crate::options::Layout = crate::options::Layout {
    sections: &["train"],
    aliases: &[("batch", "batch_size")],
};
