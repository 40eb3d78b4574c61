//! One full-size distillation step (frozen teacher -> hybrid student, random weights), timed:
//! step time, tokens/s, peak memory and model FLOP utilisation at several batch sizes, with and
//! without gradient checkpointing, beside the memory plan's estimate
//! ([`matvlm::train::memory::MemoryPlan`]).
//!
//! `cargo bench --bench distill_bench [--features cuda] -- [options]`; one JSON object per line
//! on stdout (also appended to `--out FILE`):
//! - `env`: device, dtype, commit, the models' parameter counts;
//! - `plan`: the memory plan of each configuration;
//! - `step`: per configuration, `step_ms` (median of `--steps` optimiser steps after one
//!   warmup step), `tokens_per_s`, `peak_bytes` (the CUDA pool's high-water mark over the
//!   warmup and timed steps: weights, optimiser state and the step's temporaries), `plan_bytes`,
//!   `model_flops` and `mfu` against `--peak-tflops`; or `error` (e.g. out of memory).
//!
//! The step is what `distill` runs per micro-batch: the teacher's forward without a graph, the
//! student's forward and backward with the default loss (KL at T = 1 over all positions + the
//! unsquared layer-wise L2 norm), the trainable set (mixers + connector) in f32 master weights
//! (`--master-f32 false`: pure bf16), clipping at 0.1 and AdamW. The batch is text only by
//! default, 828 random token ids per row, as the PyTorch peer (../shared/peer section e) feeds
//! its Phi-2 pair; `--images` puts one image (729 positions) at the start of each row instead.
//!
//! Model FLOPs per step (the same count for the peer): with `F(m) = 2 * tokens * (matmul
//! parameters of m's decoder + lm_head) + 4 * B * T^2 * hidden * (attention layers of m)`,
//! `teacher F + 3 * student F + 3 * (the layer-wise blocks' matmul FLOPs)`; the vision tower
//! adds `2 * images * patches * its parameters` per model when `--images`. Recomputation under
//! checkpointing is not counted (model FLOPs, not hardware FLOPs).
//!
//! Options: `--config NAME|PATH` (default tinyllava-3.1b), `--dtype bf16`, `--device cuda`,
//! `--batches 1,4,8`, `--seq 828`, `--checkpoint off,on`, `--master-f32 true`,
//! `--mamba-layers 0,4,8,12,16,20,24,28` (the peer's), `--chunk 128`, `--steps 3`,
//! `--peak-tflops 989` (H100/H200 SXM dense bf16), `--images`, `--plan-only`, `--out FILE`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use matvlm::data::SupervisedBatch;
use matvlm::loss::DistillLoss;
use matvlm::model::hybrid::{HybridSpec, MixerKind};
use matvlm::model::random::{random_model, RandomModelOptions};
use matvlm::model::vlm::Vlm;
use matvlm::tokenize::{IGNORE_INDEX, IMAGE_TOKEN};
use matvlm::train::distill::{student_step, Trainable};
use matvlm::train::memory::{MemoryOptions, MemoryPlan};
use matvlm::train::{clip_grad_norm, AdamW, AdamWConfig, Student};
use serde_json::json;

#[path = "common/cli.rs"]
mod cli;

const CLI: cli::Cli = cli::Cli {
    bench: "distill_bench",
};

struct Args {
    config: String,
    dtype: String,
    device: String,
    batches: Vec<usize>,
    seq: usize,
    checkpoint: Vec<bool>,
    master_f32: bool,
    mamba_layers: Vec<usize>,
    chunk: usize,
    steps: usize,
    peak_tflops: f64,
    images: bool,
    plan_only: bool,
    out: Option<std::path::PathBuf>,
}

