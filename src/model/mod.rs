//! The networks: vision tower, connector, decoder (attention and Mamba-2 mixers) and the VLM.

pub mod layers;
pub mod mamba2;
pub mod connector;
pub mod siglip;
