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
//! The plumbing they share with the crate's other kernels (PTX targets, loading, side inputs)
//! is [`crate::kernels`].

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1,
    Layout, Shape, Storage, Tensor, WithDType,
};

use crate::kernels::{
    allow_smem, by_dtype, check_elems, cpu_only_error, grid, i32_of, load, module, opt_view,
    rows_layout, suffix, take, wrap, Module, Opt, Side, SMEM_LIMIT,
};
pub use crate::kernels::{force_sm80, target, Target};

const CONV: Module = module!("conv");
const SSD: Module = module!("ssd");
const SSD_TC: Module = module!("ssd_tc");
const SSD_BWD: Module = module!("ssd_bwd");
const NORM: Module = module!("norm");

/// Time steps per shared-memory tile and output rows per chunk-scan block (`JT`, `RT` in ssd.cu).
const JT: usize = 32;
const RT: usize = 32;
/// Threads per block of the SSD kernels (`NTHREADS` in ssd.cu).
const NTHREADS: u32 = 256;
/// Largest head_dim / d_state the register tiles of ssd.cu hold, and largest chunk.
pub const MAX_HEAD_DIM: usize = 128;
pub const MAX_D_STATE: usize = 128;
pub const MAX_CHUNK: usize = 1024;
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
