//! RMSNorm on an AMD GPU (kernels/rms_norm.cu), F of the mHC sublayer: the launches of
//! src/gpu/rms_norm.rs on buffers the caller owns. Forward one launch; backward the zeroing of
//! the per-block dgamma rows, one launch, and the launch that sums the rows into dgamma [C].

use super::mhc::check_len;
use super::runtime::{Buffer, Device, DeviceElem, KernelArg};
use crate::gpu::{RMS_NORM_BWD, RMS_NORM_DGAMMA_SUM, RMS_NORM_FWD};
use anyhow::Result;
use candle_core::DType;

/// Rows of C elements normalised with one eps; `dgamma_partial` holds the backward's per-block
/// dgamma rows [blocks, C] (allocated once, so timed calls only launch).
pub struct RmsNorm {
    pub rows: usize,
    pub width: usize,
    pub eps: f64,
    dgamma_partial: Buffer<f32>,
}

impl RmsNorm {
    /// For `rows` rows of `width` elements of storage type T on `dev`.
    pub fn new<T: DeviceElem>(dev: &Device, rows: usize, width: usize, eps: f64) -> Result<Self> {
        let blocks = if rows > 0 && width > 0 {
            RMS_NORM_BWD
                .row_geometry(&dev.limits, T::DTYPE, rows, width)
                .grid
                .0 as usize
        } else {
            0
        };
        Ok(Self {
            rows,
            width,
            eps,
            dgamma_partial: dev.alloc(blocks * width)?,
        })
    }

    /// y = x / sqrt(mean(x^2) + eps) * gamma per row.
    pub fn forward<T: DeviceElem>(
        &self,
        dev: &Device,
        x: &Buffer<T>,
        gamma: &Buffer<f32>,
        y: &mut Buffer<T>,
    ) -> Result<()> {
        let op = "rms-norm";
        let (rows, c) = (self.rows, self.width);
        check_len(op, "x", x, rows * c)?;
        check_len(op, "gamma", gamma, c)?;
        check_len(op, "y", y, rows * c)?;
        if rows == 0 || c == 0 {
            return Ok(());
        }
        let geometry = RMS_NORM_FWD.row_geometry(&dev.limits, T::DTYPE, rows, c);
        let eps_bits = self.eps.to_bits() as i64;
        let args = [
            x.arg(),
            gamma.arg(),
            y.arg_mut(),
            KernelArg::I64(rows as i64),
            KernelArg::I64(c as i64),
            KernelArg::I64(eps_bits),
        ];
        dev.launch(&RMS_NORM_FWD, T::DTYPE, 0, &geometry, &args)
    }

    /// dx (x's dtype) and dgamma [C] (f32, summed over rows) from dy.
    pub fn backward<T: DeviceElem>(
        &mut self,
        dev: &Device,
        x: &Buffer<T>,
        gamma: &Buffer<f32>,
        dy: &Buffer<T>,
        dx: &mut Buffer<T>,
        dgamma: &mut Buffer<f32>,
    ) -> Result<()> {
        let op = "rms-norm backward";
        let (rows, c) = (self.rows, self.width);
        check_len(op, "x", x, rows * c)?;
        check_len(op, "gamma", gamma, c)?;
        check_len(op, "dy", dy, rows * c)?;
        check_len(op, "dx", dx, rows * c)?;
        check_len(op, "dgamma", dgamma, c)?;
        if rows == 0 || c == 0 {
            return dgamma.zero();
        }
        let geometry = RMS_NORM_BWD.row_geometry(&dev.limits, T::DTYPE, rows, c);
        let blocks = geometry.grid.0 as usize;
        check_len(op, "dgamma_partial", &self.dgamma_partial, blocks * c)?;
        let (rows_i, c_i, eps_bits) = (rows as i64, c as i64, self.eps.to_bits() as i64);
        let args = [
            x.arg(),
            gamma.arg(),
            dy.arg(),
            dx.arg_mut(),
            self.dgamma_partial.arg_mut(),
            KernelArg::I64(rows_i),
            KernelArg::I64(c_i),
            KernelArg::I64(eps_bits),
        ];
        dev.launch(&RMS_NORM_BWD, T::DTYPE, 0, &geometry, &args)?;
        sum_dgamma_rows(dev, &self.dgamma_partial, blocks, c, dgamma)
    }
}

/// dgamma [C] = the sum of a backward's per-block rows dgamma_partial [blocks, C] (this one's and
/// the fused pre + RMSNorm's).
pub(super) fn sum_dgamma_rows(
    dev: &Device,
    dgamma_partial: &Buffer<f32>,
    blocks: usize,
    c: usize,
    dgamma: &mut Buffer<f32>,
) -> Result<()> {
    let sum_geometry = RMS_NORM_DGAMMA_SUM.row_geometry(&dev.limits, DType::F32, blocks, c);
    let (blocks_i, c_i) = (blocks as i64, c as i64);
    let args = [
        dgamma_partial.arg(),
        dgamma.arg_mut(),
        KernelArg::I64(blocks_i),
        KernelArg::I64(c_i),
    ];
    dev.launch(&RMS_NORM_DGAMMA_SUM, DType::F32, 0, &sum_geometry, &args)
}
