// mHC dynamic coefficients (spec/mhc.md): H = activations(alpha_g * (xbar . phi) / r + b), with
// H_res = Sinkhorn(...), and the exact backward (Sinkhorn iterates recomputed, never stored).
//
// ext [T, 2k+1] f32 = [H (k) | P (k) | r (1)] per token, and h [T, k] = H alone (what pre and post
// read, and the shape of the dH the backward takes); k = n*n + 2n; columns of H:
// [pre (n) | post (n) | res (n*n, row-major i*n + j)]. alpha_b [3 + k] = (alpha_pre, alpha_post,
// alpha_res, b_0 .. b_{k-1}). x [T, n*C] in the storage dtype, phi [n*C, k] f32. All arithmetic f32.
#include "mhc_common.h"

using namespace mhc;

namespace {

constexpr float EPS_RMS = 1e-6f;
constexpr float EPS_SINKHORN = 1e-6f;

// 0 = pre, 1 = post, 2 = res: the alpha that scales column c.
template <int N> __device__ __forceinline__ int group_of(int c) { return c < N ? 0 : (c < 2 * N ? 1 : 2); }

// Ht_c = alpha_g(c) * P_c / r + b_c, with inv_r = 1 / r.
template <int N>
__device__ __forceinline__ float logit(const float* __restrict__ alpha_b, int c, float p, float inv_r) {
    return alpha_b[group_of<N>(c)] * p * inv_r + alpha_b[3 + c];
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// Sinkhorn-Knopp on the n x n logits in m (H_res on return): M0 = exp(L - max L), then `iters`
// times columns then rows normalised by (sum + eps) (one reciprocal per sum, then products: within
// an ulp of dividing each entry, and n times fewer divisions on the critical path; every sum lies
// in [eps, n + eps], where mhc_rcp is within an ulp). When `den` is set, the denominator of
// half-step h (h = 2*it for columns, 2*it + 1 for rows), entry i, goes to den[(h*N + i) * stride].
template <int N>
__device__ void sinkhorn(float (&m)[N][N], int iters, float* __restrict__ den, long long stride) {
    float mx = m[0][0];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) mx = fmaxf(mx, m[i][j]);
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) m[i][j] = expf(m[i][j] - mx);
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < N; ++i) s += m[i][j];
            s += EPS_SINKHORN;
            if (den) den[((2 * it) * N + j) * stride] = s;
            const float inv = mhc_rcp(s);
#pragma unroll
            for (int i = 0; i < N; ++i) m[i][j] *= inv;
        }
#pragma unroll
        for (int i = 0; i < N; ++i) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) s += m[i][j];
            s += EPS_SINKHORN;
            if (den) den[((2 * it + 1) * N + i) * stride] = s;
            const float inv = mhc_rcp(s);
#pragma unroll
            for (int j = 0; j < N; ++j) m[i][j] *= inv;
        }
    }
}

// Exact vector-Jacobian product of `sinkhorn` at the logits l: dm holds dL/dH_res on entry and
// dL/dlogits on return. Runs the forward once to record the 2n denominators of every half-step
// in `den` (per-thread, strided), then walks the half-steps in reverse: the input of a half-step
// is its output times the denominators, and dX = (dY - <dY, Y>_axis) / den.
template <int N>
__device__ void sinkhorn_backward(const float (&l)[N][N], float (&dm)[N][N], int iters, float* __restrict__ den,
                                  long long stride) {
    float m[N][N];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) m[i][j] = l[i][j];
    sinkhorn<N>(m, iters, den, stride);
    // The walk goes down one iteration (its row half-step, then its column half-step) at a time;
    // the next iteration's 2n denominators are loaded while this one computes (the walk is a
    // chain of 2 * iters dependent half-steps, each otherwise waiting on its loads).
    float d_row[N], d_col[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        d_row[i] = iters > 0 ? den[((2 * iters - 1) * N + i) * stride] : 1.0f;
        d_col[i] = iters > 0 ? den[((2 * iters - 2) * N + i) * stride] : 1.0f;
    }
    for (int it = iters - 1; it >= 0; --it) {
        float next_row[N], next_col[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
            next_row[i] = it > 0 ? den[((2 * it - 1) * N + i) * stride] : 1.0f;
            next_col[i] = it > 0 ? den[((2 * it - 2) * N + i) * stride] : 1.0f;
        }
        // Rows (half-step 2 it + 1): dX = (dY - <dY, Y>_row) / den_row, X = Y den_row.
#pragma unroll
        for (int i = 0; i < N; ++i) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) dot += dm[i][j] * m[i][j];
            const float inv = mhc_rcp(d_row[i]);
#pragma unroll
            for (int j = 0; j < N; ++j) {
                dm[i][j] = (dm[i][j] - dot) * inv;
                m[i][j] *= d_row[i];
            }
        }
        // Columns (half-step 2 it): likewise along each column.
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < N; ++i) dot += dm[i][j] * m[i][j];
            const float inv = mhc_rcp(d_col[j]);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                dm[i][j] = (dm[i][j] - dot) * inv;
                m[i][j] *= d_col[j];
            }
        }
#pragma unroll
        for (int i = 0; i < N; ++i) {
            d_row[i] = next_row[i];
            d_col[i] = next_col[i];
        }
    }
    // dL = dM0 * M0, and through the subtracted max m = L[argmax] (first largest, row-major, as
    // the CPU op and the reference take it): dM0/dm = -M0, so dL[argmax] -= sum(dM0 * M0).
    float mx = l[0][0];
    int argmax = 0;
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (l[i][j] > mx) {
                mx = l[i][j];
                argmax = i * N + j;
            }
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) {
            dm[i][j] *= expf(l[i][j] - mx);
            total += dm[i][j];
        }
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (i * N + j == argmax) dm[i][j] -= total;
}

// Writes one token's ext row [H | P | r] from its projection p and rms r.
template <int N>
__device__ void write_ext(const float (&p)[N * N + 2 * N], float r, const float* __restrict__ alpha_b, int iters,
                          float* __restrict__ ext_row) {
    constexpr int K = N * N + 2 * N;
    const float inv_r = 1.0f / r;
#pragma unroll
    for (int c = 0; c < N; ++c) ext_row[c] = sigmoid(logit<N>(alpha_b, c, p[c], inv_r));
#pragma unroll
    for (int c = N; c < 2 * N; ++c) ext_row[c] = 2.0f * sigmoid(logit<N>(alpha_b, c, p[c], inv_r));
    float m[N][N];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) m[i][j] = logit<N>(alpha_b, 2 * N + i * N + j, p[2 * N + i * N + j], inv_r);
    sinkhorn<N>(m, iters, nullptr, 0);
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) ext_row[2 * N + i * N + j] = m[i][j];
#pragma unroll
    for (int c = 0; c < K; ++c) ext_row[K + c] = p[c];
    ext_row[2 * K] = r;
}

// Static mode: P = 0, r = 1 for every token, so H = activations(b). One thread per token.
template <int N>
__device__ void coeffs_static(const float* __restrict__ alpha_b, float* __restrict__ ext, float* __restrict__ h,
                              long long tokens, int iters) {
    constexpr int K = N * N + 2 * N;
    const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float p[K];
#pragma unroll
    for (int c = 0; c < K; ++c) p[c] = 0.0f;
    float* ext_row = ext + t * (2 * K + 1);
    write_ext<N>(p, 1.0f, alpha_b, iters, ext_row);
#pragma unroll
    for (int c = 0; c < K; ++c) h[t * K + c] = ext_row[c];
}

// ---- Forward projection: P = xbar . phi and sum(xbar^2), per (token tile, slice of D) ----------
//
// The skinny GEMM [T, D] x [D, k] (D = n*C, k <= 80) runs in blocks of PROJ_TOKENS tokens x one
// slice of D (`d_per_split` elements, a multiple of 64 = ProjStep<T>::CHUNK for both dtypes; grid
// y = slices), so short inputs still fill the device: T = 1024 is 16 token tiles, and slices of
// D multiply that. Each block writes its partial row [P (k) | sum x^2 (1)] per token to
// partial[slice][t]; `coeffs_finish` adds the slices and applies scale, bias, activations and
// Sinkhorn.
//
// Per step a block takes 128 bytes of each of its token rows. x goes global -> shared by 16-byte
// asynchronous copies, PROJ_STAGES - 1 steps ahead (the kernel is bound by bytes in flight: with
// one step prefetched through registers it read x at ~0.7 TB/s on an H100, whatever the dtype).
// phi's matching rows (an L2-resident run of CHUNK * k floats) go through registers one step
// ahead. Then the staged tiles are multiplied: on NVIDIA with bf16 storage on tensor cores
// (MmaProduct), otherwise with FFMA (FmaProduct).
constexpr int PROJ_TOKENS = 64;
constexpr int PROJ_THREADS = 128;
constexpr int PROJ_STAGES = 3;
// 16-byte copies per token row per step, copies per thread per step, and the token rows one
// thread's copies cover: tid / PROJ_ROW_COPIES + i * PROJ_ROW_STEP.
constexpr int PROJ_ROW_COPIES = 8;
constexpr int PROJ_COPIES = PROJ_TOKENS * PROJ_ROW_COPIES / PROJ_THREADS;
constexpr int PROJ_ROW_STEP = PROJ_THREADS / PROJ_ROW_COPIES;
static_assert(PROJ_TOKENS * PROJ_ROW_COPIES % PROJ_THREADS == 0, "whole copies per thread");
// Resident blocks per multiprocessor the register budget is set for on NVIDIA: five (96
// registers) for n <= 4, where that costs no spills; fewer for the wider n = 5..8 accumulators.
// AMD's clang reads the hint as waves per EU and warns when unmet: no hint there. The launch
// layer sizes the grid to one wave of these (project_resident_blocks in src/gpu/mod.rs).
constexpr int proj_min_blocks(int n) { return MHC_NVIDIA ? (n <= 4 ? 5 : 2) : 1; }

