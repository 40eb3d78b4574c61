//! Where the mixer picks between the CUDA kernels (`cuda` feature, [`super::kernels`]) and the
//! device-generic candle code of [`super::conv`], [`super::ssd`] and [`super::norm`].
//!
//! The kernels run when the `cuda` feature is built in, every tensor is on a CUDA device, the
//! dtype is f32, f16 or bf16, the sizes fit the kernels, the process's [`KernelPolicy`] allows
//! them ([`set_policy`]; on by default; the policy lives in [`crate::model::kernel_policy`] and
//! is re-exported here), and no input tracks gradients.
//!
//! Backward: under autograd (any input tracks an op, as in distillation where the mixer's
//! parameters are `Var`s) the SSD scan runs as one differentiable op with backward kernels
//! (kernels/ssd_bwd.cu) when its activations are f16/bf16 with head_dim and d_state multiples
//! of 16; otherwise (f32, odd sizes) the generic path runs, forward and backward, through
//! candle's differentiable ops on the same device. The conv and the gated norm always take the
//! generic path under autograd (they are cheap beside the scan).
//!
//! Every call on CUDA tensors that the policy would give to a kernel but that runs a slower path
//! says so on stderr, once per process for each op and reason, with the first shape
//! ([`fallback`]).
//! [`traced`] lists the paths a closure's calls took (the parity check reports them).
//!
//! Without the feature, or on the CPU, every function here is the generic code (plus the SiLU
//! or gate the kernels fuse), so the CPU tests exercise this dispatch too.

use std::collections::HashSet;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::{compute_dtype, conv, norm, ssd};
use crate::model::kernel_policy::took;
pub use crate::model::kernel_policy::{
    attention_kernels_enabled, kernels_enabled, policy, set_policy, traced, KernelPolicy,
};
use crate::Result;

/// Say on stderr, once per process for each distinct `op`, `path` and `why`, that a call on
/// CUDA tensors took a slower path than the kernels, naming the first `shape` seen (keyed
/// without it, so prompts of many lengths do not repeat the line).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn fallback(op: &str, path: &str, why: &str, shape: String) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let key = format!("{op} takes the {path} path: {why}");
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.get_or_insert_with(HashSet::new).insert(key.clone()) {
        eprintln!("matvlm mamba2 kernels: {key} (first at {shape})");
    }
}

/// Whether these tensors are all on CUDA with kernels allowed (where a slower path is a
/// fallback worth reporting).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernels_wanted(ts: &[Option<&Tensor>]) -> bool {
    kernels_enabled() && ts.iter().flatten().all(|t| t.device().is_cuda())
}

/// Whether the kernels may take these tensors: enabled, all on CUDA, none tracking gradients,
/// the first (the activation) in f32/f16/bf16.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn use_kernels(ts: &[Option<&Tensor>]) -> bool {
    let Some(Some(first)) = ts.first() else {
        return false;
    };
    kernels_wanted(ts)
        && matches!(first.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && ts.iter().flatten().all(|t| !t.track_op())
}

/// Why [`use_kernels`] refuses tensors the policy would give to a kernel (`None` if it does
/// not refuse them, or they are not for the kernels at all).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn refusal(ts: &[Option<&Tensor>]) -> Option<&'static str> {
    let first = ts.first().copied().flatten()?;
    if !kernels_wanted(ts) {
        None
    } else if !matches!(first.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        Some("dtype not f32/f16/bf16")
    } else if ts.iter().flatten().any(|t| t.track_op()) {
        Some("under autograd, no backward kernel")
    } else {
        None
    }
}

