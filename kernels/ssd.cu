// The SSD scan of Mamba-2 (Dao & Gu 2024) in three passes, plus the one-token state update.
//
// Per head h (group g = h / (H / G)), with cum_i = sum_{j <= i} dt_j A_h inside a chunk:
//   S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T     (S: [P, N], f32)
//   y_t = S_t C_t + D_h x_t, then y_t *= silu(z_t) if a gate is given.
// The chunked form (same algebra as ssd::chunked in src/model/mamba2/ssd.rs):
//   1. mamba2_ssd_chunk_state: per (batch, head, chunk): cum (written out for pass 3) and the
//      chunk's own contribution to the state at its end, sum_j exp(cum_last - cum_j) dt_j x_j B_j^T;
//   2. mamba2_ssd_state_passing: per (batch, head), a short recurrence over the chunk ends,
//      S_c = exp(cum_last_c) S_{c-1} + s_c, replacing each chunk's contribution by the state
//      before the chunk (in place) and writing the final state;
//   3. mamba2_ssd_chunk_scan: per (batch, head, chunk, block of 32 rows):
//      y_i = exp(cum_i) S_start C_i + sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j,
//      then D skip and gate; only the causal lower triangle of C B^T is computed.
// Layouts (contiguous): x, z, y [B, L, H, P]; dt [B, L, H] f32; A, D [H] f32; B, C [B, L, G, N];
// states [B, H, P, N] f32. A chunk holds Q = min(chunk_size, L) steps; the last may be shorter
// (the generic path pads it with dt = 0, i.e. decay 1 and no input: the same result).
//
// This first landing is plain SIMT f32 arithmetic with shared-memory tiles (no tensor cores):
// correct for P, N <= 128 and Q <= 1024, which the Rust side checks before it picks the kernel.
#include "common.cuh"

#define JT 32   // time steps per shared-memory tile
#define RT 32   // output rows per chunk-scan block
#define NTHREADS 256

// ---------------------------------------------------------------------------------------------
// 1. chunk cumsum + per-chunk states. Grid (nc, B*H), NTHREADS threads; dynamic shared memory
//    (2 Q + JT (P + N)) floats.
template <typename T>
__device__ __forceinline__ void chunk_state(const T* __restrict__ x, const float* __restrict__ dt,
                                            const float* __restrict__ A, const T* __restrict__ Bm,
                                            float* __restrict__ cum_out,  // [B*H, nc, Q]
                                            float* __restrict__ states,   // [B*H, nc, P, N]
                                            int L, int H, int G, int P, int N, int Q, int nc) {
    extern __shared__ float smem[];
    float* s_cum = smem;
    float* s_w = s_cum + Q;     // dt_j exp(cum_last - cum_j)
    float* s_x = s_w + Q;       // [JT][P]: w_j x_j
    float* s_b = s_x + JT * P;  // [JT][N]
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0), tid = threadIdx.x;

    chunk_cumsum_weights(dt, A[h], cum_out + ((long)bh * nc + c) * Q, s_cum, s_w,
                         ((long)b * L + t0) * H + h, H, q_len);

    // Thread (tp, tn) owns state entries p = tp + 16 a, n = tn + 16 bb.
    const int tp = tid % 16, tn = tid / 16;
    const int ap = (P + 15) / 16, an = (N + 15) / 16;
    float acc[8][8];
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int bb = 0; bb < 8; ++bb) acc[a][bb] = 0.0f;

    for (int j0 = 0; j0 < q_len; j0 += JT) {
        for (int e = tid; e < JT * P; e += NTHREADS) {
            const int jj = e / P, p = e % P, j = j0 + jj;
            float v = 0.0f;
            if (j < q_len)
                v = to_f32(x[(((long)b * L + t0 + j) * H + h) * P + p]) * s_w[j];
            s_x[e] = v;
        }
        for (int e = tid; e < JT * N; e += NTHREADS) {
            const int jj = e / N, n = e % N, j = j0 + jj;
            s_b[e] = j < q_len ? to_f32(Bm[(((long)b * L + t0 + j) * G + g) * N + n]) : 0.0f;
        }
        __syncthreads();
        const int jn = min(JT, q_len - j0);
        for (int jj = 0; jj < jn; ++jj) {
            float xv[8], bv[8];
#pragma unroll
            for (int a = 0; a < 8; ++a) {
                const int p = tp + 16 * a;
                xv[a] = (a < ap && p < P) ? s_x[jj * P + p] : 0.0f;
            }
#pragma unroll
            for (int bb = 0; bb < 8; ++bb) {
                const int n = tn + 16 * bb;
                bv[bb] = (bb < an && n < N) ? s_b[jj * N + n] : 0.0f;
            }
#pragma unroll
            for (int a = 0; a < 8; ++a) {
                if (a < ap) {
#pragma unroll
                    for (int bb = 0; bb < 8; ++bb)
                        if (bb < an) acc[a][bb] += xv[a] * bv[bb];
                }
            }
        }
        __syncthreads();
    }
    float* out = states + ((long)bh * nc + c) * P * N;
