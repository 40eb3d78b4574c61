//! The losses: next-token cross-entropy on the answers ([`shifted_cross_entropy`], supervised
//! training and perplexity) and single-stage distillation of a teacher into a hybrid (MaTVLM)
//! over one batch ([`distill_loss_with`]).
//!
//! The teacher runs without a graph (its tensors are plain, its outputs detached) and hands over
//! its logits and, for every Mamba layer of the student, that layer's input and output hidden
//! states. The student runs on the same inputs. Losses, each with its own weight:
//! - logit terms at temperature `T`: forward KL(teacher || student) (upstream: T = 1, summed over
//!   positions and vocabulary, divided by the batch size, times T^2), reverse KL, JSD, CE on the
//!   teacher's argmax, CE on the data labels;
//! - the layer-wise term: each student Mamba block is run on the *teacher's* input hidden state of
//!   that layer and compared with the teacher's output there (L2 norm, unsquared and unaveraged,
//!   as upstream; or MSE). The LayerNorm and MLP of the block are the teacher's, so this measures
//!   the mixer alone.

use candle_core::{DType, Tensor, D};

use crate::model::decoder::{Capture, Captured};
use crate::model::vlm::Vlm;
use crate::tokenize::IGNORE_INDEX;
use crate::{Error, Result};

mod checkpointed;
mod cross_entropy;

pub use checkpointed::distill_grads_checkpointed;
pub use cross_entropy::{shifted_cross_entropy, token_accuracy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenLoss {
    /// `||student - teacher||_2` over the whole batch tensor (upstream).
    L2Norm,
    /// Mean squared error over valid positions.
    Mse,
}

/// Which positions the logit terms cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Every non-padding position (upstream).
    All,
    /// Only positions whose next token is an answer token (labels != IGNORE).
    Answers,
}

/// Loss weights and options; the default is the released MaTVLM recipe (KL at T = 1 + L2).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillLoss {
    pub kl: f64,
    pub temperature: f64,
    pub reverse_kl: f64,
    pub jsd: f64,
    pub ce_teacher: f64,
    pub ce_labels: f64,
    pub hidden: f64,
    pub hidden_kind: HiddenLoss,
    pub positions: Positions,
    /// Compute the logit terms over this many positions at a time (0: all at once): the
    /// terms and their gradient come chunk by chunk, so no f32 copy of the whole `[B, T, V]`
    /// logits is held. The loss and its gradient are the same either way (up to f32 summation
    /// order).
    pub chunk_positions: usize,
}

impl Default for DistillLoss {
    fn default() -> Self {
        Self {
            kl: 1.0,
            temperature: 1.0,
            reverse_kl: 0.0,
            jsd: 0.0,
            ce_teacher: 0.0,
            ce_labels: 0.0,
            hidden: 1.0,
            hidden_kind: HiddenLoss::L2Norm,
            positions: Positions::All,
            chunk_positions: 0,
        }
    }
}

/// One batch as both models see it. `labels` (optional unless `ce_labels` or answer positions are
/// used) are aligned with the spliced sequence: `[B, T]` i64, [`IGNORE_INDEX`] at image and
/// prompt positions, where label `t` is the token at position `t`.
pub struct DistillBatch<'a> {
    pub rows: &'a [Vec<i64>],
    pub pixel_values: Option<&'a Tensor>,
    pub labels: Option<&'a Tensor>,
}

/// The weighted total (to backpropagate) and each raw term (for metrics).
pub struct DistillOutput {
    pub loss: Tensor,
    pub terms: Vec<(String, f64)>,
    /// Number of positions the logit terms covered.
    pub positions: usize,
}

/// Teacher outputs for one batch, detached: computed once, never part of a graph.
pub struct TeacherOutputs {
    pub logits: Tensor,
    pub hidden: Captured,
    pub lengths: Vec<usize>,
}

