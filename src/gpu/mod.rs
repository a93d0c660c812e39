//! GPU side of the fused mHC ops: the kernels of `kernels/*.cu`, embedded by build.rs, and their
//! launch layer on candle's CUDA stream.
//!
//! - [`KERNELS`]: one table of every kernel's name and argument list, the contract between the
//!   `.cu` sources and any launch layer (CUDA here; a HIP one can share it).
//! - [`mhc`]: the functions of `docs/ops.md` that `crate::mhc::ops` delegates to.
//! - [`rms_norm`]: the launches of `crate::model::rms_norm`'s kernels.
//! - [`selftest`]: fused kernels against the candle-ops reference on the device.
//! - [`bench`]: fused vs reference timings of one mHC sublayer.

// The kernel table below is plain data (no CUDA needed), shared by every launch layer; the
// CUDA launch code itself needs the `cuda` feature.
#[cfg(feature = "cuda")]
pub mod bench;
pub mod cases;
#[cfg(feature = "cuda")]
pub mod chain;
#[cfg(feature = "cuda")]
pub mod mhc;
#[cfg(feature = "cuda")]
pub mod pre_norm;
#[cfg(feature = "cuda")]
pub mod rms_norm;
#[cfg(feature = "cuda")]
pub mod selftest;

use crate::mhc::MhcShape;
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
    PreNorm,
    RmsNorm,
}

impl Module {
    pub const ALL: [Module; 5] = [
        Module::Coeffs,
        Module::Pre,
        Module::Post,
        Module::PreNorm,
        Module::RmsNorm,
    ];

    /// The file stem under kernels/.
    pub fn stem(self) -> &'static str {
        match self {
            Module::Coeffs => "mhc_coeffs",
            Module::Pre => "mhc_pre",
            Module::Post => "mhc_post",
            Module::PreNorm => "mhc_pre_norm",
            Module::RmsNorm => "rms_norm",
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

/// Threads per block of a kernel: the rule every launch layer applies with its device's warp
/// (wave) size, 32 on NVIDIA and 64 on AMD gfx9.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// A fixed count, a multiple of both wave sizes and at most `MAX_BLOCK` (the kernel's tiling
    /// is written for it).
    Fixed(usize),
    /// One warp/wave.
    OneWave,
    /// One block per token row of C elements taken `stream_vec_len` at a time: enough waves to
    /// cover the row once, at most `MAX_BLOCK`.
    Row,
}

/// Blocks of a launch, by the work each block owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// x over tiles of `PROJECT_TOKENS` tokens, y over slices of D = n*C: each slice a multiple
    /// of `PROJECT_CHUNK` elements, as many slices as fit the grid in one wave of resident
    /// blocks (`project_resident_blocks`), so short inputs still fill the device and no partial
    /// second wave doubles the time. The slice length is the kernel's `d_per_split` argument;
    /// the slice count sizes its partial output.
    ProjectTiles,
    /// One thread per token.
    ThreadPerToken,
    /// One block per tile of `FINISH_TOKENS` tokens.
    TokenTiles,
    /// Grid-stride over (token, vector chunk of C): one thread per chunk, at most
    /// `BLOCKS_PER_MULTIPROCESSOR` blocks per multiprocessor.
    Chunks,
    /// Grid-stride over tokens, one block per token, capped like `Chunks`.
    BlockPerToken,
    /// x over the reduction axis D = n*C (`bwd_x_block_columns` per block), y over token
    /// ranges of about `BWD_X_TOKEN_CHUNK` tokens or more: as many working blocks as fit one
    /// wave of resident blocks (`bwd_x_resident_blocks`), at least one per column block, in
    /// grid order (x fastest); the blocks of the last row past them return at once. So column
    /// block cb has ceil((working blocks - cb) / x) ranges, of equal length. The working block
    /// count is the kernel's `work_blocks` argument (`Geometry::split_len`). `staged`: the
    /// storage tensors the pass stages in shared memory (`bwd_x_shared_bytes`).
    SplitD { staged: usize },
    /// Grid-stride over rows, one block per `ACCUMULATE_ROWS_PER_BLOCK` rows at a time, at most
    /// as many blocks per multiprocessor as hold the threads of
    /// `ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR` full blocks (`accumulate_blocks_per_multiprocessor`):
    /// each block sums its rows' share of a reduced output in registers and writes it once at the
    /// end into its own row of a [blocks, ..] partial output, which the caller sums.
    RowsAccumulate,
    /// One block per `DGAMMA_SUM_COLUMNS` adjacent columns of the row width C.
    ColumnGroups,
}

