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
const SSD_TC_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ssd_tc.ptx"));
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

/// Rows per chunk-scan block and time steps per tile of the tensor-core kernels (ssd_tc.cu).
const TC_ROWS: usize = 64;
const TC_J: usize = 64;
const TC_PAD: usize = 8;
/// Shared memory a block may opt into on Hopper (227 KiB); the tensor-core scan asks for more
/// than the default 48 KiB.
const SMEM_OPT_IN: usize = 227 * 1024;

/// Shared memory of the tensor-core chunk-state kernel, in bytes.
fn tc_chunk_state_smem(head_dim: usize, d_state: usize, chunk: usize) -> usize {
    8 * chunk.next_multiple_of(32) + 2 * TC_J * (head_dim + d_state + 2 * TC_PAD)
}

/// Shared memory of the tensor-core chunk-scan kernel, in bytes (layout in ssd_tc.cu).
fn tc_chunk_scan_smem(head_dim: usize, d_state: usize) -> usize {
    let ldc = d_state + TC_PAD;
    let tiles = 2 * (head_dim.max(TC_J) * ldc + TC_J * (head_dim + TC_PAD));
    let staging = 4 * TC_ROWS * (head_dim + 4);
    4 * (TC_ROWS + 2 * TC_J + TC_ROWS * (TC_J + 4)) + 2 * TC_ROWS * ldc + tiles.max(staging)
}

/// Whether the tensor-core passes take these sizes: a 16-bit dtype (tensor cores multiply f16
/// or bf16; f32 keeps the SIMT passes and their 1e-4 parity), head_dim and d_state multiples of
/// 16 up to 128 (WMMA tiles, at most 8 fragments a warp), and x, B, C starting on 16 bytes (their
/// tiles are copied 8 elements at a time).
fn ssd_tc_supported(dtype: DType, head_dim: usize, d_state: usize, offsets: [usize; 3]) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && head_dim.is_multiple_of(16)
        && d_state.is_multiple_of(16)
        && head_dim <= 128
        && d_state <= 128
        && offsets.iter().all(|o| o % 8 == 0)
        && std::env::var("MATVLM_MAMBA2_TC").map_or(true, |v| v != "0")
}

/// Let `func` use `bytes` of dynamic shared memory (beyond the default 48 KiB).
fn allow_smem(
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: usize,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    if bytes > SMEM_LIMIT {
        if bytes > SMEM_OPT_IN {
            bail!("mamba2 kernels: {bytes} bytes of shared memory exceed the {SMEM_OPT_IN} a block may use");
        }
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
    }
    Ok(())
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

/// The device buffers and sizes of one forward scan (shared by the inference op [`Scan`] and
/// the training op [`ScanTrain`]). x rows (time steps) are `ldx` elements apart, B and C rows
/// `ldbc` (they may be column blocks of one packed xBC tensor).
struct ScanArgs<'a, T> {
    x: CudaView<'a, T>,
    ldx: usize,
    b: CudaView<'a, T>,
    c: CudaView<'a, T>,
    ldbc: usize,
    dt: CudaView<'a, f32>,
    a: CudaView<'a, f32>,
    d: Opt<'a, f32>,
    z: Opt<'a, T>,
    init: Opt<'a, f32>,
    /// Also write the output before the gate (tensor-core path; the backward of the gate).
    keep_ypre: bool,
    batch: usize,
    len: usize,
    h: usize,
    g: usize,
    p: usize,
    n: usize,
    chunk: usize,
}

/// What a forward scan leaves: the output, the final state, and (for the backward) the
/// chunk-local cumsums of dt A `[B*H, nc, Q]` and the state before each chunk `[B*H, nc, P, N]`.
struct ScanOut<T> {
    y: CudaSlice<T>,
    ypre: Option<CudaSlice<T>>,
    final_state: CudaSlice<f32>,
    cum: CudaSlice<f32>,
    states: CudaSlice<f32>,
}

/// Fragments a warp of the tensor-core chunk scan (`scan`) or chunk state holds: the smallest
/// instantiated `F` of ssd_tc.cu that fits.
fn tc_frags(p: usize, n: usize, scan: bool) -> usize {
    let need = if scan {
        p / 16
    } else {
        (p / 16 * (n / 16)).div_ceil(8)
    };
    [2, 4, 5, 8].into_iter().find(|&f| f >= need).unwrap_or(8)
}