pub fn teacher_outputs(
    teacher: &Vlm,
    batch: &DistillBatch,
    layers: &[usize],
) -> Result<TeacherOutputs> {
    let images = match batch.pixel_values {
        Some(p) => Some(teacher.encode_images(p)?.detach()),
        None => None,
    };
    let (embeds, lengths) = teacher.embed_inputs(batch.rows, images.as_ref())?;
    let capture = Capture {
        hidden: true,
        layers: Some(layers.to_vec()),
        ..Capture::default()
    };
    let mut hidden = Captured::new();
    let mut cache = teacher.new_cache();
    let logits = teacher
        .decoder
        .forward(&embeds.detach(), &mut cache, &capture, &mut hidden)?
        .detach();
    let hidden = hidden.into_iter().map(|(k, v)| (k, v.detach())).collect();
    Ok(TeacherOutputs {
        logits,
        hidden,
        lengths,
    })
}

/// `[B, T]` f32 mask of the positions the logit terms use.
fn position_mask(
    lengths: &[usize],
    t: usize,
    labels: Option<&Tensor>,
    positions: Positions,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut mask = vec![0f32; lengths.len() * t];
    let labels: Option<Vec<Vec<i64>>> = match labels {
        Some(l) => Some(l.to_dtype(DType::I64)?.to_vec2()?),
        None => None,
    };
    for (b, &len) in lengths.iter().enumerate() {
        for pos in 0..len.min(t) {
            let keep = match positions {
                Positions::All => true,
                Positions::Answers => {
                    let l = labels.as_ref().ok_or_else(|| {
                        Error::Invalid("answer-only distillation needs labels".into())
                    })?;
                    l[b].get(pos + 1).is_some_and(|&x| x != IGNORE_INDEX)
                }
            };
            mask[b * t + pos] = f32::from(u8::from(keep));
        }
    }
    Ok(Tensor::from_vec(mask, (lengths.len(), t), device)?)
}

/// Sum over `[B, T]` of `x * mask`.
fn masked_sum(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok((x * mask)?.sum_all()?)
}

