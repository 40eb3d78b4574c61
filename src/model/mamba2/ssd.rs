//! The selective state space scan of Mamba-2, in its two forms.
//!
//! Per head `h` (group `g` of `h`), with `a_t = exp(dt_t A_h)`:
//! `S_t = a_t S_{t-1} + dt_t x_t B_t^T` (`S`: `[head_dim, d_state]`), `y_t = S_t C_t + D_h x_t`.
//!
//! * [`chunked`]: the SSD algorithm (Dao & Gu 2024, upstream `ssd_minimal_discrete`) written as a
//!   few large batched matmuls: inside each chunk a masked, decayed `C B^T` "attention"; across
//!   chunks a short recurrence on the chunk-end states. Linear in the length, no per-step loop.
//! * [`step`]: one step of the recurrence, for decoding.
//!
//! Both run in f32 for half-precision inputs (states accumulate in f32) and in f64 for f64
//! inputs, and return `y` in the input dtype. Every op has a backward in candle. Exponents are
//! clamped to `<= 0` as upstream does, so no exp ever overflows, masked or not.

use candle_core::Tensor;

use super::compute_dtype;
use crate::{Error, Result};

/// Sizes of one scan, read from the inputs and cross-checked.
#[derive(Debug, Clone, Copy)]
pub(super) struct ScanDims {
    pub(super) batch: usize,
    pub(super) len: usize,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    pub(super) groups: usize,
    pub(super) d_state: usize,
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::Invalid(format!("ssd: {msg}")))
}

/// Check the shapes of a scan: `x [B, L, H, P]`, `dt [B, L, H]`, `a [H]`, `b`/`c [B, L, G, N]`,
/// `d [H]`, `state [B, H, P, N]`.
pub(super) fn scan_dims(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    state: Option<&Tensor>,
) -> Result<ScanDims> {
    let (batch, len, heads, head_dim) = match x.dims() {
        &[bb, l, h, p] => (bb, l, h, p),
        other => return invalid(format!("x has shape {other:?}, expected [B, L, H, P]")),
    };
    let (groups, d_state) = match b.dims() {
        &[bb, l, g, n] if bb == batch && l == len => (g, n),
        other => {
            return invalid(format!(
                "B has shape {other:?}, expected [{batch}, {len}, groups, d_state]"
            ))
        }
    };
    if groups == 0 || !heads.is_multiple_of(groups) {
        return invalid(format!(
            "{heads} heads are not a multiple of {groups} groups"
        ));
    }
    if c.dims() != b.dims() {
        return invalid(format!("C has shape {:?}, B has {:?}", c.dims(), b.dims()));
    }
    if dt.dims() != [batch, len, heads] {
        return invalid(format!(
            "dt has shape {:?}, expected [{batch}, {len}, {heads}]",
            dt.dims()
        ));
    }
    if a.dims() != [heads] {
        return invalid(format!("A has shape {:?}, expected [{heads}]", a.dims()));
    }
    if let Some(d) = d {
        if d.dims() != [heads] {
            return invalid(format!("D has shape {:?}, expected [{heads}]", d.dims()));
        }
    }
    if let Some(s) = state {
        if s.dims() != [batch, heads, head_dim, d_state] {
            return invalid(format!(
                "SSM state has shape {:?}, expected [{batch}, {heads}, {head_dim}, {d_state}]",
                s.dims()
            ));
        }
    }
    Ok(ScanDims {
        batch,
        len,
        heads,
        head_dim,
        groups,
        d_state,
    })
}

/// `log(1 + e^x)` as `max(x, 0) + log(1 + e^{-|x|})`: the exponent is never positive, so nothing
/// overflows, and every op has a backward.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// `dt = softplus(dt_raw + dt_bias)`, clamped to `limit` if given; `dt_raw`: `[..., H]`,
/// `dt_bias`: `[H]`. Computed and returned in the compute dtype (f32 for half inputs).
pub fn discretize_dt(
    dt_raw: &Tensor,
    dt_bias: &Tensor,
    limit: Option<(f64, f64)>,
) -> Result<Tensor> {
    let heads = dt_raw.dims().last().copied().unwrap_or(0);
    if dt_bias.dims() != [heads] {
        return invalid(format!(
            "dt_bias has shape {:?}, expected [{heads}]",
            dt_bias.dims()
        ));
    }
    let cd = compute_dtype(dt_raw.dtype());
    let dt = softplus(&dt_raw.to_dtype(cd)?.broadcast_add(&dt_bias.to_dtype(cd)?)?)?;
    Ok(match limit {
        Some((lo, hi)) => dt.clamp(lo, hi)?,
        None => dt,
    })
}

