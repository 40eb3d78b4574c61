//! The CUDA kernels of `kernels/*.cu` as candle custom ops (only with the `cuda` feature).
//!
//! Each op's main inputs go through candle's `CustomOp`/`InplaceOp` traits (storage locking and
//! layouts handled by candle); the small side inputs (weights, dt, states) are held by the op
//! and read through [`Tensor::storage_and_layout`]. Ops with two results (output and new state)
//! return the second through the op itself. Callers pass f32 side tensors; [`super::fused`]
//! prepares them and decides when these kernels apply. One op has a backward: the scan under
//! autograd ([`ssd_chunked_train`], kernels/ssd_bwd.cu); the others serve inference.
//!
//! * `conv`: causal depthwise conv1d + SiLU, prefill and one decode step;
//! * `scan`: the chunked SSD scan for inference (SIMT or tensor-core passes);
//! * `train`: the scan as a differentiable op (tensor-core forward, backward kernels);
//! * `decode`: the one-token state update;
//! * `norm`: the gated RMSNorm.
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

/// `$body` with `$t` the Rust type of `$dtype` (f32, f16 or bf16: what every kernel entry is
/// stamped for); another dtype is an error naming the op `$op`.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}

/// The PTX of one `kernels/*.cu` file for each target build.rs compiles (sm_80, sm_90), under
/// the module names candle caches them by.
struct Module {
    names: [&'static str; 2],
    ptx: [&'static str; 2],
}

macro_rules! module {
    ($file:literal) => {
        Module {
            names: [
                concat!("matvlm_", $file, "_sm80"),
                concat!("matvlm_", $file, "_sm90"),
            ],
            ptx: [
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".sm80.ptx")),
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".sm90.ptx")),
            ],
        }
    };
}

const CONV: Module = module!("conv");
const SSD: Module = module!("ssd");
const SSD_TC: Module = module!("ssd_tc");
const SSD_BWD: Module = module!("ssd_bwd");
const NORM: Module = module!("norm");

impl Module {
    /// The module name and PTX for `dev`'s target.
    fn pick(&self, dev: &CudaDevice) -> candle_core::Result<(&'static str, &'static str)> {
        let i = usize::from(target(dev)?.arch == 90);
        Ok((self.names[i], self.ptx[i]))
    }
}

/// Kernel `$name` of module `$module` (a [`Module`]) in the PTX for `$dev`'s target.
macro_rules! load {
    ($module:expr, $dev:expr, $name:expr $(,)?) => {{
        let (module, ptx) = $module.pick(&$dev)?;
        $dev.get_or_load_custom_func($name, module, ptx)
    }};
}

static FORCE_SM80: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Load the sm_80 PTX on every card, Hopper included; set by the kernel policy
/// (`KernelPolicy::sm80_everywhere` through `fused::set_policy`).
pub fn force_sm80(on: bool) {
    FORCE_SM80.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// What a device runs the kernels as: its compute capability, the PTX target taken for it
/// (90 on Hopper, 80 on every 8.x card, or 80 everywhere when the policy says so) and the
/// dynamic shared memory a block may opt into there (227 KiB on H100, 163 KiB on A100, 99 KiB
/// on L40 or RTX 4090).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub device: String,
    pub compute_capability: (i32, i32),
    pub arch: u32,
    pub smem_opt_in: usize,
}

/// The [`Target`] of `dev`, read from the driver once per device; an error naming the device
/// where no kernel applies (compute capability below 8.0: no `mma.sync` for bf16, no
/// `cp.async`).
pub fn target(dev: &CudaDevice) -> candle_core::Result<Target> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    static TARGETS: Mutex<Vec<(usize, Target)>> = Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let ordinal = ctx.ordinal();
    let force_sm80 = FORCE_SM80.load(std::sync::atomic::Ordering::Relaxed);
    let mut known = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
    let t = match known.iter().find(|(o, _)| *o == ordinal) {
        Some((_, t)) => t.clone(),
        None => {
            let (major, minor) = ctx.compute_capability().w()?;
            let t = Target {
                device: ctx.name().w()?,
                compute_capability: (major, minor),
                arch: if major >= 9 { 90 } else { 80 },
                smem_opt_in: ctx
                    .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                    .w()? as usize,
            };
            known.push((ordinal, t.clone()));
            t
        }
    };
    if t.compute_capability.0 < 8 {
        bail!(
            "mamba2 kernels: {} (cuda:{ordinal}) has compute capability {}.{}; the kernels need \
             8.0 or newer (turn them off with the kernel policy to use the generic path)",
            t.device,
            t.compute_capability.0,
            t.compute_capability.1
        );
    }
    Ok(Target {
        arch: if force_sm80 { 80 } else { t.arch },
        ..t
    })
}

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
/// Shared memory of the tensor-core chunk-state kernel, in bytes.
fn tc_chunk_state_smem(head_dim: usize, d_state: usize, chunk: usize) -> usize {
    8 * chunk.next_multiple_of(32) + 2 * TC_J * (head_dim + d_state + 2 * TC_PAD)
}

