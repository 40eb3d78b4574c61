//! Exact-match accuracy of a VLM on a question-answer data set, overall and per question type.
//!
//! Two ways to score a sample:
//!
//! * [`EvalMode::TeacherForced`]: one batched forward over prompt + reference answer; the answer
//!   is right when every answer token and the closing EOS is the argmax given the reference
//!   prefix. Greedy decoding produces exactly the reference in that case and only then, so this
//!   equals greedy exact match on token ids, at the cost of one forward per batch. Used during
//!   training.
//! * [`EvalMode::Generate`]: greedy generation ([`Vlm::generate_ids`]) from the prompt alone,
//!   the text compared with the reference after [`normalize_answer`]. Used for reported numbers.
//!
//! [`agreement`] compares a student with its teacher instead: how often their most likely next
//! token is the same, and the KL divergence between their next-token distributions.
//!
//! [`ImageInput::Blank`] replaces every image by an all-black one of the same size (black is the
//! synthetic world's background, so the model sees an empty scene): what is left is what the
//! question alone gives away.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, D};
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::data::{normalize_answer, Batch, Dataset};
use crate::distill::Positions;
use crate::generate::GenerateOptions;
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::tokenize::{single_turn_prompt, IGNORE_INDEX};
use crate::train::supervised::SupervisedBatch;
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
    /// Samples per forward in teacher-forced mode (generation goes one sample at a time).
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

/// The outcome of [`evaluate`]: overall and per question type (`"untyped"` for samples without
/// a type), plus a few wrong answers to look at.
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
    /// `overall 97.3% (n 2000) | color 99.0% | ...`
    pub fn summary(&self) -> String {
        let mut s = format!("overall {:.1}% (n {})", 100.0 * self.accuracy, self.n);
        for (t, score) in &self.per_type {
            s.push_str(&format!(" | {t} {:.1}%", 100.0 * score.accuracy));
        }
        s
    }

    /// Named values for a metrics line: `{prefix}acc`, `{prefix}acc_{type}`.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut v = vec![(format!("{prefix}acc"), self.accuracy)];
        v.extend(
            self.per_type
                .iter()
                .map(|(t, s)| (format!("{prefix}acc_{t}"), s.accuracy)),
        );
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
        mistakes: Vec::new(),
    };
    let record = |report: &mut EvalReport, i: usize, ok: bool| {
        let t = question_type(dataset, i);
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
            for i in 0..n {
                let rec = &dataset.records[i];
                let turn = rec.turns.first().ok_or_else(|| {
                    Error::Invalid(format!("record {} has no question", rec.index))
                })?;
                let expected = turn.answer.clone().unwrap_or_default();
                let image = dataset.image(i)?;
                let prompt = single_turn_prompt(&turn.question, image.is_some());
                let ids = tok.encode_prompt_with_images(&prompt, usize::from(image.is_some()))?;
                let pixels = match image {
                    Some(img) => {
                        let img = match opts.image {
                            ImageInput::Real => (*img).clone(),
                            ImageInput::Blank => RgbImage::new(img.width(), img.height()),
                        };
                        Some(
                            vlm.preprocessor
                                .preprocess(&DynamicImage::ImageRgb8(img), &vlm.device, vlm.dtype)?
                                .unsqueeze(0)?,
                        )
                    }
                    None => None,
                };
                let (out, _) = vlm.generate_ids(&ids, pixels.as_ref(), &gen, &mut |_| true)?;
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

/// Settings of [`agreement`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AgreementOptions {
    /// Answer positions only (default: the positions that predict an answer token, where the
    /// student's skill shows) or every non-padding position.
    pub positions: Positions,
    /// Samples per forward.
    pub batch_size: usize,
    /// Only the first `limit` samples of the data set.
    pub limit: Option<usize>,
}

impl Default for AgreementOptions {
    fn default() -> Self {
        Self {
            positions: Positions::Answers,
            batch_size: 64,
            limit: None,
        }
    }
}

/// How closely a student follows its teacher, teacher forced on a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementReport {
    pub positions: Positions,
    /// The data file compared on.
    pub source: String,
    pub samples: usize,
    /// Positions compared.
    pub n_positions: usize,
    /// Fraction of positions where both models' most likely next token is the same.
    pub agreement: f64,
    /// Mean over positions of KL(teacher || student) of the next-token distributions (T = 1, nats).
    pub kl: f64,
}

impl AgreementReport {
    /// Named values for a metrics line: `{prefix}agree`, `{prefix}kl`.
    pub fn metrics(&self, prefix: &str) -> Vec<(String, f64)> {
        vec![
            (format!("{prefix}agree"), self.agreement),
            (format!("{prefix}kl"), self.kl),
        ]
    }

    /// `agreement 97.1%, KL 0.0123 nats/position (n 1234 answer positions)`
    pub fn summary(&self) -> String {
        let which = match self.positions {
            Positions::Answers => "answer",
            Positions::All => "",
        };
        format!(
            "agreement {:.1}%, KL {:.4} nats/position (n {} {which} positions)",
            100.0 * self.agreement,
            self.kl,
            self.n_positions
        )
    }
}

