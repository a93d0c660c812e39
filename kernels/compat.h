// One header that maps the CUDA-only names the mHC kernels use onto HIP, so every kernels/*.cu
// compiles unchanged with nvcc (sm_90) and with clang -x hip (gfx942, gfx90a; HIP 5.2 headers).
//
// - mhc_bf16: the bf16 storage type (__nv_bfloat16 / hip_bfloat16), with mhc_bf16_to_f32 and
//   mhc_f32_to_bf16 (round to nearest even on both).
// - MHC_WAVE: lanes per warp/wave (32 on NVIDIA, 64 on AMD). Kernels size everything by it.
// - mhc_shfl_xor: butterfly shuffle over the whole warp/wave (HIP 5.2 has no *_sync shuffles).
// - mhc_copy16_async, mhc_copy4_async / mhc_copy_commit / mhc_copy_wait<N>: 16- and 4-byte
//   global-to-shared copies that
//   do not pass through registers (cp.async via <cuda_pipeline.h> on NVIDIA), committed in groups;
//   wait<N> returns once at most N of this thread's groups are in flight. On HIP the copy is a
//   plain load and store (done at once; the waits are no-ops).
// - mhc_rcp: 1/v within an ulp, without branches (see below).
// - MHC_NVIDIA: 1 under nvcc, 0 under HIP (for tuning hints that only mean something on one).
// - MHC_TENSOR_CORES: 1 where the bf16 WMMA API (<mma.h>, sm_80+) is available (nvcc), 0 on HIP,
//   whose kernels take the FFMA path instead (same results within the spec's bounds).
// - MHC_DYNAMIC_SHARED(name): declares `name`, the block's dynamic shared memory (unsigned char,
//   128-byte aligned), whose size the launch gives.
//
// MHC_EMULATE (kernels/emulator): the same kernels as plain C++ on the CPU, with AMD's 64-lane
// waves and the HIP paths (FFMA, plain copies), so CI runs the AMD code without an AMD GPU; with
// MHC_EMULATE_NVIDIA too, 32-lane warps and the CUDA forms (tensor cores through an emulated
// nvcuda::wmma; copies still plain), so CI runs the NVIDIA code without an NVIDIA GPU.
#pragma once

#if defined(__HIP__) || defined(__HIPCC__) || defined(MHC_EMULATE)

#if defined(MHC_EMULATE)
#include "emulator/device.h"
typedef emu::bf16 mhc_bf16;
#define MHC_WAVE emu::WAVE
__device__ __forceinline__ float mhc_bf16_to_f32(mhc_bf16 v) { return emu::bf16_to_f32(v); }
__device__ __forceinline__ mhc_bf16 mhc_f32_to_bf16(float v) { return emu::f32_to_bf16(v); }
__device__ __forceinline__ float mhc_shfl_xor(float v, int lane_mask) { return emu::shuffle_xor(v, lane_mask); }
#else
#include <hip/hip_runtime.h>
#include <hip/hip_bfloat16.h>
typedef hip_bfloat16 mhc_bf16;
#define MHC_WAVE 64
__device__ __forceinline__ float mhc_bf16_to_f32(mhc_bf16 v) { return static_cast<float>(v); }
__device__ __forceinline__ mhc_bf16 mhc_f32_to_bf16(float v) { return mhc_bf16(v); }
__device__ __forceinline__ float mhc_shfl_xor(float v, int lane_mask) { return __shfl_xor(v, lane_mask); }
#endif

#if defined(MHC_EMULATE_NVIDIA)
#define MHC_NVIDIA 1
#define MHC_TENSOR_CORES 1
#else
#define MHC_NVIDIA 0
#define MHC_TENSOR_CORES 0
#endif

// `valid` false writes zeros (src is not read).
__device__ __forceinline__ void mhc_copy16_async(void* dst_shared, const void* src, bool valid) {
    *reinterpret_cast<uint4*>(dst_shared) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
}
__device__ __forceinline__ void mhc_copy4_async(void* dst_shared, const void* src, bool valid) {
    *reinterpret_cast<float*>(dst_shared) = valid ? *reinterpret_cast<const float*>(src) : 0.0f;
}
__device__ __forceinline__ void mhc_copy_commit() {}
template <int N> __device__ __forceinline__ void mhc_copy_wait() {}

#else

#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <mma.h>

typedef __nv_bfloat16 mhc_bf16;
#define MHC_WAVE 32
#define MHC_NVIDIA 1
#define MHC_TENSOR_CORES 1

__device__ __forceinline__ float mhc_bf16_to_f32(mhc_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ mhc_bf16 mhc_f32_to_bf16(float v) { return __float2bfloat16_rn(v); }
// Every lane of the warp takes part in each shuffle the kernels issue.
__device__ __forceinline__ float mhc_shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(~0u, v, lane_mask);
}
// `valid` false writes zeros (src is not read: all 16 bytes are zero-filled).
__device__ __forceinline__ void mhc_copy16_async(void* dst_shared, const void* src, bool valid) {
    __pipeline_memcpy_async(dst_shared, src, 16, valid ? 0 : 16);
}
__device__ __forceinline__ void mhc_copy4_async(void* dst_shared, const void* src, bool valid) {
    __pipeline_memcpy_async(dst_shared, src, 4, valid ? 0 : 4);
}
__device__ __forceinline__ void mhc_copy_commit() { __pipeline_commit(); }
template <int N> __device__ __forceinline__ void mhc_copy_wait() { __pipeline_wait_prior(N); }

#endif

#if defined(MHC_EMULATE)
#define MHC_DYNAMIC_SHARED(name) unsigned char* const name = emu::dynamic_shared()
#else
#define MHC_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// 1/v within an ulp for normal v: the fast approximate reciprocal and one Newton step, no
// branches. A plain `1.0f / v` is IEEE division, whose slow-path call ends a basic block: it split
// each Sinkhorn half-step's n independent divisions into n serial blocks and kept the loads
// around it from being hoisted (most of the per-token kernels' time at small T).
__device__ __forceinline__ float mhc_rcp(float v) {
    const float r = __fdividef(1.0f, v);
    return fmaf(r, fmaf(-v, r, 1.0f), r);
}
