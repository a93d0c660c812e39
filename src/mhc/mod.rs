//! The mHC layer (spec/mhc.md): dynamic coefficients, aggregate (pre), mix + distribute (post).
//!
//! `reference` is the oracle in candle ops; `ops` holds the custom ops (Rust on CPU in `cpu`,
//! fused kernels on CUDA through `crate::gpu`). Both expose the same functions:
//! `coeffs(x, phi, alpha, b, shape) -> H`, `pre(x, H, shape) -> u`, `post(x, H, y, shape) -> x'`.

pub mod apply;
pub mod cpu;
pub mod layer;
pub mod ops;
pub mod reference;

/// rms epsilon: r = sqrt(mean(xbar^2) + EPS_RMS).
pub const EPS_RMS: f64 = 1e-6;
/// Sinkhorn epsilon: M / (sum + EPS_SINKHORN).
pub const EPS_SINKHORN: f64 = 1e-6;

/// The sizes of one mHC sublayer. H has `k = n*n + 2n` columns, laid out
/// `[pre (n) | post (n) | res (n*n, row-major: i*n + j)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MhcShape {
    /// n, the number of streams.
    pub streams: usize,
    /// C, the model width.
    pub width: usize,
    /// t_max, Sinkhorn iterations.
    pub sinkhorn_iters: usize,
    /// Per-token coefficients from x (true) or from the biases alone (false).
    pub dynamic: bool,
}

impl MhcShape {
    /// k = n*n + 2n coefficient columns.
    pub fn k(&self) -> usize {
        self.streams * self.streams + 2 * self.streams
    }
    /// First column of H_post.
    pub fn post_offset(&self) -> usize {
        self.streams
    }
    /// First column of H_res.
    pub fn res_offset(&self) -> usize {
        2 * self.streams
    }
}
