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
#[serde(default, deny_unknown_fields)]
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

/// One prompt of a batch, as text in the chat template (`<image>` marks the image) and the
/// image file, if any.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TextPrompt {
    pub prompt: String,
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
}

/// One prompt of a batch, as token ids ([`crate::tokenize::IMAGE_TOKEN`] where its image goes).
#[derive(Debug, Clone, Copy)]
pub struct PromptIds<'a> {
    pub ids: &'a [i64],
    /// The prompt's image `[1, 3, H, W]`, if it has one.
    pub pixel_values: Option<&'a Tensor>,
    /// This row's limit, if lower than the batch's `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
}

impl<'a> PromptIds<'a> {
    /// The rows of a batch: prompt `i` is `ids[i]` with `pixels[i]`, at the batch's token limit.
    pub fn rows(ids: &'a [Vec<i64>], pixels: &'a [Option<Tensor>]) -> Vec<PromptIds<'a>> {
        ids.iter()
            .zip(pixels)
            .map(|(ids, px)| PromptIds {
                ids,
                pixel_values: px.as_ref(),
                max_new_tokens: None,
            })
            .collect()
    }
}

/// A token a row produced in one step, handed to the streaming callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowToken {
    pub row: usize,
    pub token: u32,
}

/// Where every row of a batched generation stands.
struct Rows {
    tokens: Vec<Vec<u32>>,
    stop: Vec<Option<StopReason>>,
    limits: Vec<usize>,
}

impl Rows {
    fn active(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.stop.len()).filter(|&r| self.stop[r].is_none())
    }
}

impl Vlm {
    /// Generate from prompt token ids (with [`crate::tokenize::IMAGE_TOKEN`] where the image goes)
    /// and optional pixel values `[1, 3, H, W]`: a batch of one (see [`Vlm::generate_ids_batch`]).
    /// `on_token(id)` is called for every new token; returning `false` stops generation (used
    /// for streaming and Ctrl-C).
    pub fn generate_ids(
        &self,
        prompt: &[i64],
        pixel_values: Option<&Tensor>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, StopReason)> {
        let row = PromptIds {
            ids: prompt,
            pixel_values,
            max_new_tokens: None,
        };
        let mut out = self.generate_ids_batch(&[row], opts, &mut |step| {
            step.iter().all(|t| on_token(t.token))
        })?;
        Ok(out.remove(0))
    }

