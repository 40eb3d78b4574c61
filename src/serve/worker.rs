//! The generation worker: one per device, fed by a bounded queue. Jobs of the same model with the
//! same sampling settings are generated together as one left-padded batch; batches of different
//! models waiting at the same time run side by side; each row streams its own text pieces back
//! to its request.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{GenerateOptions, PromptIds, RowToken, StopReason};
use crate::model::vlm::Vlm;
use crate::tokenize::PromptTokenizer;

/// What a request gets back from the worker, in order: pieces of text, then one `Done` (or an
/// `Error`).
#[derive(Debug)]
pub enum Event {
    Piece(String),
    Done(Finish),
    Error(String),
}

/// How a generation ended and what it cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finish {
    /// OpenAI's `finish_reason`: "stop" (EOS) or "length".
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// Speed and memory of one generation (the `timings` extension field of responses, after
/// llama.cpp's server).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// From arrival to the start of its batch.
    pub queue_ms: f64,
    /// From the start of its batch (prefill included) to its first generated token.
    pub time_to_first_token_ms: f64,
    /// Generated tokens per second after the first one.
    pub tokens_per_second: f64,
    /// Bytes of this row's inference cache at its final length.
    pub cache_bytes: usize,
    /// Rows generated together with this one (itself included).
    pub batch_size: usize,
}

/// One request, prepared: token ids, pixels, limits, and where its events go.
pub struct Job {
    pub model: Arc<Vlm>,
    /// Which served model (jobs batch only with jobs of the same model).
    pub model_index: usize,
    pub ids: Vec<i64>,
    /// `[1, 3, H, W]` on the model's device, if the prompt has an image.
    pub pixel_values: Option<Tensor>,
    /// Prompt length as the decoder sees it (image vectors counted), for usage and limits.
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub opts: GenerateOptions,
    /// The answer ends before the first of these (not included).
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

impl Job {
    /// Jobs generated in one batch share these (the batch API takes one set of options).
    fn batch_key(&self) -> (usize, u64, u64, u64, bool) {
        let greedy = self.opts.temperature <= 0.0;
        (
            self.model_index,
            if greedy {
                0
            } else {
                self.opts.temperature.to_bits()
            },
            if greedy { 0 } else { self.opts.top_p.to_bits() },
            if greedy { 0 } else { self.opts.seed },
            self.opts.stop_at_eos,
        )
    }
}

/// Counters shown by `/health`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStats {
    /// Jobs waiting in the queue.
    pub queued: usize,
    /// Jobs in the batch being generated.
    pub running: usize,
    pub completed: u64,
    /// Jobs stopped because their client went away.
    pub cancelled: u64,
    pub failed: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    pub batches: u64,
    /// The largest batch generated so far.
    pub largest_batch: usize,
    /// The most batches (of different models) generated at the same time so far.
    pub most_models_at_once: usize,
}

struct State {
    queue: VecDeque<Job>,
    stats: WorkerStats,
    paused: bool,
    shutdown: bool,
}