#pragma unroll
    for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int bb = 0; bb < 8; ++bb) {
            const int p = tp + 16 * a, n = tn + 16 * bb;
            if (a < ap && bb < an && p < P && n < N) out[p * N + n] = acc[a][bb];
        }
}

// ---------------------------------------------------------------------------------------------
// 2. state passing. Grid (ceil(P N / NTHREADS), B*H). `initial` [B*H, P*N] or null.
extern "C" __global__ void mamba2_ssd_state_passing(float* __restrict__ states,
                                                    const float* __restrict__ cum,
                                                    const float* __restrict__ initial,
                                                    float* __restrict__ final_state, int nc, int Q,
                                                    int L, int PN) {
    const int e = blockIdx.x * NTHREADS + threadIdx.x, bh = blockIdx.y;
    if (e >= PN) return;
    float s = initial ? initial[(long)bh * PN + e] : 0.0f;
    // Four chunks at a time, their loads issued before any store: the recurrence is serial, the
    // memory latency need not be.
    for (int c0 = 0; c0 < nc; c0 += 4) {
        float own[4], decay[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int c = c0 + k;
            if (c < nc) {
                const int q_len = min(Q, L - c * Q);
                decay[k] = decay_exp(cum[((long)bh * nc + c) * Q + q_len - 1]);
                own[k] = states[((long)bh * nc + c) * PN + e];
            }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int c = c0 + k;
            if (c < nc) {
                states[((long)bh * nc + c) * PN + e] = s;  // the state before chunk c
                s = decay[k] * s + own[k];
            }
        }
    }
    final_state[(long)bh * PN + e] = s;
}

