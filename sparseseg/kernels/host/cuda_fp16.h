// Host stand-in for CUDA's header: the kernels include it through common.cuh.
#pragma once
#include "host_cuda.h"
