//! Fused RMSNorm as one candle custom op with an exact backward:
//! y = x / sqrt(mean(x^2) + eps) * gamma over the last axis.
//!
//! x [.., C] in f32 or bf16 (f64 too on the CPU), gamma [C] f32, y in x's dtype. The backward
//! returns dx (x's dtype) and dgamma (f32, summed over rows in f32):
//!   dx = s * gamma * dy - x * s^3 * <gamma * dy, x> / C,  s = 1 / sqrt(mean(x^2) + eps),
//!   dgamma = sum over rows of dy * x * s.
//! CUDA: one kernel each way (kernels/rms_norm.cu, f32 arithmetic, through `crate::gpu::rms_norm`).
//! CPU: plain Rust in f64 arithmetic, rows in parallel (exact enough for finite-difference tests
//! on f64 storage).

use crate::custom_op::{cpu_slice, dispatch_elem, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// y = x / sqrt(mean(x^2) + eps) * gamma over the last dim of x; gradients flow to x and gamma.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNormOp { eps };
    op.check(x.dims(), gamma.dims(), gamma.dtype())?;
    x.contiguous()?.apply_op2(&gamma.contiguous()?, op)
}

/// The custom op: (x [.., C], gamma [C] f32) -> y [.., C].
pub struct RmsNormOp {
    pub eps: f64,
}

impl RmsNormOp {
    const NAME: &'static str = "rms-norm";

    /// (rows, C) after checking shapes and gamma's dtype.
    fn check(&self, x: &[usize], gamma: &[usize], gamma_dtype: DType) -> Result<(usize, usize)> {
        let op = Self::NAME;
        let Some(&c) = x.last() else {
            bail!("{op}: x is a scalar, expected [.., C]")
        };
        if gamma != [c] {
            bail!("{op}: gamma has shape {gamma:?}, expected [{c}] (x is {x:?})")
        }
        if gamma_dtype != DType::F32 {
            bail!("{op}: gamma has dtype {gamma_dtype:?}, expected f32")
        }
        Ok((x.iter().product::<usize>() / c.max(1), c))
    }
}

/// 1 / sqrt(mean(row^2) + eps), in f64.
fn inv_rms<E: WithDType>(row: &[E], eps: f64) -> f64 {
    let sq: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
    1.0 / (sq / row.len() as f64 + eps).sqrt()
}

/// CPU forward: y [rows, C].
pub fn cpu_forward<E: WithDType>(x: &[E], gamma: &[f32], c: usize, eps: f64) -> Vec<E> {
    let mut y = vec![E::from_f64(f64::NAN); x.len()];
    if c == 0 {
        return y;
    }
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(y_row, x_row)| {
            let s = inv_rms(x_row, eps);
            for ((y, x), g) in y_row.iter_mut().zip(x_row).zip(gamma) {
                *y = E::from_f64(x.to_f64() * s * *g as f64);
            }
        });
    y
}

/// CPU backward: (dx [rows, C] in x's dtype, dgamma [C] f32).
pub fn cpu_backward<E: WithDType>(
    x: &[E],
    gamma: &[f32],
    dy: &[E],
    c: usize,
    eps: f64,
) -> (Vec<E>, Vec<f32>) {
    let mut dx = vec![E::from_f64(f64::NAN); x.len()];
    if c == 0 {
        return (dx, Vec::new());
    }
    // Per row: dx, and the row's dgamma terms summed into a per-thread f64 accumulator.
    let dgamma = dx
        .par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(dy.par_chunks(c)))
        .fold(
            || vec![0f64; c],
            |mut acc, (dx_row, (x_row, dy_row))| {
                let s = inv_rms(x_row, eps);
                let dot: f64 = x_row
                    .iter()
                    .zip(dy_row)
                    .zip(gamma)
                    .map(|((x, dy), g)| *g as f64 * dy.to_f64() * x.to_f64())
                    .sum();
                let coef = s * s * s * dot / c as f64;
                for (i, dx) in dx_row.iter_mut().enumerate() {
                    let (xv, dyv) = (x_row[i].to_f64(), dy_row[i].to_f64());
                    *dx = E::from_f64(s * gamma[i] as f64 * dyv - coef * xv);
                    acc[i] += dyv * xv * s;
                }
                acc
            },
        )
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dgamma.into_iter().map(|v| v as f32).collect())
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        gamma: &CpuStorage,
        gamma_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c) = self.check(x_l.dims(), gamma_l.dims(), gamma.dtype())?;
        let op = Self::NAME;
        let gamma = cpu_slice::<f32>(op, "gamma", gamma, gamma_l)?;
        let y = dispatch_elem!(op, x.dtype(), E => {
            let x = cpu_slice::<E>(op, "x", x, x_l)?;
            E::to_cpu_storage_owned(cpu_forward(x, gamma, c, self.eps))
        });
        Ok((y, x_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        gamma: &candle_core::CudaStorage,
        gamma_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::rms_norm::forward(self.eps, x, x_l, gamma, gamma_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma) = rms_norm_backward(x, gamma, dy, self.eps)?;
        Ok((Some(dx), Some(dgamma)))
    }
}

/// Backward of `RmsNormOp` on x's device: (dx, dgamma [C] f32).
pub fn rms_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let op = "rms-norm backward";
    let (_, c) = RmsNormOp { eps }.check(x.dims(), gamma.dims(), gamma.dtype())?;
    if dy.dims() != x.dims() {
        bail!("{op}: dy has shape {:?}, x {:?}", dy.dims(), x.dims())
    }
    match x.device() {
        Device::Cpu => {
            let (x, gamma, dy) = (x.contiguous()?, gamma.contiguous()?, dy.contiguous()?);
            let (x_s, x_l) = x.storage_and_layout();
            let (gamma_s, gamma_l) = gamma.storage_and_layout();
            let (dy_s, dy_l) = dy.storage_and_layout();
            let gamma_v = storage_slice::<f32>(op, "gamma", &gamma_s, gamma_l)?;
            dispatch_elem!(op, x.dtype(), E => {
                let x_v = storage_slice::<E>(op, "x", &x_s, x_l)?;
                let dy_v = storage_slice::<E>(op, "dy", &dy_s, dy_l)?;
                let (dx, dgamma) = cpu_backward(x_v, gamma_v, dy_v, c, eps);
                Ok((
                    Tensor::from_vec(dx, x.shape(), &Device::Cpu)?,
                    Tensor::from_vec(dgamma, c, &Device::Cpu)?,
                ))
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::gpu::rms_norm::backward(eps, x, gamma, dy),
        other => bail!("{op}: no implementation for device {:?}", other.location()),
    }
}