/// Largest block any kernel is launched with (MAX_BLOCK in kernels/mhc_common.h).
pub const MAX_BLOCK: usize = 256;
/// Grid-stride kernels: at most this many blocks per multiprocessor.
pub const BLOCKS_PER_MULTIPROCESSOR: usize = 32;
/// `Grid::SplitD`: about the fewest tokens per range (each range adds one atomic pass over its
/// slice of dphi, so no more ranges than needed to fill the device).
pub const BWD_X_TOKEN_CHUNK: usize = 32;
/// `Grid::TokenTiles`: tokens per block (mirrors FINISH_TOKENS in kernels/mhc_coeffs.cu).
pub const FINISH_TOKENS: usize = 16;
/// `Grid::RowsAccumulate`: full (`MAX_BLOCK`) blocks per multiprocessor whose threads the grid
/// fills, all resident at once on NVIDIA (mirrors RN_BWD_MIN_BLOCKS in kernels/rms_norm.cu,
/// whose registers are capped for it).
pub const ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR: usize = 4;
/// `Grid::RowsAccumulate`: blocks of `block` threads per multiprocessor, as many as hold the
/// threads (and so the registers) of `ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR` full blocks: six of
/// the 160 threads of a 1280-wide bf16 row. (Four such blocks held a third fewer rows in flight:
/// the RMSNorm backward at 16384 x 1280 bf16 took 52 us on an H200, against 44 with six.)
pub fn accumulate_blocks_per_multiprocessor(block: usize) -> usize {
    (ACCUMULATE_BLOCKS_PER_MULTIPROCESSOR * MAX_BLOCK / block.max(1)).max(1)
}
/// `Grid::RowsAccumulate`: rows a block takes at once (mirrors PAIR in kernels/rms_norm.cu); no
/// more blocks than that fills, as every block's partial row costs as many bytes as a row.
pub const ACCUMULATE_ROWS_PER_BLOCK: usize = 2;
/// `Grid::ColumnGroups`: columns per block (mirrors RN_SUM_COLUMNS in kernels/rms_norm.cu).
pub const DGAMMA_SUM_COLUMNS: usize = 8;
/// `Grid::ProjectTiles` (mirrors PROJ_TOKENS and PROJ_CHUNK in kernels/mhc_coeffs.cu): tokens
/// per block, and the step along D whose multiples the slices are.
pub const PROJECT_TOKENS: usize = 64;
pub const PROJECT_CHUNK: usize = 64;

/// `Grid::ProjectTiles`: resident blocks per multiprocessor of the projection kernel, the
/// occupancy its launch bounds ask for on NVIDIA (mirrors `proj_min_blocks` in
/// kernels/mhc_coeffs.cu; on AMD the same numbers are an estimate).
pub fn project_resident_blocks(streams: usize) -> usize {
    if streams <= 4 {
        5
    } else {
        2
    }
}

/// `Grid::SplitD`: whether the coefficient backward over x takes its tensor-core form (bf16 on
/// a device whose kernels have them, k = n*n + 2n <= 32; mirrors `mma_bwd_x_fits` in
/// kernels/mhc_coeffs.cu).
pub fn bwd_x_on_tensor_cores(limits: &DeviceLimits, streams: usize, dtype: DType) -> bool {
    limits.tensor_cores && dtype == DType::BF16 && streams * streams + 2 * streams <= 32
}

