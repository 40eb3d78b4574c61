//! The `Tensor` type of scripts: candle's tensor, with shape, dtype, indexing and slicing,
//! conversion to arrays, arithmetic and the few reductions one needs to look at logits.

use candle_core::{DType, Tensor as CTensor, D};
use rhai::{Array, Dynamic, FLOAT, INT};

use super::convert::{index, runtime_error, to_usize, OrRhai, RhaiResult};

/// Scripts see candle tensors as they are.
pub type Tensor = CTensor;

/// Above this many elements a tensor is shown by its shape only.
const SHOW_VALUES_UP_TO: usize = 64;

/// A short description: shape and dtype, and the values when the tensor is small.
pub fn describe(t: &Tensor) -> String {
    let head = format!("Tensor{:?} {}", t.dims(), t.dtype().as_str());
    if t.elem_count() > SHOW_VALUES_UP_TO {
        return head;
    }
    match to_dynamic(t) {
        Ok(v) => format!("{head} {v}"),
        Err(_) => head,
    }
}

/// Nested arrays of the values (INT for integer dtypes, FLOAT otherwise); a 0-d tensor gives
/// its value alone.
pub fn to_dynamic(t: &Tensor) -> RhaiResult<Dynamic> {
    let values: Vec<Dynamic> = if t.dtype().is_int() {
        t.to_dtype(DType::I64)
            .and_then(|t| t.flatten_all()?.to_vec1::<i64>())
            .or_rhai()?
            .into_iter()
            .map(|v| Dynamic::from_int(v as INT))
            .collect()
    } else {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
            .or_rhai()?
            .into_iter()
            .map(|v| Dynamic::from_float(v as FLOAT))
            .collect()
    };
    if t.rank() == 0 {
        return Ok(values.into_iter().next().unwrap_or(Dynamic::UNIT));
    }
    Ok(nest(values, t.dims()))
}

/// Cut a flat list into nested arrays of `dims`.
fn nest(values: Vec<Dynamic>, dims: &[usize]) -> Dynamic {
    if dims.len() <= 1 {
        return Dynamic::from_array(values);
    }
    let inner: usize = dims[1..].iter().product();
    let mut rows = Vec::with_capacity(dims[0]);
    let mut it = values.into_iter();
    for _ in 0..dims[0] {
        let chunk: Vec<Dynamic> = it.by_ref().take(inner).collect();
        rows.push(nest(chunk, &dims[1..]));
    }
    Dynamic::from_array(rows)
}

/// The shape and flat values of nested arrays of numbers; ragged or non-numeric input is an
/// error naming the first offending place.
fn flatten(
    value: &Dynamic,
    depth: usize,
    shape: &mut Vec<usize>,
    out: &mut Vec<f32>,
) -> RhaiResult<()> {
    if let Some(arr) = value.read_lock::<Array>() {
        match shape.get(depth) {
            None => shape.push(arr.len()),
            Some(&n) if n != arr.len() => {
                return Err(runtime_error(format!(
                    "tensor: ragged array (length {} where {n} was expected at depth {depth})",
                    arr.len()
                )))
            }
            Some(_) => {}
        }
        for v in arr.iter() {
            flatten(v, depth + 1, shape, out)?;
        }
        return Ok(());
    }
    if depth != shape.len() {
        return Err(runtime_error(format!(
            "tensor: ragged array (a number at depth {depth}, arrays at depth {})",
            shape.len()
        )));
    }
    let x = match (value.as_float(), value.as_int()) {
        (Ok(f), _) => f as f32,
        (_, Ok(i)) => i as f32,
        _ => {
            return Err(runtime_error(format!(
                "tensor: expected numbers, found {}",
                value.type_name()
            )))
        }
    };
    out.push(x);
    Ok(())
}

/// A dimension argument; negative counts from the end (`-1` is the last).
fn dim(t: &Tensor, d: INT) -> RhaiResult<usize> {
    index(d, t.rank(), "dimension")
}

fn shape_arg(shape: &Array) -> RhaiResult<Vec<usize>> {
    shape
        .iter()
        .map(|v| {
            v.as_int()
                .map_err(|_| {
                    runtime_error(format!("a shape holds integers, not {}", v.type_name()))
                })
                .and_then(|i| to_usize(i, "a shape's size"))
        })
        .collect()
}

/// `start..end` on a dimension of `len`, Python style: negative bounds count from the end and
/// bounds are clipped to the dimension.
fn range_on(len: usize, start: INT, end: INT) -> (usize, usize) {
    let clip = |i: INT| {
        let i = if i < 0 { i + len as INT } else { i };
        i.clamp(0, len as INT) as usize
    };
    let (s, e) = (clip(start), clip(end));
    (s, e.saturating_sub(s))
}

