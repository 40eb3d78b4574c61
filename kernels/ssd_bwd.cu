// Backward of the chunked SSD scan (forward: ssd_tc.cu, algebra in ssd.cu) on tensor cores,
// for the shapes the tensor-core forward takes (f16/bf16, head_dim and d_state multiples of 16
// up to 128). Per (batch b, head h, chunk c), with i a target and j a source step of the chunk,
// cum the chunk-local cumsum of dt A, cl = cum at the chunk's last step, S the state before the
// chunk (the forward's `states`), g = dy and Xd_j = dt_j x_j:
//   y_i  = exp(cum_i) S C_i + sum_{j<=i} M_ij Xd_j + D x_i,  M_ij = (C_i . B_j) exp(cum_i - cum_j)
//   S'   = exp(cl) S + sum_j exp(cl - cum_j) Xd_j B_j^T       (the state after the chunk)
// Gradients (dOwn = gradient of S', zero after the last chunk; dM_ij = g_i . Xd_j):
//   dS     = sum_i exp(cum_i) g_i C_i^T + exp(cl) dOwn                       (passes 1, 2)
//   dXd_j  = sum_{i>=j} M_ij g_i + exp(cl - cum_j) dOwn B_j                   (pass 3a)
//   dx_j   = dt_j dXd_j + D g_j,   ddt_j = x_j . dXd_j + A ddA_j
//   dB_j   = sum_{i>=j} dM_ij exp(cum_i - cum_j) C_i + exp(cl - cum_j) dOwn^T Xd_j   (pass 3a)
//   dC_i   = sum_{j<=i} dM_ij exp(cum_i - cum_j) B_j + exp(cum_i) S^T g_i            (pass 3b)
//   dcum_i = sum_{j<=i} T_ij - sum_{k>=i} T_ki + U_i - V_i, plus, at the last step, sum_j V_j + W
//            with T_ij = M_ij dM_ij, U_i = exp(cum_i) g_i . (S C_i),
//            V_j = exp(cl - cum_j) Xd_j . (dOwn B_j), W = exp(cl) <S, dOwn>
//   ddA_k  = sum_{i>=k} dcum_i (pass 4),  dA_h = sum_k dt_k ddA_k,  dD_h = sum_i g_i . x_i
// Layouts as the forward: x, B, C rows ldx / ldbc apart (column blocks of a packed xBC), dy
// [B, L, H, P] contiguous, dt [B, L, H] f32, states [B*H, nc, P, N] f32. dx is written with row
// stride ld_dx, dB / dC with ld_dbc (into the packed gradient of xBC); with fewer groups than
// heads several heads add into one group's dB / dC, so they go to f32 scratch by atomicAdd and a
// cast pass writes them.
#include "tc.cuh"

// ---------------------------------------------------------------------------------------------
// 1. dS^in_c = sum_i exp(cum_i) g_i C_i^T per chunk. Grid (nc, B*H), P / 16 warps; shared memory
//    as the forward chunk state.
template <typename T, int NT>
__device__ __forceinline__ void bwd_dstates(const T* __restrict__ dy, const float* __restrict__ cum,
                                            const T* __restrict__ Cm, long ldbc,
                                            float* __restrict__ ds, int L, int H, int G, int P,
                                            int N, int Q, int nc) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int Qp = (Q + 31) & ~31;
    float* s_w = reinterpret_cast<float*>(smem_raw) + Qp;  // same layout as chunk_state_tc
    T* s_u = reinterpret_cast<T*>(s_w + Qp);
    T* s_v = s_u + TC_J * (P + TC_PAD);
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0);
    const float* cum_c = cum + ((long)bh * nc + c) * Q;
    for (int i = threadIdx.x; i < q_len; i += blockDim.x) s_w[i] = decay_exp(cum_c[i]);
    weighted_outer<T, NT>(dy + ((long)b * L + t0) * H * P + (long)h * P, (long)H * P, s_w,
                          Cm + ((long)b * L + t0) * ldbc + (long)g * N, ldbc, q_len, P, N, s_u,
                          s_v, ds + ((long)bh * nc + c) * P * N);
}

