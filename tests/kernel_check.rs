//! Parity of the CUDA kernels with the generic candle path: the Mamba-2 kernels against the CPU,
//! the engine's attention kernels against the generic attention on the GPU (`attention.rs`) (`cuda` feature;
//! a test target with its own `main`, built only with the feature: `required-features` in
//! Cargo.toml).
//!
//! For each shape (the mixers the models have: Phi-2's hybrid, 32 heads x 80, d_state 80, 32
//! groups, chunk 256, and the tiny teacher's, 4 heads x 32, d_state 32, 4 groups; up to 8192
//! tokens = 32 chunks; lengths not a multiple of the chunk, one group, batch > 1, small odd
//! sizes, and shapes for the tensor-core passes) and each dtype (f32, f16, bf16), the same
//! inputs run through `fused::*` on the GPU (the kernels) and on the CPU (the generic code), and
//! the whole mixer (prefill from given conv and SSM states, then decode steps) likewise. Prints
//! one JSON line per comparison: `max_abs` and `rel` = max |gpu - cpu| / max |cpu| against the
//! tolerance stated in [`tolerance`], and the paths each side took (`gpu`, `cpu`:
//! `fused::traced`'s list); `generic_both` marks comparisons where the GPU side ran no kernel
//! (the generic path on both devices). Exits 1 if any comparison fails (or a run errors), 2
//! without a CUDA device, 0 otherwise.
//!
//! Build here: `scripts/gpu/kernels.sh prepare` (or `cargo test --release --features cuda --test
//! kernel_check --no-run`); run on the GPU machine: `kernel_check` (`--quick`: the small shapes
//! only; `--no-long`: skip the 4096- and 8192-token cases; `--long-only`: only those (and the
//! attention checks, which always run first); `--budget-s S`: start no case (per
//! dtype) after S seconds, listing each one not run as `skipped` and in the summary; `--sm80`:
//! the sm_80 PTX, as Ampere and Ada cards load it, also on Hopper). Through
//! cargo on a machine with a GPU: `cargo test --release --features cuda --test kernel_check`.

use candle_core::{DType, Device, Tensor};
use matvlm::model::mamba2::{fused, Mamba2, Mamba2Config, Mamba2State};

#[path = "kernel_check/attention.rs"]
mod attention;

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
/// reference on the same values, raised to twice the error of the CPU's own 16-bit run where
/// that is larger, but never above [`FLOOR_CAP`] when a kernel ran
/// (`Report::compare_grads_with_peer`). The mixer's parameter gradients (`Stage::MixerGrad`)
/// add the 16-bit roundings of in_proj, conv, norm and out_proj, each fed by the previous stage,
/// and sums over every position: 5e-2, with the same f32 reference, floor and cap.
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

/// The most the 16-bit floor may raise a gradient's tolerance to where a kernel ran on the GPU:
/// 20% of the reference's largest magnitude. The floor exists because some gradients are signed
/// sums much smaller than their terms (dD over every position; dB, dC over the heads of a
/// group), where the CPU's own bf16 run misses by up to ~47% on odd shapes; uncapped, twice that
/// would accept a kernel's dD almost entirely wrong. Comparisons with the generic path on both
/// sides (`generic_both`: candle's CUDA ops against its CPU ops, no kernel of ours) keep the
/// uncapped floor: their 16-bit error is the same arithmetic as the CPU's 16-bit run.
const FLOOR_CAP: f64 = 0.2;

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

/// Which checks a case runs.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Every check, in f32, f16 and bf16.
    Full,
    /// The long sequences: every check in bf16 (the training dtype), the forward checks in f32,
    /// no f16 (its paths are bf16's) and no unpacked gradients (the mixer's entry is the packed
    /// one), to keep the CPU reference within the run's time.
    Long,
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
    /// The mixer's model width (in_proj's input; the kernels never see it).
    d_model: usize,
    scope: Scope,
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
    d_model: usize,
    scope: Scope,
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
        d_model,
        scope,
    }
}

use Scope::{Full, Long};

