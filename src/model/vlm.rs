//! The whole VLM: vision tower -> connector -> image vectors spliced into the decoder's input.
//!
//! Mirrors TinyLLaVA Factory's `TinyLlavaForConditionalGeneration` and its checkpoint layout:
//! `vision_tower._vision_tower.vision_model.*`, `connector._connector.*`, `language_model.*`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::cache::Cache;
use super::connector::Connector;
use super::decoder::{Capture, Captured, Decoder, Mixer};
use super::hybrid::{format, HybridSpec, LayerPlan, MixerKind};
use super::layers::Activation;
use super::siglip::SiglipVisionTower;
use crate::checkpoint::CheckpointFiles;
use crate::config::{PreprocessorConfig, TinyLlavaConfig};
use crate::error::classify_candle;
use crate::image::ImagePreprocessor;
use crate::tokenize::{PromptTokenizer, IMAGE_TOKEN};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Vlm {
    pub config: TinyLlavaConfig,
    pub vision: SiglipVisionTower,
    pub connector: Connector,
    pub decoder: Decoder,
    pub tokenizer: Option<PromptTokenizer>,
    pub preprocessor: ImagePreprocessor,
    pub device: Device,
    pub dtype: DType,
}

impl Vlm {
    /// Load a TinyLLaVA checkpoint from a folder or a hub id (see [`CheckpointFiles::resolve`]).
    pub fn load(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        let files = CheckpointFiles::resolve(spec)?;
        Self::from_files(&files, dtype, device)
    }

    pub fn from_files(files: &CheckpointFiles, dtype: DType, device: &Device) -> Result<Self> {
        let config = TinyLlavaConfig::from_file(&files.config)?;
        let tokenizer = match &files.tokenizer {
            Some(p) => Some(PromptTokenizer::from_file(p)?),
            None => None,
        };
        let preprocessor = match &files.preprocessor {
            Some(p) => {
                ImagePreprocessor::from_config(&crate::io::read_json::<PreprocessorConfig>(p)?)?
            }
            None => ImagePreprocessor::from_config(&PreprocessorConfig::siglip_default(
                config.vision_config.image_size,
            ))?,
        };
        let vb = files.var_builder(dtype, device)?;
        let n_layers = config.text_config.num_hidden_layers;
        let plan = match &files.mamba_config {
            Some(p) => format::read_plan(p, |k| vb.contains_tensor(k), n_layers)?,
            None => LayerPlan::attention(n_layers),
        };
        Self::from_var_builder_with_plan(
            vb,
            config,
            tokenizer,
            preprocessor,
            &files.location(),
            &plan,
        )
    }

    /// Build a teacher (every layer attention) from any VarBuilder positioned at the checkpoint
    /// root (`location` names the source in errors).
    pub fn from_var_builder(
        vb: VarBuilder,
        config: TinyLlavaConfig,
        tokenizer: Option<PromptTokenizer>,
        preprocessor: ImagePreprocessor,
        location: &str,
    ) -> Result<Self> {
        let plan = LayerPlan::attention(config.text_config.num_hidden_layers);
        Self::from_var_builder_with_plan(vb, config, tokenizer, preprocessor, location, &plan)
    }

    /// [`Vlm::from_var_builder`] with the decoder's mixers given by `plan`.
    pub fn from_var_builder_with_plan(
        vb: VarBuilder,
        config: TinyLlavaConfig,
        tokenizer: Option<PromptTokenizer>,
        preprocessor: ImagePreprocessor,
        location: &str,
        plan: &LayerPlan,
    ) -> Result<Self> {
        // Check the configured activations up front so that the error is a typed one.
        Activation::from_hf(&config.text_config.hidden_act)?;
        Activation::from_hf(&config.vision_config.hidden_act)?;
        let classify = |e| classify_candle(e, location);
        let reclassify = |e: Error| match e {
            Error::Candle(c) => classify_candle(c, location),
            other => other,
        };
        let vision = SiglipVisionTower::load(
            vb.pp("vision_tower").pp("_vision_tower").pp("vision_model"),
            &config.vision_config,
            config.vision_layers_used()?,
        )
        .map_err(reclassify)?;
        let connector = Connector::load(
            vb.pp("connector").pp("_connector"),
            &config.connector_type,
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
        )
        .map_err(reclassify)?;
        let decoder =
            Decoder::load(vb.pp("language_model"), &config.text_config, plan).map_err(classify)?;
        Ok(Self {
            device: vb.device().clone(),
            dtype: vb.dtype(),
            config,
            vision,
            connector,
            decoder,
            tokenizer,
            preprocessor,
        })
    }

