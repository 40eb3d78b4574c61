//! Supervised training: cross-entropy on the answer tokens, every parameter trainable. This is
//! how the embedded tiny teacher is trained from scratch on the synthetic world.
//!
//! A data [`Batch`] holds token rows with one [`IMAGE_TOKEN`] placeholder per image and labels of
//! the same length. [`Vlm::embed_inputs`] replaces each placeholder by the image's
//! `n_image_tokens` vectors, so the labels are stretched the same way ([`expand_labels`]: the
//! placeholder's label becomes `n_image_tokens` ignored positions) before the usual causal shift
//! (the logits at position `t` predict the label at `t + 1`, as HF's `ForCausalLMLoss`).
//!
//! Building the model for training: take the weights, turn them into `Var`s with
//! [`crate::train::ParamSet::select`], and build the [`Vlm`] from the returned map (e.g. with
//! [`crate::teacher::vlm_from_tensors`]) so that the gradients reach them.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use image::DynamicImage;

use super::trainer::{BatchSource, Resumable, StepOutput};
use crate::data::{Batch, Dataset, Loader, LoaderState};
use crate::image::ImagePreprocessor;
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::tokenize::{IGNORE_INDEX, IMAGE_TOKEN};
use crate::{Error, Result};

/// Labels of one row as the decoder sees it: the label at an [`IMAGE_TOKEN`] of `input_ids`
/// becomes `n_image_tokens` [`IGNORE_INDEX`]es (the image positions predict nothing), every other
/// label is kept. `input_ids` and `labels` must have the same length.
pub fn expand_labels(input_ids: &[i64], labels: &[i64], n_image_tokens: usize) -> Result<Vec<i64>> {
    if input_ids.len() != labels.len() {
        return Err(Error::Invalid(format!(
            "a row has {} token ids but {} labels",
            input_ids.len(),
            labels.len()
        )));
    }
    let mut out = Vec::with_capacity(labels.len() + n_image_tokens);
    for (&id, &label) in input_ids.iter().zip(labels) {
        if id == IMAGE_TOKEN {
            out.extend(std::iter::repeat_n(IGNORE_INDEX, n_image_tokens));
        } else {
            out.push(label);
        }
    }
    Ok(out)
}

/// A batch ready for the model: token rows, pixel values and the expanded labels.
#[derive(Debug, Clone)]
pub struct SupervisedBatch {
    /// Token rows with [`IMAGE_TOKEN`] placeholders, all of the same length.
    pub rows: Vec<Vec<i64>>,
    /// Real length of each row of `rows` (placeholders counted once); the rest is padding.
    pub lengths: Vec<usize>,
    /// `[N_images, 3, H, W]`, one image per placeholder in order of appearance; `None` when the
    /// batch has no image.
    pub pixel_values: Option<Tensor>,
    /// Per row, the labels of each decoder position (see [`expand_labels`]), padded with
    /// [`IGNORE_INDEX`] to the common expanded length. Not shifted.
    pub labels: Vec<Vec<i64>>,
    /// Decoder positions that are not padding, summed over the rows.
    pub tokens: usize,
    /// The samples' positions in their data set.
    pub indices: Vec<usize>,
}

impl SupervisedBatch {
    /// Turn a data batch into model inputs: images preprocessed with `preprocessor` into
    /// `[N, 3, H, W]` f32 on `device`, labels expanded over `n_image_tokens` image positions.
    /// `indices` are the samples' positions in the data set (kept for evaluation).
    pub fn from_batch(
        batch: &Batch,
        indices: &[usize],
        preprocessor: &ImagePreprocessor,
        n_image_tokens: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut images: Vec<DynamicImage> = Vec::new();
        let mut labels = Vec::with_capacity(batch.len());
        let mut tokens = 0;
        for (i, (ids, row_labels)) in batch.input_ids.iter().zip(&batch.labels).enumerate() {
            let markers = ids.iter().filter(|&&t| t == IMAGE_TOKEN).count();
            match (&batch.images[i], markers) {
                (Some(img), 1) => images.push(DynamicImage::ImageRgb8((**img).clone())),
                (None, 0) => {}
                (img, n) => {
                    return Err(Error::Invalid(format!(
                        "batch row {i} (record {}) has {n} image placeholder(s) and {} image",
                        batch.records.get(i).copied().unwrap_or(i),
                        if img.is_some() { "an" } else { "no" }
                    )))
                }
            }
            labels.push(expand_labels(ids, row_labels, n_image_tokens)?);
            tokens += batch.lengths[i] + markers * n_image_tokens.saturating_sub(1);
        }
        let width = labels.iter().map(Vec::len).max().unwrap_or(0);
        for l in &mut labels {
            l.resize(width, IGNORE_INDEX);
        }
        let pixel_values = if images.is_empty() {
            None
        } else {
            Some(preprocessor.preprocess_batch(&images, device, DType::F32)?)
        };
        Ok(Self {
            rows: batch.input_ids.clone(),
            lengths: batch.lengths.clone(),
            pixel_values,
            labels,
            tokens,
            indices: indices.to_vec(),
        })
    }

    /// The rows without their padding. [`Vlm::embed_inputs`] pads them again (with zero vectors)
    /// and reports each row's real length, so that losses can leave the padding out.
    pub fn unpadded_rows(&self) -> Vec<Vec<i64>> {
        self.rows
            .iter()
            .zip(&self.lengths)
            .map(|(row, &n)| row[..n.min(row.len())].to_vec())
            .collect()
    }

    /// Number of labels the loss is taken over (positions `t >= 1` whose label is not ignored).
    pub fn target_count(&self) -> usize {
        self.labels
            .iter()
            .map(|l| l.iter().skip(1).filter(|&&x| x != IGNORE_INDEX).count())
            .sum()
    }
}

