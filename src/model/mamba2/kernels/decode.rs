//! Decode: one token, the SSM state updated in place (kernels/ssd.cu).

use super::*;

// ------------------------------------------------------------------------------------------
// Decode: one token, in place on the SSM state.

struct StateUpdate {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Option<Tensor>,
    z: Option<Tensor>,
    y: Mutex<Option<Tensor>>,
}

impl StateUpdate {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        state: &mut CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let dev = state.device.clone();
        let (batch, h, p, n) = sl.shape().dims4()?;
        let g = self.b.dim(1)?;
        let Some((o1, o2)) = sl.contiguous_offsets() else {
            bail!("mamba2-state-update: SSM state is not contiguous")
        };
        let (xs, dt, a, bs, cs) = (
            Side::new(&self.x, "x"),
            Side::new(&self.dt, "dt"),
            Side::new(&self.a, "A"),
            Side::new(&self.b, "B"),
            Side::new(&self.c, "C"),
        );
        let d = self.d.as_ref().map(|t| Side::new(t, "D"));
        let z = self.z.as_ref().map(|t| Side::new(t, "z"));
        let (xv, dtv, av, bv, cv) = (
            xs.view::<T>()?,
            dt.view::<f32>()?,
            a.view::<f32>()?,
            bs.view::<T>()?,
            cs.view::<T>()?,
        );
        let (dv, zv) = (opt_view::<f32>(&d)?, opt_view::<T>(&z)?);
        // SAFETY: fully written by the kernel.
        let y = unsafe { dev.alloc::<T>(batch * h * p)? };
        // The float4 variant (a warp per 8 rows of one head, 16-byte state accesses) wherever
        // d_state and the state's offset allow 16-byte accesses, a row fits one warp and 8 rows
        // divide a head.
        let v4 = n % 4 == 0 && n <= 128 && p % 8 == 0 && o1 % 4 == 0;
        let func = load!(
            SSD,
            dev,
            &format!(
                "mamba2_ssd_state_update{}_{}",
                if v4 { "_v4" } else { "" },
                suffix(T::DTYPE)?
            ),
        )?;
        let mut sv = state.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        let rows = batch * h * p;
        let warps = if v4 { rows.div_ceil(8) } else { rows };
        let cfg = LaunchConfig {
            grid_dim: (grid(warps * 32, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (bi, hi, gi, pi, ni) = (
            i32_of(batch, "B")?,
            i32_of(h, "H")?,
            i32_of(g, "G")?,
            i32_of(p, "P")?,
            i32_of(n, "N")?,
        );
        let mut args = func.builder();
        args.arg(&mut sv);
        args.arg(&xv);
        args.arg(&dtv);
        args.arg(&av);
        args.arg(&bv);
        args.arg(&cv);
        dv.push(&mut args);
        zv.push(&mut args);
        args.arg(&y);
        for v in [&bi, &hi, &gi, &pi, &ni] {
            args.arg(v);
        }
        // SAFETY: argument list matches mamba2_ssd_state_update{,_v4}_* in kernels/ssd.cu.
        unsafe { args.launch(cfg) }.w()?;
        *self
            .y
            .lock()
            .map_err(|_| cpu_only_error("state update lock"))? =
            Some(wrap(y, &dev, &[batch, h, p]));
        Ok(())
    }
}

impl InplaceOp1 for StateUpdate {
    fn name(&self) -> &'static str {
        "mamba2-state-update"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        by_dtype!(self.x.dtype(), self.name(), T => self.launch::<T>(s, l))
    }
}

/// One decoding step in place on `state [B, H, P, N]` (f32, contiguous, not sharing storage
/// with the other inputs): `x [B, H, P]`, `b`, `c [B, G, N]`, `z [B, H, P]` (x's dtype,
/// contiguous), `dt [B, H]`, `a [H]`, `d [H]` f32. Returns `y [B, H, P]` in x's dtype.
#[allow(clippy::too_many_arguments)]
pub fn ssd_state_update(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    state: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = StateUpdate {
        x: x.clone(),
        dt: dt.clone(),
        a: a.clone(),
        b: b.clone(),
        c: c.clone(),
        d: d.cloned(),
        z: z.cloned(),
        y: Mutex::new(None),
    };
    state.inplace_op1(&op)?;
    take(&op.y, "state update output")
}

/// `softplus(dt_raw + bias)` clamped to `[lo, hi]`, f32 `[B, H]`: `dt_raw [B, H]` in the model
/// dtype with contiguous heads (rows may be strided: the dt columns of in_proj's output),
/// `bias [H]` f32.
pub fn dt_softplus(
    dt_raw: &Tensor,
    bias: &Tensor,
    lo: f32,
    hi: f32,
) -> candle_core::Result<Tensor> {
    let (rows, h) = dt_raw.dims2()?;
    check_elems(bias, h, "dt-softplus", "dt_bias")?;
    by_dtype!(dt_raw.dtype(), "dt-softplus", T => {
        let (raw, bs) = (Side::new(dt_raw, "dt"), Side::new(bias, "dt_bias"));
        let dev = raw.device()?;
        let (view, strides) = raw.strided_view::<T>()?;
        if strides[1] != 1 {
            bail!("dt-softplus: dt's heads are not contiguous (strides {strides:?})");
        }
        let bias_view = bs.view::<f32>()?;
        // SAFETY: fully written by the kernel.
        let out = unsafe { dev.alloc::<f32>(rows * h)? };
        let func = load!(SSD, dev, &format!("mamba2_dt_softplus_{}", suffix(T::DTYPE)?))?;
        let cfg = LaunchConfig {
            grid_dim: (grid(rows * h, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s_row, rows_i, h_i) = (strides[0] as i64, i32_of(rows, "B")?, i32_of(h, "H")?);
        let mut args = func.builder();
        args.arg(&view);
        args.arg(&s_row);
        args.arg(&bias_view);
        args.arg(&out);
        args.arg(&rows_i);
        args.arg(&h_i);
        args.arg(&lo);
        args.arg(&hi);
        // SAFETY: the argument list matches mamba2_dt_softplus_* in kernels/ssd.cu; the view
        // covers rows x H at stride s_row (checked by strided_view).
        unsafe { args.launch(cfg) }.w()?;
        Ok(wrap(out, &dev, &[rows, h]))
    })
}