fn onoff(flag: &str, v: &str) -> bool {
    match v {
        "on" | "true" | "1" => true,
        "off" | "false" | "0" => false,
        _ => CLI.usage(&format!("{flag}: on/off, not `{v}`")),
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        config: matvlm::config::TinyLlavaConfig::FULL_SIZE.into(),
        dtype: "bf16".into(),
        device: "cuda".into(),
        batches: vec![1, 4, 8],
        seq: 828,
        checkpoint: vec![false, true],
        master_f32: true,
        mamba_layers: (0..8).map(|i| 4 * i).collect(),
        chunk: 128,
        steps: 3,
        peak_tflops: 989.0,
        images: false,
        plan_only: false,
        out: None,
    };
    for (flag, value) in CLI.args(&["--images", "--plan-only"]) {
        let value = value.unwrap_or_default();
        match flag.as_str() {
            "--images" => a.images = true,
            "--plan-only" => a.plan_only = true,
            "--config" => a.config = value,
            "--dtype" => a.dtype = value,
            "--device" => a.device = value,
            "--batches" => a.batches = CLI.list(&flag, &value),
            "--seq" => a.seq = CLI.num(&flag, &value),
            "--checkpoint" => a.checkpoint = value.split(',').map(|v| onoff(&flag, v)).collect(),
            "--master-f32" => a.master_f32 = onoff(&flag, &value),
            "--mamba-layers" => a.mamba_layers = CLI.list(&flag, &value),
            "--chunk" => a.chunk = CLI.num(&flag, &value),
            "--steps" => a.steps = CLI.num::<usize>(&flag, &value).max(1),
            "--peak-tflops" => a.peak_tflops = CLI.num(&flag, &value),
            "--out" => a.out = Some(value.into()),
            other => CLI.usage(&format!("unknown option {other}")),
        }
    }
    a
}

/// `2 * (matmul weights)` per token of a model's decoder and lm_head, and its attention layers.
fn decoder_flops_per_token(vlm: &Vlm) -> (f64, usize) {
    let matmul: usize = vlm
        .decoder
        .named_tensors()
        .iter()
        .filter(|(n, t)| t.rank() == 2 && !n.contains("embed_tokens"))
        .map(|(_, t)| t.elem_count())
        .sum();
    let attn = vlm
        .layer_kinds()
        .iter()
        .filter(|k| **k == MixerKind::Attention)
        .count();
    (2.0 * matmul as f64, attn)
}

/// The model FLOPs of one step (see the module docs).
fn step_flops(teacher: &Vlm, student: &Vlm, b: usize, t: usize, images: bool) -> f64 {
    let tokens = (b * t) as f64;
    let hidden = teacher.decoder.cfg.hidden_size as f64;
    let f = |m: &Vlm| {
        let (per_token, attn) = decoder_flops_per_token(m);
        let mut f = per_token * tokens + 4.0 * b as f64 * (t * t) as f64 * hidden * attn as f64;
        if images {
            let vision: usize = m
                .named_tensors()
                .iter()
                .filter(|(n, x)| n.starts_with("vision_tower") && x.rank() >= 2)
                .map(|(_, x)| x.elem_count())
                .sum();
            let patches = m.config.vision_config.num_patches() as f64;
            f += 2.0 * b as f64 * patches * vision as f64;
        }
        f
    };
    let layerwise: f64 = student
        .mamba_layers()
        .iter()
        .map(|&i| {
            let block: usize = student
                .decoder
                .named_tensors()
                .iter()
                .filter(|(n, x)| n.starts_with(&format!("model.layers.{i}.")) && x.rank() == 2)
                .map(|(_, x)| x.elem_count())
                .sum();
            3.0 * 2.0 * block as f64 * tokens
        })
        .sum();
    f(teacher) + 3.0 * f(student) + layerwise
}

/// A batch of `b` rows of `t` decoder positions: random token ids, or one image followed by
/// random ids.
fn batch(
    vlm: &Vlm,
    b: usize,
    t: usize,
    images: bool,
    device: &Device,
) -> matvlm::Result<SupervisedBatch> {
    let vocab = vlm.decoder.cfg.vocab_size as u64;
    let image_tokens = vlm.config.image_tokens();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab) as i64
    };
    let ids_per_row = if images { t + 1 - image_tokens } else { t };
    let rows: Vec<Vec<i64>> = (0..b)
        .map(|_| {
            let mut row: Vec<i64> = (0..ids_per_row).map(|_| next()).collect();
            if images {
                row[0] = IMAGE_TOKEN;
            }
            row
        })
        .collect();
    let pixel_values = if images {
        let s = vlm.config.vision_config.image_size;
        Some(Tensor::randn(0f32, 1.0, (b, 3, s, s), device)?)
    } else {
        None
    };
    Ok(SupervisedBatch {
        lengths: vec![ids_per_row; b],
        labels: vec![vec![IGNORE_INDEX; t]; b],
        tokens: b * t,
        indices: (0..b).collect(),
        rows,
        pixel_values,
    })
}