/// The positions of `logits` flattened to `[B * T, V]` that predict a label, and those labels:
/// row `b`, position `t` predicts `labels[b][t + 1]`.
fn shifted_targets(
    labels: &[Vec<i64>],
    seq_len: usize,
    vocab: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        if row.len() != seq_len {
            return Err(Error::Invalid(format!(
                "label row {b} has {} positions but the logits have {seq_len}",
                row.len()
            )));
        }
        for t in 0..seq_len.saturating_sub(1) {
            let label = row[t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                return Err(Error::Invalid(format!(
                    "label {label} at row {b}, position {} is outside the vocabulary (size {vocab})",
                    t + 1
                )));
            }
            positions.push((b * seq_len + t) as u32);
            targets.push(label as u32);
        }
    }
    Ok((positions, targets))
}

/// Mean cross-entropy of next-token prediction over the labelled positions: `logits` `[B, T, V]`,
/// `labels` `B` rows of `T` unshifted labels with [`IGNORE_INDEX`] where nothing is predicted.
/// Differentiable (log-softmax from elementary ops, gather). Returns the loss and the number of
/// labelled positions; no labelled position at all is an error.
pub fn shifted_cross_entropy(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.len() != b {
        return Err(Error::Invalid(format!(
            "{} label rows for a batch of {b}",
            labels.len()
        )));
    }
    let (positions, targets) = shifted_targets(labels, t, v)?;
    if positions.is_empty() {
        return Err(Error::Invalid(
            "the batch has no labelled position to learn from".into(),
        ));
    }
    let n = positions.len();
    let device = logits.device();
    let flat = logits.reshape((b * t, v))?.to_dtype(DType::F32)?;
    let picked = flat.index_select(&Tensor::new(positions, device)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let targets = Tensor::new(targets, device)?.unsqueeze(1)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?;
    Ok((nll.mean_all()?, n))
}

/// Fraction of labelled positions whose argmax is the label (teacher forced), for monitoring.
pub fn token_accuracy(logits: &Tensor, labels: &[Vec<i64>]) -> Result<f64> {
    let (_, t, v) = logits.dims3()?;
    let (positions, targets) = shifted_targets(labels, t, v)?;
    if positions.is_empty() {
        return Ok(0.0);
    }
    let argmax: Vec<u32> = logits
        .detach()
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_vec1()?;
    let hits = positions
        .iter()
        .zip(&targets)
        .filter(|(&p, &y)| argmax[p as usize] == y)
        .count();
    Ok(hits as f64 / positions.len() as f64)
}

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
        }
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
        let indices = self.loader.next_indices();
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
    pub train: super::trainer::TrainConfig,
    /// Samples per micro-batch (the global batch is `batch_size * train.accum`).
    pub batch_size: usize,
    /// Evaluate on at most this many validation samples (all when `None`).
    pub eval_limit: Option<usize>,
}

impl Default for SupervisedConfig {
    fn default() -> Self {
        Self::tiny_teacher(super::trainer::TrainConfig::default().steps)
    }
}

impl SupervisedConfig {
    /// The recipe the embedded tiny teacher was trained with (see `train_teacher`), over `steps`
    /// optimiser steps: AdamW lr 1e-3, betas (0.9, 0.98), weight decay 0.05, clip 1.0, cosine
    /// decay to a tenth after a 5% warmup, batch 64.
    pub fn tiny_teacher(steps: usize) -> Self {
        use super::schedule::LrSchedule;
        Self {
            train: super::trainer::TrainConfig {
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
                ..super::trainer::TrainConfig::default()
            },
            batch_size: 64,
            eval_limit: None,
        }
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
) -> Result<(Vlm, super::trainer::TrainSummary)> {
    use super::params::{ParamSet, Selection};
    use super::run::RunDir;
    use super::trainer::Trainer;
    use crate::eval::{evaluate, EvalMode, EvalOptions};

    let tensors = vlm.named_tensors().into_iter().collect();
    let (params, tensors) = ParamSet::select(&tensors, &Selection::all())?;
    let model = vlm.rebuilt(tensors)?;
    // Shares the Vars' storage, so it sees every step, but records no graph.
    let detached = |m: &Vlm| -> Result<Vlm> {
        m.rebuilt(
            m.named_tensors()
                .into_iter()
                .map(|(name, t)| (name, t.detach()))
                .collect(),
        )
    };
    let eval_model = detached(&model)?;
    let loader = Loader::new(train.len(), cfg.batch_size, cfg.train.seed)?;
    let mut source = SupervisedSource::for_model(train, loader, &model);
    let run = RunDir::open(run_dir)?;
    if run.read_config()?.is_none() {
        let config = serde_json::to_value(cfg)
            .map_err(|e| Error::Other(format!("serialising the supervised config: {e}")))?;
        run.write_config(&config)?;
    }
    let exact = EvalOptions {
        mode: EvalMode::TeacherForced,
        limit: cfg.eval_limit,
        ..EvalOptions::default()
    };
    let mut trainer = Trainer::new(cfg.train.clone(), &params, run)?;
    if let Some(flag) = cancel {
        trainer = trainer.with_cancel(flag);
    }
    if let Some(val) = val.as_deref() {
        let (eval_model, exact) = (&eval_model, &exact);
        trainer = trainer.with_eval(move |_| Ok(evaluate(eval_model, val, exact)?.metrics("val_")));
    }
    let summary = trainer.fit(&mut source, |_, batch| supervised_step(&model, batch))?;
    drop(trainer);
    Ok((detached(&model)?, summary))
}