// ---------------------------------------------------------------------------------------------
// 3. chunk scan. Grid (nc * row_tiles, B*H), NTHREADS threads; dynamic shared memory
//    (RT N + JT NB + JT P + RT (JT + 1) + RT + JT) floats, NB = N rounded up to odd.
template <typename T>
__device__ __forceinline__ void chunk_scan(const T* __restrict__ x, const float* __restrict__ dt,
                                           const float* __restrict__ cum, const T* __restrict__ Bm,
                                           const T* __restrict__ Cm,
                                           const float* __restrict__ starts,  // [B*H, nc, P, N]
                                           const float* __restrict__ D, const T* __restrict__ z,
                                           T* __restrict__ y, int L, int H, int G, int P, int N,
                                           int Q, int nc, int row_tiles) {
    extern __shared__ float smem[];
    const int NB = N | 1;  // odd row stride: the score loop reads B rows across the warp
    float* s_c = smem;              // [RT][N]
    float* s_b = s_c + RT * N;      // [JT][NB]
    float* s_x = s_b + JT * NB;     // [JT][P]: dt_j x_j, or a transposed tile of S_start
    float* s_s = s_x + JT * P;      // [RT][JT + 1] scores
    float* s_cumr = s_s + RT * (JT + 1);
    float* s_cumj = s_cumr + RT;
    const int c = blockIdx.x / row_tiles, rt = blockIdx.x % row_tiles;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, g = h / (H / G);
    const int t0 = c * Q, q_len = min(Q, L - t0), i0 = rt * RT, tid = threadIdx.x;
    if (i0 >= q_len) return;  // uniform over the block
    const float* cum_c = cum + ((long)bh * nc + c) * Q;

    for (int e = tid; e < RT * N; e += NTHREADS) {
        const int r = e / N, n = e % N, i = i0 + r;
        s_c[e] = i < q_len ? to_f32(Cm[(((long)b * L + t0 + i) * G + g) * N + n]) : 0.0f;
    }
    if (tid < RT) s_cumr[tid] = i0 + tid < q_len ? cum_c[i0 + tid] : 0.0f;

    // Thread (r, pl) owns output row i0 + r, columns p = pl + 8 k.
    const int r = tid / 8, pl = tid % 8, kp = (P + 7) / 8;
    float acc[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) acc[k] = 0.0f;

    // From the state before the chunk: exp(cum_i) S_start C_i, S_start staged N-tile by N-tile.
    const float* S = starts + ((long)bh * nc + c) * P * N;
    for (int n0 = 0; n0 < N; n0 += JT) {
        __syncthreads();
        for (int e = tid; e < JT * P; e += NTHREADS) {
            const int p = e / JT, nn = e % JT, n = n0 + nn;
            s_x[nn * P + p] = n < N ? S[(long)p * N + n] : 0.0f;
        }
        __syncthreads();
        const int nn_len = min(JT, N - n0);
        for (int nn = 0; nn < nn_len; ++nn) {
            const float cv = s_c[r * N + n0 + nn];
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const int p = pl + 8 * k;
                if (k < kp && p < P) acc[k] += cv * s_x[nn * P + p];
            }
        }
    }
    {
        const float sc = decay_exp(s_cumr[r]);
#pragma unroll
        for (int k = 0; k < 16; ++k) acc[k] *= sc;
    }

    // Inside the chunk, causal: only source steps j < i0 + RT matter.
    const int j_end = min(q_len, i0 + RT);
    for (int j0 = 0; j0 < j_end; j0 += JT) {
        __syncthreads();
        for (int e = tid; e < JT * N; e += NTHREADS) {
            const int jj = e / N, n = e % N, j = j0 + jj;
            s_b[jj * NB + n] =
                j < q_len ? to_f32(Bm[(((long)b * L + t0 + j) * G + g) * N + n]) : 0.0f;
        }
        for (int e = tid; e < JT * P; e += NTHREADS) {
            const int jj = e / P, p = e % P, j = j0 + jj;
            float v = 0.0f;
            if (j < q_len)
                v = to_f32(x[(((long)b * L + t0 + j) * H + h) * P + p]) *
                    dt[((long)b * L + t0 + j) * H + h];
            s_x[e] = v;
        }
        if (tid < JT) s_cumj[tid] = j0 + tid < q_len ? cum_c[j0 + tid] : 0.0f;
        __syncthreads();
        for (int e = tid; e < RT * JT; e += NTHREADS) {
            const int rr = e / JT, jj = e % JT, i = i0 + rr, j = j0 + jj;
            float v = 0.0f;
            if (j <= i && i < q_len && j < q_len) {
                float dot = 0.0f;
                for (int n = 0; n < N; ++n) dot += s_c[rr * N + n] * s_b[jj * NB + n];
                v = dot * decay_exp(s_cumr[rr] - s_cumj[jj]);
            }
            s_s[rr * (JT + 1) + jj] = v;
        }
        __syncthreads();
        const int jn = min(JT, j_end - j0);
        for (int jj = 0; jj < jn; ++jj) {
            const float sv = s_s[r * (JT + 1) + jj];
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                const int p = pl + 8 * k;
                if (k < kp && p < P) acc[k] += sv * s_x[jj * P + p];
            }
        }
    }

    const int i = i0 + r;
    if (i < q_len) {
        const long base = (((long)b * L + t0 + i) * H + h) * P;
        const float d = D ? D[h] : 0.0f;
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const int p = pl + 8 * k;
            if (k < kp && p < P) {
                float v = acc[k] + d * to_f32(x[base + p]);
                if (z) v *= silu_f32(to_f32(z[base + p]));
                y[base + p] = from_f32<T>(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode: one token, the state updated in place. One warp per state row (b, h, p), the lanes
// striding over d_state so every load of the state is coalesced; the readout S C is a warp sum.
// x, z, y [B, H, P]; dt [B, H] f32; B, C [B, G, N]; state [B, H, P, N] f32.
template <typename T>
__device__ __forceinline__ void state_update(float* __restrict__ state, const T* __restrict__ x,
                                             const float* __restrict__ dt,
                                             const float* __restrict__ A, const T* __restrict__ Bm,
                                             const T* __restrict__ Cm, const float* __restrict__ D,
                                             const T* __restrict__ z, T* __restrict__ y, int Bsz,
                                             int H, int G, int P, int N) {
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (long)Bsz * H * P) return;  // uniform over the warp
    const int b = (int)(row / ((long)H * P)), h = (int)((row / P) % H), g = h / (H / G);
    const float dtv = dt[(long)b * H + h];
    const float decay = decay_exp(dtv * A[h]);
    const float xv = to_f32(x[row]);
    const float coef = dtv * xv;
    const T* Bg = Bm + ((long)b * G + g) * N;
    const T* Cg = Cm + ((long)b * G + g) * N;
    float* s = state + row * N;
    float acc = 0.0f;
#pragma unroll 4
    for (int n = lane; n < N; n += 32) {
        const float v = s[n] * decay + coef * to_f32(Bg[n]);
        s[n] = v;
        acc += v * to_f32(Cg[n]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        float v = acc + (D ? D[h] * xv : 0.0f);
        if (z) v *= silu_f32(to_f32(z[row]));
        y[row] = from_f32<T>(v);
    }
}

// Decode for d_state % 4 == 0, d_state <= 128 and head_dim % 8 == 0 (every Mamba-2 config):
// the same update, one warp per SU_ROWS state rows of one head, each active lane (N / 4 of them)
// moving 16 bytes of a row. The state is the only large operand (B * H * P * N f32, read and
// written once), so the kernel is a copy: a warp first issues every load it needs (its rows of
// the state, then the head's scalars, its 4 entries of B and C, the rows' x and z), and only
// then computes and stores, so enough bytes are in flight to approach the copy bandwidth.
#define SU_ROWS 8
template <typename T>
__device__ __forceinline__ void state_update_v4(float* __restrict__ state, const T* __restrict__ x,
                                                const float* __restrict__ dt,
                                                const float* __restrict__ A,
                                                const T* __restrict__ Bm, const T* __restrict__ Cm,
                                                const float* __restrict__ D,
                                                const T* __restrict__ z, T* __restrict__ y,
                                                int Bsz, int H, int G, int P, int N) {
    const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    const long rows = (long)Bsz * H * P, row0 = warp * SU_ROWS;
    if (row0 >= rows) return;  // uniform over the warp
    const bool active = lane < N / 4;
    float4 sv[SU_ROWS];
#pragma unroll
    for (int r = 0; r < SU_ROWS; ++r)
        if (active) sv[r] = __ldcs(reinterpret_cast<const float4*>(state + (row0 + r) * N) + lane);
    // P % SU_ROWS == 0 (the caller checks): the warp's rows share one (batch, head).
    const int b = (int)(row0 / ((long)H * P)), h = (int)((row0 / P) % H), g = h / (H / G);
    const float dtv = dt[(long)b * H + h], a = A[h], d = D ? D[h] : 0.0f;
    const long bc = ((long)b * G + g) * N + 4 * (active ? lane : 0);
    float bv[4], cv[4], xv[SU_ROWS], zv[SU_ROWS];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        bv[k] = to_f32(Bm[bc + k]);
        cv[k] = to_f32(Cm[bc + k]);
    }
#pragma unroll
    for (int r = 0; r < SU_ROWS; ++r) {
        xv[r] = to_f32(x[row0 + r]);
        zv[r] = z ? to_f32(z[row0 + r]) : 0.0f;
    }
    const float decay = decay_exp(dtv * a);
#pragma unroll
    for (int r = 0; r < SU_ROWS; ++r) {
        const long row = row0 + r;
        const float coef = dtv * xv[r];
        float acc = 0.0f;
        if (active) {
            float4 v = sv[r];
            v.x = v.x * decay + coef * bv[0];
            v.y = v.y * decay + coef * bv[1];
            v.z = v.z * decay + coef * bv[2];
            v.w = v.w * decay + coef * bv[3];
            __stcs(reinterpret_cast<float4*>(state + row * N) + lane, v);
            acc = v.x * cv[0] + v.y * cv[1] + v.z * cv[2] + v.w * cv[3];
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float o = acc + d * xv[r];
            if (z) o *= silu_f32(zv[r]);
            y[row] = from_f32<T>(o);
        }
    }
}

// dt = softplus(dt_raw + dt_bias), clamped to [lo, hi], as ssd::discretize_dt: [rows, H] f32 from
// dt_raw rows `s_row` elements apart (the dt columns of in_proj's output, read in place). One
// decode step's worth; the generic form is seven elementwise launches.
template <typename T>
__device__ __forceinline__ void dt_softplus(const T* __restrict__ dt_raw, long s_row,
                                            const float* __restrict__ bias, float* __restrict__ out,
                                            int rows, int H, float lo, float hi) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * H) return;
    const long r = i / H;
    const int h = (int)(i % H);
    const float v = to_f32(dt_raw[r * s_row + h]) + bias[h];
    const float sp = fmaxf(v, 0.0f) + logf(expf(-fabsf(v)) + 1.0f);
    out[i] = fminf(fmaxf(sp, lo), hi);
}

