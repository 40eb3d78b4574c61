//! Small building blocks shared by every model file: linear layers, LayerNorm and activations.
//!
//! candle's fused `layer_norm`/`softmax_last_dim` kernels have no backward pass. Every op here
//! picks the fused kernel when no gradient is being tracked (inference) and a composed,
//! differentiable form when one is (training), so the same model code serves both.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `y = x W^T + b` with the weight layout of torch's `nn.Linear` (`[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.dims() {
            [b, l, d] => x.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ()))?,
            [_, _] => x.matmul(&w)?,
            _ => x.broadcast_matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension with weight and bias (torch `nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            layer_norm_differentiable(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// LayerNorm from elementary ops (so it has a backward), computed in f32 for half inputs.
pub fn layer_norm_differentiable(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension; fused unless gradients are tracked.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// f16/bf16 -> f32, anything else unchanged: statistics and states accumulate in f32.
pub fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// The activations the supported checkpoints name in their configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (HF `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// exact erf GELU (HF `gelu`).
    GeluErf,
    Silu,
    Relu,
    QuickGelu,
}

impl Activation {
    /// Parse an HF `hidden_act` string.
    pub fn from_hf(name: &str) -> crate::Result<Self> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "quick_gelu" => Activation::QuickGelu,
            other => return Err(crate::Error::UnknownActivation(other.to_string())),
        })
    }

    pub fn hf_name(&self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
            Activation::Silu => "silu",
            Activation::Relu => "relu",
            Activation::QuickGelu => "quick_gelu",
        }
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh => x.gelu(),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
            Activation::QuickGelu => x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        }
    }
}
