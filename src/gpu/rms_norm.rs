//! CUDA launches of the RMSNorm kernels (kernels/rms_norm.cu) for `crate::model::rms_norm`:
//! one launch forward; backward the zeroing of the per-block dgamma rows, one launch, and the
//! launch that sums the rows.

use super::mhc::{alloc_out, cfg, dispatch_storage, function, limits, tensor, view, wrap};
use super::DeviceLimits;
use super::{RMS_NORM_BWD, RMS_NORM_DGAMMA_SUM, RMS_NORM_FWD};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// (rows, C) of x [.., C], checking gamma [C].
fn rows_of(op: &str, x: &[usize], gamma: &[usize]) -> Result<(usize, usize)> {
    let Some(&c) = x.last() else {
        bail!("{op}: x is a scalar, expected [.., C]")
    };
    if gamma != [c] {
        bail!("{op}: gamma has shape {gamma:?}, expected [{c}]")
    }
    Ok((x.iter().product::<usize>() / c.max(1), c))
}

/// Forward: y with x's shape and dtype.
pub fn forward(
    eps: f64,
    x: &CudaStorage,
    x_l: &Layout,
    gamma: &CudaStorage,
    gamma_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "rms-norm";
    dispatch_storage!(op, x.dtype(), T => {
        let dev = &x.device;
        let (rows, c) = rows_of(op, x_l.dims(), gamma_l.dims())?;
        let mut y = alloc_out::<T>(dev, rows * c)?;
        if rows > 0 && c > 0 {
            let func = function(dev, &RMS_NORM_FWD, x.dtype(), 0)?;
            let geometry = RMS_NORM_FWD.row_geometry(&limits(dev)?, x.dtype(), rows, c);
            let x_v = view::<T>(op, "x", x, x_l)?;
            let gamma_v = view::<f32>(op, "gamma", gamma, gamma_l)?;
            let (rows_i, c_i, eps_bits) = (rows as i64, c as i64, eps.to_bits() as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&gamma_v).arg(&mut y);
            b.arg(&rows_i).arg(&c_i).arg(&eps_bits);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((wrap(dev, y), x_l.shape().clone()))
    })
}

/// Backward: (dx with x's shape and dtype, dgamma [C] f32 summed over rows). x, gamma and dy are
/// made contiguous here.
pub fn backward(eps: f64, x: &Tensor, gamma: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "rms-norm backward";
    dispatch_storage!(op, x.dtype(), T => {
        let (rows, c) = rows_of(op, x.dims(), gamma.dims())?;
        if dy.dims() != x.dims() || dy.dtype() != x.dtype() {
            bail!(
                "{op}: dy is {:?} {:?}, expected x's {:?} {:?}",
                dy.dims(),
                dy.dtype(),
                x.dims(),
                x.dtype()
            )
        }
        let (x, gamma, dy) = (x.contiguous()?, gamma.contiguous()?, dy.contiguous()?);
        let (x_g, x_l) = x.storage_and_layout();
        let (gamma_g, gamma_l) = gamma.storage_and_layout();
        let (dy_g, dy_l) = dy.storage_and_layout();
        let (Storage::Cuda(x_s), Storage::Cuda(gamma_s), Storage::Cuda(dy_s)) =
            (&*x_g, &*gamma_g, &*dy_g)
        else {
            bail!("{op}: x, gamma and dy must all be on the CUDA device")
        };
        let dev = &x_s.device;
        let mut dx = alloc_out::<T>(dev, rows * c)?;
        let limits = limits(dev)?;
        let geometry = RMS_NORM_BWD.row_geometry(&limits, x.dtype(), rows, c);
        let blocks = geometry.grid.0 as usize;
        // The kernels write both in full; no rows leave dgamma zero.
        let mut dgamma_partial = alloc_out::<f32>(dev, blocks * c)?;
        let mut dgamma = if rows > 0 {
            alloc_out::<f32>(dev, c)?
        } else {
            dev.alloc_zeros::<f32>(c)?
        };
        if rows > 0 && c > 0 {
            let func = function(dev, &RMS_NORM_BWD, x.dtype(), 0)?;
            let x_v = view::<T>(op, "x", x_s, x_l)?;
            let gamma_v = view::<f32>(op, "gamma", gamma_s, gamma_l)?;
            let dy_v = view::<T>(op, "dy", dy_s, dy_l)?;
            let (rows_i, c_i, eps_bits) = (rows as i64, c as i64, eps.to_bits() as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v)
                .arg(&gamma_v)
                .arg(&dy_v)
                .arg(&mut dx)
                .arg(&mut dgamma_partial);
            b.arg(&rows_i).arg(&c_i).arg(&eps_bits);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;

            sum_dgamma_rows(dev, &limits, &dgamma_partial, blocks, c, &mut dgamma)?;
        }
        Ok((
            tensor(wrap(dev, dx), x.shape().clone()),
            tensor(wrap(dev, dgamma), c),
        ))
    })
}

/// dgamma [C] = the sum of a backward's per-block rows dgamma_partial [blocks, C] (this one's and
/// the fused pre + RMSNorm's), column by column: candle's sum over dim 0 of a [blocks, C] tensor
/// reads each column strided, a 32-byte sector per float.
pub(super) fn sum_dgamma_rows(
    dev: &CudaDevice,
    limits: &DeviceLimits,
    dgamma_partial: &CudaSlice<f32>,
    blocks: usize,
    c: usize,
    dgamma: &mut CudaSlice<f32>,
) -> Result<()> {
    let func = function(dev, &RMS_NORM_DGAMMA_SUM, DType::F32, 0)?;
    let sum_geometry = RMS_NORM_DGAMMA_SUM.row_geometry(limits, DType::F32, blocks, c);
    let (blocks_i, c_i) = (blocks as i64, c as i64);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(dgamma_partial).arg(&mut *dgamma);
    b.arg(&blocks_i).arg(&c_i);
    unsafe { b.launch(cfg(&func, &sum_geometry)?) }.w()?;
    Ok(())
}