#[cfg(feature = "cuda")]
fn f32c(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Causal depthwise conv followed by SiLU ([`conv::causal_depthwise`], then `silu`), fused into
/// one kernel on CUDA. Returns `(silu(conv(x)) [B, L, C]` in x's dtype, new conv state).
pub fn conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        let all = [Some(x), Some(weight), bias, state];
        if use_kernels(&all) && x.rank() == 3 && x.dim(1)? > 0 {
            let (c, k) = conv::weight_dims(weight)?;
            let (batch, _, cx) = x.dims3()?;
            if cx == c && k <= super::kernels::MAX_D_CONV {
                if let Some(s) = state {
                    conv::check_state(s, batch, c, k)?;
                }
                let w = f32c(&weight.reshape((c, k))?)?;
                let b = bias.map(f32c).transpose()?;
                let s = state.map(f32c).transpose()?;
                took("conv:kernel");
                return Ok(super::kernels::conv_fwd(
                    x,
                    &w,
                    b.as_ref(),
                    s.as_ref(),
                    true,
                )?);
            }
            if cx == c {
                let why = format!("d_conv {k} > {}", super::kernels::MAX_D_CONV);
                fallback("conv", "generic", &why, format!("x {:?}", x.dims()));
            }
        } else if let Some(why) = refusal(&all) {
            fallback("conv", "generic", why, format!("x {:?}", x.dims()));
        }
    }
    took("conv:generic");
    let (y, s) = conv::causal_depthwise(x, weight, bias, state)?;
    Ok((y.silu()?, s))
}

/// One step of [`conv_silu`]: `x [B, C]`; `state [B, C, K]` advances (in place on CUDA when it
/// is f32 and contiguous, otherwise replaced). Returns `silu(conv) [B, C]` in x's dtype.
pub fn conv_silu_step(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    state: &mut Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let all = [Some(x), Some(weight), bias, Some(&*state)];
        if use_kernels(&all) && x.rank() == 2 {
            let (c, k) = conv::weight_dims(weight)?;
            let (batch, cx) = x.dims2()?;
            let why = if state.dtype() != DType::F32 || !state.is_contiguous() {
                Some("conv state not f32 and contiguous".to_string())
            } else if k > super::kernels::MAX_D_CONV {
                Some(format!("d_conv {k} > {}", super::kernels::MAX_D_CONV))
            } else {
                None
            };
            if cx == c {
                match why {
                    None => {
                        conv::check_state(state, batch, c, k)?;
                        let w = f32c(&weight.reshape((c, k))?)?;
                        let b = bias.map(f32c).transpose()?;
                        took("conv-step:kernel");
                        return Ok(super::kernels::conv_step(x, &w, b.as_ref(), state, true)?);
                    }
                    Some(why) => {
                        let shape = format!("x {:?}, state {:?}", x.dims(), state.dims());
                        fallback("conv step", "generic", &why, shape);
                    }
                }
            }
        } else if let Some(why) = refusal(&all) {
            fallback("conv step", "generic", why, format!("x {:?}", x.dims()));
        }
    }
    took("conv-step:generic");
    let (y, s) = conv::step(x, weight, bias, state)?;
    *state = s;
    Ok(y.silu()?)
}

/// `y * silu(z)` in the compute dtype, returned in y's dtype (the gate the scan kernel fuses).
fn gate(y: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
    let Some(z) = z else {
        return Ok(y.clone());
    };
    if z.dims() != y.dims() {
        return Err(crate::Error::Invalid(format!(
            "ssd: gate z has shape {:?}, output has {:?}",
            z.dims(),
            y.dims()
        )));
    }
    let cd = compute_dtype(y.dtype());
    Ok((y.to_dtype(cd)? * z.to_dtype(cd)?.silu()?)?.to_dtype(y.dtype())?)
}

/// The shape a fallback message names for a scan.
#[cfg(feature = "cuda")]
fn scan_shape(x: &Tensor, b: &Tensor, chunk: usize) -> String {
    format!(
        "x {:?} {:?}, B {:?}, chunk {chunk}",
        x.dims(),
        x.dtype(),
        b.dims()
    )
}

