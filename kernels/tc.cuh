// Shared pieces of the tensor-core SSD kernels (ssd_tc.cu forward, ssd_bwd.cu backward): raw
// mma.sync m16n8k16 warp products with f16/bf16 operands and f32 accumulators (the PTX ISA's
// documented fragment layouts, so a product's result feeds the next one from registers),
// ldmatrix loads, cp.async tile copies, and the weighted outer-product sum both chunk_state and
// the backward's dS are.
#pragma once
#include "common.cuh"

#define TC_J 64       // time steps per shared-memory tile (the K of both products)
#define TC_ROWS 64    // output rows per chunk-scan block: 4 warps x 16
// The n tiles of 8 columns one warp's accumulator holds are a template parameter of each kernel
// (NP = P / 8, NT or F8 >= N / 8 or max(P, N) / 8): a compile-time bound keeps the register
// count, and so the occupancy, what the shape needs.
#define TC_PAD 8      // row padding of every 16-bit tile (16 bytes: keeps ldmatrix rows off one bank)

// exp(min(v, 0)) by the fast hardware exponential: for the decays inside a tile, whose products
// are rounded to 16 bits right after (its ~2 ulp error is far below that rounding).
__device__ __forceinline__ float decay_exp_fast(float v) { return __expf(fminf(v, 0.0f)); }

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

// f32 [P][N] (global) to T [P][ldn] (shared), 4 at a time.
template <typename T>
__device__ __forceinline__ void load_state(T* s, int ldn, const float* src, int P, int N, int tid) {
    for (int e = tid; e < P * N / 4; e += blockDim.x) {
        const float4 v = reinterpret_cast<const float4*>(src)[e];
        T* dst = s + ((4 * e) / N) * ldn + (4 * e) % N;
        dst[0] = from_f32<T>(v.x);
        dst[1] = from_f32<T>(v.y);
        dst[2] = from_f32<T>(v.z);
        dst[3] = from_f32<T>(v.w);
    }
}

// ---------------------------------------------------------------------------------------------
// Raw mma.sync m16n8k16 and ldmatrix, with the fragment layouts the PTX ISA documents (groupID
// g = lane / 4, t = lane % 4): A 16x16 regs {a0a1: row g, cols 2t..2t+1; a2a3: row g+8; a4a5: row
// g, cols 8+2t..; a6a7: row g+8, cols 8+2t..}; B 16x8 (col) {b0b1: k 2t..2t+1, col g; b2b3: k
// 8+2t..}; C 16x8 f32 {c0c1: row g, cols 2t..2t+1; c2c3: row g+8}. Two adjacent C tiles, packed
// to 16 bits, are the A fragment of a 16-wide k slice, so products chain in registers.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats as a pair of 16-bit values in one register (lo in the low half), and back.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    T h[2] = {from_f32<T>(lo), from_f32<T>(hi)};
    return *reinterpret_cast<uint32_t*>(h);
}
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w) {
    const T* h = reinterpret_cast<const T*>(&w);
    return make_float2(to_f32(h[0]), to_f32(h[1]));
}

// cp.async (sm_80+): global -> shared copies that do not go through registers, so a block
// issues the next tile and computes on the current one. `valid` false fills zeros (src-size
// 0: nothing is read, the address is still a valid one). Groups complete in commit order.
__device__ __forceinline__ void cp_async16(void* s, const void* g, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(s)), "l"(g),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void* s, const void* g, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(s)), "l"(g),
                 "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of the groups committed last are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// copy_tile by cp.async (rows >= valid zero-filled); the caller commits and waits.
template <typename T>
__device__ __forceinline__ void copy_tile_async(T* __restrict__ s, int ld_s,
                                                const T* __restrict__ g, long ld_g, int rows,
                                                int valid, int cols, int tid, int nthreads) {
    const int vec = cols / 8;
    for (int e = tid; e < rows * vec; e += nthreads) {
        const int r = e / vec, v = e % vec;
        cp_async16(s + r * ld_s + v * 8, g + (r < valid ? r * ld_g + v * 8 : 0), r < valid);
    }
}

// A warp's 16 x 8 NT f32 accumulator is float acc[NT][4]: lane l holds, of tile t, the elements
// (row frag_row(l, e), column 8 t + frag_col(l, e)) for e = 0..3 (rows g and g + 8).
__device__ __forceinline__ int frag_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int frag_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }
template <int NT> __device__ __forceinline__ void frag_zero(float (&acc)[NT][4]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
}
// Sum over the four lanes that hold one row (a quad).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
// Tiles 2q and 2q + 1 of an accumulator (16 columns), rounded to T: the A fragment of the
// 16-wide k slice q of a following product (the layouts above line up).
template <typename T, int NT>
__device__ __forceinline__ void frag_to_a(const float (&acc)[NT][4], int q, uint32_t (&a)[4]) {
    a[0] = pack2<T>(acc[2 * q][0], acc[2 * q][1]);
    a[1] = pack2<T>(acc[2 * q][2], acc[2 * q][3]);
    a[2] = pack2<T>(acc[2 * q + 1][0], acc[2 * q + 1][1]);
    a[3] = pack2<T>(acc[2 * q + 1][2], acc[2 * q + 1][3]);
}