template <typename T> struct ProjStep {
    static constexpr int VEC = 16 / (int)sizeof(T);          // elements per copy
    static constexpr int CHUNK = PROJ_ROW_COPIES * VEC;     // elements of D per step: 64 bf16, 32 f32
    static constexpr int XS = CHUNK + VEC;                  // staged row stride: 16-byte rows, padded
    static constexpr int STAGE = PROJ_TOKENS * XS;          // elements per stage
};

// FFMA product of a staged tile: thread (q, g) owns tokens q + 16 i (i < 4) and the KC columns
// of group g (8 groups), so per element of D it reads 4 x values (rows 16 apart) and KC phi
// values (one address per group: broadcasts).
template <typename T, int N> struct FmaProduct {
    static constexpr bool SUMS_SQUARES = false;  // the kernel adds x^2 with FFMA
    static constexpr int K = N * N + 2 * N;
    static constexpr int KC = (K + 7) / 8;
    static constexpr int CHUNK = ProjStep<T>::CHUNK;
    static constexpr int XS = ProjStep<T>::XS;
    // Row stride of staged phi. Columns g*KC + j >= k read into the next row (or the padding
    // row at the end): their sums land in result columns that are never written out.
    static constexpr int PS = K;
    static constexpr int OUT_STRIDE = 8 * KC;
    static_assert(PROJ_THREADS == 16 * 8 && PROJ_TOKENS == 16 * 4, "FmaProduct's thread map");
    struct Shared {
        float phi[(CHUNK + 1) * PS];
    };
    float acc[4][KC];

    __device__ void init() {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < KC; ++j) acc[i][j] = 0.0f;
    }
    __device__ void stage_phi(Shared& s, int at, float v) { s.phi[at] = v; }
    __device__ void stage_phi4(Shared& s, int at, float4 v) { *reinterpret_cast<float4*>(&s.phi[at]) = v; }
    __device__ void multiply(const T* __restrict__ xs, const Shared& s) {
        const int q = threadIdx.x % 16, g = threadIdx.x / 16;
#pragma unroll 4
        for (int d = 0; d < CHUNK; ++d) {
            float xv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) xv[i] = to_f32(xs[(q + 16 * i) * XS + d]);
#pragma unroll
            for (int j = 0; j < KC; ++j) {
                const float w = s.phi[d * PS + g * KC + j];
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][j] += xv[i] * w;
            }
        }
    }
    __device__ void store(float* out, float*) const {  // sums of squares: the kernel's own
        const int q = threadIdx.x % 16, g = threadIdx.x / 16;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < KC; ++j) out[(q + 16 * i) * OUT_STRIDE + g * KC + j] = acc[i][j];
    }
};

// An f32 operand of the tensor-core products as two bf16 parts, v ~ hi + lo to ~2^-16 relative:
// hi = bf16(v), lo = bf16(v - hi).
struct SplitBf16 {
    mhc_bf16 hi, lo;
};
__device__ __forceinline__ SplitBf16 split_bf16(float v) {
    const mhc_bf16 hi = mhc_f32_to_bf16(v);
    return {hi, mhc_f32_to_bf16(v - mhc_bf16_to_f32(hi))};
}

#if MHC_TENSOR_CORES

// Tensor-core product for bf16 storage, in 16 x 16 accumulator tiles (k padded to KP). x is
// exact in bf16; phi (f32) is staged as hi = bf16(phi) and lo = bf16(phi - hi), two MMAs per
// tile, so P carries phi to ~2^-17 relative (the FFMA path: ~2^-24 per term; both far inside the
// spec's bf16 bound). Warp w owns tokens 32 (w % 2) .. + 31 (two row tiles) and every column,
// over half of each step's 64 elements of D (16-element slices 2 (w / 2) and 2 (w / 2) + 1):
// each phi fragment it loads feeds two MMAs. (One row tile per warp over the whole step read
// 40 KB of shared memory per step and block, the kernel's busiest pipe; this reads 24 KB.) The
// two halves' sums meet in `store`.
//
// The sums of squares come from the tensor cores too: sq[r] += X_r X_r^T over the same slices
// (B = the staged rows read column-major), whose diagonal is each token's sum of x^2 (exact
// products of bf16 values, f32 sums, as with FFMA). Its 16x waste costs 2 MMAs per slice and row
// tile; the FFMA form spent ~70 instructions per thread and step unpacking and squaring x.
//
// Tried on an H200 at T = 16384, C = 1280 (84 us) and dropped: the fragments by plain 32-bit
// shared loads (load_matrix_sync's bf16 loads are generic, and row-major B takes a transpose
// per word) with phi staged column-major, 85 us; two waves of 5-slice blocks instead of one of
// 2-slice blocks (148 of 660 slots idle), 87 us; no phi staging at all (wrong results, a bound),
// 75 us. ncu: 22% occupancy, no eligible warp half the time, DRAM at 42%.
template <int N> struct MmaProduct {
    static constexpr bool SUMS_SQUARES = true;
    static constexpr int K = N * N + 2 * N;
    static constexpr int KP = (K + 15) / 16 * 16;
    static constexpr int TILES = KP / 16;
    static constexpr int CHUNK = ProjStep<mhc_bf16>::CHUNK;
    static constexpr int XS = ProjStep<mhc_bf16>::XS;
    // Row strides in elements: multiples of 8 (WMMA's ldm rule for 16-bit types), so 16-row
    // steps stay 32-byte aligned. phi's is k rounded up to 8 (k itself for even n); tile columns
    // past k read into the next row (or the padding rows at the end) and land in result columns
    // that are never written out (each output column depends on its own B column only).
    static constexpr int PS = (K + 7) / 8 * 8;
    static constexpr int OUT_STRIDE = KP;
    static_assert(PROJ_THREADS == 4 * 32 && PROJ_TOKENS == 2 * 32, "two row pairs x two halves of D");
    static_assert(XS % 8 == 0 && CHUNK == 4 * 16, "WMMA tiles of the staged x");
    struct Shared {
        mhc_bf16 phi_hi[(CHUNK + 2) * PS];
        mhc_bf16 phi_lo[(CHUNK + 2) * PS];
    };
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][TILES], sq[2];

    __device__ void init() {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int n = 0; n < TILES; ++n) nvcuda::wmma::fill_fragment(acc[r][n], 0.0f);
            nvcuda::wmma::fill_fragment(sq[r], 0.0f);
        }
    }
    __device__ void stage_phi(Shared& s, int at, float v) {
        const SplitBf16 p = split_bf16(v);
        s.phi_hi[at] = p.hi;
        s.phi_lo[at] = p.lo;
    }
    __device__ void stage_phi4(Shared& s, int at, float4 v) {
        const float f[4] = {v.x, v.y, v.z, v.w};
        Pack<mhc_bf16, 4> hi, lo;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const SplitBf16 p = split_bf16(f[u]);
            hi.v[u] = p.hi;
            lo.v[u] = p.lo;
        }
        *reinterpret_cast<Pack<mhc_bf16, 4>*>(&s.phi_hi[at]) = hi;
        *reinterpret_cast<Pack<mhc_bf16, 4>*>(&s.phi_lo[at]) = lo;
    }
    __device__ void multiply(const mhc_bf16* __restrict__ xs, const Shared& s) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32;
        const mhc_bf16* rows = xs + 32 * (warp % 2) * XS;
#pragma unroll
        for (int half_ks = 0; half_ks < 2; ++half_ks) {
            const int ks = 2 * (warp / 2) + half_ks;
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
            wmma::load_matrix_sync(a[0], rows + 16 * ks, XS);
            wmma::load_matrix_sync(a[1], rows + 16 * XS + 16 * ks, XS);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> xt;
                wmma::load_matrix_sync(xt, rows + 16 * r * XS + 16 * ks, XS);
                wmma::mma_sync(sq[r], a[r], xt, sq[r]);
            }
#pragma unroll
            for (int n = 0; n < TILES; ++n) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(b, &s.phi_hi[16 * ks * PS + 16 * n], PS);
                wmma::mma_sync(acc[0][n], a[0], b, acc[0][n]);
                wmma::mma_sync(acc[1][n], a[1], b, acc[1][n]);
                wmma::load_matrix_sync(b, &s.phi_lo[16 * ks * PS + 16 * n], PS);
                wmma::mma_sync(acc[0][n], a[0], b, acc[0][n]);
                wmma::mma_sync(acc[1][n], a[1], b, acc[1][n]);
            }
        }
    }
    // The sums of squares first: each warp's sq tiles go to `out` as scratch ([warp][r][16 x 16],
    // 8 KB, which the caller's buffer holds) and the first 64 threads add the two halves'
    // diagonals into sum_sq[token]. Then the second half's warps store their P sums in place,
    // and the first half's add theirs to them. Every thread of the block calls it.
    __device__ void store(float* out, float* __restrict__ sum_sq) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32;
#pragma unroll
        for (int r = 0; r < 2; ++r)
            wmma::store_matrix_sync(out + (2 * warp + r) * 256, sq[r], 16, wmma::mem_row_major);
        __syncthreads();
        // Token row 32 (w % 2) + 16 r + d: its diagonal entries in warps w % 2 and w % 2 + 2.
        if (threadIdx.x < PROJ_TOKENS) {
            const int w = threadIdx.x / 32, r = (threadIdx.x / 16) % 2, d = threadIdx.x % 16;
            sum_sq[threadIdx.x] = out[(2 * w + r) * 256 + 17 * d] + out[(2 * (w + 2) + r) * 256 + 17 * d];
        }
        __syncthreads();
        float* tile = out + 32 * (warp % 2) * OUT_STRIDE;
        if (warp / 2 == 1) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int n = 0; n < TILES; ++n)
                    wmma::store_matrix_sync(tile + 16 * r * OUT_STRIDE + 16 * n, acc[r][n], OUT_STRIDE,
                                            wmma::mem_row_major);
        }
        __syncthreads();
        if (warp / 2 == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int n = 0; n < TILES; ++n) {
                    wmma::fragment<wmma::accumulator, 16, 16, 16, float> part;
                    wmma::load_matrix_sync(part, tile + 16 * r * OUT_STRIDE + 16 * n, OUT_STRIDE,
                                           wmma::mem_row_major);
#pragma unroll
                    for (int i = 0; i < part.num_elements; ++i) acc[r][n].x[i] += part.x[i];
                    wmma::store_matrix_sync(tile + 16 * r * OUT_STRIDE + 16 * n, acc[r][n], OUT_STRIDE,
                                            wmma::mem_row_major);
                }
        }
    }
};
#endif

