//! The selftest cases shared by every launch layer (CUDA and HIP): the same shapes, logit scales
//! and tolerances on each vendor, and the random inputs drawn the same way.

use candle_core::DType;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

pub const TOL_F32: f64 = 1e-5;
pub const TOL_BF16: f64 = 1e-2;

/// A selftest run's seed: the one given (to repeat a run), else the clock's nanoseconds (fresh
/// inputs every run; the run prints it).
pub fn run_seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

/// The input seed of case `index` of a run.
pub fn case_seed(run_seed: u64, index: usize) -> u64 {
    run_seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub dtype: DType,
    pub streams: usize,
    pub width: usize,
    pub tokens: usize,
    /// Typical size of the logits Ht (through alpha and b).
    pub scale: f64,
    pub dynamic: bool,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} n={} C={:<4} T={:<5} scale={:<4} {:<7}",
            format!("{:?}", self.dtype).to_lowercase(),
            self.streams,
            self.width,
            self.tokens,
            self.scale,
            if self.dynamic { "dynamic" } else { "static" }
        )
    }
}

/// The cases: every dtype x n x mode x logit scale, with (T, C) rotating through
/// odd C (scalar path), 16-byte-aligned C (vector path), a single token, partial tiles and
/// several token ranges; plus one training-sized case per dtype.
pub fn cases() -> Vec<Case> {
    let sizes = [(1, 129), (37, 256), (300, 67), (130, 1032), (65, 5)];
    let mut cases = Vec::new();
    let mut i = 0;
    for dtype in [DType::F32, DType::BF16] {
        for streams in [2, 4, 8] {
            for dynamic in [true, false] {
                for scale in [0.01, 1.0, 3.0] {
                    let (tokens, width) = sizes[i % sizes.len()];
                    i += 1;
                    cases.push(Case {
                        dtype,
                        streams,
                        width,
                        tokens,
                        scale,
                        dynamic,
                    });
                }
            }
        }
        cases.push(Case {
            dtype,
            streams: 4,
            width: 1280,
            tokens: 2048,
            scale: 1.0,
            dynamic: true,
        });
    }
    cases
}

pub fn normal(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let dist = Normal::new(0.0, std).expect("positive std");
    (0..len).map(|_| dist.sample(rng) as f32).collect()
}