/// `A = -exp(A_log)` in the compute dtype.
pub fn a_from_log(a_log: &Tensor) -> Result<Tensor> {
    Ok(a_log.to_dtype(compute_dtype(a_log.dtype()))?.exp()?.neg()?)
}

/// Expand per-group `[B, G, N]` to per-head `[B, H, N]` (head `h` reads group `h / (H / G)`).
fn heads_from_groups(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, groups, n) = t.dims3()?;
    if groups == heads {
        return Ok(t.clone());
    }
    Ok(t.unsqueeze(2)?
        .broadcast_as((batch, groups, heads / groups, n))?
        .reshape((batch, heads, n))?)
}

/// The chunked SSD scan over a whole sequence.
///
/// * `x`: `[B, L, H, P]` (post-conv x), `dt`: `[B, L, H]` (after softplus), `a`: `[H]` (negative),
///   `b`, `c`: `[B, L, G, N]`, `d`: `[H]` skip weights, `initial`: `[B, H, P, N]` state before
///   the first token (zeros if `None`).
/// * Any `L` (the tail chunk is padded with `dt = 0`, a no-op step: decay 1, no input).
///
/// Returns `y` (`[B, L, H, P]`, `x`'s dtype) and the state after the last token (`[B, H, P, N]`,
/// compute dtype).
#[allow(clippy::too_many_arguments)]
pub fn chunked(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let ScanDims {
        batch,
        len,
        heads,
        head_dim,
        groups,
        d_state,
    } = scan_dims(x, dt, a, b, c, d, initial)?;
    if chunk_size == 0 {
        return invalid("chunk_size must be positive".into());
    }
    let out_dtype = x.dtype();
    let cd = compute_dtype(out_dtype);
    let dev = x.device();
    let initial = match initial {
        Some(s) => s.to_dtype(cd)?,
        None => Tensor::zeros((batch, heads, head_dim, d_state), cd, dev)?,
    };
    if len == 0 {
        return Ok((x.clone(), initial));
    }
    let (q, hg) = (chunk_size.min(len), heads / groups);
    let nc = len.div_ceil(q);
    let pad = nc * q - len;
    let prep = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(cd)?.pad_with_zeros(1, 0, pad)?) };
    let (x_c, dt_c, b_c, c_c) = (prep(x)?, prep(dt)?, prep(b)?, prep(c)?);
    let a = a.to_dtype(cd)?;

    // Layouts: per head `[B, H, nc, Q, ...]`, per group `[B, G, nc, Q, N]`. A head's group is the
    // outer factor of H = G * (H/G), so `[B, H, ..]` reshapes to `[B, G, H/G, ..]` for free.
    // candle's CPU matmul takes at most two batch dims: every matmul below runs on 3-d views.
    let dt_h = dt_c.transpose(1, 2)?.reshape((batch, heads, nc, q))?;
    let log_decay = dt_h.broadcast_mul(&a.reshape((1, heads, 1, 1))?)?;
    // cum[.., i] = sum_{j <= i} dt_j A: the log of the decay from the chunk start through step i.
    let cum = log_decay.cumsum(3)?;
    let xdt = x_c
        .broadcast_mul(&dt_c.unsqueeze(3)?)?
        .reshape((batch, nc, q, heads, head_dim))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?; // [B, H, nc, Q, P]
    let per_group = |t: &Tensor| -> Result<Tensor> {
        Ok(t.reshape((batch, nc, q, groups, d_state))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((batch * groups * nc, q, d_state))?)
    };
    let (b_g, c_g) = (per_group(&b_c)?, per_group(&c_c)?); // [B*G*nc, Q, N]

    // 1. Inside each chunk: y_i += sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j.
    let cb = c_g
        .matmul(&b_g.t()?)?
        .reshape((batch, groups, 1, nc, q, q))?;
    let causal = Tensor::tril2(q, cd, dev)?;
    let decay = cum
        .unsqueeze(4)?
        .broadcast_sub(&cum.unsqueeze(3)?)?
        .minimum(0.0)?
        .exp()?
        .broadcast_mul(&causal)?; // [B, H, nc, Q, Q]
    let scores = decay
        .reshape((batch, groups, hg, nc, q, q))?
        .broadcast_mul(&cb)?
        .reshape((batch * heads * nc, q, q))?;
    let y_diag = scores
        .matmul(&xdt.reshape((batch * heads * nc, q, head_dim))?)?
        .reshape((batch, heads, nc, q, head_dim))?;

    // 2. What each chunk adds to the state by its end: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T.
    // The heads of a group share B, so they stack as rows of one matmul per group.
    let cum_last = cum.narrow(3, q - 1, 1)?; // [B, H, nc, 1]
    let to_end = cum_last.broadcast_sub(&cum)?.minimum(0.0)?.exp()?;
    let chunk_states = xdt
        .broadcast_mul(&to_end.unsqueeze(4)?)?
        .reshape((batch, groups, hg, nc, q, head_dim))?
        .permute((0, 1, 3, 2, 5, 4))? // [B, G, nc, H/G, P, Q]
        .reshape((batch * groups * nc, hg * head_dim, q))?
        .matmul(&b_g)?
        .reshape((batch, groups, nc, hg, head_dim, d_state))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((batch, heads, nc, head_dim, d_state))?;

    // 3. Across chunks, a short recurrence on chunk boundaries: S_c = exp(cum_last_c) S_{c-1} + s_c.
    let chunk_decay = cum_last.minimum(0.0)?.exp()?.unsqueeze(4)?; // [B, H, nc, 1, 1]
    let mut state = initial;
    let mut starts = Vec::with_capacity(nc);
    for ci in 0..nc {
        let decayed = state.broadcast_mul(&chunk_decay.narrow(2, ci, 1)?.squeeze(2)?)?;
        starts.push(state);
        state = (decayed + chunk_states.narrow(2, ci, 1)?.squeeze(2)?)?;
    }
    let starts = Tensor::stack(&starts, 2)?; // [B, H, nc, P, N]: state before each chunk

    // 4. From the state before the chunk: y_i += exp(cum_i) S_start C_i (again per group).
    let y_off = c_g
        .matmul(
            &starts
                .reshape((batch, groups, hg, nc, head_dim, d_state))?
                .permute((0, 1, 3, 5, 2, 4))? // [B, G, nc, N, H/G, P]
                .reshape((batch * groups * nc, d_state, hg * head_dim))?,
        )?
        .reshape((batch, groups, nc, q, hg, head_dim))?
        .permute((0, 1, 4, 2, 3, 5))?
        .reshape((batch, heads, nc, q, head_dim))?
        .broadcast_mul(&cum.minimum(0.0)?.exp()?.unsqueeze(4)?)?;

    let y = (y_diag + y_off)?
        .permute((0, 2, 3, 1, 4))?
        .reshape((batch, nc * q, heads, head_dim))?
        .narrow(1, 0, len)?;
    let y = match d {
        Some(d) => {
            let skip = x
                .to_dtype(cd)?
                .broadcast_mul(&d.to_dtype(cd)?.unsqueeze(1)?)?;
            (y + skip)?
        }
        None => y,
    };
    Ok((y.to_dtype(out_dtype)?, state))
}