/// Top-1 next-token agreement and mean KL(teacher || student) per position of `student` against
/// `teacher` on `dataset`, both teacher forced on the same inputs, batched, without a graph.
/// Padding never counts; with [`Positions::Answers`] only positions whose next label is an
/// answer token do (the positions [`evaluate`] scores).
pub fn agreement(
    teacher: &Vlm,
    student: &Vlm,
    dataset: &Dataset,
    opts: &AgreementOptions,
) -> Result<AgreementReport> {
    let n = opts.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    if n == 0 {
        return Err(Error::Invalid(format!(
            "nothing to compare on: {} has no sample",
            dataset.source().display()
        )));
    }
    let (ti, si) = (teacher.config.image_tokens(), student.config.image_tokens());
    if ti != si {
        return Err(Error::Invalid(format!(
            "teacher turns an image into {ti} tokens, the student into {si}"
        )));
    }
    let (mut agree, mut kl_sum, mut count) = (0usize, 0f64, 0usize);
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(opts.batch_size.max(1)) {
        let inputs = SupervisedBatch::from_batch(
            &dataset.batch(chunk)?,
            chunk,
            &student.preprocessor,
            si,
            &student.device,
        )?;
        let rows = inputs.unpadded_rows();
        let (t_logits, lengths) = teacher_forced_logits(teacher, &rows, &inputs)?;
        let (s_logits, _) = teacher_forced_logits(student, &rows, &inputs)?;
        if t_logits.dims() != s_logits.dims() {
            return Err(Error::Invalid(format!(
                "teacher logits {:?} and student logits {:?} differ in shape",
                t_logits.dims(),
                s_logits.dims()
            )));
        }
        let log_t = candle_nn::ops::log_softmax(&t_logits, D::Minus1)?;
        let log_s = candle_nn::ops::log_softmax(&s_logits, D::Minus1)?;
        let kl: Vec<Vec<f32>> = (log_t.exp()? * (&log_t - &log_s)?)?
            .sum(D::Minus1)?
            .to_vec2()?;
        let t_top: Vec<Vec<u32>> = t_logits.argmax(D::Minus1)?.to_vec2()?;
        let s_top: Vec<Vec<u32>> = s_logits.argmax(D::Minus1)?.to_vec2()?;
        for (b, &len) in lengths.iter().enumerate() {
            for pos in 0..len {
                let counted = match opts.positions {
                    Positions::All => true,
                    Positions::Answers => inputs.labels[b]
                        .get(pos + 1)
                        .is_some_and(|&l| l != IGNORE_INDEX),
                };
                if counted {
                    count += 1;
                    agree += usize::from(t_top[b][pos] == s_top[b][pos]);
                    kl_sum += kl[b][pos] as f64;
                }
            }
        }
    }
    if count == 0 {
        return Err(Error::Invalid(format!(
            "no {:?} position to compare in the first {n} samples of {}",
            opts.positions,
            dataset.source().display()
        )));
    }
    Ok(AgreementReport {
        positions: opts.positions,
        source: dataset.source().display().to_string(),
        samples: n,
        n_positions: count,
        agreement: agree as f64 / count as f64,
        kl: kl_sum / count as f64,
    })
}

/// Detached f32 logits `[B, T, V]` of `vlm` on unpadded `rows` (with the batch's images), and
/// each row's real length in decoder positions.
fn teacher_forced_logits(
    vlm: &Vlm,
    rows: &[Vec<i64>],
    inputs: &SupervisedBatch,
) -> Result<(candle_core::Tensor, Vec<usize>)> {
    let images = match &inputs.pixel_values {
        Some(p) => Some(vlm.encode_images(&p.to_dtype(vlm.dtype)?)?.detach()),
        None => None,
    };
    let (embeds, lengths) = vlm.embed_inputs(rows, images.as_ref())?;
    let mut cache = vlm.new_cache();
    let logits = vlm.decoder.forward(
        &embeds.detach(),
        &mut cache,
        &Capture::none(),
        &mut Default::default(),
    )?;
    Ok((logits.detach().to_dtype(DType::F32)?, lengths))
}

/// Settings of [`decode_speed`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeedOptions {
    /// The prompt as the model sees it (already in the chat template; `<image>` where the image
    /// goes).
    pub prompt: String,
    /// The image of the prompt, if it has one.
    pub image: Option<std::path::PathBuf>,
    /// Tokens generated per measurement (at least 2: the first comes out of the prefill).
    pub new_tokens: usize,
    /// Measurements taken; the fastest counts (the least disturbed by other work on the machine).
    pub repeats: usize,
}

impl Default for SpeedOptions {
    fn default() -> Self {
        Self {
            prompt: single_turn_prompt("What is in the picture?", false),
            image: None,
            new_tokens: 64,
            repeats: 3,
        }
    }
}

/// Wall-clock speed of greedy generation, from [`decode_speed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedReport {
    /// Decoder positions of the prompt (image tokens counted).
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Seconds from the call to the first new token: image encoding, prefill, first pick.
    pub prefill_s: f64,
    /// Seconds for the other `new_tokens - 1` tokens, one incremental step each.
    pub decode_s: f64,
    /// `(new_tokens - 1) / decode_s`: the decode speed.
    pub tokens_per_s: f64,
    pub repeats: usize,
}

