//! The memory plan of a distillation step at any size: how many bytes each part of a step holds
//! at its peak, from the models' shapes (recorded, not allocated: [`ShapeRecorder`]) and the
//! step's settings, so that a batch size, `master_f32` or gradient checkpointing can be chosen
//! before a 3.1B teacher is loaded.
//!
//! Exact parts: the weights (teacher, student tensors the teacher does not share, f32 masters),
//! gradients and AdamW moments of the trainable set, the teacher outputs the step keeps (logits
//! and the hidden states of every Mamba layer). Estimated parts, from what candle's autograd
//! keeps per block (counted in `[B, T, hidden]` tensors; see [`LayerActivations`]): the
//! student's activations, all blocks at once without checkpointing, one block plus every
//! block's input with it; the logit terms' working set per chunk of positions. The estimate is
//! a model of the step, checked against the measured peak by `benches/distill_bench.rs`.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::distill::Trainable;
use crate::config::TinyLlavaConfig;
use crate::model::hybrid::placement::upstream_layers;
use crate::model::hybrid::LayerPlan;
use crate::model::mamba2::Mamba2Config;
use crate::model::shapes::ShapeRecorder;
use crate::model::vlm::Vlm;
use crate::Result;

/// What the plan is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryOptions {
    /// A preset name ([`TinyLlavaConfig::preset`]) or a TinyLLaVA `config.json`.
    pub config: String,
    /// Fraction of decoder layers turned into Mamba layers (upstream's placement).
    pub ratio: f64,
    pub trainable: Trainable,
    pub batch: usize,
    /// Decoder positions per sample (image tokens included).
    pub seq_len: usize,
    /// Dtype of both models: `"bf16"`, `"f16"` or `"f32"`.
    pub dtype: String,
    pub master_f32: bool,
    pub checkpoint_blocks: bool,
    /// Positions per chunk of the logit terms (0: all at once).
    pub chunk_positions: usize,
    /// The student's frozen tensors are the teacher's (a hybrid made from its teacher); off, the
    /// student holds its own copy of everything.
    pub shared_frozen: bool,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            config: TinyLlavaConfig::FULL_SIZE.into(),
            ratio: 0.25,
            trainable: Trainable::MixersConnector,
            batch: 8,
            seq_len: 828,
            dtype: "bf16".into(),
            master_f32: true,
            checkpoint_blocks: false,
            chunk_positions: 128,
            shared_frozen: true,
        }
    }
}

/// Tensors of `[B, T, hidden]` (in the model dtype) that candle's autograd keeps for the
/// backward of one decoder block, and the larger per-block tensors beside them. From the ops
/// of `Decoder::block_forward`: residual input, LayerNorm output, the mixer's projections and
/// intermediates, the MLP's `fc1` output and activation (4x wide each).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerActivations {
    /// Attention block: input, norm, q, k, v, rotated q and k, attention output (8) + MLP (8).
    pub attention_hidden: f64,
    /// Mamba block: input, norm, `in_proj` output (4), conv and activation of `x|B|C` (3 + 3),
    /// scan output, gate and norm (3) + MLP (8).
    pub mamba_hidden: f64,
    /// `[B, heads, T, T]` f32 tensors of eager attention: the scores, scaled, masked, the
    /// softmax, and its bf16 copy (half of one).
    pub attention_scores: f64,
    /// `[B, heads, T, chunk]` f32 tensors of the chunked scan (decay, C·B, product).
    pub scan_chunk: f64,
}

impl Default for LayerActivations {
    fn default() -> Self {
        Self {
            attention_hidden: 16.0,
            mamba_hidden: 22.0,
            attention_scores: 4.5,
            scan_chunk: 3.0,
        }
    }
}

/// One part of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPart {
    pub name: String,
    pub bytes: u64,
    /// Whether the figure follows from shapes alone (weights, states) or from the activation
    /// model.
    pub exact: bool,
}

/// The peak of a distillation step, part by part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub options: MemoryOptions,
    pub parts: Vec<MemoryPart>,
    pub total_bytes: u64,
    pub teacher_params: u64,
    pub student_params: u64,
    pub trainable_params: u64,
}

/// Parameter counts of the teacher and the hybrid at `opts`, and the trainable count.
fn counts(config: &TinyLlavaConfig, opts: &MemoryOptions) -> Result<(u64, u64, u64, u64)> {
    let text = &config.text_config;
    let n_layers = text.num_hidden_layers;
    let mamba = upstream_layers(opts.ratio, n_layers)?;
    let mixer =
        Mamba2Config::from_attention(text.hidden_size, text.num_attention_heads, text.head_dim());
    let build = |plan: LayerPlan| {
        ShapeRecorder::record(DType::F32, |vb| {
            let pre = crate::image::ImagePreprocessor::siglip(config.vision_config.image_size);
            Vlm::from_var_builder_with_plan(vb, config.clone(), None, pre, "memory plan", &plan)
        })
        .map(|(_, shapes)| shapes)
    };
    let teacher = build(LayerPlan::hybrid(n_layers, &[], mixer.clone())?)?;
    let student = build(LayerPlan::hybrid(n_layers, &mamba, mixer)?)?;
    let selection = opts.trainable.selection();
    let size = |s: &Vec<usize>| s.iter().product::<usize>() as u64;
    let total = |m: &std::collections::BTreeMap<String, Vec<usize>>| m.values().map(size).sum();
    let trainable = student
        .iter()
        .filter(|(n, _)| selection.matches(n))
        .map(|(_, s)| size(s))
        .sum();
    // What the student holds apart from the teacher: its mixers always (they are new tensors),
    // its trainable copies, and everything when nothing is shared.
    let own = if opts.shared_frozen {
        student
            .iter()
            .filter(|(n, s)| teacher.get(*n) != Some(s) || selection.matches(n))
            .map(|(_, s)| size(s))
            .sum()
    } else {
        total(&student)
    };
    Ok((total(&teacher), total(&student), trainable, own))
}

