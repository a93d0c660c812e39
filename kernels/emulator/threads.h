// The emulated GPU's execution state as the kernels see it, shared by kernels/emulator/device.h
// (the kernels' side) and kernels/emulator/runtime.cpp (which sets it and implements the
// barriers and shuffles).
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace emu {

// Lanes per wave: AMD gfx9's 64, or 32 for the emulated NVIDIA GPU (MHC_EMULATE_NVIDIA), which
// runs the kernels' CUDA forms.
#if defined(MHC_EMULATE_NVIDIA)
constexpr int WAVE = 32;
#else
constexpr int WAVE = 64;
#endif

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// The calling thread's place in the launch (set by the runtime before the kernel runs).
extern thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// Stops the process with a message: a kernel did what the GPU leaves undefined.
[[noreturn]] void fault(const std::string& what);
// Barrier over the block's threads that have not returned.
void sync_block();
// Barrier over the live lanes of the calling thread's wave (CUDA's __syncwarp).
void sync_wave();
// The calling thread's lane in its wave.
int lane_id();
// The launch's dynamic shared memory (its size as the launch asked; 0xff bytes at each block's
// start, so reading what the block did not write shows).
unsigned char* dynamic_shared();
// The value `v` of lane (this lane ^ lane_mask) of this wave.
float shuffle_xor(float v, int lane_mask);

// bf16 storage: the top 16 bits of an f32; conversions round to nearest even, NaN stays NaN.
struct bf16 {
    std::uint16_t bits;
};
inline float bf16_to_f32(bf16 v) {
    std::uint32_t u = std::uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline bf16 f32_to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return bf16{std::uint16_t((u >> 16) | 0x40)};
    u += 0x7fff + ((u >> 16) & 1);
    return bf16{std::uint16_t(u >> 16)};
}

}  // namespace emu
