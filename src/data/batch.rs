//! Batching and the resumable shuffling loader.
//!
//! The [`Loader`] only hands out sample indices; [`Dataset::batch`] turns indices into a [`Batch`]
//! of padded token ids, labels and decoded images. The loader's whole position is a
//! [`LoaderState`] (seed, epoch, position): each epoch's order is a permutation computed from
//! `(seed, epoch)` alone, so saving those three numbers with a checkpoint and restoring them later
//! gives exactly the batches an uninterrupted run would have seen.
//!
//! Images stay `image::RgbImage`s here: turning them into model tensors (resize, normalise) is the
//! model side's job (`crate::image`), so a batch holds no candle tensors and the data side does not
//! need to know the vision tower's preprocessing.

use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::llava::Dataset;
use super::rng::{derive_seed, SplitMix64};
use crate::tokenize::IGNORE_INDEX;
use crate::{Error, Result};

/// Where a [`Loader`] stands; small, serialisable, enough to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub seed: u64,
    /// Epochs completed so far (the current epoch's number).
    pub epoch: u64,
    /// Samples of the current epoch already handed out.
    pub position: usize,
}

/// Hands out batches of sample indices forever, epoch after epoch, each epoch in its own
/// shuffled order (or in file order, for evaluation).
#[derive(Debug, Clone)]
pub struct Loader {
    len: usize,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    /// Sample lengths and how many batches form one sorting group, when grouping by length.
    grouping: Option<(Arc<Vec<usize>>, usize)>,
    state: LoaderState,
    /// The order of `state.epoch`.
    order: Vec<usize>,
}

impl Loader {
    /// A shuffling loader over `len` samples; the last, smaller batch of an epoch is kept.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if len == 0 || batch_size == 0 {
            return Err(Error::Invalid(format!(
                "a loader needs at least one sample and a batch size of at least 1 (got {len} samples, batch size {batch_size})"
            )));
        }
        let state = LoaderState {
            seed,
            epoch: 0,
            position: 0,
        };
        let mut loader = Self {
            len,
            batch_size,
            shuffle: true,
            drop_last: false,
            grouping: None,
            state,
            order: Vec::new(),
        };
        loader.order = loader.epoch_order(0);
        Ok(loader)
    }

    /// Shuffle each epoch (default) or go through the samples in order.
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self.order = self.epoch_order(self.state.epoch);
        self
    }

    /// Drop the last batch of an epoch when it is smaller than the batch size, so every batch
    /// has the same size (default: keep it).
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Number of samples one epoch goes through.
    pub fn num_samples(&self) -> usize {
        self.len
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of batches one epoch yields.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            (self.len / self.batch_size).max(1)
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    /// The order in which epoch `epoch` visits the samples: a function of the seed and the epoch
    /// only.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if !self.shuffle {
            return order;
        }
        let mut rng = SplitMix64::new(derive_seed(self.state.seed, &[epoch]));
        rng.shuffle(&mut order);
        let Some((lengths, group)) = &self.grouping else {
            return order;
        };
        // Sort each group of consecutive batches by length, cut it into batches, then shuffle
        // the batches (the short last one stays last, so every batch but it stays full).
        for chunk in order.chunks_mut(self.batch_size * group) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
        let mut batches: Vec<&[usize]> = order.chunks(self.batch_size).collect();
        let short_tail = batches.pop_if(|b| b.len() < self.batch_size);
        rng.shuffle(&mut batches);
        batches.extend(short_tail);
        batches.concat()
    }

    /// Put samples of similar length in the same batch, so less of each batch is padding (the
    /// synthetic world's description answers are twice as long as the others). Within each group
    /// of `batches_per_group` batches of the shuffled order, samples are sorted by length; the
    /// batches are then shuffled. Still a function of (seed, epoch), so still resumable.
    pub fn with_length_grouping(
        mut self,
        lengths: Vec<usize>,
        batches_per_group: usize,
    ) -> Result<Self> {
        if lengths.len() != self.len || batches_per_group == 0 {
            return Err(Error::Invalid(format!(
                "length grouping needs one length per sample ({} given for {}) and at least one batch per group ({batches_per_group})",
                lengths.len(),
                self.len
            )));
        }
        self.grouping = Some((Arc::new(lengths), batches_per_group));
        self.order = self.epoch_order(self.state.epoch);
        Ok(self)
    }

    /// The next batch of sample indices. An epoch's last batch may be smaller (unless
    /// `drop_last`, or the batch size exceeds the data set, in which case it is the whole set).
    pub fn next_indices(&mut self) -> Vec<usize> {
        let remaining = self.len - self.state.position;
        let short = remaining < self.batch_size;
        let whole_set_is_short = self.len < self.batch_size;
        if remaining == 0 || (short && self.drop_last && !whole_set_is_short) {
            self.start_epoch(self.state.epoch + 1);
        }
        let start = self.state.position;
        let end = (start + self.batch_size).min(self.len);
        self.state.position = end;
        self.order[start..end].to_vec()
    }

    /// The current position, to save with a checkpoint.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved position (its seed included).
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        if state.position > self.len {
            return Err(Error::Invalid(format!(
                "loader state position {} is past the end of an epoch of {} samples (was the state saved for another data set?)",
                state.position, self.len
            )));
        }
        self.state = state;
        self.order = self.epoch_order(state.epoch);
        Ok(())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.state.epoch = epoch;
        self.state.position = 0;
        self.order = self.epoch_order(epoch);
    }
}

