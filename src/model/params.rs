//! Named trainable parameters with seeded, order-independent initialisation.
//!
//! candle's CPU random generator cannot be seeded, so parameters are drawn here from a ChaCha
//! stream keyed by (seed, parameter name): the same seed gives the same weights on every device
//! and every rank, whatever order the model creates them in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::path::Path;

/// How a parameter starts.
#[derive(Debug, Clone)]
pub enum Init {
    Normal(f64),
    Const(f64),
    Values(Vec<f32>),
}

/// One trainable tensor (always f32: the master copy; compute casts it).
pub struct Param {
    pub var: Var,
    /// Decoupled weight decay applies (matrices yes; norms, biases, mHC scalars no).
    pub decay: bool,
}

pub struct Params {
    device: Device,
    seed: u64,
    params: BTreeMap<String, Param>,
}

impl Params {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            device: device.clone(),
            seed,
            params: BTreeMap::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates the f32 parameter `name` and returns it as a tensor tracked by autograd.
    pub fn f32_param<S: Into<Shape>>(
        &mut self,
        name: &str,
        shape: S,
        init: Init,
        decay: bool,
    ) -> Result<Tensor> {
        let shape: Shape = shape.into();
        if self.params.contains_key(name) {
            candle_core::bail!("parameter {name} created twice");
        }
        let count = shape.elem_count();
        let values = match init {
            Init::Normal(std) => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
                let normal = Normal::new(0f32, std as f32).map_err(candle_core::Error::wrap)?;
                (0..count).map(|_| normal.sample(&mut rng)).collect()
            }
            Init::Const(v) => vec![v as f32; count],
            Init::Values(v) => {
                if v.len() != count {
                    candle_core::bail!("init of {name}: {} values for shape {shape:?}", v.len());
                }
                v
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let tensor = var.as_tensor().clone();
        self.params.insert(name.to_string(), Param { var, decay });
        Ok(tensor)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.params.iter()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Number of scalar weights.
    pub fn count(&self) -> usize {
        self.params.values().map(|p| p.var.elem_count()).sum()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(name, p)| (name.clone(), p.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, path)
    }

    /// Loads weights saved by `save`; every parameter must be present with its exact shape
    /// (checkpoints from before the mHC (alpha | b) parameter included).
    pub fn load(&self, path: &Path) -> anyhow::Result<()> {
        let mut tensors = candle_core::safetensors::load(path, &self.device)?;
        crate::mhc::layer::upgrade_legacy_alpha_b(
            &mut tensors,
            self.params.keys().map(String::as_str),
        )?;
        for (name, p) in &self.params {
            let t = tensors.get(name).ok_or_else(|| {
                anyhow::anyhow!("{} has no tensor {name}: another model?", path.display())
            })?;
            if t.shape() != p.var.shape() {
                anyhow::bail!(
                    "{}: {name} has shape {:?}, the model expects {:?} (checkpoint of another model shape)",
                    path.display(),
                    t.dims(),
                    p.var.dims()
                );
            }
            p.var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().find(|k| !self.params.contains_key(*k)) {
            anyhow::bail!(
                "{} holds {extra}, which this model does not have",
                path.display()
            );
        }
        Ok(())
    }
}

/// FNV-1a: a stable hash (std's hasher is not guaranteed stable across releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_depends_on_seed_and_name_not_order() {
        let dev = Device::Cpu;
        let mut a = Params::new(&dev, 7);
        let a1 = a.f32_param("w1", (4, 3), Init::Normal(0.02), true).unwrap();
        let a2 = a.f32_param("w2", (4, 3), Init::Normal(0.02), true).unwrap();
        let mut b = Params::new(&dev, 7);
        let b2 = b.f32_param("w2", (4, 3), Init::Normal(0.02), true).unwrap();
        let b1 = b.f32_param("w1", (4, 3), Init::Normal(0.02), true).unwrap();
        let same = |x: &Tensor, y: &Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&a1, &b1) && same(&a2, &b2));
        assert!(!same(&a1, &a2));
        let mut c = Params::new(&dev, 8);
        let c1 = c.f32_param("w1", (4, 3), Init::Normal(0.02), true).unwrap();
        assert!(!same(&a1, &c1));
        // the sample std is near the requested one
        let v = a1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!(std > 0.005 && std < 0.05, "std {std}");
    }

    #[test]
    fn save_load_round_trip_and_shape_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let dev = Device::Cpu;
        let mut a = Params::new(&dev, 1);
        let w = a.f32_param("w", (2, 3), Init::Normal(1.0), true).unwrap();
        a.save(&path).unwrap();
        let mut b = Params::new(&dev, 2);
        let w2 = b.f32_param("w", (2, 3), Init::Normal(1.0), true).unwrap();
        b.load(&path).unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), w2.to_vec2::<f32>().unwrap());
        let mut c = Params::new(&dev, 2);
        c.f32_param("w", (3, 2), Init::Normal(1.0), true).unwrap();
        let err = format!("{:#}", c.load(&path).unwrap_err());
        assert!(err.contains("another model shape"), "{err}");
    }
}
