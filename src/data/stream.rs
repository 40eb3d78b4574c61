//! LLaVA data for long runs: the JSON file read lazily and the samples prepared on worker
//! threads ahead of the training step, in bounded memory.
//!
//! [`Dataset`](super::Dataset) tokenises every record and may keep every decoded image: right
//! for the synthetic world, not for ShareGPT4V's 665K conversations. Here:
//! - [`LazyLlava::open`] makes one streaming pass over the file and keeps only where each record
//!   lies (16 bytes a record, about 10 MB for 665K); a record is read, parsed and checked when a
//!   batch needs it.
//! - [`LlavaStream`] hands out batches, resumably (a training source in
//!   `train::supervised`): the [`Loader`] deals indices on the caller's
//!   thread; `workers` threads read, check and tokenise each record, decode its image and
//!   preprocess it (resize, normalise) into `[3, H, W]` f32; the caller's thread only pads the
//!   rows and stacks the pixels. At most `prefetch` batches are in flight, so memory is bounded
//!   by `prefetch * batch_size` prepared samples whatever the file's size.
//!
//! A record that cannot be used (bad structure, too long, unreadable image) is left out of its
//! batch and counted ([`LlavaStream::skipped`]), as [`OnBadRecord::Skip`] does at load time;
//! with [`OnBadRecord::Fail`] the batch fails with the record's reason.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use serde_json::Value;

use super::inputs::expand_labels;
use super::llava::{decode_image, encode_record, parse_record, LoadOptions, OnBadRecord, Record};
use super::{Loader, LoaderState, SupervisedBatch};
use crate::image::ImagePreprocessor;
use crate::tokenize::{PromptTokenizer, IGNORE_INDEX, IMAGE_TOKEN};
use crate::{Error, Result};

/// A LLaVA file (JSON array, or JSON Lines for `.jsonl`) indexed by record, read on demand.
pub struct LazyLlava {
    path: PathBuf,
    file: File,
    /// Byte offset and length of each record's text.
    spans: Vec<(u64, u64)>,
    image_root: PathBuf,
}

impl LazyLlava {
    /// Index `json`'s records in one pass (nothing is parsed); images are looked for under
    /// `image_root` when read.
    pub fn open(json: &Path, image_root: &Path) -> Result<Self> {
        let file = File::open(json).map_err(|e| Error::io(json, e))?;
        let jsonl = json.extension().and_then(|e| e.to_str()) == Some("jsonl");
        let reader = BufReader::with_capacity(1 << 20, &file);
        let spans = if jsonl {
            line_spans(reader).map_err(|e| Error::io(json, e))?
        } else {
            array_spans(reader).map_err(|reason| Error::BadConfig {
                path: json.to_path_buf(),
                reason,
            })?
        };
        Ok(Self {
            path: json.to_path_buf(),
            file,
            spans,
            image_root: image_root.to_path_buf(),
        })
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Record `i`, parsed and checked; `Err(reason)` when it cannot be used.
    pub fn record(&self, i: usize) -> Result<std::result::Result<Record, String>> {
        let &(offset, len) = self.spans.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "record {i} out of range: {} has {} records",
                self.path.display(),
                self.spans.len()
            ))
        })?;
        let mut text = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut text, offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(match serde_json::from_slice::<Value>(&text) {
            Ok(v) => parse_record(i, &v),
            Err(e) => Err(format!("not valid JSON: {e}")),
        })
    }
}

/// Spans of the non-empty lines of a JSON Lines file.
fn line_spans(reader: impl BufRead) -> std::io::Result<Vec<(u64, u64)>> {
    let mut spans = Vec::new();
    let (mut start, mut pos, mut blank) = (0u64, 0u64, true);
    for byte in reader.bytes() {
        let b = byte?;
        if b == b'\n' {
            if !blank {
                spans.push((start, pos - start));
            }
            start = pos + 1;
            blank = true;
        } else if !b.is_ascii_whitespace() {
            blank = false;
        }
        pos += 1;
    }
    if !blank {
        spans.push((start, pos - start));
    }
    Ok(spans)
}

