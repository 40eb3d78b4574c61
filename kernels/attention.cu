// Attention kernels of the generation engine (src/cuda/attention.rs): the step from projections to
// the key/value cache, and decode attention over that cache (flash-decoding).
//
// Why kernels here: one decode step of a Phi layer through generic tensor ops is ~50 launches
// (three head transposes, a rotate-half built from narrow/neg/cat/mul/add for q and k, two cache
// writes, an f32 copy of the whole key cache, scores, scale, mask, softmax, a cast, the value
// product), each a few microseconds of host time, and the f32 key copy reads and writes the cache
// again every token. These two kernels do the same work in three launches and read each cached
// key and value once, in its own dtype, with f32 arithmetic.
#include "common.cuh"

// ------------------------------------------------------------------------------------------
// attn_prep: q, k, v projections, contiguous [B, T, Hq * D] and [B, T, Hkv * D],
// -> q_out [B, Hq, T, D] with rotary applied, and k (rotary applied) and v written into the
// caches [B, Hkv, cap, D] at positions pos0 .. pos0 + T.
//
// Rotary is NeoX rotate-half over the first `rot` dims (rot even, <= D), as Rotary::apply:
//   out[e] = x[e] cos[e] - x[e + rot/2] sin[e]   for e < rot/2,
//   out[e] = x[e] cos[e] + x[e - rot/2] sin[e]   for rot/2 <= e < rot,   x[e] beyond rot.
// cos, sin: [T, rot] rows (the table rows of positions pos0 ..), in T, rows `rot` apart.
// One thread per output element; the q heads come first, then k, then v.
template <typename T>
__device__ __forceinline__ void attn_prep(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                                          T* __restrict__ q_out, T* __restrict__ k_cache,
                                          T* __restrict__ v_cache, int B, int Tn, int Hq, int Hkv,
                                          int D, int rot, int cap, int pos0) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int heads = Hq + 2 * Hkv;
    const long total = (long)B * Tn * heads * D;
    if (i >= total) return;
    const int e = (int)(i % D);
    long r = i / D;
    const int head = (int)(r % heads);
    r /= heads;
    const int t = (int)(r % Tn);
    const int b = (int)(r / Tn);
    const T* src;
    int hh, width;
    if (head < Hq) {
        src = q;
        hh = head;
        width = Hq;
    } else if (head < Hq + Hkv) {
        src = k;
        hh = head - Hq;
        width = Hkv;
    } else {
        src = v;
        hh = head - Hq - Hkv;
        width = Hkv;
    }
    const T* x = src + (((long)b * Tn + t) * width + hh) * D;
    float out = to_f32(x[e]);
    if (head < Hq + Hkv && e < rot) {
        const int half = rot / 2;
        const float c = to_f32(cos_t[(long)t * rot + e]);
        const float s = to_f32(sin_t[(long)t * rot + e]);
        const float pair = e < half ? -to_f32(x[e + half]) : to_f32(x[e - half]);
        out = out * c + pair * s;
    }
    if (head < Hq) {
        q_out[(((long)b * Hq + hh) * Tn + t) * D + e] = from_f32<T>(out);
    } else {
        T* cache = head < Hq + Hkv ? k_cache : v_cache;
        cache[(((long)b * Hkv + hh) * cap + pos0 + t) * D + e] = from_f32<T>(out);
    }
}

// ------------------------------------------------------------------------------------------
// Decode attention, split over the keys (flash-decoding): one query per (row, head).
//
// attn_decode_split: block (bh, split) takes keys [j0, min(len, j0 + per)) with
// j0 = start[b] + split * per, of row b = bh / Hq, kv head (bh % Hq) / (Hq / Hkv), and writes its
// partial softmax state: the max score m, the sum l of exp(score - m) and
// acc = sum exp(score - m) v, all f32, to part[(bh * splits + split) * (D + 2) + ...] as
// [acc(D), m, l]. `start` (may be null: 0) is each row's first real key (its left padding): the
// splits of a row begin there and `per` is fixed by the caller, not by the batch, so a row's
// keys fall into the same splits, in the same order, batched or alone, and its output is
// bit-identical either way.
//
// Inside a block, groups of G lanes each own one key at a time: lane g of a group holds elements
// [g * VEC, g * VEC + VEC) of the query, loads the same elements of the key and the value as one
// 16-byte vector, and the group's dot product is a shuffle reduction over its G lanes. Each group
// keeps an online softmax over the keys it saw; the groups of the block merge in shared memory.
// Scores are (q . k) * scale + mask[b * mask_sb + j] (mask may be null: an additive f32 row per
// batch row, PAD_SCORE at padding keys), exactly the generic path's f32 scores.
//
// Requirements (checked by the caller): D % VEC == 0, D <= G * VEC, the caches 16-byte aligned
// with D * sizeof(T) a multiple of 16.
constexpr int DEC_THREADS = 128;
constexpr int DEC_MAX_D = 128;

template <typename T>
struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&out)[Vec16<T>::N]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(e[i]);
}

