//! Train the embedded tiny teacher from scratch on the synthetic world, and write it in the
//! TinyLLaVA layout with its evaluation.
//!
//! ```text
//! cargo run --release --features cuda --bin train_teacher -- --device cuda --out assets/tiny-teacher
//! ```
//!
//! Generates the world into `runs/world` when missing (`teacher_world_config()`: compositions
//! held out of training, half of val and test showing them), trains with checkpoints in
//! `runs/teacher` (Ctrl-C stops after the current step with a checkpoint; the same command
//! resumes), evaluates on val every `--eval-every` steps (teacher forced; the only split any
//! choice may look at), then on test by greedy generation, with real and with blank (all-black)
//! images, after casting the weights to `--dtype` and loading them back. Every report counts
//! seen and unseen compositions apart. Writes the checkpoint and `eval.json` (with the world's
//! overlap of val and test with train) to `--out`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

// The training step allocates and frees many tensor-sized buffers; mimalloc keeps them warm
// instead of handing them back to the kernel (page faults and zeroing cost ~15% with glibc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Parser, ValueEnum};
use serde_json::json;

use matvlm::config::TinyLlavaConfig;
use matvlm::data::llava::ImageCheck;
use matvlm::data::{ensure_world, world_overlap, Dataset, LoadOptions, OnBadRecord};
use matvlm::eval::{evaluate, EvalMode, EvalOptions, EvalReport, ImageInput};
use matvlm::model::vlm::Vlm;
use matvlm::teacher::{self, TeacherDims};
use matvlm::tokenize::PromptTokenizer;
use matvlm::train::supervised::{train, SupervisedConfig};
use matvlm::train::{ctrlc_flag, ProgressMode, RunDir, StopReason, TrainConfig};

