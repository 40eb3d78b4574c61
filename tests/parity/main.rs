//! Model parity, one test binary: each part of the crate's models against references computed
//! by the upstream code (HF transformers, mamba_ssm) into tests/fixtures/.
//!
//! - `teacher`: tokenisation, the Phi decoder and its KV cache against TinyLLaVA / HF;
//! - `vision`: pixels, the SigLIP tower and the connector against HF;
//! - `vlm`: the whole teacher (loading, logits, generation, broken checkpoints);
//! - `mamba2`: the Mamba-2 mixer against mamba_ssm's reference maths, gradients included;
//! - `hybrid`: hybrids (init from attention, mixed cache, save/load, the upstream format);
//! - `batch`: the generation engine (preallocated cache, left-padded batches, random models);
//! - `hub`: loading a checkpoint from a hub cache offline.

#[path = "../common/mod.rs"]
mod common;

mod batch;
mod hub;
mod hybrid;
mod mamba2;
mod teacher;
mod vision;
mod vlm;