/// Spans of the elements of a top-level JSON array, found by tracking strings and nesting
/// only (no parsing, one byte at a time through a large buffer).
fn array_spans(reader: impl BufRead) -> std::result::Result<Vec<(u64, u64)>, String> {
    let mut spans = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start: Option<u64> = None;
    let mut closed = false;
    for (pos, byte) in reader.bytes().enumerate() {
        let b = byte.map_err(|e| format!("cannot read: {e}"))?;
        let pos = pos as u64;
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                }
                _ => {}
            }
            continue;
        }
        if closed {
            if !b.is_ascii_whitespace() {
                return Err(format!("text after the array's end at byte {pos}"));
            }
            continue;
        }
        match (depth, b) {
            (_, b) if b.is_ascii_whitespace() => {}
            (0, b'[') => depth = 1,
            (0, _) => return Err("expected a JSON array of conversation records".into()),
            (1, b',') => {
                let s = start.take().ok_or(format!("empty element at byte {pos}"))?;
                spans.push((s, pos - s));
            }
            (1, b']') => {
                if let Some(s) = start.take() {
                    spans.push((s, pos - s));
                }
                depth = 0;
                closed = true;
            }
            (d, b) => {
                if d == 1 && start.is_none() {
                    start = Some(pos);
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth -= 1,
                    _ => {}
                }
            }
        }
    }
    if !closed {
        return Err("the JSON array is not closed (truncated file?)".into());
    }
    // Trailing whitespace inside a span (before a comma) is harmless to the parser.
    Ok(spans)
}

/// How [`LlavaStream`] prepares batches.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Batches prepared ahead of the one being consumed (at least 1).
    pub prefetch: usize,
    /// Length cut and what to do with a bad record (the image checks and cache of
    /// [`LoadOptions`] do not apply: every image is decoded when its sample is prepared).
    pub load: LoadOptions,
    /// Decoder positions one image takes (the model's `image_tokens()`), over which the labels
    /// are stretched.
    pub image_tokens: usize,
}

/// One sample as a worker leaves it.
struct Prepared {
    ids: Vec<i64>,
    labels: Vec<i64>,
    /// `[3, H, W]` f32 on the CPU.
    pixels: Option<Tensor>,
}

type Outcome = std::result::Result<Prepared, String>;

/// A job: sample `slot` of batch `seq` is data-set index `index`.
struct Job {
    seq: u64,
    slot: usize,
    index: usize,
}

/// A batch in flight: its indices, the loader state after it, and the outcomes so far.
struct InFlight {
    indices: Vec<usize>,
    state_after: LoaderState,
    outcomes: Vec<Option<Outcome>>,
    missing: usize,
}

/// Batches of a [`LazyLlava`] in the order a [`Loader`] deals them, prepared by worker threads;
/// resumable (the state is the loader's after the last batch handed out).
pub struct LlavaStream {
    loader: Loader,
    /// The loader state after the last batch returned (what a checkpoint saves).
    consumed: LoaderState,
    jobs: Option<Sender<Job>>,
    results: Receiver<(u64, usize, Outcome)>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: VecDeque<(u64, InFlight)>,
    pad_id: i64,
    next_seq: u64,
    opts: StreamOptions,
    device: Device,
    skipped: usize,
    /// Data parallelism: this rank's share `(rank, world)` of every batch the loader deals.
    shard: Option<(usize, usize)>,
}