/// The recipe this binary runs; every option below defaults to its value.
fn recipe() -> SupervisedConfig {
    SupervisedConfig::tiny_teacher()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SaveDtype {
    F16,
    Bf16,
    F32,
}

impl SaveDtype {
    fn dtype(self) -> DType {
        match self {
            SaveDtype::F16 => DType::F16,
            SaveDtype::Bf16 => DType::BF16,
            SaveDtype::F32 => DType::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Size {
    /// The committed teacher's sizes.
    Tiny,
    /// A much smaller model, for smoke runs.
    Reduced,
}

/// Train the tiny TinyLLaVA-shaped teacher on the synthetic world.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where the finished checkpoint and eval.json go (default: assets/tiny-teacher of the
    /// checkout, found as `matrepl` finds it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The synthetic world (generated there when missing or made from another config; default:
    /// runs/world of the checkout).
    #[arg(long)]
    world: Option<PathBuf>,
    /// Run directory: config, metrics.jsonl, checkpoints; a run there is resumed (default:
    /// runs/teacher of the checkout).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Optimiser steps (the whole budget; the learning-rate schedule spans them).
    #[arg(long, default_value_t = recipe().train.steps)]
    steps: usize,
    #[arg(long, default_value_t = recipe().batch_size)]
    batch: usize,
    /// Peak learning rate (linear warmup, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = recipe().train.lr)]
    lr: f64,
    #[arg(long, default_value_t = recipe().train.warmup_steps)]
    warmup: usize,
    #[arg(long, default_value_t = recipe().train.weight_decay)]
    weight_decay: f64,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = recipe().train.clip.unwrap_or(0.0))]
    clip: f64,
    /// Evaluate on val (teacher forced) every this many steps.
    #[arg(long, default_value_t = recipe().train.eval_every)]
    eval_every: usize,
    #[arg(long, default_value_t = recipe().train.save_every)]
    save_every: usize,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the saved weights.
    #[arg(long, value_enum, default_value_t = SaveDtype::Bf16)]
    dtype: SaveDtype,
    #[arg(long, value_enum, default_value_t = Size::Tiny)]
    size: Size,
    /// Evaluate on only the first N test samples (smoke runs).
    #[arg(long)]
    test_limit: Option<usize>,
    /// Generate answers for only the first N test samples (generation is one sample at a time;
    /// `--eval-only` later completes it on the whole split).
    #[arg(long)]
    generate_limit: Option<usize>,
    /// Skip training: evaluate the checkpoint already in `--out` on the whole test split
    /// (teacher forced and generated, real and blank images) and update its eval.json.
    #[arg(long)]
    eval_only: bool,
    /// Progress lines instead of a bar.
    #[arg(long)]
    lines: bool,
    /// CPU threads for tensor ops (CANDLE_NUM_THREADS / RAYON_NUM_THREADS win when set). One
    /// is fastest on a small shared machine: candle's worker pool spins while it waits.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Standard deviation of the normal initialisation of matrices and embeddings.
    #[arg(long, default_value_t = teacher::INIT_STD)]
    init_std: f64,
    /// Override the decoder MLP width.
    #[arg(long)]
    intermediate: Option<usize>,
    /// Override the vision feature selection (`patch` drops the first patch, `cls_patch` keeps all).
    #[arg(long)]
    strategy: Option<String>,
    /// Where to train: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // Read by candle when its first parallel op runs, which is after this point.
            std::env::set_var(var, args.threads.to_string());
        }
    }
    let started = Instant::now();
    let command: Vec<String> = std::env::args().collect();
    let device = matvlm::script::parse_device(&args.device)?;

    let out = match &args.out {
        Some(p) => p.clone(),
        None => teacher::default_teacher_path()?,
    };
    let world = match &args.world {
        Some(p) => p.clone(),
        None => teacher::default_world_dir()?,
    };
    let run_dir = match &args.run_dir {
        Some(p) => p.clone(),
        None => teacher::project_dir()?.join("runs/teacher"),
    };
    let world_cfg = teacher::teacher_world_config();
    eprintln!("world: {}", world.display());
    ensure_world(&world, &world_cfg).context("generating the synthetic world")?;
    let overlap = world_overlap(&world_cfg)?;
    eprintln!("val and test against train: {overlap}");
    let tok = PromptTokenizer::from_file(&world.join("tokenizer.json"))?;
    let mut dims = match args.size {
        Size::Tiny => TeacherDims::tiny(),
        Size::Reduced => TeacherDims::reduced(),
    };
    if let Some(i) = args.intermediate {
        dims.intermediate = i;
    }
    if let Some(s) = &args.strategy {
        dims.select_strategy = s.clone();
    }
    let config = dims.config(&tok)?;
    let load_with = |split: &str,
                     tok: &PromptTokenizer,
                     config: &TinyLlavaConfig|
     -> anyhow::Result<Arc<Dataset>> {
        let opts = LoadOptions {
            max_len: config.tokenizer_model_max_length,
            on_bad: OnBadRecord::Fail,
            image_check: ImageCheck::Decode,
            image_tokens: config.image_tokens(),
            cache_images: true,
        };
        let path = world.join(format!("{split}.json"));
        let (ds, _) = Dataset::load_with(&path, &world, tok, &opts)
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(Arc::new(ds))
    };
    let load = |split: &str| load_with(split, &tok, &config);
    if args.eval_only {
        let dir = out.to_str().context("non-UTF-8 output path")?;
        let vlm = Vlm::load(dir, DType::F32, &device)?;
        // The checkpoint's own tokenizer: a teacher made from another world numbers its tokens
        // differently from this world's BPE.
        let test = load_with("test", vlm.tokenizer()?, &vlm.config)?;
        return eval_only(&vlm, &out, &run_dir, &test);
    }
    let (train_set, val, test) = (load("train")?, load("val")?, load("test")?);
    eprintln!(
        "data: {} train, {} val, {} test samples; vocab {}",
        train_set.len(),
        val.len(),
        test.len(),
        tok.vocab_size()
    );

    // Drawn on the CPU (the same numbers whatever the device), then moved where training runs.
    let init = teacher::init_tensors_with_std(&config, args.seed, args.init_std)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&device)?)))
        .collect::<candle_core::Result<_>>()?;
    let initial = teacher::vlm_from_tensors(&config, &tok, init, &device)?;
    let params = initial.parameter_count();
    eprintln!("model: {params} parameters, dims {dims:?}");

    let base = recipe();
    let cfg = SupervisedConfig {
        train: TrainConfig {
            steps: args.steps,
            lr: args.lr,
            weight_decay: args.weight_decay,
            clip: Some(args.clip),
            warmup_steps: args.warmup,
            eval_every: args.eval_every,
            save_every: args.save_every,
            seed: args.seed,
            progress: if args.lines {
                ProgressMode::Lines
            } else {
                ProgressMode::Auto
            },
            ..base.train
        },
        batch_size: args.batch,
        ..base
    };
    let flag = ctrlc_flag()?;
    let (eval_vlm, summary) = train(
        &initial,
        train_set.clone(),
        Some(val),
        &cfg,
        &run_dir,
        Some(&flag),
    )?;
    match summary.stop {
        StopReason::Completed => {}
        StopReason::Cancelled => {
            flag.store(false, Ordering::SeqCst);
            eprintln!(
                "stopped at step {}; run the same command again to resume from {}",
                summary.step,
                run_dir.display()
            );
            std::process::exit(130);
        }
        StopReason::DataExhausted => bail!("the loader ran dry at step {}", summary.step),
    }
    let train_s = training_seconds(&run_dir)?;
    eprintln!("trained {} steps ({train_s:.0} s of steps)", summary.step);

    // The f32 weights, teacher forced, as the reference for the cast.
    let test_tf = EvalOptions {
        mode: EvalMode::TeacherForced,
        limit: args.test_limit,
        ..EvalOptions::default()
    };
    let f32_tf = evaluate(&eval_vlm, &test, &test_tf)?;
    eprintln!("test, f32, teacher forced: {}", f32_tf.summary());

    let dtype = args.dtype.dtype();
    eval_vlm.save(&out, dtype, None)?;
    let shipped = Vlm::load(
        out.to_str().context("non-UTF-8 output path")?,
        DType::F32,
        &device,
    )?;
    let cast_tf = evaluate(&shipped, &test, &test_tf)?;
    eprintln!(
        "test, {dtype:?} weights, teacher forced: {}",
        cast_tf.summary()
    );
    let limit = args.generate_limit.or(args.test_limit);
    let (real, blank) = match limit {
        Some(0) => {
            eprintln!("generation skipped (--generate-limit 0): complete it with --eval-only");
            (None, None)
        }
        _ => {
            let (real, blank) = generated(&shipped, &test, limit)?;
            (Some(real), Some(blank))
        }
    };

    write_eval(
        &out,
        &EvalFile {
            command: &command,
            dims: &dims,
            cfg: &cfg.train,
            params,
            steps: summary.step,
            train_s,
            process_s: started.elapsed().as_secs_f64(),
            resumed: summary.resumed_from.is_some(),
            dtype,
            test: real.as_ref(),
            blank: blank.as_ref(),
            f32_tf: &f32_tf,
            cast_tf: &cast_tf,
            world: &world_cfg,
            overlap: &overlap,
        },
    )?;
    eprintln!(
        "wrote {} ({:.1} min in this process)",
        out.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// Greedy-generation exact match on `test` with the real images and with blank ones.
fn generated(
    vlm: &Vlm,
    test: &Dataset,
    limit: Option<usize>,
) -> anyhow::Result<(EvalReport, EvalReport)> {
    let gen = |image| EvalOptions {
        mode: EvalMode::Generate,
        image,
        limit,
        ..EvalOptions::default()
    };
    let real = evaluate(vlm, test, &gen(ImageInput::Real))?;
    eprintln!("test, generated: {}", real.summary());
    let blank = evaluate(vlm, test, &gen(ImageInput::Blank))?;
    eprintln!("test, blank images, generated: {}", blank.summary());
    Ok((real, blank))
}

/// `--eval-only`: evaluate the saved checkpoint on the whole test split and put the results in
/// its eval.json (training facts already there are kept; when `--run-dir` holds the run that made
/// the checkpoint, its configuration, step count and training seconds are recorded too).
fn eval_only(vlm: &Vlm, out: &Path, run_dir: &Path, test: &Dataset) -> anyhow::Result<()> {
    let tf = EvalOptions {
        mode: EvalMode::TeacherForced,
        ..EvalOptions::default()
    };
    let cast_tf = evaluate(vlm, test, &tf)?;
    eprintln!("test, saved weights, teacher forced: {}", cast_tf.summary());
    let (real, blank) = generated(vlm, test, None)?;
    let path = out.join("eval.json");
    let mut value: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?,
        Err(_) => json!({}),
    };
    value["test_generate"] = serde_json::to_value(&real)?;
    value["test_blank_image_generate"] = serde_json::to_value(&blank)?;
    value["test_teacher_forced_saved"] = serde_json::to_value(&cast_tf)?;
    value["eval_command"] = json!(std::env::args().collect::<Vec<_>>().join(" "));
    if let Some(facts) = run_facts(run_dir)? {
        for (key, v) in facts {
            value[key] = v;
        }
    }
    let text = serde_json::to_string_pretty(&value)?;
    matvlm::io::write_atomic(&path, format!("{text}\n").as_bytes())?;
    eprintln!("updated {}", path.display());
    Ok(())
}