// ---------------------------------------------------------------------------------------------
// 2. The state recurrence backwards: ds holds dS^in_c and becomes dOwn_c (the gradient of the
//    state after chunk c); W_c is added to dcl[c]; the initial state's gradient is written when
//    asked for. Grid (ceil(P N / 256), B*H), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    mamba2_ssd_bwd_state_passing(float* __restrict__ ds, const float* __restrict__ states,
                                 const float* __restrict__ cum, float* __restrict__ dcl,
                                 float* __restrict__ dinit, int nc, int Q, int L, int PN) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x, bh = blockIdx.y;
    const bool ok = e < PN;
    float after = 0.0f;  // gradient of the state after the chunk being visited
    // Four chunks at a time, their loads issued before any store (as the forward's passing).
    for (int c0 = nc - 1; c0 >= 0; c0 -= 4) {
        float din[4], st[4], decay[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int c = c0 - k;
            if (c >= 0) {
                const int q_len = min(Q, L - c * Q);
                decay[k] = decay_exp(cum[((long)bh * nc + c) * Q + q_len - 1]);
                const long at = ((long)bh * nc + c) * PN + e;
                din[k] = ok ? ds[at] : 0.0f;
                st[k] = ok ? states[at] : 0.0f;
            }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int c = c0 - k;
            if (c < 0) break;  // uniform over the block
            if (ok) ds[((long)bh * nc + c) * PN + e] = after;
            float w = decay[k] * st[k] * after;
            after = din[k] + decay[k] * after;
            w = warp_sum(w);
            if ((threadIdx.x & 31) == 0 && w != 0.0f) atomicAdd(dcl + (long)bh * nc + c, w);
        }
    }
    if (ok && dinit) dinit[(long)bh * PN + e] = after;
}

// In dD's pass over a warp strip, lane l owns row l / 2, columns [h * P/2, (h+1) * P/2), h = l % 2.
#define ROW_OF(lane) ((lane) >> 1)
#define HALF_OF(lane) ((lane)&1)

// ---------------------------------------------------------------------------------------------
// 3a and 3b, with every score strip and accumulator in registers (fragment layouts in tc.cuh):
// scores become A fragments of the next product directly. Grid (nc * row_tiles, B*H), 128
// threads (warp w owns rows 16w..16w+15). F8: the most n tiles of 8 an accumulator holds
// (max(P, N) / 8 rounded up to the set instantiated).
// Loads overlap compute by cp.async. Each loop tile is used by two products at its start and
// end (C_i in 3a', B_j in 3b'), which is double-buffered and issued a tile ahead, and by two in
// its middle (g_i in 3a', x_j in 3b'), whose single buffer is refilled over the end of one tile
// and the start of the next. Commit order: mid_0, ends_0, then per tile ends_{t+1}, mid_{t+1}.
// Shared memory (tc_bwd_smem in kernels/train.rs): four [64] f32 rows (the fixed side's two,
// the loop side's cumsums in two buffers), then 16-bit tiles: the fixed side's two [64][ld],
// the loop's end tile [2][64][ldn] and middle tile [64][ldpx].

// Rows (this lane's two of a warp strip) of an accumulator written to global: as T pairs
// (dst_t rows ld_t apart) or added to f32 scratch (dst_f rows ld_f apart); row_ok per row.
template <typename T, int NT>
__device__ __forceinline__ void store_frag_rows(const float (&acc)[NT][4], int nt, int lane,
                                                const bool (&row_ok)[2], T* dst_t, long ld_t,
                                                float* dst_f, long ld_f) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        if (!row_ok[rr]) continue;
        const int r = frag_row(lane, 2 * rr);
#pragma unroll
        for (int t = 0; t < NT; ++t)
            if (t < nt) {
                const int col = 8 * t + frag_col(lane, 0);
                if (dst_f) {
                    atomicAdd(dst_f + r * ld_f + col, acc[t][2 * rr]);
                    atomicAdd(dst_f + r * ld_f + col + 1, acc[t][2 * rr + 1]);
                } else {
                    *reinterpret_cast<uint32_t*>(dst_t + r * ld_t + col) =
                        pack2<T>(acc[t][2 * rr], acc[t][2 * rr + 1]);
                }
            }
    }
}

