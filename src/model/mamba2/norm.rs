//! The gated RMSNorm that closes the mixer (upstream `RMSNormGated`, `norm_before_gate=False`).
//!
//! Composed from elementary ops so it has a backward pass (candle's fused `rms_norm` has none),
//! computed in f32 for half inputs, like upstream's `rms_norm_ref`.

use candle_core::{Tensor, D};

use super::compute_dtype;
use crate::{Error, Result};

/// `out = rmsnorm_per_group(y * silu(z)) * weight`, where each group of `group_size` consecutive
/// channels of the last dimension is normalised on its own.
///
/// `y`, `z`: `[..., C]`; `weight`: `[C]`; `C` a multiple of `group_size`. Returns `y`'s dtype.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group_size: usize,
    eps: f64,
) -> Result<Tensor> {
    check(y, z, weight, group_size)?;
    let dims = y.dims().to_vec();
    let channels = *dims.last().unwrap_or(&0);
    let cd = compute_dtype(y.dtype());
    let gated = (y.to_dtype(cd)? * z.to_dtype(cd)?.silu()?)?;

    let mut grouped = dims.clone();
    grouped.pop();
    grouped.extend([channels / group_size, group_size]);
    let gated = gated.reshape(grouped)?;
    let inv_rms = (gated.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = gated.broadcast_mul(&inv_rms)?.reshape(dims)?;
    Ok(normed
        .broadcast_mul(&weight.to_dtype(cd)?)?
        .to_dtype(y.dtype())?)
}

/// The shape checks of [`gated_rms_norm`] (shared with the CUDA kernel's dispatch).
pub(super) fn check(y: &Tensor, z: &Tensor, weight: &Tensor, group_size: usize) -> Result<()> {
    let dims = y.dims();
    let channels = *dims.last().unwrap_or(&0);
    if z.dims() != dims {
        return Err(Error::Invalid(format!(
            "gated_rms_norm: gate z has shape {:?}, input has {dims:?}",
            z.dims()
        )));
    }
    if weight.dims() != [channels] {
        return Err(Error::Invalid(format!(
            "norm.weight has shape {:?}, expected [{channels}]",
            weight.dims()
        )));
    }
    if group_size == 0 || !channels.is_multiple_of(group_size) {
        return Err(Error::Invalid(format!(
            "gated_rms_norm: group size {group_size} does not divide {channels} channels"
        )));
    }
    Ok(())
}
