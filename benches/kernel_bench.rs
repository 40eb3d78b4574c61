//! Timings of the Mamba-2 CUDA kernels on the GPU (`cuda` feature; a bench target with its own
//! `main`, built only with the feature), one JSON line per figure,
//! at the shapes of issue 7 and of the peer benchmark (../shared/peer, section a/b): 32 heads
//! x 80, d_state 80, 32 groups, chunk 256, bf16 activations, f32 dt/A/D/state.
//!
//! * `scan_fwd`: the SSD scan (three kernels), batch 1 and 8, L = 1024..8192, with the z gate
//!   (`with_z`, the peer's "z" variant) and without; `impl` = `kernel`, and `generic` (the
//!   candle path on the same GPU) for reference. Unlike the peer's, dt arrives discretised
//!   (softplus(dt + dt_bias) is one elementwise op before the scan in the mixer).
//! * `scan_fwd_bwd`: forward + backward under autograd, from a given output gradient (`dout`
//!   handed to y as torch's `y.backward(dout)` does, see [`SeedGrad`]); `impl` = `kernel`
//!   (tensor-core forward and backward kernels, kernels/ssd_bwd.cu, on x, B, C packed in one
//!   tensor as the mixer has them: `fused::chunked_scan_packed`), `kernel-unpacked` (the same
//!   kernels from three tensors: packed by a copy, the gradient split back, both through
//!   candle's autograd) and `generic-autograd` (candle's autograd through the generic path).
//!   Each includes candle's autograd bookkeeping (every gradient lands in a zero tensor).
//! * `state_update`: one decode step in place, batch 1, 8, 64, f32 state.
//!
//! Times: device synchronised around each repetition (wall clock), median of `--reps` after
//! `--warmup`; decode runs `--inner` steps per repetition. GB/s counts the bytes each op must
//! move at least (inputs read once, outputs written once; the state read and written).
//!
//! Each line names the paths the timed calls took (`paths`, `fused::traced`). `impl` = `kernel`
//! runs under `KernelPolicy::from_env()` with the kernels on (`MATVLM_MAMBA2_TC=0`: the SIMT
//! passes), read once at start.
//!
//! Build here: `scripts/gpu/kernels.sh prepare` (or `cargo bench --features cuda --bench
//! kernel_bench --no-run`). Run on the GPU machine: `kernel_bench [--quick] [--kernels-only]
//! [--reps N] [--warmup N] [--inner N]` (`--quick`: L = 2048 only; `--kernels-only`: skip the
//! generic and unpacked references, which take most of the run's time, when iterating on the
//! kernels); through cargo on a machine with a GPU: `cargo bench --features cuda --bench
//! kernel_bench -- --quick`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use matvlm::model::mamba2::fused::{self, KernelPolicy};

struct Opts {
    /// The policy of `impl` = `kernel` (kernels on; tensor cores as the environment says).
    kernel: KernelPolicy,
    reps: usize,
    warmup: usize,
    inner: usize,
    quick: bool,
    kernels_only: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let num = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    Opts {
        kernel: KernelPolicy {
            kernels: true,
            ..KernelPolicy::from_env()
        },
        reps: num("--reps", 10),
        warmup: num("--warmup", 3),
        inner: num("--inner", 50),
        quick: args.iter().any(|a| a == "--quick"),
        kernels_only: args.iter().any(|a| a == "--kernels-only"),
    }
}

/// Median milliseconds of `reps` synchronised runs of `f` (after `warmup` runs).
fn time_ms(
    dev: &Device,
    o: &Opts,
    mut f: impl FnMut() -> matvlm::Result<()>,
) -> matvlm::Result<(f64, f64)> {
    for _ in 0..o.warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(o.reps);
    for _ in 0..o.reps.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0]))
}

fn bytes(ts: &[&Tensor]) -> usize {
    ts.iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// Starts a backward pass from a given output gradient, as torch's `y.backward(dout)` in the
/// peer: its forward is a one-element stand-in for a loss (nothing computed), its backward hands
/// `dout` to y. Without it the timing would include a loss (a product and a sum over y), which
/// is the harness's work, not the scan's.
struct SeedGrad(Tensor);

impl candle_core::CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((candle_core::CpuStorage::F32(vec![0.0]), 1.into()))
    }
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let dev = s.device().clone();
        let zero = dev.alloc_zeros::<f32>(1)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(zero, dev),
            1.into(),
        ))
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

const H: usize = 32;
const P: usize = 80;
const N: usize = 80;
const G: usize = 32;
const Q: usize = 256;

