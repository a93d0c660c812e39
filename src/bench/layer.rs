//! `mhc-train bench` (without --train, or with --layers): the seed report's tables measured here:
//! RMSNorm and sigmoid alone; the mHC sublayer (F = RMSNorm) as candle ops in f32 and bf16 and
//! fused in bf16, static and dynamic, forward and forward+backward, at the seed's configs and at
//! training sizes, with peak memory; fused bf16 against the f32 reference; each fused op alone.
//! Timing is `crate::gpu::bench` (CUDA events, warm-up, L2 flush before every timed call,
//! medians); results are `crate::bench::report` types.

use crate::bench::report::LayerResults;
use anyhow::Result;
use candle_core::Device;

/// The seed report's token counts (B) and widths (C), n = 4.
pub const SEED_TOKENS: [usize; 5] = [128, 256, 320, 512, 1024];
pub const SEED_WIDTHS: [usize; 3] = [1280, 1920, 2560];
/// Training-size token counts (a micro-batch of 16 x 1024 and 64 x 1024 tokens).
pub const TRAIN_TOKENS: [usize; 2] = [16384, 65536];
pub const TRAIN_WIDTHS: [usize; 2] = [1280, 2560];
pub const STREAMS: usize = 4;
/// The seed report's isolated-op sizes (rows x cols).
pub const OP_SIZES: [(usize, usize); 4] = [(256, 1280), (512, 1920), (1024, 2560), (2048, 4096)];

/// The CUDA version the driver supports, for the report header.
pub fn cuda_version() -> String {
    #[cfg(feature = "cuda")]
    return crate::gpu::bench::driver_cuda_version();
    #[cfg(not(feature = "cuda"))]
    "none (CPU-only build)".into()
}

/// Runs every layer table on `device` (a CUDA device), `reps` timed calls per layer cell and
/// `op_reps` per isolated-op cell; progress goes to stderr.
pub fn run(device: &Device, reps: usize, op_reps: usize) -> Result<LayerResults> {
    #[cfg(feature = "cuda")]
    {
        measure(device, reps, op_reps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, reps, op_reps);
        anyhow::bail!(
            "the layer bench needs a CUDA build (scripts/build-cuda.sh); this binary has none \
             (bench --train runs on CPU)"
        )
    }
}

#[cfg(feature = "cuda")]
fn measure(device: &Device, reps: usize, op_reps: usize) -> Result<LayerResults> {
    use crate::bench::report::{
        Accuracy, LayerConfig, LayerTiming, OpTiming, SizeSet, LAYER_VARIANTS, OP_VARIANTS, REF_F32,
    };
    use crate::gpu::bench::{Bench, FLUSH_BYTES, FUSED_RMS_NORM, WARMUP};
    let started = std::time::Instant::now();
    let progress =
        |what: &str| eprintln!("[bench {:6.1} s] {what}", started.elapsed().as_secs_f64());
    let bench = Bench::new(device)?;
    progress(&format!("copy bandwidth {:.0} GB/s", bench.copy_gbs()));

    let mut ops = Vec::new();
    for op in ["rmsnorm", "sigmoid"] {
        for (rows, cols) in OP_SIZES {
            for variant in OP_VARIANTS {
                let time = bench.op(op, rows, cols, variant, op_reps);
                ops.push(OpTiming {
                    op: op.into(),
                    rows,
                    cols,
                    variant: variant.into(),
                    time,
                });
            }
        }
        progress(&format!("{op} done"));
    }

    let mut configs = Vec::new();
    for (set, tokens, widths) in [
        (SizeSet::Seed, &SEED_TOKENS[..], &SEED_WIDTHS[..]),
        (SizeSet::Training, &TRAIN_TOKENS[..], &TRAIN_WIDTHS[..]),
    ] {
        for &t in tokens {
            for &width in widths {
                for dynamic in [true, false] {
                    let config = LayerConfig {
                        tokens: t,
                        width,
                        streams: STREAMS,
                        dynamic,
                    };
                    configs.push((set, config));
                }
            }
        }
    }
    let mut layers = Vec::new();
    for (set, config) in &configs {
        let mut line = format!(
            "layer T={} C={} {}:",
            config.tokens,
            config.width,
            if config.dynamic { "dynamic" } else { "static" }
        );
        for variant in LAYER_VARIANTS {
            let (fwd, fwd_bwd) = bench.layer(config, variant, reps);
            let show = |m: &crate::bench::report::Measurement| {
                m.ms.map_or("failed".into(), |ms| format!("{ms:.3}"))
            };
            line += &format!(" {variant} {}/{} ms", show(&fwd), show(&fwd_bwd));
            layers.push(LayerTiming {
                set: *set,
                config: *config,
                variant: variant.into(),
                elem_bytes: if variant == REF_F32 { 4 } else { 2 },
                fwd,
                fwd_bwd,
            });
        }
        progress(&line);
    }

    let mut accuracy = Vec::new();
    for (set, config) in &configs {
        let (out, dx, error) = match bench.accuracy(config) {
            Ok((out, dx)) => (Some(out), Some(dx), None),
            Err(err) => (None, None, Some(format!("{err:#}"))),
        };
        accuracy.push(Accuracy {
            set: *set,
            config: *config,
            out,
            dx,
            error,
        });
    }
    progress("correctness done");
    // At a training size and at the seed size where the fused sublayer is slowest against the
    // reference (T = 1024, C = 2560).
    let mut fused_ops_alone = bench.ops_alone(TRAIN_TOKENS[0], TRAIN_WIDTHS[0], STREAMS, reps)?;
    fused_ops_alone += "\n";
    fused_ops_alone += &bench.ops_alone(1024, SEED_WIDTHS[2], STREAMS, reps)?;
    progress("fused ops alone done");
    Ok(LayerResults {
        fused_rms_norm: FUSED_RMS_NORM.into(),
        copy_gbs: bench.copy_gbs(),
        warmup: WARMUP,
        reps,
        op_reps,
        flush_bytes: FLUSH_BYTES,
        ops,
        layers,
        accuracy,
        fused_ops_alone,
    })
}
