//! The engine's attention kernels (src/kernels/attention.rs) against the generic attention on
//! the same GPU: a random decoder of a few layers prefills a left-padded batch into a cache made
//! for generation and decodes a few tokens, once with the kernel policy on (projections to the
//! cache in one launch, flash-decoding) and once with it off (tensor ops); the last position's
//! logits of every call must agree.
//!
//! Tolerance: f32 1e-4 of the logits' range (summation order only). 16-bit: the generic path
//! rounds the probabilities to the model dtype before the value product and rotates in the model
//! dtype, the kernels keep both in f32 and round once; over a few layers that is within 2e-2.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use matvlm::config::TinyLlavaConfig;
use matvlm::model::decoder::Decoder;
use matvlm::model::hybrid::LayerPlan;
use matvlm::model::mamba2::fused;
use matvlm::model::random::RandomWeights;

use super::{Paths, Report};

struct Shape {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    /// Fraction of the head rotated (Phi-2: 0.4 of 80 = 32 dims).
    rotary: f64,
}

/// Phi-2's heads (32 x 80, 32 rotary dims), grouped-query heads of 64 with full rotary, and the
/// largest head the decode kernel holds (128).
const SHAPES: &[Shape] = &[
    Shape {
        name: "attn-phi2-heads",
        hidden: 2560,
        heads: 32,
        kv_heads: 32,
        rotary: 0.4,
    },
    Shape {
        name: "attn-gqa-64",
        hidden: 512,
        heads: 8,
        kv_heads: 2,
        rotary: 1.0,
    },
    Shape {
        name: "attn-head-128",
        hidden: 256,
        heads: 2,
        kv_heads: 2,
        rotary: 0.5,
    },
];

/// Left padding of each row (the longest prompt has none) and the prompt length.
const LEFT_PAD: [usize; 3] = [0, 5, 29];
const PROMPT: usize = 61;
const DECODE_STEPS: usize = 5;

fn decoder(s: &Shape, dtype: DType, dev: &Device) -> matvlm::Result<Decoder> {
    let mut cfg = TinyLlavaConfig::tinyllava_3_1b().text_config;
    cfg.hidden_size = s.hidden;
    cfg.num_attention_heads = s.heads;
    cfg.num_key_value_heads = Some(s.kv_heads);
    cfg.partial_rotary_factor = Some(s.rotary);
    cfg.num_hidden_layers = 2;
    cfg.intermediate_size = 2 * s.hidden;
    cfg.vocab_size = 1000;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights::new(7, dev)?), dtype, dev.clone());
    Ok(Decoder::load(vb, &cfg, &LayerPlan::attention(2))?)
}

/// The last position's logits of the prefill and of each decode step, with the kernels on or off.
fn run(
    dec: &Decoder,
    dtype: DType,
    dev: &Device,
    kernels: bool,
) -> matvlm::Result<(Vec<Tensor>, Vec<&'static str>)> {
    fused::set_policy(fused::KernelPolicy {
        kernels,
        ..fused::policy()
    });
    let (out, paths) = fused::traced(|| -> matvlm::Result<Vec<Tensor>> {
        let b = LEFT_PAD.len();
        let ids: Vec<u32> = (0..b * PROMPT).map(|i| (i * 37 % 997) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, PROMPT), dev)?;
        let mut cache = dec.cache_for(PROMPT + DECODE_STEPS, LEFT_PAD.to_vec(), dtype, dev)?;
        let mut logits = vec![dec.forward_last(&dec.embed(&ids)?, &mut cache)?];
        for step in 0..DECODE_STEPS {
            let next: Vec<u32> = (0..b).map(|r| (step * 131 + r * 17) as u32).collect();
            let next = Tensor::from_vec(next, (b, 1), dev)?;
            logits.push(dec.forward_last(&dec.embed(&next)?, &mut cache)?);
        }
        Ok(logits)
    });
    fused::set_policy(fused::KernelPolicy {
        kernels: true,
        ..fused::policy()
    });
    Ok((out?, paths))
}

/// Compare the kernel path with the generic one for every shape in `dtype` on `gpu`.
pub fn check(dtype: DType, gpu: &Device, r: &mut Report) {
    for s in SHAPES {
        let result = (|| -> matvlm::Result<()> {
            let dec = decoder(s, dtype, gpu)?;
            let (fast, fast_paths) = run(&dec, dtype, gpu, true)?;
            let (slow, slow_paths) = run(&dec, dtype, gpu, false)?;
            let paths = Paths {
                gpu: fast_paths,
                cpu: slow_paths,
            };
            if !paths.gpu.contains(&"attention:kernel") && gpu.is_cuda() {
                r.error(s.name, dtype, "path", "the attention kernels did not run");
            }
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            for (i, (f, g)) in fast.iter().zip(&slow).enumerate() {
                let what = if i == 0 {
                    "prefill logits".to_string()
                } else {
                    format!("decode {i} logits")
                };
                r.compare_tol(s.name, dtype, &what, f, g, tol, "", &paths);
            }
            Ok(())
        })();
        if let Err(e) = result {
            r.error(s.name, dtype, "setup", e);
        }
    }
}