// A table, one case a row: rustfmt would spread each row over twelve lines.
#[rustfmt::skip]
const CASES: &[Case] = &[
    // Phi-2's hybrid mixer (32 heads x 80, d_state 80, one group per head, chunk 256); d_model
    // 64 instead of 2560 keeps the CPU's in_proj cheap and changes nothing the kernels see.
    case("phi2 b1 L512", 1, 512, 32, 80, 80, 32, 256, 64, Full),
    case("phi2 b2 L300 (tail chunk)", 2, 300, 32, 80, 80, 32, 256, 64, Full),
    case("phi2 b1 L37 (< chunk)", 1, 37, 32, 80, 80, 32, 256, 64, Full),
    case("phi2 ngroups=1 b2 L260", 2, 260, 32, 80, 80, 1, 256, 64, Full),
    // The tiny teacher's hybrid mixer (d_model 128, 4 heads x 32, d_state 32, 4 groups).
    case("tiny b2 L700 h4x32 n32 g4", 2, 700, 4, 32, 32, 4, 256, 128, Full),
    case("odd b3 L150 h6x24 n20 g2 q64", 3, 150, 6, 24, 20, 2, 64, 64, Full),
    case("odd b2 L97 h4x33 n17 g4 q32", 2, 97, 4, 33, 17, 4, 32, 64, Full),
    case("odd b1 L1 h4x16 n16 g1 q256", 1, 1, 4, 16, 16, 1, 256, 64, Full),
    // Shapes the tensor-core passes take in f16/bf16 (head_dim, d_state multiples of 16): head
    // dim != d_state, several row tiles and source tiles with a tail, the largest tile sizes
    // (whose SIMT tiles exceed shared memory: only the tensor cores take 128 x 128).
    case("tc b2 L200 h4x32 n48 g2 q128", 2, 200, 4, 32, 48, 2, 128, 64, Full),
    case("tc b1 L70 h2x128 n128 g1 q64", 1, 70, 2, 128, 128, 1, 64, 64, Full),
    // The long sequences, last (the most CPU time): 16 and 32 chunks of state passing, from
    // incoming conv and SSM states, the tiny teacher's mixer and Phi-2's.
    case("tiny b2 L4096 (16 chunks)", 2, 4096, 4, 32, 32, 4, 256, 128, Long),
    case("tiny b1 L8192 (32 chunks)", 1, 8192, 4, 32, 32, 4, 256, 128, Long),
    case("phi2 b1 L4096 (16 chunks)", 1, 4096, 32, 80, 80, 32, 256, 64, Long),
    case("phi2 b1 L8192 (32 chunks)", 1, 8192, 32, 80, 80, 32, 256, 64, Long),
];

/// The paths the two sides of a comparison took (`fused::traced`).
#[derive(Clone, Default)]
struct Paths {
    gpu: Vec<&'static str>,
    cpu: Vec<&'static str>,
}

impl Paths {
    /// Whether the GPU side ran no kernel of ours.
    fn generic_both(&self) -> bool {
        self.gpu.iter().all(|p| p.ends_with(":generic"))
    }

    fn json(&self) -> String {
        let list = |v: &[&str]| {
            v.iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            r#","gpu":[{}],"cpu":[{}],"generic_both":{}"#,
            list(&self.gpu),
            list(&self.cpu),
            self.generic_both()
        )
    }
}

