// mHC aggregate (spec/mhc.md "pre"): u = sum_j H_pre[j] x_j, and its backward.
// x [T, n, C] and u, du [T, C] in the storage dtype; h, dh [T, k] f32 (k = n*n + 2n, H_pre in
// columns [0, n)). All arithmetic f32.
#include "mhc_common.h"

using namespace mhc;

// Forward: one thread per V-element chunk of one token's row, grid-stride. One read of x, one
// write of u.
template <typename T, int N>
__device__ void pre_forward(const T* __restrict__ x, const float* __restrict__ h, T* __restrict__ u,
                            long long tokens, long long C) {
    constexpr int K = N * N + 2 * N;
    constexpr int V = Vec<T, N>::len;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(u, C);
    for_each_row_chunk<V>(tokens, C, [&](long long t, long long c0) {
        float acc[V];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = 0.0f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float w = h[t * K + j];
            float xv[V];
            load_row<T, V>(x + (t * N + j) * C, c0, C, vec, xv);
#pragma unroll
            for (int q = 0; q < V; ++q) acc[q] += w * xv[q];
        }
        store_row<T, V>(u + t * C, c0, C, vec, acc);
    });
}

// What pre's backward does with dx_j = H_pre[j] du (docs/ops.md, "The chained sublayer").
enum PreDx {
    PRE_DX_NONE,    // dh only: the dynamic chained backward adds dx in the coefficient backward
    PRE_DX_WRITE,   // dx written
    PRE_DX_ADD_TO,  // dx = dx_post + H_pre[j] du written: the static chained backward's one dx
};

// One chunk of V elements of one token in the backward: du, x_j (and dx_post_j when adding to
// it) loaded before any arithmetic (VEC as a template argument: a runtime test per row put each
// row's load behind the previous row's work), then dot[j] += <du, x_j> and dx_j as DX says.
template <typename T, int N, PreDx DX, int V, bool VEC>
__device__ __forceinline__ void pre_backward_chunk(const T* __restrict__ x, const T* __restrict__ du,
                                                   const T* __restrict__ dx_post, T* __restrict__ dx, long long t,
                                                   long long c0, long long C, const float (&w)[N],
                                                   float (&dot)[N]) {
    constexpr bool ADD = DX == PRE_DX_ADD_TO;
    const Pack<T, V> gp = load_pack<T, V, VEC>(du + t * C, c0, C);
    Pack<T, V> xp[N], pp[ADD ? N : 1];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        xp[j] = load_pack<T, V, VEC>(x + (t * N + j) * C, c0, C);
        if constexpr (ADD) pp[j] = load_pack<T, V, VEC>(dx_post + (t * N + j) * C, c0, C);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
        float d[V];
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const float g = to_f32(gp.v[q]);
            dot[j] += g * to_f32(xp[j].v[q]);
            d[q] = w[j] * g;
            if constexpr (ADD) d[q] += to_f32(pp[j].v[q]);
        }
        if constexpr (DX != PRE_DX_NONE) store_row<T, V>(dx + (t * N + j) * C, c0, C, VEC, d);
    }
}

// Backward: one block per token (grid-stride over tokens). dx_j = H_pre[j] du,
// dh[pre j] = <du, x_j>, the other dh columns 0. One read of x and du (and of dx_post when
// adding to it), one write of dx and dh.
template <typename T, int N, PreDx DX>
__device__ void pre_backward(const T* __restrict__ x, const float* __restrict__ h, const T* __restrict__ du,
                             const T* __restrict__ dx_post, T* __restrict__ dx, float* __restrict__ dh,
                             long long tokens, long long C) {
    constexpr int K = N * N + 2 * N;
    constexpr int V = Vec<T, N>::len;
    __shared__ float scratch[(MAX_WAVES + 1) * N];
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(du, C) && (DX == PRE_DX_NONE || pack_ok<T, V>(dx, C)) &&
                     (DX != PRE_DX_ADD_TO || pack_ok<T, V>(dx_post, C));
    for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
        float w[N], dot[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
            w[j] = h[t * K + j];
            dot[j] = 0.0f;
        }
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                pre_backward_chunk<T, N, DX, V, true>(x, du, dx_post, dx, t, cv * V, C, w, dot);
            } else {  // rows not 16-byte aligned (rare shapes): an element at a time
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    pre_backward_chunk<T, N, DX, 1, false>(x, du, dx_post, dx, t, cv * V + q, C, w, dot);
            }
        }
        const float* totals = block_sum<N>(dot, scratch);
        for (int c = threadIdx.x; c < K; c += blockDim.x) dh[t * K + c] = c < N ? totals[c] : 0.0f;
        // totals live in scratch, which the next token's block_sum overwrites.
        __syncthreads();
    }
}