// 3a. Per (batch, head, chunk, 64 source rows j): dx, dB, ddt's x . dXd part, the source side
//      of dcum; loop over target tiles i >= j (end tile C_i with cum_i, middle tile g_i). x_j is
//      kept unscaled and dt_j applied in registers, as in 3b: both passes must form T_ij =
//      M_ij dM_ij from the same roundings, since dcum takes it once with each sign and dA sums
//      what is left (for L = 1 exactly zero).
template <typename T, int F8>
__device__ __forceinline__ void bwd_dx_db(
    const T* __restrict__ x, long ldx, const float* __restrict__ dt, const float* __restrict__ cum,
    const T* __restrict__ Bm, const T* __restrict__ Cm, long ldbc, const T* __restrict__ dy,
    const float* __restrict__ down, const float* __restrict__ D, T* __restrict__ dx, long ld_dx,
    T* __restrict__ db_t, float* __restrict__ db_f, long ld_dbc, float* __restrict__ ddt,
    float* __restrict__ dcum_src, float* __restrict__ dcl, int L, int H, int G, int P, int N,
    int Q, int nc, int row_tiles) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int ldn = N + TC_PAD, ldpx = P + TC_PAD;
    float* s_cumj = reinterpret_cast<float*>(smem_raw);
    float* s_dtj = s_cumj + TC_J;
    float* s_cumi = s_dtj + TC_J;  // [2][TC_J]
    T* s_b = reinterpret_cast<T*>(s_cumi + 2 * TC_J);
    T* s_xj = s_b + TC_J * ldn;  // x_j, unscaled
    T* s_ci = s_xj + TC_J * ldpx;  // [2][TC_J][ldn]
    T* s_gi = s_ci + 2 * TC_J * ldn;
    T* s_own = s_ci;  // [P][ldn], before the loop over targets

    const int c = blockIdx.x / row_tiles, jt = blockIdx.x % row_tiles;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0), j0 = jt * TC_J, tid = threadIdx.x;
    if (j0 >= q_len) return;  // uniform over the block
    const int warp = tid / 32, lane = tid % 32, np = P / 8, nn = N / 8;
    const int vj = min(TC_J, q_len - j0);
    const float* cum_c = cum + ((long)bh * nc + c) * Q;
    const float cl = cum_c[q_len - 1];
    const T* xh = x + ((long)b * L + t0) * ldx + (long)h * P;
    const T* bg = Bm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* cg = Cm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* gy = dy + ((long)b * L + t0) * H * P + (long)h * P;
    const float* dt_h = dt + ((long)b * L + t0) * H + h;
    const T* b_w = s_b + warp * 16 * ldn;
    const T* xj_w = s_xj + warp * 16 * ldpx;
    auto issue_c = [&](int i0) {  // C_i and cum_i into buffer (tile index & 1)
        const int vi = min(TC_J, q_len - i0), buf = ((i0 - j0) / TC_J) & 1;
        copy_tile_async(s_ci + buf * TC_J * ldn, ldn, cg + (long)i0 * ldbc, ldbc, TC_J, vi, N,
                        tid, blockDim.x);
        if (tid < TC_J)
            cp_async4(s_cumi + buf * TC_J + tid, cum_c + (tid < vi ? i0 + tid : 0), tid < vi);
        cp_async_commit();
    };
    auto issue_g = [&](int i0) {
        copy_tile_async(s_gi, ldpx, gy + (long)i0 * H * P, (long)H * P, TC_J,
                        min(TC_J, q_len - i0), P, tid, blockDim.x);
        cp_async_commit();
    };

    issue_g(j0);
    copy_tile(s_b, ldn, bg + (long)j0 * ldbc, ldbc, TC_J, vj, N, tid, blockDim.x);
    copy_tile(s_xj, ldpx, xh + (long)j0 * ldx, ldx, TC_J, vj, P, tid, blockDim.x);
    if (tid < TC_J) {
        s_cumj[tid] = tid < vj ? cum_c[j0 + tid] : 0.0f;
        s_dtj[tid] = tid < vj ? dt_h[(long)(j0 + tid) * H] : 0.0f;
    }
    load_state(s_own, ldn, down + ((long)bh * nc + c) * P * N, P, N, tid);
    __syncthreads();

    // This lane's two source rows (block-local) and their weights through the state after the
    // chunk, w_j = exp(cl - cum_j).
    int jl[2];
    float cj[2], wj[2], dtr[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        jl[rr] = warp * 16 + frag_row(lane, 2 * rr);
        cj[rr] = s_cumj[jl[rr]];
        wj[rr] = jl[rr] < vj ? decay_exp(cl - cj[rr]) : 0.0f;
        dtr[rr] = s_dtj[jl[rr]];
    }

    // Through the state after the chunk: dXd = w_j B_j dOwn^T, dB = w_j dt_j x_j dOwn; V_j =
    // dt_j x_j . dXd_j.
    float ax[F8][4], ab[F8][4];
    frag_zero(ax);
    frag_zero(ab);
    mma_abt<T, F8>(ax, b_w, ldn, s_own, ldn, N, np);
    mma_ab<T, F8>(ab, xj_w, ldpx, s_own, ldn, P, nn);
    float vdot[2] = {0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < F8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            ax[t][e] *= wj[e >> 1];
            ab[t][e] *= wj[e >> 1] * dtr[e >> 1];
            if (t < np)
                vdot[e >> 1] += ax[t][e] * dtr[e >> 1] *
                                to_f32(s_xj[jl[e >> 1] * ldpx + 8 * t + frag_col(lane, e)]);
        }
    vdot[0] = quad_sum(vdot[0]);
    vdot[1] = quad_sum(vdot[1]);
    {
        const float vsum = warp_sum((lane & 3) == 0 ? vdot[0] + vdot[1] : 0.0f);
        if (lane == 0 && vsum != 0.0f) atomicAdd(dcl + (long)bh * nc + c, vsum);
    }
    __syncthreads();  // dOwn is consumed
    issue_c(j0);

    // Targets i >= j, tile by tile from this block's own.
    float tsum[2] = {0.0f, 0.0f};  // sum_i T_ij over this lane's columns
    for (int i0 = j0; i0 < q_len; i0 += TC_J) {
        const int vi = min(TC_J, q_len - i0), buf = ((i0 - j0) / TC_J) & 1;
        const bool more = i0 + TC_J < q_len;
        const T* ci_t = s_ci + buf * TC_J * ldn;
        const float* cumi = s_cumi + buf * TC_J;
        if (i0 == j0)
            cp_async_wait<0>();
        else
            cp_async_wait<1>();  // C_i (g_i, committed after it, may be in flight)
        __syncthreads();
        if (more) issue_c(i0 + TC_J);  // the other buffer: read last in the previous tile

        // M^T strip (B_j . C_i) exp(cum_i - cum_j), causal, kept as A fragments (pm) for
        // dXd += M^T g_i and for T_ij below. On the diagonal tile the warp's sources see only
        // targets from 16 warp on.
        const int q_beg = i0 == j0 ? warp : 0;
        float sc[TC_J / 8][4];
        frag_zero(sc);
        mma_abt<T, TC_J / 8>(sc, b_w, ldn, ci_t, ldn, N, TC_J / 8, 2 * q_beg);
        uint32_t pm[TC_J / 16][4];
        if (more)
            cp_async_wait<1>();  // g_i
        else
            cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int q = 0; q < TC_J / 16; ++q) {
            if (q < q_beg) continue;
#pragma unroll
            for (int t = 2 * q; t < 2 * q + 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ii = 8 * t + frag_col(lane, e);
                    sc[t][e] = (j0 + jl[e >> 1] <= i0 + ii && ii < vi)
                                   ? sc[t][e] * decay_exp_fast(cumi[ii] - cj[e >> 1])
                                   : 0.0f;
                }
            frag_to_a<T>(sc, q, pm[q]);
            mma_pb<T, F8>(ax, pm[q], s_gi + 16 * q * ldpx, ldpx, np);
        }

        // dM^T strip dt_j x_j . g_i; then g_i is free for the next tile.
        frag_zero(sc);
        mma_abt<T, TC_J / 8>(sc, xj_w, ldpx, s_gi, ldpx, P, TC_J / 8, 2 * q_beg);
        if (more) {
            __syncthreads();  // every warp has read g_i
            issue_g(i0 + TC_J);
        }
        // T_ij = M_ij dM_ij (M as rounded above); dB += (dM o E)^T C_i.
