//! The CUDA kernels of `kernels/*.cu` as candle custom ops (only with the `cuda` feature).
//!
//! Each op's main inputs go through candle's `CustomOp`/`InplaceOp` traits (storage locking and
//! layouts handled by candle); the small side inputs (weights, dt, states) are held by the op
//! and read through [`Tensor::storage_and_layout`]. Ops with two results (output and new state)
//! return the second through the op itself. Callers pass f32 side tensors; [`super::fused`]
//! prepares them and decides when these kernels apply. No op here has a backward: under
//! autograd the mixer takes the generic path (see `fused`).
//!
//! The PTX is compiled by build.rs (nvcc at build time; that file says why) and loaded once per
//! device by candle's module cache.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1,
    Layout, Shape, Storage, StorageRef, Tensor, WithDType,
};

const CONV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv.ptx"));
const SSD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ssd.ptx"));
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));

/// Time steps per shared-memory tile and output rows per chunk-scan block (`JT`, `RT` in ssd.cu).
const JT: usize = 32;
const RT: usize = 32;
/// Threads per block of the SSD kernels (`NTHREADS` in ssd.cu).
const NTHREADS: u32 = 256;
/// Largest head_dim / d_state the register tiles of ssd.cu hold, and largest chunk.
pub const MAX_HEAD_DIM: usize = 128;
pub const MAX_D_STATE: usize = 128;
pub const MAX_CHUNK: usize = 1024;
/// Dynamic shared memory a block may use without an opt-in attribute.
const SMEM_LIMIT: usize = 48 * 1024;
/// Largest conv width (d_conv) conv.cu is meant for (it loops, so this is a sanity bound).
pub const MAX_D_CONV: usize = 16;

/// Shared memory of the chunk-scan kernel for these sizes, in bytes.
pub fn chunk_scan_smem(head_dim: usize, d_state: usize) -> usize {
    let nb = d_state | 1;
    4 * (RT * d_state + JT * nb + JT * head_dim + RT * (JT + 1) + RT + JT)
}

/// Shared memory of the chunk-state kernel, in bytes.
pub fn chunk_state_smem(head_dim: usize, d_state: usize, chunk: usize) -> usize {
    4 * (2 * chunk + JT * (head_dim + d_state))
}

/// Whether the SSD kernels support these sizes (register tiles and shared memory).
pub fn ssd_supported(head_dim: usize, d_state: usize, chunk: usize) -> bool {
    head_dim <= MAX_HEAD_DIM
        && d_state <= MAX_D_STATE
        && chunk <= MAX_CHUNK
        && chunk_scan_smem(head_dim, d_state) <= SMEM_LIMIT
        && chunk_state_smem(head_dim, d_state, chunk) <= SMEM_LIMIT
}

fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("mamba2 kernels: unsupported dtype {other:?} (f32, f16, bf16 only)"),
    })
}

fn i32_of(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("mamba2 kernels: {what} = {v} exceeds i32")))
}

fn grid(n: usize, per: usize) -> candle_core::Result<u32> {
    u32::try_from(n.div_ceil(per))
        .map_err(|_| candle_core::Error::Msg(format!("mamba2 kernels: grid of {n} too large")))
}

/// A side input of an op: its storage, read-locked for the duration of the launch.
struct Side<'a> {
    guard: StorageRef<'a>,
    layout: &'a Layout,
    name: &'static str,
}

impl<'a> Side<'a> {
    fn new(t: &'a Tensor, name: &'static str) -> Self {
        let (guard, layout) = t.storage_and_layout();
        Self {
            guard,
            layout,
            name,
        }
    }

    /// The tensor's elements as a contiguous device view of `T`.
    fn view<T: CudaDType>(&self) -> candle_core::Result<CudaView<'_, T>> {
        let Storage::Cuda(s) = &*self.guard else {
            bail!("mamba2 kernels: {} is not on a CUDA device", self.name)
        };
        let Some((o1, o2)) = self.layout.contiguous_offsets() else {
            bail!("mamba2 kernels: {} is not contiguous", self.name)
        };
        Ok(s.as_cuda_slice::<T>()?.slice(o1..o2))
    }
}

/// A device slice as a tensor with no autograd history.
fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The offset and `(batch, row)` strides of a `[B, L, C]` layout whose channels are contiguous.
fn rows_layout(l: &Layout, what: &str) -> candle_core::Result<(usize, i64, i64)> {
    match l.stride() {
        &[sb, st, 1] => Ok((l.start_offset(), sb as i64, st as i64)),
        other => bail!("mamba2 kernels: {what} has strides {other:?}, channels must be contiguous"),
    }
}