/// `Grid::SplitD`: resident blocks per multiprocessor of the coefficient backward over x
/// (mirrors `bwd_x_min_blocks` in kernels/mhc_coeffs.cu; on AMD the same numbers are an
/// estimate).
pub fn bwd_x_resident_blocks(streams: usize) -> usize {
    if streams <= 4 {
        3
    } else {
        1
    }
}

/// `Grid::SplitD`: columns of D per block of the coefficient backward over x: one per thread in
/// the FFMA form, a 16-column tile per warp in the tensor-core form (mirrors `MmaBwdX::COLS`).
pub fn bwd_x_block_columns(
    limits: &DeviceLimits,
    streams: usize,
    dtype: DType,
    block: usize,
) -> usize {
    if bwd_x_on_tensor_cores(limits, streams, dtype) {
        16 * block / limits.wave
    } else {
        block * BWD_X_ELEMS_PER_THREAD
    }
}

/// `Grid::SplitD`: dynamic shared memory per block of the coefficient backward over x: the
/// tensor-core form stages `staged` bf16 tensors, BWD_X_STAGES chunks of 16 token rows of its
/// columns + 8 elements each (mirrors `MmaBwdX` in kernels/mhc_coeffs.cu); the FFMA form has
/// static arrays only.
pub fn bwd_x_shared_bytes(
    limits: &DeviceLimits,
    streams: usize,
    dtype: DType,
    block: usize,
    staged: usize,
) -> usize {
    const STAGES: usize = 3;
    const TOKENS: usize = 16;
    if bwd_x_on_tensor_cores(limits, streams, dtype) {
        let row = bwd_x_block_columns(limits, streams, dtype, block) + 8;
        staged * STAGES * TOKENS * row * dtype.size_in_bytes()
    } else {
        0
    }
}

/// Splits of a grid of `blocks` blocks along y so that all of them fit one wave of `resident`
/// blocks (at least one split, at most `max_splits`). A second, partial wave would leave most of
/// the device idle while it runs: 768 projection blocks on the 660 resident slots of an H200
/// took as long as two full waves.
fn splits_for_one_wave(resident: usize, blocks: usize, max_splits: usize) -> usize {
    (resident / blocks.max(1)).clamp(1, max_splits.max(1))
}

/// What a launch layer knows of its device for the launch rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Lanes per warp/wave; the kernels are compiled for the same (MHC_WAVE in compat.h).
    pub wave: usize,
    pub multiprocessors: usize,
    /// Whether the kernels were built with their tensor-core forms (MHC_TENSOR_CORES in
    /// compat.h: on NVIDIA, not on AMD).
    pub tensor_cores: bool,
}

/// Grid and block of one launch, and the length of a split along grid y: tokens per range of
/// `Grid::SplitD` kernels, elements of D per slice of `Grid::ProjectTiles` kernels (0 for the
/// others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32),
    pub block: u32,
    pub split_len: usize,
    /// Dynamic shared memory per block, in bytes (0 for kernels with static arrays only).
    pub shared_bytes: usize,
}

/// A kernel family: when `per_streams`, one `extern "C"` kernel per stream count n in
/// `MIN_STREAMS..=MAX_STREAMS` (suffix `_n<n>`); when `per_dtype`, one per storage dtype
/// (`_f32` / `_bf16`, before the stream suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    pub module: Module,
    pub stem: &'static str,
    pub per_dtype: bool,
    pub per_streams: bool,
    pub args: &'static [Arg],
    pub block: Block,
    pub grid: Grid,
}

/// Stream counts the kernels are instantiated for.
pub const MIN_STREAMS: usize = 2;
pub const MAX_STREAMS: usize = 8;