impl MemoryPlan {
    /// The plan of one distillation step per `opts`, with the default activation model.
    pub fn distill(opts: &MemoryOptions) -> Result<MemoryPlan> {
        Self::distill_with(opts, &LayerActivations::default())
    }

    pub fn distill_with(opts: &MemoryOptions, act: &LayerActivations) -> Result<MemoryPlan> {
        let config = TinyLlavaConfig::preset_or_file(&opts.config)?;
        let dtype = crate::device::parse_dtype(&opts.dtype)?;
        let e = dtype.size_in_bytes() as u64;
        let text = &config.text_config;
        let (b, t) = (opts.batch as u64, opts.seq_len as u64);
        let (h, v) = (text.hidden_size as u64, text.vocab_size as u64);
        let heads = text.num_attention_heads as u64;
        let n_layers = text.num_hidden_layers as u64;
        let n_mamba = upstream_layers(opts.ratio, text.num_hidden_layers)?.len() as u64;
        let n_attn = n_layers - n_mamba;
        let mixer = Mamba2Config::from_attention(
            text.hidden_size,
            text.num_attention_heads,
            text.head_dim(),
        );
        let chunk = (mixer.chunk_size as u64).min(t);
        let (teacher_p, student_p, train_p, own_p) = counts(&config, opts)?;
        let master = opts.master_f32 && dtype != DType::F32;
        let bth = b * t * h * e;
        let f32_ = 4u64;

        let mut parts: Vec<MemoryPart> = Vec::new();
        let mut add = |name: &str, bytes: u64, exact: bool| {
            parts.push(MemoryPart {
                name: name.to_string(),
                bytes,
                exact,
            })
        };
        add("teacher weights", teacher_p * e, true);
        add("student weights (own)", own_p * e, true);
        if master {
            add("master weights f32", train_p * f32_, true);
            // Each step's model reads the masters cast to the model dtype.
            add("casts of the master weights", train_p * e, true);
        }
        let grad_bytes = train_p * if master { f32_ } else { e };
        add("gradients of the trainable set", grad_bytes, true);
        add("AdamW moments f32", train_p * 2 * f32_, true);
        add("teacher logits", b * t * v * e, true);
        add(
            "teacher hidden states (Mamba layers)",
            2 * n_mamba * bth,
            true,
        );

        let attn_layer = (act.attention_hidden * bth as f64) as u64
            + (act.attention_scores * (b * heads * t * t * f32_) as f64) as u64;
        let mamba_layer = (act.mamba_hidden * bth as f64) as u64
            + (act.scan_chunk * (b * heads * t * chunk * f32_) as f64) as u64;
        let chunk_pos = match opts.chunk_positions {
            0 => t,
            c => (c as u64).min(t),
        };
        // Per chunk: the student's and teacher's f32 logits, two log-softmaxes, an exp and a
        // product (6), in flight while the chunk's backward runs.
        let logit_chunk = 6 * b * chunk_pos * v * f32_;
        if opts.checkpoint_blocks {
            add("block inputs (checkpoints)", n_layers * bth, true);
            add(
                "one block's activations",
                attn_layer.max(mamba_layer),
                false,
            );
            add(
                "logit terms, one chunk",
                logit_chunk + b * chunk_pos * v * e,
                false,
            );
        } else {
            add(
                "student activations, all blocks",
                n_attn * attn_layer + n_mamba * mamba_layer,
                false,
            );
            add("student logits", b * t * v * e, true);
            if chunk_pos < t {
                add("gradient of the logits f32", b * t * v * f32_, true);
            }
            add("logit terms, one chunk", logit_chunk, false);
        }
        // The layer-wise term runs one student Mamba block per Mamba layer on the teacher's
        // input there; each keeps its graph until the backward (all of them without
        // checkpointing, one at a time with it).
        let layerwise = if opts.checkpoint_blocks {
            mamba_layer
        } else {
            n_mamba * mamba_layer
        };
        add("layer-wise term activations", layerwise, false);

        let total_bytes = parts.iter().map(|p| p.bytes).sum();
        Ok(MemoryPlan {
            options: opts.clone(),
            parts,
            total_bytes,
            teacher_params: teacher_p,
            student_params: student_p,
            trainable_params: train_p,
        })
    }

    /// The plan as aligned text, one part per line, in GiB.
    pub fn table(&self) -> String {
        let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
        let o = &self.options;
        let mut out = format!(
            "distillation step at batch {} x {} ({}, master_f32 {}, checkpoint_blocks {}, \
             chunk {}): teacher {:.2}B, student {:.2}B, trainable {:.1}M parameters\n",
            o.batch,
            o.seq_len,
            o.dtype,
            o.master_f32,
            o.checkpoint_blocks,
            o.chunk_positions,
            self.teacher_params as f64 / 1e9,
            self.student_params as f64 / 1e9,
            self.trainable_params as f64 / 1e6
        );
        for p in &self.parts {
            let kind = if p.exact { "" } else { " (estimate)" };
            out.push_str(&format!(
                "  {:<40} {:>8.2} GiB{kind}\n",
                p.name,
                gib(p.bytes)
            ));
        }
        out.push_str(&format!(
            "  {:<40} {:>8.2} GiB\n",
            "total",
            gib(self.total_bytes)
        ));
        out
    }
}