#pragma unroll
        for (int q = 0; q < TC_J / 16; ++q) {
            if (q < q_beg) continue;
#pragma unroll
            for (int t = 2 * q; t < 2 * q + 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ii = 8 * t + frag_col(lane, e);
                    const float2 m2 = unpack2<T>(pm[q][2 * (t & 1) + (e >> 1)]);
                    const float dm = sc[t][e] * dtr[e >> 1];
                    tsum[e >> 1] += ((e & 1) ? m2.y : m2.x) * dm;
                    sc[t][e] = (j0 + jl[e >> 1] <= i0 + ii && ii < vi)
                                   ? dm * decay_exp_fast(cumi[ii] - cj[e >> 1])
                                   : 0.0f;
                }
            uint32_t a[4];
            frag_to_a<T>(sc, q, a);
            mma_pb<T, F8>(ab, a, ci_t + 16 * q * ldn, ldn, nn);
        }
    }
    tsum[0] = quad_sum(tsum[0]);
    tsum[1] = quad_sum(tsum[1]);

    // dx = dt dXd + D g, the x . dXd part of ddt, the source side of dcum, dB.
    const float d = D ? D[h] : 0.0f;
    bool ok[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        ok[rr] = jl[rr] < vj;
        const int j = j0 + jl[rr];
        float xdot = 0.0f;
        if (ok[rr]) {
            const float dtj = s_dtj[jl[rr]];
#pragma unroll
            for (int t = 0; t < F8; ++t)
                if (t < np) {
                    const int p = 8 * t + frag_col(lane, 0);
                    const float2 xv =
                        unpack2<T>(*reinterpret_cast<const uint32_t*>(xh + (long)j * ldx + p));
                    const float2 gv = unpack2<T>(
                        *reinterpret_cast<const uint32_t*>(gy + (long)j * H * P + p));
                    const float a0 = ax[t][2 * rr], a1 = ax[t][2 * rr + 1];
                    xdot += xv.x * a0 + xv.y * a1;
                    *reinterpret_cast<uint32_t*>(dx + ((long)b * L + t0 + j) * ld_dx +
                                                 (long)h * P + p) =
                        pack2<T>(dtj * a0 + d * gv.x, dtj * a1 + d * gv.y);
                }
        }
        xdot = quad_sum(xdot);
        if (ok[rr] && (lane & 3) == 0) {
            ddt[((long)b * L + t0 + j) * H + h] = xdot;
            dcum_src[((long)bh * nc + c) * Q + j] = -tsum[rr] - vdot[rr];
        }
    }
    const long row0 = (long)b * L + t0 + j0 + warp * 16;  // the warp strip's first row
    store_frag_rows<T, F8>(ab, nn, lane, ok, db_t ? db_t + row0 * ld_dbc + (long)g * N : nullptr,
                           ld_dbc, db_f ? db_f + (row0 * G + g) * N : nullptr, (long)G * N);
}