/// Why the backward kernels do not take a scan under autograd (`None`: they do, or the policy
/// keeps them off).
#[cfg(feature = "cuda")]
fn train_refusal(dtype: DType, p: usize, n: usize, initial: Option<&Tensor>) -> Option<String> {
    if !policy().tensor_cores {
        None
    } else if !matches!(dtype, DType::F16 | DType::BF16) {
        Some(format!(
            "under autograd in {dtype:?}: the backward kernels take f16/bf16"
        ))
    } else if !super::kernels::ssd_train_supported(dtype, p, n) {
        Some(format!(
            "under autograd: the backward kernels need head_dim and d_state multiples of 16 \
             up to 128, not {p} and {n}"
        ))
    } else if initial.is_some_and(|t| t.track_op()) {
        Some(
            "under autograd: the initial state needs a gradient, which the kernels do not give"
                .into(),
        )
    } else {
        None
    }
}

/// The chunked SSD scan ([`ssd::chunked`]) with an optional SiLU gate `z [B, L, H, P]` on the
/// output. On CUDA: three kernels (chunk states, state passing, chunk scan; on tensor cores
/// kernels/ssd_tc.cu for f16/bf16 with head_dim and d_state multiples of 16 up to 128, else
/// the SIMT kernels/ssd.cu); under autograd, for the tensor-core shapes, also the backward
/// kernels (kernels/ssd_bwd.cu).
#[allow(clippy::too_many_arguments)]
pub fn chunked_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        if let Some(out) = train_scan(x, dt, a, b, c, d, z, chunk_size, initial)? {
            return Ok(out);
        }
        let all = [Some(x), Some(dt), Some(a), Some(b), Some(c), d, z, initial];
        if use_kernels(&all) {
            if let Some(out) = kernel_scan(x, dt, a, b, c, d, z, chunk_size, initial)? {
                return Ok(out);
            }
        } else if kernels_wanted(&all) && all.iter().flatten().any(|t| t.track_op()) {
            let dims = ssd::scan_dims(x, dt, a, b, c, d, initial)?;
            if let Some(why) = train_refusal(x.dtype(), dims.head_dim, dims.d_state, initial) {
                fallback(
                    "scan",
                    "generic autograd",
                    &why,
                    scan_shape(x, b, chunk_size),
                );
            }
        } else if let Some(why) = refusal(&all) {
            fallback("scan", "generic", why, scan_shape(x, b, chunk_size));
        }
    }
    took("scan:generic");
    let (y, s) = ssd::chunked(x, dt, a, b, c, d, chunk_size, initial)?;
    Ok((gate(&y, z)?, s))
}

/// The inference scan on the kernels: the tensor-core passes where they apply (chosen first:
/// they also take sizes whose SIMT tiles exceed shared memory, e.g. head_dim = d_state = 128),
/// else the SIMT passes. `None` (after saying why) when neither takes these tensors.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn kernel_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    use super::kernels as k;
    let dims = ssd::scan_dims(x, dt, a, b, c, d, initial)?;
    if dims.len == 0 || chunk_size == 0 {
        return Ok(None);
    }
    let (p, n, q) = (dims.head_dim, dims.d_state, chunk_size.min(dims.len));
    let shape = || scan_shape(x, b, chunk_size);
    let same_dtype = b.dtype() == x.dtype()
        && c.dtype() == x.dtype()
        && z.is_none_or(|z| z.dtype() == x.dtype() && z.dims() == x.dims());
    if !same_dtype {
        fallback(
            "scan",
            "generic",
            "B, C or z differ from x in dtype or shape",
            shape(),
        );
        return Ok(None);
    }
    let tc_shape = k::ssd_tc_shape(x.dtype(), p, n);
    let tc = policy().tensor_cores && tc_shape;
    if !tc && !k::ssd_supported(p, n, q) {
        let why = format!(
            "head_dim {p}, d_state {n}, chunk {q} exceed the SIMT kernels' tiles or shared memory{}",
            if tc_shape { " (tensor cores off by policy)" } else { "" }
        );
        fallback("scan", "generic", &why, shape());
        return Ok(None);
    }
    if !tc && policy().tensor_cores && matches!(x.dtype(), DType::F16 | DType::BF16) {
        let why = format!(
            "tensor cores need head_dim and d_state multiples of 16 up to 128, not {p} and {n}"
        );
        fallback("scan", "SIMT passes", &why, shape());
    }
    // The tensor-core passes copy tiles 8 elements (16 bytes) at a time from the start of x, B
    // and C: a view that starts off that grid is copied.
    let cont = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        Ok(if tc && t.layout().start_offset() % 8 != 0 {
            t.copy()?
        } else {
            t
        })
    };
    let (d32, z_c, init) = (
        d.map(f32c).transpose()?,
        z.map(|z| z.contiguous()).transpose()?,
        initial.map(f32c).transpose()?,
    );
    took(if tc { "scan:tc" } else { "scan:simt" });
    Ok(Some(k::ssd_chunked(
        &cont(x)?,
        &f32c(dt)?,
        &f32c(a)?,
        &cont(b)?,
        &cont(c)?,
        d32.as_ref(),
        z_c.as_ref(),
        chunk_size,
        init.as_ref(),
        tc,
    )?))
}

