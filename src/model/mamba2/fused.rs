//! Where the mixer picks between the CUDA kernels (`cuda` feature, [`super::kernels`]) and the
//! device-generic candle code of [`super::conv`], [`super::ssd`] and [`super::norm`].
//!
//! The kernels run when the `cuda` feature is built in, every tensor is on a CUDA device, the
//! dtype is f32, f16 or bf16, the sizes fit the kernels, kernels are not switched off
//! ([`set_kernels`], or `MATVLM_MAMBA2_KERNELS=0`), and no input tracks gradients.
//!
//! Backward: under autograd (any input tracks an op, as in distillation where the mixer's
//! parameters are `Var`s) the SSD scan runs as one differentiable op with backward kernels
//! (kernels/ssd_bwd.cu) when its activations are f16/bf16 with head_dim and d_state multiples
//! of 16; otherwise (f32, odd sizes) the generic path runs, forward and backward, through
//! candle's differentiable ops on the same device. The conv and the gated norm always take the
//! generic path under autograd (they are cheap beside the scan).
//!
//! Without the feature, or on the CPU, every function here is the generic code (plus the SiLU
//! or gate the kernels fuse), so the CPU tests exercise this dispatch too.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Tensor};

use super::{compute_dtype, conv, norm, ssd};
use crate::Result;

/// 0: follow `MATVLM_MAMBA2_KERNELS`; 1: on; 2: off.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Force the kernels on (`Some(true)`) or off (`Some(false)`), or follow the environment
/// variable `MATVLM_MAMBA2_KERNELS` (`None`; anything but `0` means on). For benchmarks and
/// parity checks that run both paths in one process.
pub fn set_kernels(on: Option<bool>) {
    OVERRIDE.store(
        match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        },
        Ordering::Relaxed,
    );
}

/// Whether the kernels are built in and switched on (they still need CUDA tensors to run).
pub fn kernels_enabled() -> bool {
    cfg!(feature = "cuda")
        && match OVERRIDE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => std::env::var("MATVLM_MAMBA2_KERNELS").map_or(true, |v| v != "0"),
        }
}

/// Whether the kernels may take these tensors: enabled, all on CUDA, none tracking gradients,
/// the first (the activation) in f32/f16/bf16.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn use_kernels(ts: &[Option<&Tensor>]) -> bool {
    let Some(Some(first)) = ts.first() else {
        return false;
    };
    kernels_enabled()
        && matches!(first.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && ts
            .iter()
            .flatten()
            .all(|t| t.device().is_cuda() && !t.track_op())
}

#[cfg(feature = "cuda")]
fn f32c(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Causal depthwise conv followed by SiLU ([`conv::causal_depthwise`], then `silu`), fused into
/// one kernel on CUDA. Returns `(silu(conv(x)) [B, L, C]` in x's dtype, new conv state).
pub fn conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if use_kernels(&[Some(x), Some(weight), bias, state]) && x.rank() == 3 && x.dim(1)? > 0 {
        let (c, k) = conv::weight_dims(weight)?;
        let (batch, _, cx) = x.dims3()?;
        if cx == c && k <= super::kernels::MAX_D_CONV {
            if let Some(s) = state {
                conv::check_state(s, batch, c, k)?;
            }
            let w = f32c(&weight.reshape((c, k))?)?;
            let b = bias.map(f32c).transpose()?;
            let s = state.map(f32c).transpose()?;
            return Ok(super::kernels::conv_fwd(
                x,
                &w,
                b.as_ref(),
                s.as_ref(),
                true,
            )?);
        }
    }
    let (y, s) = conv::causal_depthwise(x, weight, bias, state)?;
    Ok((y.silu()?, s))
}

/// One step of [`conv_silu`]: `x [B, C]`; `state [B, C, K]` advances (in place on CUDA when it
/// is f32 and contiguous, otherwise replaced). Returns `silu(conv) [B, C]` in x's dtype.
pub fn conv_silu_step(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: &mut Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernels(&[Some(x), Some(weight), bias, Some(state)])
        && state.dtype() == DType::F32
        && state.is_contiguous()
        && x.rank() == 2
    {
        let (c, k) = conv::weight_dims(weight)?;
        let (batch, cx) = x.dims2()?;
        if cx == c && k <= super::kernels::MAX_D_CONV {
            conv::check_state(state, batch, c, k)?;
            let w = f32c(&weight.reshape((c, k))?)?;
            let b = bias.map(f32c).transpose()?;
            return Ok(super::kernels::conv_step(x, &w, b.as_ref(), state, true)?);
        }
    }
    let (y, s) = conv::step(x, weight, bias, state)?;
    *state = s;
    Ok(y.silu()?)
}

/// `y * silu(z)` in the compute dtype, returned in y's dtype (the gate the scan kernel fuses).
fn gate(y: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
    let Some(z) = z else {
        return Ok(y.clone());
    };
    if z.dims() != y.dims() {
        return Err(crate::Error::Invalid(format!(
            "ssd: gate z has shape {:?}, output has {:?}",
            z.dims(),
            y.dims()
        )));
    }
    let cd = compute_dtype(y.dtype());
    Ok((y.to_dtype(cd)? * z.to_dtype(cd)?.silu()?)?.to_dtype(y.dtype())?)
}

