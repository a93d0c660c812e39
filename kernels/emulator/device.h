// The CUDA dialect of kernels/*.cu as plain C++ on the CPU, for the emulated GPU
// (kernels/emulator/runtime.cpp): included by compat.h when MHC_EMULATE is defined. The
// emulated AMD GPU runs the kernels' HIP forms; with MHC_EMULATE_NVIDIA too, the emulated NVIDIA
// GPU runs their CUDA forms: 32-lane warps, the tensor-core products (wmma.h), sm_90's float4
// atomics, `__syncwarp`.
//
// Execution model, as on the GPU: a launch runs its blocks one after another, and every thread
// of a block as its own fiber (kernels/emulator/runtime.cpp), so the threads of a block
// interleave and meet at barriers. `__syncthreads` waits for the block's live threads; a wave
// shuffle waits for the live lanes of the wave, around an exchange of values. Waves are
// emu::WAVE lanes (64 for AMD gfx9, so code that assumes 32 computes wrong sums there).
// `__shared__` variables become function statics: one copy, reused by each block in turn
// (blocks never overlap); dynamic shared memory (MHC_DYNAMIC_SHARED in compat.h) is one buffer of
// the launch's size, refilled with 0xff bytes for each block.
//
// Faults the GPU would leave undefined stop the process with a message instead: a shuffle from a
// lane that does not exist or has returned, threads of a block waiting at different barriers.
#pragma once

#include "threads.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp() { emu::sync_wave(); }

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
// The GPUs' fast division (approximate there); exact here, which mhc_rcp's Newton step keeps.
inline float __fdividef(float a, float b) { return a / b; }
inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}
inline float atomicAdd(float* address, float v) { return std::atomic_ref<float>(*address).fetch_add(v); }

struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#if defined(MHC_EMULATE_NVIDIA)
// sm_90's 16-byte float atomic add (each element added atomically; the old values returned).
inline float4 atomicAdd(float4* address, float4 v) {
    float* f = &address->x;
    return {atomicAdd(f, v.x), atomicAdd(f + 1, v.y), atomicAdd(f + 2, v.z), atomicAdd(f + 3, v.w)};
}
#include "wmma.h"
#endif
