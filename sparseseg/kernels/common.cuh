// Shared helpers for sparseseg kernels. 64-bit indexing throughout: a resident block can exceed
// 2^31 elements (e.g. 3 x 1024^3).
#pragma once
#include <cuda_fp16.h>

typedef long long i64;

// numpy 'reflect' padding as an index map over an axis of length n: ... 2 1 | 0 1 .. n-1 | n-2 ...
__device__ __forceinline__ i64 reflect_index(i64 c, i64 n) {
    if (n == 1) return 0;
    i64 period = 2 * (n - 1);
    i64 m = c % period;
    if (m < 0) m += period;
    return m >= n ? period - m : m;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(unsigned char v) { return (float)v; }
__device__ __forceinline__ float to_float(unsigned short v) { return (float)v; }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
