//! `mhc-train bench --device hip`: the mHC sublayer (F = RMSNorm) on an AMD GPU at the seed
//! report's sizes and at training sizes, f32 and bf16, static and dynamic, forward and
//! forward+backward, timed with HIP events (2 warm-up calls, the last-level caches flushed by a
//! 1 GiB write before every timed call, medians), GB/s against the bytes floor and the measured
//! copy bandwidth.
//!
//! What is timed: every launch of the sublayer as the trainer runs it on CUDA: coeffs, pre, the
//! fused RMSNorm and post, and their chained backward (dx written once: by the coefficient
//! backward in dynamic mode, by pre's backward in static mode), with the strided copies that
//! assemble dh from pre's and post's columns and the zeroing of accumulated gradients.
//!
//! Bytes floor: the CUDA tables' (`LayerConfig::floor_fwd_bytes`, 3X + 4U forward and 9X + 10U
//! forward+backward, X = T*n*C and U = T*C elements of the storage dtype).

use super::mhc::{Chaining, Sublayer, SublayerF};
use super::runtime::{Buffer, Device, DeviceElem};
use crate::bench::layer::{SEED_TOKENS, SEED_WIDTHS, STREAMS, TRAIN_TOKENS, TRAIN_WIDTHS};
use crate::bench::report::LayerConfig;
use crate::mhc::apply::RMS_NORM_EPS;
use crate::mhc::MhcShape;
use anyhow::Result;
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Bytes of the cache flush write: above the 256 MB Infinity Cache of an MI300X.
const FLUSH_BYTES: usize = 1 << 30;

struct Timer<'a> {
    dev: &'a Device,
    flush: Buffer<f32>,
}

impl<'a> Timer<'a> {
    fn new(dev: &'a Device) -> Result<Self> {
        Ok(Self {
            dev,
            flush: dev.alloc(FLUSH_BYTES / 4)?,
        })
    }

