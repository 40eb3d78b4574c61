//! The networks: vision tower, connector, decoder (attention and Mamba-2 mixers) and the VLM.

pub mod cache;
pub mod connector;
pub mod decoder;
pub mod hybrid;
pub mod kernel_policy;
pub mod layers;
pub mod mamba2;
pub mod phi;
pub mod random;
pub mod shapes;
pub mod siglip;
pub mod vlm;
