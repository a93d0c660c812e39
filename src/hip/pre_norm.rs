//! pre followed by F's leading RMSNorm, fused, on an AMD GPU (kernels/mhc_pre_norm.cu): the
//! launches of src/gpu/pre_norm.rs on buffers the caller owns. Forward one launch; backward one
//! launch and the one that sums its per-block dgamma rows (kernels/rms_norm.cu's).

use super::mhc::check_len;
use super::rms_norm::sum_dgamma_rows;
use super::runtime::{Buffer, Device, DeviceElem, KernelArg};
use crate::gpu::{PRE_NORM_BWD, PRE_NORM_FWD};
use crate::mhc::MhcShape;
use anyhow::Result;

/// y = RMSNorm(sum_j H_pre[j] x_j) * gamma over `tokens` tokens of `shape`, one eps;
/// `dgamma_partial` holds the backward's per-block dgamma rows [blocks, C] (allocated once, so
/// timed calls only launch).
pub struct PreNorm {
    pub shape: MhcShape,
    pub tokens: usize,
    pub eps: f64,
    dgamma_partial: Buffer<f32>,
}

impl PreNorm {
    /// For `tokens` tokens of storage type T on `dev`.
    pub fn new<T: DeviceElem>(
        dev: &Device,
        shape: MhcShape,
        tokens: usize,
        eps: f64,
    ) -> Result<Self> {
        let blocks = if tokens > 0 && shape.width > 0 {
            PRE_NORM_BWD
                .geometry(&dev.limits, &shape, T::DTYPE, tokens)
                .grid
                .0 as usize
        } else {
            0
        };
        Ok(Self {
            shape,
            tokens,
            eps,
            dgamma_partial: dev.alloc(blocks * shape.width)?,
        })
    }

    /// y [T, C] from x [T, n, C], h [T, k] and gamma [C].
    pub fn forward<T: DeviceElem>(
        &self,
        dev: &Device,
        x: &Buffer<T>,
        h: &Buffer<f32>,
        gamma: &Buffer<f32>,
        y: &mut Buffer<T>,
    ) -> Result<()> {
        let op = "mhc-pre-norm";
        let (shape, t) = (&self.shape, self.tokens);
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        check_len(op, "x", x, t * n * c)?;
        check_len(op, "h", h, t * k)?;
        check_len(op, "gamma", gamma, c)?;
        check_len(op, "y", y, t * c)?;
        if t == 0 || c == 0 {
            return Ok(());
        }
        let geometry = PRE_NORM_FWD.geometry(&dev.limits, shape, T::DTYPE, t);
        let (tokens_i, c_i, eps_bits) = (t as i64, c as i64, self.eps.to_bits() as i64);
        let args = [
            x.arg(),
            h.arg(),
            gamma.arg(),
            y.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I64(c_i),
            KernelArg::I64(eps_bits),
        ];
        dev.launch(&PRE_NORM_FWD, T::DTYPE, n, &geometry, &args)
    }

    /// From dy [T, C]: du [T, C], dh [T, k] (only the pre columns non-zero) and dgamma [C].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: DeviceElem>(
        &mut self,
        dev: &Device,
        x: &Buffer<T>,
        h: &Buffer<f32>,
        gamma: &Buffer<f32>,
        dy: &Buffer<T>,
        du: &mut Buffer<T>,
        dh: &mut Buffer<f32>,
        dgamma: &mut Buffer<f32>,
    ) -> Result<()> {
        let op = "mhc-pre-norm backward";
        let (shape, t) = (&self.shape, self.tokens);
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        check_len(op, "x", x, t * n * c)?;
        check_len(op, "h", h, t * k)?;
        check_len(op, "gamma", gamma, c)?;
        check_len(op, "dy", dy, t * c)?;
        check_len(op, "du", du, t * c)?;
        check_len(op, "dh", dh, t * k)?;
        check_len(op, "dgamma", dgamma, c)?;
        if t == 0 || c == 0 {
            return dgamma.zero();
        }
        let geometry = PRE_NORM_BWD.geometry(&dev.limits, shape, T::DTYPE, t);
        let blocks = geometry.grid.0 as usize;
        check_len(op, "dgamma_partial", &self.dgamma_partial, blocks * c)?;
        let (tokens_i, c_i, eps_bits) = (t as i64, c as i64, self.eps.to_bits() as i64);
        let args = [
            x.arg(),
            h.arg(),
            gamma.arg(),
            dy.arg(),
            du.arg_mut(),
            dh.arg_mut(),
            self.dgamma_partial.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I64(c_i),
            KernelArg::I64(eps_bits),
        ];
        dev.launch(&PRE_NORM_BWD, T::DTYPE, n, &geometry, &args)?;
        sum_dgamma_rows(dev, &self.dgamma_partial, blocks, c, dgamma)
    }
}
