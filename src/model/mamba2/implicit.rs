//! The attention a Mamba-2 mixer performs without saying so, and its state over time.
//!
//! Unrolling the recurrence `S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T`, `y_t = S_t C_t + D x_t`
//! from a zero state gives, per head `h`,
//!
//! `y_t = sum_{s <= t} M[t, s] x_s + D_h x_t`, with
//! `M[t, s] = (C_t . B_s) * exp(sum_{s < k <= t} dt_k A_h) * dt_s`:
//!
//! a causal, decay-masked `C B^T` — the "implicit attention matrix" of the SSD paper, which is
//! what makes a mixer initialised from q/k/v comparable with the attention it replaced. Unlike
//! softmax attention its rows are not normalised and its entries may be negative.

use candle_core::{Tensor, D};

use super::{compute_dtype, ssd, Mamba2};
use crate::{Error, Result};

/// A mixer input as `[1, T, d_model]`, accepting `[T, d_model]` too; batches of more than one
/// sequence are refused (each sequence has its own matrix).
fn single_sequence(x: &Tensor, what: &str) -> Result<Tensor> {
    let x = match x.rank() {
        2 => x.unsqueeze(0)?,
        3 if x.dim(0)? == 1 => x.clone(),
        _ => {
            return Err(Error::Invalid(format!(
                "{what}: input has shape {:?}, expected [T, d_model] or [1, T, d_model]",
                x.dims()
            )))
        }
    };
    Ok(x)
}

/// Per-group `[G, T, N]` to per-head `[H, T, N]` (head `h` reads group `h / (H / G)`).
fn per_head(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (groups, len, n) = t.dims3()?;
    if groups == heads {
        return Ok(t.clone());
    }
    Ok(t.unsqueeze(1)?
        .broadcast_as((groups, heads / groups, len, n))?
        .reshape((heads, len, n))?)
}

/// The implicit attention matrices of `mixer` on one sequence `x` (the mixer's input, i.e. the
/// block's LayerNorm output, `[T, d_model]` or `[1, T, d_model]`), from a zero state:
/// `[heads, T, T]` with `M[h, t, s]` as in the module doc (zero above the diagonal), in the
/// compute dtype (f32, or f64 for an f64 mixer).
pub fn implicit_attention(mixer: &Mamba2, x: &Tensor) -> Result<Tensor> {
    let x = single_sequence(x, "implicit_attention")?;
    let p = mixer.project(&x, None)?;
    let heads = mixer.cfg.n_heads;
    let cd = compute_dtype(x.dtype());
    let len = x.dim(1)?;
    let dt = p.dt.squeeze(0)?.t()?.to_dtype(cd)?.contiguous()?; // [H, T]
    let a = mixer.a()?.to_dtype(cd)?; // [H]
    let cum = dt.broadcast_mul(&a.unsqueeze(1)?)?.cumsum(1)?; // [H, T]
                                                              // exp(cum_t - cum_s) = exp(sum_{s < k <= t} dt_k A); clamped at 0 so the masked upper
                                                              // triangle cannot overflow before it is zeroed.
    let decay = cum
        .unsqueeze(2)?
        .broadcast_sub(&cum.unsqueeze(1)?)?
        .minimum(0.0)?
        .exp()?
        .broadcast_mul(&Tensor::tril2(len, cd, x.device())?)?; // [H, T, T]
    let to_groups = |t: &Tensor| -> Result<Tensor> {
        Ok(t.squeeze(0)?.transpose(0, 1)?.to_dtype(cd)?.contiguous()?)
    }; // [T, G, N] -> [G, T, N]
    let (b, c) = (to_groups(&p.b)?, to_groups(&p.c)?);
    let cb = per_head(&c.matmul(&b.t()?)?, heads)?; // [H, T, T]: C_t . B_s
    Ok((cb * decay)?.broadcast_mul(&dt.unsqueeze(1)?)?)
}

/// The Frobenius norm of each head's SSM state `S_t` (`[head_dim, d_state]`) after every token
/// of one sequence `x` (as for [`implicit_attention`]), from a zero state: `[heads, T]`, compute
/// dtype. Shows how much each head remembers, and where it forgets (large `dt`, strong decay).
pub fn state_norms(mixer: &Mamba2, x: &Tensor) -> Result<Tensor> {
    let x = single_sequence(x, "state_norms")?;
    let p = mixer.project(&x, None)?;
    let a = mixer.a()?;
    let cd = compute_dtype(x.dtype());
    let cfg = &mixer.cfg;
    let mut state = Tensor::zeros((1, cfg.n_heads, cfg.head_dim, cfg.d_state), cd, x.device())?;
    let at = |t: &Tensor, i: usize| t.narrow(1, i, 1).and_then(|t| t.squeeze(1));
    let mut norms = Vec::with_capacity(x.dim(1)?);
    for i in 0..x.dim(1)? {
        let (_, next) = ssd::step(
            &at(&p.x, i)?,
            &at(&p.dt, i)?,
            &a,
            &at(&p.b, i)?,
            &at(&p.c, i)?,
            None,
            &state,
        )?;
        state = next;
        norms.push(state.sqr()?.sum((2, 3))?.sqrt()?.squeeze(0)?); // [H]
    }
    Ok(Tensor::stack(&norms, D::Minus1)?)
}