// 3b. Per (batch, head, chunk, 64 target rows i): dC, the target side of dcum, dD; loop over
//      source tiles j <= i (end tile B_j with cum_j and dt_j, middle tile x_j: dM_ij = dt_j
//      g_i . x_j, the dt_j applied in registers).
template <typename T, int F8>
__device__ __forceinline__ void bwd_dc(
    const T* __restrict__ x, long ldx, const float* __restrict__ dt, const float* __restrict__ cum,
    const T* __restrict__ Bm, const T* __restrict__ Cm, long ldbc, const T* __restrict__ dy,
    const float* __restrict__ states, T* __restrict__ dc_t, float* __restrict__ dc_f, long ld_dbc,
    float* __restrict__ dcum_dst, float* __restrict__ dd, int L, int H, int G, int P, int N,
    int Q, int nc, int row_tiles) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int ldn = N + TC_PAD, ldpx = P + TC_PAD;
    float* s_cumi = reinterpret_cast<float*>(smem_raw);
    float* s_cumj = s_cumi + TC_ROWS;  // [2][TC_J]
    float* s_dtj = s_cumj + 2 * TC_J;  // [2][TC_J]
    T* s_ci = reinterpret_cast<T*>(s_dtj + 2 * TC_J);
    T* s_gi = s_ci + TC_ROWS * ldn;
    T* s_b = s_gi + TC_ROWS * ldpx;  // [2][TC_J][ldn]
    T* s_x = s_b + 2 * TC_J * ldn;
    T* s_s = s_b;  // [P][ldn], S before the loop over sources

    const int c = blockIdx.x / row_tiles, it = blockIdx.x % row_tiles;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0), i0 = it * TC_ROWS, tid = threadIdx.x;
    if (i0 >= q_len) return;  // uniform over the block
    const int warp = tid / 32, lane = tid % 32, nn = N / 8;
    const int vi = min(TC_ROWS, q_len - i0);
    const float* cum_c = cum + ((long)bh * nc + c) * Q;
    const T* xh = x + ((long)b * L + t0) * ldx + (long)h * P;
    const T* bg = Bm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* cg = Cm + ((long)b * L + t0) * ldbc + (long)g * N;
    const T* gy = dy + ((long)b * L + t0) * H * P + (long)h * P;
    const float* dt_h = dt + ((long)b * L + t0) * H + h;
    const T* c_w = s_ci + warp * 16 * ldn;
    const T* g_w = s_gi + warp * 16 * ldpx;
    const int j_end = min(q_len, i0 + TC_ROWS);
    auto issue_b = [&](int j0) {  // B_j, cum_j, dt_j into buffer (tile index & 1)
        const int vj = min(TC_J, q_len - j0), buf = (j0 / TC_J) & 1;
        copy_tile_async(s_b + buf * TC_J * ldn, ldn, bg + (long)j0 * ldbc, ldbc, TC_J, vj, N, tid,
                        blockDim.x);
        if (tid < TC_J) {
            const bool ok = tid < vj;
            cp_async4(s_cumj + buf * TC_J + tid, cum_c + (ok ? j0 + tid : 0), ok);
            cp_async4(s_dtj + buf * TC_J + tid, dt_h + (ok ? (long)(j0 + tid) * H : 0), ok);
        }
        cp_async_commit();
    };
    auto issue_x = [&](int j0) {
        copy_tile_async(s_x, ldpx, xh + (long)j0 * ldx, ldx, TC_J, min(TC_J, q_len - j0), P, tid,
                        blockDim.x);
        cp_async_commit();
    };

    issue_x(0);
    copy_tile(s_ci, ldn, cg + (long)i0 * ldbc, ldbc, TC_ROWS, vi, N, tid, blockDim.x);
    copy_tile(s_gi, ldpx, gy + (long)i0 * H * P, (long)H * P, TC_ROWS, vi, P, tid, blockDim.x);
    if (tid < TC_ROWS) s_cumi[tid] = tid < vi ? cum_c[i0 + tid] : 0.0f;
    load_state(s_s, ldn, states + ((long)bh * nc + c) * P * N, P, N, tid);
    __syncthreads();

    int il[2];
    float ci[2], wi[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        il[rr] = warp * 16 + frag_row(lane, 2 * rr);
        ci[rr] = s_cumi[il[rr]];
        wi[rr] = il[rr] < vi ? decay_exp(ci[rr]) : 0.0f;
    }

    // Through the state before the chunk: dC = exp(cum_i) g_i S, U_i = C_i . dC_i.
    float ac[F8][4];
    frag_zero(ac);
    mma_ab<T, F8>(ac, g_w, ldpx, s_s, ldn, P, nn);
    float udot[2] = {0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < F8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            ac[t][e] *= wi[e >> 1];
            if (t < nn)
                udot[e >> 1] += ac[t][e] *
                                to_f32(s_ci[il[e >> 1] * ldn + 8 * t + frag_col(lane, e)]);
        }
    __syncthreads();  // S is consumed
    issue_b(0);

    // dD: g_i . x_i over the warp's rows (lane: half a row).
    {
        const int r = ROW_OF(lane), irow = warp * 16 + r;
        float gx = 0.0f;
        if (irow < vi) {
            const int half = P / 2, p0 = HALF_OF(lane) * half;
            for (int k = 0; k < half; k += 8) {
                float xv[8], gv[8];
                unpack8<T>(*reinterpret_cast<const uint4*>(xh + (long)(i0 + irow) * ldx + p0 + k),
                           xv);
                unpack8<T>(*reinterpret_cast<const uint4*>(g_w + r * ldpx + p0 + k), gv);
#pragma unroll
                for (int q = 0; q < 8; ++q) gx += xv[q] * gv[q];
            }
        }
        gx = warp_sum(gx);
        if (lane == 0 && dd && gx != 0.0f) atomicAdd(dd + h, gx);
    }

    float tsum[2] = {0.0f, 0.0f};  // sum_j T_ij over this lane's columns
    for (int j0 = 0; j0 < j_end; j0 += TC_J) {
        const int vj = min(TC_J, q_len - j0), buf = (j0 / TC_J) & 1;
        const bool more = j0 + TC_J < j_end;
        const T* b_t = s_b + buf * TC_J * ldn;
        const float* cumj = s_cumj + buf * TC_J;
        const float* dtj = s_dtj + buf * TC_J;
        if (j0 == 0)
            cp_async_wait<0>();
        else
            cp_async_wait<1>();  // B_j (x_j, committed after it, may be in flight)
        __syncthreads();
        if (more) issue_b(j0 + TC_J);  // the other buffer: read last in the previous tile

        // M strip (C_i . B_j) exp(cum_i - cum_j), causal, rounded to T (for T_ij). On the
        // diagonal tile the warp's targets see only its first 16 (warp + 1) sources.
        const int q_end = j0 == i0 ? warp + 1 : TC_J / 16;
        float sc[TC_J / 8][4];
        frag_zero(sc);
        mma_abt<T, TC_J / 8>(sc, c_w, ldn, b_t, ldn, N, 2 * q_end);
        uint32_t pm[TC_J / 16][4];
#pragma unroll
        for (int t = 0; t < TC_J / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int jj = 8 * t + frag_col(lane, e);
                sc[t][e] = (j0 + jj <= i0 + il[e >> 1] && il[e >> 1] < vi && jj < vj)
                               ? sc[t][e] * decay_exp_fast(ci[e >> 1] - cumj[jj])
                               : 0.0f;
            }
#pragma unroll
        for (int q = 0; q < TC_J / 16; ++q) frag_to_a<T>(sc, q, pm[q]);

        // dM strip dt_j g_i . x_j; then x_j is free for the next tile.
        if (more)
            cp_async_wait<1>();  // x_j
        else
            cp_async_wait<0>();
        __syncthreads();
        frag_zero(sc);
        mma_abt<T, TC_J / 8>(sc, g_w, ldpx, s_x, ldpx, P, 2 * q_end);
        if (more) {
            __syncthreads();  // every warp has read x_j
            issue_x(j0 + TC_J);
        }
        // T_ij = M_ij dM_ij; dC += (dM o E) B_j.
#pragma unroll
        for (int q = 0; q < TC_J / 16; ++q) {
            if (q >= q_end) break;
#pragma unroll
            for (int t = 2 * q; t < 2 * q + 2; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int jj = 8 * t + frag_col(lane, e);
                    const float2 m2 = unpack2<T>(pm[q][2 * (t & 1) + (e >> 1)]);
                    const float dm = sc[t][e] * dtj[jj];
                    tsum[e >> 1] += ((e & 1) ? m2.y : m2.x) * dm;
                    sc[t][e] = (j0 + jj <= i0 + il[e >> 1] && il[e >> 1] < vi && jj < vj)
                                   ? dm * decay_exp_fast(ci[e >> 1] - cumj[jj])
                                   : 0.0f;
                }
            uint32_t a[4];
            frag_to_a<T>(sc, q, a);
            mma_pb<T, F8>(ac, a, b_t + 16 * q * ldn, ldn, nn);
        }
    }

    bool ok[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        ok[rr] = il[rr] < vi;
        const float tot = quad_sum(tsum[rr]) + quad_sum(udot[rr]);
        if (ok[rr] && (lane & 3) == 0)
            dcum_dst[((long)bh * nc + c) * Q + i0 + il[rr]] = tot;
    }
    const long row0 = (long)b * L + t0 + i0 + warp * 16;
    store_frag_rows<T, F8>(ac, nn, lane, ok, dc_t ? dc_t + row0 * ld_dbc + (long)g * N : nullptr,
                           ld_dbc, dc_f ? dc_f + (row0 * G + g) * N : nullptr, (long)G * N);
}