/// The shapes [`chunked_scan_packed`] needs, checked before any kernel reads a buffer: `dt [B,
/// L, H]`, `a [H]`, `d [H]`, `z [B, L, H, P]`, `initial [B, H, P, N]`, heads a multiple of
/// groups. Errors name the tensor and both shapes.
fn check_packed(
    xbc: &Tensor,
    dims: (usize, usize, usize, usize),
    dt: &Tensor,
    a: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    initial: Option<&Tensor>,
) -> Result<()> {
    let (h, p, g, n) = dims;
    let (bsz, len, conv) = xbc.dims3()?;
    if conv != h * p + 2 * g * n {
        return Err(crate::Error::Invalid(format!(
            "ssd: packed xBC has {conv} channels, heads x head_dim + 2 x groups x d_state = {}",
            h * p + 2 * g * n
        )));
    }
    if g == 0 || !h.is_multiple_of(g) {
        return Err(crate::Error::Invalid(format!(
            "ssd: packed scan with {h} heads is not a multiple of {g} groups"
        )));
    }
    let expect = |name: &str, t: Option<&Tensor>, want: &[usize]| -> Result<()> {
        match t {
            Some(t) if t.dims() != want => Err(crate::Error::Invalid(format!(
                "ssd: packed scan's {name} has shape {:?}, expected {want:?}",
                t.dims()
            ))),
            _ => Ok(()),
        }
    };
    expect("dt", Some(dt), &[bsz, len, h])?;
    expect("A", Some(a), &[h])?;
    expect("D", d, &[h])?;
    expect("gate z", z, &[bsz, len, h, p])?;
    expect("initial SSM state", initial, &[bsz, h, p, n])
}

/// [`chunked_scan`] over x, B and C packed in one tensor `xbc [B, L, H*P + 2*G*N]`, as the
/// mixer's conv output has them; `dims` = (H, P, G, N). Every shape is checked first (an error
/// names the tensor). On CUDA with f16/bf16 activations and head_dim, d_state multiples of 16
/// (<= 128) the kernels read xbc in place, forward and (under autograd) backward, with the gate
/// fused; otherwise xbc is split into views for [`chunked_scan`].
#[allow(clippy::too_many_arguments)]
pub fn chunked_scan_packed(
    xbc: &Tensor,
    dims: (usize, usize, usize, usize),
    dt: &Tensor,
    a: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    check_packed(xbc, dims, dt, a, d, z, initial)?;
    let (h, p, g, n) = dims;
    let (bsz, len, _) = xbc.dims3()?;
    #[cfg(feature = "cuda")]
    if let Some(out) = packed_kernels(xbc, dims, dt, a, d, z, chunk_size, initial)? {
        return Ok(out);
    }
    let x = xbc.narrow(2, 0, h * p)?.reshape((bsz, len, h, p))?;
    let b = xbc.narrow(2, h * p, g * n)?.reshape((bsz, len, g, n))?;
    let c = xbc
        .narrow(2, h * p + g * n, g * n)?
        .reshape((bsz, len, g, n))?;
    chunked_scan(&x, dt, a, &b, &c, d, z, chunk_size, initial)
}