#[rhai::export_module]
pub mod api {
    use super::*;
    use crate::script::session_of;
    use rhai::NativeCallContext;

    /// A float32 tensor from nested arrays of numbers, on the session's device:
    /// `tensor([[1, 2], [3, 4]])` has shape [2, 2]; `tensor(1.5)` is 0-d.
    #[rhai_fn(return_raw)]
    pub fn tensor(ctx: NativeCallContext, data: Dynamic) -> RhaiResult<Tensor> {
        let session = session_of(&ctx)?;
        let mut shape = Vec::new();
        let mut values = Vec::new();
        flatten(&data, 0, &mut shape, &mut values)?;
        Tensor::from_vec(values, shape, &session.device).or_rhai()
    }

    /// A float32 tensor of zeros of `shape` (an array of sizes).
    #[rhai_fn(return_raw)]
    pub fn zeros(ctx: NativeCallContext, shape: Array) -> RhaiResult<Tensor> {
        let session = session_of(&ctx)?;
        Tensor::zeros(shape_arg(&shape)?, DType::F32, &session.device).or_rhai()
    }

    /// A float32 tensor of ones of `shape` (an array of sizes).
    #[rhai_fn(return_raw)]
    pub fn ones(ctx: NativeCallContext, shape: Array) -> RhaiResult<Tensor> {
        let session = session_of(&ctx)?;
        Tensor::ones(shape_arg(&shape)?, DType::F32, &session.device).or_rhai()
    }

    /// The sizes of the dimensions, as an array: `logits.shape()` is `[tokens, vocab]`.
    #[rhai_fn(pure)]
    pub fn shape(t: &mut Tensor) -> Array {
        t.dims()
            .iter()
            .map(|&d| Dynamic::from_int(d as INT))
            .collect()
    }

    /// The number of dimensions.
    #[rhai_fn(pure)]
    pub fn rank(t: &mut Tensor) -> INT {
        t.rank() as INT
    }

    /// The size of the first dimension (0 for a 0-d tensor).
    #[rhai_fn(pure)]
    pub fn len(t: &mut Tensor) -> INT {
        t.dims().first().copied().unwrap_or(0) as INT
    }

    /// The number of elements.
    #[rhai_fn(pure)]
    pub fn numel(t: &mut Tensor) -> INT {
        t.elem_count() as INT
    }

    /// The element type: "f32", "bf16", "f16", "u32", "i64", ...
    #[rhai_fn(pure)]
    pub fn dtype(t: &mut Tensor) -> String {
        t.dtype().as_str().to_string()
    }

    /// The same values in another dtype ("f32", "bf16", "f16", "f64", "u32", "i64").
    #[rhai_fn(pure, return_raw)]
    pub fn to_dtype(t: &mut Tensor, dtype: &str) -> RhaiResult<Tensor> {
        let dt = match dtype {
            "f64" => DType::F64,
            "u32" => DType::U32,
            "i64" => DType::I64,
            other => crate::script::parse_dtype(other).or_rhai()?,
        };
        t.to_dtype(dt).or_rhai()
    }

    /// The values as nested arrays (INT for integer dtypes, FLOAT otherwise); for a 0-d tensor,
    /// the value itself.
    #[rhai_fn(pure, return_raw)]
    pub fn to_array(t: &mut Tensor) -> RhaiResult<Dynamic> {
        to_dynamic(t)
    }

    /// The value of a one-element tensor (FLOAT, or INT for integer dtypes).
    #[rhai_fn(pure, return_raw)]
    pub fn item(t: &mut Tensor) -> RhaiResult<Dynamic> {
        if t.elem_count() != 1 {
            return Err(runtime_error(format!(
                "item() needs a tensor of one element, this one has shape {:?}",
                t.dims()
            )));
        }
        to_dynamic(&t.flatten_all().or_rhai()?.squeeze(0).or_rhai()?)
    }

    /// `t[i]`: the `i`-th entry along the first dimension (negative counts from the end).
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn index_int(t: &mut Tensor, i: INT) -> RhaiResult<Tensor> {
        let n = len(t) as usize;
        if t.rank() == 0 {
            return Err(runtime_error("cannot index a 0-d tensor".into()));
        }
        t.get(index(i, n, "index")?).or_rhai()
    }

    /// `t[a..b]`: entries `a` to `b - 1` of the first dimension (negative bounds count from
    /// the end; bounds are clipped).
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn index_range(t: &mut Tensor, r: std::ops::Range<INT>) -> RhaiResult<Tensor> {
        if t.rank() == 0 {
            return Err(runtime_error("cannot slice a 0-d tensor".into()));
        }
        let (start, n) = range_on(t.dims()[0], r.start, r.end);
        t.narrow(0, start, n).or_rhai()
    }

