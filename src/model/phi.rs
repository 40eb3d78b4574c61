//! The Phi (Phi-2) attention mixer and MLP, with HF `PhiForCausalLM` weight names.
//!
//! A Phi block is parallel: `h = x + Attn(LN(x)) + MLP(LN(x))` with one shared LayerNorm. The
//! block itself lives in [`super::decoder`], because a hybrid swaps only the attention for a
//! Mamba-2 mixer and keeps the LayerNorm and the MLP.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::layers::{softmax_last_dim, upcast, Activation, Linear};
use crate::config::PhiConfig;

/// Rotary tables for the first `rotary_dim` dimensions of each head (NeoX rotate-half form).
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    pub rotary_dim: usize,
}

impl Rotary {
    pub fn new(cfg: &PhiConfig) -> Self {
        let dim = cfg.rotary_dim();
        let theta = cfg.rope_theta();
        let inv_freq = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        Self {
            inv_freq,
            rotary_dim: dim,
        }
    }

    /// cos and sin, each `[T, rotary_dim]`, for positions `offset .. offset + len`.
    pub fn tables(&self, offset: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(len * half * 2);
        for p in offset..offset + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            freqs.extend_from_slice(&row);
            freqs.extend_from_slice(&row);
        }
        let freqs = Tensor::from_vec(freqs, (len, 2 * half), device)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Rotate the leading `rotary_dim` dims of `x: [B, H, T, Dh]`; the rest passes through.
    /// `cos` and `sin` (`[T, rotary_dim]`) must be in `x`'s dtype.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let rot = self.rotary_dim;
        if rot == 0 {
            return Ok(x.clone());
        }
        let x_rot = x.narrow(D::Minus1, 0, rot)?;
        let x1 = x_rot.narrow(D::Minus1, 0, rot / 2)?;
        let x2 = x_rot.narrow(D::Minus1, rot / 2, rot / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (x_rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        if rot == head_dim {
            Ok(out)
        } else {
            let pass = x.narrow(D::Minus1, rot, head_dim - rot)?;
            Tensor::cat(&[&out, &pass], D::Minus1)
        }
    }
}

/// Keys and values of one attention layer, `[B, H_kv, capacity, Dh]` each in the model dtype,
/// of which the first `len` positions are written.
///
/// A cache made for generation is allocated once at its final capacity and each step writes its
/// keys in place; one grown by appending copies (training and probes write once, from empty).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions.
    pub fn with_capacity(
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, kv_heads, capacity, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            len: 0,
        })
    }

    /// A cache holding exactly `k` and `v` (`[B, H_kv, T, Dh]`).
    pub fn from_keys(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        Ok(Self { k, v, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }
    /// Bytes allocated (the whole capacity).
    pub fn bytes(&self) -> usize {
        (self.k.elem_count() + self.v.elem_count()) * self.k.dtype().size_in_bytes()
    }
    /// Keys of the written positions `[B, H_kv, len, Dh]` (a view).
    pub fn keys(&self) -> Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }
    /// Values of the written positions `[B, H_kv, len, Dh]` (a view).
    pub fn values(&self) -> Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }

    /// The whole key and value buffers `[B, H_kv, capacity, Dh]`, for a kernel that writes
    /// positions in place (then [`Self::advance`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn buffers(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// Count `t` more positions as written (by a kernel, into [`Self::buffers`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Add the keys and values of the next `T` positions (`[B, H_kv, T, Dh]`) and return views of
    /// every position written so far. In place when there is room and no gradient flows through
    /// the new keys (an in-place write has no backward).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let in_place = self.len + t <= self.capacity() && !k.track_op() && !v.track_op();
        if in_place {
            self.k.slice_set(&k.contiguous()?, 2, self.len)?;
            self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        } else if self.len == 0 {
            self.k = k.clone();
            self.v = v.clone();
        } else {
            self.k = Tensor::cat(&[&self.keys()?, k], 2)?;
            self.v = Tensor::cat(&[&self.values()?, v], 2)?;
        }
        self.len += t;
        Ok((self.keys()?, self.values()?))
    }
}

/// What every attention layer of one forward call shares, made once per call (not per layer).
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    /// Rotary `cos` and `sin` `[T, rotary_dim]` for this call's positions, in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive f32 mask broadcastable to the scores `[B, H, T, T_total]`: causal for a prefill,
    /// key padding for left-padded rows; `None` for one unpadded token.
    pub mask: Option<Tensor>,
    /// u32 `[B]`: each row's first real key (its left padding), for the decode kernel, which
    /// skips the padding instead of masking it; `None` when no row is padded.
    pub key_start: Option<Tensor>,
}

