//! Text generation: greedy or temperature / top-p sampling, incremental decoding through the
//! cache, streaming through a per-token callback.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::vlm::Vlm;
use crate::tokenize::single_turn_prompt;
use crate::{Error, Result};

/// How the phi template ends a prompt that asks for the assistant's answer.
const ANSWER_TAG: &str = "ASSISTANT:";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1]; 1 disables it.
    pub top_p: f64,
    pub seed: u64,
    /// Stop when the model emits EOS (`<|endoftext|>`).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    Eos,
    MaxTokens,
    Callback,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_len: usize,
    pub stop: StopReason,
}

/// Picks the next token from a row of logits.
pub struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_p: f64,
}

impl Sampler {
    pub fn new(opts: &GenerateOptions) -> Self {
        Self {
            rng: StdRng::seed_from_u64(opts.seed),
            temperature: opts.temperature,
            top_p: opts.top_p,
        }
    }

    /// `logits: [vocab]`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if self.temperature <= 0.0 {
            return Ok(argmax(&logits));
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, (((l - max) as f64) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0.0;
            let mut keep = 0;
            for (i, p) in probs.iter().enumerate() {
                acc += p.1;
                keep = i + 1;
                if acc >= self.top_p {
                    break;
                }
            }
            probs.truncate(keep);
        }
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * mass;
        for &(i, p) in &probs {
            if r < p {
                return Ok(i as u32);
            }
            r -= p;
        }
        Ok(probs.last().map_or(0, |p| p.0 as u32))
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl Vlm {
    /// Generate from prompt token ids (with [`crate::tokenize::IMAGE_TOKEN`] where the image goes)
    /// and optional pixel values `[1, 3, H, W]`. The prompt is prefilled once; each new token then
    /// takes one incremental step through the cache. `on_token(id)` is called for every new token;
    /// returning `false` stops generation (used for streaming and Ctrl-C).
    pub fn generate_ids(
        &self,
        prompt: &[i64],
        pixel_values: Option<&Tensor>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, StopReason)> {
        let images = match pixel_values {
            Some(p) => Some(self.encode_images(p)?),
            None => None,
        };
        let (embeds, _) = self.embed_inputs(&[prompt.to_vec()], images.as_ref())?;
        let eos = self.decoder.cfg.eos_token_id;
        let eos = self.tokenizer.as_ref().map_or(eos, |t| t.eos_id());
        let mut sampler = Sampler::new(opts);
        let mut cache = self.new_cache();
        let mut logits = self.step_embeds(&embeds, &mut cache)?;
        let mut out = Vec::new();
        for _ in 0..opts.max_new_tokens {
            let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
            let next = sampler.sample(&last)?;
            if opts.stop_at_eos && next == eos {
                return Ok((out, StopReason::Eos));
            }
            out.push(next);
            if !on_token(next) {
                return Ok((out, StopReason::Callback));
            }
            let ids = Tensor::new(&[[next]], &self.device)?;
            let emb = self.decoder.embed(&ids)?;
            logits = self.step_embeds(&emb, &mut cache)?;
        }
        Ok((out, StopReason::MaxTokens))
    }

    /// Generate from a raw prompt string (already in the chat template; `<image>` marks the image).
    /// `on_text` receives the newly decoded text piece of each token; the pieces add up to the
    /// returned text. The answer of a templated prompt (one ending in `ASSISTANT:`) comes without
    /// the space that separates it from the tag (`"circle"`, not `" circle"`).
    pub fn generate(
        &self,
        prompt: &str,
        image: Option<&Path>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let tok = self.tokenizer()?.clone();
        let n_images = usize::from(image.is_some());
        let ids = tok.encode_prompt_with_images(prompt, n_images)?;
        let pixel_values = match image {
            Some(p) => Some(self.pixel_values(p)?),
            None => None,
        };
        // The template writes `ASSISTANT: {answer}`, and the tokenizer keeps that space on the
        // answer's first token (` circle`): it belongs to the template, not to the answer.
        let separated = prompt.ends_with(ANSWER_TAG);
        let continuation = |full: String| match full.strip_prefix(' ') {
            Some(rest) if separated => rest.to_string(),
            _ => full,
        };
        let mut text = String::new();
        let mut tokens: Vec<u32> = Vec::new();
        let mut decode_err = None;
        let (tokens_out, stop) =
            self.generate_ids(&ids, pixel_values.as_ref(), opts, &mut |t| {
                tokens.push(t);
                match tok.decode(&tokens) {
                    Ok(full) => {
                        let full = continuation(full);
                        let piece = full.get(text.len()..).unwrap_or("").to_string();
                        text = full;
                        on_text(&piece)
                    }
                    Err(e) => {
                        decode_err = Some(e);
                        false
                    }
                }
            })?;
        if let Some(e) = decode_err {
            return Err(e);
        }
        Ok(Generation {
            text: continuation(tok.decode(&tokens_out)?),
            tokens: tokens_out,
            prompt_len: ids.len(),
            stop,
        })
    }

    /// Ask one question about an optional image with the phi template; returns the answer.
    pub fn ask(
        &self,
        question: &str,
        image: Option<&Path>,
        opts: &GenerateOptions,
    ) -> Result<String> {
        let prompt = single_turn_prompt(question, image.is_some());
        Ok(self
            .generate(&prompt, image, opts, &mut |_| true)?
            .text
            .trim()
            .to_string())
    }

    /// Next-token logits `[T, vocab]` of a prompt (with the image if given), batch of one.
    pub fn prompt_logits(&self, prompt: &str, image: Option<&Path>) -> Result<Tensor> {
        let tok = self.tokenizer()?;
        let ids = tok.encode_prompt_with_images(prompt, usize::from(image.is_some()))?;
        let pixel_values = match image {
            Some(p) => Some(self.pixel_values(p)?),
            None => None,
        };
        let (logits, _) = self.forward(&[ids], pixel_values.as_ref(), &Default::default())?;
        Ok(logits.squeeze(0)?)
    }

    /// The decoder's hidden states `[T, hidden]` of a prompt (with the image if given), batch of
    /// one: the input embeddings (image vectors spliced in) followed by the output of every
    /// decoder layer, so `layers + 1` tensors. The last one is before the final LayerNorm.
    pub fn prompt_hidden_states(&self, prompt: &str, image: Option<&Path>) -> Result<Vec<Tensor>> {
        let tok = self.tokenizer()?;
        let ids = tok.encode_prompt_with_images(prompt, usize::from(image.is_some()))?;
        let pixel_values = match image {
            Some(p) => Some(self.pixel_values(p)?),
            None => None,
        };
        let (_, captured) = self.forward(
            &[ids],
            pixel_values.as_ref(),
            &crate::model::decoder::Capture::hidden_states(),
        )?;
        let n_layers = self.decoder.blocks.len();
        let names = std::iter::once("layers.0.input".to_string())
            .chain((0..n_layers).map(|i| format!("layers.{i}.output")));
        names
            .map(|name| match captured.get(&name) {
                Some(t) => Ok(t.squeeze(0)?),
                None => Err(Error::Other(format!(
                    "the decoder did not capture `{name}` ({n_layers} layers)"
                ))),
            })
            .collect()
    }
}

/// Greedy argmax over the last dimension of `[.., vocab]` logits.
pub fn greedy(logits: &Tensor) -> Result<Tensor> {
    logits.argmax(D::Minus1).map_err(Error::from)
}