    /// `t[a..=b]`: entries `a` to `b` of the first dimension.
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn index_range_inclusive(
        t: &mut Tensor,
        r: std::ops::RangeInclusive<INT>,
    ) -> RhaiResult<Tensor> {
        index_range(t, *r.start()..r.end() + 1)
    }

    /// `len` entries of dimension `dim` from `start` (negative dim counts from the end).
    #[rhai_fn(pure, return_raw)]
    pub fn narrow(t: &mut Tensor, dim: INT, start: INT, len: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.narrow(d, to_usize(start, "start")?, to_usize(len, "len")?)
            .or_rhai()
    }

    /// Entry `i` of dimension `dim`, that dimension removed.
    #[rhai_fn(pure, return_raw)]
    pub fn select(t: &mut Tensor, dim: INT, i: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        let i = index(i, t.dims()[d], "index")?;
        t.get_on_dim(d, i).or_rhai()
    }

    /// The same values in another shape (an array of sizes).
    #[rhai_fn(pure, return_raw)]
    pub fn reshape(t: &mut Tensor, shape: Array) -> RhaiResult<Tensor> {
        t.reshape(shape_arg(&shape)?).or_rhai()
    }

    /// Swap two dimensions.
    #[rhai_fn(pure, return_raw)]
    pub fn transpose(t: &mut Tensor, d1: INT, d2: INT) -> RhaiResult<Tensor> {
        let (a, b) = (super::dim(t, d1)?, super::dim(t, d2)?);
        t.transpose(a, b).or_rhai()
    }

    /// Matrix product (batched over leading dimensions, which broadcast).
    #[rhai_fn(pure, return_raw)]
    pub fn matmul(a: &mut Tensor, b: Tensor) -> RhaiResult<Tensor> {
        a.broadcast_matmul(&b).or_rhai()
    }