    pub fn tokenizer(&self) -> Result<&PromptTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::NotFound("this checkpoint has no tokenizer.json".into()))
    }

    /// Image vectors for the decoder: `[B, N_img, hidden]` from pixel values `[B, 3, H, W]`.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixel_values = pixel_values.to_dtype(self.dtype)?;
        let feats = self.vision.forward(&pixel_values)?;
        let feats = if self.config.vision_feature_select_strategy == "patch" {
            let n = feats.dim(1)?;
            feats.narrow(1, 1, n - 1)?
        } else {
            feats
        };
        self.connector.forward(&feats)
    }

    /// Preprocess an image file into pixel values `[1, 3, H, W]`.
    pub fn pixel_values(&self, image_path: &Path) -> Result<Tensor> {
        let img = crate::image::load_image(image_path)?;
        Ok(self
            .preprocessor
            .preprocess(&img, &self.device, self.dtype)?
            .unsqueeze(0)?)
    }

    /// Input embeddings for a batch of token-id rows (with [`IMAGE_TOKEN`] placeholders) and the
    /// image vectors `[N_images, N_img_tokens, hidden]` consumed in order of appearance. Rows are
    /// padded on the right with zeros, as TinyLLaVA does; returns the embeddings and each row's
    /// true length.
    pub fn embed_inputs(
        &self,
        rows: &[Vec<i64>],
        images: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<usize>)> {
        self.embed_padded(rows, images, false)
    }

    /// [`Vlm::embed_inputs`] with rows padded on the left, as generation needs them: every
    /// row's last prompt token sits at the same position, so one step extends all rows.
    pub fn embed_inputs_left_padded(
        &self,
        rows: &[Vec<i64>],
        images: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<usize>)> {
        self.embed_padded(rows, images, true)
    }

    fn embed_padded(
        &self,
        rows: &[Vec<i64>],
        images: Option<&Tensor>,
        left: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let n_images = match images {
            Some(t) => t.dim(0)?,
            None => 0,
        };
        let n_markers: usize = rows
            .iter()
            .map(|r| r.iter().filter(|&&t| t == IMAGE_TOKEN).count())
            .sum();
        if n_markers != n_images {
            return Err(Error::Prompt(format!(
                "the input has {n_markers} image placeholder(s) but {n_images} image(s) were given"
            )));
        }
        // Every output position is one row of a single table [text embeddings; image vectors;
        // a zero row for padding], gathered with one index_select: a handful of ops per batch
        // instead of several per row, which is what bounds a training step on small models.
        let vocab = self.decoder.cfg.vocab_size as i64;
        let n_text: usize = rows
            .iter()
            .map(|r| r.iter().filter(|&&t| t != IMAGE_TOKEN).count())
            .sum();
        let (n_img_tokens, image_rows) = match images {
            Some(t) => {
                let (n, k, h) = t.dims3()?;
                (k, Some(t.reshape((n * k, h))?))
            }
            None => (0, None),
        };
        let image_base = n_text;
        let pad_index = n_text + n_images * n_img_tokens;
        let mut text_ids: Vec<u32> = Vec::with_capacity(n_text);
        let mut positions: Vec<Vec<u32>> = Vec::with_capacity(rows.len());
        let mut next_image = 0usize;
        for row in rows {
            let mut pos = Vec::with_capacity(row.len() + n_img_tokens);
            for &id in row {
                if id == IMAGE_TOKEN {
                    let first = image_base + next_image * n_img_tokens;
                    pos.extend((first..first + n_img_tokens).map(|i| i as u32));
                    next_image += 1;
                } else if id < 0 || id >= vocab {
                    return Err(Error::Prompt(format!(
                        "token id {id} is outside the vocabulary (size {vocab})"
                    )));
                } else {
                    pos.push(text_ids.len() as u32);
                    text_ids.push(id as u32);
                }
            }
            if pos.is_empty() {
                return Err(Error::Prompt("an input row is empty".into()));
            }
            positions.push(pos);
        }
        let lens: Vec<usize> = positions.iter().map(Vec::len).collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let hidden = self.decoder.cfg.hidden_size;
        let mut table: Vec<Tensor> = Vec::with_capacity(3);
        if !text_ids.is_empty() {
            let ids = Tensor::new(text_ids.as_slice(), &self.device)?.unsqueeze(0)?;
            table.push(self.decoder.embed(&ids)?.squeeze(0)?);
        }
        let dtype = table.first().map_or(self.dtype, Tensor::dtype);
        if let Some(img) = image_rows {
            table.push(img.to_dtype(dtype)?);
        }
        table.push(Tensor::zeros((1, hidden), dtype, &self.device)?);
        let table = Tensor::cat(&table, 0)?;
        let mut index: Vec<u32> = Vec::with_capacity(rows.len() * max);
        for pos in &positions {
            let pad = std::iter::repeat_n(pad_index as u32, max - pos.len());
            if left {
                index.extend(pad.clone());
            }
            index.extend_from_slice(pos);
            if !left {
                index.extend(pad);
            }
        }
        let index = Tensor::new(index.as_slice(), &self.device)?;
        let embeds = table
            .index_select(&index, 0)?
            .reshape((rows.len(), max, hidden))?;
        Ok((embeds, lens))
    }

    /// Logits `[B, T, vocab]` for token rows and optional pixel values, from an empty cache.
    pub fn forward(
        &self,
        rows: &[Vec<i64>],
        pixel_values: Option<&Tensor>,
        capture: &Capture,
    ) -> Result<(Tensor, Captured)> {
        let images = match pixel_values {
            Some(p) => Some(self.encode_images(p)?),
            None => None,
        };
        let (embeds, _) = self.embed_inputs(rows, images.as_ref())?;
        let mut cache = self.decoder.new_cache();
        let mut captured = Captured::new();
        let logits = self
            .decoder
            .forward(&embeds, &mut cache, capture, &mut captured)?;
        Ok((logits, captured))
    }

    /// Continue from `cache` with input embeddings (prefill or one decode step).
    pub fn step_embeds(&self, embeds: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut captured = Captured::new();
        self.decoder
            .forward(embeds, cache, &Capture::none(), &mut captured)
    }

    /// The same architecture built over other tensors (same names and shapes), e.g. the map
    /// `train::ParamSet::select` returns, whose trainable entries are `Var`s.
    pub fn rebuilt(&self, tensors: std::collections::HashMap<String, Tensor>) -> Result<Vlm> {
        let vb = VarBuilder::from_tensors(tensors, self.dtype, &self.device);
        Self::from_var_builder_with_plan(
            vb,
            self.config.clone(),
            self.tokenizer.clone(),
            self.preprocessor.clone(),
            "rebuilt model",
            self.decoder.plan(),
        )
    }

    /// Every parameter under its TinyLLaVA checkpoint name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let prefixed = |out: &mut Vec<(String, Tensor)>, prefix: &str, v: Vec<(String, Tensor)>| {
            out.extend(v.into_iter().map(|(k, t)| (format!("{prefix}.{k}"), t)));
        };
        prefixed(
            &mut out,
            "vision_tower._vision_tower.vision_model",
            self.vision.named_tensors(),
        );
        prefixed(
            &mut out,
            "connector._connector",
            self.connector.named_tensors(),
        );
        prefixed(&mut out, "language_model", self.decoder.named_tensors());
        out
    }

    /// Save in the TinyLLaVA layout: config.json, weights (sharded above `max_shard_bytes`),
    /// tokenizer.json and preprocessor_config.json. Every file is written atomically. Weights are
    /// converted to `dtype`.
    pub fn save(&self, dir: &Path, dtype: DType, max_shard_bytes: Option<usize>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: std::collections::BTreeMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        crate::checkpoint::save_safetensors(dir, &tensors, max_shard_bytes)?;
        crate::io::write_json(&dir.join(crate::checkpoint::CONFIG), &self.config)?;
        crate::io::write_json(
            &dir.join(crate::checkpoint::PREPROCESSOR),
            &self.preprocessor.to_config(),
        )?;
        if let Some(tok) = &self.tokenizer {
            let json = tok
                .inner()
                .to_string(true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            crate::io::write_atomic(&dir.join(crate::checkpoint::TOKENIZER), json.as_bytes())?;
        }
        format::write_plan(dir, &self.config.text_config, self.decoder.plan())
    }

    pub fn new_cache(&self) -> Cache {
        self.decoder.new_cache()
    }

    /// The mixer kind of each decoder layer.
    pub fn layer_kinds(&self) -> &[MixerKind] {
        self.decoder.layer_kinds()
    }

    /// A hybrid of this model: the layers chosen by `spec.placement` get a Mamba-2 mixer
    /// initialised per `spec.init`; every other weight is shared with `self` (tensors are
    /// reference-counted, nothing is copied). Layers that are Mamba already stay as they are.
    pub fn hybrid(&self, spec: &HybridSpec) -> Result<Vlm> {
        let ids = spec.placement.layers(self.decoder.blocks.len())?;
        let decoder = self.decoder.hybrid(
            &ids,
            spec.mamba.as_ref(),
            &spec.init,
            self.dtype,
            &self.device,
        )?;
        Ok(Vlm {
            decoder,
            ..self.clone()
        })
    }

    /// Ids of the decoder layers holding a Mamba-2 mixer, ascending.
    pub fn mamba_layers(&self) -> &[usize] {
        self.decoder.mamba_layers()
    }

    /// The mixer config shared by the Mamba layers (`None` for a teacher).
    pub fn mamba_config(&self) -> Option<&crate::model::mamba2::Mamba2Config> {
        self.decoder.plan().mixer()
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Bytes the inference cache holds for `batch` sequences of `seq_len` positions: keys and
    /// values (model dtype) for attention layers; conv and SSM states (f32 for half models, as
    /// the mixer keeps them) for Mamba layers, independent of `seq_len`.
    pub fn cache_bytes(&self, batch: usize, seq_len: usize) -> usize {
        let elt = self.dtype.size_in_bytes();
        let state_elt = crate::model::mamba2::compute_dtype(self.dtype).size_in_bytes();
        self.decoder
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Attention(a) => 2 * batch * seq_len * a.num_kv_heads * a.head_dim * elt,
                Mixer::Mamba2(m) => {
                    let c = &m.cfg;
                    batch
                        * (c.conv_dim() * c.d_conv + c.n_heads * c.head_dim * c.d_state)
                        * state_elt
                }
            })
            .sum()
    }
}
