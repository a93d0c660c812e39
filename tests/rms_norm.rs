//! The fused RMSNorm op (src/model/rms_norm.rs) on the CPU:
//! - against an f64 reference built from candle ops (forward, dx, dgamma through candle's
//!   autograd) for f32 and bf16 storage, 2-D and 3-D x, odd and even C;
//! - its backward against central finite differences of its own forward on f64 storage (dx), and
//!   of the loss, which is linear in gamma, for dgamma;
//! - a hand-computed case and the shape/dtype errors.

use candle_core::{DType, Device, Tensor, Var, D};
use mhc_train::model::rms_norm::rms_norm;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const EPS: f64 = 1e-5;

fn normal(rng: &mut ChaCha8Rng, len: usize, mean: f64, std: f64) -> Vec<f64> {
    let dist = Normal::new(mean, std).unwrap();
    (0..len).map(|_| dist.sample(rng)).collect()
}

/// The reference: candle ops in f64.
fn reference(x: &Tensor, gamma: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + EPS)?.sqrt()?)?.broadcast_mul(gamma)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

struct Grads {
    y: Tensor,
    dx: Tensor,
    dgamma: Tensor,
}

/// y and the gradients of sum(w * y) for x stored in `dtype` (the op) or f64 (the reference).
fn run(dims: &[usize], x: &[f64], gamma: &[f64], w: &[f64], dtype: DType, fused: bool) -> Grads {
    let cpu = Device::Cpu;
    let c = *dims.last().unwrap();
    let x = Var::from_tensor(
        &Tensor::from_vec(x.to_vec(), dims, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let gamma_dtype = if fused { DType::F32 } else { DType::F64 };
    let gamma = Var::from_tensor(
        &Tensor::from_vec(gamma.to_vec(), c, &cpu)
            .unwrap()
            .to_dtype(gamma_dtype)
            .unwrap(),
    )
    .unwrap();
    let y = if fused {
        rms_norm(&x, &gamma, EPS).unwrap()
    } else {
        reference(&x, &gamma).unwrap()
    };
    assert_eq!(y.dtype(), dtype, "y keeps x's dtype");
    assert_eq!(y.dims(), dims);
    let w = Tensor::from_vec(w.to_vec(), dims, &cpu).unwrap();
    let loss = (y.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads.get(&x).expect("dx").clone();
    let dgamma = grads.get(&gamma).expect("dgamma").clone();
    assert_eq!(dx.dtype(), dtype);
    assert_eq!(dgamma.dtype(), gamma_dtype);
    Grads { y, dx, dgamma }
}

#[test]
fn matches_the_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (dims, mean) in [
        (vec![5usize, 33], 0.0),
        (vec![3, 4, 64], 0.5),
        (vec![1, 7], -2.0),
        (vec![64, 130], 0.0),
    ] {
        let len: usize = dims.iter().product();
        let c = *dims.last().unwrap();
        let x = normal(&mut rng, len, mean, 1.0);
        let gamma = normal(&mut rng, c, 1.0, 0.3);
        let w = normal(&mut rng, len, 0.0, 1.0);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            // Both sides see x (and gamma) rounded to the storage dtype.
            let xr = Tensor::from_vec(x.clone(), len, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let gr: Vec<f64> = gamma.iter().map(|g| *g as f32 as f64).collect();
            let fused = run(&dims, &xr, &gr, &w, dtype, true);
            let oracle = run(&dims, &xr, &gr, &w, DType::F64, false);
            for (name, a, b) in [
                ("y", &fused.y, &oracle.y),
                ("dx", &fused.dx, &oracle.dx),
                ("dgamma", &fused.dgamma, &oracle.dgamma),
            ] {
                let err = rel_err(a, b);
                assert!(
                    err < tol,
                    "{name} {dims:?} {dtype:?}: rel err {err:e} >= {tol:e}"
                );
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dims = [3usize, 9];
    let len = 27;
    let x = normal(&mut rng, len, 0.3, 1.0);
    // gamma values exactly representable in f32, so the f32 gamma the op takes is this one.
    let gamma: Vec<f64> = normal(&mut rng, 9, 1.0, 0.3)
        .into_iter()
        .map(|g| g as f32 as f64)
        .collect();
    let w = normal(&mut rng, len, 0.0, 1.0);
    let loss = |x: &[f64], gamma: &[f64]| -> f64 {
        let xt = Tensor::from_vec(x.to_vec(), &dims, &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(gamma.to_vec(), 9, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let y = rms_norm(&xt, &gt, EPS).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f64>().unwrap();
        y.iter().zip(&w).map(|(y, w)| y * w).sum()
    };
    let g = run(&dims, &x, &gamma, &w, DType::F64, true);
    let dx = g.dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    let mut fd = vec![0.0; len];
    for i in 0..len {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        fd[i] = (loss(&xp, &gamma) - loss(&xm, &gamma)) / (2.0 * h);
    }
    let err = rel_err(
        &Tensor::new(dx.as_slice(), &Device::Cpu).unwrap(),
        &Tensor::new(fd.as_slice(), &Device::Cpu).unwrap(),
    );
    assert!(err < 1e-6, "dx vs finite differences: rel err {err:e}");

    // The loss is linear in gamma: a difference quotient over the step between the two f32
    // values of gamma the op sees is exact up to rounding.
    let dgamma = g.dgamma.to_vec1::<f32>().unwrap();
    for i in 0..9 {
        let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
        gp[i] = (gamma[i] + 0.5) as f32 as f64;
        gm[i] = (gamma[i] - 0.5) as f32 as f64;
        let fd = (loss(&x, &gp) - loss(&x, &gm)) / (gp[i] - gm[i]);
        assert!(
            (dgamma[i] as f64 - fd).abs() < 1e-5 * (1.0 + fd.abs()),
            "dgamma[{i}] = {} vs finite difference {fd}",
            dgamma[i]
        );
    }
}

#[test]
fn hand_computed_case() {
    // x = (3, 4): mean(x^2) = 12.5, so y = (3, 4) * gamma / sqrt(12.5 + eps).
    let x = Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu).unwrap();
    let gamma = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let y = rms_norm(&x, &gamma, EPS).unwrap().to_vec2::<f32>().unwrap();
    let r = (12.5f64 + EPS).sqrt();
    assert!((y[0][0] as f64 - 3.0 / r).abs() < 1e-6, "{y:?}");
    assert!((y[0][1] as f64 - 8.0 / r).abs() < 1e-6, "{y:?}");
}

#[test]
fn bad_inputs_are_named() {
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let err = rms_norm(
        &x,
        &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        EPS,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gamma has shape [3], expected [4]"), "{err}");
    let err = rms_norm(
        &x,
        &Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap(),
        EPS,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gamma has dtype F64, expected f32"), "{err}");
}