    #[rhai_fn(name = "+", return_raw)]
    pub fn add(a: Tensor, b: Tensor) -> RhaiResult<Tensor> {
        a.broadcast_add(&b).or_rhai()
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub(a: Tensor, b: Tensor) -> RhaiResult<Tensor> {
        a.broadcast_sub(&b).or_rhai()
    }
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul(a: Tensor, b: Tensor) -> RhaiResult<Tensor> {
        a.broadcast_mul(&b).or_rhai()
    }
    #[rhai_fn(name = "/", return_raw)]
    pub fn div(a: Tensor, b: Tensor) -> RhaiResult<Tensor> {
        a.broadcast_div(&b).or_rhai()
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn neg(a: Tensor) -> RhaiResult<Tensor> {
        a.neg().or_rhai()
    }

    #[rhai_fn(name = "+", return_raw)]
    pub fn add_f(a: Tensor, x: FLOAT) -> RhaiResult<Tensor> {
        a.affine(1.0, x).or_rhai()
    }
    #[rhai_fn(name = "+", return_raw)]
    pub fn f_add(x: FLOAT, a: Tensor) -> RhaiResult<Tensor> {
        a.affine(1.0, x).or_rhai()
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub_f(a: Tensor, x: FLOAT) -> RhaiResult<Tensor> {
        a.affine(1.0, -x).or_rhai()
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn f_sub(x: FLOAT, a: Tensor) -> RhaiResult<Tensor> {
        a.affine(-1.0, x).or_rhai()
    }
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul_f(a: Tensor, x: FLOAT) -> RhaiResult<Tensor> {
        a.affine(x, 0.0).or_rhai()
    }
    #[rhai_fn(name = "*", return_raw)]
    pub fn f_mul(x: FLOAT, a: Tensor) -> RhaiResult<Tensor> {
        a.affine(x, 0.0).or_rhai()
    }
    #[rhai_fn(name = "/", return_raw)]
    pub fn div_f(a: Tensor, x: FLOAT) -> RhaiResult<Tensor> {
        a.affine(1.0 / x, 0.0).or_rhai()
    }
    #[rhai_fn(name = "/", return_raw)]
    pub fn f_div(x: FLOAT, a: Tensor) -> RhaiResult<Tensor> {
        a.recip().and_then(|r| r.affine(x, 0.0)).or_rhai()
    }
    #[rhai_fn(name = "+", return_raw)]
    pub fn add_i(a: Tensor, x: INT) -> RhaiResult<Tensor> {
        add_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "+", return_raw)]
    pub fn i_add(x: INT, a: Tensor) -> RhaiResult<Tensor> {
        add_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn sub_i(a: Tensor, x: INT) -> RhaiResult<Tensor> {
        sub_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "-", return_raw)]
    pub fn i_sub(x: INT, a: Tensor) -> RhaiResult<Tensor> {
        f_sub(x as FLOAT, a)
    }
    #[rhai_fn(name = "*", return_raw)]
    pub fn mul_i(a: Tensor, x: INT) -> RhaiResult<Tensor> {
        mul_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "*", return_raw)]
    pub fn i_mul(x: INT, a: Tensor) -> RhaiResult<Tensor> {
        mul_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "/", return_raw)]
    pub fn div_i(a: Tensor, x: INT) -> RhaiResult<Tensor> {
        div_f(a, x as FLOAT)
    }
    #[rhai_fn(name = "/", return_raw)]
    pub fn i_div(x: INT, a: Tensor) -> RhaiResult<Tensor> {
        f_div(x as FLOAT, a)
    }

    /// Elementwise e^x.
    #[rhai_fn(pure, return_raw)]
    pub fn exp(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.exp().or_rhai()
    }
    /// Elementwise natural logarithm.
    #[rhai_fn(pure, return_raw)]
    pub fn log(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.log().or_rhai()
    }
    /// Elementwise absolute value.
    #[rhai_fn(pure, return_raw)]
    pub fn abs(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.abs().or_rhai()
    }
    /// Elementwise square root.
    #[rhai_fn(pure, return_raw)]
    pub fn sqrt(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.sqrt().or_rhai()
    }

    /// The sum of all elements (a 0-d tensor; `.item()` gives the number).
    #[rhai_fn(name = "sum", pure, return_raw)]
    pub fn sum_all(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.sum_all().or_rhai()
    }
    /// The sum over dimension `dim`, which is removed.
    #[rhai_fn(name = "sum", pure, return_raw)]
    pub fn sum_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.sum(d).or_rhai()
    }
    /// The mean of all elements (0-d).
    #[rhai_fn(name = "mean", pure, return_raw)]
    pub fn mean_all(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.mean_all().or_rhai()
    }
    /// The mean over dimension `dim`, which is removed.
    #[rhai_fn(name = "mean", pure, return_raw)]
    pub fn mean_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.mean(d).or_rhai()
    }
    /// The largest element (0-d).
    #[rhai_fn(name = "max", pure, return_raw)]
    pub fn max_all(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.max_all().or_rhai()
    }
    /// The largest element over dimension `dim`, which is removed.
    #[rhai_fn(name = "max", pure, return_raw)]
    pub fn max_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.max(d).or_rhai()
    }
    /// The smallest element (0-d).
    #[rhai_fn(name = "min", pure, return_raw)]
    pub fn min_all(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.min_all().or_rhai()
    }
    /// The smallest element over dimension `dim`, which is removed.
    #[rhai_fn(name = "min", pure, return_raw)]
    pub fn min_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.min(d).or_rhai()
    }
    /// Indices (u32) of the largest entries along the last dimension, which is removed:
    /// `logits.argmax()` is the greedy next token at every position.
    #[rhai_fn(name = "argmax", pure, return_raw)]
    pub fn argmax_last(t: &mut Tensor) -> RhaiResult<Tensor> {
        t.argmax(D::Minus1).or_rhai()
    }
    /// Indices (u32) of the largest entries along `dim`, which is removed.
    #[rhai_fn(name = "argmax", pure, return_raw)]
    pub fn argmax_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        t.argmax(d).or_rhai()
    }
    /// Softmax along the last dimension (probabilities from logits).
    #[rhai_fn(name = "softmax", pure, return_raw)]
    pub fn softmax_last(t: &mut Tensor) -> RhaiResult<Tensor> {
        candle_nn::ops::softmax(t, D::Minus1).or_rhai()
    }
    /// Softmax along `dim`.
    #[rhai_fn(name = "softmax", pure, return_raw)]
    pub fn softmax_dim(t: &mut Tensor, dim: INT) -> RhaiResult<Tensor> {
        let d = super::dim(t, dim)?;
        candle_nn::ops::softmax(t, d).or_rhai()
    }
    /// Log-softmax along the last dimension.
    #[rhai_fn(pure, return_raw)]
    pub fn log_softmax(t: &mut Tensor) -> RhaiResult<Tensor> {
        candle_nn::ops::log_softmax(t, D::Minus1).or_rhai()
    }

    /// Shape, dtype, and the values when there are few.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(t: &mut Tensor) -> String {
        describe(t)
    }
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn to_debug(t: &mut Tensor) -> String {
        describe(t)
    }
}
