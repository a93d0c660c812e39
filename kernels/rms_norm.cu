// RMSNorm over the last axis (F of the mHC sublayer, and the model's norms):
//   y = x * s * gamma,  s = 1 / sqrt(mean(x^2) + eps)
// and its exact backward
//   dx = s * gamma * dy - x * s^3 * <gamma * dy, x> / C,   dgamma = sum over rows of dy * x * s.
// x, y, dy, dx [rows, C] in the storage dtype; gamma, dgamma [C] f32. All arithmetic f32. eps is
// passed as the bit pattern of an f64 (the kernel table has integer scalars only).
#include "mhc_common.h"

using namespace mhc;

// Chunks of V elements per thread whose dgamma partial sums stay in registers across the rows a
// block handles (up to RN_REG_CHUNKS * 256 * V columns: 4096 bf16, 2048 f32); columns past that
// are added to the block's partial row per row.
constexpr int RN_REG_CHUNKS = 2;
// Resident blocks per multiprocessor the backward's registers are capped for on NVIDIA: four of
// up to 256 threads (64 registers; smaller blocks fit more, and the kernel table's grid takes as
// many as hold the threads of four full blocks). With four chunks and no cap it took 110
// registers, three 160-thread blocks per multiprocessor, and its grid ran in more than two waves.
// No hint on AMD (see proj_min_blocks in mhc_coeffs.cu).
constexpr int RN_BWD_MIN_BLOCKS = MHC_NVIDIA ? 4 : 1;

__device__ __forceinline__ float rn_eps(long long eps_bits) {
    return (float)__longlong_as_double(eps_bits);
}

// Pass 1 of one chunk over the block's rows r0 + p * stride (p < PAIR; rows past the last read
// row r0 and add nothing), S sums per row: sums[S p] += x^2 and, for the backward (S = 2),
// sums[S p + 1] += gamma * dy * x. All loads are issued before any arithmetic (a runtime vector
// test per row put each row's loads behind the previous row's sums: one memory round trip per
// row), VEC being that test as a template argument.
template <typename T, int V, int PAIR, int S, bool VEC>
__device__ __forceinline__ void rn_pair_sums(const T* __restrict__ x, const float* __restrict__ gamma,
                                             const T* __restrict__ dy, long long r0, long long stride,
                                             long long rows, long long c0, long long C,
                                             float (&sums)[S * PAIR]) {
    constexpr bool GRAD = S == 2;
    Pack<float, V> gp;
    if constexpr (GRAD) gp = load_pack<float, V, VEC>(gamma, c0, C);
    Pack<T, V> xp[PAIR], dyp[GRAD ? PAIR : 1];
#pragma unroll
    for (int p = 0; p < PAIR; ++p) {
        const long long r = r0 + p * stride < rows ? r0 + p * stride : r0;
        xp[p] = load_pack<T, V, VEC>(x + r * C, c0, C);
        if constexpr (GRAD) dyp[p] = load_pack<T, V, VEC>(dy + r * C, c0, C);
    }
#pragma unroll
    for (int p = 0; p < PAIR; ++p) {
        if (r0 + p * stride >= rows) break;
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const float xv = to_f32(xp[p].v[q]);
            sums[S * p] += xv * xv;
            if constexpr (GRAD) sums[S * p + 1] += gp.v[q] * to_f32(dyp[p].v[q]) * xv;
        }
    }
}

// y of one chunk of a row with scale s.
template <typename T, int V, bool VEC>
__device__ __forceinline__ void rn_forward_chunk(const T* __restrict__ xr, const float* __restrict__ gamma,
                                                 T* __restrict__ yr, long long c0, long long C, float s) {
    const Pack<T, V> xp = load_pack<T, V, VEC>(xr, c0, C);
    const Pack<float, V> gp = load_pack<float, V, VEC>(gamma, c0, C);
    float out[V];
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = to_f32(xp.v[q]) * s * gp.v[q];
    store_row<T, V>(yr, c0, C, VEC, out);
}

// Forward: grid-stride over rows, a block per pair of rows at a time (rows r and r + gridDim.x,
// both rows' loads in flight together; one row at a time, each block waited on one memory round
// trip per row). One read of x (the second pass re-reads the rows from L1), one write of y.
template <typename T>
__device__ void rms_norm_forward(const T* __restrict__ x, const float* __restrict__ gamma, T* __restrict__ y,
                                 long long rows, long long C, long long eps_bits) {
    constexpr int V = 16 / (int)sizeof(T);
    constexpr int PAIR = 2;
    __shared__ float scratch[(MAX_WAVES + 1) * PAIR];
    const float eps = rn_eps(eps_bits);
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(y, C) && pack_ok<float, V>(gamma, C);
    for (long long r0 = blockIdx.x; r0 < rows; r0 += PAIR * (long long)gridDim.x) {
        float sq[PAIR] = {};
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                rn_pair_sums<T, V, PAIR, 1, true>(x, nullptr, nullptr, r0, gridDim.x, rows, cv * V, C, sq);
            } else {  // an element at a time (as in the backward)
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    rn_pair_sums<T, 1, PAIR, 1, false>(x, nullptr, nullptr, r0, gridDim.x, rows, cv * V + q, C, sq);
            }
        }
        const float* totals = block_sum<PAIR>(sq, scratch);
