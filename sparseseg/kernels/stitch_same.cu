// Reference: sparseseg.engine.tensor_ops.accumulate_same / finalize_same.
// Stitch for same-padding networks: Gaussian-weighted accumulation of a batch of logits into a
// region accumulator, then a finalize pass (argmax and quantized probabilities).
//
// accumulate: one launch per tile (in batch order), one thread per voxel of that tile, so the
// work is the tile's size and overlapping tiles add in the CPU reference's order: deterministic;
// __fmul_rn/__fadd_rn forbid FMA contraction, so the float32 results are bit-identical to numpy's.
// logits: this tile's (K, tz, ty, tx); (p0, p1, p2) its offset in the region accumulator
// acc: (K, rz, ry, rx) float32, wsum: (rz, ry, rx) float32, weights: (tz, ty, tx) normalized.
#include "common.cuh"

template <typename L>
__device__ void accumulate(const L* __restrict__ logits, const float* __restrict__ weights, i64 p0, i64 p1,
                           i64 p2, i64 K, i64 tz, i64 ty, i64 tx, float* __restrict__ acc,
                           float* __restrict__ wsum, i64 rz, i64 ry, i64 rx) {
    i64 total = rz * ry * rx;
    i64 plane = tz * ty * tx;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < plane; t += (i64)gridDim.x * blockDim.x) {
        i64 lx = t % tx, r = t / tx;
        i64 ly = r % ty, lz = r / ty;
        i64 z = p0 + lz, y = p1 + ly, x = p2 + lx;
        if (z < 0 || y < 0 || x < 0 || z >= rz || y >= ry || x >= rx) continue;
        i64 i = (z * ry + y) * rx + x;
        float w = weights[t];
        for (i64 k = 0; k < K; ++k)
            acc[k * total + i] = __fadd_rn(acc[k * total + i], __fmul_rn(to_float(logits[k * plane + t]), w));
        wsum[i] = __fadd_rn(wsum[i], w);
    }
}

extern "C" __global__ void accumulate_f32(const float* logits, const float* weights, i64 p0, i64 p1, i64 p2, i64 K,
                                          i64 tz, i64 ty, i64 tx, float* acc, float* wsum, i64 rz, i64 ry, i64 rx) {
    accumulate<float>(logits, weights, p0, p1, p2, K, tz, ty, tx, acc, wsum, rz, ry, rx);
}

extern "C" __global__ void accumulate_f16(const __half* logits, const float* weights, i64 p0, i64 p1, i64 p2, i64 K,
                                          i64 tz, i64 ty, i64 tx, float* acc, float* wsum, i64 rz, i64 ry, i64 rx) {
    accumulate<__half>(logits, weights, p0, p1, p2, K, tz, ty, tx, acc, wsum, rz, ry, rx);
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
