// Causal depthwise conv1d (+ optional SiLU) over time, the `xBC` path of the Mamba-2 mixer.
//
// u(t) is the input at time t, preceded by the conv state: the K previous inputs, oldest first
// (state[b, c, K + t] for t < 0; zeros when there is no state). For each channel c:
//   y[t, c] = act(bias[c] + sum_{i < K} w[c, i] * u(t - K + 1 + i)),
// and the state after the sequence is u(L - K .. L). Same numerics as conv::causal_depthwise
// followed by silu in src/model/mamba2/conv.rs: f32 taps and sums, the output rounded once.
#include "common.cuh"

// x(b, t, c) = x[b * sxb + t * sxt + c]: the input may be a column slice of the in_proj output
// (row stride in_proj_dim), read in place rather than copied.
template <typename T>
__device__ __forceinline__ void conv_fwd(const T* __restrict__ x, long sxb, long sxt,
                                         const float* __restrict__ w,      // [C, K]
                                         const float* __restrict__ bias,   // [C] or null
                                         const float* __restrict__ state,  // [B, C, K] or null
                                         T* __restrict__ y,                // [B, L, C]
                                         float* __restrict__ state_out,    // [B, C, K]
                                         int L, int C, int K, int silu, int t_per_block) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.z;
    if (c >= C) return;
    const T* xb = x + (long)b * sxb;
    const float* sb = state ? state + ((long)b * C + c) * K : nullptr;
    auto u = [&](int t) -> float {
        if (t >= 0) return to_f32(xb[(long)t * sxt + c]);
        return sb ? sb[K + t] : 0.0f;
    };
    const float bc = bias ? bias[c] : 0.0f;
    const float* wc = w + (long)c * K;
    const int t0 = blockIdx.y * t_per_block;
    const int t1 = min(L, t0 + t_per_block);
    for (int t = t0; t < t1; ++t) {
        float acc = bc;
        for (int i = 0; i < K; ++i) acc += wc[i] * u(t - K + 1 + i);
        if (silu) acc = silu_f32(acc);
        y[((long)b * L + t) * C + c] = from_f32<T>(acc);
    }
    if (blockIdx.y == 0) {
        float* so = state_out + ((long)b * C + c) * K;
        for (int k = 0; k < K; ++k) so[k] = u(L - K + k);
    }
}

// One decoding step, in place on the state: shift the window left by one, append x, then
//   y[b, c] = act(bias[c] + sum_i w[c, i] * state[b, c, i]).
template <typename T>
__device__ __forceinline__ void conv_step(const T* __restrict__ x, long sxb,  // x(b, c) = x[b * sxb + c]
                                          const float* __restrict__ w, const float* __restrict__ bias,
                                          float* __restrict__ state,  // [B, C, K], in place
                                          T* __restrict__ y,          // [B, C]
                                          int B, int C, int K, int silu) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * C) return;
    const int b = (int)(idx / C), c = (int)(idx % C);
    float* s = state + idx * K;
    const float* wc = w + (long)c * K;
    float acc = bias ? bias[c] : 0.0f;
    for (int i = 0; i + 1 < K; ++i) {
        const float v = s[i + 1];
        s[i] = v;
        acc += wc[i] * v;
    }
    const float xv = to_f32(x[(long)b * sxb + c]);
    s[K - 1] = xv;
    acc += wc[K - 1] * xv;
    if (silu) acc = silu_f32(acc);
    y[idx] = from_f32<T>(acc);
}

#define CONV_ENTRY(T, S)                                                                          \
    extern "C" __global__ void mamba2_conv_fwd_##S(const T* x, long sxb, long sxt, const float* w,  \
                                                   const float* bias, const float* state, T* y,     \
                                                   float* state_out, int L, int C, int K, int silu, \
                                                   int t_per_block) {                               \
        conv_fwd<T>(x, sxb, sxt, w, bias, state, y, state_out, L, C, K, silu, t_per_block);         \
    }                                                                                               \
    extern "C" __global__ void mamba2_conv_step_##S(const T* x, long sxb, const float* w,           \
                                                    const float* bias, float* state, T* y, int B,   \
                                                    int C, int K, int silu) {                       \
        conv_step<T>(x, sxb, w, bias, state, y, B, C, K, silu);                                     \
    }
FOR_EACH_DTYPE(CONV_ENTRY)