/// The three passes of the chunked scan: chunk states (and cumsums), state passing, chunk scan;
/// on tensor cores when `tc`, else the SIMT kernels (which need x, B, C contiguous).
fn scan_forward<T: CudaDType + DeviceRepr + WithDType>(
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
    let (li, hi, gi, pi, ni, qi, nci) = (
        i32_of(len, "L")?,
        i32_of(h, "H")?,
        i32_of(g, "G")?,
        i32_of(p, "P")?,
        i32_of(n, "N")?,
        i32_of(q, "chunk")?,
        i32_of(nc, "chunks")?,
    );
    let (ldx, ldbc) = (s.ldx as i64, s.ldbc as i64);
    let bh = u32::try_from(batch * h).map_err(|_| cpu_only_error("batch * heads"))?;

    // 1. chunk cumsums and per-chunk states.
    let (f1, smem1) = if tc {
        let name = format!("mamba2_ssd_tc_chunk_state_{sfx}_f{}", tc_frags(p, n, false));
        let f = dev.get_or_load_custom_func(&name, "matvlm_mamba2_ssd_tc", SSD_TC_PTX)?;
        (f, tc_chunk_state_smem(p, n, q))
    } else {
        let name = format!("mamba2_ssd_chunk_state_{sfx}");
        let f = dev.get_or_load_custom_func(&name, "matvlm_mamba2_ssd", SSD_PTX)?;
        (f, chunk_state_smem(p, n, q))
    };
    allow_smem(&f1, smem1)?;
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
        block_dim: (NTHREADS, 1, 1),
        shared_mem_bytes: smem1 as u32,
    };
    // SAFETY: argument list matches mamba2_ssd{,_tc}_chunk_state_* in kernels/ssd{,_tc}.cu.
    unsafe { a1.launch(cfg1) }.w()?;

    // 2. state passing: each chunk's slot becomes the state before it; the final state.
    let f2 =
        dev.get_or_load_custom_func("mamba2_ssd_state_passing", "matvlm_mamba2_ssd", SSD_PTX)?;
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
        let name = format!("mamba2_ssd_tc_chunk_scan_{sfx}_f{}", tc_frags(p, n, true));
        let f = dev.get_or_load_custom_func(&name, "matvlm_mamba2_ssd_tc", SSD_TC_PTX)?;
        (f, TC_ROWS, 128, tc_chunk_scan_smem(p, n))
    } else {
        let name = format!("mamba2_ssd_chunk_scan_{sfx}");
        let f = dev.get_or_load_custom_func(&name, "matvlm_mamba2_ssd", SSD_PTX)?;
        (f, RT, NTHREADS, chunk_scan_smem(p, n))
    };
    allow_smem(&f3, smem3)?;
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
        let tc = ssd_tc_supported(T::DTYPE, p, n, offsets);
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
        // The float4 variant (a warp per 8 rows of one head, 16-byte state accesses) wherever
        // d_state and the state's offset allow 16-byte accesses, a row fits one warp and 8 rows
        // divide a head.
        let v4 = n % 4 == 0 && n <= 128 && p % 8 == 0 && o1 % 4 == 0;
        let func = dev.get_or_load_custom_func(
            &format!(
                "mamba2_ssd_state_update{}_{}",
                if v4 { "_v4" } else { "" },
                suffix(T::DTYPE)?
            ),
            "matvlm_mamba2_ssd",
            SSD_PTX,
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

// ------------------------------------------------------------------------------------------
// SSD chunked scan under autograd: tensor-core forward and backward (kernels/ssd_bwd.cu).

const SSD_BWD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ssd_bwd.ptx"));

/// Shared memory of the backward passes 3a / 3b (ssd_bwd.cu), in bytes.
fn tc_bwd_smem(head_dim: usize, d_state: usize) -> usize {
    let fld = head_dim.max(d_state).max(TC_J) + 4;
    let (ldn, ldpx, ldq) = (d_state + TC_PAD, head_dim + TC_PAD, TC_J + TC_PAD);
    4 * (3 * TC_J + TC_ROWS * fld) + 2 * (2 * TC_J * ldn + 2 * TC_J * ldpx + TC_ROWS * ldq)
}

/// Whether the training scan (tensor-core forward + backward kernels) takes these sizes: those
/// of the tensor-core forward.
pub fn ssd_train_supported(dtype: DType, head_dim: usize, d_state: usize) -> bool {
    ssd_tc_supported(dtype, head_dim, d_state, [0; 3])
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
        let module = "matvlm_mamba2_ssd_bwd";
        let load = |name: String| dev.get_or_load_custom_func(&name, module, SSD_BWD_PTX);

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

        let (li, hi, gi, pi, ni, qi, nci) = (
            i32_of(len, "L")?,
            i32_of(h, "H")?,
            i32_of(g, "G")?,
            i32_of(p, "P")?,
            i32_of(n, "N")?,
            i32_of(q, "chunk")?,
            i32_of(nc, "chunks")?,
        );
        let ld = conv as i64;
        let bhu = u32::try_from(bh).map_err(|_| cpu_only_error("batch * heads"))?;

        // 1. dS^in per chunk.
        let f1 = load(format!(
            "mamba2_ssd_bwd_dstates_{sfx}_f{}",
            tc_frags(p, n, false)
        ))?;
        let smem1 = tc_chunk_state_smem(p, n, q);
        allow_smem(&f1, smem1)?;
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
            block_dim: (NTHREADS, 1, 1),
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
        let f3 = tc_frags(p.max(n), p.max(n), true);
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
        allow_smem(&f3a, smem3)?;
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
        allow_smem(&f3b, smem3)?;
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
