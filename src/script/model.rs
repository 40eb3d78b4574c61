//! The `Model` type of scripts (a teacher or a hybrid VLM) and the functions that load, inspect,
//! run and save it.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, NativeCallContext, INT};

use super::convert::{from_map, runtime_error, to_usize, Opts, OrRhai, RhaiResult};
use super::session_of;
use super::tensor::Tensor;
use crate::generate::{GenerateOptions, TextPrompt};
use crate::model::hybrid::HybridRequest;
use crate::model::random::RandomModelOptions;
use crate::model::vlm::Vlm;
use crate::tokenize::{single_turn_prompt, PHI_SYSTEM};

/// A loaded VLM. Cloning shares the weights; every operation that changes a model (building a
/// hybrid, training) returns a new one.
#[derive(Clone)]
pub struct Model {
    pub vlm: Arc<Vlm>,
    /// Where it came from (a folder, a hub id, or how it was derived), for display.
    pub source: String,
}

impl Model {
    pub fn new(vlm: Vlm, source: impl Into<String>) -> Self {
        Self {
            vlm: Arc::new(vlm),
            source: source.into(),
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds = self.vlm.layer_kinds();
        let mamba = self.vlm.mamba_layers().len();
        let kind = if mamba == 0 { "teacher" } else { "hybrid" };
        write!(
            f,
            "Model({kind}, {} layers ({mamba} mamba), {}, {:?}, from {})",
            kinds.len(),
            self.vlm.dtype.as_str(),
            self.vlm.device.location(),
            self.source
        )
    }
}

/// The command that trains the embedded tiny teacher (named in the error when it is missing).
pub const TINY_TEACHER_COMMAND: &str = "cargo run --release --bin train_teacher";

/// The prompt as the model sees it: a prompt that does not start with the phi template's system
/// line gets wrapped as a single user question (with `<image>` in front when an image is given),
/// unless `raw` is set.
pub fn templated_prompt(prompt: &str, with_image: bool, raw: bool) -> String {
    if raw || prompt.starts_with(PHI_SYSTEM) {
        prompt.to_string()
    } else {
        single_turn_prompt(prompt, with_image)
    }
}

/// The prompt, image and template switch of a `logits` / `generate` options map.
fn prompt_opts(opts: &Opts) -> RhaiResult<(String, Option<PathBuf>)> {
    let prompt = opts
        .string("prompt")?
        .ok_or_else(|| runtime_error("option `prompt` is required".into()))?;
    let image = opts.path("image")?;
    let raw = opts.bool("raw")?.unwrap_or(false);
    Ok((templated_prompt(&prompt, image.is_some(), raw), image))
}

#[rhai::export_module]
pub mod api {
    use super::*;

    /// Load a model from a checkpoint folder or a hub id (`owner/name`), on the session's device
    /// and in its dtype. Teacher or hybrid is detected from the checkpoint.
    #[rhai_fn(name = "load_model", return_raw)]
    pub fn load_model(ctx: NativeCallContext, spec: &str) -> RhaiResult<Model> {
        let s = session_of(&ctx)?;
        let vlm = Vlm::load(spec, s.dtype, &s.device).or_rhai()?;
        Ok(Model::new(vlm, spec))
    }

    /// `load_model(spec, #{ dtype: "bf16", device: "cpu", allow_non_finite: false })`: as
    /// `load_model(spec)`, with this model's dtype and device instead of the session's;
    /// `allow_non_finite` loads weights holding NaN or Inf (an error by default) for inspection.
    #[rhai_fn(name = "load_model", return_raw)]
    pub fn load_model_with(ctx: NativeCallContext, spec: &str, options: Map) -> RhaiResult<Model> {
        let s = session_of(&ctx)?;
        let o = Opts::new(
            "load_model",
            options,
            &["dtype", "device", "allow_non_finite"],
        )?;
        let dtype = match o.string("dtype")? {
            Some(d) => crate::script::parse_dtype(&d).or_rhai()?,
            None => s.dtype,
        };
        let device = match o.string("device")? {
            Some(d) => crate::script::parse_device(&d).or_rhai()?,
            None => s.device.clone(),
        };
        let mut files = crate::checkpoint::CheckpointFiles::resolve(spec).or_rhai()?;
        files.allow_non_finite = o.bool("allow_non_finite")?.unwrap_or(false);
        let vlm = Vlm::from_files(&files, dtype, &device).or_rhai()?;
        Ok(Model::new(vlm, spec))
    }

