// The CUDA names the kernels use, defined for a host C++ compiler, so the .cu sources run on
// the CPU unchanged (sparseseg/kernels/host.py compiles and launches them; tests mark `host_kernels`).
// Each (block, thread) of the grid is one call of the kernel with blockIdx/threadIdx set for
// the calling OS thread, so the grid-stride loops and 64-bit index arithmetic run as written.
#pragma once
#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

static thread_local dim3 blockIdx, threadIdx;
static dim3 blockDim, gridDim;

extern "C" void host_set_dims(unsigned int grid, unsigned int block) {
    gridDim.x = grid;
    blockDim.x = block;
}

extern "C" void host_set_index(unsigned int block, unsigned int thread) {
    blockIdx.x = block;
    threadIdx.x = thread;
}

// IEEE binary16 with round-to-nearest-even conversions, as cuda_fp16.h's __half.
typedef _Float16 __half;
inline float __half2float(__half v) { return (float)v; }
inline __half __float2half_rn(float v) { return (__half)v; }

// Correctly rounded single operations; the library is built with -ffp-contract=off, so none
// of them is fused into an FMA, as the _rn intrinsics forbid on the GPU.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