#define SSD_ENTRY(T, S)                                                                            \
    extern "C" __global__ void __launch_bounds__(NTHREADS)                                         \
        mamba2_ssd_chunk_state_##S(const T* x, const float* dt, const float* A, const T* Bm,        \
                                   float* cum_out, float* states, int L, int H, int G, int P,       \
                                   int N, int Q, int nc) {                                          \
        chunk_state<T>(x, dt, A, Bm, cum_out, states, L, H, G, P, N, Q, nc);                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(NTHREADS) mamba2_ssd_chunk_scan_##S(               \
        const T* x, const float* dt, const float* cum, const T* Bm, const T* Cm,                    \
        const float* starts, const float* D, const T* z, T* y, int L, int H, int G, int P, int N,   \
        int Q, int nc, int row_tiles) {                                                             \
        chunk_scan<T>(x, dt, cum, Bm, Cm, starts, D, z, y, L, H, G, P, N, Q, nc, row_tiles);        \
    }                                                                                               \
    extern "C" __global__ void mamba2_ssd_state_update_##S(                                         \
        float* state, const T* x, const float* dt, const float* A, const T* Bm, const T* Cm,        \
        const float* D, const T* z, T* y, int Bsz, int H, int G, int P, int N) {                    \
        state_update<T>(state, x, dt, A, Bm, Cm, D, z, y, Bsz, H, G, P, N);                         \
    }                                                                                               \
    extern "C" __global__ void mamba2_ssd_state_update_v4_##S(                                      \
        float* __restrict__ state, const T* __restrict__ x, const float* __restrict__ dt,           \
        const float* __restrict__ A, const T* __restrict__ Bm, const T* __restrict__ Cm,            \
        const float* __restrict__ D, const T* __restrict__ z, T* __restrict__ y, int Bsz, int H,    \
        int G, int P, int N) {                                                                      \
        state_update_v4<T>(state, x, dt, A, Bm, Cm, D, z, y, Bsz, H, G, P, N);                      \
    }                                                                                               \
    extern "C" __global__ void mamba2_dt_softplus_##S(const T* dt_raw, long s_row,                  \
                                                      const float* bias, float* out, int rows,      \
                                                      int H, float lo, float hi) {                  \
        dt_softplus<T>(dt_raw, s_row, bias, out, rows, H, lo, hi);                                  \
    }
FOR_EACH_DTYPE(SSD_ENTRY)