template <typename T, int N> struct ProductFor {
    using type = FmaProduct<T, N>;
};
#if MHC_TENSOR_CORES
template <int N> struct ProductFor<mhc_bf16, N> {
    using type = MmaProduct<N>;
};
#endif

// The thread's share of the x copies, one step after another: PROJ_COPIES 16-byte pieces per
// step, piece i at row r + i * PROJ_ROW_STEP (r = threadIdx.x / PROJ_ROW_COPIES), column
// (threadIdx.x % PROJ_ROW_COPIES) * VEC of the block's tile. The source is one pointer (piece 0)
// and a row step, set once, and each step moves the pointer CHUNK columns on: the per-step
// 64-bit row arithmetic had been a fifth of the projection's instructions. Pieces past the
// last token or at or past the slice's end are zeros (their results are dropped, and they must
// not add to P or the sum of squares). Rows that are not 16-byte aligned (D not a multiple of
// VEC, or an offset view) are copied element by element, at once.
template <typename T> struct XCopies {
    using S = ProjStep<T>;
    const T* src;        // the next step's piece 0 in x
    int row_step;        // elements from one piece's row to the next's (an int: rows of D < 2^27)
    int rows_in;         // pieces whose token exists: i < rows_in
    int left;            // the slice's columns from the next step's first on
    int col;             // the pieces' column in the tile

    __device__ XCopies(const T* __restrict__ x, long long t0, long long tokens, long long D, long long e_begin,
                       long long e_end) {
        const int r = threadIdx.x / PROJ_ROW_COPIES;
        col = (threadIdx.x % PROJ_ROW_COPIES) * S::VEC;
        left = (int)(e_end - e_begin);
        row_step = (int)(PROJ_ROW_STEP * D);
        const long long rows = tokens - t0 - r;  // this thread's rows from r on (may be <= 0)
        rows_in = rows <= 0 ? 0 : (int)((rows + PROJ_ROW_STEP - 1) / PROJ_ROW_STEP);
        src = x + (rows_in > 0 ? (t0 + r) * D + e_begin + col : 0);
    }
    // Starts the next step's copies into `stage`.
    __device__ __forceinline__ void issue_next(T* __restrict__ stage, bool vec) {
        const T* from = src;
#pragma unroll
        for (int i = 0; i < PROJ_COPIES; ++i, from += row_step) {
            T* dst = stage + (threadIdx.x / PROJ_ROW_COPIES + PROJ_ROW_STEP * i) * S::XS + col;
            const bool row_ok = i < rows_in;
            if (vec) {
                mhc_copy16_async(dst, from, row_ok && col < left);  // zero-filled when false, not read
            } else {
#pragma unroll
                for (int q = 0; q < S::VEC; ++q) dst[q] = row_ok && col + q < left ? from[q] : from_f32<T>(0.0f);
            }
        }
        src += S::CHUNK;
        left -= S::CHUNK;
    }
};

// The matching phi rows e0 .. e0 + CHUNK: one contiguous run of CHUNK * k floats (zero past
// e_end), in float4s: float4 idx = threadIdx.x + i * PROJ_THREADS of the run in pf[i] (k is a
// multiple of 4 wherever the caller takes this form, so a float4 lies wholly before or past
// e_end). A run that is not 16-byte aligned (phi an offset view) is read element by element.
template <int K, int LOADS>
__device__ __forceinline__ void load_phi_step(const float* __restrict__ phi, long long e0, long long e_end,
                                              bool aligned, float4 (&pf)[LOADS]) {
    const float* run = phi + e0 * K;
    const long long len = (e_end - e0) * K / 4;
    if (aligned) {
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int idx = threadIdx.x + PROJ_THREADS * i;
            pf[i] = idx < len ? reinterpret_cast<const float4*>(run)[idx] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    } else {
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int idx = threadIdx.x + PROJ_THREADS * i;
            const bool in = idx < len;
            pf[i] = make_float4(in ? run[4 * idx] : 0.0f, in ? run[4 * idx + 1] : 0.0f, in ? run[4 * idx + 2] : 0.0f,
                                in ? run[4 * idx + 3] : 0.0f);
        }
    }
}
// Element-wise form, for k not a multiple of 4 (odd n): element idx = threadIdx.x + i *
// PROJ_THREADS of the run in pf[i].
template <int K, int LOADS>
__device__ __forceinline__ void load_phi_step(const float* __restrict__ phi, long long e0, long long e_end,
                                              bool, float (&pf)[LOADS]) {
    const float* run = phi + e0 * K;
    const long long len = (e_end - e0) * K;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        const int idx = threadIdx.x + PROJ_THREADS * i;
        pf[i] = idx < len ? run[idx] : 0.0f;
    }
}

template <typename T, int N>
__device__ void coeffs_project(const T* __restrict__ x, const float* __restrict__ phi, float* __restrict__ partial,
                               long long tokens, long long D, long long d_per_split) {
    using Product = typename ProductFor<T, N>::type;
    using S = ProjStep<T>;
    constexpr int K = N * N + 2 * N;
    constexpr int CHUNK = S::CHUNK;
    constexpr int PS = Product::PS;
    // phi's run per step in float4s where they divide it evenly among the threads and the staged
    // rows are unpadded (even n), else element by element.
    constexpr bool PHI_VEC = PS == K && K % 4 == 0 && CHUNK * K % (4 * PROJ_THREADS) == 0;
    constexpr int PHI_LOADS = PHI_VEC ? CHUNK * K / 4 / PROJ_THREADS : (CHUNK * K + PROJ_THREADS - 1) / PROJ_THREADS;
    using PhiLoad = typename Select<PHI_VEC, float4, float>::type;
    // The x stages, then (after the last step) the product's result in the same bytes.
    __shared__ __align__(128) T xs[PROJ_STAGES * S::STAGE];
    static_assert(sizeof(xs) >= PROJ_TOKENS * Product::OUT_STRIDE * sizeof(float) && sizeof(xs) >= 8 * 1024,
                  "the result (and MmaProduct's 8 KB of square sums) fit the stages");
    __shared__ __align__(32) typename Product::Shared staged;
    __shared__ float s_sum_sq[PROJ_TOKENS];

    const long long t0 = blockIdx.x * (long long)PROJ_TOKENS;
    const long long e_begin = blockIdx.y * d_per_split;
    const long long e_end = e_begin + d_per_split < D ? e_begin + d_per_split : D;
    const int steps = (int)((e_end - e_begin + CHUNK - 1) / CHUNK);
    const bool vec = pack_ok<T, S::VEC>(x, D);
    Product product;
    product.init();
    float sum_sq[PROJ_COPIES];  // per copied row, FFMA form only (MmaProduct sums its own)
#pragma unroll
    for (int i = 0; i < PROJ_COPIES; ++i) sum_sq[i] = 0.0f;
    XCopies<T> copies(x, t0, tokens, D, e_begin, e_end);
#pragma unroll
    for (int s = 0; s < PROJ_STAGES - 1; ++s) {
        if (s < steps) copies.issue_next(xs + s * S::STAGE, vec);
        mhc_copy_commit();
    }
    const bool phi_aligned = ((unsigned long long)phi) % 16 == 0;
    PhiLoad pf[PHI_LOADS];
    load_phi_step<K>(phi, e_begin, e_end, phi_aligned, pf);
    for (int step = 0; step < steps; ++step) {
        const long long e0 = e_begin + (long long)step * CHUNK;
        mhc_copy_wait<PROJ_STAGES - 2>();  // this thread's copies of this step have landed
        __syncthreads();  // everyone's have; everyone is done with the previous step's tiles
        const int ahead = step + PROJ_STAGES - 1;
        if (ahead < steps) copies.issue_next(xs + (ahead % PROJ_STAGES) * S::STAGE, vec);
        mhc_copy_commit();
        const T* stage = xs + (step % PROJ_STAGES) * S::STAGE;
        if constexpr (!Product::SUMS_SQUARES) {
#pragma unroll
            for (int i = 0; i < PROJ_COPIES; ++i) {
                const int v = threadIdx.x + PROJ_THREADS * i;
                const T* own = stage + (v / PROJ_ROW_COPIES) * S::XS + (v % PROJ_ROW_COPIES) * S::VEC;
                const Pack<T, S::VEC> pk = *reinterpret_cast<const Pack<T, S::VEC>*>(own);
#pragma unroll
                for (int q = 0; q < S::VEC; ++q) {
                    const float f = to_f32(pk.v[q]);
                    sum_sq[i] += f * f;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < PHI_LOADS; ++i) {
            const int idx = threadIdx.x + PROJ_THREADS * i;
            if constexpr (PHI_VEC) {
                product.stage_phi4(staged, 4 * idx, pf[i]);
            } else if (idx < CHUNK * K) {
                product.stage_phi(staged, PS == K ? idx : idx / K * PS + idx % K, pf[i]);
            }
        }
        __syncthreads();
        if (step + 1 < steps) load_phi_step<K>(phi, e0 + CHUNK, e_end, phi_aligned, pf);
        product.multiply(stage, staged);
    }
    mhc_copy_wait<0>();
    __syncthreads();  // the stages are consumed; the result goes over them
    if constexpr (!Product::SUMS_SQUARES) {
        // Row sums of squares (FFMA form): the PROJ_ROW_COPIES lanes that copied a row are
        // neighbours in one wave.
#pragma unroll
        for (int i = 0; i < PROJ_COPIES; ++i)
#pragma unroll
            for (int m = 1; m < PROJ_ROW_COPIES; m *= 2) sum_sq[i] += mhc_shfl_xor(sum_sq[i], m);
        if (threadIdx.x % PROJ_ROW_COPIES == 0) {
#pragma unroll
            for (int i = 0; i < PROJ_COPIES; ++i)
                s_sum_sq[threadIdx.x / PROJ_ROW_COPIES + PROJ_ROW_STEP * i] = sum_sq[i];
        }
    }
    float* result = reinterpret_cast<float*>(xs);
    product.store(result, s_sum_sq);
    __syncthreads();
    for (int idx = threadIdx.x; idx < PROJ_TOKENS * (K + 1); idx += PROJ_THREADS) {
        const int row = idx / (K + 1), c = idx % (K + 1);
        const long long t = t0 + row;
        if (t < tokens)
            partial[(blockIdx.y * tokens + t) * (K + 1) + c] =
                c < K ? result[row * Product::OUT_STRIDE + c] : s_sum_sq[row];
    }
}

// Per tile of FINISH_TOKENS tokens (one block of FINISH_THREADS): P and sum x^2 added over the
// `splits` slices of D, r = sqrt(mean(xbar^2) + eps_r), then scale/bias, activations and Sinkhorn
// into ext. A tile's partial rows are one contiguous run per slice, so the block sums the slices
// with coalesced loads, many in flight per thread (one thread per token walking up to 160 slices
// of its own 100-byte row took 43 us at T = 1024 on an H200); the tile's ext rows are staged in
// shared memory and written as one contiguous run, its h rows as another. One thread per token
// runs the Sinkhorn.
constexpr int FINISH_TOKENS = 16;
constexpr int FINISH_THREADS = 128;

template <int N>
__device__ void coeffs_finish(const float* __restrict__ partial, const float* __restrict__ alpha_b,
                              float* __restrict__ ext, float* __restrict__ h, long long tokens, long long D,
                              int splits, int iters) {
    constexpr int K = N * N + 2 * N;
    constexpr int ROW = K + 1;                                     // [P (k) | sum x^2]
    constexpr int RUN = FINISH_TOKENS * ROW;                       // a tile's partial run per slice
    constexpr int PER_THREAD = (RUN + FINISH_THREADS - 1) / FINISH_THREADS;
    constexpr int EXT = 2 * K + 1;
    // Slices summed per round trip to L2: about 32 loads in flight per thread (16 took 12 us at
    // T = 1024, C = 2560 on an H200, where the projection writes 40 slices).
    [[maybe_unused]] constexpr int SLICE_UNROLL = PER_THREAD >= 32 ? 1 : 32 / PER_THREAD;  // read by nvcc's pragma
    __shared__ float sums[RUN];
    __shared__ float ext_tile[FINISH_TOKENS * EXT];
    const long long t0 = blockIdx.x * (long long)FINISH_TOKENS;
    const int nt = tokens - t0 < FINISH_TOKENS ? (int)(tokens - t0) : FINISH_TOKENS;
    const int run = nt * ROW;
    float acc[PER_THREAD];
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) acc[i] = 0.0f;
#pragma unroll SLICE_UNROLL
    for (int s = 0; s < splits; ++s) {
        const float* slice = partial + (s * tokens + t0) * ROW;
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int e = threadIdx.x + i * FINISH_THREADS;
            if (e < run) acc[i] += slice[e];
        }
    }
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int e = threadIdx.x + i * FINISH_THREADS;
        if (e < RUN) sums[e] = acc[i];
    }
    __syncthreads();
    if ((int)threadIdx.x < nt) {
        const float* row = sums + threadIdx.x * ROW;
        float p[K];
#pragma unroll
        for (int c = 0; c < K; ++c) p[c] = row[c];
        const float r = sqrtf(row[K] / (float)D + EPS_RMS);
        write_ext<N>(p, r, alpha_b, iters, ext_tile + threadIdx.x * EXT);
    }
    __syncthreads();
    float* out = ext + t0 * EXT;
    for (int e = threadIdx.x; e < nt * EXT; e += FINISH_THREADS) out[e] = ext_tile[e];
    float* h_out = h + t0 * K;
    for (int e = threadIdx.x; e < nt * K; e += FINISH_THREADS) h_out[e] = ext_tile[e / K * EXT + e % K];
}