// ---------------------------------------------------------------------------------------------
// 4. dcum -> ddA by a reverse cumsum per chunk; ddt += A ddA, dA += sum dt ddA. Grid (nc, B*H),
//    one warp.
extern "C" __global__ void mamba2_ssd_bwd_dcum(const float* __restrict__ dcum_src,
                                               const float* __restrict__ dcum_dst,
                                               const float* __restrict__ dcl,
                                               const float* __restrict__ dt,
                                               const float* __restrict__ A,
                                               float* __restrict__ ddt, float* __restrict__ da,
                                               int L, int H, int Q, int nc) {
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, lane = threadIdx.x;
    const int t0 = c * Q, q_len = min(Q, L - t0);
    const long base_c = ((long)bh * nc + c) * Q;
    const float a = A[h], last = dcl[(long)bh * nc + c];
    float carry = 0.0f, dapart = 0.0f;
    for (int base = ((q_len - 1) / 32) * 32; base >= 0; base -= 32) {
        const int i = base + lane;
        float v = 0.0f;
        if (i < q_len) v = dcum_src[base_c + i] + dcum_dst[base_c + i] + (i == q_len - 1 ? last : 0.0f);
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {  // inclusive suffix sum over the 32 lanes
            const float n = __shfl_down_sync(0xffffffffu, v, off);
            if (lane + off < 32) v += n;
        }
        v += carry;
        carry = __shfl_sync(0xffffffffu, v, 0);
        if (i < q_len) {
            const long at = ((long)b * L + t0 + i) * H + h;
            ddt[at] += a * v;
            dapart += dt[at] * v;
        }
    }
    dapart = warp_sum(dapart);
    if (lane == 0 && dapart != 0.0f) atomicAdd(da + h, dapart);
}