fn take<T>(slot: &Mutex<Option<T>>, what: &str) -> candle_core::Result<T> {
    slot.lock()
        .ok()
        .and_then(|mut s| s.take())
        .ok_or_else(|| candle_core::Error::Msg(format!("mamba2 kernels: {what} was not produced")))
}

fn cpu_only_error(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: CUDA kernel called on the CPU"))
}

/// The pointer argument of an optional input: the view, or a null device pointer.
enum Opt<'a, T> {
    Some(CudaView<'a, T>),
    Null(u64),
}

impl<'a, T> Opt<'a, T> {
    fn push<'b>(&'b self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'b>) {
        match self {
            Opt::Some(v) => b.arg(v),
            Opt::Null(p) => b.arg(p),
        };
    }
}

fn opt_view<'a, T: CudaDType>(s: &'a Option<Side<'a>>) -> candle_core::Result<Opt<'a, T>> {
    Ok(match s {
        Some(s) => Opt::Some(s.view::<T>()?),
        None => Opt::Null(0),
    })
}

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
        let func = dev.get_or_load_custom_func(
            &format!("mamba2_conv_fwd_{}", suffix(T::DTYPE)?),
            "matvlm_mamba2_conv",
            CONV_PTX,
        )?;
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
        match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l),
            DType::F16 => self.launch::<half::f16>(s, l),
            DType::BF16 => self.launch::<half::bf16>(s, l),
            other => bail!("mamba2-conv-fwd: unsupported dtype {other:?}"),
        }
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
        let func = dev.get_or_load_custom_func(
            &format!("mamba2_conv_step_{}", suffix(T::DTYPE)?),
            "matvlm_mamba2_conv",
            CONV_PTX,
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
        match self.x.dtype() {
            DType::F32 => self.launch::<f32>(s, l),
            DType::F16 => self.launch::<half::f16>(s, l),
            DType::BF16 => self.launch::<half::bf16>(s, l),
            other => bail!("mamba2-conv-step: unsupported dtype {other:?}"),
        }
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
    final_state: Mutex<Option<Tensor>>,
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
        let view = |s: &'_ CudaStorage, l: &Layout, what: &str| -> candle_core::Result<usize> {
            let _ = s;
            match l.contiguous_offsets() {
                Some((o, _)) => Ok(o),
                None => bail!("mamba2-ssd: {what} is not contiguous"),
            }
        };
        let x = xs.as_cuda_slice::<T>()?.slice(view(xs, xl, "x")?..);
        let bm = bs.as_cuda_slice::<T>()?.slice(view(bs, bl, "B")?..);
        let cm = cs.as_cuda_slice::<T>()?.slice(view(cs, cl, "C")?..);
        let dt = Side::new(&self.dt, "dt");
        let a = Side::new(&self.a, "A");
        let d = self.d.as_ref().map(|t| Side::new(t, "D"));
        let z = self.z.as_ref().map(|t| Side::new(t, "z"));
        let init = self.initial.as_ref().map(|t| Side::new(t, "initial state"));
        let (dtv, av) = (dt.view::<f32>()?, a.view::<f32>()?);
        let (dv, zv, iv) = (
            opt_view::<f32>(&d)?,
            opt_view::<T>(&z)?,
            opt_view::<f32>(&init)?,
        );

        let q = self.chunk.min(len);
        let nc = len.div_ceil(q);
        let pn = p * n;
        // SAFETY: each buffer is written by a kernel before it is read, at the positions read.
        let cum = unsafe { dev.alloc::<f32>(batch * h * nc * q)? };
        let states = unsafe { dev.alloc::<f32>(batch * h * nc * pn)? };
        let final_state = unsafe { dev.alloc::<f32>(batch * h * pn)? };
        let y = unsafe { dev.alloc::<T>(batch * len * h * p)? };
        let sfx = suffix(T::DTYPE)?;
        let (li, hi, gi, pi, ni, qi, nci) = (
            i32_of(len, "L")?,
            i32_of(h, "H")?,
            i32_of(g, "G")?,
            i32_of(p, "P")?,
            i32_of(n, "N")?,
            i32_of(q, "chunk")?,
            i32_of(nc, "chunks")?,
        );
        let bh = u32::try_from(batch * h).map_err(|_| cpu_only_error("batch * heads"))?;

        let f1 = dev.get_or_load_custom_func(
            &format!("mamba2_ssd_chunk_state_{sfx}"),
            "matvlm_mamba2_ssd",
            SSD_PTX,
        )?;
        let mut a1 = f1.builder();
        a1.arg(&x);
        a1.arg(&dtv);
        a1.arg(&av);
        a1.arg(&bm);
        a1.arg(&cum);
        a1.arg(&states);
        for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci] {
            a1.arg(v);
        }
        let cfg1 = LaunchConfig {
            grid_dim: (nc as u32, bh, 1),
            block_dim: (NTHREADS, 1, 1),
            shared_mem_bytes: chunk_state_smem(p, n, q) as u32,
        };
        // SAFETY: argument list matches mamba2_ssd_chunk_state_* in kernels/ssd.cu.
        unsafe { a1.launch(cfg1) }.w()?;

        let f2 =
            dev.get_or_load_custom_func("mamba2_ssd_state_passing", "matvlm_mamba2_ssd", SSD_PTX)?;
        let pni = i32_of(pn, "P * N")?;
        let mut a2 = f2.builder();
        a2.arg(&states);
        a2.arg(&cum);
        iv.push(&mut a2);
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

        let f3 = dev.get_or_load_custom_func(
            &format!("mamba2_ssd_chunk_scan_{sfx}"),
            "matvlm_mamba2_ssd",
            SSD_PTX,
        )?;
        let row_tiles = q.div_ceil(RT);
        let rti = i32_of(row_tiles, "row tiles")?;
        let mut a3 = f3.builder();
        a3.arg(&x);
        a3.arg(&dtv);
        a3.arg(&cum);
        a3.arg(&bm);
        a3.arg(&cm);
        a3.arg(&states);
        dv.push(&mut a3);
        zv.push(&mut a3);
        a3.arg(&y);
        for v in [&li, &hi, &gi, &pi, &ni, &qi, &nci, &rti] {
            a3.arg(v);
        }
        let cfg3 = LaunchConfig {
            grid_dim: (grid(nc * row_tiles, 1)?, bh, 1),
            block_dim: (NTHREADS, 1, 1),
            shared_mem_bytes: chunk_scan_smem(p, n) as u32,
        };
        // SAFETY: argument list matches mamba2_ssd_chunk_scan_* in kernels/ssd.cu.
        unsafe { a3.launch(cfg3) }.w()?;

        *self
            .final_state
            .lock()
            .map_err(|_| cpu_only_error("ssd lock"))? =
            Some(wrap(final_state, dev, &[batch, h, p, n]));
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
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
        match xs.dtype() {
            DType::F32 => self.launch::<f32>(xs, xl, bs, bl, cs, cl),
            DType::F16 => self.launch::<half::f16>(xs, xl, bs, bl, cs, cl),
            DType::BF16 => self.launch::<half::bf16>(xs, xl, bs, bl, cs, cl),
            other => bail!("mamba2-ssd: unsupported dtype {other:?}"),
        }
    }
}

