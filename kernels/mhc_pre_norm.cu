// mHC aggregate followed by RMSNorm, fused (spec/mhc.md "pre", then F's leading RMSNorm in a
// pre-norm transformer: F(u) = G(RMSNorm(u))):
//   u = sum_j H_pre[j] x_j,   y = u * s * gamma,   s = 1 / sqrt(mean(u^2) + eps)
// and its exact backward from dy:
//   du = s * gamma * dy - u * s^3 * <gamma * dy, u> / C,   dh[pre j] = <du, x_j>,
//   dgamma = sum over tokens of dy * u * s.
// u never goes to memory: both directions form it from x in f32 (unrounded, where pre then
// RMSNorm round it to the storage dtype in between), so the fused step costs one read of x and one
// write of y forward, one read of x and dy and one write of du backward (pre and RMSNorm apart:
// two more passes over a [T, C] tensor each way, and a launch each way).
// x [T, n, C], y, dy, du [T, C] in the storage dtype; h, dh [T, k] f32 (H_pre in columns
// [0, n)); gamma [C] f32. eps is the bit pattern of an f64, as in rms_norm.cu.
#include "mhc_common.h"

using namespace mhc;

// Chunks per thread whose dgamma sums stay in registers across the tokens a block handles (as
// RN_REG_CHUNKS in rms_norm.cu); columns past them go to the block's partial row token by token.
constexpr int PN_REG_CHUNKS = 2;
// Tokens a block takes at once (P below), their loads in flight together: two forward (PAIR in
// rms_norm.cu); one backward, whose second pass holds x, dy, the dot products and the dgamma
// sums in registers at once (two tokens spilled at the 64 registers that keep six 160-thread
// blocks per multiprocessor; one token still has n + 1 16-byte loads in flight per thread).
constexpr int PN_FWD_TOKENS = 2;
constexpr int PN_BWD_TOKENS = 1;
// Resident blocks per multiprocessor the backward's registers are capped for on NVIDIA (as
// RN_BWD_MIN_BLOCKS in rms_norm.cu); no hint on AMD.
constexpr int PN_BWD_MIN_BLOCKS = MHC_NVIDIA ? 4 : 1;

// u over one chunk of V elements for each of the P tokens t0 + p * stride (tokens past the
// last re-read t0; callers drop them): every x row's load issued before any arithmetic, VEC the
// rows' 16-byte test as a template argument (see rn_pair_sums in rms_norm.cu).
template <typename T, int N, int P, int V, bool VEC>
__device__ __forceinline__ void pn_tokens_u(const T* __restrict__ x, const float (&w)[P][N], long long t0,
                                          long long stride, long long tokens, long long c0, long long C,
                                          float (&u)[P][V]) {
    Pack<T, V> xp[P][N];
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p * stride < tokens ? t0 + p * stride : t0;
#pragma unroll
        for (int j = 0; j < N; ++j) xp[p][j] = load_pack<T, V, VEC>(x + (t * N + j) * C, c0, C);
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
        for (int q = 0; q < V; ++q) {
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) acc += w[p][j] * to_f32(xp[p][j].v[q]);
            u[p][q] = acc;
        }
    }
}

// The H_pre weights of the P tokens t0 + p * stride (zeros past the last token).
template <int N, int P>
__device__ __forceinline__ void pn_weights(const float* __restrict__ h, long long t0, long long stride,
                                           long long tokens, float (&w)[P][N]) {
    constexpr int K = N * N + 2 * N;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p * stride;
#pragma unroll
        for (int j = 0; j < N; ++j) w[p][j] = t < tokens ? h[t * K + j] : 0.0f;
    }
}