#define SSD_BWD_ENTRY(T, S, F8)                                                                \
    extern "C" __global__ void __launch_bounds__(256) mamba2_ssd_bwd_dstates_##S##_f##F8(          \
        const T* __restrict__ dy, const float* __restrict__ cum, const T* __restrict__ Cm,          \
        long ldbc, float* __restrict__ ds, int L, int H, int G, int P, int N, int Q, int nc) {      \
        bwd_dstates<T, F8>(dy, cum, Cm, ldbc, ds, L, H, G, P, N, Q, nc);                            \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, 3) mamba2_ssd_bwd_dx_db_##S##_f##F8(         \
        const T* __restrict__ x, long ldx, const float* __restrict__ dt,                            \
        const float* __restrict__ cum, const T* __restrict__ Bm, const T* __restrict__ Cm,          \
        long ldbc, const T* __restrict__ dy, const float* __restrict__ down,                        \
        const float* __restrict__ D, T* __restrict__ dx, long ld_dx, T* __restrict__ db_t,          \
        float* __restrict__ db_f, long ld_dbc, float* __restrict__ ddt,                             \
        float* __restrict__ dcum_src, float* __restrict__ dcl, int L, int H, int G, int P, int N,   \
        int Q, int nc, int row_tiles) {                                                             \
        bwd_dx_db<T, F8>(x, ldx, dt, cum, Bm, Cm, ldbc, dy, down, D, dx, ld_dx, db_t, db_f,     \
                             ld_dbc, ddt, dcum_src, dcl, L, H, G, P, N, Q, nc, row_tiles);          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, 3) mamba2_ssd_bwd_dc_##S##_f##F8(            \
        const T* __restrict__ x, long ldx, const float* __restrict__ dt,                            \
        const float* __restrict__ cum, const T* __restrict__ Bm, const T* __restrict__ Cm,          \
        long ldbc, const T* __restrict__ dy, const float* __restrict__ states,                      \
        T* __restrict__ dc_t, float* __restrict__ dc_f, long ld_dbc, float* __restrict__ dcum_dst,  \
        float* __restrict__ dd, int L, int H, int G, int P, int N, int Q, int nc, int row_tiles) {  \
        bwd_dc<T, F8>(x, ldx, dt, cum, Bm, Cm, ldbc, dy, states, dc_t, dc_f, ld_dbc, dcum_dst,  \
                          dd, L, H, G, P, N, Q, nc, row_tiles);                                     \
    }