/// The packed scan op of the kernels ([`super::kernels::ssd_chunked_train`]: tensor-core forward,
/// backward kernels), when it takes these tensors: kernels and tensor cores on, everything on
/// CUDA, f16/bf16 activations with head_dim and d_state multiples of 16 (<= 128), an initial
/// state (if any) that needs no gradient. dt, A and D go in as one f32 tensor (candle's custom
/// ops take three differentiable inputs: xbc, the gate and that). Shapes checked by the caller.
/// `None` when another path must run.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn packed_kernels(
    xbc: &Tensor,
    dims: (usize, usize, usize, usize),
    dt: &Tensor,
    a: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let (h, p, _, n) = dims;
    let all = [Some(xbc), Some(dt), Some(a), d, z, initial];
    if !kernels_wanted(&all)
        || !policy().tensor_cores
        || initial.is_some_and(|t| t.track_op())
        || chunk_size == 0
        || xbc.dim(1)? == 0
        || z.is_some_and(|z| z.dtype() != xbc.dtype())
        || !super::kernels::ssd_train_supported(xbc.dtype(), p, n)
    {
        return Ok(None);
    }
    let d = match d {
        Some(d) => d.to_dtype(DType::F32)?,
        None => Tensor::zeros(h, DType::F32, xbc.device())?,
    };
    let dtad = Tensor::cat(
        &[
            &dt.to_dtype(DType::F32)?.flatten_all()?,
            &a.to_dtype(DType::F32)?,
            &d,
        ],
        0,
    )?;
    let z = z.map(|z| z.contiguous()).transpose()?;
    let init = initial.map(f32c).transpose()?;
    took("scan:tc-train");
    Ok(Some(super::kernels::ssd_chunked_train(
        &xbc.contiguous()?,
        z.as_ref(),
        &dtad,
        dims,
        chunk_size,
        init.as_ref(),
    )?))
}

/// The chunked scan under autograd on CUDA with x, B, C as separate tensors: packed into one
/// (a copy, and the gradient split back) for [`packed_kernels`]. `None` when nothing tracks
/// gradients or the kernels do not take these tensors.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn train_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    chunk_size: usize,
    initial: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let all = [Some(x), Some(dt), Some(a), Some(b), Some(c), d, z, initial];
    if !all.iter().flatten().any(|t| t.track_op()) || x.rank() != 4 || b.rank() != 4 {
        return Ok(None);
    }
    let dims = ssd::scan_dims(x, dt, a, b, c, d, initial)?;
    if b.dtype() != x.dtype()
        || c.dtype() != x.dtype()
        || !super::kernels::ssd_train_supported(x.dtype(), dims.head_dim, dims.d_state)
        || !all.iter().flatten().all(|t| t.device().is_cuda())
    {
        return Ok(None);
    }
    let (bsz, len, h, p) = x.dims4()?;
    let (g, n) = (b.dim(2)?, b.dim(3)?);
    if z.is_some_and(|z| z.dims() != [bsz, len, h, p]) {
        return Ok(None); // the generic path reports the gate's shape
    }
    let xbc = Tensor::cat(
        &[
            &x.reshape((bsz, len, h * p))?,
            &b.reshape((bsz, len, g * n))?,
            &c.reshape((bsz, len, g * n))?,
        ],
        2,
    )?;
    packed_kernels(&xbc, (h, p, g, n), dt, a, d, z, chunk_size, initial)
}

