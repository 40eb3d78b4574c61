//! Build script: with the `cuda` feature, compile `kernels/*.cu` to PTX with nvcc.
//!
//! Build-time nvcc rather than NVRTC at run time, because: compile errors and warnings surface
//! when the crate is built (on the development machine, which has no GPU), not on the GPU
//! machine mid-run; the binary needs no NVRTC library and pays no compile latency at start; and
//! the PTX ISA is fixed by the pinned nvcc (13.0 from ../shared/gpu/cuda-env.sh, PTX ISA 9.0), which
//! the GPU machine's driver 580 accepts, whereas an NVRTC found at run time could be newer or
//! older than the driver. This is also how candle builds its own kernels.
//!
//! Without the feature this script only registers its inputs: nothing is compiled.

use std::path::PathBuf;
use std::process::Command;

/// The targets the PTX is built for: sm_80 serves every card of compute capability 8.x
/// (A100, A10, L4, L40, RTX 30/40) and sm_90 Hopper. The kernels use nothing newer than sm_80
/// (mma.sync, ldmatrix, cp.async), so the two differ only in how ptxas schedules them; the
/// runtime picks by the device's compute capability (src/kernels/mod.rs).
const ARCHS: [u32; 2] = [80, 90];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let mut jobs = Vec::new();
    for name in ["conv", "ssd", "ssd_tc", "ssd_bwd", "norm", "attention"] {
        for arch in ARCHS {
            let (nvcc, out) = (nvcc.clone(), out.clone());
            jobs.push(std::thread::spawn(move || compile(&nvcc, name, arch, &out)));
        }
    }
    for job in jobs {
        job.join().expect("an nvcc job panicked");
    }
}

/// PTX of `kernels/{name}.cu` for `sm_{arch}`, and the resource check: ptxas compiles the same
/// source to that architecture's machine code, so a kernel over the register or static
/// shared-memory limits of an architecture fails the build here, and its usage (registers,
/// spills, shared memory per kernel) lands in `{name}.sm{arch}.resources.txt` beside the PTX.
fn compile(nvcc: &str, name: &str, arch: u32, out: &std::path::Path) {
    let src = format!("kernels/{name}.cu");
    let run = |args: &[String]| {
        let output = Command::new(nvcc)
            .args(["-O3", "-std=c++17", "-Werror", "all-warnings"])
            .arg(format!("-arch=sm_{arch}"))
            .args(args)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} for {src} (source ../shared/gpu/cuda-env.sh first): {e}")
            });
        assert!(
            output.status.success(),
            "{nvcc} failed on {src} for sm_{arch}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    let ptx = out.join(format!("{name}.sm{arch}.ptx"));
    run(&["--ptx".into(), "-o".into(), ptx.display().to_string()]);
    let cubin = out.join(format!("{name}.sm{arch}.cubin"));
    let checked = run(&[
        "--cubin".into(),
        "-Xptxas".into(),
        "-v".into(),
        "-o".into(),
        cubin.display().to_string(),
    ]);
    std::fs::write(
        out.join(format!("{name}.sm{arch}.resources.txt")),
        &checked.stderr,
    )
    .expect("writing the resource report");
    let _ = std::fs::remove_file(cubin);
}
