//! GPU side of the fused mHC ops: the kernels of `kernels/*.cu`, embedded by build.rs, and their
//! launch layer on candle's CUDA stream.
//!
//! - [`KERNELS`]: one table of every kernel's name and argument list, the contract between the
//!   `.cu` sources and any launch layer (CUDA here; a HIP one can share it).
//! - [`mhc`]: the functions of `.notes/OPS.md` that `crate::mhc::ops` delegates to.
//! - [`selftest`]: fused kernels against the candle-ops reference on the device.
//! - [`bench`]: fused vs reference timings of one mHC sublayer.

// The kernel table below is plain data (no CUDA needed), shared by every launch layer; the
// CUDA launch code itself needs the `cuda` feature.
#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod mhc;
#[cfg(feature = "cuda")]
pub mod selftest;

use candle_core::DType;

/// Opens CUDA device `ordinal` the way training and benchmarks need it: its memory pool keeps
/// freed memory (candle frees at every sync; without this, large outputs are re-mapped on every
/// call and run at half bandwidth). Without the `cuda` feature this is candle's clear error.
pub fn open_cuda(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = &device {
        mhc::keep_freed_memory(cuda)?;
    }
    Ok(device)
}

/// The source file (module) a kernel lives in: `kernels/<stem>.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Coeffs,
    Pre,
    Post,
}

impl Module {
    pub const ALL: [Module; 3] = [Module::Coeffs, Module::Pre, Module::Post];

    /// The file stem under kernels/.
    pub fn stem(self) -> &'static str {
        match self {
            Module::Coeffs => "mhc_coeffs",
            Module::Pre => "mhc_pre",
            Module::Post => "mhc_post",
        }
    }
}

/// Element type of a pointer argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// The storage dtype of x (f32 or bf16): the kernel name carries it as `_f32` / `_bf16`.
    Storage,
    /// Always f32 (coefficients, parameters, their gradients, scratch).
    F32,
}

/// One kernel argument, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// Read-only device pointer.
    In(&'static str, Elem),
    /// Device pointer the kernel writes in full (may be uninitialised before the launch).
    Out(&'static str, Elem),
    /// Device pointer the kernel adds to atomically (must be zeroed before the first launch).
    Accumulate(&'static str, Elem),
    /// `long long` scalar.
    I64(&'static str),
    /// `int` scalar.
    I32(&'static str),
}

/// A kernel family: one `extern "C"` kernel per stream count n in `MIN_STREAMS..=MAX_STREAMS`
/// (suffix `_n<n>`) and, when `per_dtype`, per storage dtype (`_f32` / `_bf16` before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    pub module: Module,
    pub stem: &'static str,
    pub per_dtype: bool,
    pub args: &'static [Arg],
}

/// Stream counts the kernels are instantiated for.
pub const MIN_STREAMS: usize = 2;
pub const MAX_STREAMS: usize = 8;

impl KernelSpec {
    /// The exported symbol for storage dtype `dtype` and n streams, e.g. `mhc_pre_fwd_bf16_n4`.
    pub fn symbol(&self, dtype: DType, streams: usize) -> candle_core::Result<String> {
        if !(MIN_STREAMS..=MAX_STREAMS).contains(&streams) {
            candle_core::bail!(
                "{}: no kernel for n = {streams} streams (built for {MIN_STREAMS}..={MAX_STREAMS})",
                self.stem
            )
        }
        if !self.per_dtype {
            return Ok(format!("{}_n{streams}", self.stem));
        }
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => candle_core::bail!(
                "{}: storage dtype {other:?} is not supported (f32 or bf16)",
                self.stem
            ),
        };
        Ok(format!("{}_{suffix}_n{streams}", self.stem))
    }
}

use Arg::{Accumulate, In, Out, I32, I64};
use Elem::{Storage, F32};

/// Static-mode coefficients: ext = [act(b) | 0 | 1] per token. One thread per token.
pub const COEFFS_STATIC: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_static",
    per_dtype: false,
    args: &[
        In("alpha_b", F32),
        Out("ext", F32),
        I64("tokens"),
        I32("iters"),
    ],
};

/// Dynamic coefficients: projection, rms, activations, Sinkhorn; ext [T, 2k+1].
/// Block: 256 threads (FwdTile::THREADS); tokens per block = waves * `fwd_tokens_per_wave(n)`.
pub const COEFFS_FWD: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_fwd",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("phi", F32),
        In("alpha_b", F32),
        Out("ext", F32),
        I64("tokens"),
        I64("D"),
        I32("iters"),
    ],
};

