//! Supervised training: cross-entropy on the answer tokens, every parameter trainable. This is
//! how the embedded tiny teacher is trained from scratch on the synthetic world.
//!
//! The batches ([`SupervisedBatch`]) and the loss ([`shifted_cross_entropy`]) live with the data
//! and the losses; this module is the mode: the step and the batch source.
//!
//! Building the model for training: take the weights, turn them into `Var`s with
//! [`crate::train::ParamSet::select`], and build the [`Vlm`] from the returned map (e.g. with
//! [`crate::teacher::vlm_from_tensors`]) so that the gradients reach them.

use std::sync::Arc;

use candle_core::Device;

use super::schedule::LrSchedule;
use super::trainer::{BatchSource, Resumable, StepOutput, TrainConfig, TrainSummary};
use crate::data::{Dataset, Loader, LoaderState, SupervisedBatch};
use crate::image::ImagePreprocessor;
use crate::loss::{shifted_cross_entropy, token_accuracy};
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// One supervised micro-batch: forward, shifted cross-entropy over the answers. The step output
/// carries the loss, the teacher-forced token accuracy (`token_acc`) and the token count.
pub fn supervised_step(vlm: &Vlm, batch: &SupervisedBatch) -> Result<StepOutput> {
    let (logits, _) = vlm.forward(&batch.rows, batch.pixel_values.as_ref(), &Capture::none())?;
    let (loss, _) = shifted_cross_entropy(&logits, &batch.labels)?;
    let acc = token_accuracy(&logits, &batch.labels)?;
    Ok(StepOutput::new(loss, batch.tokens).term("token_acc", acc))
}

/// Batches for [`crate::train::Trainer::fit`] from a data set and its shuffling [`Loader`];
/// the resumable state is the loader's.
pub struct SupervisedSource {
    dataset: Arc<Dataset>,
    loader: Loader,
    preprocessor: ImagePreprocessor,
    n_image_tokens: usize,
    device: Device,
    /// Data parallelism: this rank's share `(rank, world)` of every batch the loader deals.
    shard: Option<(usize, usize)>,
}

impl SupervisedSource {
    /// Batches of `dataset` in the order `loader` deals, preprocessed for a model with
    /// `n_image_tokens` image vectors per image (see [`crate::config::TinyLlavaConfig::image_tokens`]).
    pub fn new(
        dataset: Arc<Dataset>,
        loader: Loader,
        preprocessor: ImagePreprocessor,
        n_image_tokens: usize,
        device: Device,
    ) -> Self {
        Self {
            dataset,
            loader,
            preprocessor,
            n_image_tokens,
            device,
            shard: None,
        }
    }

    /// Only rank `rank`'s share of each batch ([`super::parallel::shard_rows`]): every rank
    /// holds the same loader (same order, same resumable state) and preprocesses its own rows.
    pub fn with_shard(mut self, rank: usize, world: usize) -> Self {
        self.shard = (world > 1).then_some((rank, world));
        self
    }

    /// Batches for `vlm`: its preprocessor, image token count and device.
    pub fn for_model(dataset: Arc<Dataset>, loader: Loader, vlm: &Vlm) -> Self {
        Self::new(
            dataset,
            loader,
            vlm.preprocessor.clone(),
            vlm.config.image_tokens(),
            vlm.device.clone(),
        )
    }

    pub fn loader(&self) -> &Loader {
        &self.loader
    }
}

impl Resumable for SupervisedSource {
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.loader.state()).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let state: LoaderState = serde_json::from_value(state.clone()).map_err(|e| {
            Error::Invalid(format!("data state {state} is not a loader state: {e}"))
        })?;
        self.loader.restore(state)
    }
}

impl BatchSource for SupervisedSource {
    type Batch = SupervisedBatch;

    /// Never runs dry: the loader starts a new epoch when one ends.
    fn next_batch(&mut self) -> Result<Option<SupervisedBatch>> {
        let mut indices = self.loader.next_indices();
        if let Some((rank, world)) = self.shard {
            let rows = super::parallel::shard_rows(indices.len(), rank, world);
            if rows.is_empty() {
                return Err(Error::Invalid(format!(
                    "a batch of {} samples leaves rank {rank} of {world} nothing; the global \
                     batch must have at least one sample per rank",
                    indices.len()
                )));
            }
            indices = indices[rows].to_vec();
        }
        let batch = self.dataset.batch(&indices)?;
        SupervisedBatch::from_batch(
            &batch,
            &indices,
            &self.preprocessor,
            self.n_image_tokens,
            &self.device,
        )
        .map(Some)
    }
}

/// Everything that shapes a supervised run ([`train`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisedConfig {
    pub train: TrainConfig,
    /// Samples per micro-batch (the global batch is `batch_size * train.accum`).
    pub batch_size: usize,
    /// Evaluate on at most this many validation samples (all when `None`).
    pub eval_limit: Option<usize>,
    /// Leave out an epoch's last, smaller batch.
    pub drop_last: bool,
    /// Batches of samples of similar length, drawn from groups of this many batches (less
    /// padding); `None` shuffles plainly.
    pub length_groups: Option<usize>,
}