/// The chunked SSD scan: `x [B, L, H, P]`, `b`, `c [B, L, G, N]` (x's dtype, contiguous);
/// `dt [B, L, H]`, `a [H]`, `d [H]`, `initial [B, H, P, N]` f32 contiguous; `z [B, L, H, P]`
/// (x's dtype) gates the output with SiLU. `L >= 1`. Returns `(y in x's dtype, final state f32)`.
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
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = Scan {
        dt: dt.clone(),
        a: a.clone(),
        d: d.cloned(),
        z: z.cloned(),
        initial: initial.cloned(),
        chunk,
        final_state: Mutex::new(None),
    };
    let y = x.apply_op3_no_bwd(b, c, &op)?;
    let s = take(&op.final_state, "final SSM state")?;
    Ok((y, s))
}

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
        let func = dev.get_or_load_custom_func(
            &format!("mamba2_ssd_state_update_{}", suffix(T::DTYPE)?),
            "matvlm_mamba2_ssd",
            SSD_PTX,
        )?;
        let mut sv = state.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        let rows = batch * h * p;
        let cfg = LaunchConfig {
            grid_dim: (grid(rows * 32, 256)?, 1, 1),
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
        // SAFETY: argument list matches mamba2_ssd_state_update_* in kernels/ssd.cu.
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
        match self.x.dtype() {
            DType::F32 => self.launch::<f32>(s, l),
            DType::F16 => self.launch::<half::f16>(s, l),
            DType::BF16 => self.launch::<half::bf16>(s, l),
            other => bail!("mamba2-state-update: unsupported dtype {other:?}"),
        }
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
        let func = dev.get_or_load_custom_func(
            &format!("mamba2_gated_norm_{}", suffix(T::DTYPE)?),
            "matvlm_mamba2_norm",
            NORM_PTX,
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
        match ys.dtype() {
            DType::F32 => self.launch::<f32>(ys, yl, zs, zl),
            DType::F16 => self.launch::<half::f16>(ys, yl, zs, zl),
            DType::BF16 => self.launch::<half::bf16>(ys, yl, zs, zl),
            other => bail!("mamba2-gated-norm: unsupported dtype {other:?}"),
        }
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
