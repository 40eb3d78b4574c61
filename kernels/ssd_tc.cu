// Tensor-core versions of the two heavy passes of the SSD scan (ssd.cu has the algebra and the
// layouts): chunk_state and chunk_scan as warp-level mma.sync m16n8k16 products with f16/bf16
// operands and f32 accumulators (fragment layouts and the warp products in tc.cuh). The cumsum,
// the state passing and every state stay f32, as in ssd.cu.
//
// Why a second file rather than replacing the SIMT passes: tensor cores take f16/bf16 operands
// only (tf32 would break the f32 path's 1e-4 parity), and the tiles want head_dim and d_state in
// multiples of 16. f32 inputs and odd shapes keep the SIMT kernels; the Rust side picks
// (`ssd_tc_supported` in src/model/mamba2/kernels/mod.rs).
//
// What is rounded to the input dtype before a product, as in upstream's Triton kernels:
// dt_j exp(cum_last - cum_j) x_j (chunk_state), the state before the chunk, and the masked,
// decayed, dt-scaled scores (chunk_scan). Every sum is f32.
//
// Layout requirements (checked by the caller): P, N multiples of 16 and <= 128; x, B, C rows and
// the base pointers 16-byte aligned (their element offsets multiples of 8), so tiles are copied
// to shared memory 8 elements at a time.
#include "tc.cuh"

// ---------------------------------------------------------------------------------------------
// 1. chunk cumsum + per-chunk states: states[c] = sum_j w_j x_j B_j^T, w_j = dt_j
//    exp(cum_last - cum_j). Grid (nc, B*H), P / 16 warps (weighted_outer in tc.cuh); NT >= N / 8.
//    Dynamic shared memory: tc_chunk_state_smem in kernels/mod.rs. x rows (per time step) are
//    ldx elements apart, B rows ldbc (x, B, C may be column blocks of one packed xBC tensor).
template <typename T, int NT>
__device__ __forceinline__ void chunk_state_tc(const T* __restrict__ x, long ldx,
                                               const float* __restrict__ dt,
                                               const float* __restrict__ A,
                                               const T* __restrict__ Bm, long ldbc,
                                               float* __restrict__ cum_out,
                                               float* __restrict__ states, int L, int H, int G,
                                               int P, int N, int Q, int nc) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int Qp = (Q + 31) & ~31;
    float* s_cum = reinterpret_cast<float*>(smem_raw);
    float* s_w = s_cum + Qp;
    T* s_x = reinterpret_cast<T*>(s_w + Qp);  // [TC_J][P + TC_PAD]
    T* s_b = s_x + TC_J * (P + TC_PAD);       // [TC_J][N + TC_PAD]
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0);

    chunk_cumsum_weights(dt, A[h], cum_out + ((long)bh * nc + c) * Q, s_cum, s_w,
                         ((long)b * L + t0) * H + h, H, q_len);
    weighted_outer<T, NT>(x + ((long)b * L + t0) * ldx + (long)h * P, ldx, s_w,
                          Bm + ((long)b * L + t0) * ldbc + (long)g * N, ldbc, q_len, P, N, s_x,
                          s_b, states + ((long)bh * nc + c) * P * N);
}

