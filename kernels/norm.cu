// Gated RMSNorm per group (upstream RMSNormGated, norm_before_gate = False), as
// norm::gated_rms_norm in src/model/mamba2/norm.rs:
//   v = y * silu(z);  out = v / sqrt(mean_group(v^2) + eps) * w,
// each group of `gs` consecutive channels normalised on its own. One warp per (row, group): the
// mixer's groups are small (80 channels for the Phi-2 hybrid), so a block per row would idle.
// y(row, c) = y[row * sy + c] and likewise z: z is a column slice of the in_proj output, read in
// place. out [rows, C] contiguous. z may be null (plain grouped RMSNorm).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void gated_norm(const T* __restrict__ y, long sy, const T* __restrict__ z,
                                           long sz, const float* __restrict__ w, T* __restrict__ out,
                                           int rows, int C, int gs, float eps) {
    const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32, groups = C / gs;
    if (warp >= (long)rows * groups) return;  // uniform over the warp
    const long row = warp / groups;
    const int c0 = (int)(warp % groups) * gs;
    const T* yr = y + row * sy + c0;
    const T* zr = z ? z + row * sz + c0 : nullptr;
    auto gated = [&](int e) {
        float v = to_f32(yr[e]);
        if (zr) v *= silu_f32(to_f32(zr[e]));
        return v;
    };
    float ss = 0.0f;
    for (int e = lane; e < gs; e += 32) {
        const float v = gated(e);
        ss += v * v;
    }
    const float inv = 1.0f / sqrtf(warp_sum(ss) / (float)gs + eps);
    T* o = out + row * C + c0;
    for (int e = lane; e < gs; e += 32) o[e] = from_f32<T>(gated(e) * inv * w[c0 + e]);
}

#define NORM_ENTRY(T, S)                                                                       \
    extern "C" __global__ void mamba2_gated_norm_##S(const T* y, long sy, const T* z, long sz,   \
                                                     const float* w, T* out, int rows, int C,   \
                                                     int gs, float eps) {                       \
        gated_norm<T>(y, sy, z, sz, w, out, rows, C, gs, eps);                                  \
    }
FOR_EACH_DTYPE(NORM_ENTRY)