// Rows of the per-token backward scratch dp, in floats, 16-byte aligned for vector copies:
// - KPAD: [dP (k) | coef (1) | zero padding], f32 (the FFMA pass over x);
// - SPLIT: the tensor-core pass's operands, dP split as hi = bf16(dP), lo = bf16(dP - hi), each
//   zero-padded to KT 16-wide k tiles: [hi (16 KT bf16) | lo (16 KT bf16) | coef | 0 0 0] (the
//   pass stages the rows and loads its fragments from them as they are).
// Mirrored by bwd_row_len in src/gpu/mod.rs.
template <int N> struct BwdRow {
    static constexpr int K = N * N + 2 * N;
    static constexpr int KPAD = (K + 1 + 3) / 4 * 4;
    static constexpr int KT = (K + 15) / 16;
    static constexpr int SPLIT = 16 * KT + 4;
};

// Backward, per token (one thread each), from ext and dh [T, k] = dL/dH (with `add_dh_pre`, dH's
// pre columns are dh's plus dh_pre's: the chained backward hands over pre's contribution here
// instead of a [T, k] add of the two); activation and Sinkhorn backward give dHt; then
//   db_c = dHt_c, dalpha_g = sum_{c in g} dHt_c P_c / r   (summed over the block, atomically added
//   to dalpha_b, which the caller zeroes), and into dp[t]: dP_c = alpha_g dHt_c / r and
//   coef = dr / (D r) with dr = -sum_c alpha_g dHt_c P_c / r^2, so dxbar = phi dP^T + coef xbar.
// dp's rows are BwdRow::SPLIT floats when `split_dp` (the tensor-core pass reads them), else KPAD.
// `den` is scratch of 2 * iters * n floats per token, laid out [half-step][i][token]. Up to
// DEN_SHARED_ITERS iterations the block keeps them in shared memory instead ([half-step][i][lane]):
// the backward walk waits on each half-step's denominators, and from global memory (L2) that wait
// was most of the kernel (34 us at T = 1024 on an H200, for ~2 us of arithmetic).
constexpr int DEN_SHARED_ITERS = 20;
// At most 40 KB per block (n = 8 on AMD's 64-lane waves would need 80: global memory there).
template <int N>
constexpr int den_shared_floats =
    2 * DEN_SHARED_ITERS * N * MHC_WAVE * 4 <= 40 * 1024 ? 2 * DEN_SHARED_ITERS * N * MHC_WAVE : 1;
// The block's dp rows, staged for one contiguous store: a wave of rows, back to back (stored as
// float4s: H200, 14.1 -> 13.3 us at T = 16384, C = 1280; 11.4 -> 10.4 at T = 1024).
template <int N>
constexpr int dp_tile_floats = MHC_WAVE * (BwdRow<N>::SPLIT > BwdRow<N>::KPAD ? BwdRow<N>::SPLIT : BwdRow<N>::KPAD);
template <int N>
__device__ void coeffs_backward_token(const float* __restrict__ alpha_b, const float* __restrict__ ext,
                                      const float* __restrict__ dh, const float* __restrict__ dh_pre,
                                      float* __restrict__ dp, float* __restrict__ den,
                                      float* __restrict__ dalpha_b, long long tokens, long long D, int iters,
                                      int split_dp, int add_dh_pre) {
    constexpr int K = N * N + 2 * N;
    constexpr int KPAD = BwdRow<N>::KPAD, KT = BwdRow<N>::KT, SPLIT = BwdRow<N>::SPLIT;
    constexpr int NV = 3 + K;
    __shared__ float scratch[(MAX_WAVES + 1) * NV];
    // The denominators, then (their walk done) the dp rows: one buffer.
    constexpr int SHARED_FLOATS = den_shared_floats<N> > dp_tile_floats<N> ? den_shared_floats<N> : dp_tile_floats<N>;
    __shared__ __align__(16) float den_or_rows[SHARED_FLOATS];
    const long long t0 = blockIdx.x * (long long)blockDim.x;
    const long long t = t0 + threadIdx.x;
    // The block is one wave (Block::OneWave): a lane's denominators are strided by the wave, and
    // the rows fit the tile.
    const bool one_wave = blockDim.x == MHC_WAVE;
    const bool den_on_chip = den_shared_floats<N> > 1 && iters <= DEN_SHARED_ITERS && one_wave;
    float part[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) part[i] = 0.0f;
    float dpv[K], coef = 0.0f;
    if (t < tokens) {
        // The token's values go to registers first, every load in flight at once.
        const float* e = ext + t * (2 * K + 1);
        const float* de = dh + t * K;
        float h[2 * N], p[K], dht[K];
#pragma unroll
        for (int c = 0; c < 2 * N; ++c) h[c] = e[c];
#pragma unroll
        for (int c = 0; c < K; ++c) {
            p[c] = e[K + c];
            dht[c] = de[c];
        }
        if (add_dh_pre) {
#pragma unroll
            for (int c = 0; c < N; ++c) dht[c] += dh_pre[t * K + c];
        }
        const float inv_r = 1.0f / e[2 * K];
#pragma unroll
        for (int c = 0; c < N; ++c) dht[c] *= h[c] * (1.0f - h[c]);
#pragma unroll
        for (int c = N; c < 2 * N; ++c) dht[c] *= h[c] * (1.0f - 0.5f * h[c]);
        float l[N][N], dm[N][N];
#pragma unroll
        for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const int c = 2 * N + i * N + j;
                l[i][j] = logit<N>(alpha_b, c, p[c], inv_r);
                dm[i][j] = dht[c];
            }
        if (den_on_chip) {
            sinkhorn_backward<N>(l, dm, iters, den_or_rows + threadIdx.x, MHC_WAVE);
        } else {
            sinkhorn_backward<N>(l, dm, iters, den + t, tokens);
        }
#pragma unroll
        for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) dht[2 * N + i * N + j] = dm[i][j];
        float dr = 0.0f;
