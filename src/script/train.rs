//! Training and evaluation from scripts: `distill`, `train`, `evaluate`, `agreement`,
//! `tokens_per_second`, and the `Run` a training call returns.
//!
//! Each binding reads its options map into the library's config type, calls one library
//! function ([`crate::train::distill::distill`], [`crate::train::supervised::train`],
//! [`crate::eval::evaluate`], [`crate::eval::agreement`], [`crate::eval::decode_speed`]) and
//! hands its result back as a rhai value.
//!
//! Ctrl-C: training reads the session's cancel flag and stops at the next step boundary with a
//! checkpoint. The binding then clears the flag and returns the `Run` (its `stopped` is true), so
//! that a REPL entry keeps the run and the model trained so far, and a script goes on with them
//! (a recipe evaluates and saves what it has). A second Ctrl-C stops the script itself.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rhai::{Array, Dynamic, Map, NativeCallContext, INT};
use serde::de::DeserializeOwned;

use super::convert::{from_map, json_options, runtime_error, Opts, OrRhai, RhaiResult};
use super::data::Data;
use super::model::{templated_prompt, Model};
use super::session_of;
use crate::eval::{AgreementOptions, EvalOptions, SpeedOptions};
use crate::options::Layout;
use crate::search::{MeasureOptions, SearchOptions};
use crate::train::distill::DistillConfig;
use crate::train::supervised::SupervisedConfig;
use crate::train::{RunDir, StopReason, TrainSummary, OPTION_LAYOUT};

/// The evaluation options' layout: `batch` for `batch_size`.
const BATCH_ALIAS: Layout = Layout {
    sections: &[],
    aliases: &[("batch", "batch_size")],
};

/// The outcome of a `distill` or `train` call: the trained model, where the run lives, and its
/// summary and metrics.
#[derive(Clone)]
pub struct Run {
    /// The trained model (the student, for `distill`).
    pub model: Model,
    pub run_dir: PathBuf,
    pub summary: TrainSummary,
    /// Every record of the run's `metrics.jsonl` when the call returned.
    pub metrics: Array,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Run({}, {} steps, {}",
            stop_name(self.summary.stop),
            self.summary.step,
            self.run_dir.display()
        )?;
        if let Some(loss) = self.summary.last_loss {
            write!(f, ", last loss {loss:.4}")?;
        }
        write!(f, ")")
    }
}

fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Completed => "completed",
        StopReason::Cancelled => "cancelled",
        StopReason::DataExhausted => "data_exhausted",
    }
}

/// Take the `Data` of option `key` out of `options`, if given.
fn take_data(options: &mut Map, key: &str, what: &str) -> RhaiResult<Option<Data>> {
    match options.remove(key).filter(|v| !v.is_unit()) {
        None => Ok(None),
        Some(v) => match v.read_lock::<Data>() {
            Some(d) => Ok(Some(d.clone())),
            None => Err(runtime_error(format!(
                "{what}: option `{key}` must be a Data (from `dataset(...)`), not {}",
                v.type_name()
            ))),
        },
    }
}

/// Take the path of option `key` out of `options`, if given.
fn take_path(options: &mut Map, key: &str, what: &str) -> RhaiResult<Option<PathBuf>> {
    match options.remove(key).filter(|v| !v.is_unit()) {
        None => Ok(None),
        Some(v) => v
            .clone()
            .into_string()
            .map(|s| Some(PathBuf::from(s)))
            .map_err(|_| {
                runtime_error(format!(
                    "{what}: option `{key}` must be a string, not {}",
                    v.type_name()
                ))
            }),
    }
}

/// A training call's options: the validation data (`val`), the run directory (`run_dir`, else a
/// fresh one named after `what`) and the config `base` with every other option applied.
fn training_options<C: serde::Serialize + DeserializeOwned>(
    what: &str,
    mut options: Map,
    base: &C,
) -> RhaiResult<(Option<std::sync::Arc<crate::data::Dataset>>, PathBuf, C)> {
    let val = take_data(&mut options, "val", what)?.map(|d| d.dataset.clone());
    let run_dir = take_path(&mut options, "run_dir", what)?.unwrap_or_else(|| fresh_run_dir(what));
    let cfg = config(what, base, options, OPTION_LAYOUT)?;
    Ok((val, run_dir, cfg))
}