impl KernelSpec {
    /// The exported symbol for storage dtype `dtype` and n streams, e.g. `mhc_pre_fwd_bf16_n4`
    /// (`streams` is ignored by families that are not `per_streams`).
    pub fn symbol(&self, dtype: DType, streams: usize) -> candle_core::Result<String> {
        let streams_suffix = if self.per_streams {
            if !(MIN_STREAMS..=MAX_STREAMS).contains(&streams) {
                candle_core::bail!(
                    "{}: no kernel for n = {streams} streams (built for {MIN_STREAMS}..={MAX_STREAMS})",
                    self.stem
                )
            }
            format!("_n{streams}")
        } else {
            String::new()
        };
        if !self.per_dtype {
            return Ok(format!("{}{streams_suffix}", self.stem));
        }
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => candle_core::bail!(
                "{}: storage dtype {other:?} is not supported (f32 or bf16)",
                self.stem
            ),
        };
        Ok(format!("{}_{suffix}{streams_suffix}", self.stem))
    }

    /// The launch of a row kernel (no streams: `rows` rows of `width` elements, taken
    /// `stream_vec_len(1, dtype)` = 16 bytes at a time) over non-zero `rows`.
    pub fn row_geometry(
        &self,
        limits: &DeviceLimits,
        dtype: DType,
        rows: usize,
        width: usize,
    ) -> Geometry {
        let shape = MhcShape {
            streams: 1,
            width,
            sinkhorn_iters: 0,
            dynamic: false,
        };
        self.geometry(limits, &shape, dtype, rows)
    }

    /// The launch of this kernel over `tokens` tokens of `shape` with storage `dtype` (non-zero
    /// `tokens`; callers skip empty launches).
    pub fn geometry(
        &self,
        limits: &DeviceLimits,
        shape: &MhcShape,
        dtype: DType,
        tokens: usize,
    ) -> Geometry {
        let wave = limits.wave;
        let n = shape.streams;
        let vec_len = stream_vec_len(n, dtype);
        let block = match self.block {
            Block::Fixed(threads) => threads,
            Block::OneWave => wave,
            Block::Row => {
                (shape.width.div_ceil(vec_len).div_ceil(wave) * wave).clamp(wave, MAX_BLOCK)
            }
        };
        let cap = BLOCKS_PER_MULTIPROCESSOR * limits.multiprocessors.max(1);
        let blocks = |items: usize, per_block: usize, cap: usize| {
            items.div_ceil(per_block).clamp(1, cap) as u32
        };
        let (grid, split_len) = match self.grid {
            Grid::ProjectTiles => {
                let tiles = tokens.div_ceil(PROJECT_TOKENS);
                let chunks = (n * shape.width).div_ceil(PROJECT_CHUNK).max(1);
                let resident = project_resident_blocks(n) * limits.multiprocessors.max(1);
                let splits = splits_for_one_wave(resident, tiles, chunks);
                let d_per_split = chunks.div_ceil(splits) * PROJECT_CHUNK;
                (
                    (
                        tiles as u32,
                        chunks.div_ceil(d_per_split / PROJECT_CHUNK) as u32,
                    ),
                    d_per_split,
                )
            }
            Grid::ThreadPerToken => ((blocks(tokens, block, u32::MAX as usize), 1), 0),
            Grid::TokenTiles => ((blocks(tokens, FINISH_TOKENS, u32::MAX as usize), 1), 0),
            Grid::Chunks => (
                (
                    blocks(tokens * shape.width.div_ceil(vec_len), block, cap),
                    1,
                ),
                0,
            ),
            Grid::BlockPerToken => ((blocks(tokens, 1, cap), 1), 0),
            Grid::RowsAccumulate => (
                (
                    blocks(
                        tokens,
                        ACCUMULATE_ROWS_PER_BLOCK,
                        accumulate_blocks_per_multiprocessor(block) * limits.multiprocessors.max(1),
                    ),
                    1,
                ),
                0,
            ),
            Grid::ColumnGroups => (
                (
                    blocks(shape.width, DGAMMA_SUM_COLUMNS, u32::MAX as usize),
                    1,
                ),
                0,
            ),
            Grid::SplitD { .. } => {
                let d = n * shape.width;
                let columns = bwd_x_block_columns(limits, n, dtype, block);
                let d_blocks = d.div_ceil(columns).max(1);
                let resident = bwd_x_resident_blocks(n) * limits.multiprocessors.max(1);
                let most = d_blocks * tokens.div_ceil(BWD_X_TOKEN_CHUNK).max(1);
                let work_blocks = resident.max(d_blocks).min(most);
                (
                    (d_blocks as u32, work_blocks.div_ceil(d_blocks) as u32),
                    work_blocks,
                )
            }
        };
        let shared_bytes = match self.grid {
            Grid::SplitD { staged } => bwd_x_shared_bytes(limits, n, dtype, block, staged),
            _ => 0,
        };
        Geometry {
            grid,
            block: block as u32,
            split_len,
            shared_bytes,
        }
    }
}

