// Reference: sparseseg.engine.tensor_ops.stitch_valid (offsets = dst, keep).
// Stitch for valid-padding networks: a batch of logits (N, K, oz, oy, ox) -> argmax uint8 labels
// written at each tile's offset in the block output (bz, by, bx), keeping only the first
// keep[n] voxels per axis (the crop of the overlap); optionally softmax probabilities quantized
// to uint8 (p * 255, rounded) into probs (K, bz, by, bx). Ties go to the lowest class, as
// numpy's argmax.
#include "common.cuh"

template <typename L>
__device__ void stitch(const L* __restrict__ logits, unsigned char* __restrict__ labels,
                       unsigned char* __restrict__ probs, const i64* __restrict__ dst,
                       const i64* __restrict__ keep, i64 K, i64 oz, i64 oy, i64 ox, i64 bz, i64 by, i64 bx,
                       i64 total) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 x = i % ox, r = i / ox;
        i64 y = r % oy; r /= oy;
        i64 z = r % oz;
        i64 n = r / oz;
        if (z >= keep[3 * n] || y >= keep[3 * n + 1] || x >= keep[3 * n + 2]) continue;
        i64 plane = oz * oy * ox;
        const L* l = logits + n * K * plane + (z * oy + y) * ox + x;
        float best = to_float(l[0]);
        int arg = 0;
        for (int k = 1; k < K; ++k) {
            float v = to_float(l[k * plane]);
            if (v > best) { best = v; arg = k; }
        }
        i64 o = ((dst[3 * n] + z) * by + (dst[3 * n + 1] + y)) * bx + (dst[3 * n + 2] + x);
        labels[o] = (unsigned char)arg;
        if (probs) {
            float sum = 0.f;
            for (int k = 0; k < K; ++k) sum += expf(to_float(l[k * plane]) - best);
            for (int k = 0; k < K; ++k)
                probs[k * bz * by * bx + o] =
                    (unsigned char)rintf(255.f * expf(to_float(l[k * plane]) - best) / sum);
        }
    }
}

extern "C" __global__ void stitch_valid_f32(const float* logits, unsigned char* labels, unsigned char* probs,
                                            const i64* dst, const i64* keep, i64 K, i64 oz, i64 oy, i64 ox,
                                            i64 bz, i64 by, i64 bx, i64 total) {
    stitch<float>(logits, labels, probs, dst, keep, K, oz, oy, ox, bz, by, bx, total);
}

extern "C" __global__ void stitch_valid_f16(const __half* logits, unsigned char* labels, unsigned char* probs,
                                            const i64* dst, const i64* keep, i64 K, i64 oz, i64 oy, i64 ox,
                                            i64 bz, i64 by, i64 bx, i64 total) {
    stitch<__half>(logits, labels, probs, dst, keep, K, oz, oy, ox, bz, by, bx, total);
}
