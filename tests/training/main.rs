//! Training, one test binary:
//!
//! - `train`: the trainer (AdamW and schedules against torch / transformers, the loop, resume);
//! - `supervised`: supervised training and evaluation of a reduced teacher;
//! - `distill`: the distillation losses against independent computations;
//! - `distill_mode`: the distillation mode of the trainer;
//! - `scale`: distillation at scale: gradient accumulation, checkpointing, data parallelism;
//! - `search`: the placement search (per-layer scores, greedy pick, refinement, resume);
//! - `data`: the LLaVA loader, the resumable batch loader and the synthetic world.

#[path = "../common/mod.rs"]
mod common;

mod data;
mod distill;
mod distill_mode;
mod scale;
mod search;
mod supervised;
mod train;
