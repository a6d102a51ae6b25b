// Reference: sparseseg.engine.tensor_ops.accumulate_same / finalize_same.
// Stitch for same-padding networks: Gaussian-weighted accumulation of a batch of logits into a
// region accumulator, then a finalize pass (argmax and quantized probabilities).
//
// accumulate: one thread per accumulator voxel loops over the batch's tiles in order, so the sum
// is deterministic and in the same order as the CPU reference; __fmul_rn/__fadd_rn forbid FMA
// contraction, so the float32 results are bit-identical to numpy's.
// acc: (K, rz, ry, rx) float32, wsum: (rz, ry, rx) float32, weights: (tz, ty, tx) normalized.
#include "common.cuh"

template <typename L>
__device__ void accumulate(const L* __restrict__ logits, const float* __restrict__ weights,
                           const i64* __restrict__ pos, i64 N, i64 K, i64 tz, i64 ty, i64 tx,
                           float* __restrict__ acc, float* __restrict__ wsum, i64 rz, i64 ry, i64 rx) {
    i64 total = rz * ry * rx;
    i64 plane = tz * ty * tx;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 x = i % rx, r = i / rx;
        i64 y = r % ry, z = r / ry;
        for (i64 n = 0; n < N; ++n) {
            i64 lz = z - pos[3 * n], ly = y - pos[3 * n + 1], lx = x - pos[3 * n + 2];
            if (lz < 0 || ly < 0 || lx < 0 || lz >= tz || ly >= ty || lx >= tx) continue;
            i64 t = (lz * ty + ly) * tx + lx;
            float w = weights[t];
            for (i64 k = 0; k < K; ++k)
                acc[k * total + i] = __fadd_rn(acc[k * total + i], __fmul_rn(to_float(logits[(n * K + k) * plane + t]), w));
            wsum[i] = __fadd_rn(wsum[i], w);
        }
    }
}

extern "C" __global__ void accumulate_f32(const float* logits, const float* weights, const i64* pos, i64 N, i64 K,
                                          i64 tz, i64 ty, i64 tx, float* acc, float* wsum, i64 rz, i64 ry, i64 rx) {
    accumulate<float>(logits, weights, pos, N, K, tz, ty, tx, acc, wsum, rz, ry, rx);
}

extern "C" __global__ void accumulate_f16(const __half* logits, const float* weights, const i64* pos, i64 N, i64 K,
                                          i64 tz, i64 ty, i64 tx, float* acc, float* wsum, i64 rz, i64 ry, i64 rx) {
    accumulate<__half>(logits, weights, pos, N, K, tz, ty, tx, acc, wsum, rz, ry, rx);
}

// finalize: blended = acc / wsum over the crop [c0, c0 + bz) x ... of the region; argmax labels
// (bz, by, bx) and optional uint8 probabilities (K, bz, by, bx).
extern "C" __global__ void finalize_same(const float* acc, const float* wsum, unsigned char* labels,
                                         unsigned char* probs, i64 K, i64 rz, i64 ry, i64 rx, i64 c0, i64 c1,
                                         i64 c2, i64 bz, i64 by, i64 bx) {
    i64 total = bz * by * bx, rtotal = rz * ry * rx;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 x = i % bx, r = i / bx;
        i64 y = r % by, z = r / by;
        i64 s = ((z + c0) * ry + (y + c1)) * rx + (x + c2);
        float w = wsum[s];
        float best = __fdiv_rn(acc[s], w);
        int arg = 0;
        for (int k = 1; k < K; ++k) {
            float v = __fdiv_rn(acc[k * rtotal + s], w);
            if (v > best) { best = v; arg = k; }
        }
        labels[i] = (unsigned char)arg;
        if (probs) {
            float sum = 0.f;
            for (int k = 0; k < K; ++k) sum += expf(__fdiv_rn(acc[k * rtotal + s], w) - best);
            for (int k = 0; k < K; ++k)
                probs[k * total + i] = (unsigned char)rintf(255.f * expf(__fdiv_rn(acc[k * rtotal + s], w) - best) / sum);
        }
    }
}
