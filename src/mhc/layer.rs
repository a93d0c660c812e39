//! The mHC sublayer as a module: parameters + dispatch to the reference or the fused ops.

use super::{ops, reference, MhcShape};
use crate::config::MhcImpl;
use crate::model::params::{Init, Params};
use candle_core::{Result, Tensor};

/// Bias init (spec): b_pre = -ln(n-1) so H_pre = 1/n (u starts as the stream mean), b_post = 0
/// (H_post = 1), b_res = 0 (H_res uniform 1/n). With n = 1 no finite bias gives H_pre = 1; 6.9
/// gives sigmoid = 0.999.
pub fn bias_init(shape: &MhcShape) -> Vec<f32> {
    let n = shape.streams;
    let b_pre = if n > 1 { -((n - 1) as f32).ln() } else { 6.9 };
    let mut b = vec![0f32; shape.k()];
    b[..n].fill(b_pre);
    b
}

/// Initial alpha = (alpha_pre, alpha_post, alpha_res) (spec: 0.01 each).
pub const ALPHA_INIT: f32 = 0.01;
/// phi ~ N(0, PHI_INIT_STD^2) (spec).
pub const PHI_INIT_STD: f64 = 0.02;

/// One mHC sublayer wrapper: owns phi, alpha, b and applies
/// `x' = H_res x + H_post F(H_pre x)` with per-token coefficients.
pub struct Mhc {
    shape: MhcShape,
    /// [n*C, k] f32; None in static mode.
    phi: Option<Tensor>,
    /// [3] f32; unused (and not trained) in static mode.
    alpha: Tensor,
    /// [k] f32.
    b: Tensor,
    imp: MhcImpl,
}

impl Mhc {
    pub fn new(params: &mut Params, prefix: &str, shape: MhcShape, imp: MhcImpl) -> Result<Self> {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let phi = if shape.dynamic {
            Some(params.f32_param(
                &format!("{prefix}.phi"),
                (n * c, k),
                Init::Normal(PHI_INIT_STD),
                false,
            )?)
        } else {
            None
        };
        let alpha_init = if shape.dynamic { ALPHA_INIT } else { 0.0 };
        let alpha = if shape.dynamic {
            params.f32_param(
                &format!("{prefix}.alpha"),
                3,
                Init::Const(alpha_init as f64),
                false,
            )?
        } else {
            Tensor::zeros(3, candle_core::DType::F32, params.device())?
        };
        let b = params.f32_param(
            &format!("{prefix}.b"),
            k,
            Init::Values(bias_init(&shape)),
            false,
        )?;
        Ok(Self {
            shape,
            phi,
            alpha,
            b,
            imp,
        })
    }

    pub fn shape(&self) -> &MhcShape {
        &self.shape
    }

    /// H [T, k] f32 for x [T, n, C].
    pub fn coeffs(&self, x: &Tensor) -> Result<Tensor> {
        match self.imp {
            MhcImpl::Fused => ops::coeffs(x, self.phi.as_ref(), &self.alpha, &self.b, &self.shape),
            MhcImpl::Reference => {
                reference::coeffs(x, self.phi.as_ref(), &self.alpha, &self.b, &self.shape)
            }
        }
    }

    /// x' = H_res x + H_post F(H_pre x). Returns (x', H) so callers can log H's health.
    pub fn forward(
        &self,
        x: &Tensor,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        match self.imp {
            // The chained ops: the sublayer's backward writes dx once.
            MhcImpl::Fused => {
                ops::sublayer(x, self.phi.as_ref(), &self.alpha, &self.b, &self.shape, f)
            }
            MhcImpl::Reference => {
                let h = self.coeffs(x)?;
                let u = reference::pre(x, &h, &self.shape)?;
                let y = f(&u)?;
                let x_next = reference::post(x, &h, &y, &self.shape)?;
                Ok((x_next, h))
            }
        }
    }
}