use Arg::{Accumulate, In, Out, I32, I64};
use Elem::{Storage, F32};

/// Static-mode coefficients: ext = [act(b) | 0 | 1] per token, and h [T, k] = its H columns.
/// One thread per token.
pub const COEFFS_STATIC: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_static",
    per_dtype: false,
    per_streams: true,
    args: &[
        In("alpha_b", F32),
        Out("ext", F32),
        Out("h", F32),
        I64("tokens"),
        I32("iters"),
    ],
    block: Block::Fixed(128),
    grid: Grid::ThreadPerToken,
};

/// Dynamic coefficients, step 1: per (tile of tokens, slice of D) the partial projection and
/// sum of squares, partial [slices, T, k + 1] = [P | sum x^2] (`Grid::ProjectTiles`; tensor
/// cores for bf16 on NVIDIA).
pub const COEFFS_PROJECT: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_project",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("phi", F32),
        Out("partial", F32),
        I64("tokens"),
        I64("D"),
        I64("d_per_split"),
    ],
    block: Block::Fixed(128),
    grid: Grid::ProjectTiles,
};

/// Dynamic coefficients, step 2: per tile of `FINISH_TOKENS` tokens, the slices added, rms,
/// scale/bias, activations, Sinkhorn; ext [T, 2k+1] and h [T, k] (ext's H columns). `splits` is
/// the project launch's grid y.
pub const COEFFS_FINISH: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_finish",
    per_dtype: false,
    per_streams: true,
    args: &[
        In("partial", F32),
        In("alpha_b", F32),
        Out("ext", F32),
        Out("h", F32),
        I64("tokens"),
        I64("D"),
        I32("splits"),
        I32("iters"),
    ],
    block: Block::Fixed(128),
    grid: Grid::TokenTiles,
};

/// Coefficient backward, per token (one thread each), from ext and dh [T, k] = dL/dH: dp [T,
/// bwd_row_len], Sinkhorn scratch den [2 * iters * n, T], dalpha_b [3 + k] accumulated.
/// `split_dp` (1 where the pass over x runs on tensor cores) picks dp's row layout.
pub const COEFFS_BWD_TOKEN: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_bwd_token",
    per_dtype: false,
    per_streams: true,
    args: &[
        In("alpha_b", F32),
        In("ext", F32),
        In("dh", F32),
        In("dh_pre", F32),
        Out("dp", F32),
        Out("den", F32),
        Accumulate("dalpha_b", F32),
        I64("tokens"),
        I64("D"),
        I32("iters"),
        I32("split_dp"),
        I32("add_dh_pre"),
    ],
    block: Block::OneWave,
    grid: Grid::ThreadPerToken,
};

/// Coefficient backward through the projection: dx [T, D] written, dphi [D, k] accumulated.
/// Grid (ceil(D / bwd_x_block_columns), token ranges): `Grid::SplitD`.
pub const COEFFS_BWD_X: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_bwd_x",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("phi", F32),
        In("dp", F32),
        Out("dx", Storage),
        Accumulate("dphi", F32),
        I64("tokens"),
        I64("D"),
        I64("work_blocks"),
    ],
    block: Block::Fixed(256),
    grid: Grid::SplitD { staged: 1 },
};

/// The chained sublayer backward (docs/ops.md): `COEFFS_BWD_X` whose dx also sums post's dx
/// and H_pre[j] du (h [T, k] contiguous, du [T, C]), so the sublayer's dx is written once.
pub const COEFFS_BWD_X_SUM: KernelSpec = KernelSpec {
    module: Module::Coeffs,
    stem: "mhc_coeffs_bwd_x_sum",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("phi", F32),
        In("dp", F32),
        In("dx_post", Storage),
        In("du", Storage),
        In("h", F32),
        Out("dx", Storage),
        Accumulate("dphi", F32),
        I64("tokens"),
        I64("D"),
        I64("C"),
        I64("work_blocks"),
    ],
    block: Block::Fixed(256),
    grid: Grid::SplitD { staged: 3 },
};