#[derive(Default)]
struct Report {
    failures: usize,
    total: usize,
    generic_both: usize,
    generic_both_failures: usize,
    floor_used: usize,
    floor_capped: usize,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn compare(
        &mut self,
        case: &str,
        dtype: DType,
        what: &str,
        gpu: &Tensor,
        cpu: &Tensor,
        stage: Stage,
        paths: &Paths,
    ) {
        let tol = tolerance(dtype, cpu.dtype(), stage);
        self.compare_tol(case, dtype, what, gpu, cpu, tol, "", paths);
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
        paths: &Paths,
    ) {
        let (line, ok) = match max_rel_err(gpu, cpu) {
            Ok((abs, rel)) => {
                let ok = rel <= tol && rel.is_finite();
                (
                    format!(
                        r#"{{"check":"{case}","dtype":"{dtype:?}","what":"{what}","max_abs":{abs:.3e},"rel":{rel:.3e},"tol":{tol:.1e}{note}{},"pass":{ok}}}"#,
                        paths.json()
                    ),
                    ok,
                )
            }
            Err(e) => (
                format!(
                    r#"{{"check":"{case}","dtype":"{dtype:?}","what":"{what}","error":{:?}{},"pass":false}}"#,
                    e.to_string(),
                    paths.json()
                ),
                false,
            ),
        };
        self.tally(ok, paths.generic_both());
        println!("{line}");
        eprintln!(
            "{} {case} {dtype:?} {what}{}",
            if ok { "PASS" } else { "FAIL" },
            if paths.generic_both() {
                " (generic both)"
            } else {
                ""
            }
        );
    }

    fn tally(&mut self, ok: bool, generic_both: bool) {
        self.total += 1;
        if !ok {
            self.failures += 1;
        }
        if generic_both {
            self.generic_both += 1;
            if !ok {
                self.generic_both_failures += 1;
            }
        }
    }

