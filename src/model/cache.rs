//! The inference cache: a value the caller owns, one entry per decoder layer.
//!
//! Attention layers keep keys and values; Mamba-2 layers keep a conv state and an SSM state whose
//! size does not grow with the sequence. Nothing is hidden inside the modules, so a teacher and a
//! student, or several probes, never share state by accident, and [`Cache::bytes`] answers the
//! memory question directly.

use super::mamba2::Mamba2State;
use super::phi::KvCache;

#[derive(Debug, Clone)]
pub enum LayerCache {
    Attention(Option<KvCache>),
    Mamba(Option<Mamba2State>),
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    /// Number of positions already processed (the next token's position).
    pub seq_len: usize,
}

impl Cache {
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Attention(Some(kv)) => kv.bytes(),
                LayerCache::Mamba(Some(s)) => s.bytes(),
                LayerCache::Attention(None) | LayerCache::Mamba(None) => 0,
            })
            .sum()
    }
}
