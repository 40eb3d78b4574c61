// Shared helpers of the Mamba-2 kernels: dtype conversion (inputs are f32, f16 or bf16; all
// arithmetic and every state is f32), SiLU, and the macro that stamps out one extern "C" entry
// point per input dtype (PTX symbols get a `_f32` / `_f16` / `_bf16` suffix the Rust side picks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Full-precision expf: the kernels are checked against the generic f32 path at ~1e-5.
__device__ __forceinline__ float silu_f32(float v) { return v / (1.0f + expf(-v)); }

// exp(min(v, 0)): every decay of the scan is clamped like upstream (and the generic path), so no
// exponent overflows, masked or not.
__device__ __forceinline__ float decay_exp(float v) { return expf(fminf(v, 0.0f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

#define FOR_EACH_DTYPE(M) M(float, f32) M(__half, f16) M(__nv_bfloat16, bf16)