#pragma unroll
        for (int p = 0; p < PAIR; ++p) {
            const long long r = r0 + p * (long long)gridDim.x;
            if (r >= rows) break;
            const float s = rsqrtf(totals[p] / (float)C + eps);
            for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
                if (vec) {
                    rn_forward_chunk<T, V, true>(x + r * C, gamma, y + r * C, cv * V, C, s);
                } else {
                    rn_forward_chunk<T, V, false>(x + r * C, gamma, y + r * C, cv * V, C, s);
                }
            }
        }
    }
}

// dx of one chunk; adds the chunk's dgamma terms to acc. VEC: the rows' (and gamma's) 16-byte
// test, as a template argument so the three loads issue back to back (as in rn_pair_sums).
template <typename T, int V, bool VEC>
__device__ __forceinline__ void rn_backward_chunk(const T* __restrict__ xr, const T* __restrict__ dyr,
                                                  const float* __restrict__ gamma, T* __restrict__ dxr,
                                                  long long c0, long long C, float s, float coef,
                                                  float (&acc)[V]) {
    const Pack<T, V> xp = load_pack<T, V, VEC>(xr, c0, C);
    const Pack<T, V> dyp = load_pack<T, V, VEC>(dyr, c0, C);
    const Pack<float, V> gp = load_pack<float, V, VEC>(gamma, c0, C);
    float d[V];
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const float xv = to_f32(xp.v[q]), dy = to_f32(dyp.v[q]);
        d[q] = s * gp.v[q] * dy - coef * xv;
        acc[q] += dy * xv * s;
    }
    store_row<T, V>(dxr, c0, C, VEC, d);
}

// Backward: grid-stride over rows, a block per pair of rows at a time (rows r and r + gridDim.x:
// the loads of both are in flight together; one row at a time left the kernel waiting on memory
// at 37% of copy bandwidth). Pass 1 sums x^2 and gamma*dy*x over both rows, pass 2 (L1 re-reads)
// writes dx and accumulates dgamma in registers; each block writes its sum to its own row of
// dgamma_partial [gridDim.x, C] (the rows are summed by dgamma_column_sums below), so the grid
// has at least a pair of rows per block: the partial rows cost as many bytes as the block's rows.
// Plain stores, no atomics: with every block adding into one [C] row, ~1000 blocks x C atomics
// on the same C addresses took 138 us at 1024 x 2560 on an H100.
template <typename T>
__device__ void rms_norm_backward(const T* __restrict__ x, const float* __restrict__ gamma,
                                  const T* __restrict__ dy, T* __restrict__ dx,
                                  float* __restrict__ dgamma_partial, long long rows, long long C,
                                  long long eps_bits) {
    constexpr int V = 16 / (int)sizeof(T);
    constexpr int PAIR = 2;
    __shared__ float scratch[(MAX_WAVES + 1) * 2 * PAIR];
    const float eps = rn_eps(eps_bits);
    const long long chunks = (C + V - 1) / V;
    const bool vec = pack_ok<T, V>(x, C) && pack_ok<T, V>(dy, C) && pack_ok<T, V>(dx, C) &&
                     pack_ok<float, V>(gamma, C);
    DgammaRow<RN_REG_CHUNKS, V> dgamma(dgamma_partial + blockIdx.x * C, chunks, C);
    for (long long r0 = blockIdx.x; r0 < rows; r0 += PAIR * (long long)gridDim.x) {
        // sums[2p] = sum x^2, sums[2p + 1] = sum gamma * dy * x of row r0 + p * gridDim.x.
        float sums[2 * PAIR] = {};
        for (long long cv = threadIdx.x; cv < chunks; cv += blockDim.x) {
            if (vec) {
                rn_pair_sums<T, V, PAIR, 2, true>(x, gamma, dy, r0, gridDim.x, rows, cv * V, C, sums);
            } else {  // an element at a time: hoisted, its loads (a register each) would spill
#pragma unroll 1
                for (int q = 0; q < V; ++q)
                    rn_pair_sums<T, 1, PAIR, 2, false>(x, gamma, dy, r0, gridDim.x, rows, cv * V + q, C, sums);
            }
        }
        const float* totals = block_sum<2 * PAIR>(sums, scratch);
#pragma unroll
        for (int p = 0; p < PAIR; ++p) {
            const long long r = r0 + p * (long long)gridDim.x;
            if (r >= rows) break;
            const T* xr = x + r * C;
            const T* dyr = dy + r * C;
            const float s = rsqrtf(totals[2 * p] / (float)C + eps);
            const float coef = s * s * s * totals[2 * p + 1] / (float)C;
#pragma unroll
            for (int m = 0; m < RN_REG_CHUNKS; ++m) {
                const long long cv = dgamma.reg_chunk(m);
                if (cv >= chunks) continue;
                if (vec) {
                    rn_backward_chunk<T, V, true>(xr, dyr, gamma, dx + r * C, cv * V, C, s, coef, dgamma.reg[m]);
                } else {
                    rn_backward_chunk<T, V, false>(xr, dyr, gamma, dx + r * C, cv * V, C, s, coef, dgamma.reg[m]);
                }
            }
            for (long long cv = dgamma.first_tail_chunk(); cv < chunks; cv += blockDim.x) {
                float part[V];
#pragma unroll
                for (int q = 0; q < V; ++q) part[q] = 0.0f;
                if (vec) {
                    rn_backward_chunk<T, V, true>(xr, dyr, gamma, dx + r * C, cv * V, C, s, coef, part);
                } else {
                    rn_backward_chunk<T, V, false>(xr, dyr, gamma, dx + r * C, cv * V, C, s, coef, part);
                }
                dgamma.add(cv, part);
            }
        }
    }
    dgamma.write();
}