impl LlavaStream {
    /// Start `opts.workers` threads preparing batches of `data` in `loader`'s order with
    /// `tokenizer` and `preprocessor`; batches come out on `device`.
    pub fn new(
        data: Arc<LazyLlava>,
        loader: Loader,
        tokenizer: Arc<PromptTokenizer>,
        preprocessor: ImagePreprocessor,
        opts: StreamOptions,
        device: Device,
    ) -> Result<Self> {
        if opts.workers == 0 || opts.prefetch == 0 {
            return Err(Error::Invalid(format!(
                "a stream needs at least one worker and one batch of prefetch (got {} and {})",
                opts.workers, opts.prefetch
            )));
        }
        if loader.num_samples() != data.len() {
            return Err(Error::Invalid(format!(
                "the loader deals {} samples but {} has {} records",
                loader.num_samples(),
                data.path.display(),
                data.len()
            )));
        }
        let (job_tx, job_rx) = channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = channel();
        let workers = (0..opts.workers)
            .map(|w| {
                let (jobs, results) = (job_rx.clone(), res_tx.clone());
                let (data, tok, pre) = (data.clone(), tokenizer.clone(), preprocessor.clone());
                let load = opts.load.clone();
                std::thread::Builder::new()
                    .name(format!("loader-{w}"))
                    .spawn(move || loop {
                        let job = match jobs.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let outcome = prepare(&data, &tok, &pre, &load, job.index);
                        if results.send((job.seq, job.slot, outcome)).is_err() {
                            return;
                        }
                    })
                    .map_err(|e| Error::Other(format!("starting loader worker {w}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let consumed = loader.state();
        let tokenizer_pad = tokenizer.eos_id() as i64;
        Ok(Self {
            loader,
            consumed,
            jobs: Some(job_tx),
            results: res_rx,
            workers,
            in_flight: VecDeque::new(),
            pad_id: tokenizer_pad,
            next_seq: 0,
            opts,
            device,
            skipped: 0,
            shard: None,
        })
    }

    /// Prepare only rank `rank`'s share of each batch (rows `rank * n / world ..
    /// (rank + 1) * n / world` of a batch of `n`): every rank holds the same loader, so the
    /// order and the resumable state are the same on all of them.
    pub fn with_shard(mut self, rank: usize, world: usize) -> Self {
        self.shard = (world > 1).then_some((rank, world));
        self
    }

    /// Records left out so far because they could not be used.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Deal batches until `prefetch` are in flight.
    fn fill(&mut self) -> Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Other("the loader workers are gone".into()))?;
        while self.in_flight.len() < self.opts.prefetch {
            let mut indices = self.loader.next_indices();
            if let Some((rank, world)) = self.shard {
                let n = indices.len();
                indices = indices[rank * n / world..(rank + 1) * n / world].to_vec();
                if indices.is_empty() {
                    return Err(Error::Invalid(format!(
                        "a batch of {n} samples leaves rank {rank} of {world} nothing"
                    )));
                }
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            for (slot, &index) in indices.iter().enumerate() {
                jobs.send(Job { seq, slot, index })
                    .map_err(|_| Error::Other("the loader workers stopped".into()))?;
            }
            let n = indices.len();
            self.in_flight.push_back((
                seq,
                InFlight {
                    indices,
                    state_after: self.loader.state(),
                    outcomes: (0..n).map(|_| None).collect(),
                    missing: n,
                },
            ));
        }
        Ok(())
    }

    /// The loader state after the last batch handed out (what a checkpoint saves).
    pub fn state(&self) -> LoaderState {
        self.consumed
    }

    /// Continue from a saved position: the batches in flight are forgotten (their samples are
    /// dropped when they arrive) and dealing resumes from `state`.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        self.loader.restore(state)?;
        self.consumed = state;
        self.in_flight.clear();
        Ok(())
    }

    fn assemble(&mut self, batch: InFlight) -> Result<SupervisedBatch> {
        let mut rows = Vec::new();
        for (slot, outcome) in batch.outcomes.into_iter().enumerate() {
            match outcome {
                Some(Ok(p)) => rows.push((batch.indices[slot], p)),
                Some(Err(_)) if self.opts.load.on_bad == OnBadRecord::Skip => self.skipped += 1,
                Some(Err(reason)) => {
                    return Err(Error::Invalid(format!(
                        "record {}: {reason}",
                        batch.indices[slot]
                    )))
                }
                None => return Err(Error::Other("a sample of a batch never arrived".into())),
            }
        }
        if rows.is_empty() {
            return Err(Error::Invalid(
                "every record of a batch was unusable; check the data file".into(),
            ));
        }
        let image_tokens = self.opts.image_tokens;
        let width = rows.iter().map(|(_, p)| p.ids.len()).max().unwrap_or(0);
        let mut out = SupervisedBatch {
            rows: Vec::with_capacity(rows.len()),
            lengths: Vec::with_capacity(rows.len()),
            pixel_values: None,
            labels: Vec::with_capacity(rows.len()),
            tokens: 0,
            indices: Vec::with_capacity(rows.len()),
        };
        let mut pixels = Vec::new();
        for (index, p) in rows {
            let markers = p.ids.iter().filter(|&&t| t == IMAGE_TOKEN).count();
            out.tokens += p.ids.len() + markers * image_tokens.saturating_sub(1);
            out.labels
                .push(expand_labels(&p.ids, &p.labels, image_tokens)?);
            out.lengths.push(p.ids.len());
            let mut ids = p.ids;
            // Padded with EOS as `Dataset::batch` pads; the lengths say where a row ends.
            ids.resize(width, self.pad_id);
            out.rows.push(ids);
            out.indices.push(index);
            pixels.extend(p.pixels);
        }
        let label_width = out.labels.iter().map(Vec::len).max().unwrap_or(0);
        for l in &mut out.labels {
            l.resize(label_width, IGNORE_INDEX);
        }
        if !pixels.is_empty() {
            out.pixel_values = Some(Tensor::stack(&pixels, 0)?.to_device(&self.device)?);
        }
        Ok(out)
    }
}

/// Read, check, tokenise and preprocess data-set record `index`.
fn prepare(
    data: &LazyLlava,
    tok: &PromptTokenizer,
    pre: &ImagePreprocessor,
    load: &LoadOptions,
    index: usize,
) -> Outcome {
    let record = data.record(index).map_err(|e| e.to_string())??;
    let (ids, labels) = encode_record(tok, &record, load)?;
    let pixels = match &record.image {
        None => None,
        Some(rel) => {
            let img = decode_image(&data.image_root.join(rel))?;
            let t = pre
                .preprocess(&DynamicImage::ImageRgb8(img), &Device::Cpu, DType::F32)
                .map_err(|e| format!("preprocessing {rel}: {e}"))?;
            Some(t)
        }
    };
    Ok(Prepared {
        ids,
        labels,
        pixels,
    })
}

impl LlavaStream {
    /// The next batch, waiting for its samples if the workers are behind. Never runs dry: the
    /// loader starts a new epoch when one ends.
    pub fn next_batch(&mut self) -> Result<SupervisedBatch> {
        self.fill()?;
        let seq = self
            .in_flight
            .front()
            .map(|(seq, _)| *seq)
            .ok_or_else(|| Error::Other("no batch in flight".into()))?;
        while self.in_flight.front().is_some_and(|(_, b)| b.missing > 0) {
            let (s, slot, outcome) = self
                .results
                .recv()
                .map_err(|_| Error::Other("the loader workers stopped".into()))?;
            // A sample of a batch forgotten by a restore finds no batch and is dropped.
            if let Some((_, b)) = self.in_flight.iter_mut().find(|(q, _)| *q == s) {
                b.outcomes[slot] = Some(outcome);
                b.missing -= 1;
            }
        }
        let (front, batch) = self
            .in_flight
            .pop_front()
            .ok_or_else(|| Error::Other("no batch in flight".into()))?;
        debug_assert_eq!(front, seq);
        self.consumed = batch.state_after;
        self.assemble(batch)
    }
}

impl Drop for LlavaStream {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once they finish their current sample.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