/// The queue and the thread that empties it.
pub struct Worker {
    shared: Arc<(Mutex<State>, Condvar)>,
    capacity: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Refused {
    Full { capacity: usize },
    ShuttingDown,
}

impl Worker {
    /// Start a worker thread named `name` with a queue of `capacity` waiting jobs, generating
    /// batches of at most `max_batch` rows, for up to `max_models` models at the same time.
    pub fn start(
        name: &str,
        capacity: usize,
        max_batch: usize,
        max_models: usize,
    ) -> std::io::Result<Self> {
        let shared = Arc::new((
            Mutex::new(State {
                queue: VecDeque::new(),
                stats: WorkerStats::default(),
                paused: false,
                shutdown: false,
            }),
            Condvar::new(),
        ));
        let inner = shared.clone();
        let max_batch = max_batch.max(1);
        let max_models = max_models.max(1);
        let thread = std::thread::Builder::new()
            .name(format!("serve-{name}"))
            .spawn(move || run(&inner, max_batch, max_models))?;
        Ok(Self {
            shared,
            capacity,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if st.shutdown {
            return Err(Refused::ShuttingDown);
        }
        if st.queue.len() >= self.capacity {
            st.stats.rejected += 1;
            return Err(Refused::Full {
                capacity: self.capacity,
            });
        }
        st.queue.push_back(job);
        st.stats.queued = st.queue.len();
        cv.notify_all();
        Ok(())
    }

    pub fn stats(&self) -> WorkerStats {
        let st = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.clone()
    }

    /// Hold queued jobs (the one running finishes) until [`Worker::resume`]: for maintenance,
    /// and to fill the queue deterministically.
    pub fn pause(&self) {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paused = true;
    }

    pub fn resume(&self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).paused = false;
        cv.notify_all();
    }

    /// Refuse new jobs, drop the queued ones (their clients see the stream end), let the running
    /// batch finish, and join the thread.
    pub fn shutdown(&self) {
        {
            let (lock, cv) = &*self.shared;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            st.shutdown = true;
            for job in st.queue.drain(..) {
                let _ = job
                    .events
                    .send(Event::Error("the server is shutting down".into()));
            }
            st.stats.queued = 0;
            cv.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Take the job at `index` and up to `max_batch - 1` queued jobs that can share its batch.
fn take_batch(queue: &mut VecDeque<Job>, index: usize, max_batch: usize) -> Vec<Job> {
    let first = queue.remove(index).expect("index in range");
    let key = first.batch_key();
    let mut batch = vec![first];
    let mut i = 0;
    while i < queue.len() && batch.len() < max_batch {
        if queue[i].batch_key() == key {
            batch.push(queue.remove(i).expect("index in range"));
        } else {
            i += 1;
        }
    }
    batch
}

fn run(shared: &(Mutex<State>, Condvar), max_batch: usize, max_models: usize) {
    let (lock, cv) = shared;
    loop {
        let batches = {
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !st.shutdown && (st.paused || st.queue.is_empty()) {
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            let mut batches = vec![take_batch(&mut st.queue, 0, max_batch)];
            // Batches of other models waiting now run beside the first (compare mode streams a
            // teacher and a hybrid together instead of one after the other).
            while batches.len() < max_models {
                let busy: Vec<usize> = batches.iter().map(|b| b[0].model_index).collect();
                match st.queue.iter().position(|j| !busy.contains(&j.model_index)) {
                    Some(i) => batches.push(take_batch(&mut st.queue, i, max_batch)),
                    None => break,
                }
            }
            st.stats.queued = st.queue.len();
            st.stats.running = batches.iter().map(Vec::len).sum();
            st.stats.batches += batches.len() as u64;
            st.stats.largest_batch = batches
                .iter()
                .map(Vec::len)
                .fold(st.stats.largest_batch, usize::max);
            st.stats.most_models_at_once = st.stats.most_models_at_once.max(batches.len());
            batches
        };
        let outcomes: Vec<crate::Result<Vec<RowEnd>>> = if batches.len() == 1 {
            vec![guarded(&batches[0])]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = batches
                    .iter()
                    .map(|b| scope.spawn(move || guarded(b)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(panicked())))
                    .collect()
            })
        };
        // Counters first, answers second: a client that has its answer sees it counted.
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.running = 0;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (outcome, batch) in outcomes.into_iter().zip(&batches) {
            match outcome {
                Ok(rows) => {
                    for (row, job) in rows.into_iter().zip(batch) {
                        match row {
                            RowEnd::Completed(finish) => {
                                st.stats.completed += 1;
                                done.push((job, finish));
                            }
                            RowEnd::Cancelled => st.stats.cancelled += 1,
                        }
                    }
                }
                Err(e) => {
                    st.stats.failed += batch.len() as u64;
                    failed.extend(batch.iter().map(|job| (job, e.to_string())));
                }
            }
        }
        drop(st);
        for (job, finish) in done {
            let _ = job.events.send(Event::Done(finish));
        }
        for (job, e) in failed {
            let _ = job.events.send(Event::Error(e));
        }
    }
}

/// A panic inside the model fails its batch, not the worker: the queue behind it lives on.
fn guarded(batch: &[Job]) -> crate::Result<Vec<RowEnd>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| generate_batch(batch)))
        .unwrap_or_else(|_| Err(panicked()))
}

fn panicked() -> crate::Error {
    crate::Error::Other("generation panicked; see the server's log".into())
}

enum RowEnd {
    Completed(Finish),
    /// Its client left before its answer was complete.
    Cancelled,
}

/// Where one row of a running batch stands.
struct RowState {
    tokens: Vec<u32>,
    /// The answer decoded so far.
    text: String,
    /// Bytes of `text` sent to the client.
    sent: usize,
    first_token: Option<Instant>,
    /// Its client is gone: its tokens are no longer decoded or sent.
    gone: bool,
    /// It reached one of its stop strings: its answer is complete.
    stopped: bool,
}

impl RowState {
    /// The text that can be sent now: up to the first stop string if one has appeared (the row
    /// is then done), else all but a tail that could still grow into a stop string.
    fn ready(&mut self, stop: &[String]) -> String {
        let cut = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        let end = match cut {
            Some(c) => {
                self.stopped = true;
                self.text.truncate(c);
                c
            }
            None => {
                let held = stop
                    .iter()
                    .flat_map(|s| {
                        (1..s.len())
                            .filter(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                    })
                    .max()
                    .unwrap_or(0);
                // A character whose bytes span tokens decodes as U+FFFD until its last byte
                // comes: held back too, so that the pieces add up to the final text.
                (self.text.len() - held).min(stable_len(&self.text))
            }
        };
        let piece = self.text.get(self.sent..end).unwrap_or("").to_string();
        self.sent = self.sent.max(end);
        piece
    }
}

/// Bytes of `text` before a trailing run of U+FFFD (an incomplete multi-byte character).
fn stable_len(text: &str) -> usize {
    text.trim_end_matches('\u{FFFD}').len()
}

fn generate_batch(batch: &[Job]) -> crate::Result<Vec<RowEnd>> {
    let model = &batch[0].model;
    let tok: PromptTokenizer = model.tokenizer()?.clone();
    let started = Instant::now();
    let prompts: Vec<PromptIds> = batch
        .iter()
        .map(|j| PromptIds {
            ids: &j.ids,
            pixel_values: j.pixel_values.as_ref(),
            max_new_tokens: Some(j.max_new_tokens),
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: batch.iter().map(|j| j.max_new_tokens).max().unwrap_or(0),
        ..batch[0].opts.clone()
    };
    let mut rows: Vec<RowState> = batch
        .iter()
        .map(|j| RowState {
            tokens: Vec::new(),
            text: String::new(),
            sent: 0,
            first_token: None,
            gone: j.events.is_closed(),
            stopped: false,
        })
        .collect();
    let mut decode_error = None;
    let out = model.generate_ids_batch(&prompts, &opts, &mut |step: &[RowToken]| {
        let now = Instant::now();
        for t in step {
            let row = &mut rows[t.row];
            if row.gone || row.stopped {
                continue;
            }
            row.first_token.get_or_insert(now);
            row.tokens.push(t.token);
            match tok.decode(&row.tokens) {
                Ok(full) => {
                    row.text = answer_text(full);
                    let piece = row.ready(&batch[t.row].stop);
                    if !piece.is_empty() && batch[t.row].events.send(Event::Piece(piece)).is_err() {
                        row.gone = true;
                    }
                }
                Err(e) => {
                    decode_error = Some(e);
                    return false;
                }
            }
        }
        for (row, job) in rows.iter_mut().zip(batch) {
            row.gone |= job.events.is_closed();
        }
        // Rows cannot leave a batch early; the batch stops once every row is done.
        !rows.iter().all(|r| r.gone || r.stopped)
    })?;
    if let Some(e) = decode_error {
        return Err(e);
    }
    let done = Instant::now();
    Ok(out
        .into_iter()
        .zip(batch)
        .zip(rows)
        .map(|(((tokens, stop), job), row)| {
            // A row whose client left stops being followed, so it holds fewer tokens than the
            // batch generated for it; a single row stops the batch itself (`Callback`).
            if !row.stopped
                && (stop == StopReason::Callback || (row.gone && row.tokens.len() < tokens.len()))
            {
                return RowEnd::Cancelled;
            }
            // What was held back as a possible start of a stop string is answer after all.
            if !row.stopped && row.sent < row.text.len() {
                let _ = job
                    .events
                    .send(Event::Piece(row.text[row.sent..].to_string()));
            }
            let n = if row.stopped {
                row.tokens.len()
            } else {
                tokens.len()
            };
            let first = row.first_token.unwrap_or(done);
            let rest = done.duration_since(first).as_secs_f64();
            let timings = Timings {
                queue_ms: ms(started.duration_since(job.arrived)),
                time_to_first_token_ms: ms(first.duration_since(started)),
                tokens_per_second: if n > 1 && rest > 0.0 {
                    (n - 1) as f64 / rest
                } else {
                    0.0
                },
                cache_bytes: job.model.cache_bytes(1, job.prompt_tokens + n),
                batch_size: batch.len(),
            };
            let finish = Finish {
                finish_reason: if row.stopped || stop == StopReason::Eos {
                    "stop"
                } else {
                    "length"
                },
                prompt_tokens: job.prompt_tokens,
                completion_tokens: n,
                timings,
            };
            RowEnd::Completed(finish)
        })
        .collect())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Every served prompt ends in the template's `ASSISTANT:`, whose separating space the
/// tokenizer keeps on the answer's first token: it belongs to the template, not to the answer
/// (as `Vlm::generate` returns it).
fn answer_text(full: String) -> String {
    match full.strip_prefix(' ') {
        Some(rest) => rest.to_string(),
        None => full,
    }
}
