//! The sequential recurrence, one token at a time: the reference the chunked scan is tested and
//! benchmarked against. Same inputs and outputs as [`super::ssd::chunked`], O(L) small ops.

use candle_core::Tensor;

use super::ssd;
use crate::Result;

/// The scan as a loop of [`ssd::step`]: `x [B, L, H, P]`, `dt [B, L, H]`, `a [H]`,
/// `b`/`c [B, L, G, N]`, `d [H]`, `initial [B, H, P, N]`. Returns `(y [B, L, H, P], final state)`.
pub fn scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (batch, len, heads, head_dim) = x.dims4()?;
    let d_state = b.dim(3)?;
    let mut state = match initial {
        Some(s) => s.clone(),
        None => Tensor::zeros(
            (batch, heads, head_dim, d_state),
            super::compute_dtype(x.dtype()),
            x.device(),
        )?,
    };
    if len == 0 {
        return Ok((x.clone(), state));
    }
    let at = |t: &Tensor, i: usize| t.narrow(1, i, 1).and_then(|t| t.squeeze(1));
    let mut ys = Vec::with_capacity(len);
    for i in 0..len {
        let (y, s) = ssd::step(
            &at(x, i)?,
            &at(dt, i)?,
            a,
            &at(b, i)?,
            &at(c, i)?,
            d,
            &state,
        )?;
        ys.push(y);
        state = s;
    }
    let y = Tensor::stack(&ys, 1)?;
    Ok((y, state))
}
