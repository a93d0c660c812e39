// mHC dynamic coefficients (spec/mhc.md): H = activations(alpha_g * (xbar . phi) / r + b), with
// H_res = Sinkhorn(...), and the exact backward (Sinkhorn iterates recomputed, never stored).
//
// ext [T, 2k+1] f32 = [H (k) | P (k) | r (1)] per token; k = n*n + 2n; columns of H:
// [pre (n) | post (n) | res (n*n, row-major i*n + j)]. alpha_b [3 + k] = (alpha_pre, alpha_post,
// alpha_res, b_0 .. b_{k-1}). x [T, n*C] in the storage dtype, phi [n*C, k] f32. All arithmetic f32.
#include "mhc_common.h"

using namespace mhc;

namespace {

constexpr float EPS_RMS = 1e-6f;
constexpr float EPS_SINKHORN = 1e-6f;

// 0 = pre, 1 = post, 2 = res: the alpha that scales column c.
template <int N> __device__ __forceinline__ int group_of(int c) { return c < N ? 0 : (c < 2 * N ? 1 : 2); }

// Ht_c = (alpha_g(c) * P_c) / r + b_c.
template <int N>
__device__ __forceinline__ float logit(const float* __restrict__ alpha_b, int c, float p, float r) {
    return alpha_b[group_of<N>(c)] * p / r + alpha_b[3 + c];
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// Sinkhorn-Knopp on the n x n logits in m (H_res on return): M0 = exp(L - max L), then `iters`
// times columns then rows normalised by (sum + eps) (one division per sum, then products: within
// an ulp of dividing each entry, and n times fewer divisions on the critical path). When `den` is set, the denominator of
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
            const float inv = 1.0f / s;
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
            const float inv = 1.0f / s;
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
    for (int h = 2 * iters - 1; h >= 0; --h) {
        float d[N];
#pragma unroll
        for (int i = 0; i < N; ++i) d[i] = den[(h * N + i) * stride];
        if (h & 1) {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                float dot = 0.0f;
#pragma unroll
                for (int j = 0; j < N; ++j) dot += dm[i][j] * m[i][j];
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    dm[i][j] = (dm[i][j] - dot) / d[i];
                    m[i][j] *= d[i];
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < N; ++j) {
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < N; ++i) dot += dm[i][j] * m[i][j];
                const float inv = 1.0f / d[j];
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    dm[i][j] = (dm[i][j] - dot) * inv;
                    m[i][j] *= d[j];
                }
            }
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
#pragma unroll
    for (int c = 0; c < N; ++c) ext_row[c] = sigmoid(logit<N>(alpha_b, c, p[c], r));
#pragma unroll
    for (int c = N; c < 2 * N; ++c) ext_row[c] = 2.0f * sigmoid(logit<N>(alpha_b, c, p[c], r));
    float m[N][N];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) m[i][j] = logit<N>(alpha_b, 2 * N + i * N + j, p[2 * N + i * N + j], r);
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
__device__ void coeffs_static(const float* __restrict__ alpha_b, float* __restrict__ ext, long long tokens,
                              int iters) {
    constexpr int K = N * N + 2 * N;
    const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float p[K];
#pragma unroll
    for (int c = 0; c < K; ++c) p[c] = 0.0f;
    write_ext<N>(p, 1.0f, alpha_b, iters, ext + t * (2 * K + 1));
}

