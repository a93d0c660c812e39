//! AdamW (Loshchilov & Hutter) with decoupled weight decay and checkpointable state.
//!
//! candle-nn's AdamW keeps its moments private, so a run could not be resumed exactly from a
//! checkpoint; this one has the same update rule and exposes its state for save/load.

use crate::config::TrainConfig;
use crate::model::params::Params;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Updates taken so far (t in the bias corrections).
    step: usize,
    slots: Vec<Slot>,
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// First and second moments, f32, shaped like the parameter.
    m: Tensor,
    v: Tensor,
}

impl AdamW {
    pub fn new(params: &Params, cfg: &TrainConfig) -> candle_core::Result<Self> {
        let slots = params
            .iter()
            .map(|(name, p)| {
                Ok(Slot {
                    name: name.clone(),
                    var: p.var.clone(),
                    decay: p.decay,
                    m: p.var.zeros_like()?,
                    v: p.var.zeros_like()?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: 0,
            slots,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first (clipping).
    ///   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    ///   p = p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            // Gradients built from candle ops of tracked tensors carry their own autograd graph
            // (the forward's activations); detached, the moments never chain one step's graph
            // to the next (which would hold every step's activations alive).
            let g = (g.detach().to_dtype(candle_core::DType::F32)? * grad_scale)?;
            slot.m = ((&slot.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            slot.v = ((&slot.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&slot.m / c1)? / ((&slot.v / c2)?.sqrt()? + self.eps)?)?;
            let decay = if slot.decay {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let next = ((slot.var.as_tensor() * decay)? - (update * lr)?)?;
            slot.var.set(&next)?;
        }
        Ok(())
    }

    /// Moments as `m.<param>` / `v.<param>` tensors, plus the step count in the file's metadata-free
    /// form of a one-element tensor `step`.
    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        let mut tensors = HashMap::new();
        for slot in &self.slots {
            tensors.insert(format!("m.{}", slot.name), slot.m.clone());
            tensors.insert(format!("v.{}", slot.name), slot.v.clone());
        }
        let device = self
            .slots
            .first()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        tensors.insert("step".into(), Tensor::new(&[self.step as u32], &device)?);
        candle_core::safetensors::save(&tensors, path)
    }

    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let device = self
            .slots
            .first()
            .map(|s| s.m.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut tensors = candle_core::safetensors::load(path, &device)?;
        let keys: Vec<String> = self
            .slots
            .iter()
            .flat_map(|s| [format!("m.{}", s.name), format!("v.{}", s.name)])
            .collect();
        crate::mhc::layer::upgrade_legacy_alpha_b(&mut tensors, keys.iter().map(String::as_str))?;
        let mut take = |key: &str, like: &Tensor| -> anyhow::Result<Tensor> {
            let t = tensors.remove(key).ok_or_else(|| {
                anyhow::anyhow!("{} lacks optimizer tensor {key}", path.display())
            })?;
            anyhow::ensure!(
                t.shape() == like.shape(),
                "{}: optimizer tensor {key} has shape {:?}, expected {:?}",
                path.display(),
                t.dims(),
                like.dims()
            );
            Ok(t)
        };
        for slot in &mut self.slots {
            slot.m = take(&format!("m.{}", slot.name), &slot.m)?;
            slot.v = take(&format!("v.{}", slot.name), &slot.v)?;
        }
        let step = tensors
            .remove("step")
            .ok_or_else(|| anyhow::anyhow!("{} lacks the optimizer step", path.display()))?;
        self.step = step.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::Init;
    use candle_core::Device;

    /// Two AdamW steps on f(w) = sum(w^2)/2 (gradient w) against the update rule by hand.
    #[test]
    fn matches_hand_computed_updates() {
        let mut params = Params::new(&Device::Cpu, 0);
        let w = params
            .f32_param("w", 2, Init::Values(vec![1.0, -2.0]), true)
            .unwrap();
        let cfg = TrainConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params, &cfg).unwrap();
        let lr = 0.1;
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            let loss = (w.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, lr, 1.0).unwrap();
            for i in 0..2 {
                let g = expect[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.99 * v[i] + 0.01 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                expect[i] = expect[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = w.to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
    }

    /// Gradients made of candle ops carry an autograd graph; the moments must not keep it (a
    /// graph chained from step to step holds every step's activations: memory grows per step).
    #[test]
    fn moments_hold_no_autograd_graph() {
        let mut params = Params::new(&Device::Cpu, 0);
        let w = params
            .f32_param("w", 3, Init::Values(vec![1.0, 2.0, 3.0]), true)
            .unwrap();
        let mut opt = AdamW::new(&params, &TrainConfig::default()).unwrap();
        let loss = (&w * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&w).unwrap().track_op(),
            "the gradient itself is tracked"
        );
        opt.step(&grads, 0.1, 1.0).unwrap();
        assert!(opt.slots.iter().all(|s| !s.m.track_op() && !s.v.track_op()));
    }
}
