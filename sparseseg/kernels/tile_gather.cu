// Tile gather: cut a batch of network input tiles from a block resident on the GPU, applying
// reflect padding against the *volume* border (exactly numpy 'reflect' on the whole volume),
// per-channel normalization and the cast to the network's input dtype, in one pass.
//
// block:   (C, bz, by, bx) resident region whose origin in volume coordinates is (o0, o1, o2)
// offsets: (N, 3) tile input origins in volume coordinates (may be negative / past the end)
// out:     (N, C, tz, ty, tx)
// The host guarantees that every reflected coordinate lies inside the resident region.
#include "common.cuh"

template <typename T, typename O>
__device__ void gather(const T* __restrict__ block, O* __restrict__ out, const i64* __restrict__ offsets,
                       i64 C, i64 bz, i64 by, i64 bx, i64 o0, i64 o1, i64 o2, i64 vz, i64 vy, i64 vx,
                       i64 tz, i64 ty, i64 tx, const float* __restrict__ mean,
                       const float* __restrict__ inv_std, i64 total) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 x = i % tx, r = i / tx;
        i64 y = r % ty; r /= ty;
        i64 z = r % tz; r /= tz;
        i64 c = r % C, n = r / C;
        i64 gz = reflect_index(offsets[3 * n] + z, vz) - o0;
        i64 gy = reflect_index(offsets[3 * n + 1] + y, vy) - o1;
        i64 gx = reflect_index(offsets[3 * n + 2] + x, vx) - o2;
        float v = to_float(block[((c * bz + gz) * by + gy) * bx + gx]);
        store(out + i, __fmul_rn(__fsub_rn(v, mean[c]), inv_std[c]));
    }
}

#define GATHER(NAME, T, O)                                                                              \
    extern "C" __global__ void NAME(const T* block, O* out, const i64* offsets, i64 C, i64 bz, i64 by,   \
                                    i64 bx, i64 o0, i64 o1, i64 o2, i64 vz, i64 vy, i64 vx, i64 tz,     \
                                    i64 ty, i64 tx, const float* mean, const float* inv_std, i64 total) { \
        gather<T, O>(block, out, offsets, C, bz, by, bx, o0, o1, o2, vz, vy, vx, tz, ty, tx, mean,      \
                     inv_std, total);                                                                    \
    }

GATHER(gather_u8_f32, unsigned char, float)
GATHER(gather_u16_f32, unsigned short, float)
GATHER(gather_f32_f32, float, float)
GATHER(gather_u8_f16, unsigned char, __half)
GATHER(gather_u16_f16, unsigned short, __half)
GATHER(gather_f32_f16, float, __half)
