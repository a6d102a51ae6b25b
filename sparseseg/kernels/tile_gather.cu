// Tile gather: cut a batch of network input tiles from a block's input region resident on the
// GPU, applying reflect padding against the *volume* border (exactly numpy 'reflect' on the whole
// volume), the optional normalization (clip to [lo, hi], then (x - mean) * inv_std, only when
// the engine's graph does not normalize) and the cast to the network's input dtype, in one pass.
// Reference: sparseseg.engine.tensor_ops.gather (same data, same float32 arithmetic).
//
// region:  (C, rz, ry, rx) resident input whose voxel [0,0,0] is volume voxel (r0, r1, r2)
// offsets: (N, 3) tile offsets in block-grid coordinates; the grid starts at volume voxel
//          (g0, g1, g2) (may be negative: the block's first output voxel minus the context)
// out:     (N, C, tz, ty, tx)
// mean/inv_std: per channel, or null (no normalization); lo/hi: per channel, or null (no clip).
// The host guarantees that every reflected coordinate lies inside the resident region.
#include "common.cuh"

template <typename T, typename O>
__device__ void gather(const T* __restrict__ region, O* __restrict__ out, const i64* __restrict__ offsets,
                       i64 C, i64 rz, i64 ry, i64 rx, i64 r0, i64 r1, i64 r2, i64 g0, i64 g1, i64 g2,
                       i64 vz, i64 vy, i64 vx, i64 tz, i64 ty, i64 tx, const float* __restrict__ mean,
                       const float* __restrict__ inv_std, const float* __restrict__ lo,
                       const float* __restrict__ hi, i64 total) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 x = i % tx, r = i / tx;
        i64 y = r % ty; r /= ty;
        i64 z = r % tz; r /= tz;
        i64 c = r % C, n = r / C;
        i64 gz = reflect_index(g0 + offsets[3 * n] + z, vz) - r0;
        i64 gy = reflect_index(g1 + offsets[3 * n + 1] + y, vy) - r1;
        i64 gx = reflect_index(g2 + offsets[3 * n + 2] + x, vx) - r2;
        float v = to_float(region[((c * rz + gz) * ry + gy) * rx + gx]);
        if (lo) v = fmaxf(fminf(v, hi[c]), lo[c]);
        if (mean) v = __fmul_rn(__fsub_rn(v, mean[c]), inv_std[c]);
        store(out + i, v);
    }
}

#define GATHER(NAME, T, O)                                                                              \
    extern "C" __global__ void NAME(const T* region, O* out, const i64* offsets, i64 C, i64 rz, i64 ry,  \
                                    i64 rx, i64 r0, i64 r1, i64 r2, i64 g0, i64 g1, i64 g2, i64 vz,     \
                                    i64 vy, i64 vx, i64 tz, i64 ty, i64 tx, const float* mean,          \
                                    const float* inv_std, const float* lo, const float* hi, i64 total) { \
        gather<T, O>(region, out, offsets, C, rz, ry, rx, r0, r1, r2, g0, g1, g2, vz, vy, vx, tz, ty, tx, \
                     mean, inv_std, lo, hi, total);                                                      \
    }

GATHER(gather_u8_f32, unsigned char, float)
GATHER(gather_u16_f32, unsigned short, float)
GATHER(gather_f32_f32, float, float)
GATHER(gather_u8_f16, unsigned char, __half)
GATHER(gather_u16_f16, unsigned short, __half)
GATHER(gather_f32_f16, float, __half)