/// The training configuration, last step and seconds of steps of the run in `run_dir`, when there
/// is one there (`None` when the folder holds no run).
fn run_facts(run_dir: &Path) -> anyhow::Result<Option<Vec<(&'static str, serde_json::Value)>>> {
    if !run_dir.join("config.json").is_file() {
        return Ok(None);
    }
    let run = RunDir::open(run_dir)?;
    let config = run
        .read_config()?
        .with_context(|| format!("{} has no config.json", run_dir.display()))?;
    let last_step = run
        .read_metrics()?
        .iter()
        .filter(|m| m["kind"] == "train")
        .filter_map(|m| m["step"].as_u64())
        .max()
        .unwrap_or(0);
    Ok(Some(vec![
        ("train_config", config["train"].clone()),
        ("steps", json!(last_step)),
        ("train_step_seconds", json!(training_seconds(run_dir)?)),
    ]))
}

/// Seconds spent in optimiser steps over the whole run (resumed parts included), from the run's
/// metrics.
fn training_seconds(run_dir: &Path) -> anyhow::Result<f64> {
    let run = RunDir::open(run_dir)?;
    Ok(run
        .read_metrics()?
        .iter()
        .filter(|m| m["kind"] == "train")
        .filter_map(|m| m["step_s"].as_f64())
        .sum())
}

