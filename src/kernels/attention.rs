//! The attention step of the generation engine on CUDA (kernels/attention.cu): projections to
//! the preallocated key/value cache in one launch, and decode attention over that cache split
//! over the keys (flash-decoding). Inference only: neither op has a backward, and
//! [`crate::model::phi::PhiAttention`] takes them only for tensors that track no gradient.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Tensor, WithDType};

use super::{by_dtype, cpu_only_error, grid, i32_of, load, module, suffix, wrap, Module, Side};

const ATTENTION: Module = module!("attention");

/// Threads of a decode-attention block and the largest head size it holds (`DEC_THREADS`,
/// `DEC_MAX_D` in attention.cu).
const DEC_THREADS: u32 = 128;
const DEC_MAX_D: usize = 128;
/// Keys per split of decode attention. Fixed, not chosen from the batch: a row's keys then fall
/// into the same splits batched or alone, so batched greedy decoding equals one-at-a-time to
/// the bit. 128 keys give a 1,852-position cache of one row 15 splits x 32 heads = 480 blocks.
const KEYS_PER_SPLIT: usize = 128;

/// Whether the kernels take heads of `head_dim` in `dtype`: each lane loads 16 bytes of a key, so
/// a head is a whole number of 16-byte vectors, at most [`DEC_MAX_D`] elements.
pub fn supported(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && head_dim <= DEC_MAX_D
        && (head_dim * dtype.size_in_bytes()).is_multiple_of(16)
}

/// `[B, H, cap, D]` of a cache buffer, contiguous from its start.
fn cache_dims(t: &Tensor, what: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    let dims = t.dims4()?;
    if !t.is_contiguous() {
        bail!("attention kernels: the {what} cache is not contiguous");
    }
    Ok(dims)
}

struct Prep {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    v_cache: Tensor,
    pos0: usize,
    heads: (usize, usize, usize),
    q_out: std::sync::Mutex<Option<Tensor>>,
}

