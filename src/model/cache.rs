//! The inference cache: a value the caller owns, one entry per decoder layer.
//!
//! Attention layers keep keys and values; Mamba-2 layers keep a conv state and an SSM state whose
//! size does not grow with the sequence. Nothing is hidden inside the modules, so a teacher and a
//! student, or several probes, never share state by accident, and [`Cache::bytes`] answers the
//! memory question directly.
//!
//! A cache made for generation ([`crate::model::decoder::Decoder::cache_for`]) knows its batch,
//! how far each row is left-padded and how many positions it will hold: its key/value buffers are
//! allocated once at that capacity and written in place, and the rotary tables and the
//! key-padding mask are made once on the device. A cache from `new_cache` starts empty and sizes
//! itself to what is written (training, probes, one-off forwards).

use candle_core::{DType, Device, Tensor};

use super::mamba2::Mamba2State;
use super::phi::KvCache;
use crate::Result;

#[derive(Debug, Clone)]
pub enum LayerCache {
    Attention(Option<KvCache>),
    Mamba(Option<Mamba2State>),
}

/// A key position that is padding gets this score: finite, so that a padding query (whose every
/// visible key is padding) still has a defined softmax, and far enough below any real score that
/// `exp` of it is exactly 0 in f32.
pub const PAD_SCORE: f32 = -1e9;

/// What a generation cache fixes up front (see [`crate::model::decoder::Decoder::cache_for`]).
#[derive(Debug, Clone)]
pub struct CacheLayout {
    /// Positions every row will hold: the padded prompt plus the tokens to generate.
    pub capacity: usize,
    /// Per row, how many leading positions are padding (rows of a batch are left-padded to the
    /// longest prompt). All zero when no row is padded.
    pub left_pad: Vec<usize>,
    /// Rotary `cos` and `sin` `[capacity, rotary_dim]`, f32, on the device.
    pub rotary: Option<(Tensor, Tensor)>,
    /// `[B, 1, 1, capacity]` additive f32 mask: [`PAD_SCORE`] at padding keys, 0 elsewhere.
    /// `None` when no row is padded.
    pub key_mask: Option<Tensor>,
    /// u32 `[B]`, `left_pad` on the device (the decode kernel's row starts); `None` when no row
    /// is padded.
    pub key_start: Option<Tensor>,
}

impl CacheLayout {
    /// The layout of `left_pad.len()` rows holding `capacity` positions.
    pub fn new(capacity: usize, left_pad: Vec<usize>, device: &Device) -> Result<Self> {
        let padded = left_pad.iter().any(|&p| p > 0);
        let key_start = if padded {
            let starts = left_pad.iter().map(|&p| p as u32).collect::<Vec<_>>();
            Some(Tensor::from_vec(starts, left_pad.len(), device)?)
        } else {
            None
        };
        let key_mask = if padded {
            let b = left_pad.len();
            let values: Vec<f32> = left_pad
                .iter()
                .flat_map(|&pad| (0..capacity).map(move |j| if j < pad { PAD_SCORE } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(values, (b, 1, 1, capacity), device)?)
        } else {
            None
        };
        Ok(Self {
            capacity,
            left_pad,
            rotary: None,
            key_mask,
            key_start,
        })
    }

    /// 1 where row `b`'s position `offset + i` is a real token, 0 where it is padding:
    /// `[B, len]` in `dtype`, or `None` when none of those positions is padding.
    pub fn keep_mask(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if self.left_pad.iter().all(|&p| p <= offset) {
            return Ok(None);
        }
        let values: Vec<f32> = self
            .left_pad
            .iter()
            .flat_map(|&pad| (offset..offset + len).map(move |p| if p < pad { 0.0 } else { 1.0 }))
            .collect();
        let keep = Tensor::from_vec(values, (self.left_pad.len(), len), device)?;
        Ok(Some(keep.to_dtype(dtype)?))
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    pub layers: Vec<LayerCache>,
    /// Number of positions already processed (the next token's position).
    pub seq_len: usize,
    /// Capacity, padding, device tables: `Some` for a cache made for generation.
    pub layout: Option<CacheLayout>,
}

impl Cache {
    /// Bytes the cache holds on its device (allocated capacity, not only the positions written).
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

    /// Per row, the leading padding positions (empty for a cache without a layout).
    pub fn left_pad(&self) -> &[usize] {
        self.layout.as_ref().map_or(&[], |l| l.left_pad.as_slice())
    }
}