// Pass 1 of one chunk: sums[S p] += u^2 and, for the backward (S = 2), sums[S p + 1] +=
// gamma * dy * u, for each of the P tokens.
template <typename T, int N, int P, int V, int S, bool VEC>
__device__ __forceinline__ void pn_tokens_sums(const T* __restrict__ x, const float (&w)[P][N],
                                             const float* __restrict__ gamma, const T* __restrict__ dy,
                                             long long t0, long long stride, long long tokens, long long c0,
                                             long long C, float (&sums)[S * P]) {
    constexpr bool GRAD = S == 2;
    Pack<float, V> gp;
    Pack<T, V> dyp[GRAD ? P : 1];
    if constexpr (GRAD) {
        gp = load_pack<float, V, VEC>(gamma, c0, C);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const long long t = t0 + p * stride < tokens ? t0 + p * stride : t0;
            dyp[p] = load_pack<T, V, VEC>(dy + t * C, c0, C);
        }
    }
    float u[P][V];
    pn_tokens_u<T, N, P, V, VEC>(x, w, t0, stride, tokens, c0, C, u);
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
        for (int q = 0; q < V; ++q) {
            sums[S * p] += u[p][q] * u[p][q];
            if constexpr (GRAD) sums[S * p + 1] += gp.v[q] * to_f32(dyp[p].v[q]) * u[p][q];
        }
    }
}

// Forward pass 2 of one chunk: y = u * s * gamma for each of the P tokens (L1 re-reads of x).
template <typename T, int N, int P, int V, bool VEC>
__device__ __forceinline__ void pn_forward_chunk(const T* __restrict__ x, const float (&w)[P][N],
                                                 const float* __restrict__ gamma, T* __restrict__ y,
                                                 long long t0, long long stride, long long tokens, long long c0,
                                                 long long C, const float (&s)[P]) {
    const Pack<float, V> gp = load_pack<float, V, VEC>(gamma, c0, C);
    float u[P][V];
    pn_tokens_u<T, N, P, V, VEC>(x, w, t0, stride, tokens, c0, C, u);
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p * stride;
        if (t >= tokens) break;
        float out[V];
#pragma unroll
        for (int q = 0; q < V; ++q) out[q] = u[p][q] * s[p] * gp.v[q];
        store_row<T, V>(y + t * C, c0, C, VEC, out);
    }
}

// Forward: grid-stride over tokens, a block per P = 2 tokens at a time (t and t + gridDim.x).
template <typename T, int N>
__device__ void pre_norm_forward(const T* __restrict__ x, const float* __restrict__ h,
                                 const float* __restrict__ gamma, T* __restrict__ y, long long tokens,
                                 long long C, long long eps_bits) {
    constexpr int V = Vec<T, N>::len;
    constexpr int P = PN_FWD_TOKENS;
    __shared__ float scratch[(MAX_WAVES + 1) * P];
    const float eps = (float)__longlong_as_double(eps_bits);
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(y, C) && pack_ok<float, V>(gamma, C);
    const long long stride = gridDim.x;
    for (long long t0 = blockIdx.x; t0 < tokens; t0 += P * stride) {
        float w[P][N];
        pn_weights<N, P>(h, t0, stride, tokens, w);
        float sq[P] = {};
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                pn_tokens_sums<T, N, P, V, 1, true>(x, w, nullptr, nullptr, t0, stride, tokens, cv * V, C, sq);
            } else {  // rows not 16-byte aligned (rare shapes): an element at a time
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    pn_tokens_sums<T, N, P, 1, 1, false>(x, w, nullptr, nullptr, t0, stride, tokens, cv * V + q, C, sq);
            }
        }
        const float* totals = block_sum<P>(sq, scratch);
        float s[P];
#pragma unroll
        for (int p = 0; p < P; ++p) s[p] = rsqrtf(totals[p] / (float)C + eps);
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                pn_forward_chunk<T, N, P, V, true>(x, w, gamma, y, t0, stride, tokens, cv * V, C, s);
            } else {
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    pn_forward_chunk<T, N, P, 1, false>(x, w, gamma, y, t0, stride, tokens, cv * V + q, C, s);
            }
        }
        // s came from scratch, which the next tokens' block_sum overwrites.
        __syncthreads();
    }
}

