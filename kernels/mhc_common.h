// Device helpers shared by the mHC kernels: dtype conversion, vector row access with a scalar
// fallback, warp/wave and block sums. Included by kernels/*.cu; all arithmetic is f32.
#pragma once

#include "compat.h"

namespace mhc {

// The largest block any kernel here is launched with; shared reduction arrays are sized by the
// number of waves it holds (8 on NVIDIA, 4 on AMD), never by a hard-coded 32.
constexpr int MAX_BLOCK = 256;
constexpr int MAX_WAVES = MAX_BLOCK / MHC_WAVE;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(mhc_bf16 v) { return mhc_bf16_to_f32(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ mhc_bf16 from_f32<mhc_bf16>(float v) { return mhc_f32_to_bf16(v); }

// A if B else C, as a type (std::conditional without the host library headers).
template <bool B, typename A, typename C> struct Select {
    using type = A;
};
template <typename A, typename C> struct Select<false, A, C> {
    using type = C;
};

// V consecutive elements moved as one aligned access (16 or 8 bytes).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

// Elements per thread in the streaming kernels: 16-byte accesses for n <= 4, 8-byte ones above
// (n rows of them live in registers at once).
template <typename T, int N> struct Vec {
    static constexpr int bytes = N <= 4 ? 16 : 8;
    static constexpr int len = bytes / (int)sizeof(T);
};

// The streaming kernels' loop: body(t, c0) for every V-element chunk c0 of every token t's row
// of C elements, one chunk per thread, grid-stride.
template <int V, typename Body>
__device__ __forceinline__ void for_each_row_chunk(long long tokens, long long C, Body body) {
    const long long chunks = (C + V - 1) / V;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < tokens * chunks;
         i += (long long)gridDim.x * blockDim.x)
        body(i / chunks, (i % chunks) * V);
}

// True when rows of `len`-element chunks starting at p are aligned for Pack access: the row
// length C is a multiple of the chunk and the base pointer is chunk-aligned.
template <typename T, int V>
__device__ __forceinline__ bool pack_ok(const void* p, long long C) {
    return C % V == 0 && ((unsigned long long)p) % (sizeof(T) * V) == 0;
}

// Reads elements [c0, c0 + V) of a row of length C into f32 (zeros past C).
template <typename T, int V>
__device__ __forceinline__ void load_row(const T* __restrict__ row, long long c0, long long C, bool vec,
                                         float (&out)[V]) {
    if (vec) {
        Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(row + c0);
#pragma unroll
        for (int q = 0; q < V; ++q) out[q] = to_f32(pk.v[q]);
    } else {
#pragma unroll
        for (int q = 0; q < V; ++q) out[q] = c0 + q < C ? to_f32(row[c0 + q]) : 0.0f;
    }
}

// Elements [c0, c0 + V) of a row of length C in the storage dtype (zeros past C); VEC as in
// load_row, but a template argument, for callers that issue several rows' loads back to back.
template <typename T, int V, bool VEC>
__device__ __forceinline__ Pack<T, V> load_pack(const T* __restrict__ row, long long c0, long long C) {
    if constexpr (VEC) {
        return *reinterpret_cast<const Pack<T, V>*>(row + c0);
    } else {
        Pack<T, V> pk;
#pragma unroll
        for (int q = 0; q < V; ++q) pk.v[q] = c0 + q < C ? row[c0 + q] : from_f32<T>(0.0f);
        return pk;
    }
}

// Writes elements [c0, c0 + V) of a row of length C (those below C).
template <typename T, int V>
__device__ __forceinline__ void store_row(T* __restrict__ row, long long c0, long long C, bool vec,
                                          const float (&val)[V]) {
    if (vec) {
        Pack<T, V> pk;
#pragma unroll
        for (int q = 0; q < V; ++q) pk.v[q] = from_f32<T>(val[q]);
        *reinterpret_cast<Pack<T, V>*>(row + c0) = pk;
    } else {
#pragma unroll
        for (int q = 0; q < V; ++q)
            if (c0 + q < C) row[c0 + q] = from_f32<T>(val[q]);
    }
}

// Sum over the warp/wave; every lane gets the total.
__device__ __forceinline__ float wave_sum(float v) {
#pragma unroll
    for (int m = MHC_WAVE / 2; m > 0; m /= 2) v += mhc_shfl_xor(v, m);
    return v;
}

// Block-wide sum of NV per-thread values, called by every thread of the block. `scratch` holds
// (MAX_WAVES + 1) * NV floats; the NV totals sit at the returned pointer, visible to every thread
// (the function ends with a barrier).
template <int NV>
__device__ __forceinline__ const float* block_sum(float (&v)[NV], float* scratch) {
    const int wave = threadIdx.x / MHC_WAVE;
    const int lane = threadIdx.x % MHC_WAVE;
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = wave_sum(v[i]);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < NV; ++i) scratch[wave * NV + i] = v[i];
    }
    __syncthreads();
    float* totals = scratch + MAX_WAVES * NV;
    const int waves = (blockDim.x + MHC_WAVE - 1) / MHC_WAVE;
    for (int i = threadIdx.x; i < NV; i += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < waves; ++w) total += scratch[w * NV + i];
        totals[i] = total;
    }
    __syncthreads();
    return totals;
}

// A block's share of an RMSNorm backward's dgamma (rms_norm.cu, mhc_pre_norm.cu), summed over the
// rows the block handles: the sums of this thread's first REG chunks of V columns stay in
// registers (`reg`, chunk m being `reg_chunk(m)`); the columns past them are added into the
// block's own row of the partial output row by row (`add`), by the thread that zeroed them here;
// `write` stores the register sums once at the end. Every column of the row is written.
template <int REG, int V> struct DgammaRow {
    float* row;
    long long chunks, C;
    float reg[REG][V];

    __device__ __forceinline__ DgammaRow(float* row_, long long chunks_, long long C_)
        : row(row_), chunks(chunks_), C(C_) {
#pragma unroll
        for (int m = 0; m < REG; ++m)
#pragma unroll
            for (int q = 0; q < V; ++q) reg[m][q] = 0.0f;
        for (long long cv = first_tail_chunk(); cv < chunks; cv += blockDim.x) {
#pragma unroll
            for (int q = 0; q < V; ++q)
                if (cv * V + q < C) row[cv * V + q] = 0.0f;
        }
    }
    __device__ __forceinline__ long long reg_chunk(int m) const { return threadIdx.x + (long long)m * blockDim.x; }
    // The first of this thread's chunks past the register ones (then every blockDim.x-th).
    __device__ __forceinline__ long long first_tail_chunk() const { return reg_chunk(REG); }
    __device__ __forceinline__ void add(long long cv, const float (&part)[V]) {
#pragma unroll
        for (int q = 0; q < V; ++q)
            if (cv * V + q < C) row[cv * V + q] += part[q];
    }
    __device__ __forceinline__ void write() const {
#pragma unroll
        for (int m = 0; m < REG; ++m) {
            const long long cv = reg_chunk(m);
            if (cv < chunks) {
#pragma unroll
                for (int q = 0; q < V; ++q)
                    if (cv * V + q < C) row[cv * V + q] = reg[m][q];
            }
        }
    }
};

}  // namespace mhc

