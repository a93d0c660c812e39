// mHC mix + distribute (spec/mhc.md "post"): x'_i = sum_j H_res[i,j] x_j + H_post[i] y, and its
// backward. x, x', g [T, n, C] and y, dy [T, C] in the storage dtype; h, dh [T, k] f32 with
// H_post in columns [n, 2n) and H_res (row-major i*n + j) in [2n, k). All arithmetic f32.
#include "mhc_common.h"

using namespace mhc;

// One chunk of V elements of one token in the forward: the n + 1 row loads (x_j, y) are issued
// before any arithmetic (VEC as in post_backward_chunk below), then x'_i = sum_j H_res[i,j] x_j +
// H_post[i] y for every stream i.
template <typename T, int N, int V, bool VEC>
__device__ __forceinline__ void post_forward_chunk(const T* __restrict__ x, const float* __restrict__ ht,
                                                   const T* __restrict__ y, T* __restrict__ out, long long t,
                                                   long long c0, long long C) {
    Pack<T, V> xp[N];
#pragma unroll
    for (int j = 0; j < N; ++j) xp[j] = load_pack<T, V, VEC>(x + (t * N + j) * C, c0, C);
    const Pack<T, V> yp = load_pack<T, V, VEC>(y + t * C, c0, C);
#pragma unroll
    for (int r = 0; r < N; ++r) {
        float acc[V];
        const float wy = ht[N + r];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = wy * to_f32(yp.v[q]);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float w = ht[2 * N + r * N + j];
#pragma unroll
            for (int q = 0; q < V; ++q) acc[q] += w * to_f32(xp[j].v[q]);
        }
        store_row<T, V>(out + (t * N + r) * C, c0, C, VEC, acc);
    }
}

// Forward: one thread per V-element chunk of one token, all n streams, grid-stride. One read of
// x and y, one write of x'.
template <typename T, int N>
__device__ void post_forward(const T* __restrict__ x, const float* __restrict__ h, const T* __restrict__ y,
                             T* __restrict__ out, long long tokens, long long C) {
    constexpr int K = N * N + 2 * N;
    constexpr int V = Vec<T, N>::len;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(y, C) && pack_ok<T, V>(out, C);
    for_each_row_chunk<V>(tokens, C, [&](long long t, long long c0) {
        if (vec) {
            post_forward_chunk<T, N, V, true>(x, h + t * K, y, out, t, c0, C);
        } else {  // rows not 16-byte aligned (rare shapes): an element at a time
#pragma unroll 1
            for (int q = 0; q < V; ++q) post_forward_chunk<T, N, 1, false>(x, h + t * K, y, out, t, c0 + q, C);
        }
    });
}

// One output row of a backward chunk: d = sum_i w[i * stride] g_i, and dot[i * stride] +=
// <g_i, v> over the chunk (w and dot point into register arrays: constant offsets once inlined
// and unrolled).
template <typename T, int N, int V>
__device__ __forceinline__ void mix_and_dot(const Pack<T, V> (&gp)[N], const float* w, const Pack<T, V>& v,
                                            float* dot, int stride, float (&d)[V]) {
#pragma unroll
    for (int q = 0; q < V; ++q) d[q] = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const float gv = to_f32(gp[i].v[q]);
            d[q] += w[i * stride] * gv;
            dot[i * stride] += gv * to_f32(v.v[q]);
        }
    }
}

// One chunk of V elements of one token in the backward: reads g (n rows), y and x (n rows) into
// registers before any arithmetic, so all 2n + 1 loads are in flight at once (VEC is the
// launch-uniform vector test as a template argument: branching on it per row put every row's
// load in its own basic block, behind the previous row's arithmetic and stores, and the kernel
// waited on up to six memory round trips per token). Writes dy and dx_j, adds to dot.
template <typename T, int N, int V, bool VEC>
__device__ __forceinline__ void post_backward_chunk(const T* __restrict__ x, const T* __restrict__ y,
                                                    const T* __restrict__ g, T* __restrict__ dx,
                                                    T* __restrict__ dy, long long t, long long c0, long long C,
                                                    const float (&w_post)[N], const float (&w_res)[N * N],
                                                    float (&dot)[N + N * N]) {
    // Held in the storage dtype until used (as f32 arrays they took 184 registers at n = 4).
    Pack<T, V> gp[N], yp, xp[N];
#pragma unroll
    for (int i = 0; i < N; ++i) gp[i] = load_pack<T, V, VEC>(g + (t * N + i) * C, c0, C);
    yp = load_pack<T, V, VEC>(y + t * C, c0, C);
#pragma unroll
    for (int j = 0; j < N; ++j) xp[j] = load_pack<T, V, VEC>(x + (t * N + j) * C, c0, C);
    // dy = sum_i H_post[i] g_i with dot[i] += <g_i, y>; dx_j = sum_i H_res[i,j] g_i with
    // dot[N + i*N + j] += <g_i, x_j>.
    float d[V];
    mix_and_dot<T, N, V>(gp, w_post, yp, dot, 1, d);
    store_row<T, V>(dy + t * C, c0, C, VEC, d);
#pragma unroll
    for (int j = 0; j < N; ++j) {
        mix_and_dot<T, N, V>(gp, w_res + j, xp[j], dot + N + j, N, d);
        store_row<T, V>(dx + (t * N + j) * C, c0, C, VEC, d);
    }
}