/// A padded batch, ready to be turned into tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Right-padded with the data set's pad id (Phi: EOS) to the longest sample.
    pub input_ids: Vec<Vec<i64>>,
    /// Right-padded with [`IGNORE_INDEX`].
    pub labels: Vec<Vec<i64>>,
    /// Real length of each row (positions past it are padding).
    pub lengths: Vec<usize>,
    /// The decoded image of each row; `None` for text-only samples (TinyLLaVA then feeds a zero
    /// image that no token refers to, so the model side may simply skip it).
    pub images: Vec<Option<Arc<RgbImage>>>,
    /// Each row's record index in the JSON file.
    pub records: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Padded length of every row.
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// 1 for real positions, 0 for padding. Built from the lengths, not by comparing with the pad
    /// id, because Phi's pad id is also its EOS, which is a real token at the end of each answer
    /// (TinyLLaVA's collator works around the same clash with a temporary id).
    pub fn attention_mask(&self) -> Vec<Vec<u8>> {
        let width = self.seq_len();
        self.lengths
            .iter()
            .map(|&n| (0..width).map(|j| u8::from(j < n)).collect())
            .collect()
    }
}

impl Dataset {
    /// Collate the samples at `indices` (positions in this data set, as a [`Loader`] gives them)
    /// into a [`Batch`]. Fails if an index is out of range or an image cannot be decoded (the
    /// error names the record and the file).
    pub fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            let (ids, labels) = self.tokens(i)?;
            rows.push((ids, labels, self.image(i)?, self.records[i].index));
        }
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let pad = self.pad_id();
        let mut batch = Batch {
            input_ids: Vec::with_capacity(rows.len()),
            labels: Vec::with_capacity(rows.len()),
            lengths: Vec::with_capacity(rows.len()),
            images: Vec::with_capacity(rows.len()),
            records: Vec::with_capacity(rows.len()),
        };
        for (ids, labels, image, record) in rows {
            let mut ids = ids.to_vec();
            let mut labels = labels.to_vec();
            batch.lengths.push(ids.len());
            ids.resize(width, pad);
            labels.resize(width, IGNORE_INDEX);
            batch.input_ids.push(ids);
            batch.labels.push(labels);
            batch.images.push(image);
            batch.records.push(record);
        }
        Ok(batch)
    }
}
