//! Causal depthwise conv1d over time, for prefill and for one decoding step.
//!
//! candle's grouped `conv1d` loops over groups, which is hopeless for 7680 one-channel groups. A
//! depthwise conv of width K is just K shifted copies of the input, each scaled by its per-channel
//! tap and summed: K broadcast multiply-adds over `[B, L, C]`, every one of them differentiable.
//! Arithmetic is done in f32 for half-precision inputs (the state is kept in that precision too).

use candle_core::{Tensor, D};

use super::compute_dtype;
use crate::{Error, Result};

/// Check `weight` is `[C, 1, K]` (torch's depthwise layout) and return `(C, K)`.
pub(super) fn weight_dims(weight: &Tensor) -> Result<(usize, usize)> {
    match weight.dims() {
        &[c, 1, k] if k > 0 => Ok((c, k)),
        other => Err(Error::Invalid(format!(
            "conv1d.weight has shape {other:?}, expected [channels, 1, d_conv]"
        ))),
    }
}

/// Check a conv state is `[B, C, K]`.
pub(super) fn check_state(state: &Tensor, batch: usize, channels: usize, k: usize) -> Result<()> {
    if state.dims() != [batch, channels, k] {
        return Err(Error::Invalid(format!(
            "conv state has shape {:?}, expected [{batch}, {channels}, {k}]",
            state.dims()
        )));
    }
    Ok(())
}

/// The taps as `[C, K]` and the `[C]` bias, in the compute dtype.
fn taps(
    weight: &Tensor,
    bias: Option<&Tensor>,
    c: usize,
    k: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let cd = compute_dtype(weight.dtype());
    let w = weight.to_dtype(cd)?.reshape((c, k))?;
    let b = match bias {
        Some(b) if b.dims() != [c] => {
            return Err(Error::Invalid(format!(
                "conv1d.bias has shape {:?}, expected [{c}]",
                b.dims()
            )))
        }
        Some(b) => Some(b.to_dtype(cd)?),
        None => None,
    };
    Ok((w, b))
}

/// Causal depthwise conv over time: `y[t, c] = bias[c] + sum_i weight[c, 0, i] * u[t - K + 1 + i, c]`,
/// where `u` is the input preceded by the conv state (the `K` previous inputs, zeros if `None`).
///
/// `x`: `[B, L, C]`; `weight`: `[C, 1, K]`; `state`: `[B, C, K]`. Returns `y` (`[B, L, C]`, in
/// `x`'s dtype) and the new state: the last `K` inputs, `[B, C, K]` in the compute dtype (f32 for
/// half inputs), which is upstream's conv-state layout.
pub fn causal_depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (c, k) = weight_dims(weight)?;
    let (batch, len, cx) = x.dims3()?;
    if cx != c {
        return Err(Error::Invalid(format!(
            "conv input has {cx} channels, conv1d.weight has {c}"
        )));
    }
    let cd = compute_dtype(x.dtype());
    let (w, b) = taps(weight, bias, c, k)?;
    let prev = match state {
        Some(s) => {
            check_state(s, batch, c, k)?;
            s.to_dtype(cd)?.transpose(1, 2)?
        }
        None => Tensor::zeros((batch, k, c), cd, x.device())?,
    };
    // `full[K + t]` is input t; the taps for output t read `full[t + 1 ..= t + K]`.
    let full = Tensor::cat(&[&prev, &x.to_dtype(cd)?], 1)?;
    // Taps as contiguous rows, so each multiply is a contiguous broadcast over the channels.
    let w_rows = w.t()?.contiguous()?; // [K, C]
    let tap = |i: usize| full.narrow(1, 1 + i, len)?.broadcast_mul(&w_rows.get(i)?);
    let mut y = tap(0)?;
    for i in 1..k {
        y = (y + tap(i)?)?;
    }
    if let Some(b) = b {
        y = y.broadcast_add(&b)?;
    }
    let new_state = full.narrow(1, len, k)?.transpose(1, 2)?.contiguous()?;
    Ok((y.to_dtype(x.dtype())?, new_state))
}

/// One decoding step of [`causal_depthwise`]: shift `x` (`[B, C]`) into the state (`[B, C, K]`,
/// oldest first) and return `(y [B, C] in x's dtype, new state)`.
pub fn step(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (c, k) = weight_dims(weight)?;
    let (batch, cx) = x.dims2()?;
    if cx != c {
        return Err(Error::Invalid(format!(
            "conv input has {cx} channels, conv1d.weight has {c}"
        )));
    }
    check_state(state, batch, c, k)?;
    let cd = compute_dtype(x.dtype());
    let (w, b) = taps(weight, bias, c, k)?;
    let new_state = Tensor::cat(
        &[
            &state.to_dtype(cd)?.narrow(2, 1, k - 1)?,
            &x.to_dtype(cd)?.unsqueeze(2)?,
        ],
        2,
    )?;
    let mut y = new_state.broadcast_mul(&w)?.sum(D::Minus1)?;
    if let Some(b) = b {
        y = y.broadcast_add(&b)?;
    }
    Ok((y.to_dtype(x.dtype())?, new_state))
}