#pragma unroll
        for (int c = 0; c < K; ++c) {
            const int g = group_of<N>(c);
            const float a = alpha_b[g];
            part[g] += dht[c] * p[c] * inv_r;
            part[3 + c] = dht[c];
            dpv[c] = a * dht[c] * inv_r;
            dr -= a * dht[c] * p[c] * inv_r * inv_r;
        }
        coef = dr * inv_r / (float)D;
    }
    // The dp row, 16-byte aligned, in float4s (a multiple of 4 floats either way): SPLIT's bf16
    // pairs as the bits of a float each, or KPAD's floats.
    auto store_words = [](float* row, const auto& words) {
        constexpr int LEN = sizeof(words) / sizeof(float);
#pragma unroll
        for (int q = 0; q < LEN / 4; ++q)
            reinterpret_cast<float4*>(row)[q] = make_float4(words[4 * q], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
    };
    auto write_row = [&](float* row) {
        if (split_dp) {
            float words[SPLIT];
#pragma unroll
            for (int c2 = 0; c2 < 8 * KT; ++c2) {
                Pack<mhc_bf16, 2> h2, l2;
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const SplitBf16 v = split_bf16(2 * c2 + u < K ? dpv[2 * c2 + u] : 0.0f);
                    h2.v[u] = v.hi;
                    l2.v[u] = v.lo;
                }
                words[c2] = *reinterpret_cast<const float*>(&h2);
                words[8 * KT + c2] = *reinterpret_cast<const float*>(&l2);
            }
            words[16 * KT] = coef;
#pragma unroll
            for (int c = 16 * KT + 1; c < SPLIT; ++c) words[c] = 0.0f;
            store_words(row, words);
        } else {
            float words[KPAD];
#pragma unroll
            for (int c = 0; c < K; ++c) words[c] = dpv[c];
            words[K] = coef;
#pragma unroll
            for (int c = K + 1; c < KPAD; ++c) words[c] = 0.0f;
            store_words(row, words);
        }
    };
    // dp leaves through shared memory as one contiguous run per block: a row per thread straight
    // to global memory (stores 144 bytes apart across the wave) kept the load/store queue full,
    // a third of the kernel's stall samples at T = 16384 on an H200. There it took the kernel
    // from 20.1 to 14.0 us at C = 1280; at T = 1024 (a warp per multiprocessor, a latency
    // chain) the barriers and the copy cost 1 us (10.3 -> 11.4). The ext and dh rows brought in
    // the same way took 16.1 and 15.8 us.
    const int row_len = split_dp ? SPLIT : KPAD;
    if (one_wave) {
        __syncthreads();  // every lane is done with the denominators the rows go over
        if (t < tokens) write_row(den_or_rows + threadIdx.x * row_len);  // float4s 4 banks apart
        __syncthreads();
        const int run = (tokens - t0 < MHC_WAVE ? (int)(tokens - t0) : MHC_WAVE) * row_len / 4;
        float4* out = reinterpret_cast<float4*>(dp + t0 * row_len);
        for (int i = threadIdx.x; i < run; i += MHC_WAVE) out[i] = reinterpret_cast<const float4*>(den_or_rows)[i];
    } else if (t < tokens) {
        write_row(dp + t * row_len);
    }
    const float* totals = block_sum<NV>(part, scratch);
    for (int i = threadIdx.x; i < NV; i += blockDim.x) atomicAdd(&dalpha_b[i], totals[i]);
}

// Backward through the projection, both products of one pass over x:
//   dx[t, e] = sum_c phi[e, c] dP[t, c] + coef[t] x[t, e]     (written once)
//   dphi[e, c] += sum_t x[t, e] dP[t, c]                        (atomically added; caller zeroes)
// A block: BwdStep::COLS columns of the reduction axis D (one per thread: its k phi values and k
// dphi sums live in registers) over a range of tokens (the split: coeffs_backward_x below).
//
// SUM (the chained sublayer backward, docs/ops.md): dx also takes the other two contributions
// of the sublayer, read in the same pass, so the sublayer's dx is written once:
//   dx[t, j*C + c] += dx_post[t, j*C + c] + H_pre[t, j] * du[t, c]      (H_pre = h[t, 0..n))
//
// Data movement: per chunk of TOKC tokens, the block's columns of x (and of dx_post and du), the
// chunk's dp rows and H_pre values go global -> shared by async copies, BWD_X_STAGES - 1 chunks
// ahead; each thread then walks the chunk's tokens for its column. (Prefetching a few tokens
// through registers, 2 bytes per thread and tensor, kept too few bytes in flight: ~20% of copy
// bandwidth on an H100.) Shapes the 16-byte copies cannot take (D or C not a multiple of the
// vector, offset views, a block slice that straddles two streams of du) are staged element by
// element, at once.
template <typename T> struct BwdStep {
    static constexpr int COLS = 256;  // = the launch's block (Block::Fixed(256))
    static constexpr int VEC = 16 / (int)sizeof(T);
    static constexpr int TOKC = 4096 / (COLS * (int)sizeof(T));  // 4 KB per tensor per chunk
    static constexpr int ROW_COPIES = COLS / VEC;
    static_assert(TOKC * ROW_COPIES == COLS, "one 16-byte copy per thread per tensor per chunk");
};
constexpr int BWD_X_STAGES = 3;
// Resident blocks per multiprocessor the register budget is set for on NVIDIA (as
// proj_min_blocks): three (80 registers) for n <= 4, in both forms; no hint for wider n or on AMD.
// (Four, at 64 registers, spilled 56 bytes in the tensor-core form's chunk loop: on an H200 it
// took 250 us at T = 16384, C = 1280, against 225 with three; four with phi's fragments loaded
// from shared memory per chunk and two stages, no spills, 236 against 215.) Mirrored by
// bwd_x_resident_blocks in src/gpu/mod.rs, which fits the grid in one wave of them.
constexpr int bwd_x_min_blocks(int n) { return MHC_NVIDIA && n <= 4 ? 3 : 1; }

template <typename T, int N, bool SUM>
__device__ void coeffs_backward_x_fma(const T* __restrict__ x, const float* __restrict__ phi,
                                      const float* __restrict__ dp, const T* __restrict__ dx_post,
                                      const T* __restrict__ du, const float* __restrict__ h, T* __restrict__ dx,
                                      float* __restrict__ dphi, long long D, long long C, long long col_block,
                                      long long t_begin, long long t_end) {
    using S = BwdStep<T>;
    constexpr int K = N * N + 2 * N;
    constexpr int KPAD = BwdRow<N>::KPAD;
    constexpr int COLS = S::COLS, TOKC = S::TOKC, VEC = S::VEC;
    constexpr int SUM_STAGES = SUM ? BWD_X_STAGES : 1;
    __shared__ __align__(16) T s_x[BWD_X_STAGES][TOKC * COLS];
    __shared__ __align__(16) T s_post[SUM_STAGES][SUM ? TOKC * COLS : VEC];
    __shared__ __align__(16) T s_du[SUM_STAGES][SUM ? TOKC * COLS : VEC];
    __shared__ __align__(16) float s_dp[BWD_X_STAGES][TOKC * KPAD];
    __shared__ float s_hpre[SUM_STAGES][SUM ? TOKC * N : 1];
    static_assert(TOKC * KPAD / 4 <= COLS && TOKC * N <= COLS, "one dp/H_pre copy per thread");

    const long long e_base = col_block * COLS;
    const long long e = e_base + threadIdx.x;
    const bool ok = e < D;
    const int stream = SUM && ok ? (int)(e / C) : 0;
    float ph[K], acc[K];
#pragma unroll
    for (int c = 0; c < K; ++c) {
        ph[c] = ok ? phi[e * K + c] : 0.0f;
        acc[c] = 0.0f;
    }
    // Rows by their place in the range (t_end is not kept: registers).
    const int range_len = t_begin < t_end ? (int)(t_end - t_begin) : 0;
    const int chunks = (range_len + TOKC - 1) / TOKC;
    const bool vec_x = pack_ok<T, VEC>(x, D) && (!SUM || pack_ok<T, VEC>(dx_post, D));
    // du's columns of this block are one contiguous run when the slice lies in one stream.
    const bool vec_du = SUM && pack_ok<T, VEC>(du, C) && e_base % C + COLS <= C && e_base + COLS <= D;

    // The thread's copies: row r of the chunk, columns c0 .. c0 + VEC of the block's slice.
    const int r = threadIdx.x / S::ROW_COPIES, c0 = (threadIdx.x % S::ROW_COPIES) * VEC;
    auto stage_tensor = [&](T* dst, const T* src, long long t, bool t_ok, bool vec) {
        const long long ev = e_base + c0;
        if (vec) {
            mhc_copy16_async(dst, t_ok && ev < D ? src + t * D + ev : src, t_ok && ev < D);
        } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) dst[q] = t_ok && ev + q < D ? src[t * D + ev + q] : from_f32<T>(0.0f);
        }
    };
    auto issue = [&](int chunk) {
        const int st = chunk % BWD_X_STAGES;
        const long long tc = t_begin + (long long)chunk * TOKC;
        const long long t = tc + r;
        const bool t_ok = chunk * TOKC + r < range_len;
        stage_tensor(&s_x[st][r * COLS + c0], x, t, t_ok, vec_x);
        if (SUM) {
            stage_tensor(&s_post[st][r * COLS + c0], dx_post, t, t_ok, vec_x);
            T* dst = &s_du[st][r * COLS + c0];
            if (vec_du) {
                mhc_copy16_async(dst, t_ok ? du + t * C + e_base % C + c0 : du, t_ok);
            } else {
#pragma unroll
                for (int q = 0; q < VEC; ++q) {
                    const long long ev = e_base + c0 + q;
                    dst[q] = t_ok && ev < D ? du[t * C + ev % C] : from_f32<T>(0.0f);
                }
            }
            if (threadIdx.x < TOKC * N) {
                const int row = threadIdx.x / N, j = threadIdx.x % N;
                const bool row_ok = chunk * TOKC + row < range_len;
                mhc_copy4_async(&s_hpre[st][threadIdx.x], row_ok ? h + (tc + row) * K + j : h, row_ok);
            }
        }
        if (threadIdx.x < TOKC * KPAD / 4) {
            const int row = threadIdx.x / (KPAD / 4), part = threadIdx.x % (KPAD / 4);
            const bool row_ok = chunk * TOKC + row < range_len;
            mhc_copy16_async(&s_dp[st][row * KPAD + part * 4], row_ok ? dp + (tc + row) * KPAD + part * 4 : dp,
                             row_ok);
        }
    };