/// Measure greedy decoding of `vlm` by the wall clock: generate `opts.new_tokens` tokens (EOS
/// does not stop it) after the prompt, `opts.repeats` times, and report the fastest run. The
/// decode speed leaves the prefill out (it is timed on its own), so it measures the per-token
/// cost that the KV cache (attention) or the fixed state (Mamba) sets.
pub fn decode_speed(vlm: &Vlm, opts: &SpeedOptions) -> Result<SpeedReport> {
    if opts.new_tokens < 2 {
        return Err(Error::Invalid(format!(
            "decode speed: new_tokens must be at least 2 (the first token comes from the \
             prefill), got {}",
            opts.new_tokens
        )));
    }
    if opts.repeats == 0 {
        return Err(Error::Invalid(
            "decode speed: repeats must be at least 1".into(),
        ));
    }
    let tok = vlm.tokenizer()?;
    let ids = tok.encode_prompt_with_images(&opts.prompt, usize::from(opts.image.is_some()))?;
    let pixels = match &opts.image {
        Some(p) => Some(vlm.pixel_values(p)?),
        None => None,
    };
    let prompt_tokens =
        ids.len() + usize::from(pixels.is_some()) * vlm.config.image_tokens().saturating_sub(1);
    let gen = GenerateOptions {
        max_new_tokens: opts.new_tokens,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let mut best: Option<SpeedReport> = None;
    for _ in 0..opts.repeats {
        let start = std::time::Instant::now();
        let mut first: Option<std::time::Instant> = None;
        let (out, _) = vlm.generate_ids(&ids, pixels.as_ref(), &gen, &mut |_| {
            first.get_or_insert_with(std::time::Instant::now);
            true
        })?;
        let end = std::time::Instant::now();
        let first = first.unwrap_or(end);
        if out.len() != opts.new_tokens {
            return Err(Error::Other(format!(
                "decode speed: generation stopped after {} of {} tokens",
                out.len(),
                opts.new_tokens
            )));
        }
        let decode_s = (end - first).as_secs_f64();
        let report = SpeedReport {
            prompt_tokens,
            new_tokens: opts.new_tokens,
            prefill_s: (first - start).as_secs_f64(),
            decode_s,
            tokens_per_s: (opts.new_tokens - 1) as f64 / decode_s.max(1e-9),
            repeats: opts.repeats,
        };
        if best
            .as_ref()
            .is_none_or(|b| report.tokens_per_s > b.tokens_per_s)
        {
            best = Some(report);
        }
    }
    best.ok_or_else(|| Error::Other("decode speed: no measurement".into()))
}

/// Perplexity of a model on the answers of a data set (teacher forced): `exp` of the mean
/// negative log-likelihood of every answer token (EOS included) given everything before it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexityReport {
    pub source: String,
    pub samples: usize,
    /// Answer tokens scored.
    pub tokens: usize,
    /// Mean negative log-likelihood per answer token, in nats.
    pub nll: f64,
    pub perplexity: f64,
}

impl PerplexityReport {
    pub fn summary(&self) -> String {
        format!(
            "answer perplexity {:.4} (nll {:.4} nats/token, {} tokens, n {})",
            self.perplexity, self.nll, self.tokens, self.samples
        )
    }
}

/// [`PerplexityReport`] of `vlm` on the first `opts.limit` samples of `dataset`, `opts.batch_size`
/// samples per forward (the mode and image options of `opts` are not used).
pub fn answer_perplexity(
    vlm: &Vlm,
    dataset: &Dataset,
    opts: &EvalOptions,
) -> Result<PerplexityReport> {
    let n = opts.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    let indices: Vec<usize> = (0..n).collect();
    let (mut total, mut tokens) = (0.0f64, 0usize);
    for chunk in indices.chunks(opts.batch_size.max(1)) {
        let inputs = SupervisedBatch::from_batch(
            &dataset.batch(chunk)?,
            chunk,
            &vlm.preprocessor,
            vlm.config.image_tokens(),
            &vlm.device,
        )?;
        if inputs.target_count() == 0 {
            continue;
        }
        let pixels = match &inputs.pixel_values {
            Some(p) => Some(p.to_dtype(vlm.dtype)?),
            None => None,
        };
        let (logits, _) = vlm.forward(&inputs.rows, pixels.as_ref(), &Capture::none())?;
        let (mean, count) =
            crate::train::supervised::shifted_cross_entropy(&logits.detach(), &inputs.labels)?;
        total += mean.to_scalar::<f32>()? as f64 * count as f64;
        tokens += count;
    }
    if tokens == 0 {
        return Err(Error::Invalid(format!(
            "no answer token to score in the first {n} samples of {}",
            dataset.source().display()
        )));
    }
    let nll = total / tokens as f64;
    Ok(PerplexityReport {
        source: dataset.source().display().to_string(),
        samples: n,
        tokens,
        nll,
        perplexity: nll.exp(),
    })
}