/// The chunked SSD scan ([`ssd::chunked`]) with an optional SiLU gate `z [B, L, H, P]` on the
/// output. On CUDA: three kernels (chunk states, state passing, chunk scan; kernels/ssd.cu, on
/// tensor cores kernels/ssd_tc.cu); under autograd, for the tensor-core shapes, also the
/// backward kernels (kernels/ssd_bwd.cu).
#[allow(clippy::too_many_arguments)]
pub fn chunked_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(out) = train_scan(x, dt, a, b, c, d, z, chunk_size, initial)? {
        return Ok(out);
    }
    #[cfg(feature = "cuda")]
    if use_kernels(&[Some(x), Some(dt), Some(a), Some(b), Some(c), d, z, initial]) {
        let dims = ssd::scan_dims(x, dt, a, b, c, d, initial)?;
        let same_dtype = b.dtype() == x.dtype()
            && c.dtype() == x.dtype()
            && z.is_none_or(|z| z.dtype() == x.dtype() && z.dims() == x.dims());
        let q = chunk_size.min(dims.len);
        if dims.len > 0
            && chunk_size > 0
            && same_dtype
            && super::kernels::ssd_supported(dims.head_dim, dims.d_state, q)
        {
            let cont = |t: &Tensor| -> Result<Tensor> { Ok(t.contiguous()?) };
            let (d32, z_c, init) = (
                d.map(f32c).transpose()?,
                z.map(cont).transpose()?,
                initial.map(f32c).transpose()?,
            );
            return Ok(super::kernels::ssd_chunked(
                &cont(x)?,
                &f32c(dt)?,
                &f32c(a)?,
                &cont(b)?,
                &cont(c)?,
                d32.as_ref(),
                z_c.as_ref(),
                chunk_size,
                init.as_ref(),
            )?);
        }
    }
    let (y, s) = ssd::chunked(x, dt, a, b, c, d, chunk_size, initial)?;
    Ok((gate(&y, z)?, s))
}

/// [`chunked_scan`] over x, B and C packed in one tensor `xbc [B, L, H*P + 2*G*N]`, as the
/// mixer's conv output has them; `dims` = (H, P, G, N). On CUDA with f16/bf16 activations and
/// head_dim, d_state multiples of 16 (<= 128) the kernels read xbc in place, forward and (under
/// autograd) backward, with the gate fused; otherwise xbc is split into views for
/// [`chunked_scan`].
#[allow(clippy::too_many_arguments)]
pub fn chunked_scan_packed(
    xbc: &Tensor,
    dims: (usize, usize, usize, usize),
    dt: &Tensor,
    a: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (h, p, g, n) = dims;
    let (bsz, len, conv) = xbc.dims3()?;
    if conv != h * p + 2 * g * n {
        return Err(crate::Error::Invalid(format!(
            "ssd: packed xBC has {conv} channels, heads x head_dim + 2 x groups x d_state = {}",
            h * p + 2 * g * n
        )));
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = packed_kernels(xbc, dims, dt, a, d, z, chunk_size, initial)? {
        return Ok(out);
    }
    let x = xbc.narrow(2, 0, h * p)?.reshape((bsz, len, h, p))?;
    let b = xbc.narrow(2, h * p, g * n)?.reshape((bsz, len, g, n))?;
    let c = xbc
        .narrow(2, h * p + g * n, g * n)?
        .reshape((bsz, len, g, n))?;
    chunked_scan(&x, dt, a, &b, &c, d, z, chunk_size, initial)
}

/// The packed scan op of the kernels ([`super::kernels::ssd_chunked_train`]: tensor-core forward,
/// backward kernels), when it takes these tensors: kernels on, everything on CUDA, f16/bf16
/// activations with head_dim and d_state multiples of 16 (<= 128), an initial state (if any)
/// that needs no gradient. dt, A and D go in as one f32 tensor (candle's custom ops take three
/// differentiable inputs: xbc, the gate and that). `None` when the generic path must run.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn packed_kernels(
    xbc: &Tensor,
    dims: (usize, usize, usize, usize),
    dt: &Tensor,
    a: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let (h, p, _, n) = dims;
    let all = [Some(xbc), Some(dt), Some(a), d, z, initial];
    if !kernels_enabled()
        || !all.iter().flatten().all(|t| t.device().is_cuda())
        || initial.is_some_and(|t| t.track_op())
        || chunk_size == 0
        || xbc.dim(1)? == 0
        || z.is_some_and(|z| z.dtype() != xbc.dtype())
        || !super::kernels::ssd_train_supported(xbc.dtype(), p, n)
    {
        return Ok(None);
    }
    let (bsz, len, _) = xbc.dims3()?;
    if dt.dims() != [bsz, len, h] || a.dims() != [h] || d.is_some_and(|d| d.dims() != [h]) {
        return Ok(None); // the generic path reports the shape error
    }
    if let Some(z) = z {
        if z.dims() != [bsz, len, h, p] {
            return Ok(None);
        }
    }
    let d = match d {
        Some(d) => d.to_dtype(DType::F32)?,
        None => Tensor::zeros(h, DType::F32, xbc.device())?,
    };
    let dtad = Tensor::cat(
        &[
            &dt.to_dtype(DType::F32)?.flatten_all()?,
            &a.to_dtype(DType::F32)?,
            &d,
        ],
        0,
    )?;
    let z = z.map(|z| z.contiguous()).transpose()?;
    let init = initial.map(f32c).transpose()?;
    Ok(Some(super::kernels::ssd_chunked_train(
        &xbc.contiguous()?,
        z.as_ref(),
        &dtad,
        dims,
        chunk_size,
        init.as_ref(),
    )?))
}