/// `dt = softplus(dt_raw + dt_bias)`, clamped to `limit` ([`ssd::discretize_dt`]) for one
/// decode step, `dt_raw [B, H]`: one kernel on CUDA (reading the dt columns of in_proj's output
/// in place) where the generic form is about ten launches.
pub fn discretize_dt(
    dt_raw: &Tensor,
    dt_bias: &Tensor,
    limit: Option<(f64, f64)>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let all = [Some(dt_raw), Some(dt_bias)];
        if use_kernels(&all)
            && dt_raw.rank() == 2
            && dt_bias.dtype() == DType::F32
            && dt_raw.stride().last() == Some(&1)
        {
            let (lo, hi) = limit.map_or((f32::NEG_INFINITY, f32::INFINITY), |(lo, hi)| {
                (lo as f32, hi as f32)
            });
            took("dt-step:kernel");
            return Ok(super::kernels::dt_softplus(dt_raw, dt_bias, lo, hi)?);
        }
    }
    took("dt-step:generic");
    ssd::discretize_dt(dt_raw, dt_bias, limit)
}

/// One decoding step ([`ssd::step`]) with an optional gate `z [B, H, P]`; `state` advances (in
/// place on CUDA when it is f32 and contiguous, otherwise replaced). Returns `y [B, H, P]`.
#[allow(clippy::too_many_arguments)]
pub fn scan_step(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    state: &mut Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let all = [
            Some(x),
            Some(dt),
            Some(a),
            Some(b),
            Some(c),
            d,
            z,
            Some(&*state),
        ];
        let shape = || format!("x {:?} {:?}, state {:?}", x.dims(), x.dtype(), state.dims());
        if use_kernels(&all) && x.rank() == 3 && b.rank() == 3 && c.rank() == 3 {
            let dims = ssd::scan_dims(
                &x.unsqueeze(1)?,
                &dt.unsqueeze(1)?,
                a,
                &b.unsqueeze(1)?,
                &c.unsqueeze(1)?,
                d,
                Some(state),
            )?;
            let same_dtype = b.dtype() == x.dtype()
                && c.dtype() == x.dtype()
                && z.is_none_or(|z| z.dtype() == x.dtype() && z.dims() == x.dims());
            if state.dtype() != DType::F32 || !state.is_contiguous() {
                fallback(
                    "scan step",
                    "generic",
                    "state not f32 and contiguous",
                    shape(),
                );
            } else if !same_dtype {
                let why = "B, C or z differ from x in dtype or shape";
                fallback("scan step", "generic", why, shape());
            } else if dims.batch > 0 {
                let cont = |t: &Tensor| -> Result<Tensor> { Ok(t.contiguous()?) };
                let (d32, z_c) = (d.map(f32c).transpose()?, z.map(cont).transpose()?);
                took("scan-step:kernel");
                return Ok(super::kernels::ssd_state_update(
                    &cont(x)?,
                    &f32c(dt)?,
                    &f32c(a)?,
                    &cont(b)?,
                    &cont(c)?,
                    d32.as_ref(),
                    z_c.as_ref(),
                    state,
                )?);
            }
        } else if let Some(why) = refusal(&all) {
            fallback("scan step", "generic", why, shape());
        }
    }
    took("scan-step:generic");
    let (y, s) = ssd::step(x, dt, a, b, c, d, state)?;
    *state = s;
    gate(&y, z)
}