impl Prep {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        k_cache: &mut CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<()> {
        let dev = k_cache.device.clone();
        let (hq, hkv, d) = self.heads;
        let (b, t, _) = self.q.dims3()?;
        let cap = kl.dims()[2];
        let rot = self.cos.dim(1)?;
        let Some((o1, o2)) = kl.contiguous_offsets() else {
            bail!("attn-prep: the key cache is not contiguous")
        };
        let sides = [
            Side::new(&self.q, "q"),
            Side::new(&self.k, "k"),
            Side::new(&self.v, "v"),
            Side::new(&self.cos, "cos"),
            Side::new(&self.sin, "sin"),
            Side::new(&self.v_cache, "value cache"),
        ];
        let views = sides
            .iter()
            .map(|s| s.view::<T>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut kc = k_cache.as_cuda_slice_mut::<T>()?.slice_mut(o1..o2);
        // SAFETY: fully written by the kernel.
        let q_out = unsafe { dev.alloc::<T>(b * hq * t * d)? };
        let func = load!(ATTENTION, dev, &format!("attn_prep_{}", suffix(T::DTYPE)?))?;
        let total = b * t * (hq + 2 * hkv) * d;
        let cfg = LaunchConfig {
            grid_dim: (grid(total, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            i32_of(b, "B")?,
            i32_of(t, "T")?,
            i32_of(hq, "H")?,
            i32_of(hkv, "H_kv")?,
            i32_of(d, "D")?,
            i32_of(rot, "rotary_dim")?,
            i32_of(cap, "capacity")?,
            i32_of(self.pos0, "position")?,
        ];
        let mut args = func.builder();
        for v in &views[..5] {
            args.arg(v);
        }
        args.arg(&q_out);
        args.arg(&mut kc);
        // The value cache is written through its device pointer while candle holds it read-only:
        // no host code reads device memory, and every launch runs in order on the one stream.
        args.arg(&views[5]);
        for v in &ints {
            args.arg(v);
        }
        // SAFETY: the argument list matches attn_prep_* in kernels/attention.cu; every size was
        // checked against the buffers in `prep`.
        unsafe { args.launch(cfg) }.w()?;
        *self
            .q_out
            .lock()
            .map_err(|_| cpu_only_error("attn-prep lock"))? =
            Some(wrap(q_out, &dev, &[b, hq, t, d]));
        Ok(())
    }
}

impl InplaceOp1 for Prep {
    fn name(&self) -> &'static str {
        "attn-prep"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        Err(cpu_only_error(self.name()))
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        by_dtype!(self.q.dtype(), self.name(), T => self.launch::<T>(s, l))
    }
}

/// The projections `q [B, T, Hq * D]`, `k`, `v [B, T, Hkv * D]` to attention inputs: returns the
/// queries `[B, Hq, T, D]` with rotary applied, and writes the keys (rotary applied) and values
/// into `k_cache`, `v_cache` (`[B, Hkv, cap, D]`) at positions `pos0 .. pos0 + T`. `cos`, `sin`:
/// `[T, rotary_dim]` in the projections' dtype (the table rows of those positions), the
/// Rotary::apply convention (rotate-half over the leading `rotary_dim` dims).
#[allow(clippy::too_many_arguments)]
pub fn prep(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos0: usize,
) -> candle_core::Result<Tensor> {
    let (b, hkv, cap, d) = cache_dims(k_cache, "key")?;
    if cache_dims(v_cache, "value")? != (b, hkv, cap, d) {
        bail!(
            "attn-prep: key cache {:?} and value cache {:?} differ",
            k_cache.dims(),
            v_cache.dims()
        );
    }
    let (qb, t, qw) = q.dims3()?;
    if qb != b || qw % d != 0 || k.dims3()? != (b, t, hkv * d) || v.dims3()? != (b, t, hkv * d) {
        bail!(
            "attn-prep: q {:?}, k {:?}, v {:?} do not fit a cache of {b} rows x {hkv} heads x {d}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let hq = qw / d;
    if hq % hkv != 0 {
        bail!("attn-prep: {hq} query heads are not a multiple of {hkv} key/value heads");
    }
    if pos0 + t > cap {
        bail!(
            "attn-prep: positions {pos0}..{} exceed the cache's {cap}",
            pos0 + t
        );
    }
    let rot = cos.dim(1)?;
    if cos.dims2()? != (t, rot) || sin.dims2()? != (t, rot) || rot > d || rot % 2 != 0 {
        bail!(
            "attn-prep: rotary tables {:?} / {:?} do not fit {t} positions of head size {d}",
            cos.dims(),
            sin.dims()
        );
    }
    let contiguous = |x: &Tensor| x.contiguous();
    let op = Prep {
        q: contiguous(q)?,
        k: contiguous(k)?,
        v: contiguous(v)?,
        cos: contiguous(&cos.to_dtype(q.dtype())?)?,
        sin: contiguous(&sin.to_dtype(q.dtype())?)?,
        v_cache: v_cache.clone(),
        pos0,
        heads: (hq, hkv, d),
        q_out: std::sync::Mutex::new(None),
    };
    k_cache.inplace_op1(&op)?;
    super::take(&op.q_out, "attn-prep queries")
}

/// Attention of one query per row and head, `q [B, Hq, 1, D]`, over the positions
/// `key_start[b] .. len` of `k_cache`, `v_cache` (`[B, Hkv, cap, D]`; `key_start`: u32 `[B]`, each
/// row's left padding, all 0 when `None`), scaled by `scale`, with an optional additive f32
/// `mask` `[B, 1, 1, >= len]` (last dim contiguous): the output `[B, Hq, 1, D]` in q's dtype.
/// Scores, softmax and the value sum are f32.
pub fn decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    mask: Option<&Tensor>,
    key_start: Option<&Tensor>,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (b, hkv, cap, d) = cache_dims(k_cache, "key")?;
    if cache_dims(v_cache, "value")? != (b, hkv, cap, d) {
        bail!("decode attention: key and value caches differ");
    }
    let (qb, hq, qt, qd) = q.dims4()?;
    if (qb, qt, qd) != (b, 1, d) || hq % hkv != 0 {
        bail!(
            "decode attention: query {:?} does not fit a cache {:?}",
            q.dims(),
            k_cache.dims()
        );
    }
    if len == 0 || len > cap {
        bail!("decode attention: {len} keys in a cache of {cap}");
    }
    if !supported(q.dtype(), d) {
        bail!(
            "decode attention: head size {d} in {:?} is not supported",
            q.dtype()
        );
    }
    if let Some(s) = key_start {
        if s.dims() != [b] || s.dtype() != DType::U32 {
            bail!(
                "decode attention: key_start is {:?} {:?}, expected u32 [{b}]",
                s.dims(),
                s.dtype()
            );
        }
    }
    let sizes = (b, hq, hkv, d);
    by_dtype!(q.dtype(), "decode attention", T => decode_as::<T>(q, k_cache, v_cache, len, mask, key_start, scale, sizes))
}

#[allow(clippy::too_many_arguments)]
fn decode_as<T: CudaDType + DeviceRepr + WithDType>(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    mask: Option<&Tensor>,
    key_start: Option<&Tensor>,
    scale: f32,
    (b, hq, hkv, d): (usize, usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let q = q.contiguous()?;
    let (qs, ks, vs) = (
        Side::new(&q, "q"),
        Side::new(k_cache, "key cache"),
        Side::new(v_cache, "value cache"),
    );
    let dev = qs.device()?;
    let (qv, kv, vv) = (qs.view::<T>()?, ks.view::<T>()?, vs.view::<T>()?);
    let mask_side = mask.map(|m| Side::new(m, "mask"));
    let (mask_view, mask_sb) = match &mask_side {
        Some(s) => {
            let (view, strides) = s.strided_view::<f32>()?;
            let dims = s.dims();
            if dims.len() != 4 || dims[0] != b || dims[1] != 1 || dims[2] != 1 || dims[3] < len {
                bail!("decode attention: mask {dims:?} does not cover {b} rows x {len} keys");
            }
            if strides[3] != 1 {
                bail!("decode attention: the mask's key dimension is not contiguous");
            }
            (Some(view), strides[0] as i64)
        }
        None => (None, 0),
    };
    let start_side = key_start.map(|t| Side::new(t, "key_start"));
    let start_view = start_side.as_ref().map(|s| s.view::<u32>()).transpose()?;
    let heads = b * hq;
    let per = KEYS_PER_SPLIT;
    let splits = len.div_ceil(per);
    // SAFETY: every element is written by the split kernel before the combine reads it.
    let part = unsafe { dev.alloc::<f32>(heads * splits * (d + 2))? };
    let out = unsafe { dev.alloc::<T>(heads * d)? };
    let split = load!(
        ATTENTION,
        dev,
        &format!("attn_decode_split_{}", suffix(T::DTYPE)?)
    )?;
    let (hq_i, hkv_i, d_i, cap_i, len_i, per_i) = (
        i32_of(hq, "H")?,
        i32_of(hkv, "H_kv")?,
        i32_of(d, "D")?,
        i32_of(k_cache.dim(2)?, "capacity")?,
        i32_of(len, "len")?,
        i32_of(per, "keys per split")?,
    );
    let null = 0u64;
    let mut args = split.builder();
    args.arg(&qv);
    args.arg(&kv);
    args.arg(&vv);
    match &mask_view {
        Some(m) => args.arg(m),
        None => args.arg(&null),
    };
    args.arg(&mask_sb);
    match &start_view {
        Some(v) => args.arg(v),
        None => args.arg(&null),
    };
    args.arg(&part);
    for v in [&hq_i, &hkv_i, &d_i, &cap_i, &len_i, &per_i] {
        args.arg(v);
    }
    args.arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(heads).map_err(candle_core::Error::wrap)?,
            splits as u32,
            1,
        ),
        block_dim: (DEC_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches attn_decode_split_* in kernels/attention.cu; the mask
    // view covers rows x len (checked above), the caches B x H_kv x cap x D.
    unsafe { args.launch(cfg) }.w()?;
    let combine = load!(
        ATTENTION,
        dev,
        &format!("attn_decode_combine_{}", suffix(T::DTYPE)?)
    )?;
    let splits_i = i32_of(splits, "splits")?;
    let mut args = combine.builder();
    args.arg(&part);
    args.arg(&out);
    args.arg(&d_i);
    args.arg(&splits_i);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, 1, 1),
        block_dim: (DEC_MAX_D as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches attn_decode_combine_*.
    unsafe { args.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, &[b, hq, 1, d]))
}