// Backward pass 2 of one chunk for each of the P tokens: du written, dot[p][j] += du * x_j,
// acc += dy * u * s (summed over the tokens: the block's dgamma).
template <typename T, int N, int P, int V, bool VEC>
__device__ __forceinline__ void pn_backward_chunk(const T* __restrict__ x, const float (&w)[P][N],
                                                  const float* __restrict__ gamma, const T* __restrict__ dy,
                                                  T* __restrict__ du, long long t0, long long stride,
                                                  long long tokens, long long c0, long long C,
                                                  const float (&s)[P], const float (&coef)[P],
                                                  float (&dot)[P][N], float (&acc)[V]) {
    const Pack<float, V> gp = load_pack<float, V, VEC>(gamma, c0, C);
    Pack<T, V> xp[P][N], dyp[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p * stride < tokens ? t0 + p * stride : t0;
        dyp[p] = load_pack<T, V, VEC>(dy + t * C, c0, C);
#pragma unroll
        for (int j = 0; j < N; ++j) xp[p][j] = load_pack<T, V, VEC>(x + (t * N + j) * C, c0, C);
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
        const long long t = t0 + p * stride;
        if (t >= tokens) break;
        float d[V];
#pragma unroll
        for (int q = 0; q < V; ++q) {
            float u = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) u += w[p][j] * to_f32(xp[p][j].v[q]);
            const float g = to_f32(dyp[p].v[q]);
            d[q] = s[p] * gp.v[q] * g - coef[p] * u;
            acc[q] += g * u * s[p];
#pragma unroll
            for (int j = 0; j < N; ++j) dot[p][j] += d[q] * to_f32(xp[p][j].v[q]);
        }
        store_row<T, V>(du + t * C, c0, C, VEC, d);
    }
}

// Pass 2 of chunk cv, as 16-byte packs (`vec`) or an element at a time (rows not 16-byte
// aligned: rare shapes); its dgamma terms added to acc.
template <typename T, int N, int P, int V>
__device__ __forceinline__ void pn_backward_span(bool vec, const T* __restrict__ x, const float (&w)[P][N],
                                                 const float* __restrict__ gamma, const T* __restrict__ dy,
                                                 T* __restrict__ du, long long t0, long long stride,
                                                 long long tokens, long long cv, long long C,
                                                 const float (&s)[P], const float (&coef)[P],
                                                 float (&dot)[P][N], float (&acc)[V]) {
    if (vec) {
        pn_backward_chunk<T, N, P, V, true>(x, w, gamma, dy, du, t0, stride, tokens, cv * V, C, s, coef, dot, acc);
        return;
    }
#pragma unroll 1
    for (int q = 0; q < V; ++q) {
        float one[1] = {acc[q]};
        pn_backward_chunk<T, N, P, 1, false>(x, w, gamma, dy, du, t0, stride, tokens, cv * V + q, C, s, coef, dot,
                                             one);
        acc[q] = one[0];
    }
}

// Backward: grid-stride over tokens, a token per block at a time (Grid::RowsAccumulate). Pass 1
// sums u^2 and gamma * dy * u, pass 2 (L1 re-reads) writes du, dh's pre columns (the other
// columns 0, as pre's backward) and accumulates dgamma, which each block writes to its own row of
// dgamma_partial [gridDim.x, C] for rms_norm_dgamma_sum (rms_norm.cu) to add up.
template <typename T, int N>
__device__ void pre_norm_backward(const T* __restrict__ x, const float* __restrict__ h,
                                  const float* __restrict__ gamma, const T* __restrict__ dy, T* __restrict__ du,
                                  float* __restrict__ dh, float* __restrict__ dgamma_partial, long long tokens,
                                  long long C, long long eps_bits) {
    constexpr int K = N * N + 2 * N;
    constexpr int V = Vec<T, N>::len;
    constexpr int P = PN_BWD_TOKENS;
    constexpr int NS = 2 * P > P * N ? 2 * P : P * N;
    __shared__ float scratch[(MAX_WAVES + 1) * NS];
    const float eps = (float)__longlong_as_double(eps_bits);
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(dy, C) && pack_ok<T, V>(du, C) &&
                     pack_ok<float, V>(gamma, C);
    const long long stride = gridDim.x;
    DgammaRow<PN_REG_CHUNKS, V> dgamma(dgamma_partial + blockIdx.x * C, chunks, C);
    for (long long t0 = blockIdx.x; t0 < tokens; t0 += P * stride) {
        float w[P][N];
        pn_weights<N, P>(h, t0, stride, tokens, w);
        // sums[2p] = sum u^2, sums[2p + 1] = sum gamma * dy * u of token t0 + p * stride.
        float sums[2 * P] = {};
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                pn_tokens_sums<T, N, P, V, 2, true>(x, w, gamma, dy, t0, stride, tokens, cv * V, C, sums);
            } else {
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    pn_tokens_sums<T, N, P, 1, 2, false>(x, w, gamma, dy, t0, stride, tokens, cv * V + q, C, sums);
            }
        }
        const float* totals = block_sum<2 * P>(sums, scratch);
        float s[P], coef[P];