// Tiling of the forward projection P = xbar . phi, a skinny GEMM [T, D] x [D, k] (D = n*C).
// Each warp/wave owns TOKW tokens; its lanes split the reduction axis (lane handles elements
// e0 + q*WAVE + lane, coalesced across lanes) and keep TOKW x k partial sums in registers (about
// 96: one block per multiprocessor; halving them for two blocks was slower on an H100, as every
// phi value read from shared memory then feeds half the FMAs). The
// block shares one CHUNK-row slice of phi in shared memory (rows padded to an odd stride: lanes
// read different rows of one column without bank conflicts), so phi is read from L2 once per
// block of (waves x TOKW) tokens instead of once per token.
template <int N> struct FwdTile {
    static constexpr int K = N * N + 2 * N;
    static constexpr int TOKW = 96 / K < 1 ? 1 : (96 / K > 8 ? 8 : 96 / K);
    static constexpr int KP = K | 1;
    static constexpr int CHUNK = 128;
    static constexpr int EPL = CHUNK / MHC_WAVE;
    // The block size the kernel is launched with: the phi slice is filled by a fixed number of
    // independent loads per thread (FILL), issued one chunk ahead.
    static constexpr int THREADS = 256;
    static constexpr int FILL = (CHUNK * K + THREADS - 1) / THREADS;
};

// Fused forward: projection, sum of squares, scale/bias, sigmoids, Sinkhorn; one launch, one read
// of x. Block = FwdTile::THREADS threads; tokens per block = (THREADS / wave size) * TOKW.
template <typename T, int N>
__device__ void coeffs_forward(const T* __restrict__ x, const float* __restrict__ phi,
                               const float* __restrict__ alpha_b, float* __restrict__ ext, long long tokens,
                               long long D, int iters) {
    using Tile = FwdTile<N>;
    constexpr int K = Tile::K, TOKW = Tile::TOKW, KP = Tile::KP, CHUNK = Tile::CHUNK, EPL = Tile::EPL;
    constexpr int THREADS = Tile::THREADS, FILL = Tile::FILL;
    __shared__ float s_phi[CHUNK * KP];
    const int wave = threadIdx.x / MHC_WAVE;
    const int lane = threadIdx.x % MHC_WAVE;
    const long long t0 = (blockIdx.x * (long long)(blockDim.x / MHC_WAVE) + wave) * TOKW;
    // Rows past the last token read the last token (in bounds); their results are dropped.
    const T* rows[TOKW];
#pragma unroll
    for (int tok = 0; tok < TOKW; ++tok) rows[tok] = x + (t0 + tok < tokens ? t0 + tok : tokens - 1) * D;

    float acc[TOKW][K], ss[TOKW];
#pragma unroll
    for (int tok = 0; tok < TOKW; ++tok) {
        ss[tok] = 0.0f;
#pragma unroll
        for (int c = 0; c < K; ++c) acc[tok][c] = 0.0f;
    }
    // x of the next chunk is loaded while the current one is multiplied. The prefetch registers
    // hold the raw storage values: converting right after the load would stall the warp on it.
    // Addresses past D are clamped in bounds; those elements count as zero when converted.
    T xn[TOKW][EPL];
    auto fetch_x = [&](long long e0) {
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const long long e = e0 + q * MHC_WAVE + lane;
            const long long ec = e < D ? e : D - 1;
#pragma unroll
            for (int tok = 0; tok < TOKW; ++tok) xn[tok][q] = rows[tok][ec];
        }
    };
    fetch_x(0);
    // phi of the next slice, likewise: FILL independent loads per thread in flight.
    float pf[FILL];
    auto fetch_phi = [&](long long e0) {
#pragma unroll
        for (int i = 0; i < FILL; ++i) {
            const int idx = i * THREADS + threadIdx.x;
            pf[i] = idx < CHUNK * K && e0 + idx / K < D ? phi[e0 * K + idx] : 0.0f;
        }
    };
    fetch_phi(0);
    for (long long e0 = 0; e0 < D; e0 += CHUNK) {
        __syncthreads();  // every wave is done with the previous slice
#pragma unroll
        for (int i = 0; i < FILL; ++i) {
            const int idx = i * THREADS + threadIdx.x;
            if (idx < CHUNK * K) s_phi[(idx / K) * KP + idx % K] = pf[i];
        }
        __syncthreads();
        if (e0 + CHUNK < D) fetch_phi(e0 + CHUNK);
        float xv[TOKW][EPL];
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const bool in = e0 + q * MHC_WAVE + lane < D;
#pragma unroll
            for (int tok = 0; tok < TOKW; ++tok) {
                xv[tok][q] = in ? to_f32(xn[tok][q]) : 0.0f;
                ss[tok] += xv[tok][q] * xv[tok][q];
            }
        }
        if (e0 + CHUNK < D) fetch_x(e0 + CHUNK);
