//! The fused mHC CUDA kernels against the f64 reference on the first CUDA device: runs
//! `mhc_train::gpu::selftest` (every case of it; see src/gpu/selftest.rs). Needs a GPU, so it is
//! built only with `--features cuda`.
#![cfg(feature = "cuda")]

use candle_core::Device;

#[test]
fn fused_kernels_match_the_reference_on_the_gpu() -> anyhow::Result<()> {
    let device = Device::new_cuda(0)?;
    mhc_train::gpu::selftest::selftest(&device, None)
}

/// The fused-vs-reference timing table (src/gpu/bench.rs). Minutes of GPU time, so ignored by
/// default: `cargo test --release --features cuda --test gpu_mhc -- --ignored --nocapture`.
/// MHC_BENCH_TOKENS / MHC_BENCH_WIDTHS (comma-separated) pick the sizes, MHC_BENCH_REPS the
/// timed calls per cell (20); MHC_BENCH_OPS_ONLY skips the sublayer table.
#[test]
#[ignore]
fn bench_fused_vs_reference() -> anyhow::Result<()> {
    let list = |var: &str, default: &[usize]| -> anyhow::Result<Vec<usize>> {
        match std::env::var(var) {
            Ok(v) => v
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|e| anyhow::anyhow!("{var}: {s:?}: {e}"))
                })
                .collect(),
            Err(_) => Ok(default.to_vec()),
        }
    };
    let tokens = list("MHC_BENCH_TOKENS", &[1024, 16384, 65536])?;
    let widths = list("MHC_BENCH_WIDTHS", &[1280, 2560])?;
    let reps = list("MHC_BENCH_REPS", &[20])?[0];
    let device = Device::new_cuda(0)?;
    let bench = mhc_train::gpu::bench::Bench::new(&device)?;
    for &t in &tokens {
        println!("{}", bench.ops_alone(t, widths[0], 4, reps)?);
    }
    if std::env::var_os("MHC_BENCH_OPS_ONLY").is_none() {
        let table = mhc_train::gpu::bench::bench_mhc(&device, &tokens, &widths, 4, reps)?;
        println!("{table}");
    }
    Ok(())
}
