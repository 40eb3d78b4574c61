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

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["conv", "ssd", "ssd_tc", "ssd_bwd", "norm"] {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-Werror", "all-warnings"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} for {src} (source ../shared/gpu/cuda-env.sh first): {e}")
            });
        assert!(status.success(), "{nvcc} failed on {src} ({status})");
    }
}