struct EvalFile<'a> {
    command: &'a [String],
    dims: &'a TeacherDims,
    cfg: &'a TrainConfig,
    params: usize,
    steps: usize,
    train_s: f64,
    process_s: f64,
    resumed: bool,
    dtype: DType,
    /// `None` when generation was skipped (`--generate-limit 0`).
    test: Option<&'a EvalReport>,
    blank: Option<&'a EvalReport>,
    f32_tf: &'a EvalReport,
    cast_tf: &'a EvalReport,
    world: &'a matvlm::data::WorldConfig,
    overlap: &'a matvlm::data::WorldOverlap,
}

fn write_eval(out: &Path, e: &EvalFile) -> anyhow::Result<()> {
    let value = json!({
        "command": e.command.join(" "),
        "steps": e.steps,
        "parameters": e.params,
        "train_step_seconds": e.train_s,
        "process_seconds": e.process_s,
        "resumed": e.resumed,
        "weights_dtype": format!("{:?}", e.dtype).to_lowercase(),
        "test_generate": e.test,
        "test_blank_image_generate": e.blank,
        "test_teacher_forced_f32": e.f32_tf,
        "test_teacher_forced_saved": e.cast_tf,
        "dims": e.dims,
        "train_config": e.cfg,
        "world": e.world,
        "world_overlap": e.overlap,
        "blank_image": "all-black image of the same size (the world's background: an empty scene)",
    });
    let text = serde_json::to_string_pretty(&value)?;
    matvlm::io::write_atomic(&out.join("eval.json"), format!("{text}\n").as_bytes())?;
    Ok(())
}
