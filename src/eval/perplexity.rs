//! Perplexity of a model on the answers of a data set, teacher forced.

use serde::{Deserialize, Serialize};

use super::EvalOptions;
use crate::data::{Dataset, SupervisedBatch};
use crate::model::decoder::Capture;
use crate::model::vlm::Vlm;
use crate::{Error, Result};

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
        let (mean, count) = crate::loss::shifted_cross_entropy(&logits.detach(), &inputs.labels)?;
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