/// Coefficient backward, per token (one thread each): dp [T, bwd_row_len(n)], Sinkhorn scratch
/// den [2 * iters * n, T], dalpha_b [3 + k] accumulated.
pub const COEFFS_BWD_TOKEN: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_bwd_token",
    per_dtype: false,
    args: &[
        In("alpha_b", F32),
        In("ext", F32),
        In("d_ext", F32),
        Out("dp", F32),
        Out("den", F32),
        Accumulate("dalpha_b", F32),
        I64("tokens"),
        I64("D"),
        I32("iters"),
    ],
};

/// Coefficient backward through the projection: dx [T, D] written, dphi [D, k] accumulated.
/// Grid (ceil(D / (block * BWD_X_ELEMS_PER_THREAD)), ceil(T / tokens_per_split)).
pub const COEFFS_BWD_X: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_bwd_x",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("phi", F32),
        In("dp", F32),
        Out("dx", Storage),
        Accumulate("dphi", F32),
        I64("tokens"),
        I64("D"),
        I64("tokens_per_split"),
    ],
};

/// u = sum_j H_pre[j] x_j. Grid-stride over (token, chunk of C).
pub const PRE_FWD: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_fwd",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        Out("u", Storage),
        I64("tokens"),
        I64("C"),
    ],
};

/// dx_j = H_pre[j] du, dh[pre] = <du, x_j>. One block per token (grid-stride).
pub const PRE_BWD: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_bwd",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("du", Storage),
        Out("dx", Storage),
        Out("dh", F32),
        I64("tokens"),
        I64("C"),
    ],
};

/// x'_i = sum_j H_res[i,j] x_j + H_post[i] y. Grid-stride over (token, chunk of C).
pub const POST_FWD: KernelSpec = KernelSpec {
    module: Module::Post,
    stem: "mhc_post_fwd",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("y", Storage),
        Out("out", Storage),
        I64("tokens"),
        I64("C"),
    ],
};

/// dy, dx, dh[post, res] from g. One block per token (grid-stride).
pub const POST_BWD: KernelSpec = KernelSpec {
    module: Module::Post,
    stem: "mhc_post_bwd",
    per_dtype: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("y", Storage),
        In("g", Storage),
        Out("dx", Storage),
        Out("dh", F32),
        Out("dy", Storage),
        I64("tokens"),
        I64("C"),
    ],
};

/// Every kernel family, for checks that walk them all.
pub const KERNELS: [KernelSpec; 8] = [
    COEFFS_STATIC,
    COEFFS_FWD,
    COEFFS_BWD_TOKEN,
    COEFFS_BWD_X,
    PRE_FWD,
    PRE_BWD,
    POST_FWD,
    POST_BWD,
];

/// Tokens each wave of `mhc_coeffs_fwd` owns (mirrors `FwdTile::TOKW` in mhc_coeffs.cu): as many
/// as keep TOKW x k partial sums near 96 registers, at most 8.
pub fn fwd_tokens_per_wave(streams: usize) -> usize {
    let k = streams * streams + 2 * streams;
    (96 / k).clamp(1, 8)
}

/// Row length of the per-token backward scratch dp (mirrors `BwdRow::KPAD`): k + 1, rounded up
/// to a multiple of 4.
pub fn bwd_row_len(streams: usize) -> usize {
    let k = streams * streams + 2 * streams;
    (k + 1).div_ceil(4) * 4
}

/// Reduction elements per thread of `mhc_coeffs_bwd_x` (mirrors `EPT` there).
pub const BWD_X_ELEMS_PER_THREAD: usize = 1;

/// Elements per thread of the streaming pre/post kernels (mirrors `Vec<T, N>::len`).
pub fn stream_vec_len(streams: usize, dtype: DType) -> usize {
    let bytes = if streams <= 4 { 16 } else { 8 };
    bytes / dtype.size_in_bytes()
}
