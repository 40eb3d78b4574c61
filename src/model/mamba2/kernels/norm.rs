//! The gated RMSNorm per group (kernels/norm.cu).

use super::*;

// ------------------------------------------------------------------------------------------
// Gated RMSNorm per group.

struct GatedNorm {
    weight: Tensor,
    group: usize,
    eps: f32,
}

impl GatedNorm {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        zs: &CudaStorage,
        zl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &ys.device;
        let dims = yl.shape().dims().to_vec();
        let c = *dims.last().unwrap_or(&0);
        let rows = yl.shape().elem_count() / c.max(1);
        // Rows: every leading dim must collapse onto one row stride (true of the mixer's views).
        let row_stride = |l: &Layout, what: &str| -> candle_core::Result<(usize, i64)> {
            let st = l.stride();
            let d = l.dims();
            if st.last() != Some(&1) {
                bail!("mamba2-gated-norm: {what} channels are not contiguous");
            }
            let r = if d.len() >= 2 { st[d.len() - 2] } else { c };
            for i in 0..d.len().saturating_sub(2) {
                if d[i] > 1 && st[i] != st[i + 1] * d[i + 1] {
                    bail!("mamba2-gated-norm: {what} rows do not have one stride ({st:?})");
                }
            }
            Ok((l.start_offset(), r as i64))
        };
        let (yo, sy) = row_stride(yl, "y")?;
        let (zo, sz) = row_stride(zl, "z")?;
        let yv = ys.as_cuda_slice::<T>()?.slice(yo..);
        let zv = zs.as_cuda_slice::<T>()?.slice(zo..);
        let w = Side::new(&self.weight, "norm.weight");
        let wv = w.view::<f32>()?;
        // SAFETY: fully written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * c)? };
        let func = load!(
            NORM,
            dev,
            &format!("mamba2_gated_norm_{}", suffix(T::DTYPE)?)
        )?;
        let warps = rows * (c / self.group);
        let cfg = LaunchConfig {
            grid_dim: (grid(warps * 32, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, ci, gi) = (
            i32_of(rows, "rows")?,
            i32_of(c, "C")?,
            i32_of(self.group, "group")?,
        );
        let mut a = func.builder();
        a.arg(&yv);
        a.arg(&sy);
        a.arg(&zv);
        a.arg(&sz);
        a.arg(&wv);
        a.arg(&out);
        a.arg(&ri);
        a.arg(&ci);
        a.arg(&gi);
        a.arg(&self.eps);
        // SAFETY: argument list matches mamba2_gated_norm_* in kernels/norm.cu.
        unsafe { a.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(dims),
        ))
    }
}

impl CustomOp2 for GatedNorm {
    fn name(&self) -> &'static str {
        "mamba2-gated-norm"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        zs: &CudaStorage,
        zl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(ys.dtype(), self.name(), T => self.launch::<T>(ys, yl, zs, zl))
    }
}

/// `rmsnorm_per_group(y * silu(z)) * weight` over the last dim (`weight [C]` f32, `C` a multiple
/// of `group`); `y`, `z` of one shape and dtype, channels contiguous. Returns y's dtype.
pub fn gated_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = GatedNorm {
        weight: weight.clone(),
        group,
        eps: eps as f32,
    };
    y.apply_op2_no_bwd(z, &op)
}
