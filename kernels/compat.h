// One header that maps the CUDA-only names the mHC kernels use onto HIP, so every kernels/*.cu
// compiles unchanged with nvcc (sm_90) and with clang -x hip (gfx942, gfx90a; HIP 5.2 headers).
//
// - mhc_bf16: the bf16 storage type (__nv_bfloat16 / hip_bfloat16), with mhc_bf16_to_f32 and
//   mhc_f32_to_bf16 (round to nearest even on both).
// - MHC_WAVE: lanes per warp/wave (32 on NVIDIA, 64 on AMD). Kernels size everything by it.
// - mhc_shfl_xor: butterfly shuffle over the whole warp/wave (HIP 5.2 has no *_sync shuffles).
#pragma once

#if defined(__HIP__) || defined(__HIPCC__)

#include <hip/hip_runtime.h>
#include <hip/hip_bfloat16.h>

typedef hip_bfloat16 mhc_bf16;
#define MHC_WAVE 64

__device__ __forceinline__ float mhc_bf16_to_f32(mhc_bf16 v) { return static_cast<float>(v); }
__device__ __forceinline__ mhc_bf16 mhc_f32_to_bf16(float v) { return mhc_bf16(v); }
__device__ __forceinline__ float mhc_shfl_xor(float v, int lane_mask) { return __shfl_xor(v, lane_mask); }

#else

#include <cuda_bf16.h>

typedef __nv_bfloat16 mhc_bf16;
#define MHC_WAVE 32

__device__ __forceinline__ float mhc_bf16_to_f32(mhc_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ mhc_bf16 mhc_f32_to_bf16(float v) { return __float2bfloat16_rn(v); }
// Every lane of the warp takes part in each shuffle the kernels issue.
__device__ __forceinline__ float mhc_shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(~0u, v, lane_mask);
}

#endif
