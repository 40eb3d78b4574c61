//! Causal depthwise conv1d (+ SiLU): a prompt, and one decoding step in place on the conv state
//! (kernels/conv.cu).

use super::*;

// ------------------------------------------------------------------------------------------
// Causal depthwise conv1d (+ SiLU), prefill.

/// Conv over `x [B, L, C]` (channels contiguous, rows may be strided). Holds the taps `[C, K]`,
/// bias `[C]`, the incoming state `[B, C, K]` (all f32, contiguous) and returns the new state.
struct ConvFwd {
    weight: Tensor,
    bias: Option<Tensor>,
    state: Option<Tensor>,
    silu: bool,
    new_state: Mutex<Option<Tensor>>,
}

impl ConvFwd {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let (b, len, c) = l.shape().dims3()?;
        let k = self.weight.dim(1)?;
        let (off, sxb, sxt) = rows_layout(l, "conv input")?;
        let x = s.as_cuda_slice::<T>()?.slice(off..);
        let w = Side::new(&self.weight, "conv1d.weight");
        let bias = self.bias.as_ref().map(|t| Side::new(t, "conv1d.bias"));
        let state = self.state.as_ref().map(|t| Side::new(t, "conv state"));
        let (wv, bv, sv) = (
            w.view::<f32>()?,
            opt_view::<f32>(&bias)?,
            opt_view::<f32>(&state)?,
        );
        // SAFETY: both are fully written by the kernel before they are read.
        let y = unsafe { dev.alloc::<T>(b * len * c)? };
        let state_out = unsafe { dev.alloc::<f32>(b * c * k)? };
        let t_per_block = 64usize;
        let func = load!(CONV, dev, &format!("mamba2_conv_fwd_{}", suffix(T::DTYPE)?))?;
        let cfg = LaunchConfig {
            grid_dim: (grid(c, 128)?, grid(len.max(1), t_per_block)?, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (li, ci, ki) = (i32_of(len, "L")?, i32_of(c, "C")?, i32_of(k, "K")?);
        let (silu, tpb) = (self.silu as i32, t_per_block as i32);
        let mut a = func.builder();
        a.arg(&x);
        a.arg(&sxb);
        a.arg(&sxt);
        a.arg(&wv);
        bv.push(&mut a);
        sv.push(&mut a);
        a.arg(&y);
        a.arg(&state_out);
        a.arg(&li);
        a.arg(&ci);
        a.arg(&ki);
        a.arg(&silu);
        a.arg(&tpb);
        // SAFETY: argument list matches mamba2_conv_fwd_* in kernels/conv.cu.
        unsafe { a.launch(cfg) }.w()?;
        *self
            .new_state
            .lock()
            .map_err(|_| cpu_only_error("conv lock"))? = Some(wrap(state_out, dev, &[b, c, k]));
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((b, len, c)),
        ))
    }
}

impl CustomOp1 for ConvFwd {
    fn name(&self) -> &'static str {
        "mamba2-conv-fwd"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(s.dtype(), self.name(), T => self.launch::<T>(s, l))
    }
}

/// Causal depthwise conv (+ SiLU if `silu`) of `x [B, L, C]` with f32 `weight [C, K]`, `bias [C]`
/// and incoming `state [B, C, K]`. Returns `(y [B, L, C] in x's dtype, new state [B, C, K] f32)`.
pub fn conv_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: Option<&Tensor>,
    silu: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = ConvFwd {
        weight: weight.clone(),
        bias: bias.cloned(),
        state: state.cloned(),
        silu,
        new_state: Mutex::new(None),
    };
    let y = x.apply_op1_no_bwd(&op)?;
    let s = take(&op.new_state, "conv state")?;
    Ok((y, s))
}

// ------------------------------------------------------------------------------------------
// Causal depthwise conv (+ SiLU), one decoding step, in place on the conv state.

struct ConvStep {
    x: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    silu: bool,
    y: Mutex<Option<Tensor>>,
}

impl ConvStep {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        state: &mut CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let dev = state.device.clone();
        let (b, c, k) = sl.shape().dims3()?;
        let Some((o1, o2)) = sl.contiguous_offsets() else {
            bail!("mamba2-conv-step: conv state is not contiguous")
        };
        let xs = Side::new(&self.x, "conv step input");
        let (xoff, sxb) = match xs.layout.stride() {
            &[sb, 1] => (xs.layout.start_offset(), sb as i64),
            other => {
                bail!("mamba2-conv-step: input strides {other:?}, channels must be contiguous")
            }
        };
        let Storage::Cuda(xst) = &*xs.guard else {
            bail!("mamba2-conv-step: input is not on a CUDA device")
        };
        let xv = xst.as_cuda_slice::<T>()?.slice(xoff..);
        let w = Side::new(&self.weight, "conv1d.weight");
        let bias = self.bias.as_ref().map(|t| Side::new(t, "conv1d.bias"));
        let (wv, bv) = (w.view::<f32>()?, opt_view::<f32>(&bias)?);
        // SAFETY: fully written by the kernel.
        let y = unsafe { dev.alloc::<T>(b * c)? };
        let func = load!(
            CONV,
            dev,
            &format!("mamba2_conv_step_{}", suffix(T::DTYPE)?)
        )?;
        let mut sv = state.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        let cfg = LaunchConfig::for_num_elems(
            u32::try_from(b * c).map_err(|_| cpu_only_error("conv step size"))?,
        );
        let (bi, ci, ki, silu) = (
            i32_of(b, "B")?,
            i32_of(c, "C")?,
            i32_of(k, "K")?,
            self.silu as i32,
        );
        let mut a = func.builder();
        a.arg(&xv);
        a.arg(&sxb);
        a.arg(&wv);
        bv.push(&mut a);
        a.arg(&mut sv);
        a.arg(&y);
        a.arg(&bi);
        a.arg(&ci);
        a.arg(&ki);
        a.arg(&silu);
        // SAFETY: argument list matches mamba2_conv_step_* in kernels/conv.cu.
        unsafe { a.launch(cfg) }.w()?;
        *self
            .y
            .lock()
            .map_err(|_| cpu_only_error("conv step lock"))? = Some(wrap(y, &dev, &[b, c]));
        Ok(())
    }
}

impl InplaceOp1 for ConvStep {
    fn name(&self) -> &'static str {
        "mamba2-conv-step"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        by_dtype!(self.x.dtype(), self.name(), T => self.launch::<T>(s, l))
    }
}

/// One conv step: shifts `x [B, C]` into `state [B, C, K]` (f32, contiguous, updated in place;
/// it must not share storage with the other inputs) and returns `y [B, C]` in x's dtype.
pub fn conv_step(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: &Tensor,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let op = ConvStep {
        x: x.clone(),
        weight: weight.clone(),
        bias: bias.cloned(),
        silu,
        y: Mutex::new(None),
    };
    state.inplace_op1(&op)?;
    take(&op.y, "conv step output")
}
