// The part of CUDA's warp matrix API (<mma.h>, nvcuda::wmma) that the kernels' tensor-core forms
// use, on the CPU: included by device.h for the emulated NVIDIA GPU (MHC_EMULATE_NVIDIA), so the
// CUDA forms of kernels/*.cu (32-lane warps, bf16 16 x 16 x 16 products) run and are checked
// without a GPU.
//
// The accumulator fragment is laid out as nvcc lays m16n16k16 out on sm_80 and later (two
// mma.m16n8k16, whose C fragments the PTX ISA documents): element i of lane l sits at row
// g + 8 ((i / 2) % 2), column 2 q + i % 2 + 8 (i / 4), with g = l / 4, q = l % 4. Kernels read
// and write accumulator elements in place by that map, so a wrong map here fails their results.
// Operand fragments (matrix_a, matrix_b) keep the whole 16 x 16 tile in every lane: kernels
// treat them as opaque (load, then multiply), and the lane-local product needs no exchange.
//
// Checked as the GPU requires (a fault here, undefined there): load/store pointers 32-byte
// aligned, ldm a multiple of 8 elements for bf16 and of 4 for f32. Products: exact bf16 x bf16
// products summed in f32 over k in order (the tensor cores' sum order differs; both are far
// inside the spec's bounds).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "threads.h"

typedef emu::bf16 __nv_bfloat16;

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment;

// Operand tiles, logical [row][column]: A is M x K, B is K x N (16 x 16 here).
template <typename Use, typename Layout> struct fragment<Use, 16, 16, 16, __nv_bfloat16, Layout> {
    float tile[16][16];
};

template <> struct fragment<accumulator, 16, 16, 16, float, void> {
    static constexpr int num_elements = 8;
    float x[num_elements];
};

namespace detail {
// What the _sync suffix means: the call waits until every lane of the warp has arrived, then
// acts. So every lane loads before any lane stores over what was loaded, as on the GPU, where
// kernels rely on it (the pass over x writes its dx tile in place of the x it loaded).
inline void arrive() { emu::sync_wave(); }
inline int row_of(int lane, int i) { return lane / 4 + 8 * ((i / 2) % 2); }
inline int col_of(int lane, int i) { return 2 * (lane % 4) + i % 2 + 8 * (i / 4); }
inline void check_access(const void* p, unsigned ldm, unsigned multiple, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
        emu::fault(std::string(what) + ": pointer not 32-byte aligned");
    if (ldm % multiple != 0)
        emu::fault(std::string(what) + ": ldm " + std::to_string(ldm) + " not a multiple of " + std::to_string(multiple));
}
}  // namespace detail

// An operand tile, [i][j] = element (i, j) of the logical matrix (A: row, k; B: k, column):
// p[i ldm + j] when row-major, p[j ldm + i] when column-major.
template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p,
                             unsigned ldm) {
    detail::arrive();
    detail::check_access(p, ldm, 8, "load_matrix_sync(operand)");
    constexpr bool column_major = std::is_same_v<Layout, col_major>;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j)
            f.tile[i][j] = emu::bf16_to_f32(column_major ? p[j * ldm + i] : p[i * ldm + j]);
}

using accumulator_fragment = fragment<accumulator, 16, 16, 16, float, void>;

inline void fill_fragment(accumulator_fragment& f, float v) {
    for (float& e : f.x) e = v;
}
// Where element i of the calling lane's accumulator fragment sits in the 16 x 16 f32 tile at p.
inline std::size_t accumulator_offset(unsigned ldm, layout_t layout, int i) {
    const int l = emu::lane_id(), r = detail::row_of(l, i), c = detail::col_of(l, i);
    return layout == mem_row_major ? r * ldm + c : c * ldm + r;
}
inline void load_matrix_sync(accumulator_fragment& f, const float* p, unsigned ldm, layout_t layout) {
    detail::arrive();
    detail::check_access(p, ldm, 4, "load_matrix_sync(accumulator)");
    for (int i = 0; i < accumulator_fragment::num_elements; ++i) f.x[i] = p[accumulator_offset(ldm, layout, i)];
}
inline void store_matrix_sync(float* p, const accumulator_fragment& f, unsigned ldm, layout_t layout) {
    detail::arrive();
    detail::check_access(p, ldm, 4, "store_matrix_sync");
    for (int i = 0; i < accumulator_fragment::num_elements; ++i) p[accumulator_offset(ldm, layout, i)] = f.x[i];
}

// d = a b + c for the lane's elements of d (d may be c).
template <typename LayoutA, typename LayoutB>
inline void mma_sync(accumulator_fragment& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB>& b, const accumulator_fragment& c) {
    detail::arrive();
    const int l = emu::lane_id();
    float out[accumulator_fragment::num_elements];
    for (int i = 0; i < accumulator_fragment::num_elements; ++i) {
        const int r = detail::row_of(l, i), col = detail::col_of(l, i);
        float sum = c.x[i];
        for (int k = 0; k < 16; ++k) sum = std::fma(a.tile[r][k], b.tile[k][col], sum);
        out[i] = sum;
    }
    for (int i = 0; i < accumulator_fragment::num_elements; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
