//! The chunked SSD scan for inference: chunk states, state passing, chunk scan (kernels/ssd.cu,
//! SIMT; kernels/ssd_tc.cu, tensor cores), and the pass launcher the training op shares.

use super::*;

// ------------------------------------------------------------------------------------------
// SSD chunked scan, prefill.

/// The scan over `(x, B, C)`; holds dt `[B, L, H]`, A `[H]`, D `[H]`, the initial state
/// `[B, H, P, N]` (all f32, contiguous) and the gate z `[B, L, H, P]` (x's dtype); returns the
/// final state through `final_state`.
struct Scan {
    dt: Tensor,
    a: Tensor,
    d: Option<Tensor>,
    z: Option<Tensor>,
    initial: Option<Tensor>,
    chunk: usize,
    /// The tensor-core passes where they apply (the caller's policy).
    tensor_cores: bool,
    final_state: Mutex<Option<Tensor>>,
}

/// The device buffers and sizes of one forward scan (shared by the inference op [`Scan`] and
/// the training op [`ScanTrain`]). x rows (time steps) are `ldx` elements apart, B and C rows
/// `ldbc` (they may be column blocks of one packed xBC tensor).
pub(super) struct ScanArgs<'a, T> {
    pub(super) x: CudaView<'a, T>,
    pub(super) ldx: usize,
    pub(super) b: CudaView<'a, T>,
    pub(super) c: CudaView<'a, T>,
    pub(super) ldbc: usize,
    pub(super) dt: CudaView<'a, f32>,
    pub(super) a: CudaView<'a, f32>,
    pub(super) d: Opt<'a, f32>,
    pub(super) z: Opt<'a, T>,
    pub(super) init: Opt<'a, f32>,
    /// Also write the output before the gate (tensor-core path; the backward of the gate).
    pub(super) keep_ypre: bool,
    pub(super) batch: usize,
    pub(super) len: usize,
    pub(super) h: usize,
    pub(super) g: usize,
    pub(super) p: usize,
    pub(super) n: usize,
    pub(super) chunk: usize,
}

/// What a forward scan leaves: the output, the final state, and (for the backward) the
/// chunk-local cumsums of dt A `[B*H, nc, Q]` and the state before each chunk `[B*H, nc, P, N]`.
pub(super) struct ScanOut<T> {
    pub(super) y: CudaSlice<T>,
    pub(super) ypre: Option<CudaSlice<T>>,
    pub(super) final_state: CudaSlice<f32>,
    pub(super) cum: CudaSlice<f32>,
    pub(super) states: CudaSlice<f32>,
}