    /// The project's embedded tiny teacher (assets/tiny-teacher), trained on the synthetic world.
    #[rhai_fn(return_raw)]
    pub fn teacher(ctx: NativeCallContext) -> RhaiResult<Model> {
        let s = session_of(&ctx)?;
        let dir = crate::teacher::default_teacher_path().or_rhai()?;
        if !dir.join(crate::checkpoint::CONFIG).is_file() {
            return Err(runtime_error(format!(
                "the embedded tiny teacher is not at {}; build it with `{TINY_TEACHER_COMMAND}`",
                dir.display()
            )));
        }
        let spec = dir.to_string_lossy().to_string();
        let vlm = Vlm::load(&spec, s.dtype, &s.device).or_rhai()?;
        Ok(Model::new(vlm, "teacher()"))
    }

    /// `random_model(#{ config: "tinyllava-3.1b", mamba_layers: [0, 4], dtype, seed: 0 })`: a
    /// model with random weights at a config's dimensions (a preset or a `config.json` path),
    /// drawn directly on the session's device, in the session's dtype unless `dtype` says
    /// otherwise. For speed and memory at full size (`bench`): it has no tokenizer, so text
    /// prompts need a real checkpoint.
    #[rhai_fn(return_raw)]
    pub fn random_model(ctx: NativeCallContext, options: Map) -> RhaiResult<Model> {
        let s = session_of(&ctx)?;
        let mut options = options;
        if !options.contains_key("dtype") {
            options.insert("dtype".into(), Dynamic::from(s.dtype.as_str().to_string()));
        }
        let opts: RandomModelOptions = from_map("random_model", options)?;
        let vlm = crate::model::random::random_model(&opts, &s.device).or_rhai()?;
        Ok(Model::new(vlm, format!("random_model({})", opts.config)))
    }

