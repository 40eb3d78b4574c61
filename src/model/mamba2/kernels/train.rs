//! The chunked SSD scan under autograd: one differentiable op, tensor-core forward and backward
//! kernels (kernels/ssd_bwd.cu).

use super::*;

// ------------------------------------------------------------------------------------------
// SSD chunked scan under autograd: tensor-core forward and backward (kernels/ssd_bwd.cu).

/// Shared memory of the backward passes 3a / 3b (ssd_bwd.cu), in bytes: five [64] f32 rows; the
/// fixed side's two tiles, the loop's end tile twice and its middle tile.
fn tc_bwd_smem(head_dim: usize, d_state: usize) -> usize {
    let (ldn, ldpx) = (d_state + TC_PAD, head_dim + TC_PAD);
    4 * 5 * TC_J + 2 * (3 * TC_J * ldn + 2 * TC_J * ldpx)
}

/// Whether the training scan (tensor-core forward + backward kernels) takes these sizes: those
/// of the tensor-core forward.
pub fn ssd_train_supported(dtype: DType, head_dim: usize, d_state: usize) -> bool {
    ssd_tc_shape(dtype, head_dim, d_state)
}

/// What the training op hands from its forward to its backward, and to the caller.
#[derive(Default)]
struct TrainSlots {
    /// Chunk-local cumsums `[B*H*nc*Q]`, chunk states `[B*H*nc*P*N]` and (with a gate) the
    /// output before the gate `[B*L*H*P]`, from the forward.
    saved: Mutex<Option<(Tensor, Tensor, Option<Tensor>)>>,
    final_state: Mutex<Option<Tensor>>,
}

/// The chunked scan as one differentiable op over three tensors (candle's custom ops take at
/// most three): `xbc [B, L, H*P + 2*G*N]` (x, B, C packed, as the mixer's conv output is), the
/// gate `z [B, L, H, P]` (or any one-element tensor for none), and `dtad [B*L*H + 2*H]` f32 (dt,
/// then A, then D); all contiguous. Output `y [B, L, H, P]`. The initial state is held (it gets
/// no gradient).
struct ScanTrain {
    dims: (usize, usize, usize, usize),
    chunk: usize,
    gated: bool,
    initial: Option<Tensor>,
    slots: std::sync::Arc<TrainSlots>,
}

fn contiguous_start(l: &Layout, what: &str) -> candle_core::Result<usize> {
    match l.contiguous_offsets() {
        Some((o, _)) => Ok(o),
        None => bail!("mamba2-ssd-train: {what} is not contiguous"),
    }
}

