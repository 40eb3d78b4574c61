//! A data [`Batch`] turned into what a model takes: token rows, preprocessed pixel values and
//! labels stretched over the image positions. Training, evaluation and distillation all read
//! batches in this form.
//!
//! A data batch holds token rows with one [`IMAGE_TOKEN`] placeholder per image and labels of the
//! same length. [`crate::model::vlm::Vlm::embed_inputs`] replaces each placeholder by the image's
//! `n_image_tokens` vectors, so the labels are stretched the same way ([`expand_labels`]: the
//! placeholder's label becomes `n_image_tokens` ignored positions) before the usual causal shift
//! (the logits at position `t` predict the label at `t + 1`, as HF's `ForCausalLMLoss`).

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;

use super::Batch;
use crate::image::ImagePreprocessor;
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
