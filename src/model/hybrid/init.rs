//! Initialising a Mamba-2 mixer from the attention layer it replaces (MaTVLM / MambaInLlama).
//!
//! The SSM recurrence `S_t = exp(dt A) S_{t-1} + dt x_t B_t^T, y_t = S_t C_t` is linear attention
//! with a decay once `x, B, C` play the roles of `v, k, q`. So the mixer starts from the teacher's
//! projections: in_proj's x rows <- v_proj, B rows <- k_proj, C rows <- q_proj, out_proj <- dense.
//! Everything else (z and dt rows, conv, dt_bias, A_log, D, norm) gets upstream's fresh
//! initialisation. Attention biases, RoPE and the 1/sqrt(d) scale are not carried over by
//! default; with GQA, v and k heads are repeated up to the query heads.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::model::mamba2::{Mamba2, Mamba2Config};
use crate::model::phi::PhiAttention;
use crate::{Error, Result};

/// How to initialise each new mixer; every switch is an ablation a researcher may want.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InitOptions {
    /// false: the whole mixer gets a fresh random initialisation (the baseline).
    pub from_attention: bool,
    pub copy_x: bool,
    pub copy_b: bool,
    pub copy_c: bool,
    pub copy_out_proj: bool,
    /// Also carry the q/k/v biases into an in_proj bias and the dense bias into out_proj's
    /// (adds biases the upstream mixer does not have).
    pub carry_biases: bool,
    /// Seed of every random part; layer `i` uses `seed + i` so layers differ but stay reproducible.
    pub seed: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            from_attention: true,
            copy_x: true,
            copy_b: true,
            copy_c: true,
            copy_out_proj: true,
            carry_biases: false,
            seed: 0,
        }
    }
}

impl InitOptions {
    pub fn random(seed: u64) -> Self {
        Self {
            from_attention: false,
            seed,
            ..Self::default()
        }
    }
}

/// Repeat each of `n_kv` head blocks of `rows` (`[n_kv * head_dim, ..]`) `rep` times.
fn repeat_heads(rows: &Tensor, n_kv: usize, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(rows.clone());
    }
    let dims = rows.dims().to_vec();
    let head_dim = dims[0] / n_kv;
    let mut shape = vec![n_kv, 1, head_dim];
    shape.extend_from_slice(&dims[1..]);
    let mut expanded = shape.clone();
    expanded[1] = rep;
    let mut out = dims.clone();
    out[0] = n_kv * rep * head_dim;
    Ok(rows.reshape(shape)?.broadcast_as(expanded)?.reshape(out)?)
}

/// Build the mixer that replaces `attn` in layer `layer`.
pub fn mixer_from_attention(
    attn: &PhiAttention,
    cfg: &Mamba2Config,
    opts: &InitOptions,
    layer: usize,
    dtype: DType,
    device: &Device,
) -> Result<Mamba2> {
    let mut cfg = cfg.clone();
    if opts.from_attention && opts.carry_biases {
        cfg.in_proj_bias = true;
        cfg.out_proj_bias = true;
    }
    let seed = opts.seed.wrapping_add(layer as u64);
    let mut t: HashMap<String, Tensor> = Mamba2::init_tensors(&cfg, dtype, device, seed)?;
    if !opts.from_attention {
        return Mamba2::from_tensors(t, &cfg).map_err(Error::from);
    }
    let (di, gs) = (cfg.d_inner, cfg.n_groups * cfg.d_state);
    let q_out = attn.num_heads * attn.head_dim;
    if q_out != di || gs != q_out {
        return Err(Error::Invalid(format!(
            "init from attention needs d_inner = n_groups * d_state = q_proj rows ({q_out}); \
             got d_inner {di}, n_groups * d_state {gs}"
        )));
    }
    let rep = attn.num_heads / attn.num_kv_heads;
    let cast = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(dtype)?.to_device(device)?) };
    // in_proj rows: z | x | B | C | dt.
    let fresh = t["in_proj.weight"].clone();
    let slice = |start: usize, len: usize| fresh.narrow(0, start, len);
    let x_rows = if opts.copy_x {
        cast(&repeat_heads(&attn.v_proj.weight, attn.num_kv_heads, rep)?)?
    } else {
        slice(di, di)?
    };
    let b_rows = if opts.copy_b {
        cast(&repeat_heads(&attn.k_proj.weight, attn.num_kv_heads, rep)?)?
    } else {
        slice(2 * di, gs)?
    };
    let c_rows = if opts.copy_c {
        cast(&attn.q_proj.weight)?
    } else {
        slice(2 * di + gs, gs)?
    };
    let in_proj = Tensor::cat(
        &[
            &slice(0, di)?,
            &x_rows,
            &b_rows,
            &c_rows,
            &slice(2 * di + 2 * gs, cfg.n_heads)?,
        ],
        0,
    )?;
    t.insert("in_proj.weight".into(), in_proj);
    if opts.copy_out_proj {
        t.insert("out_proj.weight".into(), cast(&attn.dense.weight)?);
    }
    if opts.carry_biases {
        let bias = |l: &crate::model::layers::Linear, n: usize| -> Result<Tensor> {
            match &l.bias {
                Some(b) => cast(b),
                None => Ok(Tensor::zeros(n, dtype, device)?),
            }
        };
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        let vb = repeat_heads(
            &bias(&attn.v_proj, attn.num_kv_heads * attn.head_dim)?,
            attn.num_kv_heads,
            rep,
        )?;
        let kb = repeat_heads(
            &bias(&attn.k_proj, attn.num_kv_heads * attn.head_dim)?,
            attn.num_kv_heads,
            rep,
        )?;
        let in_bias = Tensor::cat(
            &[
                &zeros(di)?,
                &vb,
                &kb,
                &bias(&attn.q_proj, q_out)?,
                &zeros(cfg.n_heads)?,
            ],
            0,
        )?;
        t.insert("in_proj.bias".into(), in_bias);
        t.insert("out_proj.bias".into(), bias(&attn.dense, cfg.d_model)?);
    }
    Mamba2::from_tensors(t, &cfg).map_err(Error::from)
}
