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

// Pass 1 of the chunked scan, shared by the SIMT and tensor-core chunk states: the chunk's
// cumsum of dt A (to cum_c and s_cum) and the state weights s_w[j] = dt_j exp(cum_last -
// cum_j), both [q_len] f32 in shared memory; warp 0 scans 32 steps at a time with a running
// carry. dt_at: dt's offset of the chunk's first step (steps H apart). Ends synchronised.
__device__ __forceinline__ void chunk_cumsum_weights(const float* __restrict__ dt, float a,
                                                     float* __restrict__ cum_c, float* s_cum,
                                                     float* s_w, long dt_at, int H, int q_len) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (warp == 0) {  // inclusive scan of dt * A, 32 steps at a time with a running carry
        float carry = 0.0f;
        for (int base = 0; base < q_len; base += 32) {
            const int i = base + lane;
            const float d = i < q_len ? dt[dt_at + (long)i * H] : 0.0f;
            float v = d * a;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const float n = __shfl_up_sync(0xffffffffu, v, off);
                if (lane >= off) v += n;
            }
            v += carry;
            if (i < q_len) {
                s_cum[i] = v;
                s_w[i] = d;
            }
            carry = __shfl_sync(0xffffffffu, v, 31);
        }
    }
    __syncthreads();
    const float cum_last = s_cum[q_len - 1];
    __syncthreads();  // every thread has read cum_last before s_w changes below
    for (int i = tid; i < q_len; i += blockDim.x) {
        cum_c[i] = s_cum[i];
        s_w[i] *= decay_exp(cum_last - s_cum[i]);
    }
    __syncthreads();
}

#define FOR_EACH_DTYPE(M) M(float, f32) M(__half, f16) M(__nv_bfloat16, bf16)