// The three warp products of the tensor-core passes, on 16-bit tiles in shared memory (rows
// 16-byte aligned: strides multiples of 8 elements). acc covers the first nt (even) n tiles.
// acc += A Bt^T: A the warp's 16 rows at `a` (stride lda), Bt stored [n][k] (stride ldb); only
// the n tiles [t_lo, nt) (t_lo even: causal strips skip the tiles a mask would zero).
template <typename T, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a, int lda, const T* bt,
                                        int ldb, int K, int nt, int t_lo = 0) {
    const int lane = threadIdx.x & 31;
    const T* a_l = a + (lane & 15) * lda + (lane >> 4) * 8;
    const T* b_l = bt + ((lane & 7) + ((lane >> 4) << 3)) * ldb + ((lane >> 3) & 1) * 8;
    for (int k = 0; k < K; k += 16) {
        uint32_t fa[4];
        ldsm_x4(fa, a_l + k);
#pragma unroll
        for (int t2 = 0; t2 < NT / 2; ++t2)
            if (2 * t2 >= t_lo && 2 * t2 < nt) {
                uint32_t fb[4];
                ldsm_x4(fb, b_l + 16 * t2 * ldb + k);
                mma16816<T>(acc[2 * t2], fa, fb[0], fb[1]);
                mma16816<T>(acc[2 * t2 + 1], fa, fb[2], fb[3]);
            }
    }
}
// acc += P B[k0 .. k0 + 16): P's 16 x 16 k slice already in registers (an A fragment), B stored
// [k][n] with `b` at row k0 (stride ldb).
template <typename T, int NT>
__device__ __forceinline__ void mma_pb(float (&acc)[NT][4], const uint32_t (&pa)[4], const T* b,
                                       int ldb, int nt) {
    const int lane = threadIdx.x & 31;
    const T* b_l = b + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ldb + (lane >> 4) * 8;
#pragma unroll
    for (int t2 = 0; t2 < NT / 2; ++t2)
        if (2 * t2 < nt) {
            uint32_t fb[4];
            ldsm_x4_trans(fb, b_l + 16 * t2);
            mma16816<T>(acc[2 * t2], pa, fb[0], fb[1]);
            mma16816<T>(acc[2 * t2 + 1], pa, fb[2], fb[3]);
        }
}
// acc += A B: A the warp's 16 rows at `a` (stride lda), B stored [k][n] (stride ldb).
template <typename T, int NT>
__device__ __forceinline__ void mma_ab(float (&acc)[NT][4], const T* a, int lda, const T* b,
                                       int ldb, int K, int nt) {
    const int lane = threadIdx.x & 31;
    const T* a_l = a + (lane & 15) * lda + (lane >> 4) * 8;
    for (int k = 0; k < K; k += 16) {
        uint32_t fa[4];
        ldsm_x4(fa, a_l + k);
        mma_pb<T, NT>(acc, fa, b + k * ldb, ldb, nt);
    }
}
// acc += A^T B: A stored [k][m] with the warp's 16 columns at `a` (stride lda), B stored [k][n]
// (stride ldb); K % 16 == 0.
template <typename T, int NT>
__device__ __forceinline__ void mma_atb(float (&acc)[NT][4], const T* a, int lda, const T* b,
                                        int ldb, int K, int nt) {
    const int lane = threadIdx.x & 31;
    const T* a_l = a + ((lane & 7) + ((lane >> 4) << 3)) * lda + ((lane >> 3) & 1) * 8;
    for (int k = 0; k < K; k += 16) {
        uint32_t fa[4];
        ldsm_x4_trans(fa, a_l + k * lda);
        mma_pb<T, NT>(acc, fa, b + k * ldb, ldb, nt);
    }
}

// out[P][N] (global, f32, row stride N) = sum_{j < q_len} w_j u_j v_j^T, with u rows (P elements,
// row stride ldu) and v rows (N elements, row stride ldv) in global memory and the weights w in
// shared memory; u_j w_j is rounded to T before the product. P / 16 warps: warp w owns rows
// 16w..16w+15 of out and all N columns (NT >= N / 8 tiles of 8), accumulating over the steps 16
// at a time; out is written straight from the fragments. s_u [TC_J][P + TC_PAD] and
// s_v [TC_J][N + TC_PAD] are shared scratch.
template <typename T, int NT>
__device__ __forceinline__ void weighted_outer(const T* __restrict__ u, long ldu,
                                                   const float* __restrict__ s_w,
                                                   const T* __restrict__ v, long ldv, int q_len,
                                                   int P, int N, T* s_u, T* s_v,
                                                   float* __restrict__ out) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nn = N / 8;
    const int ldu_s = P + TC_PAD, ldv_s = N + TC_PAD, pv = P / 8;
    float acc[NT][4];
    frag_zero(acc);
    for (int j0 = 0; j0 < q_len; j0 += TC_J) {
        __syncthreads();  // the previous tile is consumed (and, first, s_w is written)
        const int valid = min(TC_J, q_len - j0);
        for (int e = tid; e < TC_J * pv; e += blockDim.x) {
            const int jj = e / pv, p = (e % pv) * 8;
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (jj < valid) {
                unpack8<T>(*reinterpret_cast<const uint4*>(u + (long)(j0 + jj) * ldu + p), f);
                const float w = s_w[j0 + jj];
#pragma unroll
                for (int k = 0; k < 8; ++k) f[k] *= w;
            }
            *reinterpret_cast<uint4*>(s_u + jj * ldu_s + p) = pack8<T>(f);
        }
        copy_tile(s_v, ldv_s, v + (long)j0 * ldv, ldv, TC_J, valid, N, tid, blockDim.x);
        __syncthreads();
        mma_atb<T, NT>(acc, s_u + 16 * warp, ldu_s, s_v, ldv_s, (valid + 15) & ~15, nn);
    }
    float* o = out + (long)(16 * warp) * N;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = frag_row(lane, 2 * rr);
#pragma unroll
        for (int t = 0; t < NT; ++t)
            if (t < nn)
                *reinterpret_cast<float2*>(o + r * N + 8 * t + frag_col(lane, 0)) =
                    make_float2(acc[t][2 * rr], acc[t][2 * rr + 1]);
    }
}
