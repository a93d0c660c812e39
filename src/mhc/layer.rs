//! The mHC sublayer as a module: parameters + dispatch to the reference or the fused ops.

use super::ops::PreNorm;
use super::{ops, reference, MhcShape};
use crate::config::MhcImpl;
use crate::model::params::{Init, Params};
use crate::model::rms_norm::rms_norm;
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
/// The name of a sublayer's (alpha | b) parameter after its prefix. Checkpoints written before
/// it existed hold `alpha` (dynamic mode only) and `b` instead (`crate::model::params`).
pub const ALPHA_B: &str = "alpha_b";

/// (alpha [3], b [k]) as views of alpha_b [3 + k], for the ops that take them apart (the
/// reference, the unchained fused ops).
pub fn split_alpha_b(alpha_b: &Tensor, shape: &MhcShape) -> Result<(Tensor, Tensor)> {
    Ok((alpha_b.narrow(0, 0, 3)?, alpha_b.narrow(0, 3, shape.k())?))
}

/// One mHC sublayer wrapper: owns phi and alpha_b and applies
/// `x' = H_res x + H_post F(H_pre x)` with per-token coefficients.
pub struct Mhc {
    shape: MhcShape,
    /// [n*C, k] f32; None in static mode.
    phi: Option<Tensor>,
    /// [3 + k] f32 = (alpha_pre, alpha_post, alpha_res, b_0 .. b_{k-1}): one parameter, the
    /// layout the fused ops read (no concatenation per forward). In static mode alpha stays 0:
    /// P = 0 there, so its gradient is exactly zero.
    alpha_b: Tensor,
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
        let mut init = vec![alpha_init; 3];
        init.extend(bias_init(&shape));
        let alpha_b = params.f32_param(
            &format!("{prefix}.{ALPHA_B}"),
            3 + k,
            Init::Values(init),
            false,
        )?;
        Ok(Self {
            shape,
            phi,
            alpha_b,
            imp,
        })
    }

    pub fn shape(&self) -> &MhcShape {
        &self.shape
    }

    /// x' = H_res x + H_post g(RMSNorm(H_pre x) * gamma), F(u) = g(RMSNorm(u) * gamma) being a
    /// pre-norm transformer's sublayer whose leading norm `norm` is: the fused path runs it inside
    /// pre. Returns (x', H) so callers can log H's health.
    pub fn forward(
        &self,
        x: &Tensor,
        norm: PreNorm,
        g: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        match self.imp {
            // The chained ops: the sublayer's backward writes dx once.
            MhcImpl::Fused => {
                ops::sublayer_normed(x, self.phi.as_ref(), &self.alpha_b, &self.shape, norm, g)
            }
            MhcImpl::Reference => {
                let (alpha, b) = split_alpha_b(&self.alpha_b, &self.shape)?;
                let h = reference::coeffs(x, self.phi.as_ref(), &alpha, &b, &self.shape)?;
                let u = reference::pre(x, &h, &self.shape)?;
                let y = g(&rms_norm(&u, norm.gamma, norm.eps)?)?;
                let x_next = reference::post(x, &h, &y, &self.shape)?;
                Ok((x_next, h))
            }
        }
    }
}

