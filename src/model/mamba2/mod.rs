//! The Mamba-2 mixer that replaces attention in the hybrid decoder.
//!
//! Device- and dtype-generic candle code, split at the places where the CUDA kernels take over,
//! each piece usable on its own (visualisation reuses them):
//! * [`config`]: [`Mamba2Config`], sizes and numerics;
//! * [`conv`]: causal depthwise conv1d, prefill and decode-step forms;
//! * [`ssd`]: the chunked SSD scan, the single-step recurrence, dt/A discretisation;
//! * [`naive`]: the sequential recurrence, the reference the chunked scan is checked against;
//! * [`norm`]: the gated, grouped RMSNorm;
//! * [`mixer`]: [`Mamba2`] (parameters in the upstream checkpoint layout) and [`Mamba2State`];
//! * [`implicit`]: the mixer's implicit attention matrix and its state norms over time;
//! * [`fused`]: the dispatch between the CUDA kernels (`kernels`, `cuda` feature; sources in
//!   `kernels/*.cu`) and the generic code above.
//!
//! Everything on the path has a candle backward (distillation trains the mixer); states and
//! scan arithmetic are f32 for half-precision models.

pub mod config;
pub mod conv;
pub mod fused;
pub mod implicit;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod mixer;
pub mod naive;
pub mod norm;
pub mod ssd;

pub use config::Mamba2Config;
pub use implicit::{implicit_attention, state_norms};
pub use mixer::{Mamba2, Mamba2State, Projection, Scan, StepConstants};

use candle_core::DType;

/// The dtype arithmetic runs in: f32 for f16/bf16 (states accumulate in f32), else unchanged.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}