/// The `val` data, the `dir` folder and the rest of a search call's options, read into `T`.
fn search_options<T: DeserializeOwned>(
    what: &str,
    mut options: Map,
) -> RhaiResult<(Option<std::sync::Arc<crate::data::Dataset>>, PathBuf, T)> {
    let val = take_data(&mut options, "val", what)?.map(|d| d.dataset.clone());
    let dir = take_path(&mut options, "dir", what)?.unwrap_or_else(crate::search::default_dir);
    Ok((val, dir, from_map(what, options)?))
}

/// `base` with the options of `options` (see [`crate::options`]).
fn config<T: serde::Serialize + DeserializeOwned>(
    what: &str,
    base: &T,
    options: Map,
    layout: Layout,
) -> RhaiResult<T> {
    crate::options::merged(what, base, json_options(what, options)?, layout).or_rhai()
}

/// A run directory no earlier call of this process used: `runs/{mode}-{unix seconds}-{pid}-{n}`
/// (a directory with a checkpoint would otherwise be resumed).
fn fresh_run_dir(mode: &str) -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    PathBuf::from("runs").join(format!("{mode}-{secs}-{}-{n}", std::process::id()))
}

/// The `Run` of a finished training call; a cancelled run clears the cancel flag (see the
/// module doc).
fn finish(
    ctx: &NativeCallContext,
    vlm: crate::model::vlm::Vlm,
    source: String,
    summary: TrainSummary,
    run_dir: &Path,
) -> RhaiResult<Run> {
    if summary.stop == StopReason::Cancelled {
        session_of(ctx)?.cancel.store(false, Ordering::SeqCst);
    }
    let metrics = RunDir::open(run_dir)
        .and_then(|r| r.read_metrics())
        .or_rhai()?
        .iter()
        .map(rhai::serde::to_dynamic)
        .collect::<RhaiResult<Array>>()?;
    Ok(Run {
        model: Model::new(vlm, source),
        run_dir: run_dir.to_path_buf(),
        summary,
        metrics,
    })
}