template <typename T>
__device__ __forceinline__ void attn_decode_split(const T* __restrict__ q,
                                                  const T* __restrict__ k_cache,
                                                  const T* __restrict__ v_cache,
                                                  const float* __restrict__ mask, long mask_sb,
                                                  const unsigned* __restrict__ start,
                                                  float* __restrict__ part, int Hq, int Hkv, int D,
                                                  int cap, int len, int per, float scale) {
    constexpr int VEC = Vec16<T>::N;
    constexpr int G = DEC_MAX_D / VEC;  // lanes per key: 16 for 16-bit types, 32 for f32
    constexpr int NG = DEC_THREADS / G;  // groups per block
    __shared__ float s_acc[NG][DEC_MAX_D];
    __shared__ float s_m[NG], s_l[NG];

    const int bh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int b = bh / Hq, hq = bh % Hq, hk = hq / (Hq / Hkv);
    const int group = threadIdx.x / G, g = threadIdx.x % G;
    const int e0 = g * VEC;
    const bool active = e0 < D;

    float qv[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) qv[i] = active ? to_f32(q[(long)bh * D + e0 + i]) * scale : 0.0f;

    const long head_base = ((long)b * Hkv + hk) * cap * D;
    const int j0 = (start ? (int)start[b] : 0) + split * per, j1 = min(len, j0 + per);
    float m = -INFINITY, l = 0.0f, acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

    // Every lane of a warp runs the same number of rounds (the shuffles need the whole warp);
    // a group whose key of the round is past the end only joins the shuffle.
    for (int jb = j0; jb < j1; jb += NG) {
        const int j = jb + group;
        const bool valid = j < j1;
        float kv[VEC];
        float dot = 0.0f;
        if (active && valid) {
            load16(k_cache + head_base + (long)j * D + e0, kv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot += qv[i] * kv[i];
        }
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (!valid) continue;
        const float s = mask ? dot + mask[(long)b * mask_sb + j] : dot;
        const float m_new = fmaxf(m, s);
        const float c = expf(m - m_new);  // 0 on the first key (m = -inf)
        const float p = expf(s - m_new);
        l = l * c + p;
        if (active) {
            load16(v_cache + head_base + (long)j * D + e0, kv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] = acc[i] * c + p * kv[i];
        }
        m = m_new;
    }

    if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s_acc[group][e0 + i] = acc[i];
    }
    if (g == 0) {
        s_m[group] = m;
        s_l[group] = l;
    }
    __syncthreads();
    float* out = part + ((long)bh * splits + split) * (D + 2);
    float big = -INFINITY;
#pragma unroll
    for (int x = 0; x < NG; ++x) big = fmaxf(big, s_m[x]);
    for (int e = threadIdx.x; e < D; e += DEC_THREADS) {
        float a = 0.0f;
        if (big != -INFINITY) {
#pragma unroll
            for (int x = 0; x < NG; ++x)
                if (s_m[x] != -INFINITY) a += s_acc[x][e] * expf(s_m[x] - big);
        }
        out[e] = a;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        if (big != -INFINITY) {
            for (int x = 0; x < NG; ++x)
                if (s_m[x] != -INFINITY) sum += s_l[x] * expf(s_m[x] - big);
        }
        out[D] = big;
        out[D + 1] = sum;
    }
}

// attn_decode_combine: block bh merges the `splits` partial states of (row, head) bh into the
// output [B, Hq, D] (the query's layout).
template <typename T>
__device__ __forceinline__ void attn_decode_combine(const float* __restrict__ part,
                                                    T* __restrict__ out, int D, int splits) {
    const int bh = blockIdx.x;
    const float* p = part + (long)bh * splits * (D + 2);
    float big = -INFINITY;
    for (int s = 0; s < splits; ++s) big = fmaxf(big, p[s * (D + 2) + D]);
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = p[s * (D + 2) + D];
            if (ms == -INFINITY) continue;
            const float w = expf(ms - big);
            num += w * p[s * (D + 2) + e];
            den += w * p[s * (D + 2) + D + 1];
        }
        out[(long)bh * D + e] = from_f32<T>(den > 0.0f ? num / den : 0.0f);
    }
}

#define ATTN_ENTRY(T, S)                                                                          \
    extern "C" __global__ void attn_prep_##S(const T* q, const T* k, const T* v, const T* cos_t,   \
                                             const T* sin_t, T* q_out, T* k_cache, T* v_cache,     \
                                             int B, int Tn, int Hq, int Hkv, int D, int rot,       \
                                             int cap, int pos0) {                                  \
        attn_prep<T>(q, k, v, cos_t, sin_t, q_out, k_cache, v_cache, B, Tn, Hq, Hkv, D, rot, cap,  \
                     pos0);                                                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                      \
        attn_decode_split_##S(const T* q, const T* k_cache, const T* v_cache, const float* mask,   \
                              long mask_sb, const unsigned* start, float* part, int Hq, int Hkv,   \
                              int D, int cap, int len, int per, float scale) {                     \
        attn_decode_split<T>(q, k_cache, v_cache, mask, mask_sb, start, part, Hq, Hkv, D, cap, len, \
                             per, scale);                                                          \
    }                                                                                              \
    extern "C" __global__ void attn_decode_combine_##S(const float* part, T* out, int D,           \
                                                       int splits) {                               \
        attn_decode_combine<T>(part, out, D, splits);                                              \
    }
FOR_EACH_DTYPE(ATTN_ENTRY)