    fn error(&mut self, case: &str, dtype: DType, what: &str, e: impl std::fmt::Display) {
        self.tally(false, false);
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

/// The named gradients of one run (or why it failed), with the paths it took.
type Grads = (matvlm::Result<Vec<Tensor>>, Vec<&'static str>);

/// `run(dev, dtype)` under `fused::traced`.
fn traced_run<T>(
    run: &dyn Fn(&Device, DType) -> matvlm::Result<T>,
    dev: &Device,
    dtype: DType,
) -> (matvlm::Result<T>, Vec<&'static str>) {
    fused::traced(|| run(dev, dtype))
}

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
    /// each within the stage's tolerance, raised to twice the error of the same 16-bit
    /// computation on the CPU (`peer`) where that is larger, at most to [`FLOOR_CAP`] where a
    /// kernel ran. A gradient that sums signed terms (over positions: D, dt_bias, A_log; over
    /// the heads sharing a group: B, C) can be far smaller than its terms, and then one 16-bit
    /// rounding of a term is a large share of it on either device; the GPU path must add no
    /// more error than 16-bit arithmetic in the reference implementation, within the cap.
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
        let ((gg, gpu), (gc, cpu), (gp, _)) = runs;
        let paths = Paths { gpu, cpu };
        match (gg, gc, gp) {
            (Ok(gg), Ok(gc), Ok(gp)) => {
                for (((g, c), p), pname) in gg.iter().zip(&gc).zip(&gp).zip(names) {
                    let what = format!("{prefix}{pname}");
                    match max_rel_err(p, c) {
                        Ok((_, peer)) => {
                            let base = tolerance(dtype, c.dtype(), stage);
                            let cap = if paths.generic_both() {
                                f64::INFINITY
                            } else {
                                FLOOR_CAP
                            };
                            let floor = (2.0 * peer).min(cap);
                            if 2.0 * peer > base {
                                self.floor_used += 1;
                                if 2.0 * peer > cap {
                                    self.floor_capped += 1;
                                }
                            }
                            let note = format!(r#","peer_rel":{peer:.3e}"#);
                            let tol = base.max(floor);
                            self.compare_tol(case, dtype, &what, g, c, tol, &note, &paths);
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
    fn compare_grads(
        &mut self,
        case: &str,
        dtype: DType,
        prefix: &str,
        names: &[String],
        runs: (Grads, Grads),
        stage: Stage,
    ) {
        let ((gg, gpu), (gc, cpu)) = runs;
        let paths = Paths { gpu, cpu };
        match (gg, gc) {
            (Ok(gg), Ok(gc)) => {
                for ((g, c), input) in gg.iter().zip(&gc).zip(names) {
                    let what = format!("{prefix}{input}");
                    self.compare(case, dtype, &what, g, c, stage, &paths);
                }
            }
            (Err(e), _) | (_, Err(e)) => self.error(case, dtype, prefix.trim_end(), e),
        }
    }

    /// Run `run` on both devices (traced) and hand both results to `cmp`, or report the error.
    fn both<T>(
        &mut self,
        case: &str,
        dtype: DType,
        what: &str,
        gpu: &Device,
        run: &dyn Fn(&Device) -> matvlm::Result<T>,
        cmp: impl FnOnce(&mut Self, T, T, &Paths),
    ) {
        let (g, gp) = fused::traced(|| run(gpu));
        let (c, cp) = fused::traced(|| run(&Device::Cpu));
        let paths = Paths { gpu: gp, cpu: cp };
        match (g, c) {
            (Ok(g), Ok(c)) => cmp(self, g, c, &paths),
            (Err(e), _) | (_, Err(e)) => self.error(case, dtype, what, e),
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
        let runs = (traced_run(run, gpu, dtype), traced_run(run, cpu, dtype));
        r.compare_grads(case, dtype, prefix, names, runs, stage);
    } else {
        let runs = (
            traced_run(run, gpu, dtype),
            traced_run(run, cpu, DType::F32),
            traced_run(run, cpu, dtype),
        );
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
    // The long cases check gradients in bf16 only (`Scope::Long`).
    let grads = k.scope == Full || dtype == DType::BF16;

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
        r.both(name, dtype, tag, gpu, &run, |r, (yg, sg), (yc, sc), p| {
            r.compare(name, dtype, tag, &yg, &yc, Stage::Kernel, p);
            let what = format!("{tag} final state");
            r.compare(name, dtype, &what, &sg, &sc, Stage::Kernel, p);
        });
    }

    // The packed entry the mixer calls, from an initial state, with the gate (inference).
    let (bb, l, h, p, g, n) = (k.batch, k.len, k.heads, k.head_dim, k.groups, k.d_state);
    let xbc = Tensor::cat(
        &[
            &i.x.reshape((bb, l, h * p))?,
            &i.b.reshape((bb, l, g * n))?,
            &i.c.reshape((bb, l, g * n))?,
        ],
        2,
    )?;
    let run_packed_fwd = |dev: &Device| -> matvlm::Result<(Tensor, Tensor)> {
        fused::chunked_scan_packed(
            &act(&xbc, dev)?,
            (h, p, g, n),
            &f32_on(&i.dt, dev)?,
            &f32_on(&i.a, dev)?,
            Some(&f32_on(&i.d, dev)?),
            Some(&act(&i.z, dev)?),
            k.chunk,
            Some(&f32_on(&i.init, dev)?),
        )
    };
    let tag = "packed ssd y (z, init)";
    r.both(
        name,
        dtype,
        tag,
        gpu,
        &run_packed_fwd,
        |r, (yg, sg), (yc, sc), ps| {
            r.compare(name, dtype, tag, &yg, &yc, Stage::Kernel, ps);
            let what = format!("{tag} final state");
            r.compare(name, dtype, &what, &sg, &sc, Stage::Kernel, ps);
        },
    );

    // The conv + SiLU from an incoming conv state.
    let d_conv = 4;
    let conv_w = Tensor::randn(0f32, 0.5, (h * p, 1, d_conv), cpu)?;
    let conv_b = Tensor::randn(0f32, 0.5, h * p, cpu)?;
    let conv_s = Tensor::randn(0f32, 1.0, (bb, h * p, d_conv), cpu)?;
    let x_flat = i.x.reshape((bb, l, h * p))?;
    let run_conv = |dev: &Device| -> matvlm::Result<(Tensor, Tensor)> {
        fused::conv_silu(
            &act(&x_flat, dev)?,
            &act(&conv_w, dev)?,
            Some(&act(&conv_b, dev)?),
            Some(&f32_on(&conv_s, dev)?),
        )
    };
    let tag = "conv y (state in)";
    r.both(
        name,
        dtype,
        tag,
        gpu,
        &run_conv,
        |r, (yg, sg), (yc, sc), ps| {
            r.compare(name, dtype, tag, &yg, &yc, Stage::Kernel, ps);
            let what = "conv state out";
            r.compare(name, dtype, what, &sg, &sc, Stage::Kernel, ps);
        },
    );

    // Gradients of every input of the gated scan, through loss = sum(y * w).
    let w = Tensor::randn(0f32, 1.0, i.x.dims(), cpu)?;
    // Activations as `act` has them (16-bit values), in `as_dtype` (the f32 reference: the same
    // values in f32).
    let act_as = |t: &Tensor, dev: &Device, as_dtype: DType| -> candle_core::Result<Tensor> {
        act(t, dev)?.to_dtype(as_dtype)
    };
    if k.scope == Full {
        let names: Vec<String> = ["x", "dt", "A", "B", "C", "D", "z"]
            .map(String::from)
            .into();
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
        let prefix = "ssd grad d";
        compare_grad_runs(r, name, dtype, prefix, &names, &run_grad, gpu, Stage::Grad);
    }

    // The same through the packed entry the mixer uses (x, B, C in one tensor), from an initial
    // state (which gets no gradient, as in the mixer).
    if grads {
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
            let init = f32_on(&i.init, dev)?;
            let (y, _) = fused::chunked_scan_packed(
                t[0],
                (h, p, g, n),
                t[1],
                t[2],
                Some(t[3]),
                Some(t[4]),
                k.chunk,
                Some(&init),
            )?;
            grads_of(&y, &w, &v, &packed_names)
        };
        let prefix = "packed ssd grad (init) d";
        compare_grad_runs(
            r,
            name,
            dtype,
            prefix,
            &packed_names,
            &run_packed,
            gpu,
            Stage::Grad,
        );
    }

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
    r.both(
        name,
        dtype,
        "decode",
        gpu,
        &run_step,
        |r, (yg, sg), (yc, sc), ps| {
            r.compare(name, dtype, "decode y", &yg, &yc, Stage::Kernel, ps);
            r.compare(name, dtype, "decode state", &sg, &sc, Stage::Kernel, ps);
        },
    );

    // The whole mixer: prefill (conv + scan + norm kernels) from given conv and SSM states, as
    // a prompt that continues a cached one, then three decode steps.
    let d_model = k.d_model;
    let mut cfg = Mamba2Config::new(d_model, k.heads, k.head_dim, k.d_state, k.groups);
    cfg.chunk_size = k.chunk;
    let xin = Tensor::randn(0f32, 1.0, (k.batch, k.len, d_model), cpu)?;
    let steps = Tensor::randn(0f32, 1.0, (3, k.batch, d_model), cpu)?;
    let conv_in = Tensor::randn(0f32, 1.0, (k.batch, cfg.conv_dim(), cfg.d_conv), cpu)?;
    let state_on = |dev: &Device| -> candle_core::Result<Mamba2State> {
        Ok(Mamba2State {
            conv: conv_in.to_device(dev)?,
            ssm: i.init.to_device(dev)?,
            constants: None,
        })
    };
    let run_mixer = |dev: &Device| -> matvlm::Result<(Tensor, Tensor, Vec<Tensor>)> {
        let m = Mamba2::random(&cfg, dtype, dev, 7)?;
        let (y, mut state) = m.forward(&act(&xin, dev)?, Some(&state_on(dev)?))?;
        let mut outs = vec![];
        for s in 0..3 {
            outs.push(m.step(&act(&steps.get(s)?, dev)?, &mut state)?);
        }
        let flat = Tensor::cat(&[state.conv.flatten_all()?, state.ssm.flatten_all()?], 0)?;
        Ok((y, flat, outs))
    };
    r.both(
        name,
        dtype,
        "mixer",
        gpu,
        &run_mixer,
        |r, (yg, sg, og), (yc, sc, oc), ps| {
            let what = "mixer prefill y (states in)";
            r.compare(name, dtype, what, &yg, &yc, Stage::Mixer, ps);
            for (s, (g, c)) in og.iter().zip(&oc).enumerate() {
                let what = format!("mixer decode y{s}");
                r.compare(name, dtype, &what, g, c, Stage::Mixer, ps);
            }
            r.compare(
                name,
                dtype,
                "mixer final states",
                &sg,
                &sc,
                Stage::Mixer,
                ps,
            );
        },
    );

    // The mixer under autograd, as distillation trains it: the gradient of every parameter and
    // of the input through sum(y * w) of a prefill (the scan's backward kernels on the GPU where
    // they apply; conv and norm through candle's autograd on both sides).
    if grads {
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
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let (quick, no_long, long_only) = (flag("--quick"), flag("--no-long"), flag("--long-only"));
    let budget = args
        .iter()
        .position(|a| a == "--budget-s")
        .and_then(|i| args.get(i + 1)?.parse::<f64>().ok());
    let mut skipped = 0;
    // `--harness-on-cpu`: the "GPU" side on the CPU too, so every path is generic on both
    // sides; checks the harness itself (shapes, states, tallies) on a machine without a GPU.
    let gpu = if flag("--harness-on-cpu") {
        Device::Cpu
    } else {
        match matvlm::device::cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("kernel_check: no CUDA device: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    };
    fused::set_policy(fused::KernelPolicy {
        sm80_everywhere: flag("--sm80"),
        ..fused::KernelPolicy::ALL
    });
    let target = match &gpu {
        Device::Cuda(d) => match matvlm::kernels::target(d) {
            Ok(t) => format!(
                "{} (compute capability {}.{}), sm_{} PTX, {} B shared memory per block",
                t.device, t.compute_capability.0, t.compute_capability.1, t.arch, t.smem_opt_in
            ),
            Err(e) => {
                eprintln!("kernel_check: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        _ => "cpu (harness check)".to_string(),
    };
    eprintln!("kernel_check: {target}");
    let mut r = Report::default();
    let start = std::time::Instant::now();
    // The engine's attention kernels (a few seconds) before the Mamba-2 cases.
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = std::time::Instant::now();
        attention::check(dtype, &gpu, &mut r);
        eprintln!("-- attention {dtype:?}: {:.1} s", t.elapsed().as_secs_f64());
    }
    for k in CASES {
        if (quick && k.heads == 32)
            || ((quick || no_long) && k.scope == Long)
            || (long_only && k.scope != Long)
        {
            continue;
        }
        let dtypes: &[DType] = match k.scope {
            Full => &[DType::F32, DType::F16, DType::BF16],
            Long => &[DType::F32, DType::BF16],
        };
        for &dtype in dtypes {
            if budget.is_some_and(|b| start.elapsed().as_secs_f64() > b) {
                skipped += 1;
                println!(
                    r#"{{"skipped":"{}","dtype":"{dtype:?}","why":"--budget-s spent"}}"#,
                    k.name
                );
                continue;
            }
            let t = std::time::Instant::now();
            if let Err(e) = check_case(k, dtype, &gpu, &mut r) {
                r.error(k.name, dtype, "setup", e);
            }
            eprintln!(
                "-- {} {dtype:?}: {:.1} s",
                k.name,
                t.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        r#"{{"summary":"kernel_check","target":{target:?},"comparisons":{},"failures":{},"generic_both":{},"generic_both_failures":{},"with_kernel":{},"with_kernel_failures":{},"floor_used":{},"floor_capped":{},"floor_cap":{FLOOR_CAP},"skipped_cases":{skipped},"seconds":{:.1}}}"#,
        r.total,
        r.failures,
        r.generic_both,
        r.generic_both_failures,
        r.total - r.generic_both,
        r.failures - r.generic_both_failures,
        r.floor_used,
        r.floor_capped,
        start.elapsed().as_secs_f64()
    );
    eprintln!(
        "{} of {} comparisons failed ({} of them generic on both sides, {} failed)",
        r.failures, r.total, r.generic_both, r.generic_both_failures
    );
    if r.failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