/// `sum_v p (log p - log q)` per position.
fn kl_per_position(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    Ok((log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?)
}

/// Negative log-probability of `targets` (`[B, T]` u32) under `log_probs` (`[B, T, V]`).
fn nll(log_probs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(log_probs
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?
        .neg()?)
}

/// Next-token targets of the data labels, `[B, T]` u32, and where they apply (`[B, T]` 0/1 f32):
/// position `t` predicts the label at `t + 1`; ignored labels and padding are left out.
fn label_targets(
    labels: &Tensor,
    lengths: &[usize],
    t: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let b = lengths.len();
    let next: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let mut targets = vec![0u32; b * t];
    let mut keep = vec![0f32; b * t];
    for (bi, row) in next.iter().enumerate() {
        for pos in 0..t.min(lengths[bi]) {
            if let Some(&l) = row.get(pos + 1) {
                if l != IGNORE_INDEX && l >= 0 {
                    targets[bi * t + pos] = l as u32;
                    keep[bi * t + pos] = 1.0;
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(targets, (b, t), device)?,
        Tensor::from_vec(keep, (b, t), device)?,
    ))
}

/// A logit term summed over chunks: name, weight, value.
type TermValue = (&'static str, f64, f64);

/// What the logit terms need besides the logits: the positions they cover, the normalisers
/// (batch size, positions covered, labelled positions) and the label targets.
struct LogitInputs<'a> {
    mask: &'a Tensor,
    batch: usize,
    n_pos: usize,
    /// Label targets and where they apply ([`label_targets`]), with the count of labelled
    /// positions in the whole sequence.
    ce_targets: Option<(&'a Tensor, &'a Tensor, usize)>,
}

impl LogitInputs<'_> {
    /// The logit terms of `cfg` (name, weight, value) over positions `start .. start + len`,
    /// each normalised as over the whole sequence, so that the terms of consecutive ranges add
    /// up to the terms of the sequence.
    fn terms(
        &self,
        s_logits: &Tensor,
        t_logits: &Tensor,
        start: usize,
        len: usize,
        cfg: &DistillLoss,
    ) -> Result<Vec<(&'static str, f64, Tensor)>> {
        let part = |x: &Tensor| x.narrow(1, start, len);
        let mask = part(self.mask)?;
        let s32 = part(s_logits)?.to_dtype(DType::F32)?;
        let t32 = part(t_logits)?.to_dtype(DType::F32)?;
        let temp = cfg.temperature;
        let ls_t = candle_nn::ops::log_softmax(&(&s32 / temp)?, D::Minus1)?;
        let lt_t = candle_nn::ops::log_softmax(&(&t32 / temp)?, D::Minus1)?;
        let mut out = Vec::new();
        // KL terms: summed over positions and vocabulary, divided by the batch size, times T^2.
        let batch_mean = |x: Tensor| -> Result<Tensor> {
            Ok((masked_sum(&x, &mask)? * (temp * temp / self.batch as f64))?)
        };
        if cfg.kl != 0.0 {
            out.push(("kl", cfg.kl, batch_mean(kl_per_position(&lt_t, &ls_t)?)?));
        }
        if cfg.reverse_kl != 0.0 {
            let v = batch_mean(kl_per_position(&ls_t, &lt_t)?)?;
            out.push(("reverse_kl", cfg.reverse_kl, v));
        }
        if cfg.jsd != 0.0 {
            let m = ((ls_t.exp()? + lt_t.exp()?)? * 0.5)?.log()?;
            let js = ((kl_per_position(&lt_t, &m)? + kl_per_position(&ls_t, &m)?)? * 0.5)?;
            out.push(("jsd", cfg.jsd, batch_mean(js)?));
        }
        if cfg.ce_teacher != 0.0 || cfg.ce_labels != 0.0 {
            let ls = candle_nn::ops::log_softmax(&s32, D::Minus1)?;
            if cfg.ce_teacher != 0.0 {
                let target = t32.argmax(D::Minus1)?;
                let v = (masked_sum(&nll(&ls, &target)?, &mask)? / (self.n_pos.max(1) as f64))?;
                out.push(("ce_teacher", cfg.ce_teacher, v));
            }
            if let Some((targets, keep, n)) = self.ce_targets {
                let ce =
                    (masked_sum(&nll(&ls, &part(targets)?)?, &part(keep)?)? / (n.max(1) as f64))?;
                out.push(("ce_labels", cfg.ce_labels, ce));
            }
        }
        Ok(out)
    }

    /// The logit terms over chunks of `chunk` positions: each chunk's terms and their gradient
    /// with respect to that chunk of the student's logits, computed on a detached copy of the
    /// chunk and freed before the next, so no f32 copy of the whole `[B, T, V]` logits (and
    /// none of their softmax intermediates) exists at once. Returns the terms summed over the
    /// chunks (name, weight, value) and the gradient of their weighted sum, `[B, T, V]` f32.
    fn chunked(
        &self,
        s_logits: &Tensor,
        t_logits: &Tensor,
        chunk: usize,
        cfg: &DistillLoss,
    ) -> Result<(Vec<TermValue>, Tensor)> {
        let t = s_logits.dim(1)?;
        let mut sums: Vec<TermValue> = Vec::new();
        let mut grads = Vec::new();
        let mut start = 0;
        while start < t {
            let len = chunk.min(t - start);
            let leaf = candle_core::Var::from_tensor(
                &s_logits
                    .narrow(1, start, len)?
                    .detach()
                    .to_dtype(DType::F32)?,
            )?;
            let terms = self.terms_of_chunk(leaf.as_tensor(), t_logits, start, cfg)?;
            let mut weighted = Tensor::zeros((), DType::F32, s_logits.device())?;
            for (i, (name, weight, value)) in terms.iter().enumerate() {
                let v = value.to_scalar::<f32>()? as f64;
                match sums.get_mut(i) {
                    Some(entry) => entry.2 += v,
                    None => sums.push((name, *weight, v)),
                }
                if *weight != 0.0 {
                    weighted = (weighted + (value * *weight)?)?;
                }
            }
            let g = weighted.backward()?;
            grads.push(match g.get(leaf.as_tensor()) {
                Some(g) => g.clone(),
                None => leaf.as_tensor().zeros_like()?,
            });
            start += len;
        }
        Ok((sums, Tensor::cat(&grads, 1)?))
    }

    /// [`Self::terms`] of the positions `start ..` that `s_part` (`[B, len, V]`, the student's
    /// logits already cut to them) covers.
    fn terms_of_chunk(
        &self,
        s_part: &Tensor,
        t_logits: &Tensor,
        start: usize,
        cfg: &DistillLoss,
    ) -> Result<Vec<(&'static str, f64, Tensor)>> {
        let len = s_part.dim(1)?;
        let mask = self.mask.narrow(1, start, len)?;
        let targets = match self.ce_targets {
            Some((tg, keep, n)) => {
                Some((tg.narrow(1, start, len)?, keep.narrow(1, start, len)?, n))
            }
            None => None,
        };
        let sub = LogitInputs {
            mask: &mask,
            batch: self.batch,
            n_pos: self.n_pos,
            ce_targets: targets.as_ref().map(|(tg, keep, n)| (tg, keep, *n)),
        };
        sub.terms(s_part, &t_logits.narrow(1, start, len)?, 0, len, cfg)
    }
}

/// The distillation losses of `student` against `teacher` on one batch.
pub fn distill_loss(
    teacher: &Vlm,
    student: &Vlm,
    batch: &DistillBatch,
    cfg: &DistillLoss,
) -> Result<DistillOutput> {
    let layers = student.mamba_layers();
    let teach = teacher_outputs(teacher, batch, layers)?;
    distill_loss_with(&teach, student, batch, cfg)
}

/// [`distill_loss`] from teacher outputs computed beforehand.
pub fn distill_loss_with(
    teach: &TeacherOutputs,
    student: &Vlm,
    batch: &DistillBatch,
    cfg: &DistillLoss,
) -> Result<DistillOutput> {
    let images = match batch.pixel_values {
        Some(p) => Some(student.encode_images(p)?),
        None => None,
    };
    let (embeds, lengths) = student.embed_inputs(batch.rows, images.as_ref())?;
    let mut cache = student.new_cache();
    let s_logits =
        student
            .decoder
            .forward(&embeds, &mut cache, &Capture::none(), &mut Captured::new())?;
    let (b, t, _) = s_logits.dims3()?;
    if teach.logits.dims() != s_logits.dims() {
        return Err(Error::Invalid(format!(
            "teacher logits {:?} and student logits {:?} differ in shape (another vocabulary?)",
            teach.logits.dims(),
            s_logits.dims()
        )));
    }
    let device = s_logits.device().clone();
    let setup = LogitSetup::new(&lengths, t, b, batch.labels, cfg, &device)?;
    let logits = setup.inputs();

    let mut total = Tensor::zeros((), DType::F32, &device)?;
    let mut terms = Vec::new();
    let chunk = if cfg.chunk_positions == 0 {
        t
    } else {
        cfg.chunk_positions
    };
    if chunk >= t {
        for (name, weight, value) in logits.terms(&s_logits, &teach.logits, 0, t, cfg)? {
            terms.push((name.to_string(), value.to_scalar::<f32>()? as f64));
            if weight != 0.0 {
                total = (&total + (value * weight)?)?;
            }
        }
    } else {
        let (values, grad) = logits.chunked(&s_logits, &teach.logits, chunk, cfg)?;
        let mut weighted = 0f64;
        for (name, weight, value) in values {
            terms.push((name.to_string(), value));
            weighted += weight * value;
        }
        // `sum(s_logits * G)` carries the chunks' gradient to the student; minus its own value
        // plus the terms' weighted sum gives the loss its value.
        let surrogate = (s_logits.to_dtype(DType::F32)? * grad)?.sum_all()?;
        let value = (surrogate.detach().neg()? + weighted)?;
        total = ((total + surrogate)? + value)?;
    }
    let mut add = |name: &str, weight: f64, value: Tensor| -> Result<()> {
        terms.push((name.to_string(), value.to_scalar::<f32>()? as f64));
        if weight != 0.0 {
            total = (&total + (value * weight)?)?;
        }
        Ok(())
    };
    if cfg.hidden != 0.0 && !student.mamba_layers().is_empty() {
        let valid = valid_positions(&lengths, t, &device)?;
        let mut sum = Tensor::zeros((), DType::F32, &device)?;
        for &i in student.mamba_layers() {
            sum = (sum + hidden_term(teach, student, i, &valid, cfg.hidden_kind)?)?;
        }
        add("hidden", cfg.hidden, sum)?;
    }
    Ok(DistillOutput {
        loss: total,
        terms,
        positions: setup.n_pos,
    })
}

/// `[B, T, 1]` f32: 1 at the real positions of rows of `lengths`, 0 at padding.
fn valid_positions(lengths: &[usize], t: usize, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        lengths
            .iter()
            .flat_map(|&len| (0..t).map(move |p| f32::from(u8::from(p < len))))
            .collect::<Vec<f32>>(),
        (lengths.len(), t, 1),
        device,
    )?)
}

