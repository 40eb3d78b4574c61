//! Greedy decode speed by the wall clock (prefill and per-token decode timed apart).

use serde::{Deserialize, Serialize};

use crate::generate::GenerateOptions;
use crate::model::vlm::Vlm;
use crate::tokenize::single_turn_prompt;
use crate::{Error, Result};

/// Settings of [`decode_speed`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeedOptions {
    /// The prompt as the model sees it (already in the chat template; `<image>` where the image
    /// goes).
    pub prompt: String,
    /// The image of the prompt, if it has one.
    pub image: Option<std::path::PathBuf>,
    /// Tokens generated per measurement (at least 2: the first comes out of the prefill).
    pub new_tokens: usize,
    /// Measurements taken; the fastest counts (the least disturbed by other work on the machine).
    pub repeats: usize,
}

impl Default for SpeedOptions {
    fn default() -> Self {
        Self {
            prompt: single_turn_prompt("What is in the picture?", false),
            image: None,
            new_tokens: 64,
            repeats: 3,
        }
    }
}

/// Wall-clock speed of greedy generation, from [`decode_speed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedReport {
    /// Decoder positions of the prompt (image tokens counted).
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Seconds from the call to the first new token: image encoding, prefill, first pick.
    pub prefill_s: f64,
    /// Seconds for the other `new_tokens - 1` tokens, one incremental step each.
    pub decode_s: f64,
    /// `(new_tokens - 1) / decode_s`: the decode speed.
    pub tokens_per_s: f64,
    pub repeats: usize,
}

/// Measure greedy decoding of `vlm` by the wall clock: generate `opts.new_tokens` tokens (EOS
/// does not stop it) after the prompt, `opts.repeats` times, and report the fastest run. The
/// decode speed leaves the prefill out (it is timed on its own), so it measures the per-token
/// cost that the KV cache (attention) or the fixed state (Mamba) sets.
pub fn decode_speed(vlm: &Vlm, opts: &SpeedOptions) -> Result<SpeedReport> {
    if opts.new_tokens < 2 {
        return Err(Error::Invalid(format!(
            "decode speed: new_tokens must be at least 2 (the first token comes from the \
             prefill), got {}",
            opts.new_tokens
        )));
    }
    if opts.repeats == 0 {
        return Err(Error::Invalid(
            "decode speed: repeats must be at least 1".into(),
        ));
    }
    let tok = vlm.tokenizer()?;
    let ids = tok.encode_prompt_with_images(&opts.prompt, usize::from(opts.image.is_some()))?;
    let pixels = match &opts.image {
        Some(p) => Some(vlm.pixel_values(p)?),
        None => None,
    };
    let prompt_tokens =
        ids.len() + usize::from(pixels.is_some()) * vlm.config.image_tokens().saturating_sub(1);
    let gen = GenerateOptions {
        max_new_tokens: opts.new_tokens,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let mut best: Option<SpeedReport> = None;
    for _ in 0..opts.repeats {
        let start = std::time::Instant::now();
        let mut first: Option<std::time::Instant> = None;
        let (out, _) = vlm.generate_ids(&ids, pixels.as_ref(), &gen, &mut |_| {
            first.get_or_insert_with(std::time::Instant::now);
            true
        })?;
        let end = std::time::Instant::now();
        let first = first.unwrap_or(end);
        if out.len() != opts.new_tokens {
            return Err(Error::Other(format!(
                "decode speed: generation stopped after {} of {} tokens",
                out.len(),
                opts.new_tokens
            )));
        }
        let decode_s = (end - first).as_secs_f64();
        let report = SpeedReport {
            prompt_tokens,
            new_tokens: opts.new_tokens,
            prefill_s: (first - start).as_secs_f64(),
            decode_s,
            tokens_per_s: (opts.new_tokens - 1) as f64 / decode_s.max(1e-9),
            repeats: opts.repeats,
        };
        if best
            .as_ref()
            .is_none_or(|b| report.tokens_per_s > b.tokens_per_s)
        {
            best = Some(report);
        }
    }
    best.ok_or_else(|| Error::Other("decode speed: no measurement".into()))
}

/// Settings of [`bench_generation`]: the paper's decoding setting by default (a prompt of 728
/// image tokens and 100 text tokens, greedy decoding of up to 2,048 tokens).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationBenchOptions {
    /// Prompt positions per row (random token ids: the language-model path alone).
    pub prompt_tokens: usize,
    /// Batch sizes, each measured on its own.
    pub batches: Vec<usize>,
    /// Decoded lengths reported; all come from one run of the longest (the first `N` steps of
    /// it), so each batch size costs one generation.
    pub gen_lens: Vec<usize>,
    /// Timed prefills per batch size (the median counts), after one untimed.
    pub prefill_reps: usize,
    pub seed: u64,
}

impl Default for GenerationBenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 828,
            batches: vec![1, 8],
            gen_lens: vec![256, 1024, 2048],
            prefill_reps: 5,
            seed: 0,
        }
    }
}