// dgamma [C] = the sum of the backward's per-block rows dgamma_partial [blocks, C]. A block owns
// RN_SUM_COLUMNS adjacent columns (one 32-byte sector of each row) and splits the rows among
// blockDim.x / RN_SUM_COLUMNS groups of threads, so every column's sum has many loads in flight
// and every load is a full sector; the groups' sums meet in shared memory.
constexpr int RN_SUM_COLUMNS = 8;

__device__ void dgamma_column_sums(const float* __restrict__ dgamma_partial, float* __restrict__ dgamma,
                                    long long blocks, long long C) {
    __shared__ float group_sums[MAX_BLOCK];
    const int groups = blockDim.x / RN_SUM_COLUMNS;
    const int group = threadIdx.x / RN_SUM_COLUMNS;
    const long long col = (long long)blockIdx.x * RN_SUM_COLUMNS + threadIdx.x % RN_SUM_COLUMNS;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four independent chains of loads
    if (col < C) {
        long long r = group;
        for (; r + 3LL * groups < blocks; r += 4LL * groups) {
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i] += dgamma_partial[(r + (long long)i * groups) * C + col];
        }
        for (; r < blocks; r += groups) acc[0] += dgamma_partial[r * C + col];
    }
    group_sums[threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    __syncthreads();
    if (threadIdx.x < RN_SUM_COLUMNS && col < C) {
        float total = 0.0f;
        for (int g = 0; g < groups; ++g) total += group_sums[g * RN_SUM_COLUMNS + threadIdx.x];
        dgamma[col] = total;
    }
}

// Exported kernels, one per storage dtype (no stream count: rows of C).
#define RN_FWD_PARAMS(T) const T *x, const float *gamma, T *y, long long rows, long long C, long long eps_bits
#define RN_BWD_PARAMS(T) \
    const T *x, const float *gamma, const T *dy, T *dx, float *dgamma_partial, long long rows, long long C, \
        long long eps_bits
extern "C" __global__ void rms_norm_fwd_f32(RN_FWD_PARAMS(float)) { rms_norm_forward<float>(x, gamma, y, rows, C, eps_bits); }
extern "C" __global__ void rms_norm_fwd_bf16(RN_FWD_PARAMS(mhc_bf16)) { rms_norm_forward<mhc_bf16>(x, gamma, y, rows, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, RN_BWD_MIN_BLOCKS) rms_norm_bwd_f32(RN_BWD_PARAMS(float)) { rms_norm_backward<float>(x, gamma, dy, dx, dgamma_partial, rows, C, eps_bits); }
extern "C" __global__ void __launch_bounds__(MAX_BLOCK, RN_BWD_MIN_BLOCKS) rms_norm_bwd_bf16(RN_BWD_PARAMS(mhc_bf16)) { rms_norm_backward<mhc_bf16>(x, gamma, dy, dx, dgamma_partial, rows, C, eps_bits); }
extern "C" __global__ void rms_norm_dgamma_sum(const float *dgamma_partial, float *dgamma, long long blocks, long long C) {
    dgamma_column_sums(dgamma_partial, dgamma, blocks, C);
}
