//! Exact-match accuracy of a VLM on a question-answer data set, overall, per question type and,
//! for a synthetic world with held-out compositions, on seen and unseen scenes apart.
//!
//! Two ways to score a sample:
//!
//! * [`EvalMode::TeacherForced`]: one batched forward over prompt + reference answer; the answer
//!   is right when every answer token and the closing EOS is the argmax given the reference
//!   prefix. Greedy decoding produces exactly the reference in that case and only then, so this
//!   equals greedy exact match on token ids, at the cost of one forward per batch. Used during
//!   training.
//! * [`EvalMode::Generate`]: greedy generation ([`Vlm::generate_ids_batch`]) from the prompt alone,
//!   the text compared with the reference after [`normalize_answer`]. Used for reported numbers.
//!
//! [`ImageInput::Blank`] replaces every image by an all-black one of the same size (black is the
//! synthetic world's background, so the model sees an empty scene): what is left is what the
//! question alone gives away.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, D};
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::data::{normalize_answer, Batch, Dataset, SupervisedBatch};
use crate::generate::{GenerateOptions, PromptIds};
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::tokenize::{single_turn_prompt, IGNORE_INDEX};
use crate::{Error, Result};

/// How a sample is scored (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    TeacherForced,
    Generate,
}

/// What the model is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageInput {
    /// The sample's own image.
    Real,
    /// An all-black image of the same size (an empty scene in the synthetic world).
    Blank,
}

/// Settings of [`evaluate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalOptions {
    pub mode: EvalMode,
    pub image: ImageInput,
    /// Samples per forward (teacher-forced) or per batched generation (generate).
    pub batch_size: usize,
    /// Only the first `limit` samples of the data set.
    pub limit: Option<usize>,
    /// Generation cap; an answer cut by it is wrong.
    pub max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            mode: EvalMode::TeacherForced,
            image: ImageInput::Real,
            batch_size: 64,
            limit: None,
            max_new_tokens: 64,
        }
    }
}

/// Counts and accuracy of one group of samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Score {
    fn add(&mut self, ok: bool) {
        self.n += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.n as f64;
    }
}

/// Accuracy of the records of one composition group (`seen` or `unseen`), overall and per
/// question type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupScore {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub per_type: BTreeMap<String, Score>,
}

impl GroupScore {
    fn add(&mut self, question_type: &str, ok: bool) {
        self.n += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.n as f64;
        self.per_type
            .entry(question_type.to_string())
            .or_default()
            .add(ok);
    }
}

/// The outcome of [`evaluate`]: overall and per question type (`"untyped"` for samples without
/// a type), per composition group (records with a `composition` tag only), plus a few wrong
/// answers to look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub mode: EvalMode,
    pub image: ImageInput,
    /// The data file evaluated.
    pub source: String,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub per_type: BTreeMap<String, Score>,
    /// `seen` / `unseen` (a synthetic world with held-out compositions); empty when no record is
    /// tagged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_composition: BTreeMap<String, GroupScore>,
    /// Up to [`MAX_MISTAKES`] wrong answers (generation mode only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mistakes: Vec<Mistake>,
}

/// How many wrong answers a report keeps.
pub const MAX_MISTAKES: usize = 12;

/// A wrong generated answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mistake {
    pub record: usize,
    pub question_type: String,
    pub question: String,
    pub expected: String,
    pub got: String,
}

impl EvalReport {
    /// `overall 97.3% (n 2000) | color 99.0% | ... | seen 99.0% (n 1000) | unseen ...`
    pub fn summary(&self) -> String {
        let mut s = format!("overall {:.1}% (n {})", 100.0 * self.accuracy, self.n);
        for (t, score) in &self.per_type {
            s.push_str(&format!(" | {t} {:.1}%", 100.0 * score.accuracy));
        }
        for (c, score) in &self.per_composition {
            s.push_str(&format!(
                " | {c} {:.1}% (n {})",
                100.0 * score.accuracy,
                score.n
            ));
        }
        s
    }

    /// Named values for a metrics line: `{prefix}acc`, `{prefix}acc_{type}`, and with composition
    /// tags `{prefix}acc_{seen|unseen}` and `{prefix}acc_{seen|unseen}_{type}`.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut v = vec![(format!("{prefix}acc"), self.accuracy)];
        v.extend(
            self.per_type
                .iter()
                .map(|(t, s)| (format!("{prefix}acc_{t}"), s.accuracy)),
        );
        for (c, group) in &self.per_composition {
            v.push((format!("{prefix}acc_{c}"), group.accuracy));
            v.extend(
                group
                    .per_type
                    .iter()
                    .map(|(t, s)| (format!("{prefix}acc_{c}_{t}"), s.accuracy)),
            );
        }
        v
    }
}