fn emit(rec: String) {
    println!("{rec}");
}

/// The kernel policy of an `impl` (`generic*`: the generic path).
fn use_policy(o: &Opts, imp: &str) {
    fused::set_policy(if imp.starts_with("generic") {
        KernelPolicy::GENERIC
    } else {
        o.kernel
    });
}

/// `,"paths":[...]` for a JSON line.
fn paths_json(paths: &[&str]) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    format!(r#","paths":[{}]"#, list.join(","))
}

fn prefill(dev: &Device, o: &Opts) -> matvlm::Result<()> {
    let dt_ = DType::BF16;
    let lens: &[usize] = if o.quick {
        &[2048]
    } else {
        &[1024, 2048, 4096, 8192]
    };
    for &batch in &[1usize, 8] {
        for &len in lens {
            let x = Tensor::randn(0f32, 1.0, (batch, len, H, P), dev)?.to_dtype(dt_)?;
            let dt =
                ((Tensor::randn(0f32, 0.5, (batch, len, H), dev)? - 3.0)?.exp()? + 1.0)?.log()?;
            let a = (Tensor::rand(0f32, 1.0, H, dev)? * 16f64.ln())?
                .exp()?
                .neg()?;
            let b = Tensor::randn(0f32, 1.0, (batch, len, G, N), dev)?.to_dtype(dt_)?;
            let c = Tensor::randn(0f32, 1.0, (batch, len, G, N), dev)?.to_dtype(dt_)?;
            let d = Tensor::randn(0f32, 1.0, H, dev)?;
            let z = Tensor::randn(0f32, 1.0, (batch, len, H, P), dev)?.to_dtype(dt_)?;
            for with_z in [true, false] {
                for imp in ["kernel", "generic"] {
                    if o.kernels_only && imp != "kernel" {
                        continue;
                    }
                    use_policy(o, imp);
                    let zz = with_z.then_some(&z);
                    let mut out = None;
                    let (r, paths) = fused::traced(|| {
                        time_ms(dev, o, || {
                            out = Some(fused::chunked_scan(
                                &x,
                                &dt,
                                &a,
                                &b,
                                &c,
                                Some(&d),
                                zz,
                                Q,
                                None,
                            )?);
                            Ok(())
                        })
                    });
                    let base = format!(
                        r#""section":"a","name":"scan_fwd","impl":"{imp}","batch":{batch},"seqlen":{len},"nheads":{H},"headdim":{P},"dstate":{N},"ngroups":{G},"chunk":{Q},"dtype":"bf16","with_z":{with_z}{}"#,
                        paths_json(&paths)
                    );
                    match (r, out) {
                        (Ok((med, min)), Some((y, s))) => {
                            let io = bytes(&[&x, &dt, &a, &b, &c, &d, &y, &s])
                                + if with_z { bytes(&[&z]) } else { 0 };
                            emit(format!(
                                r#"{{{base},"ms_median":{med:.4},"ms_min":{min:.4},"bytes_io":{io},"gbps_io":{:.1}}}"#,
                                io as f64 / (med * 1e-3) / 1e9
                            ));
                        }
                        (Err(e), _) => emit(format!(r#"{{{base},"error":{:?}}}"#, e.to_string())),
                        (Ok(_), None) => {}
                    }
                }
            }
            // Forward + backward under autograd, with the gate as the peer does: the backward
            // kernels (`kernel`) and the generic path through candle's autograd.
            let xbc = Tensor::cat(
                &[
                    &x.reshape((batch, len, H * P))?,
                    &b.reshape((batch, len, G * N))?,
                    &c.reshape((batch, len, G * N))?,
                ],
                2,
            )?;
            for imp in ["kernel", "kernel-unpacked", "generic-autograd"] {
                if o.kernels_only && imp != "kernel" {
                    continue;
                }
                use_policy(o, imp);
                let vars: matvlm::Result<Vec<Var>> = [&x, &dt, &a, &b, &c, &d, &z, &xbc]
                    .iter()
                    .map(|t| Ok(Var::from_tensor(t)?))
                    .collect();
                let (r, paths) = fused::traced(|| {
                    vars.and_then(|v| {
                        let dout =
                            Tensor::randn(0f32, 1.0, (batch, len, H, P), dev)?.to_dtype(dt_)?;
                        time_ms(dev, o, || {
                            let t = |i: usize| v[i].as_tensor();
                            // `kernel`: x, B, C packed as the mixer's conv output has them (what
                            // the mixer calls); the others take them as three tensors.
                            let (y, _) = if imp == "kernel" {
                                fused::chunked_scan_packed(
                                    t(7),
                                    (H, P, G, N),
                                    t(1),
                                    t(2),
                                    Some(t(5)),
                                    Some(t(6)),
                                    Q,
                                    None,
                                )?
                            } else {
                                fused::chunked_scan(
                                    t(0),
                                    t(1),
                                    t(2),
                                    t(3),
                                    t(4),
                                    Some(t(5)),
                                    Some(t(6)),
                                    Q,
                                    None,
                                )?
                            };
                            let _grads = y.apply_op1(SeedGrad(dout.clone()))?.backward()?;
                            Ok(())
                        })
                    })
                });
                let base = format!(
                    r#""section":"a","name":"scan_fwd_bwd","impl":"{imp}","batch":{batch},"seqlen":{len},"dtype":"bf16","with_z":true{}"#,
                    paths_json(&paths)
                );
                match r {
                    Ok((med, min)) => emit(format!(
                        r#"{{{base},"ms_median":{med:.4},"ms_min":{min:.4}}}"#
                    )),
                    Err(e) => emit(format!(r#"{{{base},"error":{:?}}}"#, e.to_string())),
                }
            }
        }
    }
    fused::set_policy(o.kernel);
    Ok(())
}

fn decode(dev: &Device, o: &Opts) -> matvlm::Result<()> {
    let dt_ = DType::BF16;
    for &batch in &[1usize, 8, 64] {
        let x = Tensor::randn(0f32, 1.0, (batch, H, P), dev)?.to_dtype(dt_)?;
        let dt = ((Tensor::randn(0f32, 0.5, (batch, H), dev)? - 3.0)?.exp()? + 1.0)?.log()?;
        let a = (Tensor::rand(0f32, 1.0, H, dev)? * 16f64.ln())?
            .exp()?
            .neg()?;
        let b = Tensor::randn(0f32, 1.0, (batch, G, N), dev)?.to_dtype(dt_)?;
        let c = Tensor::randn(0f32, 1.0, (batch, G, N), dev)?.to_dtype(dt_)?;
        let d = Tensor::randn(0f32, 1.0, H, dev)?;
        let mut state = (Tensor::randn(0f32, 0.1, (batch, H, P, N), dev)? * 1.0)?;
        for imp in ["kernel", "generic"] {
            if o.kernels_only && imp != "kernel" {
                continue;
            }
            use_policy(o, imp);
            let inner = o.inner;
            let mut y = None;
            let (r, paths) = fused::traced(|| {
                time_ms(dev, o, || {
                    for _ in 0..inner {
                        y = Some(fused::scan_step(
                            &x,
                            &dt,
                            &a,
                            &b,
                            &c,
                            Some(&d),
                            None,
                            &mut state,
                        )?);
                    }
                    Ok(())
                })
            });
            let base = format!(
                r#""section":"b","name":"state_update","impl":"{imp}","batch":{batch},"nheads":{H},"headdim":{P},"dstate":{N},"ngroups":{G},"state_dtype":"fp32","io_dtype":"bf16"{}"#,
                paths_json(&paths)
            );
            match (r, y) {
                (Ok((med, min)), Some(y)) => {
                    let (us, us_min) = (med * 1e3 / inner as f64, min * 1e3 / inner as f64);
                    let sb = 2 * bytes(&[&state]);
                    let io = sb + bytes(&[&x, &dt, &b, &c, &y]);
                    emit(format!(
                        r#"{{{base},"us_median":{us:.2},"us_min":{us_min:.2},"state_bytes_rw":{sb},"gbps_state":{:.1},"bytes_io":{io},"gbps_io":{:.1}}}"#,
                        sb as f64 / (us * 1e-6) / 1e9,
                        io as f64 / (us * 1e-6) / 1e9
                    ));
                }
                (Err(e), _) => emit(format!(r#"{{{base},"error":{:?}}}"#, e.to_string())),
                (Ok(_), None) => {}
            }
        }
    }
    fused::set_policy(o.kernel);
    Ok(())
}

fn main() -> matvlm::Result<()> {
    let o = opts();
    let dev = matvlm::device::cuda(0)?;
    emit(format!(
        r#"{{"section":"env","bench":"kernel_bench","reps":{},"warmup":{},"inner":{},"quick":{},"kernels_only":{},"tensor_cores":{}}}"#,
        o.reps, o.warmup, o.inner, o.quick, o.kernels_only, o.kernel.tensor_cores
    ));
    prefill(&dev, &o)?;
    decode(&dev, &o)?;
    Ok(())
}
