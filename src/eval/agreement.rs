//! How closely a student follows its teacher: how often their most likely next token is the
//! same, and the KL divergence between their next-token distributions, both teacher forced.

use candle_core::{DType, D};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, SupervisedBatch};
use crate::loss::Positions;
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::tokenize::IGNORE_INDEX;
use crate::{Error, Result};

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