// The static chained backward's one dx where dh comes from elsewhere (the fused RMSNorm's
// backward, which sums du in f32): dx_j = dx_post_j + H_pre[j] du, post's dx added; x is not
// read. One thread per V-element chunk of one token's row, grid-stride: one read of du and
// dx_post, one write of dx. The sums are those of pre_backward_chunk's dx.
template <typename T, int N>
__device__ void pre_backward_dx_sum(const float* __restrict__ h, const T* __restrict__ du,
                                    const T* __restrict__ dx_post, T* __restrict__ dx, long long tokens, long long C) {
    constexpr int K = N * N + 2 * N;
    constexpr int V = Vec<T, N>::len;
    const bool vec = pack_ok<T, V>(du, C) && pack_ok<T, V>(dx_post, C) && pack_ok<T, V>(dx, C);
    for_each_row_chunk<V>(tokens, C, [&](long long t, long long c0) {
        float g[V];
        load_row<T, V>(du + t * C, c0, C, vec, g);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float w = h[t * K + j];
            float d[V];
            load_row<T, V>(dx_post + (t * N + j) * C, c0, C, vec, d);
#pragma unroll
            for (int q = 0; q < V; ++q) d[q] = w * g[q] + d[q];
            store_row<T, V>(dx + (t * N + j) * C, c0, C, vec, d);
        }
    });
}

// Exported kernels, one per (dtype, n), spelled out so each name is greppable (the launch table
// in src/gpu/mhc.rs and scripts/check-kernels.sh look them up by name).
#define PRE_FWD_PARAMS(T) const T *x, const float *h, T *u, long long tokens, long long C
#define PRE_BWD_PARAMS(T) const T *x, const float *h, const T *du, T *dx, float *dh, long long tokens, long long C
#define PRE_BWD_DH_PARAMS(T) const T *x, const float *h, const T *du, float *dh, long long tokens, long long C
#define PRE_BWD_SUM_PARAMS(T) \
    const T *x, const float *h, const T *du, const T *dx_post, T *dx, float *dh, long long tokens, long long C
#define PRE_BWD_DX_SUM_PARAMS(T) \
    const float *h, const T *du, const T *dx_post, T *dx, long long tokens, long long C
extern "C" __global__ void mhc_pre_fwd_f32_n2(PRE_FWD_PARAMS(float)) { pre_forward<float, 2>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n2(PRE_BWD_PARAMS(float)) { pre_backward<float, 2, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n2(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 2, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n2(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 2, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n2(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 2>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n2(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 2>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n2(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 2, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n2(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 2, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n2(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 2, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n2(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 2>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n3(PRE_FWD_PARAMS(float)) { pre_forward<float, 3>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n3(PRE_BWD_PARAMS(float)) { pre_backward<float, 3, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n3(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 3, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n3(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 3, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n3(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 3>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n3(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 3>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n3(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 3, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n3(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 3, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n3(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 3, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n3(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 3>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n4(PRE_FWD_PARAMS(float)) { pre_forward<float, 4>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n4(PRE_BWD_PARAMS(float)) { pre_backward<float, 4, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n4(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 4, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n4(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 4, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n4(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 4>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n4(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 4>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n4(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 4, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n4(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 4, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n4(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 4, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n4(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 4>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n5(PRE_FWD_PARAMS(float)) { pre_forward<float, 5>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n5(PRE_BWD_PARAMS(float)) { pre_backward<float, 5, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n5(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 5, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n5(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 5, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n5(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 5>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n5(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 5>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n5(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 5, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n5(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 5, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n5(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 5, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n5(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 5>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n6(PRE_FWD_PARAMS(float)) { pre_forward<float, 6>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n6(PRE_BWD_PARAMS(float)) { pre_backward<float, 6, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n6(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 6, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n6(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 6, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n6(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 6>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n6(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 6>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n6(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 6, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n6(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 6, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n6(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 6, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n6(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 6>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n7(PRE_FWD_PARAMS(float)) { pre_forward<float, 7>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n7(PRE_BWD_PARAMS(float)) { pre_backward<float, 7, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n7(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 7, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n7(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 7, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n7(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 7>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n7(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 7>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n7(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 7, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n7(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 7, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n7(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 7, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n7(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 7>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_f32_n8(PRE_FWD_PARAMS(float)) { pre_forward<float, 8>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_f32_n8(PRE_BWD_PARAMS(float)) { pre_backward<float, 8, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_f32_n8(PRE_BWD_DH_PARAMS(float)) { pre_backward<float, 8, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_f32_n8(PRE_BWD_SUM_PARAMS(float)) { pre_backward<float, 8, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_f32_n8(PRE_BWD_DX_SUM_PARAMS(float)) { pre_backward_dx_sum<float, 8>(h, du, dx_post, dx, tokens, C); }
extern "C" __global__ void mhc_pre_fwd_bf16_n8(PRE_FWD_PARAMS(mhc_bf16)) { pre_forward<mhc_bf16, 8>(x, h, u, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_bf16_n8(PRE_BWD_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 8, PRE_DX_WRITE>(x, h, du, nullptr, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dh_bf16_n8(PRE_BWD_DH_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 8, PRE_DX_NONE>(x, h, du, nullptr, nullptr, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_sum_bf16_n8(PRE_BWD_SUM_PARAMS(mhc_bf16)) { pre_backward<mhc_bf16, 8, PRE_DX_ADD_TO>(x, h, du, dx_post, dx, dh, tokens, C); }
extern "C" __global__ void mhc_pre_bwd_dx_sum_bf16_n8(PRE_BWD_DX_SUM_PARAMS(mhc_bf16)) { pre_backward_dx_sum<mhc_bf16, 8>(h, du, dx_post, dx, tokens, C); }
