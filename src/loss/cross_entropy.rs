//! Next-token cross-entropy on the answers (supervised training, perplexity) and the token
//! accuracy that goes with it.

use candle_core::{DType, Tensor, D};

use crate::tokenize::IGNORE_INDEX;
use crate::{Error, Result};

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