/// Phi self-attention: q/k/v/dense with biases, partial rotary, causal softmax attention.
#[derive(Debug, Clone)]
pub struct PhiAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub dense: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl PhiAttention {
    pub fn load(vb: VarBuilder, cfg: &PhiConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        if cfg.qk_layernorm {
            candle_core::bail!("Phi qk_layernorm = true is not supported");
        }
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, nh * hd, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, nkv * hd, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, nkv * hd, true)?,
            dense: Linear::load(vb.pp("dense"), nh * hd, h, true)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x: [B, T, hidden]` at the positions `inputs` was made for. Appends to `cache` and
    /// returns the output and, when `want_weights`, the attention probabilities
    /// `[B, H, T, T_total]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        inputs: &AttentionInputs,
        cache: &mut Option<KvCache>,
        want_weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let (out, probs) =
            match self.engine_step(&q, &k, &v, rotary, inputs, cache, want_weights)? {
                Some(out) => (out, None),
                None => self.generic_step(&q, &k, &v, rotary, inputs, cache, want_weights)?,
            };
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        Ok((self.dense.forward(&out)?, probs))
    }

    /// Attention from the projections `q, k, v: [B, T, heads * Dh]` with tensor ops (any device,
    /// any cache, under autograd): the output `[B, H, T, Dh]` and, when asked, the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn generic_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        inputs: &AttentionInputs,
        cache: &mut Option<KvCache>,
        want_weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, _) = q.dims3()?;
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(q, self.num_heads)?;
        let k = heads(k, self.num_kv_heads)?;
        let v = heads(v, self.num_kv_heads)?;
        let q = rotary.apply(&q, &inputs.cos, &inputs.sin)?;
        let k = rotary.apply(&k, &inputs.cos, &inputs.sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => {
                *cache = Some(KvCache::from_keys(k.clone(), v.clone())?);
                (k, v)
            }
        };
        self.attend(&q, &k, &v, inputs.mask.as_ref(), want_weights)
    }

    /// Softmax attention of `q [B, H, T, Dh]` over `k, v [B, H_kv, T_total, Dh]` with an additive
    /// f32 mask: scores and softmax in f32 (as HF does for half precision), then back.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        want_weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rep = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
        let dtype = q.dtype();
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // The rotary output of a single decoded token can carry strides CUDA's matmul rejects.
        let scores = (upcast(q)?.contiguous()?.matmul(&upcast(&k)?.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?;
        let out = probs.to_dtype(dtype)?.matmul(&v)?;
        Ok((out, want_weights.then_some(probs)))
    }

    /// The engine's path on CUDA (src/kernels/attention.rs): one launch from the projections
    /// to rotated queries and the cache written in place, then flash-decoding for one token or
    /// [`Self::attend`] over the cache for a prompt. Taken for a preallocated cache with room,
    /// no gradient and no probabilities wanted, when the kernel policy allows; `None` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn engine_step(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rotary: &Rotary,
        inputs: &AttentionInputs,
        cache: &mut Option<KvCache>,
        want_weights: bool,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        {
            use crate::kernels::attention;
            let t = q.dim(1)?;
            let Some(c) = cache.as_mut() else {
                return Ok(None);
            };
            let applies = q.device().is_cuda()
                && crate::model::kernel_policy::attention_kernels_enabled()
                && !want_weights
                && !(q.track_op() || k.track_op() || v.track_op())
                && attention::supported(q.dtype(), self.head_dim)
                && rotary.rotary_dim > 0
                && c.len() + t <= c.capacity();
            if !applies {
                return Ok(None);
            }
            crate::model::kernel_policy::took("attention:kernel");
            let pos0 = c.len();
            let (kc, vc) = {
                let (k, v) = c.buffers();
                (k.clone(), v.clone())
            };
            let q = attention::prep(q, k, v, &inputs.cos, &inputs.sin, &kc, &vc, pos0)?;
            c.advance(t);
            let out = if t == 1 {
                let scale = 1.0 / (self.head_dim as f32).sqrt();
                // With the rows' starts the kernel skips the padding the mask would zero.
                let mask = match inputs.key_start {
                    Some(_) => None,
                    None => inputs.mask.as_ref(),
                };
                let start = inputs.key_start.as_ref();
                attention::decode(&q, &kc, &vc, c.len(), mask, start, scale)?
            } else {
                self.attend(&q, &c.keys()?, &c.values()?, inputs.mask.as_ref(), false)?
                    .0
            };
            Ok(Some(out))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (q, k, v, rotary, inputs, cache, want_weights);
            Ok(None)
        }
    }
}

/// `[T, T_total]` additive mask: 0 where query `i` (at absolute position `offset + i`) may see
/// key `j`, -inf after it.
pub fn causal_mask(t: usize, total: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, n, rep, t, d))?
        .reshape((b, n * rep, t, d))
}

/// Phi MLP: fc1 -> activation -> fc2, with biases.
#[derive(Debug, Clone)]
pub struct PhiMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl PhiMlp {
    pub fn load(vb: VarBuilder, cfg: &PhiConfig) -> Result<Self> {
        let act = Activation::from_hf(&cfg.hidden_act)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            fc1: Linear::load(vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::load(vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act,
        })
    }
}

impl Module for PhiMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}