impl ScanTrain {
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        zs: &CudaStorage,
        zl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &xs.device;
        let (h, p, g, n) = self.dims;
        let (batch, len, conv) = xl.shape().dims3()?;
        let (hp, gn, blh) = (h * p, g * n, batch * len * h);
        if conv != hp + 2 * gn {
            bail!(
                "mamba2-ssd-train: xbc has {conv} channels, expected {}",
                hp + 2 * gn
            );
        }
        if dl.shape().elem_count() != blh + 2 * h {
            bail!(
                "mamba2-ssd-train: dtad has {} elements, expected {}",
                dl.shape().elem_count(),
                blh + 2 * h
            );
        }
        let op = "mamba2-ssd-train";
        if g == 0 || h % g != 0 {
            bail!("{op}: {h} heads are not a multiple of {g} groups");
        }
        if self.gated && zl.shape().elem_count() != batch * len * hp {
            bail!(
                "{op}: gate z has shape {:?}, expected [{batch}, {len}, {h}, {p}]",
                zl.dims()
            );
        }
        if let Some(s) = &self.initial {
            check_elems(s, batch * h * p * n, op, "initial state")?;
        }
        let xo = contiguous_start(xl, "xbc")?;
        let zo = contiguous_start(zl, "z")?;
        if xo % 8 != 0 || (self.gated && zo % 8 != 0) {
            bail!("mamba2-ssd-train: xbc or z does not start on 16 bytes");
        }
        let dto = contiguous_start(dl, "dtad")?;
        let xv = xs.as_cuda_slice::<T>()?;
        let dv = ds.as_cuda_slice::<f32>()?;
        let init = self.initial.as_ref().map(|t| Side::new(t, "initial state"));
        let args = ScanArgs {
            x: xv.slice(xo..),
            ldx: conv,
            b: xv.slice(xo + hp..),
            c: xv.slice(xo + hp + gn..),
            ldbc: conv,
            dt: dv.slice(dto..dto + blh),
            a: dv.slice(dto + blh..dto + blh + h),
            d: Opt::Some(dv.slice(dto + blh + h..dto + blh + 2 * h)),
            z: if self.gated {
                Opt::Some(zs.as_cuda_slice::<T>()?.slice(zo..))
            } else {
                Opt::Null(0)
            },
            init: opt_view::<f32>(&init)?,
            keep_ypre: self.gated,
            batch,
            len,
            h,
            g,
            p,
            n,
            chunk: self.chunk,
        };
        let out = scan_forward(dev, &args, true)?;
        let (nq, npn) = (out.cum.len(), out.states.len());
        let ypre = out.ypre.map(|v| wrap(v, dev, &[batch * len * hp]));
        *self
            .slots
            .saved
            .lock()
            .map_err(|_| cpu_only_error("ssd lock"))? = Some((
            wrap(out.cum, dev, &[nq]),
            wrap(out.states, dev, &[npn]),
            ypre,
        ));
        *self
            .slots
            .final_state
            .lock()
            .map_err(|_| cpu_only_error("ssd lock"))? =
            Some(wrap(out.final_state, dev, &[batch, h, p, n]));
        Ok((
            CudaStorage::wrap_cuda_slice(out.y, dev.clone()),
            Shape::from((batch, len, h, p)),
        ))
    }

    /// Gradients of xbc, z (when gated) and dtad from dy: the gate's backward, then passes
    /// 1-4 of ssd_bwd.cu.
    fn backward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xbc: &Tensor,
        z: &Tensor,
        dtad: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let (h, p, g, n) = self.dims;
        let (batch, len, conv) = xbc.dims3()?;
        let (hp, gn, pn, blh) = (h * p, g * n, p * n, batch * len * h);
        let (cum_t, states_t, ypre_t) = self
            .slots
            .saved
            .lock()
            .map_err(|_| cpu_only_error("ssd lock"))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("mamba2-ssd-train: backward before forward".into())
            })?;
        let dy = dy.contiguous()?;
        let (xs, dts, dys, cums, sts) = (
            Side::new(xbc, "xbc"),
            Side::new(dtad, "dtad"),
            Side::new(&dy, "dy"),
            Side::new(&cum_t, "cumsums"),
            Side::new(&states_t, "chunk states"),
        );
        let Storage::Cuda(cs) = &*xs.guard else {
            bail!("mamba2-ssd-train: xbc is not on a CUDA device")
        };
        let dev = &cs.device;
        let xv = xs.view::<T>()?;
        let (x, b, c) = (xv.slice(0..), xv.slice(hp..), xv.slice(hp + gn..));
        let (dtadv, cum, states) = (dts.view::<f32>()?, cums.view::<f32>()?, sts.view::<f32>()?);
        let (dtv, av, dv) = (
            dtadv.slice(0..blh),
            dtadv.slice(blh..blh + h),
            dtadv.slice(blh + h..blh + 2 * h),
        );
        let sfx = suffix(T::DTYPE)?;
        let load = |name: String| load!(SSD_BWD, dev, &name);

        // The gate: dy before it, and dz.
        let ny = batch * len * hp;
        let gate = match (&ypre_t, self.gated) {
            (Some(ypre), true) => {
                let (zs, ys) = (Side::new(z, "z"), Side::new(ypre, "pre-gate output"));
                // SAFETY: fully written by the gate kernel.
                let dypre = unsafe { dev.alloc::<T>(ny)? };
                let dz = unsafe { dev.alloc::<T>(ny)? };
                let f = load(format!("mamba2_ssd_bwd_gate_{sfx}"))?;
                let (dyv, zv, yv) = (dys.view::<T>()?, zs.view::<T>()?, ys.view::<T>()?);
                let nl = ny as i64;
                let mut a = f.builder();
                a.arg(&dyv);
                a.arg(&zv);
                a.arg(&yv);
                a.arg(&dypre);
                a.arg(&dz);
                a.arg(&nl);
                let cfg = LaunchConfig {
                    grid_dim: (grid(ny / 8, 256)?, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument list matches mamba2_ssd_bwd_gate_* in kernels/ssd_bwd.cu.
                unsafe { a.launch(cfg) }.w()?;
                Some((dypre, dz))
            }
            (None, true) => bail!("mamba2-ssd-train: the pre-gate output was not kept"),
            _ => None,
        };
        let dy_own;
        let dyv = match &gate {
            Some((dypre, _)) => dypre.slice(0..),
            None => {
                dy_own = dys.view::<T>()?;
                dy_own.slice(0..)
            }
        };

        let q = self.chunk.min(len);
        let nc = len.div_ceil(q);
        let bh = batch * h;
        let shared_groups = h / g > 1;
        // SAFETY: ds, dcum_* and (without shared groups) dxbc are fully written by the kernels
        // before they are read (passes 1, 3a and 3b cover every position).
        let ds = unsafe { dev.alloc::<f32>(bh * nc * pn)? };
        let dxbc = unsafe { dev.alloc::<T>(batch * len * conv)? };
        let dcum_src = unsafe { dev.alloc::<f32>(bh * nc * q)? };
        let dcum_dst = unsafe { dev.alloc::<f32>(bh * nc * q)? };
        let dcl = dev.alloc_zeros::<f32>(bh * nc)?;
        // ddt, then dA, then dD, as dtad is laid out (dA and dD are sums by atomics).
        let ddtad = dev.alloc_zeros::<f32>(blh + 2 * h)?;
        let scratch = if shared_groups {
            Some(dev.alloc_zeros::<f32>(2 * batch * len * gn)?)
        } else {
            None
        };

        let [li, hi, gi, pi, ni, qi, nci] = ssd_dims_i32(len, h, g, p, n, q, nc)?;
        let ld = conv as i64;
        let bhu = u32::try_from(bh).map_err(|_| cpu_only_error("batch * heads"))?;

        // 1. dS^in per chunk.
        let f1 = load(format!("mamba2_ssd_bwd_dstates_{sfx}_f{}", tc_tiles(n)))?;
        let smem1 = tc_chunk_state_smem(p, n, q);
        allow_smem(dev, &f1, smem1)?;
        let mut a1 = f1.builder();
        a1.arg(&dyv);
        a1.arg(&cum);
        a1.arg(&c);
        a1.arg(&ld);
        a1.arg(&ds);
        for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci] {
            a1.arg(v);
        }
        let cfg1 = LaunchConfig {
            grid_dim: (nc as u32, bhu, 1),
            block_dim: (tc_chunk_state_threads(p), 1, 1),
            shared_mem_bytes: smem1 as u32,
        };
        // SAFETY: argument list matches mamba2_ssd_bwd_dstates_* in kernels/ssd_bwd.cu.
        unsafe { a1.launch(cfg1) }.w()?;

        // 2. the recurrence backwards: ds becomes dOwn; W into dcl.
        let f2 = load("mamba2_ssd_bwd_state_passing".into())?;
        let pni = i32_of(pn, "P * N")?;
        let null = 0u64;
        let mut a2 = f2.builder();
        a2.arg(&ds);
        a2.arg(&states);
        a2.arg(&cum);
        a2.arg(&dcl);
        a2.arg(&null);
        a2.arg(&nci);
        a2.arg(&qi);
        a2.arg(&li);
        a2.arg(&pni);
        let cfg2 = LaunchConfig {
            grid_dim: (grid(pn, NTHREADS as usize)?, bhu, 1),
            block_dim: (NTHREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches mamba2_ssd_bwd_state_passing in kernels/ssd_bwd.cu.
        unsafe { a2.launch(cfg2) }.w()?;

        // 3a / 3b. Writes go through views of dxbc at the column offsets of x, B and C (the
        // kernels write rows `conv` apart from there).
        let f3 = tc_tiles(p.max(n));
        let smem3 = tc_bwd_smem(p, n);
        let row_tiles = q.div_ceil(TC_ROWS);
        let rti = i32_of(row_tiles, "row tiles")?;
        let cfg3 = LaunchConfig {
            grid_dim: (grid(nc * row_tiles, 1)?, bhu, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem3 as u32,
        };
        let (ddt, da, dd) = (
            ddtad.slice(0..blh),
            ddtad.slice(blh..blh + h),
            ddtad.slice(blh + h..blh + 2 * h),
        );
        let (dx_v, db_v, dc_v) = (dxbc.slice(0..), dxbc.slice(hp..), dxbc.slice(hp + gn..));
        let (db_f, dc_f) = match &scratch {
            Some(s) => (
                Opt::Some(s.slice(0..batch * len * gn)),
                Opt::Some(s.slice(batch * len * gn..)),
            ),
            None => (Opt::Null(0), Opt::Null(0)),
        };
        let (db_t, dc_t) = if shared_groups {
            (Opt::Null(0), Opt::Null(0))
        } else {
            (Opt::Some(db_v), Opt::Some(dc_v))
        };

        let f3a = load(format!("mamba2_ssd_bwd_dx_db_{sfx}_f{f3}"))?;
        allow_smem(dev, &f3a, smem3)?;
        let mut a3 = f3a.builder();
        a3.arg(&x);
        a3.arg(&ld);
        a3.arg(&dtv);
        a3.arg(&cum);
        a3.arg(&b);
        a3.arg(&c);
        a3.arg(&ld);
        a3.arg(&dyv);
        a3.arg(&ds);
        a3.arg(&dv);
        a3.arg(&dx_v);
        a3.arg(&ld);
        db_t.push(&mut a3);
        db_f.push(&mut a3);
        a3.arg(&ld);
        a3.arg(&ddt);
        a3.arg(&dcum_src);
        a3.arg(&dcl);
        for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci, &rti] {
            a3.arg(v);
        }
        // SAFETY: argument list matches mamba2_ssd_bwd_dx_db_* in kernels/ssd_bwd.cu.
        unsafe { a3.launch(cfg3) }.w()?;

        let f3b = load(format!("mamba2_ssd_bwd_dc_{sfx}_f{f3}"))?;
        allow_smem(dev, &f3b, smem3)?;
        let mut a4 = f3b.builder();
        a4.arg(&x);
        a4.arg(&ld);
        a4.arg(&dtv);
        a4.arg(&cum);
        a4.arg(&b);
        a4.arg(&c);
        a4.arg(&ld);
        a4.arg(&dyv);
        a4.arg(&states);
        dc_t.push(&mut a4);
        dc_f.push(&mut a4);
        a4.arg(&ld);
        a4.arg(&dcum_dst);
        a4.arg(&dd);
        for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci, &rti] {
            a4.arg(v);
        }
        // SAFETY: argument list matches mamba2_ssd_bwd_dc_* in kernels/ssd_bwd.cu.
        unsafe { a4.launch(cfg3) }.w()?;

        // 4. dcum -> ddt, dA.
        let f4 = load("mamba2_ssd_bwd_dcum".into())?;
        let mut a5 = f4.builder();
        a5.arg(&dcum_src);
        a5.arg(&dcum_dst);
        a5.arg(&dcl);
        a5.arg(&dtv);
        a5.arg(&av);
        a5.arg(&ddt);
        a5.arg(&da);
        for v in [&li, &hi, &qi, &nci] {
            a5.arg(v);
        }
        let cfg5 = LaunchConfig {
            grid_dim: (nc as u32, bhu, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches mamba2_ssd_bwd_dcum in kernels/ssd_bwd.cu.
        unsafe { a5.launch(cfg5) }.w()?;

        // Group-summed dB / dC from the f32 scratch into dxbc.
        if let Some(s) = &scratch {
            let fc = load(format!("mamba2_ssd_bwd_cast_{sfx}"))?;
            let (rows, cols) = (i32_of(batch * len, "B * L")?, i32_of(gn, "G * N")?);
            for (half, col) in [(0, hp), (1, hp + gn)] {
                let src = s.slice(half * batch * len * gn..(half + 1) * batch * len * gn);
                let dst = dxbc.slice(col..);
                let mut ac = fc.builder();
                ac.arg(&src);
                ac.arg(&dst);
                ac.arg(&ld);
                ac.arg(&rows);
                ac.arg(&cols);
                let cfg = LaunchConfig {
                    grid_dim: (grid(batch * len * gn, 256)?, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument list matches mamba2_ssd_bwd_cast_* in kernels/ssd_bwd.cu.
                unsafe { ac.launch(cfg) }.w()?;
            }
        }
        let dz = gate.map(|(_, dz)| wrap(dz, dev, &[batch, len, h, p]));
        Ok((
            wrap(dxbc, dev, &[batch, len, conv]),
            dz,
            wrap(ddtad, dev, &[blh + 2 * h]),
        ))
    }
}

impl CustomOp3 for ScanTrain {
    fn name(&self) -> &'static str {
        "mamba2-ssd-train"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        zs: &CudaStorage,
        zl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match xs.dtype() {
            DType::F16 => self.fwd::<half::f16>(xs, xl, zs, zl, ds, dl),
            DType::BF16 => self.fwd::<half::bf16>(xs, xl, zs, zl, ds, dl),
            other => bail!("mamba2-ssd-train: unsupported dtype {other:?} (f16, bf16)"),
        }
    }
    fn bwd(
        &self,
        xbc: &Tensor,
        z: &Tensor,
        dtad: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dz, ddtad) = match xbc.dtype() {
            DType::F16 => self.backward::<half::f16>(xbc, z, dtad, dy)?,
            DType::BF16 => self.backward::<half::bf16>(xbc, z, dtad, dy)?,
            other => bail!("mamba2-ssd-train: unsupported dtype {other:?} (f16, bf16)"),
        };
        Ok((Some(dx), dz, Some(ddtad)))
    }
}

/// The chunked scan under autograd: `xbc [B, L, H*P + 2*G*N]` (x, B, C packed; f16/bf16,
/// contiguous), the gate `z [B, L, H, P]` (xbc's dtype, contiguous) or `None`, `dtad [B*L*H +
/// 2*H]` f32 (dt, A, D); `initial [B, H, P, N]` f32 (no gradient). Returns `(y [B, L, H, P],
/// final state)`; y's backward gives the gradients of xbc, z and dtad (kernels/ssd_bwd.cu).
pub fn ssd_chunked_train(
    xbc: &Tensor,
    z: Option<&Tensor>,
    dtad: &Tensor,
    dims: (usize, usize, usize, usize),
    chunk: usize,
    initial: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let slots = std::sync::Arc::new(TrainSlots::default());
    let op = ScanTrain {
        dims,
        chunk,
        gated: z.is_some(),
        initial: initial.cloned(),
        slots: slots.clone(),
    };
    // Without a gate the op's second argument is a one-element stand-in that gets no gradient.
    let none = Tensor::zeros(1, xbc.dtype(), xbc.device())?;
    let y = xbc.apply_op3(z.unwrap_or(&none), dtad, op)?;
    let s = take(&slots.final_state, "final SSM state")?;
    Ok((y, s))
}