#pragma unroll
        for (int c = 0; c < K; ++c) {
#pragma unroll
            for (int q = 0; q < EPL; ++q) {
                const float w = s_phi[(q * MHC_WAVE + lane) * KP + c];
#pragma unroll
                for (int tok = 0; tok < TOKW; ++tok) acc[tok][c] += xv[tok][q] * w;
            }
        }
    }
#pragma unroll
    for (int tok = 0; tok < TOKW; ++tok) {
        ss[tok] = wave_sum(ss[tok]);
#pragma unroll
        for (int c = 0; c < K; ++c) acc[tok][c] = wave_sum(acc[tok][c]);
    }
    // Lane tok finishes token t0 + tok (compile-time register indices only).
    float p[K], sum_sq = 0.0f;
#pragma unroll
    for (int c = 0; c < K; ++c) p[c] = 0.0f;
#pragma unroll
    for (int tok = 0; tok < TOKW; ++tok) {
        if (lane == tok) {
            sum_sq = ss[tok];
#pragma unroll
            for (int c = 0; c < K; ++c) p[c] = acc[tok][c];
        }
    }
    if (lane < TOKW && t0 + lane < tokens) {
        const float r = sqrtf(sum_sq / (float)D + EPS_RMS);
        write_ext<N>(p, r, alpha_b, iters, ext + (t0 + lane) * (2 * K + 1));
    }
}

// Row stride of the per-token backward scratch dp: [dP (k) | coef (1) | zero padding] so rows
// stay 16-byte aligned for vector reads from shared memory.
template <int N> struct BwdRow {
    static constexpr int K = N * N + 2 * N;
    static constexpr int KPAD = (K + 1 + 3) / 4 * 4;
};

// Backward, per token (one thread each): activation and Sinkhorn backward give dHt; then
//   db_c = dHt_c, dalpha_g = sum_{c in g} dHt_c P_c / r   (summed over the block, atomically added
//   to dalpha_b, which the caller zeroes), and into dp[t]: dP_c = alpha_g dHt_c / r and
//   coef = dr / (D r) with dr = -sum_c alpha_g dHt_c P_c / r^2, so dxbar = phi dP^T + coef xbar.
// `den` is scratch of 2 * iters * n floats per token, laid out [half-step][i][token].
template <int N>
__device__ void coeffs_backward_token(const float* __restrict__ alpha_b, const float* __restrict__ ext,
                                      const float* __restrict__ d_ext, float* __restrict__ dp,
                                      float* __restrict__ den, float* __restrict__ dalpha_b, long long tokens,
                                      long long D, int iters) {
    constexpr int K = N * N + 2 * N;
    constexpr int KPAD = BwdRow<N>::KPAD;
    constexpr int NV = 3 + K;
    __shared__ float scratch[(MAX_WAVES + 1) * NV];
    const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    float part[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) part[i] = 0.0f;
    if (t < tokens) {
        const float* e = ext + t * (2 * K + 1);
        const float* de = d_ext + t * (2 * K + 1);
        const float r = e[2 * K];
        float dht[K];
#pragma unroll
        for (int c = 0; c < N; ++c) {
            const float s = e[c];
            dht[c] = de[c] * s * (1.0f - s);
        }
#pragma unroll
        for (int c = N; c < 2 * N; ++c) {
            const float hp = e[c];
            dht[c] = de[c] * hp * (1.0f - 0.5f * hp);
        }
        float l[N][N], dm[N][N];
#pragma unroll
        for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const int c = 2 * N + i * N + j;
                l[i][j] = logit<N>(alpha_b, c, e[K + c], r);
                dm[i][j] = de[c];
            }
        sinkhorn_backward<N>(l, dm, iters, den + t, tokens);
#pragma unroll
        for (int i = 0; i < N; ++i)
#pragma unroll
            for (int j = 0; j < N; ++j) dht[2 * N + i * N + j] = dm[i][j];
        float dr = 0.0f;
        float* dp_row = dp + t * KPAD;
#pragma unroll
        for (int c = 0; c < K; ++c) {
            const int g = group_of<N>(c);
            const float a = alpha_b[g];
            const float p = e[K + c];
            part[g] += dht[c] * p / r;
            part[3 + c] = dht[c];
            dp_row[c] = a * dht[c] / r;
            dr -= a * dht[c] * p / (r * r);
        }
        dp_row[K] = dr / ((float)D * r);
#pragma unroll
        for (int c = K + 1; c < KPAD; ++c) dp_row[c] = 0.0f;
    }
    const float* totals = block_sum<NV>(part, scratch);
    for (int i = threadIdx.x; i < NV; i += blockDim.x) atomicAdd(&dalpha_b[i], totals[i]);
}