    /// Generate from several prompts at once. Rows are left-padded to the longest prompt and
    /// prefilled together; each step then extends every unfinished row by one token through a
    /// cache allocated once for the longest row (padded prompt + `max_new_tokens`). Padding never
    /// reaches a real token: attention masks its keys and Mamba layers keep it out of their
    /// states, so each row's greedy output is the one it gets alone. Rows stop on their own
    /// (EOS, their limit); `on_step` receives each step's new tokens and stops every row by
    /// returning `false`. Greedy picks happen on the device: one `[B]` copy per step.
    pub fn generate_ids_batch(
        &self,
        prompts: &[PromptIds],
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(&[RowToken]) -> bool,
    ) -> Result<Vec<(Vec<u32>, StopReason)>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<Tensor> = prompts
            .iter()
            .filter_map(|p| p.pixel_values.cloned())
            .collect();
        let images = if pixels.is_empty() {
            None
        } else {
            Some(self.encode_images(&Tensor::cat(&pixels, 0)?)?)
        };
        let rows: Vec<Vec<i64>> = prompts.iter().map(|p| p.ids.to_vec()).collect();
        let (embeds, lens) = self.embed_inputs_left_padded(&rows, images.as_ref())?;
        let width = embeds.dim(1)?;
        let mut state = Rows {
            tokens: vec![Vec::new(); prompts.len()],
            stop: vec![None; prompts.len()],
            limits: prompts
                .iter()
                .map(|p| {
                    p.max_new_tokens
                        .map_or(opts.max_new_tokens, |m| m.min(opts.max_new_tokens))
                })
                .collect(),
        };
        let longest = state.limits.iter().copied().max().unwrap_or(0);
        for (r, &limit) in state.limits.iter().enumerate() {
            if limit == 0 {
                state.stop[r] = Some(StopReason::MaxTokens);
            }
        }
        if longest == 0 {
            return Ok(finish(state));
        }
        let left_pad: Vec<usize> = lens.iter().map(|&l| width - l).collect();
        let mut cache =
            self.decoder
                .cache_for(width + longest, left_pad, self.dtype, &self.device)?;
        let eos = self
            .tokenizer
            .as_ref()
            .map_or(self.decoder.cfg.eos_token_id, |t| t.eos_id());
        let mut samplers: Vec<Sampler> = prompts.iter().map(|_| Sampler::new(opts)).collect();
        let mut logits = self.decoder.forward_last(&embeds, &mut cache)?;
        loop {
            let picks = pick(&logits, &mut samplers, opts)?;
            let mut step = Vec::new();
            for r in state.active().collect::<Vec<_>>() {
                let next = picks[r];
                if opts.stop_at_eos && next == eos {
                    state.stop[r] = Some(StopReason::Eos);
                    continue;
                }
                state.tokens[r].push(next);
                step.push(RowToken {
                    row: r,
                    token: next,
                });
                if state.tokens[r].len() >= state.limits[r] {
                    state.stop[r] = Some(StopReason::MaxTokens);
                }
            }
            if !step.is_empty() && !on_step(&step) {
                for r in state.active().collect::<Vec<_>>() {
                    state.stop[r] = Some(StopReason::Callback);
                }
            }
            if state.active().next().is_none() {
                return Ok(finish(state));
            }
            // Finished rows still take a step (their token is ignored): the batch moves together.
            let ids = Tensor::new(picks.as_slice(), &self.device)?.unsqueeze(1)?;
            logits = self
                .decoder
                .forward_last(&self.decoder.embed(&ids)?, &mut cache)?;
        }
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
        let continuation = |full: String| answer_text(prompt, full);
        let mut text = String::new();
        let mut tokens: Vec<u32> = Vec::new();
        let mut decode_err = None;
        let (tokens_out, stop) =
            self.generate_ids(&ids, pixel_values.as_ref(), opts, &mut |t| {
                tokens.push(t);
                match tok.decode(&tokens) {
                    Ok(full) => {
                        // A character whose bytes span tokens decodes as U+FFFD until its last
                        // byte comes: hold that tail back, so that the pieces add up to the
                        // returned text (the rest is sent at the end).
                        let full = continuation(full);
                        let stable = full.trim_end_matches('\u{FFFD}');
                        let piece = stable.get(text.len()..).unwrap_or("").to_string();
                        text = stable.to_string();
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
        let full = continuation(tok.decode(&tokens_out)?);
        if let Some(rest) = full.get(text.len()..).filter(|r| !r.is_empty()) {
            on_text(rest);
        }
        Ok(Generation {
            text: full,
            tokens: tokens_out,
            prompt_len: ids.len(),
            stop,
        })
    }

    /// Generate for several raw prompts at once (see [`Vlm::generate_ids_batch`]): each row's
    /// answer is the one [`Vlm::generate`] gives that prompt alone (greedy), in order.
    pub fn generate_batch(
        &self,
        prompts: &[TextPrompt],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generation>> {
        let tok = self.tokenizer()?.clone();
        let mut ids = Vec::with_capacity(prompts.len());
        let mut pixels = Vec::with_capacity(prompts.len());
        for p in prompts {
            ids.push(tok.encode_prompt_with_images(&p.prompt, usize::from(p.image.is_some()))?);
            pixels.push(match &p.image {
                Some(path) => Some(self.pixel_values(path)?),
                None => None,
            });
        }
        let out = self.generate_ids_batch(&PromptIds::rows(&ids, &pixels), opts, &mut |_| true)?;
        out.into_iter()
            .zip(prompts)
            .zip(&ids)
            .map(|(((tokens, stop), p), ids)| {
                Ok(Generation {
                    text: answer_text(&p.prompt, tok.decode(&tokens)?),
                    tokens,
                    prompt_len: ids.len(),
                    stop,
                })
            })
            .collect()
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

/// The text a prompt continues with. The template writes `ASSISTANT: {answer}`, and the
/// tokenizer keeps that space on the answer's first token (` circle`): it belongs to the
/// template, not to the answer.
fn answer_text(prompt: &str, full: String) -> String {
    match full.strip_prefix(' ') {
        Some(rest) if prompt.ends_with(ANSWER_TAG) => rest.to_string(),
        _ => full,
    }
}

/// Each row's next token from logits `[B, vocab]`: argmax on the device for greedy decoding,
/// the row's own sampler (seeded as if the row were alone) otherwise.
fn pick(logits: &Tensor, samplers: &mut [Sampler], opts: &GenerateOptions) -> Result<Vec<u32>> {
    if opts.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    samplers
        .iter_mut()
        .enumerate()
        .map(|(r, s)| s.sample(&logits.get(r)?))
        .collect()
}

fn finish(state: Rows) -> Vec<(Vec<u32>, StopReason)> {
    state
        .tokens
        .into_iter()
        .zip(state.stop)
        .map(|(t, s)| (t, s.unwrap_or(StopReason::MaxTokens)))
        .collect()
}