/// One measurement of [`bench_generation`]: a prefill (`gen_len` 0) or the first `gen_len`
/// decode steps after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// `"prefill"` or `"decode"`.
    pub phase: String,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub gen_len: usize,
    /// Prefill: median ms of a prefill with its first pick (logits of the last position, greedy
    /// pick on the device, copied to the host). Decode: ms of the `gen_len` steps.
    pub ms: f64,
    /// Decode: `ms / gen_len`.
    pub ms_per_token: f64,
    /// Prefill: prompt positions per second; decode: new tokens per second, all rows together.
    pub tokens_per_s: f64,
    /// Peak bytes held on the device during the phase (the memory pool's high-water mark; `None`
    /// on the CPU). The decode peak covers the prefill before it.
    pub peak_bytes: Option<u64>,
    /// [`Vlm::cache_bytes`] of the cache this phase allocates (prompt + tokens generated).
    pub cache_bytes: usize,
}

/// Time generation as users run it ([`Vlm::generate_ids_batch`], greedy, EOS ignored) at each
/// batch size: the prefill alone, and decoding measured between the streaming callbacks (each
/// step's tokens reach the host there, so the clock reads after the device is done).
pub fn bench_generation(vlm: &Vlm, opts: &GenerationBenchOptions) -> Result<Vec<GenerationRecord>> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let longest = opts.gen_lens.iter().copied().max().unwrap_or(0);
    if opts.prompt_tokens == 0 || opts.batches.is_empty() || opts.prefill_reps == 0 {
        return Err(Error::Invalid(
            "generation bench: prompt_tokens, batches and prefill_reps must be non-empty".into(),
        ));
    }
    let device = &vlm.device;
    let vocab = vlm.decoder.cfg.vocab_size as i64;
    let mut out = Vec::new();
    for &batch in &opts.batches {
        let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(batch as u64));
        let rows: Vec<Vec<i64>> = (0..batch)
            .map(|_| {
                (0..opts.prompt_tokens)
                    .map(|_| rng.random_range(0..vocab))
                    .collect()
            })
            .collect();
        let prompts: Vec<crate::generate::PromptIds> = rows
            .iter()
            .map(|ids| crate::generate::PromptIds {
                ids,
                pixel_values: None,
                max_new_tokens: None,
            })
            .collect();
        let gen = |n: usize| GenerateOptions {
            max_new_tokens: n,
            stop_at_eos: false,
            ..GenerateOptions::default()
        };
        let cache_bytes = vlm.cache_bytes(batch, opts.prompt_tokens + longest + 1);

        // Prefill: a generation of one token is the prefill and its pick.
        vlm.generate_ids_batch(&prompts, &gen(1), &mut |_| true)?;
        crate::device::reset_peak_memory(device)?;
        let mut times = Vec::with_capacity(opts.prefill_reps);
        for _ in 0..opts.prefill_reps {
            let start = std::time::Instant::now();
            vlm.generate_ids_batch(&prompts, &gen(1), &mut |_| true)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let peak = crate::device::memory_use(device)?.map(|m| m.peak);
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        out.push(GenerationRecord {
            phase: "prefill".into(),
            batch,
            prompt_tokens: opts.prompt_tokens,
            gen_len: 0,
            ms,
            ms_per_token: 0.0,
            tokens_per_s: (batch * opts.prompt_tokens) as f64 / (ms / 1e3),
            peak_bytes: peak,
            cache_bytes: vlm.cache_bytes(batch, opts.prompt_tokens + 1),
        });
        if longest == 0 {
            continue;
        }

        // Decode: the token out of the prefill is step 0; step g is the g-th decode step.
        crate::device::reset_peak_memory(device)?;
        let mut stamps: Vec<std::time::Instant> = Vec::with_capacity(longest + 1);
        let mut peaks: Vec<Option<u64>> = Vec::new();
        let mut failure = None;
        vlm.generate_ids_batch(&prompts, &gen(longest + 1), &mut |_| {
            stamps.push(std::time::Instant::now());
            let g = stamps.len() - 1;
            if opts.gen_lens.contains(&g) {
                match crate::device::memory_use(device) {
                    Ok(m) => peaks.push(m.map(|m| m.peak)),
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut lens: Vec<usize> = opts.gen_lens.iter().copied().filter(|&g| g > 0).collect();
        lens.sort_unstable();
        lens.dedup();
        for (i, &g) in lens.iter().enumerate() {
            let ms = (stamps[g] - stamps[0]).as_secs_f64() * 1e3;
            out.push(GenerationRecord {
                phase: "decode".into(),
                batch,
                prompt_tokens: opts.prompt_tokens,
                gen_len: g,
                ms,
                ms_per_token: ms / g as f64,
                tokens_per_s: (batch * g) as f64 / (ms / 1e3),
                peak_bytes: peaks.get(i).copied().flatten(),
                cache_bytes,
            });
        }
    }
    Ok(out)
}