/// The layer-wise term of Mamba layer `i`: the student's block run on the teacher's input
/// hidden state there, against the teacher's output, over the `valid` positions.
fn hidden_term(
    teach: &TeacherOutputs,
    student: &Vlm,
    i: usize,
    valid: &Tensor,
    kind: HiddenLoss,
) -> Result<Tensor> {
    let get = |k: String| -> Result<&Tensor> {
        teach
            .hidden
            .get(&k)
            .ok_or_else(|| Error::Invalid(format!("the teacher outputs lack `{k}` (layer {i})")))
    };
    let h_in = get(format!("layers.{i}.input"))?;
    let h_out = get(format!("layers.{i}.output"))?;
    let mut layer_cache = student.decoder.new_layer_cache(i);
    let ours = student.decoder.block_forward(
        i,
        h_in,
        0,
        &mut layer_cache,
        &Capture::none(),
        &mut Captured::new(),
    )?;
    let diff = (ours - h_out)?.to_dtype(DType::F32)?.broadcast_mul(valid)?;
    Ok(match kind {
        HiddenLoss::L2Norm => diff.sqr()?.sum_all()?.sqrt()?,
        HiddenLoss::Mse => {
            let n = valid.sum_all()?.to_scalar::<f32>()? as f64 * diff.dim(2)? as f64;
            (diff.sqr()?.sum_all()? / n.max(1.0))?
        }
    })
}

