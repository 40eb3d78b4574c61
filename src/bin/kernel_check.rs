//! Parity of the Mamba-2 CUDA kernels with the generic candle path on the CPU (`cuda` feature).
//!
//! For each shape (the Phi-2 hybrid mixer's: 32 heads x 80, d_state 80, 32 groups, chunk 256;
//! and odd ones: lengths not a multiple of the chunk, one group, groups = heads, batch > 1,
//! small odd sizes, and shapes for the tensor-core passes) and each dtype (f32, f16, bf16), the same inputs run through `fused::*` on the
//! GPU (the kernels) and on the CPU (the generic code), and the whole mixer (prefill, then
//! decode steps) likewise. Prints one JSON line per comparison, `max_abs` and `rel` =
//! max |gpu - cpu| / max |cpu|, against the tolerance stated in [`tolerance`]; exits 1 if any
//! comparison fails (or a kernel errors), 0 otherwise.
//!
//! Run on the GPU machine: `kernel_check` (no arguments; `--quick` for the small shapes only).

use candle_core::{DType, Device, Tensor};
use matvlm::model::mamba2::{fused, Mamba2, Mamba2Config};

/// Tolerance on `rel` for an output of dtype `out` computed from inputs of dtype `input`.
///
/// f32: both sides compute in f32 and differ only in summation order (tree vs sequential
/// cumsum, tiled vs BLAS dot products): 1e-4 of the output's range (observed CPU-vs-CPU
/// reorderings are ~1e-6). bf16 outputs: one bf16 rounding is 2^-8 = 0.4% of a value; the two
/// sides may round a value that sits near a boundary differently and, in the mixer, feed that
/// into the next stage: 2e-2. f32 states from 16-bit inputs: the tensor-core passes round each
/// weighted input dt_j exp(cum_last - cum_j) x_j to the input dtype before the product, as
/// upstream's Triton kernels do (one rounding, 2^-8 in bf16, per term of a sum of up to a chunk
/// of terms: ~2.5e-3 seen): 1e-2 (the mixer's states: 2e-2, as its outputs).
///
/// Gradients of the scan (`Stage::Grad`): f32 runs the generic path on both sides (no f32
/// backward kernel), through a chain of reductions in different orders: 1e-3. f16/bf16 run the
/// backward kernels, which round each operand of a tensor-core product (scores, their
/// gradients, weighted inputs) to the input dtype once, as upstream's Triton backward does, and
/// sum up to a chunk of such terms (dA and dD sum over every position): 3e-2 against an f32
/// reference on the same values, or twice the error of the CPU's own 16-bit run, whichever is
/// larger (`Report::compare_grads_with_peer`). The mixer's
/// parameter gradients (`Stage::MixerGrad`) add the 16-bit roundings of in_proj, conv, norm and
/// out_proj, each fed by the previous stage, and sums over every position: 5e-2, with the same
/// f32 reference and 16-bit floor.
fn tolerance(input: DType, out: DType, stage: Stage) -> f64 {
    match (input, out, stage) {
        (DType::F32, _, Stage::Grad | Stage::MixerGrad) => 1e-3,
        (_, _, Stage::Grad) => 3e-2,
        (_, _, Stage::MixerGrad) => 5e-2,
        (DType::F32, _, _) => 1e-4,
        (_, DType::F32, Stage::Kernel) => 1e-2,
        _ => 2e-2,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Stage {
    /// One kernel on identical inputs.
    Kernel,
    /// The whole mixer (stages feed each other).
    Mixer,
    /// Gradients of the scan's inputs (backward kernels on the GPU, generic autograd on the CPU).
    Grad,
    /// Gradients of the whole mixer's parameters (stages feed each other, as in `Mixer`).
    MixerGrad,
}

struct Case {
    name: &'static str,
    batch: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    d_state: usize,
    groups: usize,
    chunk: usize,
}

// One row of the CASES table: positional, so the table reads as one.
#[allow(clippy::too_many_arguments)]
const fn case(
    name: &'static str,
    batch: usize,
    len: usize,
    heads: usize,
    head_dim: usize,
    d_state: usize,
    groups: usize,
    chunk: usize,
) -> Case {
    Case {
        name,
        batch,
        len,
        heads,
        head_dim,
        d_state,
        groups,
        chunk,
    }
}

const CASES: &[Case] = &[
    case("phi2 b1 L512", 1, 512, 32, 80, 80, 32, 256),
    case("phi2 b2 L300 (tail chunk)", 2, 300, 32, 80, 80, 32, 256),
    case("phi2 b1 L37 (< chunk)", 1, 37, 32, 80, 80, 32, 256),
    case("phi2 ngroups=1 b2 L260", 2, 260, 32, 80, 80, 1, 256),
    case("odd b3 L150 h6x24 n20 g2 q64", 3, 150, 6, 24, 20, 2, 64),
    case("odd b2 L97 h4x33 n17 g4 q32", 2, 97, 4, 33, 17, 4, 32),
    case("odd b1 L1 h4x16 n16 g1 q256", 1, 1, 4, 16, 16, 1, 256),
    // Shapes the tensor-core passes take in f16/bf16 (head_dim, d_state multiples of 16): head
    // dim != d_state, several row tiles and source tiles with a tail, the largest tile sizes.
    case("tc b2 L200 h4x32 n48 g2 q128", 2, 200, 4, 32, 48, 2, 128),
    case("tc b1 L70 h2x128 n128 g1 q64", 1, 70, 2, 128, 128, 1, 64),
];

struct Report {
    failures: usize,
    total: usize,
}

impl Report {
    fn compare(
        &mut self,
        case: &str,
        dtype: DType,
        what: &str,
        gpu: &Tensor,
        cpu: &Tensor,
        stage: Stage,
    ) {
        let tol = tolerance(dtype, cpu.dtype(), stage);
        self.compare_tol(case, dtype, what, gpu, cpu, tol, "");
    }

    /// `compare` with the tolerance given; `note` is added to the JSON line (`,"key":value`).
    #[allow(clippy::too_many_arguments)]
    fn compare_tol(
        &mut self,
        case: &str,
        dtype: DType,
        what: &str,
        gpu: &Tensor,
        cpu: &Tensor,
        tol: f64,
        note: &str,
    ) {
        self.total += 1;
        let (line, ok) = match max_rel_err(gpu, cpu) {
            Ok((abs, rel)) => {
                let ok = rel <= tol && rel.is_finite();
                (
                    format!(
                        r#"{{"check":"{case}","dtype":"{dtype:?}","what":"{what}","max_abs":{abs:.3e},"rel":{rel:.3e},"tol":{tol:.1e}{note},"pass":{ok}}}"#
                    ),
                    ok,
                )
            }
            Err(e) => (
                format!(
                    r#"{{"check":"{case}","dtype":"{dtype:?}","what":"{what}","error":{:?},"pass":false}}"#,
                    e.to_string()
                ),
                false,
            ),
        };
        if !ok {
            self.failures += 1;
        }
        println!("{line}");
        eprintln!(
            "{} {case} {dtype:?} {what}",
            if ok { "PASS" } else { "FAIL" }
        );
    }

    fn error(&mut self, case: &str, dtype: DType, what: &str, e: impl std::fmt::Display) {
        self.total += 1;
        self.failures += 1;
        println!(
            r#"{{"check":"{case}","dtype":"{dtype:?}","what":"{what}","error":{:?},"pass":false}}"#,
            e.to_string()
        );
        eprintln!("FAIL {case} {dtype:?} {what}: {e}");
    }
}

/// The largest absolute difference of `a` from `reference` (any devices, same shape) and that
/// over the reference's largest magnitude.
fn max_rel_err(a: &Tensor, reference: &Tensor) -> candle_core::Result<(f64, f64)> {
    let g = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let c = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if g.dims() != c.dims() {
        candle_core::bail!("shapes differ: {:?} vs reference {:?}", g.dims(), c.dims());
    }
    let abs = (g - &c)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok((abs, abs / scale.max(1e-30)))
}

/// Inputs of one case, made on the CPU in f32 (then cast and copied to each side).
struct Inputs {
    x: Tensor,
    dt: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
    z: Tensor,
    init: Tensor,
}

fn inputs(k: &Case) -> candle_core::Result<Inputs> {
    let cpu = &Device::Cpu;
    let (bb, l, h, p, n, g) = (k.batch, k.len, k.heads, k.head_dim, k.d_state, k.groups);
    let softplus = |t: Tensor| -> candle_core::Result<Tensor> { (t.exp()? + 1.0)?.log() };
    Ok(Inputs {
        x: Tensor::randn(0f32, 1.0, (bb, l, h, p), cpu)?,
        dt: softplus(((Tensor::randn(0f32, 1.0, (bb, l, h), cpu)? * 0.5)? - 3.0)?)?,
        a: (Tensor::rand(0f32, 1.0, h, cpu)? * 16f64.ln())?
            .exp()?
            .neg()?,
        b: Tensor::randn(0f32, 1.0, (bb, l, g, n), cpu)?,
        c: Tensor::randn(0f32, 1.0, (bb, l, g, n), cpu)?,
        d: Tensor::randn(0f32, 1.0, h, cpu)?,
        z: Tensor::randn(0f32, 1.0, (bb, l, h, p), cpu)?,
        init: (Tensor::randn(0f32, 1.0, (bb, h, p, n), cpu)? * 0.1)?,
    })
}

/// The named gradients of one run (or why it failed).
type Grads = matvlm::Result<Vec<Tensor>>;

/// Each tensor as a fresh `Var` (a leaf the backward reaches).
fn vars(ts: Vec<Tensor>) -> candle_core::Result<Vec<candle_core::Var>> {
    ts.iter().map(candle_core::Var::from_tensor).collect()
}

/// The gradients of `sum(y * w)` (in f32) for each of `vars`, in their order; `names` for the
/// error when one gets none.
fn grads_of(
    y: &Tensor,
    w: &Tensor,
    vars: &[candle_core::Var],
    names: &[String],
) -> matvlm::Result<Vec<Tensor>> {
    let loss = (y.to_dtype(DType::F32)? * w.to_device(y.device())?)?.sum_all()?;
    let grads = loss.backward()?;
    vars.iter()
        .zip(names)
        .map(|(v, name)| {
            grads
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| matvlm::Error::Invalid(format!("no gradient for {name}")))
        })
        .collect()
}

impl Report {
    /// Gradients of a 16-bit GPU run against an f32 CPU run on the same (16-bit-valued) inputs,
    /// each within the stage's tolerance or twice the error of the same 16-bit computation on
    /// the CPU (`peer`), whichever is larger. A gradient that sums signed terms (over positions:
    /// D, dt_bias, A_log; over the heads sharing a group: B, C) can be far smaller than its
    /// terms, and then one 16-bit rounding of a term is a large share of it on either device
    /// (seen: 7-35% for dD in bf16 on the CPU alone, also on shapes no kernel takes); the GPU
    /// path must add no more error than 16-bit arithmetic in the reference implementation.
    #[allow(clippy::too_many_arguments)]
    fn compare_grads_with_peer(
        &mut self,
        case: &str,
        dtype: DType,
        prefix: &str,
        names: &[String],
        runs: (Grads, Grads, Grads),
        stage: Stage,
    ) {
        match runs {
            (Ok(gg), Ok(gc), Ok(gp)) => {
                for (((g, c), p), pname) in gg.iter().zip(&gc).zip(&gp).zip(names) {
                    let what = format!("{prefix}{pname}");
                    match max_rel_err(p, c) {
                        Ok((_, peer)) => {
                            let tol = tolerance(dtype, c.dtype(), stage).max(2.0 * peer);
                            let note = format!(r#","peer_rel":{peer:.3e}"#);
                            self.compare_tol(case, dtype, &what, g, c, tol, &note);
                        }
                        Err(e) => self.error(case, dtype, &what, e),
                    }
                }
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                self.error(case, dtype, prefix.trim_end(), e)
            }
        }
    }

    /// One comparison per named gradient of the GPU and CPU runs (`what` = prefix + name).
    #[allow(clippy::too_many_arguments)]
    fn compare_grads(
        &mut self,
        case: &str,
        dtype: DType,
        prefix: &str,
        names: &[String],
        runs: (matvlm::Result<Vec<Tensor>>, matvlm::Result<Vec<Tensor>>),
        stage: Stage,
    ) {
        match runs {
            (Ok(gg), Ok(gc)) => {
                for ((g, c), input) in gg.iter().zip(&gc).zip(names) {
                    self.compare(case, dtype, &format!("{prefix}{input}"), g, c, stage);
                }
            }
            (Err(e), _) | (_, Err(e)) => self.error(case, dtype, prefix.trim_end(), e),
        }
    }
}

/// Gradients from `run(device, dtype)` on the GPU in `dtype` against the CPU: in f32 both sides
/// run f32; in 16 bits the reference is the CPU in f32 on the same 16-bit values (so the
/// comparison measures the GPU's own rounding) and the CPU's 16-bit run sets the floor of the
/// tolerance (`Report::compare_grads_with_peer`).
#[allow(clippy::too_many_arguments)]
fn compare_grad_runs(
    r: &mut Report,
    case: &str,
    dtype: DType,
    prefix: &str,
    names: &[String],
    run: &dyn Fn(&Device, DType) -> matvlm::Result<Vec<Tensor>>,
    gpu: &Device,
    stage: Stage,
) {
    let cpu = &Device::Cpu;
    if dtype == DType::F32 {
        r.compare_grads(
            case,
            dtype,
            prefix,
            names,
            (run(gpu, dtype), run(cpu, dtype)),
            stage,
        );
    } else {
        let runs = (run(gpu, dtype), run(cpu, DType::F32), run(cpu, dtype));
        r.compare_grads_with_peer(case, dtype, prefix, names, runs, stage);
    }
}

fn check_case(k: &Case, dtype: DType, gpu: &Device, r: &mut Report) -> matvlm::Result<()> {
    let i = inputs(k)?;
    // Activations in the model dtype; dt, A, D and the state in f32, as the mixer has them.
    let act = |t: &Tensor, dev: &Device| -> candle_core::Result<Tensor> {
        t.to_dtype(dtype)?.to_device(dev)
    };
    let f32_on = |t: &Tensor, dev: &Device| t.to_device(dev);
    let cpu = &Device::Cpu;
    let name = k.name;

    // SSD scan, with the gate and an initial state, and without either.
    for (tag, gated) in [("ssd y (z, init)", true), ("ssd y (plain)", false)] {
        let run = |dev: &Device| -> matvlm::Result<(Tensor, Tensor)> {
            let z = act(&i.z, dev)?;
            let init = f32_on(&i.init, dev)?;
            fused::chunked_scan(
                &act(&i.x, dev)?,
                &f32_on(&i.dt, dev)?,
                &f32_on(&i.a, dev)?,
                &act(&i.b, dev)?,
                &act(&i.c, dev)?,
                Some(&f32_on(&i.d, dev)?),
                gated.then_some(&z),
                k.chunk,
                gated.then_some(&init),
            )
        };
        match (run(gpu), run(cpu)) {
            (Ok((yg, sg)), Ok((yc, sc))) => {
                r.compare(name, dtype, tag, &yg, &yc, Stage::Kernel);
                r.compare(
                    name,
                    dtype,
                    &format!("{tag} final state"),
                    &sg,
                    &sc,
                    Stage::Kernel,
                );
            }
            (Err(e), _) | (_, Err(e)) => r.error(name, dtype, tag, e),
        }
    }

    // Gradients of every input of the gated scan, through loss = sum(y * w).
    let names: Vec<String> = ["x", "dt", "A", "B", "C", "D", "z"]
        .map(String::from)
        .into();
    let w = Tensor::randn(0f32, 1.0, i.x.dims(), cpu)?;
    // Activations as `act` has them (16-bit values), in `as_dtype` (the f32 reference: the same
    // values in f32).
    let act_as = |t: &Tensor, dev: &Device, as_dtype: DType| -> candle_core::Result<Tensor> {
        act(t, dev)?.to_dtype(as_dtype)
    };
    let run_grad = |dev: &Device, as_dtype: DType| -> matvlm::Result<Vec<Tensor>> {
        let v = vars(vec![
            act_as(&i.x, dev, as_dtype)?,
            f32_on(&i.dt, dev)?,
            f32_on(&i.a, dev)?,
            act_as(&i.b, dev, as_dtype)?,
            act_as(&i.c, dev, as_dtype)?,
            f32_on(&i.d, dev)?,
            act_as(&i.z, dev, as_dtype)?,
        ])?;
        let t: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
        let (y, _) = fused::chunked_scan(
            t[0],
            t[1],
            t[2],
            t[3],
            t[4],
            Some(t[5]),
            Some(t[6]),
            k.chunk,
            None,
        )?;
        grads_of(&y, &w, &v, &names)
    };
    compare_grad_runs(
        r,
        name,
        dtype,
        "ssd grad d",
        &names,
        &run_grad,
        gpu,
        Stage::Grad,
    );

    // The same through the packed entry the mixer uses (x, B, C in one tensor).
    let (bb, l, h, p, g, n) = (k.batch, k.len, k.heads, k.head_dim, k.groups, k.d_state);
    let xbc = Tensor::cat(
        &[
            &i.x.reshape((bb, l, h * p))?,
            &i.b.reshape((bb, l, g * n))?,
            &i.c.reshape((bb, l, g * n))?,
        ],
        2,
    )?;
    let packed_names: Vec<String> = ["xBC", "dt", "A", "D", "z"].map(String::from).into();
    let run_packed = |dev: &Device, as_dtype: DType| -> matvlm::Result<Vec<Tensor>> {
        let v = vars(vec![
            act_as(&xbc, dev, as_dtype)?,
            f32_on(&i.dt, dev)?,
            f32_on(&i.a, dev)?,
            f32_on(&i.d, dev)?,
            act_as(&i.z, dev, as_dtype)?,
        ])?;
        let t: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
        let (y, _) = fused::chunked_scan_packed(
            t[0],
            (h, p, g, n),
            t[1],
            t[2],
            Some(t[3]),
            Some(t[4]),
            k.chunk,
            None,
        )?;
        grads_of(&y, &w, &v, &packed_names)
    };
    compare_grad_runs(
        r,
        name,
        dtype,
        "packed ssd grad d",
        &packed_names,
        &run_packed,
        gpu,
        Stage::Grad,
    );

    // Decode step from the initial state, in place on the GPU, with the gate.
    let step_x = |t: &Tensor| t.narrow(1, 0, 1).and_then(|t| t.squeeze(1));
    let run_step = |dev: &Device| -> matvlm::Result<(Tensor, Tensor)> {
        let mut state = f32_on(&i.init, dev)?.contiguous()?;
        // A fresh buffer: the GPU updates it in place.
        state = (state * 1.0)?;
        let z = act(&step_x(&i.z)?, dev)?;
        let y = fused::scan_step(
            &act(&step_x(&i.x)?, dev)?,
            &f32_on(&step_x(&i.dt)?, dev)?,
            &f32_on(&i.a, dev)?,
            &act(&step_x(&i.b)?, dev)?,
            &act(&step_x(&i.c)?, dev)?,
            Some(&f32_on(&i.d, dev)?),
            Some(&z),
            &mut state,
        )?;
        Ok((y, state))
    };
    match (run_step(gpu), run_step(cpu)) {
        (Ok((yg, sg)), Ok((yc, sc))) => {
            r.compare(name, dtype, "decode y", &yg, &yc, Stage::Kernel);
            r.compare(name, dtype, "decode state", &sg, &sc, Stage::Kernel);
        }
        (Err(e), _) | (_, Err(e)) => r.error(name, dtype, "decode", e),
    }

    // The whole mixer: prefill (conv + scan + norm kernels), then three decode steps.
    let d_model = 64;
    let mut cfg = Mamba2Config::new(d_model, k.heads, k.head_dim, k.d_state, k.groups);
    cfg.chunk_size = k.chunk;
    let xin = Tensor::randn(0f32, 1.0, (k.batch, k.len, d_model), cpu)?;
    let steps = Tensor::randn(0f32, 1.0, (3, k.batch, d_model), cpu)?;
    let run_mixer = |dev: &Device| -> matvlm::Result<(Tensor, Tensor, Vec<Tensor>)> {
        let m = Mamba2::random(&cfg, dtype, dev, 7)?;
        let (y, mut state) = m.forward(&act(&xin, dev)?, None)?;
        let mut outs = vec![];
        for s in 0..3 {
            outs.push(m.step(&act(&steps.get(s)?, dev)?, &mut state)?);
        }
        let flat = Tensor::cat(&[state.conv.flatten_all()?, state.ssm.flatten_all()?], 0)?;
        Ok((y, flat, outs))
    };
    match (run_mixer(gpu), run_mixer(cpu)) {
        (Ok((yg, sg, og)), Ok((yc, sc, oc))) => {
            r.compare(name, dtype, "mixer prefill y", &yg, &yc, Stage::Mixer);
            for (s, (g, c)) in og.iter().zip(&oc).enumerate() {
                r.compare(
                    name,
                    dtype,
                    &format!("mixer decode y{s}"),
                    g,
                    c,
                    Stage::Mixer,
                );
            }
            r.compare(name, dtype, "mixer final states", &sg, &sc, Stage::Mixer);
        }
        (Err(e), _) | (_, Err(e)) => r.error(name, dtype, "mixer", e),
    }

    // The mixer under autograd, as distillation trains it: the gradient of every parameter and
    // of the input through sum(y * w) of a prefill (the scan's backward kernels on the GPU where
    // they apply; conv and norm through candle's autograd on both sides).
    let wy = Tensor::randn(0f32, 1.0, (k.batch, k.len, d_model), cpu)?;
    let params = Mamba2::init_tensors(&cfg, dtype, cpu, 7)?;
    let mut mixer_names: Vec<String> = params.keys().cloned().collect();
    mixer_names.sort();
    mixer_names.push("input".into());
    let run_mixer_grad = |dev: &Device, in_dtype: DType| -> matvlm::Result<Vec<Tensor>> {
        let mut inputs = mixer_names[..mixer_names.len() - 1]
            .iter()
            .map(|pname| params[pname].to_dtype(in_dtype)?.to_device(dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        inputs.push(act(&xin, dev)?.to_dtype(in_dtype)?);
        let v = vars(inputs)?;
        let tensors = mixer_names
            .iter()
            .zip(&v)
            .take(mixer_names.len() - 1)
            .map(|(pname, v)| (pname.clone(), v.as_tensor().clone()))
            .collect();
        let m = Mamba2::from_tensors(tensors, &cfg)?;
        let (y, _) = m.forward(v[v.len() - 1].as_tensor(), None)?;
        grads_of(&y, &wy, &v, &mixer_names)
    };
    compare_grad_runs(
        r,
        name,
        dtype,
        "mixer grad ",
        &mixer_names,
        &run_mixer_grad,
        gpu,
        Stage::MixerGrad,
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let gpu = match matvlm::device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kernel_check: no CUDA device: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if !fused::kernels_enabled() {
        eprintln!("kernel_check: kernels are switched off (MATVLM_MAMBA2_KERNELS=0)");
        return std::process::ExitCode::from(2);
    }
    let mut r = Report {
        failures: 0,
        total: 0,
    };
    for k in CASES {
        if quick && k.heads == 32 {
            continue;
        }
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            if let Err(e) = check_case(k, dtype, &gpu, &mut r) {
                r.error(k.name, dtype, "setup", e);
            }
        }
    }
    println!(
        r#"{{"summary":"kernel_check","comparisons":{},"failures":{}}}"#,
        r.total, r.failures
    );
    eprintln!("{} of {} comparisons failed", r.failures, r.total);
    if r.failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