// ---------------------------------------------------------------------------------------------
// 3. chunk scan: per (batch, head, chunk, 64 rows), warp w owning rows 16w..16w+15:
//      Y = diag(exp(cum_i)) C S_start^T + (mask o exp(cum_i - cum_j) o dt_j o C B^T) X,
//    then D skip and gate in f32 (the pre-gate output also to `ypre` when given: the backward
//    of the gate needs it). Grid (nc * row_tiles, B*H), 128 threads. Scores and outputs stay in
//    registers: C S^T scaled by exp(cum_i), scores masked / decayed / dt-scaled in registers and
//    fed as A fragments to the product with x. NP = P / 8 output tiles a warp holds (even:
//    P % 16 == 0).
//     Loads overlap compute by cp.async, staggered over the two products: B_{t+1} (with its
//     cumsums and dt) lands while the scores of tile t meet x_t, and x_{t+1} while the scores of
//     tile t+1 are formed, so one buffer each suffices. z (for the gate) comes in with C at the
//     start; x of the block's own rows is the last tile's (the diagonal one), for the D skip.
//     Shared memory (tc_chunk_scan_smem in kernels/mod.rs): s_cumr [64], s_cumj, s_dtj [2][64]
//     f32; s_c [64][ldc]; s_k [max(P, 64)][ldc] (S, then B tiles); s_x, s_z [64][ldxs].
template <typename T, int NP>
__device__ __forceinline__ void chunk_scan_tc(const T* __restrict__ x, long ldx,
                                               const float* __restrict__ dt,
                                               const float* __restrict__ cum,
                                               const T* __restrict__ Bm, const T* __restrict__ Cm,
                                               long ldbc, const float* __restrict__ starts,
                                               const float* __restrict__ D,
                                               const T* __restrict__ z, T* __restrict__ y,
                                               T* __restrict__ ypre, int L, int H, int G, int P,
                                               int N, int Q, int nc, int row_tiles) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int ldc = N + TC_PAD, ldxs = P + TC_PAD;
    float* s_cumr = reinterpret_cast<float*>(smem_raw);
    float* s_cumj = s_cumr + TC_ROWS;  // [2][TC_J]
    float* s_dtj = s_cumj + 2 * TC_J;  // [2][TC_J]
    T* s_c = reinterpret_cast<T*>(s_dtj + 2 * TC_J);
    T* s_k = s_c + TC_ROWS * ldc;
    T* s_x = s_k + max(P, TC_J) * ldc;
    T* s_z = s_x + TC_J * ldxs;

    const int c = blockIdx.x / row_tiles, rt = blockIdx.x % row_tiles;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0), i0 = rt * TC_ROWS, tid = threadIdx.x;
    if (i0 >= q_len) return;  // uniform over the block
    const int warp = tid / 32, lane = tid % 32, vi = min(TC_ROWS, q_len - i0);
    const float* cum_c = cum + ((long)bh * nc + c) * Q;
    const float* dt_h = dt + ((long)b * L + t0) * H + h;
    const T* cg = Cm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* bg = Bm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* xh = x + ((long)b * L + t0) * ldx + (long)h * P;
    const long zy0 = ((long)b * L + t0 + i0) * H * P + (long)h * P;  // row i0 of y, z
    const T* c_w = s_c + warp * 16 * ldc;
    const int j_end = min(q_len, i0 + TC_ROWS);
    // Tile t of B (with its cumsums and dt) or of x, issued by cp.async.
    auto issue_b = [&](int j0) {
        const int valid = min(TC_J, q_len - j0), buf = (j0 / TC_J) & 1;
        copy_tile_async(s_k, ldc, bg + (long)j0 * ldbc, ldbc, TC_J, valid, N, tid, blockDim.x);
        if (tid < TC_J) {
            const bool ok = tid < valid;
            cp_async4(s_cumj + buf * TC_J + tid, cum_c + (ok ? j0 + tid : 0), ok);
            cp_async4(s_dtj + buf * TC_J + tid, dt_h + (ok ? (long)(j0 + tid) * H : 0), ok);
        }
        cp_async_commit();
    };
    auto issue_x = [&](int j0) {
        copy_tile_async(s_x, ldxs, xh + (long)j0 * ldx, ldx, TC_J, min(TC_J, q_len - j0), P, tid,
                        blockDim.x);
        cp_async_commit();
    };

    copy_tile_async(s_c, ldc, cg + (long)i0 * ldbc, ldbc, TC_ROWS, vi, N, tid, blockDim.x);
    if (z) copy_tile_async(s_z, ldxs, z + zy0, (long)H * P, TC_ROWS, vi, P, tid, blockDim.x);
    cp_async_commit();
    issue_x(0);
    if (tid < TC_ROWS) s_cumr[tid] = tid < vi ? cum_c[i0 + tid] : 0.0f;
    load_state(s_k, ldc, starts + ((long)bh * nc + c) * P * N, P, N, tid);
    cp_async_wait<1>();  // C and z
    __syncthreads();

    // This lane's two rows of the warp's strip (block-local), their cumsums and chunk steps.
    int rl[2];
    float cr[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        rl[rr] = warp * 16 + frag_row(lane, 2 * rr);
        cr[rr] = s_cumr[rl[rr]];
    }

    // State term: C S^T, rows then scaled by exp(cum_i).
    float acc[NP][4];
    frag_zero(acc);
    mma_abt<T, NP>(acc, c_w, ldc, s_k, ldc, N, NP);
    const float er[2] = {decay_exp(cr[0]), decay_exp(cr[1])};