/// The three passes of the chunked scan: chunk states (and cumsums), state passing, chunk scan;
/// on tensor cores when `tc`, else the SIMT kernels (which need x, B, C contiguous).
pub(super) fn scan_forward<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    s: &ScanArgs<'_, T>,
    tc: bool,
) -> candle_core::Result<ScanOut<T>> {
    let (batch, len, h, g, p, n) = (s.batch, s.len, s.h, s.g, s.p, s.n);
    if !tc && (s.ldx != h * p || s.ldbc != g * n) {
        bail!("mamba2-ssd: the SIMT kernels need x, B and C contiguous");
    }
    let q = s.chunk.min(len);
    let nc = len.div_ceil(q);
    let pn = p * n;
    // SAFETY: each buffer is written by a kernel before it is read, at the positions read.
    let cum = unsafe { dev.alloc::<f32>(batch * h * nc * q)? };
    let states = unsafe { dev.alloc::<f32>(batch * h * nc * pn)? };
    let final_state = unsafe { dev.alloc::<f32>(batch * h * pn)? };
    let y = unsafe { dev.alloc::<T>(batch * len * h * p)? };
    let ypre = if s.keep_ypre && tc {
        Some(unsafe { dev.alloc::<T>(batch * len * h * p)? })
    } else {
        None
    };
    let sfx = suffix(T::DTYPE)?;
    let [li, hi, gi, pi, ni, qi, nci] = ssd_dims_i32(len, h, g, p, n, q, nc)?;
    let (ldx, ldbc) = (s.ldx as i64, s.ldbc as i64);
    let bh = u32::try_from(batch * h).map_err(|_| cpu_only_error("batch * heads"))?;

    // 1. chunk cumsums and per-chunk states.
    let (f1, smem1, threads1) = if tc {
        let name = format!("mamba2_ssd_tc_chunk_state_{sfx}_f{}", tc_tiles(n));
        let f = load!(SSD_TC, dev, &name)?;
        (f, tc_chunk_state_smem(p, n, q), tc_chunk_state_threads(p))
    } else {
        let name = format!("mamba2_ssd_chunk_state_{sfx}");
        let f = load!(SSD, dev, &name)?;
        (f, chunk_state_smem(p, n, q), NTHREADS)
    };
    allow_smem(dev, &f1, smem1)?;
    let mut a1 = f1.builder();
    a1.arg(&s.x);
    if tc {
        a1.arg(&ldx);
    }
    a1.arg(&s.dt);
    a1.arg(&s.a);
    a1.arg(&s.b);
    if tc {
        a1.arg(&ldbc);
    }
    a1.arg(&cum);
    a1.arg(&states);
    for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci] {
        a1.arg(v);
    }
    let cfg1 = LaunchConfig {
        grid_dim: (nc as u32, bh, 1),
        block_dim: (threads1, 1, 1),
        shared_mem_bytes: smem1 as u32,
    };
    // SAFETY: argument list matches mamba2_ssd{,_tc}_chunk_state_* in kernels/ssd{,_tc}.cu.
    unsafe { a1.launch(cfg1) }.w()?;

    // 2. state passing: each chunk's slot becomes the state before it; the final state.
    let f2 = load!(SSD, dev, "mamba2_ssd_state_passing")?;
    let pni = i32_of(pn, "P * N")?;
    let mut a2 = f2.builder();
    a2.arg(&states);
    a2.arg(&cum);
    s.init.push(&mut a2);
    a2.arg(&final_state);
    a2.arg(&nci);
    a2.arg(&qi);
    a2.arg(&li);
    a2.arg(&pni);
    let cfg2 = LaunchConfig {
        grid_dim: (grid(pn, NTHREADS as usize)?, bh, 1),
        block_dim: (NTHREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches mamba2_ssd_state_passing in kernels/ssd.cu.
    unsafe { a2.launch(cfg2) }.w()?;

    // 3. chunk scan: outputs.
    let (f3, rows, threads3, smem3) = if tc {
        let name = format!("mamba2_ssd_tc_chunk_scan_{sfx}_p{}", p / 8);
        let f = load!(SSD_TC, dev, &name)?;
        (f, TC_ROWS, 128, tc_chunk_scan_smem(p, n))
    } else {
        let name = format!("mamba2_ssd_chunk_scan_{sfx}");
        let f = load!(SSD, dev, &name)?;
        (f, RT, NTHREADS, chunk_scan_smem(p, n))
    };
    allow_smem(dev, &f3, smem3)?;
    let row_tiles = q.div_ceil(rows);
    let rti = i32_of(row_tiles, "row tiles")?;
    let mut a3 = f3.builder();
    a3.arg(&s.x);
    if tc {
        a3.arg(&ldx);
    }
    a3.arg(&s.dt);
    a3.arg(&cum);
    a3.arg(&s.b);
    a3.arg(&s.c);
    if tc {
        a3.arg(&ldbc);
    }
    a3.arg(&states);
    s.d.push(&mut a3);
    s.z.push(&mut a3);
    a3.arg(&y);
    let null = 0u64;
    if tc {
        match &ypre {
            Some(v) => a3.arg(v),
            None => a3.arg(&null),
        };
    }
    for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci, &rti] {
        a3.arg(v);
    }
    let cfg3 = LaunchConfig {
        grid_dim: (grid(nc * row_tiles, 1)?, bh, 1),
        block_dim: (threads3, 1, 1),
        shared_mem_bytes: smem3 as u32,
    };
    // SAFETY: argument list matches mamba2_ssd{,_tc}_chunk_scan_* in kernels/ssd{,_tc}.cu.
    unsafe { a3.launch(cfg3) }.w()?;
    Ok(ScanOut {
        y,
        ypre,
        final_state,
        cum,
        states,
    })
}