/// Reads checkpoints written before the (alpha | b) parameter, which hold `<prefix>.alpha`
/// (dynamic mode only; static mode's alpha is 0) and `<prefix>.b` where `<prefix>.alpha_b` now
/// stands: for each key of `wanted` that ends in `.alpha_b` and that `tensors` lacks, the two
/// old tensors are replaced by their concatenation. Keys are the file's: parameter names for the
/// weights, `m.<name>` and `v.<name>` for the optimizer's moments (zero moments for a static
/// alpha, as for a parameter whose gradient is always zero). Anything else is left for the
/// loader's own checks.
pub fn upgrade_legacy_alpha_b<'a>(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    wanted: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let suffix = format!(".{ALPHA_B}");
    for key in wanted {
        let Some(base) = key.strip_suffix(&suffix) else {
            continue;
        };
        if tensors.contains_key(key) {
            continue;
        }
        let Some(b) = tensors.remove(&format!("{base}.b")) else {
            continue;
        };
        let alpha = match tensors.remove(&format!("{base}.alpha")) {
            Some(alpha) => alpha,
            None => Tensor::zeros(3, b.dtype(), b.device())?,
        };
        tensors.insert(key.to_string(), Tensor::cat(&[&alpha, &b], 0)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;
    use crate::train::optimizer::AdamW;
    use candle_core::{DType, Device};
    use std::collections::HashMap;
    use std::path::Path;

    fn shape(dynamic: bool) -> MhcShape {
        MhcShape {
            streams: 2,
            width: 3,
            sinkhorn_iters: 20,
            dynamic,
        }
    }

    /// A model of one dynamic and one static sublayer.
    fn model(seed: u64) -> Result<Params> {
        let mut params = Params::new(&Device::Cpu, seed);
        Mhc::new(&mut params, "d", shape(true), MhcImpl::Fused)?;
        Mhc::new(&mut params, "s", shape(false), MhcImpl::Fused)?;
        Ok(params)
    }

    fn load(path: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// A file as checkpoints wrote it before alpha_b: `alpha` (dynamic only) and `b`, for the
    /// weights and both moments.
    fn write_legacy(path: &Path, out: &Path) {
        let mut legacy = HashMap::new();
        for (key, t) in load(path) {
            match key.strip_suffix(".alpha_b") {
                Some(base) => {
                    if base.ends_with('d') {
                        legacy.insert(format!("{base}.alpha"), t.narrow(0, 0, 3).unwrap());
                    }
                    let k = t.dims()[0] - 3;
                    legacy.insert(format!("{base}.b"), t.narrow(0, 3, k).unwrap());
                }
                None => {
                    legacy.insert(key, t);
                }
            }
        }
        candle_core::safetensors::save(&legacy, out).unwrap();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Weights and AdamW moments saved the old way load into the alpha_b parameter exactly.
    #[test]
    fn checkpoints_from_before_alpha_b_load_exactly() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let params = model(1)?;
        let mut optimizer = AdamW::new(&params, &TrainConfig::default())?;
        // Distinct values, then one step for non-zero moments (static mode: alpha's gradient is
        // zero, as in training, so its moments stay zero).
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        for (i, (name, p)) in params.iter().enumerate() {
            let n = p.var.elem_count();
            let mut v: Vec<f32> = (0..n).map(|j| (i * 100 + j) as f32 * 0.01 - 0.3).collect();
            let mut w: Vec<f32> = (0..n).map(|j| 1.0 + j as f32).collect();
            if name == "s.alpha_b" {
                v[..3].fill(0.0);
                w[..3].fill(0.0);
            }
            let dims = p.var.dims();
            p.var.set(&Tensor::from_vec(v, dims, &Device::Cpu)?)?;
            let w = Tensor::from_vec(w, dims, &Device::Cpu)?;
            loss = (loss + (p.var.as_tensor() * w)?.sqr()?.sum_all()?)?;
        }
        optimizer.step(&loss.backward()?, 1e-3, 1.0)?;
        let (weights, moments) = (dir.path().join("w"), dir.path().join("m"));
        params.save(&weights)?;
        optimizer.save(&moments)?;
        let (old_weights, old_moments) = (dir.path().join("w0"), dir.path().join("m0"));
        write_legacy(&weights, &old_weights);
        write_legacy(&moments, &old_moments);
        assert!(load(&old_weights).contains_key("d.alpha"));
        assert!(!load(&old_weights).contains_key("s.alpha"));
        assert!(load(&old_moments).contains_key("m.d.b"));

        let fresh = model(2)?;
        fresh.load(&old_weights).map_err(candle_core::Error::wrap)?;
        let mut fresh_optimizer = AdamW::new(&fresh, &TrainConfig::default())?;
        fresh_optimizer
            .load(&old_moments)
            .map_err(candle_core::Error::wrap)?;
        let (again_w, again_m) = (dir.path().join("w1"), dir.path().join("m1"));
        fresh.save(&again_w)?;
        fresh_optimizer.save(&again_m)?;
        for (path, again) in [(&weights, &again_w), (&moments, &again_m)] {
            let (want, got) = (load(path), load(again));
            assert_eq!(want.len(), got.len());
            for (key, t) in &want {
                assert_eq!(values(t), values(&got[key]), "{key}");
            }
        }
        // The static alpha really is zero, in the weights and the moments.
        for (path, key) in [(&again_w, "s.alpha_b"), (&again_m, "v.s.alpha_b")] {
            assert_eq!(values(&load(path)[key])[..3], [0.0; 3]);
        }
        Ok(())
    }
}
