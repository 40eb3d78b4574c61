//! The distillation losses with gradient checkpointing of the student's blocks: the gradients of
//! [`super::distill_loss_with`] computed without holding every block's activations at once.
//!
//! candle's autograd keeps every intermediate of a graph until backward, so a plain step holds
//! the activations of all decoder blocks together (attention scores, MLP inputs, the Mamba scan's
//! states). Here the blocks run forward without a graph, keeping only each block's input
//! `[B, T, hidden]`; the backward then goes block by block from the top: block `i` is recomputed
//! under autograd from its saved input (a fresh `Var`), and `sum(out * grad_out)` (the gradient
//! arriving from above held constant) is differentiated, which yields exactly the block's
//! parameter gradients and the gradient for the block below. Only one block's graph exists at a
//! time; the price is a second forward of every block.
//!
//! The top of the model (final LayerNorm, lm_head) and the logit terms go the same way, over
//! chunks of `chunk_positions` positions, so neither the student's full `[B, T, V]` logits nor an
//! f32 copy of them is ever made. Each layer-wise term is differentiated on its own right away
//! (the terms are summed, so their gradients add).

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::{
    hidden_term, valid_positions, DistillBatch, DistillLoss, DistillOutput, LogitSetup,
    TeacherOutputs,
};
use crate::model::decoder::{Capture, Captured, Decoder};
use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// Gradients summed over several backward passes, for a fixed list of `Var`s.
struct GradSum<'a> {
    vars: &'a [Tensor],
    sums: Vec<Option<Tensor>>,
}

impl<'a> GradSum<'a> {
    fn new(vars: &'a [Tensor]) -> Self {
        Self {
            vars,
            sums: vec![None; vars.len()],
        }
    }

    fn add(&mut self, store: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = store.get(var) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.detach(),
                });
            }
        }
        Ok(())
    }
}

/// Block `i` of `decoder` over a whole sequence from position 0 (a training forward).
fn block(decoder: &Decoder, i: usize, h: &Tensor) -> Result<Tensor> {
    let mut cache = decoder.new_layer_cache(i);
    decoder.block_forward(i, h, 0, &mut cache, &Capture::none(), &mut Captured::new())
}

/// `store`'s gradient of `x`, or zeros when nothing reached it.
fn grad_of(store: &GradStore, x: &Var) -> Result<Tensor> {
    Ok(match store.get(x.as_tensor()) {
        Some(g) => g.detach(),
        None => x.as_tensor().zeros_like()?,
    })
}

/// The distillation losses of `student` on one batch (their values in
/// [`DistillOutput::loss`], detached) and the gradients of the weighted loss with respect to
/// `vars` (the student's trainable tensors; `None` where no gradient reaches one), computed with
/// the blocks checkpointed as the module describes. The values and gradients are those of
/// [`super::distill_loss_with`] up to f32 summation order.
pub fn distill_grads_checkpointed(
    teach: &TeacherOutputs,
    student: &Vlm,
    batch: &DistillBatch,
    cfg: &DistillLoss,
    vars: &[Tensor],
) -> Result<(DistillOutput, Vec<Option<Tensor>>)> {
    let decoder = &student.decoder;
    let mut grads = GradSum::new(vars);
    let images = match batch.pixel_values {
        Some(p) => Some(student.encode_images(p)?),
        None => None,
    };
    let (embeds, lengths) = student.embed_inputs(batch.rows, images.as_ref())?;
    let (b, t, _) = embeds.dims3()?;
    let vocab = decoder.cfg.vocab_size;
    if teach.logits.dims() != [b, t, vocab] {
        return Err(Error::Invalid(format!(
            "teacher logits {:?} do not fit the student's [{b}, {t}, {vocab}] (another vocabulary?)",
            teach.logits.dims()
        )));
    }

    // Forward without graphs, keeping each block's input.
    let n = decoder.blocks.len();
    let mut inputs = Vec::with_capacity(n);
    let mut h = embeds.detach();
    for i in 0..n {
        let out = block(decoder, i, &h)?.detach();
        inputs.push(h);
        h = out;
    }

    // The top and the logit terms, chunk by chunk over positions.
    let device = embeds.device().clone();
    let setup = LogitSetup::new(&lengths, t, b, batch.labels, cfg, &device)?;
    let logit_inputs = setup.inputs();
    let chunk = match cfg.chunk_positions {
        0 => t,
        c => c.min(t),
    };
    let mut sums: Vec<(&'static str, f64, f64)> = Vec::new();
    let mut upstream = Vec::with_capacity(t.div_ceil(chunk.max(1)));
    let mut start = 0;
    while start < t {
        let len = chunk.min(t - start);
        let top = Var::from_tensor(&h.narrow(1, start, len)?)?;
        let normed = candle_core::Module::forward(&decoder.final_layernorm, top.as_tensor())?;
        let logits = candle_core::Module::forward(&decoder.lm_head, &normed)?;
        let terms = logit_inputs.terms_of_chunk(&logits, &teach.logits, start, cfg)?;
        let mut weighted = Tensor::zeros((), DType::F32, &device)?;
        for (k, (name, weight, value)) in terms.iter().enumerate() {
            let v = value.to_scalar::<f32>()? as f64;
            match sums.get_mut(k) {
                Some(entry) => entry.2 += v,
                None => sums.push((name, *weight, v)),
            }
            if *weight != 0.0 {
                weighted = (weighted + (value * *weight)?)?;
            }
        }
        let store = weighted.backward()?;
        grads.add(&store)?;
        upstream.push(grad_of(&store, &top)?);
        start += len;
    }
    drop(h);
    let mut grad_out = Tensor::cat(&upstream, 1)?;
    drop(upstream);

    // The blocks from the top, each recomputed under autograd from its saved input.
    while let Some(input) = inputs.pop() {
        let i = inputs.len();
        let x = Var::from_tensor(&input)?;
        drop(input);
        let out = block(decoder, i, x.as_tensor())?;
        let store = (out * &grad_out)?.sum_all()?.backward()?;
        grads.add(&store)?;
        grad_out = grad_of(&store, &x)?;
    }
    // The embeddings carry a graph only when something below the blocks trains (the connector).
    if embeds.track_op() {
        let store = (&embeds * &grad_out)?.sum_all()?.backward()?;
        grads.add(&store)?;
    }
    drop(grad_out);

    let mut terms: Vec<(String, f64)> = Vec::new();
    let mut total = 0f64;
    for (name, weight, value) in sums {
        terms.push((name.to_string(), value));
        total += weight * value;
    }
    if cfg.hidden != 0.0 && !student.mamba_layers().is_empty() {
        let valid = valid_positions(&lengths, t, &device)?;
        let mut sum = 0f64;
        for &i in student.mamba_layers() {
            let term = hidden_term(teach, student, i, &valid, cfg.hidden_kind)?;
            sum += term.to_scalar::<f32>()? as f64;
            grads.add(&(term * cfg.hidden)?.backward()?)?;
        }
        terms.push(("hidden".to_string(), sum));
        total += cfg.hidden * sum;
    }
    let output = DistillOutput {
        loss: Tensor::new(total as f32, &device)?,
        terms,
        positions: setup.n_pos,
    };
    Ok((output, grads.sums))
}