/// One step of the recurrence, for decoding.
///
/// `x`: `[B, H, P]`, `dt`: `[B, H]` (after softplus), `a`: `[H]`, `b`, `c`: `[B, G, N]`,
/// `d`: `[H]`, `state`: `[B, H, P, N]`. Returns `(y [B, H, P] in x's dtype, new state in the
/// compute dtype)`; upstream `selective_state_update` with scalar-per-head dt and A.
#[allow(clippy::too_many_arguments)]
pub fn step(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    // One step is a scan of length 1: reuse its shape checks.
    scan_dims(
        &x.unsqueeze(1)?,
        &dt.unsqueeze(1)?,
        a,
        &b.unsqueeze(1)?,
        &c.unsqueeze(1)?,
        d,
        Some(state),
    )?;
    let heads = a.dim(0)?;
    let cd = compute_dtype(x.dtype());
    let (xc, dtc) = (x.to_dtype(cd)?, dt.to_dtype(cd)?);
    let bh = heads_from_groups(&b.to_dtype(cd)?, heads)?; // [B, H, N]
    let ch = heads_from_groups(&c.to_dtype(cd)?, heads)?;
    let decay = dtc
        .broadcast_mul(&a.to_dtype(cd)?)?
        .minimum(0.0)?
        .exp()?
        .unsqueeze(2)?
        .unsqueeze(3)?; // [B, H, 1, 1]
    let input = xc
        .broadcast_mul(&dtc.unsqueeze(2)?)?
        .unsqueeze(3)?
        .broadcast_mul(&bh.unsqueeze(2)?)?; // [B, H, P, N]
    let new_state = (state.to_dtype(cd)?.broadcast_mul(&decay)? + input)?;
    let mut y = new_state
        .matmul(&ch.contiguous()?.unsqueeze(3)?)?
        .squeeze(3)?;
    if let Some(d) = d {
        y = (y + xc.broadcast_mul(&d.to_dtype(cd)?.unsqueeze(1)?)?)?;
    }
    Ok((y.to_dtype(x.dtype())?, new_state))
}