impl Scan {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &xs.device;
        let (batch, len, h, p) = xl.shape().dims4()?;
        let (_, _, g, n) = bl.shape().dims4()?;
        let offset = |l: &Layout, what: &str| -> candle_core::Result<usize> {
            match l.contiguous_offsets() {
                Some((o, _)) => Ok(o),
                None => bail!("mamba2-ssd: {what} is not contiguous"),
            }
        };
        let offsets = [offset(xl, "x")?, offset(bl, "B")?, offset(cl, "C")?];
        if cl.shape() != bl.shape() || bl.dims()[..2] != [batch, len] {
            bail!(
                "mamba2-ssd: B has shape {:?} and C {:?}, expected [{batch}, {len}, G, N]",
                bl.dims(),
                cl.dims()
            );
        }
        let op = "mamba2-ssd";
        check_elems(&self.dt, batch * len * h, op, "dt")?;
        check_elems(&self.a, h, op, "A")?;
        if let Some(d) = &self.d {
            check_elems(d, h, op, "D")?;
        }
        if let Some(z) = &self.z {
            check_elems(z, batch * len * h * p, op, "gate z")?;
        }
        if let Some(s) = &self.initial {
            check_elems(s, batch * h * p * n, op, "initial state")?;
        }
        let tc = self.tensor_cores && ssd_tc_supported(T::DTYPE, p, n, offsets);
        if !tc && !ssd_supported(p, n, self.chunk.min(len)) {
            bail!(
                "mamba2-ssd: head_dim {p}, d_state {n}, chunk {} do not fit the SIMT kernels \
                 and the tensor-core passes do not apply (dtype {:?}, offsets {offsets:?})",
                self.chunk,
                T::DTYPE
            );
        }
        let dt = Side::new(&self.dt, "dt");
        let a = Side::new(&self.a, "A");
        let d = self.d.as_ref().map(|t| Side::new(t, "D"));
        let z = self.z.as_ref().map(|t| Side::new(t, "z"));
        let init = self.initial.as_ref().map(|t| Side::new(t, "initial state"));
        let args = ScanArgs {
            x: xs.as_cuda_slice::<T>()?.slice(offsets[0]..),
            ldx: h * p,
            b: bs.as_cuda_slice::<T>()?.slice(offsets[1]..),
            c: cs.as_cuda_slice::<T>()?.slice(offsets[2]..),
            ldbc: g * n,
            dt: dt.view::<f32>()?,
            a: a.view::<f32>()?,
            d: opt_view::<f32>(&d)?,
            z: opt_view::<T>(&z)?,
            init: opt_view::<f32>(&init)?,
            keep_ypre: false,
            batch,
            len,
            h,
            g,
            p,
            n,
            chunk: self.chunk,
        };
        let out = scan_forward(dev, &args, tc)?;
        *self
            .final_state
            .lock()
            .map_err(|_| cpu_only_error("ssd lock"))? =
            Some(wrap(out.final_state, dev, &[batch, h, p, n]));
        Ok((
            CudaStorage::wrap_cuda_slice(out.y, dev.clone()),
            Shape::from((batch, len, h, p)),
        ))
    }
}

impl CustomOp3 for Scan {
    fn name(&self) -> &'static str {
        "mamba2-ssd"
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
        bs: &CudaStorage,
        bl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(xs.dtype(), self.name(), T => self.launch::<T>(xs, xl, bs, bl, cs, cl))
    }
}

/// The chunked SSD scan: `x [B, L, H, P]`, `b`, `c [B, L, G, N]` (x's dtype, contiguous);
/// `dt [B, L, H]`, `a [H]`, `d [H]`, `initial [B, H, P, N]` f32 contiguous; `z [B, L, H, P]`
/// (x's dtype) gates the output with SiLU. `L >= 1`. On tensor cores when `tensor_cores` and
/// they apply (f16/bf16, head_dim and d_state multiples of 16 up to 128, x, B, C on 16 bytes),
/// else the SIMT passes (an error if the sizes exceed them). Returns `(y in x's dtype, final
/// state f32)`.
#[allow(clippy::too_many_arguments)]
pub fn ssd_chunked(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk: usize,
    initial: Option<&Tensor>,
    tensor_cores: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = Scan {
        dt: dt.clone(),
        a: a.clone(),
        d: d.cloned(),
        z: z.cloned(),
        initial: initial.cloned(),
        chunk,
        tensor_cores,
        final_state: Mutex::new(None),
    };
    let y = x.apply_op3_no_bwd(b, c, &op)?;
    let s = take(&op.final_state, "final SSM state")?;
    Ok((y, s))
}