/// The gated, grouped RMSNorm ([`norm::gated_rms_norm`]); one kernel on CUDA.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group_size: usize,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let all = [Some(y), Some(z), Some(weight)];
        if use_kernels(&all) && z.dtype() == y.dtype() && y.rank() >= 1 {
            norm::check(y, z, weight, group_size)?;
            let w = f32c(weight)?;
            // The kernel reads rows with one stride (z is a column slice of in_proj's output,
            // read in place); a tensor laid out otherwise is copied first.
            let rows = |t: &Tensor| -> Result<Tensor> {
                let (st, d) = (t.stride(), t.dims());
                let one_stride = st.last() == Some(&1)
                    && (0..d.len().saturating_sub(2))
                        .all(|i| d[i] <= 1 || st[i] == st[i + 1] * d[i + 1]);
                Ok(if one_stride {
                    t.clone()
                } else {
                    t.contiguous()?
                })
            };
            took("norm:kernel");
            return Ok(super::kernels::gated_norm(
                &rows(y)?,
                &rows(z)?,
                &w,
                group_size,
                eps,
            )?);
        } else if let Some(why) = refusal(&all) {
            fallback(
                "norm",
                "generic",
                why,
                format!("y {:?} {:?}", y.dims(), y.dtype()),
            );
        }
    }
    took("norm:generic");
    norm::gated_rms_norm(y, z, weight, group_size, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A cached state of another batch (or any side input of the wrong shape) is an error that
    /// names the tensor and both shapes, before any path (a kernel would read out of bounds).
    #[test]
    fn packed_scan_refuses_wrong_shapes_by_name() {
        let (b, len, h, p, g, n) = (2, 5, 4, 3, 2, 4);
        let xbc = randn(&[b, len, h * p + 2 * g * n], 1);
        let dt = randn(&[b, len, h], 2).abs().unwrap();
        let a = randn(&[h], 3);
        let d = randn(&[h], 4);
        let z = randn(&[b, len, h, p], 5);
        let scan = |dt: &Tensor, d: &Tensor, z: &Tensor, init: &Tensor| {
            chunked_scan_packed(&xbc, (h, p, g, n), dt, &a, Some(d), Some(z), 4, Some(init))
        };
        let init = randn(&[b, h, p, n], 6);
        assert!(scan(&dt, &d, &z, &init).is_ok());
        let cases = [
            (
                scan(&dt, &d, &z, &randn(&[1, h, p, n], 7)),
                "initial SSM state has shape [1, 4, 3, 4], expected [2, 4, 3, 4]",
            ),
            (
                scan(&randn(&[b, len - 1, h], 8), &d, &z, &init),
                "dt has shape [2, 4, 4], expected [2, 5, 4]",
            ),
            (
                scan(&dt, &randn(&[h + 1], 9), &z, &init),
                "D has shape [5], expected [4]",
            ),
            (
                scan(&dt, &d, &randn(&[b, len, h, p + 1], 10), &init),
                "gate z has shape [2, 5, 4, 4], expected [2, 5, 4, 3]",
            ),
        ];
        for (got, want) in cases {
            let err = got.expect_err(want).to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    /// `traced` lists each path once in first-seen order, and a nested trace leaves the outer
    /// one as it was.
    #[test]
    fn traced_lists_the_paths_taken() {
        let (b, len, h, p, g, n) = (1, 6, 2, 2, 1, 3);
        let x = randn(&[b, len, h, p], 1);
        let dt = randn(&[b, len, h], 2).abs().unwrap();
        let a = randn(&[h], 3);
        let bm = randn(&[b, len, g, n], 4);
        let cm = randn(&[b, len, g, n], 5);
        let scan = || chunked_scan(&x, &dt, &a, &bm, &cm, None, None, 4, None).unwrap();
        let ((_, inner), outer) = traced(|| {
            scan();
            let inner = traced(|| {
                let y = Tensor::ones((b, h * p), DType::F32, &Device::Cpu).unwrap();
                let w = Tensor::ones(h * p, DType::F32, &Device::Cpu).unwrap();
                gated_rms_norm(&y, &y, &w, h * p, 1e-5).unwrap()
            });
            scan();
            inner
        });
        assert_eq!(outer, ["scan:generic"]);
        assert_eq!(inner, ["norm:generic"]);
        assert_eq!(traced(|| ()).1, Vec::<&str>::new());
    }
}
