//! Generation speed and memory of the teacher and its hybrids at full size, with random weights.
//!
//! `cargo bench --bench engine_bench [--features cuda] -- [options]`; prints one JSON object per
//! line (also appended to `--out FILE`):
//! - `env`: device, dtype, commit, the kernel policy (`MATVLM_ATTENTION_KERNELS=0` etc., see
//!   `KernelPolicy::from_env`), the card's copy bandwidth (a >= 1 GiB device-to-device copy,
//!   read + write bytes counted);
//! - `model`: per model, its layers, the bytes of its weights (language model, vision side);
//! - `prefill` / `decode`: [`matvlm::eval::bench_generation`]'s records, with the bandwidth bound
//!   of the decode steps beside them (see `bound_ms`).
//!
//! - `check` (with `--check-model DIR`): a checkpoint's greedy tokens on this device, batched and
//!   one prompt at a time, against the CPU in f32, for prompts of 5 different lengths; and the
//!   largest difference of the prefill's last logits.
//!
//! Options: `--config NAME|PATH` (default tinyllava-3.1b), `--dtype bf16`, `--device cuda`,
//! `--models teacher,0.125,0.25,0.5` (ratios place Mamba layers by MaTVLM's rule),
//! `--batches 1,8`, `--gen-lens 256,1024,2048`, `--prompt-tokens 828`, `--prefill-reps 5`,
//! `--bandwidth-gib 1`, `--out FILE`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use matvlm::eval::{bench_generation, GenerationBenchOptions, GenerationRecord};
use matvlm::model::decoder::Mixer;
use matvlm::model::hybrid::Placement;
use matvlm::model::random::{random_model, RandomModelOptions};
use matvlm::model::vlm::Vlm;
use serde_json::{json, Value};

#[path = "common/cli.rs"]
mod cli;

const CLI: cli::Cli = cli::Cli {
    bench: "engine_bench",
};

struct Args {
    config: String,
    dtype: String,
    device: String,
    models: Vec<String>,
    bench: GenerationBenchOptions,
    bandwidth_gib: usize,
    out: Option<std::path::PathBuf>,
    check_model: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        config: matvlm::config::TinyLlavaConfig::FULL_SIZE.into(),
        dtype: "bf16".into(),
        device: "cuda".into(),
        models: CLI.list("--models", "teacher,0.125,0.25,0.5"),
        bench: GenerationBenchOptions::default(),
        bandwidth_gib: 1,
        out: None,
        check_model: None,
    };
    for (flag, value) in CLI.args(&[]) {
        let value = value.unwrap_or_default();
        match flag.as_str() {
            "--config" => a.config = value,
            "--dtype" => a.dtype = value,
            "--device" => a.device = value,
            "--models" => a.models = CLI.list(&flag, &value),
            "--batches" => a.bench.batches = CLI.list(&flag, &value),
            "--gen-lens" => a.bench.gen_lens = CLI.list(&flag, &value),
            "--prompt-tokens" => a.bench.prompt_tokens = CLI.num(&flag, &value),
            "--prefill-reps" => a.bench.prefill_reps = CLI.num(&flag, &value),
            "--bandwidth-gib" => a.bandwidth_gib = CLI.num(&flag, &value),
            "--out" => a.out = Some(value.into()),
            "--check-model" => a.check_model = Some(value),
            other => CLI.usage(&format!("unknown option {other}")),
        }
    }
    a
}

/// Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5 copies.
fn copy_bandwidth(device: &Device, gib: usize) -> matvlm::Result<f64> {
    let bytes = gib << 30;
    let src = Tensor::zeros(bytes / 4, DType::F32, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        device.synchronize()?;
        let start = Instant::now();
        let dst = src.copy()?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(dst);
    }
    Ok(2.0 * bytes as f64 / best)
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// What one decode step must read, split by what it scales with: every decoder and lm_head
/// weight once, then per row one embedding row, the attended keys and values (per position) and
/// the Mamba states.
struct StepBytes {
    weights: f64,
    per_row: f64,
    per_row_position: f64,
}

impl StepBytes {
    fn of(vlm: &Vlm) -> Self {
        let dec = &vlm.decoder;
        let elt = vlm.dtype.size_in_bytes();
        let weights: usize = dec
            .named_tensors()
            .iter()
            .filter(|(k, _)| k != "model.embed_tokens.weight")
            .map(|(_, t)| bytes(t))
            .sum();
        let (mut per_row, mut per_position) = (dec.cfg.hidden_size * elt, 0);
        for b in &dec.blocks {
            match &b.mixer {
                Mixer::Attention(a) => per_position += 2 * a.num_kv_heads * a.head_dim * elt,
                Mixer::Mamba2(m) => {
                    let c = &m.cfg;
                    per_row += (c.conv_dim() * c.d_conv + c.n_heads * c.head_dim * c.d_state) * 4
                }
            }
        }
        Self {
            weights: weights as f64,
            per_row: per_row as f64,
            per_row_position: per_position as f64,
        }
    }

    /// Bytes of one step of `batch` rows attending `positions` keys each.
    fn step(&self, batch: usize, positions: usize) -> f64 {
        self.weights + batch as f64 * (self.per_row + positions as f64 * self.per_row_position)
    }
}

fn main() -> matvlm::Result<()> {
    let args = parse_args();
    // MATVLM_ATTENTION_KERNELS=0 (and the other switches of KernelPolicy::from_env) time the
    // paths without a kernel in the same call; the env record says which ran.
    let policy = matvlm::model::mamba2::fused::KernelPolicy::from_env();
    matvlm::model::mamba2::fused::set_policy(policy);
    let device = matvlm::device::parse_device(&args.device)?;
    let mut out = CLI.output(args.out.as_deref());
    let bandwidth = copy_bandwidth(&device, args.bandwidth_gib)?;
    out.emit(&json!({
        "record": "env", "device": args.device, "dtype": args.dtype, "config": args.config,
        "commit": option_env!("MATVLM_COMMIT"), "copy_gbps": bandwidth / 1e9,
        "copy_gib": args.bandwidth_gib, "options": args.bench,
        "policy": format!("{policy:?}"),
    }));
    if let Some(dir) = &args.check_model {
        for dtype in ["f32", &args.dtype] {
            out.emit(&check(dir, dtype, &device)?);
        }
    }
    let n_layers = matvlm::config::TinyLlavaConfig::preset_or_file(&args.config)?
        .text_config
        .num_hidden_layers;
    for name in &args.models {
        let mamba_layers =
            match name.as_str() {
                "teacher" => Vec::new(),
                ratio => Placement::ratio(ratio.parse().unwrap_or_else(|_| {
                    CLI.usage(&format!("model `{ratio}`: teacher or a ratio"))
                }))
                .layers(n_layers)?,
            };
        let start = Instant::now();
        let vlm = random_model(
            &RandomModelOptions {
                config: args.config.clone(),
                mamba_layers: mamba_layers.clone(),
                dtype: args.dtype.clone(),
                seed: 0,
            },
            &device,
        )?;
        device.synchronize()?;
        let build_s = start.elapsed().as_secs_f64();
        let all: Vec<(String, Tensor)> = vlm.named_tensors();
        let lm_bytes: usize = all
            .iter()
            .filter(|(k, _)| k.starts_with("language_model."))
            .map(|(_, t)| bytes(t))
            .sum();
        let vision_bytes: usize = all.iter().map(|(_, t)| bytes(t)).sum::<usize>() - lm_bytes;
        out.emit(&json!({
            "record": "model", "model": name, "mamba_layers": mamba_layers,
            "parameters": vlm.parameter_count(), "lm_weight_bytes": lm_bytes,
            "vision_connector_bytes": vision_bytes, "build_s": build_s,
        }));
        let cost = StepBytes::of(&vlm);
        let records = bench_generation(&vlm, &args.bench)?;
        for r in records {
            out.emit(&with_bound(&cost, name, &r, bandwidth, vision_bytes));
        }
    }
    Ok(())
}

/// Greedy tokens of the checkpoint at `dir` in `dtype` on `device` (batched and alone) against
/// the CPU in f32 (alone), for five prompts of 7 to 47 random ids; and the largest difference of
/// the prefill's last-position logits.
fn check(dir: &str, dtype: &str, device: &Device) -> matvlm::Result<Value> {
    use matvlm::generate::{GenerateOptions, PromptIds};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let dt = matvlm::device::parse_dtype(dtype)?;
    let here = Vlm::load(dir, dt, device)?;
    let cpu = Vlm::load(dir, DType::F32, &Device::Cpu)?;
    let vocab = cpu.decoder.cfg.vocab_size as i64;
    let mut rng = StdRng::seed_from_u64(1);
    let rows: Vec<Vec<i64>> = [7, 19, 33, 12, 47]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 16,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let alone = |v: &Vlm| -> matvlm::Result<Vec<Vec<u32>>> {
        rows.iter()
            .map(|ids| Ok(v.generate_ids(ids, None, &opts, &mut |_| true)?.0))
            .collect()
    };
    let reference = alone(&cpu)?;
    let single = alone(&here)?;
    let prompts: Vec<PromptIds> = rows
        .iter()
        .map(|ids| PromptIds {
            ids,
            pixel_values: None,
            max_new_tokens: None,
        })
        .collect();
    let batched: Vec<Vec<u32>> = here
        .generate_ids_batch(&prompts, &opts, &mut |_| true)?
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let agree = |a: &[Vec<u32>], b: &[Vec<u32>]| -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).take_while(|(p, q)| p == q).count())
            .sum()
    };
    let mut max_logit_diff = 0f64;
    for ids in &rows {
        let last = |v: &Vlm| -> matvlm::Result<Tensor> {
            let (logits, _) = v.forward(std::slice::from_ref(ids), None, &Default::default())?;
            let t = logits.dim(1)?;
            Ok(logits
                .get(0)?
                .get(t - 1)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?)
        };
        let d = (last(&here)? - last(&cpu)?)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
        max_logit_diff = max_logit_diff.max(d as f64);
    }
    let total: usize = reference.iter().map(Vec::len).sum();
    Ok(json!({
        "record": "check", "model": dir, "dtype": dtype, "tokens": total,
        "single_vs_cpu_f32_prefix_tokens": agree(&single, &reference),
        "batched_vs_single_prefix_tokens": agree(&batched, &single),
        "batched_vs_cpu_f32_prefix_tokens": agree(&batched, &reference),
        "max_last_logit_diff_vs_cpu_f32": max_logit_diff,
    }))
}

/// A record with the bandwidth bound of its decode steps: the sum over steps of
/// `step_bytes / copy bandwidth`, and the fraction of it reached.
fn with_bound(
    cost: &StepBytes,
    model: &str,
    r: &GenerationRecord,
    bandwidth: f64,
    vision_bytes: usize,
) -> Value {
    let mut v = serde_json::to_value(r).expect("records serialise");
    v["record"] = json!(r.phase);
    v["model"] = json!(model);
    // The peers run the language model alone: their peak leaves out our vision tower.
    v["lm_peak_bytes"] = json!(r.peak_bytes.map(|p| p.saturating_sub(vision_bytes as u64)));
    if r.phase == "decode" {
        let bound_s: f64 = (1..=r.gen_len)
            .map(|g| cost.step(r.batch, r.prompt_tokens + g) / bandwidth)
            .sum();
        v["bound_ms"] = json!(bound_s * 1e3);
        v["fraction_of_bound"] = json!(bound_s * 1e3 / r.ms);
        let mid = cost.step(r.batch, r.prompt_tokens + r.gen_len / 2);
        v["step_bytes_mid"] = json!(mid);
    }
    v
}