fn synchronize(device: &Device) -> matvlm::Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Time `steps` optimiser steps after one warmup step.
fn time_steps(
    teacher: &Vlm,
    hybrid: &Vlm,
    data: &SupervisedBatch,
    args: &Args,
    checkpoint: bool,
    device: &Device,
) -> matvlm::Result<(f64, Option<u64>)> {
    let selection = Trainable::MixersConnector.selection();
    let student = if args.master_f32 {
        Student::with_master(hybrid, &selection, DType::F32)?
    } else {
        Student::new(hybrid, &selection)?
    };
    let mut opt = AdamW::new(&student.params, AdamWConfig::default())?;
    let loss = DistillLoss {
        chunk_positions: args.chunk,
        ..DistillLoss::default()
    };
    synchronize(device)?;
    matvlm::device::reset_peak_memory(device)?;
    let mut times = Vec::new();
    for i in 0..=args.steps {
        let t0 = Instant::now();
        let out = student_step(teacher, &student, data, &loss, checkpoint)?;
        let mut grads = match out.grads {
            Some(g) => g,
            None => student.params.grads(&out.loss.backward()?),
        };
        clip_grad_norm(&mut grads, 0.1)?;
        opt.step(&grads)?;
        drop(grads);
        synchronize(device)?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let peak = matvlm::device::memory_use(device)?.map(|m| m.peak);
    Ok((times[times.len() / 2], peak))
}

fn main() -> matvlm::Result<()> {
    let args = parse_args();
    let device = matvlm::device::parse_device(&args.device)?;
    let mut out = CLI.output(args.out.as_deref());
    let plan_of = |b: usize, checkpoint: bool| -> matvlm::Result<MemoryPlan> {
        let n_layers = matvlm::config::TinyLlavaConfig::preset_or_file(&args.config)?
            .text_config
            .num_hidden_layers;
        MemoryPlan::distill(&MemoryOptions {
            config: args.config.clone(),
            ratio: args.mamba_layers.len() as f64 / n_layers as f64,
            batch: b,
            seq_len: args.seq,
            dtype: args.dtype.clone(),
            master_f32: args.master_f32,
            checkpoint_blocks: checkpoint,
            chunk_positions: args.chunk,
            ..MemoryOptions::default()
        })
    };
    for &b in &args.batches {
        for &ck in &args.checkpoint {
            let plan = plan_of(b, ck)?;
            out.emit(&json!({ "record": "plan", "batch": b, "checkpoint": ck, "plan": plan, "table": plan.table() }),
            );
        }
    }
    if args.plan_only {
        return Ok(());
    }
    let t0 = Instant::now();
    let teacher = random_model(
        &RandomModelOptions {
            config: args.config.clone(),
            dtype: args.dtype.clone(),
            ..RandomModelOptions::default()
        },
        &device,
    )?;
    let hybrid = teacher.hybrid(&HybridSpec::layers(args.mamba_layers.clone()))?;
    synchronize(&device)?;
    out.emit(&json!({
        "record": "env",
        "device": args.device,
        "dtype": args.dtype,
        "config": args.config,
        "commit": option_env!("MATVLM_COMMIT"),
        "mamba_layers": args.mamba_layers,
        "master_f32": args.master_f32,
        "images": args.images,
        "build_s": t0.elapsed().as_secs_f64(),
    }));
    for &b in &args.batches {
        let data = batch(&teacher, b, args.seq, args.images, &device)?;
        let flops = step_flops(&teacher, &hybrid, b, args.seq, args.images);
        for &ck in &args.checkpoint {
            let plan = plan_of(b, ck)?;
            let base = json!({
                "record": "step", "batch": b, "seq": args.seq, "checkpoint": ck,
                "master_f32": args.master_f32, "chunk": args.chunk, "images": args.images,
                "plan_bytes": plan.total_bytes, "model_flops": flops,
            });
            let mut rec = base.clone();
            match time_steps(&teacher, &hybrid, &data, &args, ck, &device) {
                Ok((s, peak)) => {
                    rec["step_ms"] = json!(s * 1e3);
                    rec["tokens_per_s"] = json!((b * args.seq) as f64 / s);
                    rec["peak_bytes"] = json!(peak);
                    rec["tflops"] = json!(flops / s / 1e12);
                    rec["mfu"] = json!(flops / s / (args.peak_tflops * 1e12));
                }
                Err(e) => rec["error"] = json!(e.to_string()),
            }
            out.emit(&rec);
        }
    }
    Ok(())
}