#pragma unroll
    for (int s = 0; s < BWD_X_STAGES - 1; ++s) {
        if (s < chunks) issue(s);
        mhc_copy_commit();
    }
    for (int chunk = 0; chunk < chunks; ++chunk) {
        mhc_copy_wait<BWD_X_STAGES - 2>();  // this thread's copies of this chunk have landed
        __syncthreads();  // everyone's have; everyone is done with the stage refilled below
        if (chunk + BWD_X_STAGES - 1 < chunks) issue(chunk + BWD_X_STAGES - 1);
        mhc_copy_commit();
        const int st = chunk % BWD_X_STAGES;
        const long long tc = t_begin + (long long)chunk * TOKC;
        const int nt = range_len - chunk * TOKC < TOKC ? range_len - chunk * TOKC : TOKC;
#pragma unroll
        for (int g = 0; g < TOKC; ++g) {
            if (g >= nt) break;  // past this range's tokens
            const float xv = to_f32(s_x[st][g * COLS + threadIdx.x]);
            float out = SUM ? to_f32(s_post[st][g * COLS + threadIdx.x]) +
                                  s_hpre[st][g * N + stream] * to_f32(s_du[st][g * COLS + threadIdx.x])
                            : 0.0f;
            // dp row of the token, four columns per shared-memory read (broadcast).
            const float4* d4 = reinterpret_cast<const float4*>(&s_dp[st][g * KPAD]);
#pragma unroll
            for (int c4 = 0; c4 < KPAD / 4; ++c4) {
                const float4 v = d4[c4];
                const float dv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int c = 4 * c4 + u;
                    if (c < K) {
                        out += ph[c] * dv[u];
                        acc[c] += xv * dv[u];
                    } else if (c == K) {  // coef: dxbar += coef * xbar
                        out += dv[u] * xv;
                    }
                }
            }
            if (ok) dx[(tc + g) * D + e] = from_f32<T>(out);
        }
    }
    mhc_copy_wait<0>();
    if (ok && chunks > 0) {
#pragma unroll
        for (int c = 0; c < K; ++c) atomicAdd(&dphi[e * K + c], acc[c]);
    }
}

#if MHC_TENSOR_CORES
// Tensor-core form of coeffs_backward_x for bf16 storage on NVIDIA, where its accumulators fit
// the registers (k <= 32: n <= 4; wider n keep the FFMA form). Same block (256 threads) and
// token ranges; each warp owns one 16-column tile, so a block covers COLS = 128 columns of D
// (bwd_x_block_columns in src/gpu/mod.rs); tokens in chunks of 16.
// dP comes split as hi = bf16(dP), lo = bf16(dP - hi) (dp's BwdRow::SPLIT rows, written so by
// the per-token backward: staged as they are, they feed the fragments with no split step and no
// barrier for it in the chunk loop), and phi is split likewise (once: its fragments stay in
// registers), so with x exact in bf16 both products carry dP and phi to ~2^-16 relative, as
// the forward's MmaProduct does (the FFMA form: ~2^-24 per term; both far inside the spec's
// bf16 bound). Per chunk, for the warp's 16 x 16 tile:
//   dphi[cols, :] += x[chunk, cols]^T (dP_hi + dP_lo)                      (2 MMAs per k tile)
//   dx[chunk, cols] = dP_hi phi_hi^T + dP_hi phi_lo^T + dP_lo phi_hi^T    (3 MMAs per k tile)
//                     + coef x  (+ dx_post + H_pre du for SUM)
// Every tensor the pass reads is staged by async copies BWD_X_STAGES - 1 chunks ahead: x, and for
// SUM dx_post and du, in dynamic shared memory (bwd_x_shared_bytes: 39 KB for SUM, with the
// static arrays past the default 48 KB), the dp rows and H_pre in static arrays. On an H200 at
// T = 16384, C = 1280 the SUM pass takes 226 us (the FFMA form 433): bound by instruction issue
// and its one barrier per chunk (ncu), rather than by its ~550 MB of DRAM traffic. (The dx tile's
// chain of 3 KT products split over two or three accumulators: within noise, 214-219 us.)
template <int N> struct MmaBwdX {
    static constexpr int K = N * N + 2 * N;
    static constexpr int KT = (K + 15) / 16;  // 16-wide k tiles
    static constexpr int THREADS = BwdStep<mhc_bf16>::COLS, WARPS = THREADS / 32;
    static constexpr int COLS = 16 * WARPS, TOKC = 16;  // a 16-column tile per warp
    static constexpr int LDX = COLS + 8;     // staged row stride (elements): rows 4 banks apart
    static constexpr int STAGE = TOKC * LDX;  // elements per tensor per stage
    static constexpr int COPIES = TOKC * COLS / 8 / THREADS;  // 16-byte copies per thread and tensor
    static_assert(COPIES * THREADS * 8 == TOKC * COLS, "whole copies per thread");
};
// A compile-time flag as a value, for generic lambdas compiled once per flag.
template <bool B> struct Flag {
    static constexpr bool value = B;
};
// Where the tensor-core form's accumulators fit the registers (k <= 32: n <= 4).
template <int N> constexpr bool mma_bwd_x_fits = N * N + 2 * N <= 32;

