//! CUDA launches of pre followed by F's leading RMSNorm, fused (kernels/mhc_pre_norm.cu):
//! forward one launch (y from x, H and gamma; u never stored), backward one launch (du, dh's
//! pre columns and per-block dgamma rows) and the launch that sums the dgamma rows
//! (kernels/rms_norm.cu's, as for the RMSNorm alone).

use super::mhc::{
    alloc_out, cfg, check_dims, cuda_storage, dispatch_storage, function, limits, tensor,
    tokens_of, view, wrap,
};
use super::rms_norm::sum_dgamma_rows;
use super::{PRE_NORM_BWD, PRE_NORM_FWD};
use crate::mhc::MhcShape;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// Forward: y [T, C] in x's dtype, y = RMSNorm(sum_j H_pre[j] x_j) * gamma.
pub fn forward(
    shape: &MhcShape,
    eps: f64,
    (x, x_l): (&CudaStorage, &Layout),
    (h, h_l): (&CudaStorage, &Layout),
    (gamma, gamma_l): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let op = "mhc-pre-norm";
    dispatch_storage!(op, x.dtype(), T => {
        let dev = &x.device;
        let (n, c) = (shape.streams, shape.width);
        let tokens = tokens_of(op, shape, x_l.dims())?;
        check_dims(op, "h", h_l.dims(), &[tokens, shape.k()])?;
        check_dims(op, "gamma", gamma_l.dims(), &[c])?;
        let mut y = alloc_out::<T>(dev, tokens * c)?;
        if tokens > 0 && c > 0 {
            let func = function(dev, &PRE_NORM_FWD, x.dtype(), n)?;
            let geometry = PRE_NORM_FWD.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let x_v = view::<T>(op, "x", x, x_l)?;
            let h_v = view::<f32>(op, "h", h, h_l)?;
            let gamma_v = view::<f32>(op, "gamma", gamma, gamma_l)?;
            let (tokens_i, c_i, eps_bits) = (tokens as i64, c as i64, eps.to_bits() as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&h_v).arg(&gamma_v).arg(&mut y);
            b.arg(&tokens_i).arg(&c_i).arg(&eps_bits);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((wrap(dev, y), Shape::from((tokens, c))))
    })
}

/// Backward from dy [T, C]: (du [T, C] in x's dtype, dh [T, k] f32 with only the pre columns
/// non-zero, dgamma [C] f32).
pub fn backward(
    shape: &MhcShape,
    eps: f64,
    x: &Tensor,
    h: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "mhc-pre-norm backward";
    dispatch_storage!(op, x.dtype(), T => {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let tokens = tokens_of(op, shape, x.dims())?;
        check_dims(op, "h", h.dims(), &[tokens, k])?;
        check_dims(op, "gamma", gamma.dims(), &[c])?;
        check_dims(op, "dy", dy.dims(), &[tokens, c])?;
        if dy.dtype() != x.dtype() {
            bail!("{op}: dy is {:?}, expected x's {:?}", dy.dtype(), x.dtype())
        }
        let (x, h, gamma, dy) = (x.contiguous()?, h.contiguous()?, gamma.contiguous()?, dy.contiguous()?);
        cuda_storage!(op, "x", x => x_s, x_l);
        cuda_storage!(op, "h", h => h_s, h_l);
        cuda_storage!(op, "gamma", gamma => gamma_s, gamma_l);
        cuda_storage!(op, "dy", dy => dy_s, dy_l);
        let dev = &x_s.device;
        let limits = limits(dev)?;
        let mut du = alloc_out::<T>(dev, tokens * c)?;
        let mut dh = alloc_out::<f32>(dev, tokens * k)?;
        let mut dgamma = if tokens > 0 {
            alloc_out::<f32>(dev, c)?
        } else {
            dev.alloc_zeros::<f32>(c)?
        };
        if tokens > 0 && c > 0 {
            let func = function(dev, &PRE_NORM_BWD, x.dtype(), n)?;
            let geometry = PRE_NORM_BWD.geometry(&limits, shape, x.dtype(), tokens);
            let blocks = geometry.grid.0 as usize;
            // The kernel writes every block's row in full.
            let mut dgamma_partial = alloc_out::<f32>(dev, blocks * c)?;
            let x_v = view::<T>(op, "x", x_s, x_l)?;
            let h_v = view::<f32>(op, "h", h_s, h_l)?;
            let gamma_v = view::<f32>(op, "gamma", gamma_s, gamma_l)?;
            let dy_v = view::<T>(op, "dy", dy_s, dy_l)?;
            let (tokens_i, c_i, eps_bits) = (tokens as i64, c as i64, eps.to_bits() as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&h_v).arg(&gamma_v).arg(&dy_v);
            b.arg(&mut du).arg(&mut dh).arg(&mut dgamma_partial);
            b.arg(&tokens_i).arg(&c_i).arg(&eps_bits);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
            sum_dgamma_rows(dev, &limits, &dgamma_partial, blocks, c, &mut dgamma)?;
        }
        Ok((
            tensor(wrap(dev, du), (tokens, c)),
            tensor(wrap(dev, dh), (tokens, k)),
            tensor(wrap(dev, dgamma), c),
        ))
    })
}