#pragma unroll
        for (int p = 0; p < P; ++p) {
            s[p] = rsqrtf(totals[2 * p] / (float)C + eps);
            coef[p] = s[p] * s[p] * s[p] * totals[2 * p + 1] / (float)C;
        }
        __syncthreads();  // totals are read; the dot sums below reuse scratch
        float dot[P][N];
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int j = 0; j < N; ++j) dot[p][j] = 0.0f;
#pragma unroll
        for (int m = 0; m < PN_REG_CHUNKS; ++m) {
            const long long cv = dgamma.reg_chunk(m);
            if (cv >= chunks) continue;
            pn_backward_span<T, N, P, V>(vec, x, w, gamma, dy, du, t0, stride, tokens, cv, C, s, coef, dot,
                                         dgamma.reg[m]);
        }
        for (long long cv = dgamma.first_tail_chunk(); cv < chunks; cv += blockDim.x) {
            float part[V] = {};
            pn_backward_span<T, N, P, V>(vec, x, w, gamma, dy, du, t0, stride, tokens, cv, C, s, coef, dot, part);
            dgamma.add(cv, part);
        }
        float flat[P * N];
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int j = 0; j < N; ++j) flat[p * N + j] = dot[p][j];
        const float* dots = block_sum<P * N>(flat, scratch);
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const long long t = t0 + p * stride;
            if (t >= tokens) break;
            for (int c = threadIdx.x; c < K; c += blockDim.x) dh[t * K + c] = c < N ? dots[p * N + c] : 0.0f;
        }
        // dots live in scratch, which the next tokens' block_sum overwrites.
        __syncthreads();
    }
    dgamma.write();
}

// Exported kernels, one per (dtype, n), spelled out so each name is greppable.
#define PN_FWD_PARAMS(T) \
    const T *x, const float *h, const float *gamma, T *y, long long tokens, long long C, long long eps_bits
#define PN_BWD_PARAMS(T)                                                                                 \
    const T *x, const float *h, const float *gamma, const T *dy, T *du, float *dh, float *dgamma_partial, \
        long long tokens, long long C, long long eps_bits
extern "C" __global__ void mhc_pre_norm_fwd_f32_n2(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 2>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n2(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 2>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n2(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 2>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n2(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 2>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n3(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 3>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n3(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 3>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n3(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 3>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n3(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 3>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n4(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 4>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n4(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 4>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n4(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 4>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n4(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 4>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n5(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 5>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n5(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 5>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n5(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 5>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n5(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 5>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n6(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 6>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n6(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 6>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n6(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 6>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n6(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 6>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n7(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 7>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n7(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 7>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n7(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 7>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n7(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 7>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_f32_n8(PN_FWD_PARAMS(float)) { pre_norm_forward<float, 8>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_f32_n8(PN_BWD_PARAMS(float)) { pre_norm_backward<float, 8>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
extern "C" __global__ void mhc_pre_norm_fwd_bf16_n8(PN_FWD_PARAMS(mhc_bf16)) { pre_norm_forward<mhc_bf16, 8>(x, h, gamma, y, tokens, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, PN_BWD_MIN_BLOCKS) mhc_pre_norm_bwd_bf16_n8(PN_BWD_PARAMS(mhc_bf16)) { pre_norm_backward<mhc_bf16, 8>(x, h, gamma, dy, du, dh, dgamma_partial, tokens, C, eps_bits); }