// Backward through the projection, both products of one pass over x:
//   dx[t, e] = sum_c phi[e, c] dP[t, c] + coef[t] x[t, e]     (written once)
//   dphi[e, c] += sum_t x[t, e] dP[t, c]                        (atomically added; caller zeroes)
// Grid: x over the reduction axis D (each thread owns EPT elements and their k phi values and k
// dphi sums in registers), y over token ranges of `tokens_per_split`. dp rows of the block's
// tokens pass through shared memory TOKC at a time and are read as broadcasts.
//
// SUM (the chained sublayer backward, .notes/OPS.md): dx also takes the other two contributions
// of the sublayer, read in the same pass, so the sublayer's dx is written once:
//   dx[t, j*C + c] += dx_post[t, j*C + c] + H_pre[t, j] * du[t, c]      (H_pre = h[t, 0..n))
template <typename T, int N, bool SUM>
__device__ void coeffs_backward_x(const T* __restrict__ x, const float* __restrict__ phi,
                                  const float* __restrict__ dp, const T* __restrict__ dx_post,
                                  const T* __restrict__ du, const float* __restrict__ h, T* __restrict__ dx,
                                  float* __restrict__ dphi, long long tokens, long long D, long long C,
                                  long long tokens_per_split) {
    constexpr int K = N * N + 2 * N;
    constexpr int KPAD = BwdRow<N>::KPAD;
    // One element per thread: phi and dphi rows take 2k registers (80 in all at n = 4), so three
    // blocks share a multiprocessor (two elements: 152 registers, one block, 12% occupancy).
    constexpr int EPT = 1;
    constexpr int TOKC = 32;
    constexpr int TG = 4;  // tokens whose x loads are in flight together
    __shared__ __align__(16) float s_dp[TOKC * KPAD];
    long long e[EPT], col[EPT];
    int stream[EPT];
    bool ok[EPT];
    float ph[EPT][K], acc[EPT][K];
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
        e[q] = (blockIdx.x * (long long)EPT + q) * blockDim.x + threadIdx.x;
        ok[q] = e[q] < D;
        if (SUM) {
            stream[q] = ok[q] ? (int)(e[q] / C) : 0;
            col[q] = ok[q] ? e[q] % C : 0;
        }
#pragma unroll
        for (int c = 0; c < K; ++c) {
            ph[q][c] = ok[q] ? phi[e[q] * K + c] : 0.0f;
            acc[q][c] = 0.0f;
        }
    }
    const long long t_begin = blockIdx.y * tokens_per_split;
    const long long t_end = t_begin + tokens_per_split < tokens ? t_begin + tokens_per_split : tokens;
    for (long long tc = t_begin; tc < t_end; tc += TOKC) {
        const int nt = t_end - tc < TOKC ? (int)(t_end - tc) : TOKC;
        __syncthreads();  // the previous slice of dp is consumed
        for (int idx = threadIdx.x; idx < nt * KPAD; idx += blockDim.x) s_dp[idx] = dp[tc * KPAD + idx];
        __syncthreads();
        // x of TG tokens is loaded at once, the next group while this one is multiplied.
        // Raw storage values (converted at use, not at load: see coeffs_forward); addresses of
        // elements past D or tokens past the slice are clamped in bounds and count as zero.
        T xn[TG][EPT], pn[TG][EPT], un[TG][EPT];
        float hn[TG][EPT];
        auto fetch_x = [&](int tt0) {
#pragma unroll
            for (int g = 0; g < TG; ++g) {
                const long long t = tc + (tt0 + g < nt ? tt0 + g : nt - 1);
#pragma unroll
                for (int q = 0; q < EPT; ++q) {
                    const long long el = ok[q] ? e[q] : D - 1;
                    xn[g][q] = x[t * D + el];
                    if (SUM) {
                        pn[g][q] = dx_post[t * D + el];
                        un[g][q] = du[t * C + col[q]];
                        hn[g][q] = h[t * (N * N + 2 * N) + stream[q]];
                    }
                }
            }
        };
        fetch_x(0);
        for (int tt0 = 0; tt0 < nt; tt0 += TG) {
            float xv[TG][EPT], base[TG][EPT];
#pragma unroll
            for (int g = 0; g < TG; ++g)
#pragma unroll
                for (int q = 0; q < EPT; ++q) {
                    xv[g][q] = ok[q] ? to_f32(xn[g][q]) : 0.0f;
                    base[g][q] = SUM ? to_f32(pn[g][q]) + hn[g][q] * to_f32(un[g][q]) : 0.0f;
                }
            if (tt0 + TG < nt) fetch_x(tt0 + TG);
#pragma unroll
            for (int g = 0; g < TG; ++g) {
                if (tt0 + g >= nt) break;  // past this slice's tokens
                // dp row of the token, four columns per shared-memory read (broadcast).
                const float4* d4 = reinterpret_cast<const float4*>(s_dp + (tt0 + g) * KPAD);
                float out[EPT];
#pragma unroll
                for (int q = 0; q < EPT; ++q) out[q] = base[g][q];
#pragma unroll
                for (int c4 = 0; c4 < KPAD / 4; ++c4) {
                    const float4 v = d4[c4];
                    const float dv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int c = 4 * c4 + u;
                        if (c < K) {
#pragma unroll
                            for (int q = 0; q < EPT; ++q) {
                                out[q] += ph[q][c] * dv[u];
                                acc[q][c] += xv[g][q] * dv[u];
                            }
                        } else if (c == K) {  // coef: dxbar += coef * xbar
#pragma unroll
                            for (int q = 0; q < EPT; ++q) out[q] += dv[u] * xv[g][q];
                        }
                    }
                }
#pragma unroll
                for (int q = 0; q < EPT; ++q)
                    if (ok[q]) dx[(tc + tt0 + g) * D + e[q]] = from_f32<T>(out[q]);
            }
        }
    }
