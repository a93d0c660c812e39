//! CUDA launch of the chained sublayer's coefficient backward (docs/ops.md, "The chained
//! sublayer"): pre's backward computes dh only (`mhc::pre_backward` without dx), and this one
//! writes the sublayer's single dx = dx_post + H_pre (x) du + phi dP^T + coef x in its one pass
//! over x.

use super::mhc::{
    alloc_out, cfg, check_dims, coeffs_backward_token, cuda_storage, dispatch_storage, function,
    limits, tensor, view, wrap, CoeffsGrad,
};
use super::COEFFS_BWD_X_SUM;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Storage, Tensor};

/// Dynamic-mode coefficient backward that also sums the sublayer's other dx contributions:
/// (dx = dx_post + H_pre (x) du + phi dP^T + coef x, dphi, dalpha_b). dx_post [T, n, C] and
/// du [T, C] are in x's dtype, h [T, k] f32.
pub fn coeffs_backward_sum(
    g: &CoeffsGrad,
    dx_post: &Tensor,
    du: &Tensor,
    h: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "mhc-coeffs backward (chained)";
    let (shape, x, phi) = (g.shape, g.x, g.phi);
    dispatch_storage!(op, x.dtype(), T => {
        if !shape.dynamic {
            bail!("{op}: static mode has no pass over x")
        }
        let (dp, dalpha_b) = coeffs_backward_token(op, g)?;
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let tokens = x.dims()[0];
        let d = n * c;
        check_dims(op, "dx_post", dx_post.dims(), x.dims())?;
        check_dims(op, "du", du.dims(), &[tokens, c])?;
        check_dims(op, "h", h.dims(), &[tokens, k])?;
        let (dx_post, du, h) = (dx_post.contiguous()?, du.contiguous()?, h.contiguous()?);
        cuda_storage!(op, "x", x => x_s, x_l);
        cuda_storage!(op, "phi", phi => phi_s, phi_l);
        cuda_storage!(op, "dx_post", dx_post => dx_post_s, dx_post_l);
        cuda_storage!(op, "du", du => du_s, du_l);
        cuda_storage!(op, "h", h => h_s, h_l);
        let dev = &x_s.device;
        let mut dx = alloc_out::<T>(dev, tokens * d)?;
        let mut dphi = dev.alloc_zeros::<f32>(d * k)?;
        if tokens > 0 && d > 0 {
            let func = function(dev, &COEFFS_BWD_X_SUM, x.dtype(), n)?;
            let geometry = COEFFS_BWD_X_SUM.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let x_v = view::<T>(op, "x", x_s, x_l)?;
            let phi_v = view::<f32>(op, "phi", phi_s, phi_l)?;
            let dx_post_v = view::<T>(op, "dx_post", dx_post_s, dx_post_l)?;
            let du_v = view::<T>(op, "du", du_s, du_l)?;
            let h_v = view::<f32>(op, "h", h_s, h_l)?;
            let (tokens_i, d_i, c_i) = (tokens as i64, d as i64, c as i64);
            let work_blocks_i = geometry.split_len as i64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&phi_v).arg(&dp);
            b.arg(&dx_post_v).arg(&du_v).arg(&h_v);
            b.arg(&mut dx).arg(&mut dphi);
            b.arg(&tokens_i).arg(&d_i).arg(&c_i).arg(&work_blocks_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((
            tensor(wrap(dev, dx), (tokens, n, c)),
            tensor(wrap(dev, dphi), (d, k)),
            dalpha_b,
        ))
    })
}