/// What the logit terms of one batch need, owned: the position mask, the normalisers and the
/// label targets ([`LogitInputs`] borrows them).
struct LogitSetup {
    mask: Tensor,
    batch: usize,
    n_pos: usize,
    ce: Option<(Tensor, Tensor, usize)>,
}

impl LogitSetup {
    fn new(
        lengths: &[usize],
        t: usize,
        batch: usize,
        labels: Option<&Tensor>,
        cfg: &DistillLoss,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let mask = position_mask(lengths, t, labels, cfg.positions, device)?;
        let n_pos = mask.sum_all()?.to_scalar::<f32>()? as usize;
        let ce = if cfg.ce_labels != 0.0 {
            let labels = labels.ok_or_else(|| Error::Invalid("ce_labels needs labels".into()))?;
            let (targets, keep) = label_targets(labels, lengths, t, device)?;
            let n = keep.sum_all()?.to_scalar::<f32>()? as usize;
            Some((targets, keep, n))
        } else {
            None
        };
        Ok(Self {
            mask,
            batch,
            n_pos,
            ce,
        })
    }

    fn inputs(&self) -> LogitInputs<'_> {
        LogitInputs {
            mask: &self.mask,
            batch: self.batch,
            n_pos: self.n_pos,
            ce_targets: self.ce.as_ref().map(|(tg, keep, n)| (tg, keep, *n)),
        }
    }
}