/// Exact-match accuracy of `vlm` on `dataset` (see the module doc for the two modes).
pub fn evaluate(vlm: &Vlm, dataset: &Dataset, opts: &EvalOptions) -> Result<EvalReport> {
    let n = opts.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    if n == 0 {
        return Err(Error::Invalid(format!(
            "nothing to evaluate: {} has no sample",
            dataset.source().display()
        )));
    }
    let mut report = EvalReport {
        mode: opts.mode,
        image: opts.image,
        source: dataset.source().display().to_string(),
        n: 0,
        correct: 0,
        accuracy: 0.0,
        per_type: BTreeMap::new(),
        per_composition: BTreeMap::new(),
        mistakes: Vec::new(),
    };
    let record = |report: &mut EvalReport, i: usize, ok: bool| {
        let t = question_type(dataset, i);
        if let Some(c) = &dataset.records[i].composition {
            report
                .per_composition
                .entry(c.clone())
                .or_default()
                .add(&t, ok);
        }
        report.per_type.entry(t).or_default().add(ok);
        report.n += 1;
        report.correct += usize::from(ok);
    };
    match opts.mode {
        EvalMode::TeacherForced => {
            let indices: Vec<usize> = (0..n).collect();
            for chunk in indices.chunks(opts.batch_size.max(1)) {
                let mut batch = dataset.batch(chunk)?;
                if opts.image == ImageInput::Blank {
                    blank_images(&mut batch);
                }
                for (i, ok) in chunk
                    .iter()
                    .zip(teacher_forced_correct(vlm, &batch, chunk)?)
                {
                    record(&mut report, *i, ok);
                }
            }
        }
        EvalMode::Generate => {
            let tok = vlm.tokenizer()?;
            let gen = GenerateOptions {
                max_new_tokens: opts.max_new_tokens,
                ..GenerateOptions::default()
            };
            // Generated in batches: rows are left-padded and stop on their own, and each row's
            // greedy answer is the one it gets alone (tests/parity/batch.rs).
            let indices: Vec<usize> = (0..n).collect();
            for chunk in indices.chunks(opts.batch_size.max(1)) {
                let mut ids = Vec::with_capacity(chunk.len());
                let mut pixels = Vec::with_capacity(chunk.len());
                for &i in chunk {
                    let rec = &dataset.records[i];
                    let turn = rec.turns.first().ok_or_else(|| {
                        Error::Invalid(format!("record {} has no question", rec.index))
                    })?;
                    let image = dataset.image(i)?;
                    let prompt = single_turn_prompt(&turn.question, image.is_some());
                    ids.push(tok.encode_prompt_with_images(&prompt, usize::from(image.is_some()))?);
                    pixels.push(match image {
                        Some(img) => {
                            let img = match opts.image {
                                ImageInput::Real => (*img).clone(),
                                ImageInput::Blank => RgbImage::new(img.width(), img.height()),
                            };
                            Some(
                                vlm.preprocessor
                                    .preprocess(
                                        &DynamicImage::ImageRgb8(img),
                                        &vlm.device,
                                        vlm.dtype,
                                    )?
                                    .unsqueeze(0)?,
                            )
                        }
                        None => None,
                    });
                }
                let prompts = PromptIds::rows(&ids, &pixels);
                let outs = vlm.generate_ids_batch(&prompts, &gen, &mut |_| true)?;
                for (&i, (out, _)) in chunk.iter().zip(outs) {
                    let rec = &dataset.records[i];
                    let turn = &rec.turns[0];
                    let expected = turn.answer.clone().unwrap_or_default();
                    let got = tok.decode(&out)?;
                    let ok = normalize_answer(&got) == normalize_answer(&expected);
                    if !ok && report.mistakes.len() < MAX_MISTAKES {
                        report.mistakes.push(Mistake {
                            record: rec.index,
                            question_type: question_type(dataset, i),
                            question: turn.question.clone(),
                            expected,
                            got,
                        });
                    }
                    record(&mut report, i, ok);
                }
            }
        }
    }
    report.accuracy = report.correct as f64 / report.n as f64;
    Ok(report)
}

fn question_type(dataset: &Dataset, i: usize) -> String {
    dataset.records[i]
        .question_type
        .clone()
        .unwrap_or_else(|| "untyped".into())
}

/// Replace every image of a batch by an all-black one of the same size.
pub fn blank_images(batch: &mut Batch) {
    for img in batch.images.iter_mut().flatten() {
        *img = Arc::new(RgbImage::new(img.width(), img.height()));
    }
}

/// Per row of `batch`: whether every labelled token is the argmax of the logits before it.
pub fn teacher_forced_correct(vlm: &Vlm, batch: &Batch, indices: &[usize]) -> Result<Vec<bool>> {
    let inputs = SupervisedBatch::from_batch(
        batch,
        indices,
        &vlm.preprocessor,
        vlm.config.image_tokens(),
        &vlm.device,
    )?;
    let pixels = match &inputs.pixel_values {
        Some(p) => Some(p.to_dtype(vlm.dtype)?),
        None => None,
    };
    let (logits, _) = vlm.forward(&inputs.rows, pixels.as_ref(), &Capture::none())?;
    let argmax: Vec<Vec<u32>> = logits
        .detach()
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_vec2()?;
    Ok(inputs
        .labels
        .iter()
        .zip(&argmax)
        .map(|(labels, pred)| {
            (1..labels.len())
                .filter(|&t| labels[t] != IGNORE_INDEX)
                .all(|t| pred[t - 1] as i64 == labels[t])
        })
        .collect())
}