/// Shared memory of the tensor-core chunk scan, in bytes (layout in ssd_tc.cu): cumsums and dt
/// (two buffers), the C rows, S / the B tile, the x tile and the z rows.
fn tc_chunk_scan_smem(head_dim: usize, d_state: usize) -> usize {
    let (ldc, ldx) = (d_state + TC_PAD, head_dim + TC_PAD);
    4 * (TC_ROWS + 4 * TC_J) + 2 * (TC_ROWS * ldc + head_dim.max(TC_J) * ldc + 2 * TC_J * ldx)
}

/// The n tiles of 8 columns a tensor-core accumulator covering `cols` columns holds: the smallest
/// instantiated size (chunk state and backward entries of ssd_tc.cu / ssd_bwd.cu) that fits.
fn tc_tiles(cols: usize) -> usize {
    [4, 8, 10, 16]
        .into_iter()
        .find(|&t| 8 * t >= cols)
        .unwrap_or(16)
}

/// Threads of a tensor-core chunk-state block (forward pass 1, backward pass 1): P / 16 warps,
/// each with 16 state rows and all N columns.
fn tc_chunk_state_threads(head_dim: usize) -> u32 {
    32 * (head_dim / 16) as u32
}

/// Whether the tensor-core passes take these sizes: a 16-bit dtype (tensor cores multiply f16
/// or bf16; f32 keeps the SIMT passes and their 1e-4 parity), head_dim and d_state multiples of
/// 16 up to 128 (16 x 16 tiles, at most 16 n tiles a warp).
pub fn ssd_tc_shape(dtype: DType, head_dim: usize, d_state: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && head_dim.is_multiple_of(16)
        && d_state.is_multiple_of(16)
        && head_dim <= 128
        && d_state <= 128
}

/// [`ssd_tc_shape`], and x, B, C starting on 16 bytes (their tiles are copied 8 elements at a
/// time).
fn ssd_tc_supported(dtype: DType, head_dim: usize, d_state: usize, offsets: [usize; 3]) -> bool {
    ssd_tc_shape(dtype, head_dim, d_state) && offsets.iter().all(|o| o % 8 == 0)
}

/// An error unless `t` (the side input `name` of `op`) holds `want` elements, which the kernel
/// will read: a wrong shape must fail here, not read out of bounds.
fn check_elems(t: &Tensor, want: usize, op: &str, name: &str) -> candle_core::Result<()> {
    if t.elem_count() != want {
        bail!(
            "{op}: {name} has shape {:?} ({} elements), the kernel reads {want}",
            t.dims(),
            t.elem_count()
        );
    }
    Ok(())
}

/// The sizes the SSD kernels take as `int`: L, H, G, P, N, chunk, chunks (in that order).
fn ssd_dims_i32(
    len: usize,
    h: usize,
    g: usize,
    p: usize,
    n: usize,
    q: usize,
    nc: usize,
) -> candle_core::Result<[i32; 7]> {
    Ok([
        i32_of(len, "L")?,
        i32_of(h, "H")?,
        i32_of(g, "G")?,
        i32_of(p, "P")?,
        i32_of(n, "N")?,
        i32_of(q, "chunk")?,
        i32_of(nc, "chunks")?,
    ])
}

/// Let `func` use `bytes` of dynamic shared memory (beyond the default 48 KiB), up to what
/// `dev` allows a block.
fn allow_smem(
    dev: &CudaDevice,
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: usize,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    if bytes > SMEM_LIMIT {
        let t = target(dev)?;
        if bytes > t.smem_opt_in {
            bail!(
                "mamba2 kernels: {bytes} bytes of shared memory exceed the {} a block may use on {}",
                t.smem_opt_in,
                t.device
            );
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

mod conv;
mod decode;
mod norm;
mod scan;
mod train;

pub use conv::*;
pub use decode::*;
pub use norm::*;
pub use scan::*;
pub use train::*;