#pragma unroll
    for (int t = 0; t < NP; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= er[e >> 1];
    __syncthreads();  // S is consumed
    issue_b(0);

    for (int j0 = 0; j0 < j_end; j0 += TC_J) {
        const int valid = min(TC_J, q_len - j0), buf = (j0 / TC_J) & 1;
        const bool more = j0 + TC_J < j_end;
        if (j0 == 0)
            cp_async_wait<0>();
        else
            cp_async_wait<1>();  // B_t (x_t, committed after it, may be in flight)
        __syncthreads();

        // Scores C B^T of the warp's 16 rows against the tile's 64 sources; on the diagonal
        // tile the warp's rows see only its first 16 (warp + 1) sources.
        const int q_end = j0 == i0 ? warp + 1 : TC_J / 16;
        float sc[TC_J / 8][4];
        frag_zero(sc);
        mma_abt<T, TC_J / 8>(sc, c_w, ldc, s_k, ldc, N, 2 * q_end);
        __syncthreads();  // every warp has read B_t
        if (more) issue_b(j0 + TC_J);
        if (more)
            cp_async_wait<1>();  // x_t
        else
            cp_async_wait<0>();
        __syncthreads();

        // Masked (causal, in the chunk), decayed, dt-scaled scores times x, 16 sources at a time.
        const float* cumj = s_cumj + buf * TC_J;
        const float* dtj = s_dtj + buf * TC_J;
#pragma unroll
        for (int q = 0; q < TC_J / 16; ++q) {
            if (q >= q_end) break;
#pragma unroll
            for (int t = 2 * q; t < 2 * q + 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int jj = 8 * t + frag_col(lane, e), ir = i0 + rl[e >> 1];
                    sc[t][e] = (j0 + jj <= ir && ir < q_len && jj < valid)
                                   ? sc[t][e] * decay_exp_fast(cr[e >> 1] - cumj[jj]) * dtj[jj]
                                   : 0.0f;
                }
            uint32_t a[4];
            frag_to_a<T>(sc, q, a);
            mma_pb<T, NP>(acc, a, s_x + 16 * q * ldxs, ldxs, NP);
        }
        if (more) {
            __syncthreads();  // every warp has read x_t
            issue_x(j0 + TC_J);
        }
    }

    // D skip (x of the own rows: the last tile was the diagonal one, s_x holds it) and gate in
    // f32, two adjacent outputs per store.
    const float d = D ? D[h] : 0.0f;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        if (rl[rr] >= vi) continue;
        const long row = zy0 + (long)rl[rr] * H * P;  // y, z: [B, L, H, P]
#pragma unroll
        for (int t = 0; t < NP; ++t) {
            const int p = 8 * t + frag_col(lane, 0);
            const float2 xv = unpack2<T>(*reinterpret_cast<const uint32_t*>(s_x + rl[rr] * ldxs + p));
            float o0 = acc[t][2 * rr] + d * xv.x, o1 = acc[t][2 * rr + 1] + d * xv.y;
            if (ypre) *reinterpret_cast<uint32_t*>(ypre + row + p) = pack2<T>(o0, o1);
            if (z) {
                const float2 zv =
                    unpack2<T>(*reinterpret_cast<const uint32_t*>(s_z + rl[rr] * ldxs + p));
                o0 *= silu_f32(zv.x);
                o1 *= silu_f32(zv.y);
            }
            *reinterpret_cast<uint32_t*>(y + row + p) = pack2<T>(o0, o1);
        }
    }
}

#define SSD_TC_STATE_ENTRY(T, S, NT)                                                               \
    extern "C" __global__ void __launch_bounds__(256) mamba2_ssd_tc_chunk_state_##S##_f##NT(       \
        const T* __restrict__ x, long ldx, const float* __restrict__ dt,                            \
        const float* __restrict__ A, const T* __restrict__ Bm, long ldbc,                           \
        float* __restrict__ cum_out, float* __restrict__ states, int L, int H, int G, int P, int N, \
        int Q, int nc) {                                                                            \
        chunk_state_tc<T, NT>(x, ldx, dt, A, Bm, ldbc, cum_out, states, L, H, G, P, N, Q, nc);      \
    }
// NT = N / 8 rounded up to {4, 8, 10, 16} (the Rust side picks the smallest that fits, `tc_tiles`).
#define SSD_TC_STATE_ENTRIES(T, S)                                                                 \
    SSD_TC_STATE_ENTRY(T, S, 4) SSD_TC_STATE_ENTRY(T, S, 8) SSD_TC_STATE_ENTRY(T, S, 10)          \
    SSD_TC_STATE_ENTRY(T, S, 16)
SSD_TC_STATE_ENTRIES(__half, f16)
SSD_TC_STATE_ENTRIES(__nv_bfloat16, bf16)

#define SSD_TC_SCAN_ENTRY(T, S, NP)                                                                \
    extern "C" __global__ void __launch_bounds__(128, 4) mamba2_ssd_tc_chunk_scan_##S##_p##NP(     \
        const T* __restrict__ x, long ldx, const float* __restrict__ dt,                            \
        const float* __restrict__ cum, const T* __restrict__ Bm, const T* __restrict__ Cm,          \
        long ldbc, const float* __restrict__ starts, const float* __restrict__ D,                   \
        const T* __restrict__ z, T* __restrict__ y, T* __restrict__ ypre, int L, int H, int G,      \
        int P, int N, int Q, int nc, int row_tiles) {                                               \
        chunk_scan_tc<T, NP>(x, ldx, dt, cum, Bm, Cm, ldbc, starts, D, z, y, ypre, L, H, G, P, N,   \
                             Q, nc, row_tiles);                                                     \
    }
// NP = P / 8 for P = 16, 32, ..., 128.
#define SSD_TC_SCAN_ENTRIES(T, S)                                                                  \
    SSD_TC_SCAN_ENTRY(T, S, 2) SSD_TC_SCAN_ENTRY(T, S, 4) SSD_TC_SCAN_ENTRY(T, S, 6)              \
    SSD_TC_SCAN_ENTRY(T, S, 8) SSD_TC_SCAN_ENTRY(T, S, 10) SSD_TC_SCAN_ENTRY(T, S, 12)            \
    SSD_TC_SCAN_ENTRY(T, S, 14) SSD_TC_SCAN_ENTRY(T, S, 16)
SSD_TC_SCAN_ENTRIES(__half, f16)
SSD_TC_SCAN_ENTRIES(__nv_bfloat16, bf16)