/// The chained sublayer backward of pre: dh[pre] = <du, x_j> only (no dx).
pub const PRE_BWD_DH: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_bwd_dh",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("du", Storage),
        Out("dh", F32),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// The chained sublayer backward of pre in static mode: dx = dx_post + H_pre (x) du (post's dx
/// added, so the sublayer's dx is written once) and dh[pre] = <du, x_j>.
pub const PRE_BWD_SUM: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_bwd_sum",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("du", Storage),
        In("dx_post", Storage),
        Out("dx", Storage),
        Out("dh", F32),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// u = sum_j H_pre[j] x_j. Grid-stride over (token, chunk of C).
pub const PRE_FWD: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_fwd",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        Out("u", Storage),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Fixed(256),
    grid: Grid::Chunks,
};

/// The chained sublayer backward of pre in static mode when the fused RMSNorm's backward gave dh:
/// dx = dx_post + H_pre (x) du alone, x unread. Grid-stride over (token, vector chunk of C).
pub const PRE_BWD_DX_SUM: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_bwd_dx_sum",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("h", F32),
        In("du", Storage),
        In("dx_post", Storage),
        Out("dx", Storage),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Fixed(256),
    grid: Grid::Chunks,
};

/// dx_j = H_pre[j] du, dh[pre] = <du, x_j>. One block per token (grid-stride).
pub const PRE_BWD: KernelSpec = KernelSpec {
    module: Module::Pre,
    stem: "mhc_pre_bwd",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("du", Storage),
        Out("dx", Storage),
        Out("dh", F32),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// x'_i = sum_j H_res[i,j] x_j + H_post[i] y. Grid-stride over (token, chunk of C).
pub const POST_FWD: KernelSpec = KernelSpec {
    module: Module::Post,
    stem: "mhc_post_fwd",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("y", Storage),
        Out("out", Storage),
        I64("tokens"),
        I64("C"),
    ],
    block: Block::Fixed(256),
    grid: Grid::Chunks,
};