template <int N, bool SUM>
__device__ void coeffs_backward_x_mma(const mhc_bf16* __restrict__ x, const float* __restrict__ phi,
                                      const float* __restrict__ dp, const mhc_bf16* __restrict__ dx_post,
                                      const mhc_bf16* __restrict__ du, const float* __restrict__ h,
                                      mhc_bf16* __restrict__ dx, float* __restrict__ dphi, long long D,
                                      long long C, long long col_block, long long t_begin, long long t_end) {
    using namespace nvcuda;
    using M = MmaBwdX<N>;
    using bf16 = mhc_bf16;
    using Pack8 = Pack<bf16, 8>;
    constexpr int K = M::K, KT = M::KT, ROW = BwdRow<N>::SPLIT;
    constexpr int THREADS = M::THREADS, COLS = M::COLS, TOKC = M::TOKC;
    constexpr int LDX = M::LDX, STAGE = M::STAGE;
    constexpr int STAGES = BWD_X_STAGES;
    // The dp rows hold dP hi and lo as bf16 matrices of row stride LDP elements (4 banks apart).
    constexpr int LDP = 2 * ROW;
    static_assert(TOKC * ROW / 4 <= THREADS && TOKC * N <= THREADS, "one dp/H_pre copy per thread");
    // [STAGES][STAGE] each: x, then for SUM dx_post and du.
    MHC_DYNAMIC_SHARED(bwd_x_staged);
    bf16* s_x = reinterpret_cast<bf16*>(bwd_x_staged);
    bf16* s_post = s_x + STAGES * STAGE;
    bf16* s_du = s_post + STAGES * STAGE;
    __shared__ __align__(32) float s_dp[STAGES][TOKC * ROW];
    __shared__ float s_hpre[STAGES][SUM ? TOKC * N : 1];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long e_base = col_block * COLS;
    const int col = 16 * warp;  // the warp's tile: columns col .. col + 15 of the block's slice
    const long long e_warp = e_base + col;

    // phi's fragments (hi, lo) for the warp's columns, built in the x stages (1 KB per warp)
    // before the first copies land there.
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> phi_hi[KT], phi_lo[KT];
    bf16* scratch = s_x + 512 * warp;
    static_assert(512 * M::WARPS <= STAGES * STAGE, "the phi scratch fits the x stages");
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
        for (int i = lane; i < 256; i += 32) {  // B(k, column) at column * 16 + k
            const long long e = e_warp + i / 16;
            const int c = 16 * ks + i % 16;
            const SplitBf16 p = split_bf16(e < D && c < K ? phi[e * K + c] : 0.0f);
            scratch[i] = p.hi;
            scratch[256 + i] = p.lo;
        }
        __syncwarp();
        wmma::load_matrix_sync(phi_hi[ks], scratch, 16);
        wmma::load_matrix_sync(phi_lo[ks], scratch + 256, 16);
        __syncwarp();
    }
    __syncthreads();  // every warp's fragments are loaded before the copies overwrite the scratch
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_dphi[KT];
#pragma unroll
    for (int nt = 0; nt < KT; ++nt) wmma::fill_fragment(acc_dphi[nt], 0.0f);

    const int range_len = t_begin < t_end ? (int)(t_end - t_begin) : 0;
    const int chunks = (range_len + TOKC - 1) / TOKC;
    // 16-byte copies: rows of x and dx_post aligned; du's 8-column groups each in one stream.
    const bool vec = pack_ok<bf16, 8>(x, D) && (!SUM || (pack_ok<bf16, 8>(dx_post, D) && pack_ok<bf16, 8>(du, C)));
    const bool vec_out = pack_ok<bf16, 8>(dx, D);

    // The thread's one copy per tensor and chunk: row cr of the chunk, columns cc .. cc + 8 of
    // the block's slice (the same map stages every tensor and writes dx out). Chunks are issued,
    // and written out, in order, so each keeps a cursor into its tensors that a chunk moves TOKC
    // rows on: the per-chunk 64-bit index arithmetic (du's modulo included) had been a good part
    // of the pass's instructions.
    static_assert(M::COPIES == 1, "one 16-byte copy per thread and tensor per chunk");
    const int cr = threadIdx.x / (COLS / 8), cc = (threadIdx.x % (COLS / 8)) * 8;
    const long long ev = e_base + cc;          // the copy's first column of D
    const long long du_col = SUM ? ev % C : 0;  // its column of du (one stream when vec)
    const int copy_at = cr * LDX + cc;          // its place in a stage
    const bool col_ok = ev < D;
    // The dp rows and H_pre values (thread r * (ROW / 4) + part copies row r's part, and for SUM
    // thread r * N + j row r's H_pre[j]) keep their per-chunk index: few threads copy them, and
    // their cursors would cost the others registers.
    const long long first_row = t_begin + cr;
    const int rows_here = range_len - cr;  // rows of this thread's copies
    // The lane's share of a 16 x 16 f32 accumulator tile: element i of the fragment sits at row
    // g + 8 ((i / 2) % 2), column 2 q + i % 2 + 8 (i / 4), with g = lane / 4, q = lane % 4. (WMMA
    // leaves this unspecified; it is how nvcc lays m16n16k16 out on sm_80 and later, as two
    // mma.m16n8k16 whose C fragments the PTX ISA documents. The epilogue and the dphi sums read
    // the fragments in place, so a GPU that mapped them otherwise fails selftest's dx and dphi.)
    // So the lane owns 4 pairs of adjacent columns: pair p at row g + 8 (p % 2), columns
    // 2 q + 8 (p / 2) + {0, 1}, and (SUM, C % 8 == 0) each 8-column half of the tile is one stream.
    // Its 4-byte shared accesses hit 32 distinct banks per warp (rows LDX / 2 = 68 words apart).
    // (Through a staged f32 tile instead, the pass took 328 us at T = 16384, C = 1280 on an H200.)
    const int g = lane / 4, q2 = 2 * (lane % 4);
    int half_stream[2] = {0, 0};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const long long e = e_warp + 8 * hf;
        half_stream[hf] = SUM && C % 8 == 0 ? (int)((e < D ? e : D - 1) / C) : 0;
    }
    // Blocks whose columns all lie in D, with 16-byte rows in every tensor (at C = 1280, every
    // block), stage and write out with no per-chunk bounds checks on the column: the chunk loop
    // is compiled once for them (WHOLE) and once for the others (H200, one-step timelines:
    // 215.6 -> 201.9 us at T = 16384, C = 1280; 21.7 -> 21.1 at T = 1024).
    const bool whole = vec && vec_out && e_base + COLS <= D;  // block-uniform
    auto pass = [&](auto whole_tag) {
        constexpr bool WHOLE = decltype(whole_tag)::value;
        // Element offsets of the copy's next row in x and dx_post, in du, and of the next row of
        // dx to write out; for WHOLE blocks with the copy's column in them (the column and its
        // bounds are then out of the loop).
        long long x_at = first_row * D + (WHOLE ? ev : 0);
        long long du_at = SUM ? first_row * C + (WHOLE ? du_col : 0) : 0;
        long long out_at = x_at;
        auto stage = [&](bf16* dst, const bf16* row, bool du_row, bool valid) {
            if (vec) {
                mhc_copy16_async(dst, row + (du_row ? du_col : ev), valid);  // zero-filled when invalid, not read
            } else {
#pragma unroll 1
                for (int q = 0; q < 8; ++q) {
                    const bool ok = valid && ev + q < D;
                    dst[q] = ok ? row[du_row ? (ev + q) % C : ev + q] : mhc_f32_to_bf16(0.0f);
                }
            }
        };
        auto issue = [&](int chunk) {
            const int st = chunk % STAGES;
            const int at = st * STAGE + copy_at;
            if constexpr (WHOLE) {
                const bool valid = chunk * TOKC < rows_here;
                mhc_copy16_async(s_x + at, x + x_at, valid);  // zero-filled when invalid, not read
                if (SUM) {
                    mhc_copy16_async(s_post + at, dx_post + x_at, valid);
                    mhc_copy16_async(s_du + at, du + du_at, valid);
                    du_at += TOKC * C;
                }
                x_at += TOKC * D;
            } else {
                const bool valid = chunk * TOKC < rows_here && col_ok;
                stage(s_x + at, x + x_at, false, valid);
                if (SUM) {
                    stage(s_post + at, dx_post + x_at, false, valid);
                    stage(s_du + at, du + du_at, true, valid);
                    du_at += TOKC * C;
                }
                x_at += TOKC * D;
            }
            // The chunk's dp rows and H_pre values by their row in the range (t_end is not kept).
            if (threadIdx.x < TOKC * ROW / 4) {
                const int r = threadIdx.x / (ROW / 4), part = threadIdx.x % (ROW / 4);
                const int row = chunk * TOKC + r;
                mhc_copy16_async(&s_dp[st][r * ROW + part * 4], dp + (t_begin + row) * ROW + part * 4, row < range_len);
            }
            if (SUM && threadIdx.x < TOKC * N) {
                const int r = threadIdx.x / N, j = threadIdx.x % N;
                const int row = chunk * TOKC + r;
                mhc_copy4_async(&s_hpre[st][threadIdx.x], h + (t_begin + row) * K + j, row < range_len);
            }
        };
        // A chunk's dx, left in its x stage by the epilogue, to global memory in whole rows of the
        // block's slice (16-byte stores; the epilogue's own 16 x 16 tiles, 32 bytes of a row per
        // store, left the pass bound by L2 traffic at ~1.2 TB/s).
        auto write_out = [&](int chunk) {
            const bf16* src = s_x + (chunk % STAGES) * STAGE + copy_at;
            if constexpr (WHOLE) {
                if (chunk * TOKC < rows_here) *reinterpret_cast<Pack8*>(dx + out_at) = *reinterpret_cast<const Pack8*>(src);
                out_at += TOKC * D;
            } else {
                bf16* out = dx + out_at + ev;
                out_at += TOKC * D;
                if (chunk * TOKC < rows_here && col_ok) {
                    if (vec_out && ev + 8 <= D) {
                        *reinterpret_cast<Pack8*>(out) = *reinterpret_cast<const Pack8*>(src);
                    } else {
#pragma unroll 1
                        for (int q = 0; q < 8 && ev + q < D; ++q) out[q] = src[q];
                    }
                }
            }
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < chunks) issue(s);
            mhc_copy_commit();
        }
        for (int chunk = 0; chunk < chunks; ++chunk) {
            mhc_copy_wait<STAGES - 2>();  // this thread's copies of this chunk have landed
            __syncthreads();  // everyone's have; everyone is done with the previous chunk
            // The previous chunk's dx, then the refill of its stage: each thread stores the very
            // elements its own copies overwrite (same map), and its stores wait on their loads.
            if (chunk > 0) write_out(chunk - 1);
            if (chunk + STAGES - 1 < chunks) issue(chunk + STAGES - 1);
            mhc_copy_commit();
            const int st = chunk % STAGES;
            bf16* xs = s_x + st * STAGE;

            // The chunk's dP hi and lo, as staged (no split here, and no barrier for one).
            const bf16* dp_hi = reinterpret_cast<const bf16*>(s_dp[st]);
            const bf16* dp_lo = dp_hi + 16 * KT;

            // dphi: A = x^T (the staged rows read column-major), B = dP.
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> xt;
                wmma::load_matrix_sync(xt, xs + col, LDX);
#pragma unroll
                for (int nt = 0; nt < KT; ++nt) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> d;
                    wmma::load_matrix_sync(d, dp_hi + 16 * nt, LDP);
                    wmma::mma_sync(acc_dphi[nt], xt, d, acc_dphi[nt]);
                    wmma::load_matrix_sync(d, dp_lo + 16 * nt, LDP);
                    wmma::mma_sync(acc_dphi[nt], xt, d, acc_dphi[nt]);
                }
            }
            // dx tile: dP phi^T.
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int ks = 0; ks < KT; ++ks) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_hi, a_lo;
                wmma::load_matrix_sync(a_hi, dp_hi + 16 * ks, LDP);
                wmma::load_matrix_sync(a_lo, dp_lo + 16 * ks, LDP);
                wmma::mma_sync(acc, a_hi, phi_hi[ks], acc);
                wmma::mma_sync(acc, a_hi, phi_lo[ks], acc);
                wmma::mma_sync(acc, a_lo, phi_hi[ks], acc);
            }
            __syncwarp();  // the warp's x^T fragment is read before the epilogue writes over it
            // Epilogue: dx = tile + coef x (+ dx_post + H_pre du), pair by pair of the lane's
            // fragment, written over the staged x it read (no other warp reads these columns), in bf16.
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int r = g + 8 * (p % 2), c = q2 + 8 * (p / 2);
                const int at = st * STAGE + r * LDX + col + c;
                const float coef = s_dp[st][r * ROW + 16 * KT];
                const Pack<bf16, 2> xv = *reinterpret_cast<const Pack<bf16, 2>*>(s_x + at);
                float v[2];
#pragma unroll
                for (int u = 0; u < 2; ++u) v[u] = acc.x[2 * p + u] + coef * mhc_bf16_to_f32(xv.v[u]);
                if (SUM) {
                    const Pack<bf16, 2> post = *reinterpret_cast<const Pack<bf16, 2>*>(s_post + at);
                    const Pack<bf16, 2> dus = *reinterpret_cast<const Pack<bf16, 2>*>(s_du + at);
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        int stream = half_stream[p / 2];
                        if (C % 8 != 0) {
                            const long long e = e_warp + c + u;
                            stream = (int)((e < D ? e : D - 1) / C);
                        }
                        v[u] += mhc_bf16_to_f32(post.v[u]) + s_hpre[st][r * N + stream] * mhc_bf16_to_f32(dus.v[u]);
                    }
                }
                Pack<bf16, 2> out;
#pragma unroll
                for (int u = 0; u < 2; ++u) out.v[u] = mhc_f32_to_bf16(v[u]);
                *reinterpret_cast<Pack<bf16, 2>*>(s_x + at) = out;
            }
        }
        mhc_copy_wait<0>();
        if (chunks == 0) return;
        __syncthreads();
        write_out(chunks - 1);
    };
    // (Only the chained pass, the trainer's, takes the WHOLE form: compiled for the plain pass,
    // it spilled 36 bytes into that pass's chunk loops.)
    if (SUM && whole) {
        pass(Flag<SUM>{});
    } else {
        pass(Flag<false>{});
    }
    if (chunks == 0) return;
    // dphi[e, c] += the accumulator tiles, read in place (rows: the warp's columns e of D).