// F8 = max(P, N) / 8 rounded up to {4, 8, 10, 16} (the Rust side picks the smallest that fits).
#define SSD_BWD_ENTRIES(T, S)                                                                  \
    SSD_BWD_ENTRY(T, S, 4) SSD_BWD_ENTRY(T, S, 8) SSD_BWD_ENTRY(T, S, 10)             \
    SSD_BWD_ENTRY(T, S, 16)
SSD_BWD_ENTRIES(__half, f16)
SSD_BWD_ENTRIES(__nv_bfloat16, bf16)

// The gate's backward, y = ypre * silu(z): dypre = dy silu(z), dz = dy ypre silu'(z); 8
// elements a thread (n % 8 == 0).
#define SSD_GATE_ENTRY(T, S)                                                                       \
    extern "C" __global__ void mamba2_ssd_bwd_gate_##S(                                            \
        const T* __restrict__ dy, const T* __restrict__ z, const T* __restrict__ ypre,              \
        T* __restrict__ dypre, T* __restrict__ dz, long n) {                                        \
        const long e = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;                           \
        if (e >= n) return;                                                                         \
        float g[8], zv[8], yv[8], o1[8], o2[8];                                                     \
        unpack8<T>(*reinterpret_cast<const uint4*>(dy + e), g);                                     \
        unpack8<T>(*reinterpret_cast<const uint4*>(z + e), zv);                                     \
        unpack8<T>(*reinterpret_cast<const uint4*>(ypre + e), yv);                                  \
        _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                            \
            const float s = 1.0f / (1.0f + expf(-zv[k]));                                           \
            o1[k] = g[k] * zv[k] * s;                                                               \
            o2[k] = g[k] * yv[k] * s * (1.0f + zv[k] * (1.0f - s));                                 \
        }                                                                                           \
        *reinterpret_cast<uint4*>(dypre + e) = pack8<T>(o1);                                        \
        *reinterpret_cast<uint4*>(dz + e) = pack8<T>(o2);                                           \
    }
SSD_GATE_ENTRY(__half, f16)
SSD_GATE_ENTRY(__nv_bfloat16, bf16)

// f32 scratch [rows][cols] (the group-summed dB or dC) to T rows `ld` apart.
#define SSD_CAST_ENTRY(T, S)                                                                       \
    extern "C" __global__ void mamba2_ssd_bwd_cast_##S(const float* __restrict__ src,              \
                                                       T* __restrict__ dst, long ld, int rows,      \
                                                       int cols) {                                  \
        const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;                                 \
        if (e >= (long)rows * cols) return;                                                         \
        dst[(e / cols) * ld + e % cols] = from_f32<T>(src[e]);                                      \
    }
SSD_CAST_ENTRY(__half, f16)
SSD_CAST_ENTRY(__nv_bfloat16, bf16)
