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