impl Default for SupervisedConfig {
    fn default() -> Self {
        Self::quick(TrainConfig::default().steps)
    }
}

impl SupervisedConfig {
    /// Short supervised runs (what `train()` in scripts starts from), over `steps` optimiser
    /// steps: AdamW lr 1e-3, betas (0.9, 0.98), weight decay 0.05, clip 1.0, cosine decay to a
    /// tenth after a 5% warmup, batch 64.
    pub fn quick(steps: usize) -> Self {
        Self {
            train: TrainConfig {
                steps,
                lr: 1e-3,
                betas: (0.9, 0.98),
                eps: 1e-8,
                weight_decay: 0.05,
                clip: Some(1.0),
                schedule: LrSchedule::Cosine {
                    num_cycles: 0.5,
                    min_lr_ratio: 0.1,
                },
                warmup_ratio: 0.05,
                ..TrainConfig::default()
            },
            batch_size: 64,
            eval_limit: None,
            drop_last: false,
            length_groups: None,
        }
    }

    /// The recipe that trained the embedded tiny teacher (`train_teacher` runs it; README
    /// quotes it): 9000 AdamW steps of batch 256 (the last, smaller batch of an epoch left out,
    /// samples of similar length batched together), lr 1.5e-3 after 300 warmup steps, cosine
    /// decay to a tenth, betas (0.9, 0.98), weight decay 0.05, clip 1.0; val every 1000 steps, a
    /// checkpoint every 500.
    pub fn tiny_teacher() -> Self {
        let quick = Self::quick(9000);
        Self {
            train: TrainConfig {
                lr: 1.5e-3,
                warmup_steps: 300,
                warmup_ratio: 0.0,
                eval_every: 1000,
                save_every: 500,
                keep_last: 2,
                log_every: 50,
                ..quick.train
            },
            batch_size: 256,
            drop_last: true,
            length_groups: Some(16),
            ..quick
        }
    }

    /// The batches a run of this config reads from `train`, preprocessed for `vlm`.
    pub fn source(&self, train: Arc<Dataset>, vlm: &Vlm) -> Result<SupervisedSource> {
        let mut loader = Loader::new(train.len(), self.batch_size, self.train.seed)?
            .with_drop_last(self.drop_last);
        if let Some(groups) = self.length_groups {
            loader = loader.with_length_grouping(train.lengths(), groups)?;
        }
        Ok(SupervisedSource::for_model(train, loader, vlm))
    }
}

/// Train every parameter of `vlm` (teacher or hybrid) on the answers of `train` per `cfg`,
/// writing config, metrics and checkpoints into `run_dir` (a run directory holding a checkpoint
/// is resumed when `cfg.train.resume`). `vlm` itself is never changed: training works on copies.
///
/// With `val`, every `cfg.train.eval_every` steps (and at the last step) an eval line records the
/// teacher-forced exact-match accuracy (`val_acc`, `val_acc_{type}`). `cancel` stops the run at
/// the next step boundary with a checkpoint. Returns the trained model (plain tensors) and the
/// run's summary.
pub fn train(
    vlm: &Vlm,
    train: Arc<Dataset>,
    val: Option<Arc<Dataset>>,
    cfg: &SupervisedConfig,
    run_dir: &std::path::Path,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(Vlm, TrainSummary)> {
    use super::params::Selection;
    use super::student::{fit_student, EvalFn, RunSetup, Student};
    use crate::eval::{evaluate, EvalMode, EvalOptions};

    let student = Student::new(vlm, &Selection::all())?;
    let eval_model = student.detached()?;
    let mut source = cfg.source(train, &student.vlm)?;
    let exact = EvalOptions {
        mode: EvalMode::TeacherForced,
        limit: cfg.eval_limit,
        ..EvalOptions::default()
    };
    let eval = val.as_deref().map(|val| -> EvalFn<'_> {
        let (eval_model, exact) = (&eval_model, &exact);
        Box::new(move |_| Ok(evaluate(eval_model, val, exact)?.metrics("val_")))
    });
    let setup = RunSetup {
        dir: run_dir,
        config: cfg,
        cancel,
        eval,
        comm: None,
    };
    let summary = fit_student(&student, &cfg.train, setup, &mut source, |batch| {
        supervised_step(&student.vlm, batch)
    })?;
    Ok((student.detached()?, summary))
}

impl Resumable for crate::data::LlavaStream {
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(crate::data::LlavaStream::state(self))
            .unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let state: LoaderState = serde_json::from_value(state.clone()).map_err(|e| {
            Error::Invalid(format!("data state {state} is not a loader state: {e}"))
        })?;
        crate::data::LlavaStream::restore(self, state)
    }
}

impl BatchSource for crate::data::LlavaStream {
    type Batch = SupervisedBatch;

    fn next_batch(&mut self) -> Result<Option<SupervisedBatch>> {
        crate::data::LlavaStream::next_batch(self).map(Some)
    }
}
