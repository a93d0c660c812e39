//! `mhc-train bench` (no --train): the mHC sublayer tables of the seed report, measured here:
//! fused vs candle-ops reference, f32 and bf16, static and dynamic, forward and forward+backward,
//! at the seed's sizes and at training sizes, with GB/s against the bytes floor and the measured
//! copy bandwidth; then each fused op alone. Timing is `crate::gpu::bench` (CUDA events, warm-up,
//! L2 flush before every timed call, medians).

use anyhow::Result;
use candle_core::Device;

/// The seed report's token counts (B) and widths (C), n = 4.
pub const SEED_TOKENS: [usize; 5] = [128, 256, 320, 512, 1024];
pub const SEED_WIDTHS: [usize; 3] = [1280, 1920, 2560];
/// Training-size token counts.
pub const TRAIN_TOKENS: [usize; 2] = [16384, 65536];
pub const TRAIN_WIDTHS: [usize; 2] = [1280, 2560];
pub const STREAMS: usize = 4;

/// The Markdown sections of the layer bench on `device` (a CUDA device).
pub fn layer_report(device: &Device, reps: usize) -> Result<String> {
    #[cfg(feature = "cuda")]
    {
        use crate::gpu::bench::{bench_mhc, bench_ops};
        let mut md = String::from("## mHC sublayer at the seed report's sizes\n\n");
        md += &bench_mhc(device, &SEED_TOKENS, &SEED_WIDTHS, STREAMS, reps)?;
        md += "\n## mHC sublayer at training sizes\n\n";
        md += &bench_mhc(device, &TRAIN_TOKENS, &TRAIN_WIDTHS, STREAMS, reps)?;
        md += "\n## Fused ops alone\n\n";
        md += &bench_ops(device, TRAIN_TOKENS[0], TRAIN_WIDTHS[0], STREAMS, reps)?;
        Ok(md)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, reps);
        anyhow::bail!(
            "the layer bench needs a CUDA build (scripts/build-cuda.sh); this binary has none"
        )
    }
}