#pragma unroll
    for (int q = 0; q < EPT; ++q)
        if (ok[q] && t_begin < t_end) {
#pragma unroll
            for (int c = 0; c < K; ++c) atomicAdd(&dphi[e[q] * K + c], acc[q][c]);
        }
}

}  // namespace

// Exported kernels, one per (dtype, n), spelled out so each name is greppable (the launch table
// in src/gpu/mhc.rs and scripts/check-kernels.sh look them up by name).
#define STATIC_PARAMS const float *alpha_b, float *ext, long long tokens, int iters
#define FWD_PARAMS(T) const T *x, const float *phi, const float *alpha_b, float *ext, long long tokens, long long D, int iters
#define BWD_TOKEN_PARAMS \
    const float *alpha_b, const float *ext, const float *d_ext, float *dp, float *den, float *dalpha_b, long long tokens, \
        long long D, int iters
#define BWD_X_PARAMS(T) \
    const T *x, const float *phi, const float *dp, T *dx, float *dphi, long long tokens, long long D, \
        long long tokens_per_split
#define BWD_X_SUM_PARAMS(T) \
    const T *x, const float *phi, const float *dp, const T *dx_post, const T *du, const float *h, T *dx, \
        float *dphi, long long tokens, long long D, long long C, long long tokens_per_split