#pragma unroll
    for (int nt = 0; nt < KT; ++nt) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const long long e = e_warp + g + 8 * ((i / 2) % 2);
            const int c = 16 * nt + q2 + i % 2 + 8 * (i / 4);
            if (e < D && c < K) atomicAdd(&dphi[e * K + c], acc_dphi[nt].x[i]);
        }
    }
}
#endif

// Backward through the projection (the contract above): on tensor cores for bf16 on NVIDIA
// where the accumulators fit, else with FFMA. (`if constexpr` keeps the form not taken, and its
// shared memory, out of the kernel.)
//
// Work split: grid x over column blocks of D, y over token ranges; the launch fits the blocks
// in one wave of resident blocks, `work_blocks` of them in grid order (column block fastest:
// the blocks that run together read whole rows of x between them; as runs of one column block
// over many tokens each, the pass took 297 us instead of 219 at T = 16384, C = 1280 on an H200),
// and the blocks past those return at once. So column block cb has one token range per row of
// the grid it has a working block in, ceil((work_blocks - cb) / col_blocks) ranges of equal
// length. (The same count of ranges for every column block left slots empty: 360 blocks on the
// 396 resident slots of an H200 at T = 16384, C = 1280.)
template <typename T, int N, bool SUM>
__device__ __forceinline__ void coeffs_backward_x(const T* __restrict__ x, const float* __restrict__ phi,
                                                  const float* __restrict__ dp, const T* __restrict__ dx_post,
                                                  const T* __restrict__ du, const float* __restrict__ h,
                                                  T* __restrict__ dx, float* __restrict__ dphi, long long tokens,
                                                  long long D, long long C, long long work_blocks) {
    // (32-bit and double arithmetic: a 64-bit division is a call, whose register saves spilled
    // the tensor-core pass. The double quotients are monotonic in the range index and exact at
    // its ends, so the ranges tile [0, T).)
    const int col_blocks = (int)gridDim.x;
    if ((long long)blockIdx.y * col_blocks + blockIdx.x >= work_blocks) return;
    const int ranges = ((int)work_blocks - (int)blockIdx.x + col_blocks - 1) / col_blocks;
    const double per_range = (double)tokens / ranges;
    const long long t_begin = (long long)(blockIdx.y * per_range);
    const long long t_end = blockIdx.y + 1 == (unsigned)ranges ? tokens : (long long)((blockIdx.y + 1) * per_range);
#if MHC_TENSOR_CORES
    if constexpr (sizeof(T) == 2 && mma_bwd_x_fits<N>) {  // bf16
        coeffs_backward_x_mma<N, SUM>(x, phi, dp, dx_post, du, h, dx, dphi, D, C, blockIdx.x, t_begin, t_end);
    } else
#endif
    {
        coeffs_backward_x_fma<T, N, SUM>(x, phi, dp, dx_post, du, h, dx, dphi, D, C, blockIdx.x, t_begin, t_end);
    }
}

}  // namespace

// Exported kernels, one per (dtype, n), spelled out so each name is greppable (the launch table
// in src/gpu/mhc.rs and scripts/check-kernels.sh look them up by name).
#define STATIC_PARAMS const float *alpha_b, float *ext, float *h, long long tokens, int iters
#define PROJECT_PARAMS(T) const T *x, const float *phi, float *partial, long long tokens, long long D, long long d_per_split
#define FINISH_PARAMS \
    const float *partial, const float *alpha_b, float *ext, float *h, long long tokens, long long D, int splits, \
        int iters
#define BWD_TOKEN_PARAMS \
    const float *alpha_b, const float *ext, const float *dh, const float *dh_pre, float *dp, float *den, \
        float *dalpha_b, long long tokens, long long D, int iters, int split_dp, int add_dh_pre
#define BWD_X_PARAMS(T) \
    const T *x, const float *phi, const float *dp, T *dx, float *dphi, long long tokens, long long D, \
        long long work_blocks
#define BWD_X_SUM_PARAMS(T) \
    const T *x, const float *phi, const float *dp, const T *dx_post, const T *du, const float *h, T *dx, \
        float *dphi, long long tokens, long long D, long long C, long long work_blocks
extern "C" __global__ void mhc_coeffs_static_n2(STATIC_PARAMS) { coeffs_static<2>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n2(BWD_TOKEN_PARAMS) { coeffs_backward_token<2>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n2(FINISH_PARAMS) { coeffs_finish<2>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(2)) mhc_coeffs_project_f32_n2(PROJECT_PARAMS(float)) { coeffs_project<float, 2>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(2)) mhc_coeffs_bwd_x_f32_n2(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 2, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(2)) mhc_coeffs_bwd_x_sum_f32_n2(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 2, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(2)) mhc_coeffs_project_bf16_n2(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 2>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(2)) mhc_coeffs_bwd_x_bf16_n2(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 2, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(2)) mhc_coeffs_bwd_x_sum_bf16_n2(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 2, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n3(STATIC_PARAMS) { coeffs_static<3>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n3(BWD_TOKEN_PARAMS) { coeffs_backward_token<3>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n3(FINISH_PARAMS) { coeffs_finish<3>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(3)) mhc_coeffs_project_f32_n3(PROJECT_PARAMS(float)) { coeffs_project<float, 3>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(3)) mhc_coeffs_bwd_x_f32_n3(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 3, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(3)) mhc_coeffs_bwd_x_sum_f32_n3(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 3, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(3)) mhc_coeffs_project_bf16_n3(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 3>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(3)) mhc_coeffs_bwd_x_bf16_n3(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 3, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(3)) mhc_coeffs_bwd_x_sum_bf16_n3(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 3, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n4(STATIC_PARAMS) { coeffs_static<4>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n4(BWD_TOKEN_PARAMS) { coeffs_backward_token<4>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n4(FINISH_PARAMS) { coeffs_finish<4>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(4)) mhc_coeffs_project_f32_n4(PROJECT_PARAMS(float)) { coeffs_project<float, 4>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(4)) mhc_coeffs_bwd_x_f32_n4(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 4, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(4)) mhc_coeffs_bwd_x_sum_f32_n4(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 4, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(4)) mhc_coeffs_project_bf16_n4(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 4>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(4)) mhc_coeffs_bwd_x_bf16_n4(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 4, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(4)) mhc_coeffs_bwd_x_sum_bf16_n4(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 4, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n5(STATIC_PARAMS) { coeffs_static<5>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n5(BWD_TOKEN_PARAMS) { coeffs_backward_token<5>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n5(FINISH_PARAMS) { coeffs_finish<5>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(5)) mhc_coeffs_project_f32_n5(PROJECT_PARAMS(float)) { coeffs_project<float, 5>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(5)) mhc_coeffs_bwd_x_f32_n5(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 5, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(5)) mhc_coeffs_bwd_x_sum_f32_n5(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 5, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(5)) mhc_coeffs_project_bf16_n5(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 5>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(5)) mhc_coeffs_bwd_x_bf16_n5(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 5, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(5)) mhc_coeffs_bwd_x_sum_bf16_n5(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 5, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n6(STATIC_PARAMS) { coeffs_static<6>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n6(BWD_TOKEN_PARAMS) { coeffs_backward_token<6>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n6(FINISH_PARAMS) { coeffs_finish<6>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(6)) mhc_coeffs_project_f32_n6(PROJECT_PARAMS(float)) { coeffs_project<float, 6>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(6)) mhc_coeffs_bwd_x_f32_n6(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 6, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(6)) mhc_coeffs_bwd_x_sum_f32_n6(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 6, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(6)) mhc_coeffs_project_bf16_n6(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 6>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(6)) mhc_coeffs_bwd_x_bf16_n6(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 6, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(6)) mhc_coeffs_bwd_x_sum_bf16_n6(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 6, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n7(STATIC_PARAMS) { coeffs_static<7>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n7(BWD_TOKEN_PARAMS) { coeffs_backward_token<7>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n7(FINISH_PARAMS) { coeffs_finish<7>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(7)) mhc_coeffs_project_f32_n7(PROJECT_PARAMS(float)) { coeffs_project<float, 7>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(7)) mhc_coeffs_bwd_x_f32_n7(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 7, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(7)) mhc_coeffs_bwd_x_sum_f32_n7(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 7, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(7)) mhc_coeffs_project_bf16_n7(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 7>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(7)) mhc_coeffs_bwd_x_bf16_n7(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 7, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(7)) mhc_coeffs_bwd_x_sum_bf16_n7(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 7, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void mhc_coeffs_static_n8(STATIC_PARAMS) { coeffs_static<8>(alpha_b, ext, h, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n8(BWD_TOKEN_PARAMS) { coeffs_backward_token<8>(alpha_b, ext, dh, dh_pre, dp, den, dalpha_b, tokens, D, iters, split_dp, add_dh_pre); }
extern "C" __global__ void mhc_coeffs_finish_n8(FINISH_PARAMS) { coeffs_finish<8>(partial, alpha_b, ext, h, tokens, D, splits, iters); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(8)) mhc_coeffs_project_f32_n8(PROJECT_PARAMS(float)) { coeffs_project<float, 8>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(8)) mhc_coeffs_bwd_x_f32_n8(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 8, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(8)) mhc_coeffs_bwd_x_sum_f32_n8(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 8, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
extern "C" __global__ void __launch_bounds__(PROJ_THREADS, proj_min_blocks(8)) mhc_coeffs_project_bf16_n8(PROJECT_PARAMS(mhc_bf16)) { coeffs_project<mhc_bf16, 8>(x, phi, partial, tokens, D, d_per_split); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(8)) mhc_coeffs_bwd_x_bf16_n8(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 8, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, work_blocks); }
extern "C" __global__ void __launch_bounds__(BwdStep<float>::COLS, bwd_x_min_blocks(8)) mhc_coeffs_bwd_x_sum_bf16_n8(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 8, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, work_blocks); }
