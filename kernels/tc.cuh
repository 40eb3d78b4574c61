// Shared pieces of the tensor-core SSD kernels (ssd_tc.cu forward, ssd_bwd.cu backward): WMMA
// 16x16x16 tiles with f16/bf16 operands and f32 accumulators, 16-byte tile copies to shared
// memory, and the weighted outer-product sum both chunk_state and the backward's dstates are.
#pragma once
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

#define TC_J 64       // time steps per shared-memory tile (the K of both products)
#define TC_ROWS 64    // output rows per chunk-scan block: 4 warps x 16
// The most accumulator fragments one warp holds is a template parameter F of each kernel (P / 16
// in chunk scan, P N / 256 / 8 in chunk state, at most 8): a compile-time bound keeps the
// register count, and so the occupancy, what the shape needs.
#define TC_PAD 8      // row padding of every 16-bit tile (keeps WMMA loads off one bank)

// exp(min(v, 0)) by the fast hardware exponential: for the decays inside a tile, whose products
// are rounded to 16 bits right after (its ~2 ulp error is far below that rounding).
__device__ __forceinline__ float decay_exp_fast(float v) { return __expf(fminf(v, 0.0f)); }

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;

// Eight 16-bit values as one 16-byte word, to f32 and back.
template <typename T>
__device__ __forceinline__ void unpack8(uint4 w, float* f) {
    const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = to_f32(h[k]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 w;
    T* h = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int k = 0; k < 8; ++k) h[k] = from_f32<T>(f[k]);
    return w;
}

// Copy `rows` rows of `cols` 16-bit elements (cols % 8 == 0) from global (row stride ld_g) to
// shared (row stride ld_s), 16 bytes at a time; rows >= valid are zero.
template <typename T>
__device__ __forceinline__ void copy_tile(T* __restrict__ s, int ld_s, const T* __restrict__ g,
                                          long ld_g, int rows, int valid, int cols, int tid,
                                          int nthreads) {
    const int vec = cols / 8;
    for (int e = tid; e < rows * vec; e += nthreads) {
        const int r = e / vec, v = e % vec;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) val = *reinterpret_cast<const uint4*>(g + r * ld_g + v * 8);
        *reinterpret_cast<uint4*>(s + r * ld_s + v * 8) = val;
    }
}

// out[P][N] (global, f32, row stride N) = sum_{j < q_len} w_j u_j v_j^T, with u rows (P elements,
// row stride ldu) and v rows (N elements, row stride ldv) in global memory and the weights w in
// shared memory. 256 threads (8 warps deal the P/16 x N/16 output fragments round robin, at
// most F each);
// s_u [TC_J][P + TC_PAD] and s_v [TC_J][N + TC_PAD] are shared scratch. u_j w_j is rounded to T
// before the product.
template <typename T, int F>
__device__ __forceinline__ void weighted_outer_tc(const T* __restrict__ u, long ldu,
                                                  const float* __restrict__ s_w,
                                                  const T* __restrict__ v, long ldv, int q_len,
                                                  int P, int N, T* s_u, T* s_v,
                                                  float* __restrict__ out) {
    const int tid = threadIdx.x, warp = tid / 32, nwarps = blockDim.x / 32;
    const int ldu_s = P + TC_PAD, ldv_s = N + TC_PAD;
    const int fn = N / 16, nfrag = (P / 16) * fn;
    Acc acc[F];
#pragma unroll
    for (int i = 0; i < F; ++i) wmma::fill_fragment(acc[i], 0.0f);
    for (int j0 = 0; j0 < q_len; j0 += TC_J) {
        __syncthreads();  // the previous tile is consumed
        const int pv = P / 8;
        for (int e = tid; e < TC_J * pv; e += blockDim.x) {
            const int jj = e / pv, p = (e % pv) * 8, j = j0 + jj;
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (j < q_len) {
                unpack8<T>(*reinterpret_cast<const uint4*>(u + (long)j * ldu + p), f);
                const float w = s_w[j];
#pragma unroll
                for (int k = 0; k < 8; ++k) f[k] *= w;
            }
            *reinterpret_cast<uint4*>(s_u + jj * ldu_s + p) = pack8<T>(f);
        }
        copy_tile(s_v, ldv_s, v + (long)j0 * ldv, ldv, TC_J, min(TC_J, q_len - j0), N, tid,
                  blockDim.x);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < F; ++i) {
            const int f = warp + nwarps * i;
            if (f < nfrag) {
                const int pf = f / fn, nf = f % fn;
#pragma unroll
                for (int k = 0; k < TC_J; k += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
                    wmma::load_matrix_sync(fa, s_u + k * ldu_s + pf * 16, ldu_s);
                    wmma::load_matrix_sync(fb, s_v + k * ldv_s + nf * 16, ldv_s);
                    wmma::mma_sync(acc[i], fa, fb, acc[i]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < F; ++i) {
        const int f = warp + nwarps * i;
        if (f < nfrag) {
            const int pf = f / fn, nf = f % fn;
            wmma::store_matrix_sync(out + pf * 16 * N + nf * 16, acc[i], N, wmma::mem_row_major);
        }
    }
}
