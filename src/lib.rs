//! matvlm: a research bench for hybrid Mamba-Transformer vision-language models.
//!
//! The pipeline of MaTVLM (hustvl, 2025) on candle: load a TinyLLaVA teacher, swap some decoder
//! attention layers for Mamba-2 mixers initialised from the attention weights, distil, evaluate,
//! generate and look inside.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
#[cfg(feature = "app")]
pub mod display;
pub mod error;
pub mod eval;
pub mod generate;
pub mod image;
pub mod io;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod loss;
pub mod model;
#[cfg(feature = "app")]
pub mod notebook;
pub mod options;
#[cfg(feature = "app")]
pub mod repl;
#[cfg(feature = "app")]
pub mod script;
pub mod search;
#[cfg(feature = "app")]
pub mod serve;
pub mod teacher;
pub mod tokenize;
pub mod train;
#[cfg(feature = "viz")]
pub mod viz;

pub use error::{Error, Result};