/// dy, dx, dh[post, res] from g. One block per token (grid-stride).
pub const POST_BWD: KernelSpec = KernelSpec {
    module: Module::Post,
    stem: "mhc_post_bwd",
    per_dtype: true,
    per_streams: true,
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
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// pre followed by F's leading RMSNorm, fused (`crate::mhc::ops::sublayer` with a norm):
/// y = RMSNorm(sum_j H_pre[j] x_j) * gamma, u never stored. eps as in `RMS_NORM_FWD`. One block
/// per pair of tokens at a time, grid-stride.
pub const PRE_NORM_FWD: KernelSpec = KernelSpec {
    module: Module::PreNorm,
    stem: "mhc_pre_norm_fwd",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("gamma", F32),
        Out("y", Storage),
        I64("tokens"),
        I64("C"),
        I64("eps_bits"),
    ],
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// Its backward from dy: du [T, C] written, dh's pre columns <du, x_j> (the others 0), and each
/// block's dgamma sum in its row of dgamma_partial [blocks, C] (`RMS_NORM_DGAMMA_SUM` adds them).
pub const PRE_NORM_BWD: KernelSpec = KernelSpec {
    module: Module::PreNorm,
    stem: "mhc_pre_norm_bwd",
    per_dtype: true,
    per_streams: true,
    args: &[
        In("x", Storage),
        In("h", F32),
        In("gamma", F32),
        In("dy", Storage),
        Out("du", Storage),
        Out("dh", F32),
        Out("dgamma_partial", F32),
        I64("tokens"),
        I64("C"),
        I64("eps_bits"),
    ],
    block: Block::Row,
    grid: Grid::RowsAccumulate,
};

/// RMSNorm forward (`crate::model::rms_norm`): y = x / sqrt(mean(x^2) + eps) * gamma over rows
/// of C. eps is the bit pattern of an f64 (`f64::to_bits`). One block per row, grid-stride.
pub const RMS_NORM_FWD: KernelSpec = KernelSpec {
    module: Module::RmsNorm,
    stem: "rms_norm_fwd",
    per_dtype: true,
    per_streams: false,
    args: &[
        In("x", Storage),
        In("gamma", F32),
        Out("y", Storage),
        I64("rows"),
        I64("C"),
        I64("eps_bits"),
    ],
    block: Block::Row,
    grid: Grid::BlockPerToken,
};

/// RMSNorm backward: dx [rows, C] written; each block adds its dgamma sum into its row of
/// dgamma_partial [blocks, C] (the caller zeroes it; `RMS_NORM_DGAMMA_SUM` sums the rows).
pub const RMS_NORM_BWD: KernelSpec = KernelSpec {
    module: Module::RmsNorm,
    stem: "rms_norm_bwd",
    per_dtype: true,
    per_streams: false,
    args: &[
        In("x", Storage),
        In("gamma", F32),
        In("dy", Storage),
        Out("dx", Storage),
        Out("dgamma_partial", F32),
        I64("rows"),
        I64("C"),
        I64("eps_bits"),
    ],
    block: Block::Row,
    grid: Grid::RowsAccumulate,
};

/// dgamma [C] = the sum of `RMS_NORM_BWD`'s dgamma_partial rows [blocks, C], coalesced (each
/// block a few adjacent columns of every row).
pub const RMS_NORM_DGAMMA_SUM: KernelSpec = KernelSpec {
    module: Module::RmsNorm,
    stem: "rms_norm_dgamma_sum",
    per_dtype: false,
    per_streams: false,
    args: &[
        In("dgamma_partial", F32),
        Out("dgamma", F32),
        I64("blocks"),
        I64("C"),
    ],
    block: Block::Fixed(256),
    grid: Grid::ColumnGroups,
};

/// Every kernel family, for checks that walk them all; both launch layers (CUDA and HIP) launch
/// each of them (tests/hip.rs).
pub const KERNELS: [KernelSpec; 18] = [
    COEFFS_STATIC,
    COEFFS_PROJECT,
    COEFFS_FINISH,
    COEFFS_BWD_TOKEN,
    COEFFS_BWD_X,
    COEFFS_BWD_X_SUM,
    PRE_FWD,
    PRE_BWD,
    PRE_BWD_DH,
    PRE_BWD_SUM,
    PRE_BWD_DX_SUM,
    POST_FWD,
    POST_BWD,
    PRE_NORM_FWD,
    PRE_NORM_BWD,
    RMS_NORM_FWD,
    RMS_NORM_BWD,
    RMS_NORM_DGAMMA_SUM,
];

/// Row length in floats of the per-token backward scratch dp (mirrors `BwdRow` in
/// kernels/mhc_coeffs.cu): for the tensor-core pass over x, dP split into bf16 hi and lo, each
/// padded to 16-wide k tiles, then coef and 3 zeros (`BwdRow::SPLIT`); else dP and coef in f32,
/// k + 1 rounded up to a multiple of 4 (`BwdRow::KPAD`).
pub fn bwd_row_len(limits: &DeviceLimits, streams: usize, dtype: DType) -> usize {
    let k = streams * streams + 2 * streams;
    if bwd_x_on_tensor_cores(limits, streams, dtype) {
        16 * k.div_ceil(16) + 4
    } else {
        (k + 1).div_ceil(4) * 4
    }
}

/// Reduction elements per thread of `mhc_coeffs_bwd_x` (mirrors `EPT` there).
pub const BWD_X_ELEMS_PER_THREAD: usize = 1;

/// Elements per thread of the streaming pre/post kernels (mirrors `Vec<T, N>::len`).
pub fn stream_vec_len(streams: usize, dtype: DType) -> usize {
    let bytes = if streams <= 4 { 16 } else { 8 };
    bytes / dtype.size_in_bytes()
}