    /// Median device time in ms of `f` over `reps` calls after 2 warm-up calls, caches flushed
    /// before each call.
    fn median_ms(&mut self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..2 {
            f()?;
        }
        let (start, end) = (self.dev.event()?, self.dev.event()?);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            self.flush.fill(1.0)?;
            start.record()?;
            f()?;
            end.record()?;
            times.push(start.elapsed_ms(&end)?);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Read + write GB/s of a 1 GiB device-to-device copy into a preallocated buffer, timed with
/// the same events.
fn copy_bandwidth(dev: &Device, timer: &mut Timer) -> Result<f64> {
    let len = (1usize << 30) / 4;
    let src = dev.zeros::<f32>(len)?;
    let mut dst = dev.alloc::<f32>(len)?;
    let ms = timer.median_ms(10, || dst.copy_from(&src))?;
    Ok(2.0 * (len * 4) as f64 / (ms * 1e-3) / 1e9)
}

fn layer<T: DeviceElem>(
    dev: &Device,
    tokens: usize,
    width: usize,
    dynamic: bool,
    to_t: impl Fn(f32) -> T,
) -> Result<Sublayer<T>> {
    let shape = MhcShape {
        streams: STREAMS,
        width,
        sinkhorn_iters: 20,
        dynamic,
    };
    let (n, k) = (STREAMS, shape.k());
    let mut rng = ChaCha8Rng::seed_from_u64(tokens as u64 * 7919 + width as u64);
    let mut normal = |len: usize, std: f64| -> Vec<f32> {
        let dist = Normal::new(0.0, std).expect("positive std");
        (0..len).map(|_| dist.sample(&mut rng) as f32).collect()
    };
    let x: Vec<T> = normal(tokens * n * width, 1.0)
        .into_iter()
        .map(&to_t)
        .collect();
    let phi = if dynamic {
        normal(n * width * k, (1.0 / (n * width) as f64).sqrt())
    } else {
        Vec::new()
    };
    let mut alpha_b = vec![if dynamic { 0.5 } else { 0.0 }; 3];
    alpha_b.extend(normal(k, 1.0));
    let gamma: Vec<f32> = normal(width, 0.1).iter().map(|g| 1.0 + g).collect();
    let g: Vec<T> = normal(tokens * n * width, 1.0)
        .into_iter()
        .map(&to_t)
        .collect();
    let f = SublayerF::RmsNorm {
        gamma: &gamma,
        eps: RMS_NORM_EPS,
    };
    let mut layer = Sublayer::new(dev, shape, f, Chaining::Chained, &x, &phi, &alpha_b)?;
    layer.g.copy_from_host(&g)?;
    Ok(layer)
}

/// Rows of the table for one (T, C) and storage type.
fn rows<T: DeviceElem>(
    dev: &Device,
    timer: &mut Timer,
    copy_gbs: f64,
    (tokens, width): (usize, usize),
    reps: usize,
    to_t: impl Fn(f32) -> T + Copy,
) -> String {
    let elem = std::mem::size_of::<T>();
    let dtype = format!("{:?}", T::DTYPE).to_lowercase();
    let config = LayerConfig {
        tokens,
        width,
        streams: STREAMS,
        dynamic: true,
    };
    let (floor_fwd, floor_all) = (
        config.floor_fwd_bytes(elem),
        config.floor_fwd_bwd_bytes(elem),
    );
    let cell = |r: &Result<f64>, floor: f64| match r {
        Ok(ms) => format!(
            "{ms:.3} | {:.0} | {:.0}",
            floor / (ms * 1e-3) / 1e9,
            100.0 * floor / (copy_gbs * 1e9) / (ms * 1e-3)
        ),
        Err(err) => format!("error: {err:#} | - | -"),
    };
    let mut out = String::new();
    for dynamic in [true, false] {
        let mode = if dynamic { "dynamic" } else { "static" };
        let mut layer = match layer(dev, tokens, width, dynamic, to_t) {
            Ok(layer) => layer,
            Err(err) => {
                out +=
                    &format!("| {tokens} | {width} | {dtype} | {mode} | setup failed: {err:#} |\n");
                continue;
            }
        };
        let fwd = timer.median_ms(reps, || {
            layer.forward_pre(dev)?;
            layer.forward_post(dev)
        });
        let all = timer.median_ms(reps, || {
            layer.forward_pre(dev)?;
            layer.forward_post(dev)?;
            layer.backward_post(dev)?;
            layer.backward_pre(dev)
        });
        out += &format!(
            "| {tokens} | {width} | {dtype} | {mode} | {} | {} |\n",
            cell(&fwd, floor_fwd),
            cell(&all, floor_all)
        );
    }
    out
}

fn table(
    dev: &Device,
    timer: &mut Timer,
    copy_gbs: f64,
    tokens: &[usize],
    widths: &[usize],
    reps: usize,
) -> String {
    let mut out = String::from(
        "| T | C | dtype | mode | fwd ms | fwd GB/s | fwd % | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &t in tokens {
        for &c in widths {
            out += &rows(dev, timer, copy_gbs, (t, c), reps, bf16::from_f32);
            out += &rows(dev, timer, copy_gbs, (t, c), reps, |v: f32| v);
        }
    }
    out
}

/// The Markdown sections of the layer bench on AMD GPU 0, `reps` timed calls per cell.
pub fn bench(reps: usize) -> Result<String> {
    let dev = Device::open(0)?;
    let mut timer = Timer::new(&dev)?;
    let copy_gbs = copy_bandwidth(&dev, &mut timer)?;
    let mut md = format!(
        "Device {} ({}, {} CUs, wave {}). One mHC sublayer with F = RMSNorm, all fused \
         kernels, chained backward (dx written once), n = {STREAMS}, median of {reps}, caches \
         flushed; device-to-device copy {copy_gbs:.0} GB/s (read + write). Floor bytes: fwd \
         3X + 4U, fwd+bwd 9X + 10U (X = T*n*C, U = T*C elements); % = floor time at copy \
         bandwidth / measured time.\n\n",
        dev.name, dev.arch, dev.limits.multiprocessors, dev.limits.wave
    );
    md += "## mHC sublayer ops at the seed report's sizes (HIP)\n\n";
    md += &table(&dev, &mut timer, copy_gbs, &SEED_TOKENS, &SEED_WIDTHS, reps);
    md += "\n## mHC sublayer ops at training sizes (HIP)\n\n";
    md += &table(
        &dev,
        &mut timer,
        copy_gbs,
        &TRAIN_TOKENS,
        &TRAIN_WIDTHS,
        reps,
    );
    Ok(md)
}