extern "C" __global__ void mhc_coeffs_static_n2(STATIC_PARAMS) { coeffs_static<2>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n2(BWD_TOKEN_PARAMS) { coeffs_backward_token<2>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n2(FWD_PARAMS(float)) { coeffs_forward<float, 2>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n2(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 2, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n2(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 2, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n2(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 2>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n2(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 2, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n2(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 2, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n3(STATIC_PARAMS) { coeffs_static<3>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n3(BWD_TOKEN_PARAMS) { coeffs_backward_token<3>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n3(FWD_PARAMS(float)) { coeffs_forward<float, 3>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n3(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 3, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n3(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 3, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n3(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 3>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n3(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 3, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n3(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 3, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n4(STATIC_PARAMS) { coeffs_static<4>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n4(BWD_TOKEN_PARAMS) { coeffs_backward_token<4>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n4(FWD_PARAMS(float)) { coeffs_forward<float, 4>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n4(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 4, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n4(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 4, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n4(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 4>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n4(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 4, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n4(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 4, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n5(STATIC_PARAMS) { coeffs_static<5>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n5(BWD_TOKEN_PARAMS) { coeffs_backward_token<5>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n5(FWD_PARAMS(float)) { coeffs_forward<float, 5>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n5(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 5, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n5(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 5, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n5(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 5>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n5(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 5, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n5(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 5, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n6(STATIC_PARAMS) { coeffs_static<6>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n6(BWD_TOKEN_PARAMS) { coeffs_backward_token<6>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n6(FWD_PARAMS(float)) { coeffs_forward<float, 6>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n6(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 6, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n6(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 6, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n6(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 6>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n6(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 6, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n6(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 6, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n7(STATIC_PARAMS) { coeffs_static<7>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n7(BWD_TOKEN_PARAMS) { coeffs_backward_token<7>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n7(FWD_PARAMS(float)) { coeffs_forward<float, 7>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n7(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 7, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n7(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 7, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n7(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 7>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n7(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 7, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n7(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 7, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_static_n8(STATIC_PARAMS) { coeffs_static<8>(alpha_b, ext, tokens, iters); }
extern "C" __global__ void mhc_coeffs_bwd_token_n8(BWD_TOKEN_PARAMS) { coeffs_backward_token<8>(alpha_b, ext, d_ext, dp, den, dalpha_b, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_fwd_f32_n8(FWD_PARAMS(float)) { coeffs_forward<float, 8>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_f32_n8(BWD_X_PARAMS(float)) { coeffs_backward_x<float, 8, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_f32_n8(BWD_X_SUM_PARAMS(float)) { coeffs_backward_x<float, 8, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_fwd_bf16_n8(FWD_PARAMS(mhc_bf16)) { coeffs_forward<mhc_bf16, 8>(x, phi, alpha_b, ext, tokens, D, iters); }
extern "C" __global__ void mhc_coeffs_bwd_x_bf16_n8(BWD_X_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 8, false>(x, phi, dp, nullptr, nullptr, nullptr, dx, dphi, tokens, D, 1, tokens_per_split); }
extern "C" __global__ void mhc_coeffs_bwd_x_sum_bf16_n8(BWD_X_SUM_PARAMS(mhc_bf16)) { coeffs_backward_x<mhc_bf16, 8, true>(x, phi, dp, dx_post, du, h, dx, dphi, tokens, D, C, tokens_per_split); }