fn to_map<T: serde::Serialize>(value: &T) -> RhaiResult<Dynamic> {
    rhai::serde::to_dynamic(value)
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// Distil `teacher` into the hybrid `student` on `data` with MaTVLM's recipe (KL at T = 1 +
    /// layer-wise L2, mixers and connector trainable, AdamW (0.9, 0.95), wd 0.01, clip 0.1, WSD
    /// schedule, batch 64); every part can be changed:
    /// `#{ steps: 1000, lr, batch: 64, accum: 1, loss: #{ kl, temperature, reverse_kl, jsd,
    /// ce_teacher, ce_labels, hidden, hidden_kind: "l2_norm" | "mse", positions: "all" |
    /// "answers" }, trainable: "mixers" | "mixers_connector" | "all_but_vision", run_dir, val:
    /// data, eval_every, eval_limit, save_every, keep_last, seed, warmup_ratio, warmup_steps,
    /// weight_decay, clip (a number, or false), schedule: "constant" | #{ kind: "wsd", ... },
    /// resume: true, progress: "auto" | "bar" | "lines" | "silent", log_every, betas, eps,
    /// master_f32, checkpoint_blocks, loss.chunk_positions, parallel: #{ ranks, backend:
    /// "local" | "nccl", bucket_mb } }` (`parallel` defaults to `matrepl --gpus N`; `batch` is
    /// then the global micro-batch)
    /// (the fields of `DistillConfig` and its `TrainConfig`).
    /// A `run_dir` holding a checkpoint is resumed; without `run_dir` a fresh one under `runs/`
    /// is used. Returns a Run (`run.model` is the distilled student). Ctrl-C stops it at the
    /// next step with a checkpoint and returns the Run (`run.stopped` is true).
    #[rhai_fn(return_raw)]
    pub fn distill(
        ctx: NativeCallContext,
        teacher: Model,
        student: Model,
        data: Data,
        options: Map,
    ) -> RhaiResult<Run> {
        let s = session_of(&ctx)?;
        let base = DistillConfig {
            parallel: s.parallel.clone(),
            ..DistillConfig::default()
        };
        let (val, run_dir, cfg) = training_options("distill", options, &base)?;
        let (vlm, summary) = crate::train::distill::distill(
            &teacher.vlm,
            &student.vlm,
            data.dataset.clone(),
            val,
            &cfg,
            &run_dir,
            Some(&s.cancel),
        )
        .or_rhai()?;
        let source = format!("distill({} -> {})", teacher.source, student.source);
        finish(&ctx, vlm, source, summary, &run_dir)
    }

    /// `distill_memory_plan(#{ config: "tinyllava-3.1b", ratio: 0.25, trainable, batch: 8,
    /// seq_len: 828, dtype: "bf16", master_f32: true, checkpoint_blocks: false,
    /// chunk_positions: 128, shared_frozen: true })`: the peak memory of one distillation step,
    /// part by part (weights, master weights, gradients, AdamW moments, teacher outputs,
    /// activations with or without checkpointing, logit chunks), from the models' shapes; no
    /// model is loaded. Returns the plan as a map, its `table` as aligned text.
    #[rhai_fn(return_raw)]
    pub fn distill_memory_plan(options: Map) -> RhaiResult<Dynamic> {
        let opts: crate::train::memory::MemoryOptions = from_map("distill_memory_plan", options)?;
        let plan = crate::train::memory::MemoryPlan::distill(&opts).or_rhai()?;
        let mut value = serde_json::to_value(&plan).map_err(|e| e.to_string())?;
        value["table"] = serde_json::Value::String(plan.table());
        to_map(&value)
    }

    /// `distill(teacher, student, data)` with every option at its default.
    #[rhai_fn(name = "distill", return_raw)]
    pub fn distill_default(
        ctx: NativeCallContext,
        teacher: Model,
        student: Model,
        data: Data,
    ) -> RhaiResult<Run> {
        distill(ctx, teacher, student, data, Map::new())
    }

    /// Train every parameter of `model` on the answers of `data` (cross-entropy), starting from
    /// the short-run settings (AdamW lr 1e-3, betas (0.9, 0.98), wd 0.05, clip 1.0, cosine to a
    /// tenth, batch 64; `SupervisedConfig::quick`). Options as `distill` without `loss` and
    /// `trainable`, plus `drop_last` and `length_groups`. Returns a Run; Ctrl-C as for
    /// `distill`.
    #[rhai_fn(name = "train", return_raw)]
    pub fn train(
        ctx: NativeCallContext,
        model: Model,
        data: Data,
        options: Map,
    ) -> RhaiResult<Run> {
        let s = session_of(&ctx)?;
        let (val, run_dir, cfg) = training_options("train", options, &SupervisedConfig::default())?;
        let (vlm, summary) = crate::train::supervised::train(
            &model.vlm,
            data.dataset.clone(),
            val,
            &cfg,
            &run_dir,
            Some(&s.cancel),
        )
        .or_rhai()?;
        let source = format!("train({})", model.source);
        finish(&ctx, vlm, source, summary, &run_dir)
    }

    /// `train(model, data)` with every option at its default.
    #[rhai_fn(name = "train", return_raw)]
    pub fn train_default(ctx: NativeCallContext, model: Model, data: Data) -> RhaiResult<Run> {
        train(ctx, model, data, Map::new())
    }

    /// Exact-match accuracy of `model` on `data`, teacher forced (equal to greedy exact match,
    /// one forward per batch): a map `#{ accuracy, n, correct, per_type: #{ type: #{ accuracy,
    /// n, correct } }, mode, image, source }`, plus `per_composition: #{ seen: #{ accuracy, n,
    /// correct, per_type }, unseen: ... }` on a synthetic world with held-out compositions.
    #[rhai_fn(name = "evaluate", return_raw)]
    pub fn evaluate(model: Model, data: Data) -> RhaiResult<Dynamic> {
        evaluate_with(model, data, Map::new())
    }

    /// `evaluate(model, data, #{ mode: "teacher_forced" | "generate", limit, blank: false,
    /// batch: 64, max_new_tokens: 64 })`: `generate` scores greedy answers as text (and lists up
    /// to 12 `mistakes`); `blank: true` shows all-black images instead of the real ones (what
    /// the question alone gives away); `limit` takes the first samples only.
    #[rhai_fn(name = "evaluate", return_raw)]
    pub fn evaluate_with(model: Model, data: Data, options: Map) -> RhaiResult<Dynamic> {
        let what = "evaluate";
        let mut options = options;
        // `blank: true` is how scripts ask for `image: "blank"`.
        if let Some(blank) = options.remove("blank").filter(|v| !v.is_unit()) {
            let blank = blank.as_bool().map_err(|_| {
                runtime_error(format!("{what}: option `blank` must be true or false"))
            })?;
            let image = if blank { "blank" } else { "real" };
            options.insert("image".into(), Dynamic::from(image.to_string()));
        }
        let opts = config(what, &EvalOptions::default(), options, BATCH_ALIAS)?;
        let report = crate::eval::evaluate(&model.vlm, &data.dataset, &opts).or_rhai()?;
        to_map(&report)
    }

    /// How closely `student` follows `teacher` on `data`, both teacher forced: a map
    /// `#{ agreement (top-1 next token), kl (mean KL(teacher || student) per position, nats),
    /// n_positions, samples, positions, source }` over the answer positions.
    #[rhai_fn(name = "agreement", return_raw)]
    pub fn agreement(teacher: Model, student: Model, data: Data) -> RhaiResult<Dynamic> {
        agreement_with(teacher, student, data, Map::new())
    }

    /// `agreement(teacher, student, data, #{ positions: "answers" | "all", limit, batch: 64 })`.
    #[rhai_fn(name = "agreement", return_raw)]
    pub fn agreement_with(
        teacher: Model,
        student: Model,
        data: Data,
        options: Map,
    ) -> RhaiResult<Dynamic> {
        let what = "agreement";
        let opts = config(what, &AgreementOptions::default(), options, BATCH_ALIAS)?;
        let report =
            crate::eval::agreement(&teacher.vlm, &student.vlm, &data.dataset, &opts).or_rhai()?;
        to_map(&report)
    }

    /// Greedy decode speed by the wall clock, best of 3:
    /// `#{ tokens_per_s, prefill_s, decode_s, prompt_tokens, new_tokens, repeats }`.
    #[rhai_fn(name = "tokens_per_second", return_raw)]
    pub fn tokens_per_second(model: Model) -> RhaiResult<Dynamic> {
        tokens_per_second_with(model, Map::new())
    }

    /// `tokens_per_second(model, #{ prompt, image, raw: false, new_tokens: 64, repeats: 3 })`:
    /// generate `new_tokens` tokens (EOS does not stop it) after the prompt (templated as in
    /// `logits`); `tokens_per_s` leaves the prefill out (`prefill_s` times it).
    #[rhai_fn(name = "tokens_per_second", return_raw)]
    pub fn tokens_per_second_with(model: Model, options: Map) -> RhaiResult<Dynamic> {
        let o = Opts::new(
            "tokens_per_second",
            options,
            &["prompt", "image", "raw", "new_tokens", "repeats"],
        )?;
        let d = SpeedOptions::default();
        let image = o.path("image")?;
        let raw = o.bool("raw")?.unwrap_or(false);
        let opts = SpeedOptions {
            prompt: match o.string("prompt")? {
                Some(p) => templated_prompt(&p, image.is_some(), raw),
                None if image.is_some() => templated_prompt("What is in the picture?", true, false),
                None => d.prompt,
            },
            image,
            new_tokens: o.count("new_tokens")?.unwrap_or(d.new_tokens),
            repeats: o.count("repeats")?.unwrap_or(d.repeats),
        };
        let report = crate::eval::decode_speed(&model.vlm, &opts).or_rhai()?;
        to_map(&report)
    }

    /// `bench(model, #{ prompt_tokens: 828, batches: [1, 8], gen_lens: [256, 1024, 2048],
    /// prefill_reps: 5, seed: 0 })`: generation speed and memory as users run it, one map per
    /// measurement (`phase` "prefill" or "decode", `batch`, `gen_len`, `ms`, `ms_per_token`,
    /// `tokens_per_s`, `peak_bytes` on a GPU, `cache_bytes`). Random prompt ids: any model,
    /// `random_model(...)` included, can be timed at any size.
    #[rhai_fn(return_raw)]
    pub fn bench(model: Model, options: Map) -> RhaiResult<Array> {
        let opts: crate::eval::GenerationBenchOptions = from_map("bench", options)?;
        let records = crate::eval::bench_generation(&model.vlm, &opts).or_rhai()?;
        records.iter().map(to_map).collect()
    }

    /// `layer_sensitivity(teacher, data, #{ steps: 30, batch_size: 16, lr, limit: 128, seed: 0,
    /// val, dir })`: for every decoder layer, how much of the teacher is lost when that layer
    /// alone becomes an attention-initialised Mamba-2 mixer, after `steps` of local distillation
    /// of that mixer on `data` (the layer-wise loss): one map per layer, `#{ layers, kl,
    /// agreement, hidden_loss }`, `kl` being the mean KL(teacher || hybrid) per answer position
    /// on the first `limit` samples of `val` (default: `data`). Measurements are kept in `dir`
    /// (default `runs/placement-search`): a second call reads them back.
    #[rhai_fn(return_raw)]
    pub fn layer_sensitivity(
        ctx: NativeCallContext,
        teacher: Model,
        data: Data,
        options: Map,
    ) -> RhaiResult<Array> {
        let s = session_of(&ctx)?;
        let (val, dir, opts) = search_options::<MeasureOptions>("layer_sensitivity", options)?;
        let val = val.unwrap_or_else(|| data.dataset.clone());
        let scores = crate::search::layer_sensitivity(
            &teacher.vlm,
            data.dataset.clone(),
            &val,
            &opts,
            &dir,
            Some(&s.cancel),
        )
        .or_rhai()?;
        scores.iter().map(to_map).collect()
    }

    /// `measure_placements(teacher, data, [[0, 4], [2, 5]], #{ steps, batch_size, lr, limit, seed,
    /// val, dir })`: each placement measured as `placement_search` measures them (short local
    /// distillation of its mixers, KL on validation answers), one map per placement in order;
    /// measurements already in `dir` are read back. For enumerations of your own, exhaustive
    /// ones included.
    #[rhai_fn(return_raw)]
    pub fn measure_placements(
        ctx: NativeCallContext,
        teacher: Model,
        data: Data,
        placements: Array,
        options: Map,
    ) -> RhaiResult<Array> {
        let s = session_of(&ctx)?;
        let what = "measure_placements";
        let (val, dir, opts) = search_options::<MeasureOptions>(what, options)?;
        let val = val.unwrap_or_else(|| data.dataset.clone());
        placements
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let layers: Vec<usize> = rhai::serde::from_dynamic(&p).map_err(|_| {
                    runtime_error(format!(
                        "{what}: placement {i} is not an array of layer ids: {p}"
                    ))
                })?;
                let score = crate::search::measure_placement(
                    &teacher.vlm,
                    &layers,
                    data.dataset.clone(),
                    &val,
                    &opts,
                    &dir,
                    Some(&s.cancel),
                )
                .or_rhai()?;
                to_map(&score)
            })
            .collect()
    }

    /// `placement_search(teacher, data, #{ ratio: 0.25, refine: true, budget: 8, steps, batch_size,
    /// lr, limit, seed, val, dir })`: the single-layer scores of `layer_sensitivity`, the `ratio`
    /// best layers, then (with `refine`) swaps of a chosen layer for an unchosen neighbour, each
    /// placement measured as a whole and kept while its KL drops, at most `budget` of them.
    /// Returns `#{ layers, best, greedy, scores, tried, measured }`; `found.layers` goes straight
    /// into `teacher.hybrid(#{ mamba_layers: found.layers })`.
    #[rhai_fn(return_raw)]
    pub fn placement_search(
        ctx: NativeCallContext,
        teacher: Model,
        data: Data,
        options: Map,
    ) -> RhaiResult<Dynamic> {
        let s = session_of(&ctx)?;
        let what = "placement_search";
        let mut search = Map::new();
        let mut measure = Map::new();
        for (k, v) in options {
            match k.as_str() {
                "ratio" | "refine" | "budget" => search.insert(k, v),
                _ => measure.insert(k, v),
            };
        }
        let (val, dir, measure) = search_options::<MeasureOptions>(what, measure)?;
        let mut opts: SearchOptions = from_map(what, search)?;
        opts.measure = measure;
        let val = val.unwrap_or_else(|| data.dataset.clone());
        let found = crate::search::placement_search(
            &teacher.vlm,
            data.dataset.clone(),
            &val,
            &opts,
            &dir,
            Some(&s.cancel),
        )
        .or_rhai()?;
        to_map(&found)
    }

    /// Every record of the run's metrics.jsonl (train steps with each loss term, evaluations),
    /// as maps with `kind` "train" or "eval" and `step`.
    #[rhai_fn(get = "metrics", pure)]
    pub fn metrics(r: &mut Run) -> Array {
        r.metrics.clone()
    }

    /// The trained model (for `distill`, the student).
    #[rhai_fn(get = "model", pure)]
    pub fn model(r: &mut Run) -> Model {
        r.model.clone()
    }

    /// The folder of the newest checkpoint, or () when none was written.
    #[rhai_fn(get = "checkpoint", pure)]
    pub fn checkpoint(r: &mut Run) -> Dynamic {
        r.summary
            .last_checkpoint
            .as_ref()
            .map_or(Dynamic::UNIT, |p| Dynamic::from(p.display().to_string()))
    }

    /// The run directory (config.json, metrics.jsonl, checkpoints/).
    #[rhai_fn(get = "run_dir", pure)]
    pub fn run_dir(r: &mut Run) -> String {
        r.run_dir.display().to_string()
    }

    /// Optimiser steps done (resumed ones included).
    #[rhai_fn(get = "steps", pure)]
    pub fn steps(r: &mut Run) -> INT {
        r.summary.step as INT
    }

    /// The step this call started from (0, or the step of the checkpoint it resumed).
    #[rhai_fn(get = "start_step", pure)]
    pub fn start_step(r: &mut Run) -> INT {
        r.summary.start_step as INT
    }

    /// True when Ctrl-C stopped the run early.
    #[rhai_fn(get = "stopped", pure)]
    pub fn stopped(r: &mut Run) -> bool {
        r.summary.stop == StopReason::Cancelled
    }

    /// True when every step of the run is done.
    #[rhai_fn(get = "completed", pure)]
    pub fn completed(r: &mut Run) -> bool {
        r.summary.stop == StopReason::Completed
    }

    /// Why it returned: "completed", "cancelled" or "data_exhausted".
    #[rhai_fn(get = "stop", pure)]
    pub fn stop(r: &mut Run) -> String {
        stop_name(r.summary.stop).to_string()
    }

    /// The loss of the last step this call took, or ().
    #[rhai_fn(get = "last_loss", pure)]
    pub fn last_loss(r: &mut Run) -> Dynamic {
        r.summary
            .last_loss
            .map_or(Dynamic::UNIT, Dynamic::from_float)
    }

    /// Seconds this call spent training.
    #[rhai_fn(get = "elapsed_s", pure)]
    pub fn elapsed_s(r: &mut Run) -> rhai::FLOAT {
        r.summary.elapsed_s
    }

    /// Outcome, steps, run directory and last loss.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(r: &mut Run) -> String {
        r.to_string()
    }
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn to_debug(r: &mut Run) -> String {
        r.to_string()
    }
}
