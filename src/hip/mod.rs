//! The fused mHC kernels on AMD GPUs (MI300 = gfx942, MI200 = gfx90a) through hip-sys, without
//! candle on the device: build.rs compiles kernels/*.cu with clang for both architectures and
//! embeds the code objects; this module loads the one of the device's architecture and launches
//! the kernels with the argument lists and launch rules of the table in `crate::gpu`, which the
//! CUDA layer uses too.
//!
//! - [`runtime`]: device, modules, buffers, checked launches, events.
//! - [`mhc`]: the ops' launch sequences (as src/gpu/mhc.rs and src/gpu/chain.rs) and a whole
//!   sublayer's buffers.
//! - [`rms_norm`]: the fused RMSNorm's launches (as src/gpu/rms_norm.rs), F of the sublayer.
//! - [`selftest`], [`apply`], [`bench`]: `mhc-train selftest|mhc-apply|bench --device hip`.
//!
//! Host data is plain `Vec<f32>` / `Vec<half::bf16>`; the oracle is the candle-ops reference in
//! f64 on the CPU.

pub mod apply;
pub mod bench;
pub mod mhc;
pub mod pre_norm;
pub mod rms_norm;
pub mod runtime;
pub mod selftest;

use anyhow::Result;
use std::path::Path;

/// `mhc-train selftest --device hip`: the fused kernels on AMD GPU 0 against the f64 reference
/// (the CUDA selftest's cases and bounds; `seed` repeats a run's inputs). Fails with one clear
/// error when no AMD GPU is found.
pub fn selftest(seed: Option<u64>) -> Result<()> {
    selftest::selftest(seed)
}

/// `mhc-train mhc-apply --device hip`: one sublayer (F = RMSNorm) forward and, given `dout`,
/// backward on AMD GPU 0, same files and tensor names as on CPU and CUDA.
pub fn mhc_apply(input: &Path, output: &Path) -> Result<()> {
    apply::mhc_apply(input, output)
}

/// `mhc-train bench --device hip`: the layer tables (Markdown) on AMD GPU 0, `reps` timed calls
/// per cell.
pub fn bench(reps: usize) -> Result<String> {
    bench::bench(reps)
}