// Backward: one block per token (grid-stride over tokens).
//   dy = sum_i H_post[i] g_i,  dx_j = sum_i H_res[i,j] g_i,
//   dh[post i] = <g_i, y>,  dh[res i,j] = <g_i, x_j>,  dh[pre] = 0.
// One read of x, y, g; one write of dx, dy, dh.
template <typename T, int N>
__device__ void post_backward(const T* __restrict__ x, const float* __restrict__ h, const T* __restrict__ y,
                              const T* __restrict__ g, T* __restrict__ dx, float* __restrict__ dh,
                              T* __restrict__ dy, long long tokens, long long C) {
    constexpr int K = N * N + 2 * N;
    constexpr int NV = N + N * N;  // the post and res columns of dh
    constexpr int V = Vec<T, N>::len;
    __shared__ float scratch[(MAX_WAVES + 1) * NV];
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(y, C) && pack_ok<T, V>(g, C) &&
                     pack_ok<T, V>(dx, C) && pack_ok<T, V>(dy, C);
    for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
        float w_post[N], w_res[N * N];
#pragma unroll
        for (int i = 0; i < N; ++i) w_post[i] = h[t * K + N + i];
#pragma unroll
        for (int i = 0; i < N * N; ++i) w_res[i] = h[t * K + 2 * N + i];
        float dot[NV];
#pragma unroll
        for (int i = 0; i < NV; ++i) dot[i] = 0.0f;
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                post_backward_chunk<T, N, V, true>(x, y, g, dx, dy, t, cv * V, C, w_post, w_res, dot);
            } else {  // rows not 16-byte aligned (rare shapes): an element at a time
#pragma unroll 1
                for (int q = 0; q < V; ++q) {
                    post_backward_chunk<T, N, 1, false>(x, y, g, dx, dy, t, cv * V + q, C, w_post, w_res, dot);
                }
            }
        }
        const float* totals = block_sum<NV>(dot, scratch);
        for (int c = threadIdx.x; c < K; c += blockDim.x) dh[t * K + c] = c < N ? 0.0f : totals[c - N];
        // totals live in scratch, which the next token's block_sum overwrites.
        __syncthreads();
    }
}

// Exported kernels, one per (dtype, n), spelled out so each name is greppable (the launch table
// in src/gpu/mhc.rs and scripts/check-kernels.sh look them up by name).
#define POST_FWD_PARAMS(T) const T *x, const float *h, const T *y, T *out, long long tokens, long long C
#define POST_BWD_PARAMS(T) \
    const T *x, const float *h, const T *y, const T *g, T *dx, float *dh, T *dy, long long tokens, long long C
extern "C" __global__ void mhc_post_fwd_f32_n2(POST_FWD_PARAMS(float)) { post_forward<float, 2>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n2(POST_BWD_PARAMS(float)) { post_backward<float, 2>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n2(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 2>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n2(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 2>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n3(POST_FWD_PARAMS(float)) { post_forward<float, 3>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n3(POST_BWD_PARAMS(float)) { post_backward<float, 3>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n3(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 3>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n3(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 3>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n4(POST_FWD_PARAMS(float)) { post_forward<float, 4>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n4(POST_BWD_PARAMS(float)) { post_backward<float, 4>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n4(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 4>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n4(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 4>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n5(POST_FWD_PARAMS(float)) { post_forward<float, 5>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n5(POST_BWD_PARAMS(float)) { post_backward<float, 5>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n5(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 5>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n5(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 5>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n6(POST_FWD_PARAMS(float)) { post_forward<float, 6>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n6(POST_BWD_PARAMS(float)) { post_backward<float, 6>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n6(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 6>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n6(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 6>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n7(POST_FWD_PARAMS(float)) { post_forward<float, 7>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n7(POST_BWD_PARAMS(float)) { post_backward<float, 7>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n7(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 7>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n7(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 7>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_f32_n8(POST_FWD_PARAMS(float)) { post_forward<float, 8>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_f32_n8(POST_BWD_PARAMS(float)) { post_backward<float, 8>(x, h, y, g, dx, dh, dy, tokens, C); }
extern "C" __global__ void mhc_post_fwd_bf16_n8(POST_FWD_PARAMS(mhc_bf16)) { post_forward<mhc_bf16, 8>(x, h, y, out, tokens, C); }
extern "C" __global__ void mhc_post_bwd_bf16_n8(POST_BWD_PARAMS(mhc_bf16)) { post_backward<mhc_bf16, 8>(x, h, y, g, dx, dh, dy, tokens, C); }