    /// `m.generate_batch([#{ prompt, image, raw }, ...], #{ max_new_tokens: 64, temperature:
    /// 0.0, top_p: 1.0, seed: 0, stop_at_eos: true })`: the answers of several prompts generated
    /// together (templating as in `generate`), in order. Each greedy answer is the one
    /// `generate` gives that prompt alone.
    #[rhai_fn(pure, return_raw)]
    pub fn generate_batch(m: &mut Model, prompts: Array, options: Map) -> RhaiResult<Array> {
        let opts: GenerateOptions = from_map("generate_batch", options)?;
        let prompts = prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let map = p.try_cast::<Map>().ok_or_else(|| {
                    runtime_error(format!(
                        "generate_batch: prompt {i} is not a map #{{ prompt, image }}"
                    ))
                })?;
                let o = Opts::new("generate_batch", map, &["prompt", "image", "raw"])?;
                let (prompt, image) = prompt_opts(&o)?;
                Ok(TextPrompt { prompt, image })
            })
            .collect::<RhaiResult<Vec<_>>>()?;
        let out = m.vlm.generate_batch(&prompts, &opts).or_rhai()?;
        Ok(out.into_iter().map(|g| Dynamic::from(g.text)).collect())
    }

    /// The kind of each decoder layer, in order: "attn" or "mamba".
    #[rhai_fn(pure)]
    pub fn layers(m: &mut Model) -> Array {
        m.vlm
            .layer_kinds()
            .iter()
            .map(|k| Dynamic::from(k.name().to_string()))
            .collect()
    }

    /// A hybrid of this model (the model itself is left as it is):
    /// `m.hybrid(#{ ratio: 0.25 })` swaps MaTVLM's layers for that ratio (`placement:
    /// "upstream"` (default), "even", "first" or "last" picks others);
    /// `m.hybrid(#{ mamba_layers: [0, 4] })` swaps exactly those. The new Mamba-2 mixers start
    /// from the attention weights (`init: "attention"`, default) or fresh (`init: "random"`);
    /// `seed` (0) seeds the random parts; `copy_x`, `copy_b`, `copy_c`, `copy_out_proj`
    /// (true) and `carry_biases` (false) switch single parts of the initialisation.
    #[rhai_fn(pure, return_raw)]
    pub fn hybrid(m: &mut Model, options: Map) -> RhaiResult<Model> {
        let spec = from_map::<HybridRequest>("hybrid", options)?
            .spec()
            .or_rhai()?;
        let vlm = m.vlm.hybrid(&spec).or_rhai()?;
        let source = format!("{}.hybrid({:?})", m.source, spec.placement);
        Ok(Model::new(vlm, source))
    }

    /// Ids of the decoder layers that hold a Mamba-2 mixer.
    #[rhai_fn(pure)]
    pub fn mamba_layers(m: &mut Model) -> Array {
        m.vlm
            .mamba_layers()
            .iter()
            .map(|&i| Dynamic::from_int(i as INT))
            .collect()
    }

    /// The number of scalar parameters.
    #[rhai_fn(pure)]
    pub fn parameter_count(m: &mut Model) -> INT {
        m.vlm.parameter_count() as INT
    }

    /// Bytes of the inference cache for `batch` sequences of `seq_len` positions (KV cache of
    /// the attention layers, fixed-size states of the Mamba layers).
    #[rhai_fn(pure, return_raw)]
    pub fn cache_bytes(m: &mut Model, batch: INT, seq_len: INT) -> RhaiResult<INT> {
        let batch = to_usize(batch, "batch")?;
        let seq_len = to_usize(seq_len, "seq_len")?;
        Ok(m.vlm.cache_bytes(batch, seq_len) as INT)
    }

    /// The shape of every weight tensor, by its checkpoint name: `#{ name: [dims], ... }`.
    #[rhai_fn(pure)]
    pub fn shapes(m: &mut Model) -> Map {
        m.vlm
            .named_tensors()
            .into_iter()
            .map(|(name, t)| {
                let dims: Array = t
                    .dims()
                    .iter()
                    .map(|&d| Dynamic::from_int(d as INT))
                    .collect();
                (name.into(), Dynamic::from_array(dims))
            })
            .collect()
    }

    /// `m.hidden_states(#{ prompt, image, raw })`: the decoder's hidden states of a prompt, an
    /// array of `layers + 1` Tensors [tokens, hidden]: the input embeddings (image vectors
    /// spliced in), then each layer's output (the last before the final LayerNorm). Templating
    /// as in `logits`.
    #[rhai_fn(pure, return_raw)]
    pub fn hidden_states(m: &mut Model, options: Map) -> RhaiResult<Array> {
        let o = Opts::new("hidden_states", options, &["prompt", "image", "raw"])?;
        let (prompt, image) = prompt_opts(&o)?;
        let states = m
            .vlm
            .prompt_hidden_states(&prompt, image.as_deref())
            .or_rhai()?;
        Ok(states.into_iter().map(Dynamic::from).collect())
    }

    /// The dtype of the weights: "f32", "bf16" or "f16".
    #[rhai_fn(name = "dtype", pure)]
    pub fn model_dtype(m: &mut Model) -> String {
        m.vlm.dtype.as_str().to_string()
    }

    /// Next-token logits of a prompt, a Tensor [tokens, vocab]. The phi chat template is applied
    /// unless the prompt already starts with it.
    #[rhai_fn(name = "logits", pure, return_raw)]
    pub fn logits_prompt(m: &mut Model, prompt: &str) -> RhaiResult<Tensor> {
        let prompt = templated_prompt(prompt, false, false);
        m.vlm.prompt_logits(&prompt, None).or_rhai()
    }

    /// `m.logits(#{ prompt: "...", image: "file.png", raw: false })`: next-token logits
    /// [tokens, vocab] of a prompt about an optional image (the image counts as its image tokens).
    /// The phi chat template is applied (with `<image>` in front) unless the prompt already
    /// starts with it or `raw: true`; a raw prompt must hold `<image>` where the image goes.
    #[rhai_fn(name = "logits", pure, return_raw)]
    pub fn logits_opts(m: &mut Model, options: Map) -> RhaiResult<Tensor> {
        let o = Opts::new("logits", options, &["prompt", "image", "raw"])?;
        let (prompt, image) = prompt_opts(&o)?;
        m.vlm.prompt_logits(&prompt, image.as_deref()).or_rhai()
    }

    /// Generate an answer to a prompt (greedy, at most 64 new tokens). The phi chat template is
    /// applied unless the prompt already starts with it. Ctrl-C stops it after the current token.
    #[rhai_fn(name = "generate", pure, return_raw)]
    pub fn generate_prompt(
        ctx: NativeCallContext,
        m: &mut Model,
        prompt: &str,
    ) -> RhaiResult<String> {
        let mut map = Map::new();
        map.insert("prompt".into(), Dynamic::from(prompt.to_string()));
        generate_opts(ctx, m, map)
    }

    /// `m.generate(#{ prompt, image, max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0,
    /// stop_at_eos: true, stream: false, raw: false })`: the generated text. Temperature 0 is
    /// greedy; `seed` makes sampling reproducible; `stream: true` prints each piece as it comes.
    /// Templating as in `logits`. Ctrl-C stops it after the current token and returns the text
    /// so far.
    #[rhai_fn(name = "generate", pure, return_raw)]
    pub fn generate_opts(
        ctx: NativeCallContext,
        m: &mut Model,
        options: Map,
    ) -> RhaiResult<String> {
        let s = session_of(&ctx)?;
        let o = Opts::new(
            "generate",
            options,
            &[
                "prompt",
                "image",
                "raw",
                "max_new_tokens",
                "temperature",
                "top_p",
                "seed",
                "stop_at_eos",
                "stream",
            ],
        )?;
        let (prompt, image) = prompt_opts(&o)?;
        let defaults = GenerateOptions::default();
        let opts = GenerateOptions {
            max_new_tokens: o
                .count("max_new_tokens")?
                .unwrap_or(defaults.max_new_tokens),
            temperature: o.float("temperature")?.unwrap_or(defaults.temperature),
            top_p: o.float("top_p")?.unwrap_or(defaults.top_p),
            seed: o.count("seed")?.map_or(defaults.seed, |x| x as u64),
            stop_at_eos: o.bool("stop_at_eos")?.unwrap_or(defaults.stop_at_eos),
        };
        let stream = o.bool("stream")?.unwrap_or(false);
        let cancel = s.cancel.clone();
        let generation = m
            .vlm
            .generate(&prompt, image.as_deref(), &opts, &mut |piece| {
                if stream {
                    print!("{piece}");
                    let _ = std::io::stdout().flush();
                }
                !cancel.load(Ordering::SeqCst)
            })
            .or_rhai()?;
        if stream {
            println!();
        }
        Ok(generation.text)
    }

    /// Token ids of a text as the model's tokenizer splits it (no template applied); `<image>`
    /// becomes the image placeholder id -200.
    #[rhai_fn(pure, return_raw)]
    pub fn tokenize(m: &mut Model, text: &str) -> RhaiResult<Array> {
        let ids = m.vlm.tokenizer().or_rhai()?.encode_prompt(text).or_rhai()?;
        Ok(ids
            .into_iter()
            .map(|i| Dynamic::from_int(i as INT))
            .collect())
    }

    /// The text of token ids (an array of integers, or an integer tensor such as
    /// `logits.argmax()`).
    #[rhai_fn(pure, return_raw)]
    pub fn decode(m: &mut Model, ids: Dynamic) -> RhaiResult<String> {
        let ids: Vec<u32> = match ids.read_lock::<Tensor>() {
            Some(t) => t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>())
                .or_rhai()?,
            None => {
                let arr = ids.clone().into_array().map_err(|_| {
                    runtime_error(format!(
                        "decode: expected an array of ids or a tensor, not {}",
                        ids.type_name()
                    ))
                })?;
                arr.iter()
                    .map(|v| {
                        v.as_int()
                            .ok()
                            .and_then(|i| u32::try_from(i).ok())
                            .ok_or_else(|| {
                                runtime_error(format!("decode: `{v}` is not a token id"))
                            })
                    })
                    .collect::<RhaiResult<_>>()?
            }
        };
        m.vlm.tokenizer().or_rhai()?.decode(&ids).or_rhai()
    }

    /// Save in the TinyLLaVA layout (config, weights, tokenizer, preprocessor config) into
    /// folder `dir`, in the model's dtype, in one weights file.
    #[rhai_fn(name = "save", pure, return_raw)]
    pub fn save(m: &mut Model, dir: &str) -> RhaiResult<()> {
        m.vlm.save(Path::new(dir), m.vlm.dtype, None).or_rhai()
    }

    /// `m.save(dir, #{ dtype: "bf16", shard_mb: 2000 })`: save converted to `dtype`, weights split
    /// into shards of at most `shard_mb` megabytes.
    #[rhai_fn(name = "save", pure, return_raw)]
    pub fn save_with(m: &mut Model, dir: &str, options: Map) -> RhaiResult<()> {
        let o = Opts::new("save", options, &["dtype", "shard_mb"])?;
        let dtype = match o.string("dtype")? {
            Some(d) => crate::script::parse_dtype(&d).or_rhai()?,
            None => m.vlm.dtype,
        };
        let shard = o.count("shard_mb")?.map(|mb| mb * 1_000_000);
        m.vlm.save(Path::new(dir), dtype, shard).or_rhai()
    }

    /// Kind, layers, dtype, device and origin.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(m: &mut Model) -> String {
        m.to_string()
    }
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn to_debug(m: &mut Model) -> String {
        m.to_string()
    }
}