/// The chunked scan under autograd on CUDA with x, B, C as separate tensors: packed into one
/// (a copy, and the gradient split back) for [`packed_kernels`]. `None` when nothing tracks
/// gradients or the kernels do not take these tensors.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn train_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let all = [Some(x), Some(dt), Some(a), Some(b), Some(c), d, z, initial];
    if !all.iter().flatten().any(|t| t.track_op()) || x.rank() != 4 || b.rank() != 4 {
        return Ok(None);
    }
    let dims = ssd::scan_dims(x, dt, a, b, c, d, initial)?;
    if b.dtype() != x.dtype()
        || c.dtype() != x.dtype()
        || !super::kernels::ssd_train_supported(x.dtype(), dims.head_dim, dims.d_state)
        || !all.iter().flatten().all(|t| t.device().is_cuda())
    {
        return Ok(None);
    }
    let (bsz, len, h, p) = x.dims4()?;
    let (g, n) = (b.dim(2)?, b.dim(3)?);
    let xbc = Tensor::cat(
        &[
            &x.reshape((bsz, len, h * p))?,
            &b.reshape((bsz, len, g * n))?,
            &c.reshape((bsz, len, g * n))?,
        ],
        2,
    )?;
    packed_kernels(&xbc, (h, p, g, n), dt, a, d, z, chunk_size, initial)
}

/// One decoding step ([`ssd::step`]) with an optional gate `z [B, H, P]`; `state` advances (in
/// place on CUDA when it is f32 and contiguous, otherwise replaced). Returns `y [B, H, P]`.
#[allow(clippy::too_many_arguments)]
pub fn scan_step(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    state: &mut Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernels(&[
        Some(x),
        Some(dt),
        Some(a),
        Some(b),
        Some(c),
        d,
        z,
        Some(state),
    ]) && state.dtype() == DType::F32
        && state.is_contiguous()
        && x.rank() == 3
        && b.rank() == 3
        && c.rank() == 3
    {
        let dims = ssd::scan_dims(
            &x.unsqueeze(1)?,
            &dt.unsqueeze(1)?,
            a,
            &b.unsqueeze(1)?,
            &c.unsqueeze(1)?,
            d,
            Some(state),
        )?;
        let same_dtype = b.dtype() == x.dtype()
            && c.dtype() == x.dtype()
            && z.is_none_or(|z| z.dtype() == x.dtype() && z.dims() == x.dims());
        if same_dtype && dims.batch > 0 {
            let cont = |t: &Tensor| -> Result<Tensor> { Ok(t.contiguous()?) };
            let (d32, z_c) = (d.map(f32c).transpose()?, z.map(cont).transpose()?);
            return Ok(super::kernels::ssd_state_update(
                &cont(x)?,
                &f32c(dt)?,
                &f32c(a)?,
                &cont(b)?,
                &cont(c)?,
                d32.as_ref(),
                z_c.as_ref(),
                state,
            )?);
        }
    }
    let (y, s) = ssd::step(x, dt, a, b, c, d, state)?;
    *state = s;
    gate(&y, z)
}

/// The gated, grouped RMSNorm ([`norm::gated_rms_norm`]); one kernel on CUDA.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group_size: usize,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernels(&[Some(y), Some(z), Some(weight)]) && z.dtype() == y.dtype() && y.rank() >= 1 {
        norm::check(y, z, weight, group_size)?;
        let w = f32c(weight)?;
        // The kernel reads rows with one stride (z is a column slice of in_proj's output, read
        // in place); a tensor laid out otherwise is copied first.
        let rows = |t: &Tensor| -> Result<Tensor> {
            let (st, d) = (t.stride(), t.dims());
            let one_stride = st.last() == Some(&1)
                && (0..d.len().saturating_sub(2))
                    .all(|i| d[i] <= 1 || st[i] == st[i + 1] * d[i + 1]);
            Ok(if one_stride {
                t.clone()
            } else {
                t.contiguous()?
            })
        };
        return Ok(super::kernels::gated_norm(
            &rows(y)?,
            &rows(z)?,
            &w,
            group_size,
            eps,
        )?);
    }
    norm::gated_rms_norm(y, z, weight, group_size, eps)
}
