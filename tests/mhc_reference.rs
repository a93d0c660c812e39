//! The mHC reference (src/mhc/reference.rs) held to independent oracles: central finite
//! differences for its autograd, plain-loop and hand-computed forward values, Sinkhorn properties,
//! and its own f64 run for f32 / bf16 storage.

use candle_core::{DType, Device, Result, Tensor, Var};
use mhc_train::mhc::{reference, MhcShape, EPS_RMS, EPS_SINKHORN};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

const TOKENS: usize = 3;
const SINKHORN_ITERS: usize = 20;
/// Central-difference step and the bound on ||g_ad - g_fd|| / ||g_fd|| (spec/mhc.md).
const FD_STEP: f64 = 1e-6;
const FD_TOL: f64 = 1e-6;

fn mhc_shape(streams: usize, width: usize, dynamic: bool) -> MhcShape {
    MhcShape {
        streams,
        width,
        sinkhorn_iters: SINKHORN_ITERS,
        dynamic,
    }
}

fn normal(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f64> {
    (0..len)
        .map(|_| std * Distribution::<f64>::sample(&StandardNormal, rng))
        .collect::<Vec<f64>>()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

fn rel_diff(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite value");
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    norm(&diff) / norm(want)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// One learnable input of the loss: flat f64 values and the tensor's dims.
#[derive(Clone)]
struct Param {
    name: &'static str,
    values: Vec<f64>,
    dims: Vec<usize>,
}

impl Param {
    fn tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.values.clone(), self.dims.as_slice(), &Device::Cpu)
    }
}

/// Indices into `Problem::params`.
const X: usize = 0;
const PHI: usize = 1;
const ALPHA: usize = 2;
const B: usize = 3;
const Y: usize = 4;

/// Inputs of L = sum(W1 * post(x, H, y)) + sum(W2 * pre(x, H)), H = coeffs(x, phi, alpha, b).
struct Problem {
    shape: MhcShape,
    params: Vec<Param>,
    w1: Tensor,
    w2: Tensor,
}

impl Problem {
    /// Random inputs whose logits Ht have typical magnitude `logit_scale`: x ~ N(0, 1) and
    /// phi ~ N(0, 1/(nC)) make P_c / r = <xbar, phi_c> / rms(xbar) ~ N(0, 1); alpha_g =
    /// logit_scale * (0.8, 1.0, 1.2) (distinct per group so the column grouping matters) and
    /// b ~ N(0, logit_scale^2) then give Ht_c of order logit_scale.
    fn random(seed: u64, streams: usize, width: usize, dynamic: bool, logit_scale: f64) -> Self {
        let shape = mhc_shape(streams, width, dynamic);
        let (n, c, k) = (streams, width, shape.k());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let nc = (n * c) as f64;
        let params = vec![
            Param {
                name: "x",
                values: normal(&mut rng, TOKENS * n * c, 1.0),
                dims: vec![TOKENS, n, c],
            },
            Param {
                name: "phi",
                values: normal(&mut rng, n * c * k, 1.0 / nc.sqrt()),
                dims: vec![n * c, k],
            },
            Param {
                name: "alpha",
                values: vec![0.8 * logit_scale, logit_scale, 1.2 * logit_scale],
                dims: vec![3],
            },
            Param {
                name: "b",
                values: normal(&mut rng, k, logit_scale),
                dims: vec![k],
            },
            Param {
                name: "y",
                values: normal(&mut rng, TOKENS * c, 1.0),
                dims: vec![TOKENS, c],
            },
        ];
        let w1 = Tensor::from_vec(
            normal(&mut rng, TOKENS * n * c, 1.0),
            (TOKENS, n, c),
            &Device::Cpu,
        )
        .unwrap();
        let w2 =
            Tensor::from_vec(normal(&mut rng, TOKENS * c, 1.0), (TOKENS, c), &Device::Cpu).unwrap();
        Problem {
            shape,
            params,
            w1,
            w2,
        }
    }

    /// The loss from one tensor per param (phi ignored in static mode).
    fn loss(&self, inputs: &[Tensor]) -> Result<Tensor> {
        let x = &inputs[X];
        let phi = self.shape.dynamic.then_some(&inputs[PHI]);
        let h = reference::coeffs(x, phi, &inputs[ALPHA], &inputs[B], &self.shape)?;
        let mixed = reference::post(x, &h, &inputs[Y], &self.shape)?;
        let aggregated = reference::pre(x, &h, &self.shape)?;
        (mixed * &self.w1)?.sum_all()? + (aggregated * &self.w2)?.sum_all()?
    }

    fn loss_value(&self, params: &[Param]) -> Result<f64> {
        let inputs = params
            .iter()
            .map(Param::tensor)
            .collect::<Result<Vec<_>>>()?;
        self.loss(&inputs)?.to_scalar::<f64>()
    }

    /// The autograd gradient of each param in `which`.
    fn autograd(&self, which: &[usize]) -> Result<Vec<Vec<f64>>> {
        let vars = self
            .params
            .iter()
            .map(|p| Var::from_tensor(&p.tensor()?))
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = self.loss(&inputs)?.backward()?;
        which
            .iter()
            .map(|&i| {
                let g = grads
                    .get(&inputs[i])
                    .unwrap_or_else(|| panic!("no gradient reached {}", self.params[i].name));
                flat(g)
            })
            .collect()
    }

    /// Central finite differences of the loss w.r.t. every element of param `which`.
    fn finite_differences(&self, which: usize) -> Result<Vec<f64>> {
        let mut params = self.params.clone();
        (0..params[which].values.len())
            .map(|e| {
                let original = params[which].values[e];
                params[which].values[e] = original + FD_STEP;
                let up = self.loss_value(&params)?;
                params[which].values[e] = original - FD_STEP;
                let down = self.loss_value(&params)?;
                params[which].values[e] = original;
                Ok((up - down) / (2.0 * FD_STEP))
            })
            .collect()
    }

    /// ||g_ad - g_fd|| / ||g_fd|| for each param in `which`, asserted below FD_TOL.
    fn check_gradients(&self, which: &[usize], label: &str) -> Result<()> {
        let autograd = self.autograd(which)?;
        for (&i, g_ad) in which.iter().zip(&autograd) {
            let g_fd = self.finite_differences(i)?;
            assert!(
                norm(&g_fd) > 0.0,
                "{label}: zero FD gradient for {}",
                self.params[i].name
            );
            let err = rel_diff(g_ad, &g_fd);
            println!("{label}: d/d{} rel err {err:.2e}", self.params[i].name);
            assert!(
                err < FD_TOL,
                "{label}: d/d{} rel err {err:.2e} >= {FD_TOL:.0e}",
                self.params[i].name
            );
        }
        Ok(())
    }
}

#[test]
fn dynamic_gradients_match_finite_differences() -> Result<()> {
    for (streams, width) in [(2, 7), (4, 5)] {
        for (seed, logit_scale) in [(1, 0.01), (2, 1.0), (3, 3.0)] {
            let problem = Problem::random(seed, streams, width, true, logit_scale);
            let label = format!("dynamic n={streams} C={width} scale={logit_scale}");
            problem.check_gradients(&[X, PHI, ALPHA, B, Y], &label)?;
        }
    }
    Ok(())
}

#[test]
fn static_gradients_match_finite_differences() -> Result<()> {
    for (streams, width) in [(2, 7), (4, 5)] {
        for (seed, logit_scale) in [(11, 0.01), (12, 1.0), (13, 3.0)] {
            let problem = Problem::random(seed, streams, width, false, logit_scale);
            let label = format!("static n={streams} C={width} scale={logit_scale}");
            problem.check_gradients(&[X, B, Y], &label)?;
        }
    }
    Ok(())
}

/// Sinkhorn on one token's n x n logits (row-major) in plain loops: the independent forward oracle.
fn sinkhorn_plain(logits: &[f64], n: usize, iters: usize) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut m: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    for _ in 0..iters {
        for j in 0..n {
            let s: f64 = (0..n).map(|i| m[i * n + j]).sum();
            (0..n).for_each(|i| m[i * n + j] /= s + EPS_SINKHORN);
        }
        for i in 0..n {
            let s: f64 = m[i * n..(i + 1) * n].iter().sum();
            m[i * n..(i + 1) * n]
                .iter_mut()
                .for_each(|v| *v /= s + EPS_SINKHORN);
        }
    }
    m
}

/// H [T, k] in plain loops, straight from the formulas of spec/mhc.md.
fn coeffs_plain(problem: &Problem) -> Vec<f64> {
    let shape = problem.shape;
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    let p = &problem.params;
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let mut h = Vec::with_capacity(TOKENS * k);
    for t in 0..TOKENS {
        let xbar = &p[X].values[t * n * c..(t + 1) * n * c];
        let r = (xbar.iter().map(|v| v * v).sum::<f64>() / (n * c) as f64 + EPS_RMS).sqrt();
        let ht: Vec<f64> = (0..k)
            .map(|col| {
                if !shape.dynamic {
                    return p[B].values[col];
                }
                let proj: f64 = (0..n * c)
                    .map(|e| xbar[e] * p[PHI].values[e * k + col])
                    .sum();
                let group = if col < n {
                    0
                } else if col < 2 * n {
                    1
                } else {
                    2
                };
                p[ALPHA].values[group] * proj / r + p[B].values[col]
            })
            .collect();
        h.extend(ht[..n].iter().map(|&z| sigmoid(z)));
        h.extend(ht[n..2 * n].iter().map(|&z| 2.0 * sigmoid(z)));
        h.extend(sinkhorn_plain(&ht[2 * n..], n, shape.sinkhorn_iters));
    }
    h
}

#[test]
fn coeffs_match_plain_loops() -> Result<()> {
    for dynamic in [true, false] {
        for (streams, width) in [(2, 7), (4, 5)] {
            let problem = Problem::random(21, streams, width, dynamic, 1.0);
            let inputs = problem
                .params
                .iter()
                .map(Param::tensor)
                .collect::<Result<Vec<_>>>()?;
            let phi = dynamic.then_some(&inputs[PHI]);
            let h = reference::coeffs(&inputs[X], phi, &inputs[ALPHA], &inputs[B], &problem.shape)?;
            assert_eq!(h.dims(), [TOKENS, problem.shape.k()]);
            let err = rel_diff(&flat(&h)?, &coeffs_plain(&problem));
            assert!(
                err < 1e-13,
                "dynamic={dynamic} n={streams}: H rel err {err:.2e}"
            );
        }
    }
    Ok(())
}

fn random_logits(seed: u64, tokens: usize, n: usize, scale: f64, dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Tensor::from_vec(
        normal(&mut rng, tokens * n * n, scale),
        (tokens, n, n),
        &Device::Cpu,
    )?
    .to_dtype(dtype)
}

#[test]
fn sinkhorn_is_positive_and_doubly_stochastic_in_f32() -> Result<()> {
    for n in [2, 4, 8] {
        for (seed, scale) in [(31, 0.01), (32, 0.1), (33, 1.0)] {
            let m = reference::sinkhorn(&random_logits(seed, 16, n, scale, DType::F32)?, 20)?;
            assert_eq!(m.dtype(), DType::F32);
            let values = m.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                values.iter().all(|&v| v > 0.0),
                "n={n} scale={scale}: entry <= 0"
            );
            let row_sums = m.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
            let col_sums = m.sum(1)?.flatten_all()?.to_vec1::<f32>()?;
            let worst = |sums: &[f32]| sums.iter().map(|s| (s - 1.0).abs()).fold(0.0, f32::max);
            assert!(
                worst(&row_sums) < 1e-5,
                "n={n} scale={scale}: row sum off by {}",
                worst(&row_sums)
            );
            assert!(
                worst(&col_sums) < 1e-3,
                "n={n} scale={scale}: column sum off by {}",
                worst(&col_sums)
            );
        }
    }
    Ok(())
}

#[test]
fn sinkhorn_of_constant_logits_is_uniform() -> Result<()> {
    for n in [2, 3, 4, 8] {
        let logits = Tensor::full(2.5f64, (2, n, n), &Device::Cpu)?;
        let values = flat(&reference::sinkhorn(&logits, 20)?)?;
        for v in values {
            assert!(
                (v - 1.0 / n as f64).abs() < 1e-6,
                "n={n}: entry {v}, expected 1/{n}"
            );
        }
    }
    Ok(())
}

#[test]
fn sinkhorn_of_one_stream_is_one_over_one_plus_eps() -> Result<()> {
    let logits = Tensor::new(&[[[-3.0f32]], [[0.0]], [[7.0]]], &Device::Cpu)?;
    for v in reference::sinkhorn(&logits, 20)?
        .flatten_all()?
        .to_vec1::<f32>()?
    {
        let want = 1.0 / (1.0 + EPS_SINKHORN as f32);
        assert!((v - want).abs() < 1e-5, "entry {v}, expected {want}");
    }
    Ok(())
}

#[test]
fn activations_stay_in_their_ranges_in_f32() -> Result<()> {
    let problem = Problem::random(41, 4, 5, true, 3.0);
    let inputs = problem
        .params
        .iter()
        .map(|p| p.tensor()?.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    let h = reference::coeffs(
        &inputs[X],
        Some(&inputs[PHI]),
        &inputs[ALPHA],
        &inputs[B],
        &problem.shape,
    )?;
    let n = problem.shape.streams;
    let h_pre = h.narrow(1, 0, n)?.flatten_all()?.to_vec1::<f32>()?;
    let h_post = h.narrow(1, n, n)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(
        h_pre.iter().all(|&v| v > 0.0 && v < 1.0),
        "H_pre out of (0, 1): {h_pre:?}"
    );
    assert!(
        h_post.iter().all(|&v| v > 0.0 && v < 2.0),
        "H_post out of (0, 2): {h_post:?}"
    );
    Ok(())
}

/// n = 2, C = 2, two tokens sharing one H: H_pre = (1/4, 3/4), H_post = (1/2, 3/2),
/// H_res = [[1/2, 1/2], [1/4, 3/4]], y = (10, -2).
/// Token 0, x_0 = (1, 2), x_1 = (3, 4):
///   u    = 1/4 (1, 2) + 3/4 (3, 4)                = (0.25 + 2.25, 0.5 + 3)  = (2.5, 3.5)
///   x'_0 = 1/2 (1, 2) + 1/2 (3, 4) + 1/2 (10, -2) = (0.5 + 1.5 + 5, 1 + 2 - 1) = (7, 2)
///   x'_1 = 1/4 (1, 2) + 3/4 (3, 4) + 3/2 (10, -2) = (2.5 + 15, 3.5 - 3)       = (17.5, 0.5)
/// Token 1, streams swapped, x_0 = (3, 4), x_1 = (1, 2):
///   u    = 1/4 (3, 4) + 3/4 (1, 2)                = (0.75 + 0.75, 1 + 1.5)   = (1.5, 2.5)
///   x'_0 = 1/2 (3, 4) + 1/2 (1, 2) + 1/2 (10, -2) = (1.5 + 0.5 + 5, 2 + 1 - 1) = (7, 2)
///   x'_1 = 1/4 (3, 4) + 3/4 (1, 2) + 3/2 (10, -2) = (1.5 + 15, 2.5 - 3)       = (16.5, -0.5)
/// Every number is a dyadic fraction, so the f64 results are exact.
#[test]
fn pre_and_post_match_a_hand_computed_case() -> Result<()> {
    let shape = mhc_shape(2, 2, true);
    let x = Tensor::new(
        &[[[1.0f64, 2.0], [3.0, 4.0]], [[3.0, 4.0], [1.0, 2.0]]],
        &Device::Cpu,
    )?;
    let y = Tensor::new(&[[10.0f64, -2.0], [10.0, -2.0]], &Device::Cpu)?;
    // H as a narrow of a wider tensor (a leading and a trailing junk column), as callers pass it.
    let h_row = [99.0f64, 0.25, 0.75, 0.5, 1.5, 0.5, 0.5, 0.25, 0.75, -99.0];
    let h_wide = Tensor::new(&[h_row, h_row], &Device::Cpu)?;
    let h = h_wide.narrow(1, 1, shape.k())?;
    assert!(!h.is_contiguous());
    assert_eq!(
        reference::pre(&x, &h, &shape)?.to_vec2::<f64>()?,
        [[2.5, 3.5], [1.5, 2.5]]
    );
    assert_eq!(
        reference::post(&x, &h, &y, &shape)?.to_vec3::<f64>()?,
        [[[7.0, 2.0], [17.5, 0.5]], [[7.0, 2.0], [16.5, -0.5]]]
    );
    Ok(())
}

#[test]
fn one_stream_with_identity_coefficients_is_a_plain_residual() -> Result<()> {
    let shape = mhc_shape(1, 7, true);
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let x = Tensor::from_vec(
        normal(&mut rng, TOKENS * 7, 1.0),
        (TOKENS, 1, 7),
        &Device::Cpu,
    )?;
    let y = Tensor::from_vec(normal(&mut rng, TOKENS * 7, 1.0), (TOKENS, 7), &Device::Cpu)?;
    // k = 3 columns: H_pre = H_post = H_res = 1.
    let h = Tensor::ones((TOKENS, shape.k()), DType::F64, &Device::Cpu)?;
    assert_eq!(
        reference::pre(&x, &h, &shape)?.to_vec2::<f64>()?,
        x.squeeze(1)?.to_vec2::<f64>()?
    );
    assert_eq!(
        reference::post(&x, &h, &y, &shape)?.to_vec3::<f64>()?,
        (&x + y.unsqueeze(1)?)?.to_vec3::<f64>()?
    );
    Ok(())
}

/// The spec's known-wrong Sinkhorn backward, guarded against. At init (H_pre = 1/n, H_post = 1,
/// Sinkhorn logits ~ N(0, 0.01^2)) the exact gradient w.r.t. the logits, FD-checked here, is
/// (1/n) times dH_res with its row and column means removed; backwards that ignore the
/// normalisers give dH_res * H_res (treating the sums as constants) or dH_res * M0 (treating
/// H_res as exp(L) itself), both far from it.
#[test]
fn sinkhorn_gradient_is_far_from_the_normaliser_free_one() -> Result<()> {
    let n = 4;
    let shape = mhc_shape(n, 5, true);
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let dev = &Device::Cpu;
    let x = Tensor::from_vec(normal(&mut rng, TOKENS * n * 5, 1.0), (TOKENS, n, 5), dev)?;
    let y = Tensor::from_vec(normal(&mut rng, TOKENS * 5, 1.0), (TOKENS, 5), dev)?;
    let w1 = Tensor::from_vec(normal(&mut rng, TOKENS * n * 5, 1.0), (TOKENS, n, 5), dev)?;
    let w2 = Tensor::from_vec(normal(&mut rng, TOKENS * 5, 1.0), (TOKENS, 5), dev)?;
    let logit_values = normal(&mut rng, TOKENS * n * n, 0.01);
    let pre_post = Tensor::cat(
        &[
            Tensor::full(1.0 / n as f64, (TOKENS, n), dev)?,
            Tensor::ones((TOKENS, n), DType::F64, dev)?,
        ],
        1,
    )?;
    let loss_of_h_res = |h_res: &Tensor| -> Result<Tensor> {
        let h = Tensor::cat(&[&pre_post, &h_res.reshape((TOKENS, n * n))?], 1)?;
        let out = reference::post(&x, &h, &y, &shape)?;
        (out * &w1)?.sum_all()? + (reference::pre(&x, &h, &shape)? * &w2)?.sum_all()?
    };
    let loss_of_logits = |values: &[f64]| -> Result<Tensor> {
        let logits = Tensor::from_vec(values.to_vec(), (TOKENS, n, n), dev)?;
        loss_of_h_res(&reference::sinkhorn(&logits, SINKHORN_ITERS)?)
    };

    let logits = Var::from_vec(logit_values.clone(), (TOKENS, n, n), dev)?;
    let h_res_value = reference::sinkhorn(logits.as_tensor(), SINKHORN_ITERS)?;
    let exact = flat(
        loss_of_h_res(&h_res_value)?
            .backward()?
            .get(logits.as_tensor())
            .expect("gradient reaches the logits"),
    )?;

    let mut shifted = logit_values.clone();
    let finite_differences: Vec<f64> = (0..shifted.len())
        .map(|e| {
            shifted[e] = logit_values[e] + FD_STEP;
            let up = loss_of_logits(&shifted)?.to_scalar::<f64>()?;
            shifted[e] = logit_values[e] - FD_STEP;
            let down = loss_of_logits(&shifted)?.to_scalar::<f64>()?;
            shifted[e] = logit_values[e];
            Ok((up - down) / (2.0 * FD_STEP))
        })
        .collect::<Result<_>>()?;
    let fd_err = rel_diff(&exact, &finite_differences);
    assert!(
        fd_err < FD_TOL,
        "logit gradient vs FD: rel err {fd_err:.2e}"
    );

    let h_res = Var::from_tensor(&h_res_value.detach())?;
    let d_h_res = flat(
        loss_of_h_res(h_res.as_tensor())?
            .backward()?
            .get(h_res.as_tensor())
            .expect("gradient reaches H_res"),
    )?;
    let h_res_values = flat(&h_res_value)?;
    let max = logit_values
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let sums_constant: Vec<f64> = d_h_res
        .iter()
        .zip(&h_res_values)
        .map(|(d, h)| d * h)
        .collect();
    let straight_through: Vec<f64> = d_h_res
        .iter()
        .zip(&logit_values)
        .map(|(d, l)| d * (l - max).exp())
        .collect();
    let off_sums_constant = rel_diff(&sums_constant, &exact);
    let off_straight_through = rel_diff(&straight_through, &exact);
    println!(
        "dH_res*H_res off by {off_sums_constant:.3}, dH_res*M0 off by {off_straight_through:.3}"
    );
    assert!(
        off_sums_constant > 0.5,
        "dH_res * H_res is only {off_sums_constant:.3} off"
    );
    assert!(
        off_straight_through > 2.0,
        "dH_res * M0 is only {off_straight_through:.3} off"
    );

    // The first column normalisation makes the output blind (up to EPS_SINKHORN) to adding a
    // constant to one column of logits, so each column of the exact gradient sums to ~0.
    for t in 0..TOKENS {
        for j in 0..n {
            let col_sum: f64 = (0..n).map(|i| exact[t * n * n + i * n + j]).sum();
            assert!(
                col_sum.abs() < 1e-5 * norm(&exact),
                "token {t} column {j} sums to {col_sum:.2e}"
            );
        }
    }
    Ok(())
}

/// coeffs / pre / post with f32 and bf16 storage against the f64 run on the same values.
#[test]
fn lower_precision_storage_tracks_the_f64_run() -> Result<()> {
    for dynamic in [true, false] {
        let problem = Problem::random(71, 4, 7, dynamic, 1.0);
        let run = |stream: DType, params: DType| -> Result<[Vec<f64>; 3]> {
            let p: Vec<Tensor> = problem
                .params
                .iter()
                .map(Param::tensor)
                .collect::<Result<_>>()?;
            let (x, y) = (p[X].to_dtype(stream)?, p[Y].to_dtype(stream)?);
            let phi = p[PHI].to_dtype(params)?;
            let (alpha, b) = (p[ALPHA].to_dtype(params)?, p[B].to_dtype(params)?);
            let shape = &problem.shape;
            let h = reference::coeffs(&x, dynamic.then_some(&phi), &alpha, &b, shape)?;
            assert_eq!(h.dtype(), params);
            let u = reference::pre(&x, &h, shape)?;
            let out = reference::post(&x, &h, &y, shape)?;
            assert_eq!((u.dtype(), out.dtype()), (stream, stream));
            Ok([flat(&h)?, flat(&u)?, flat(&out)?])
        };
        let exact = run(DType::F64, DType::F64)?;
        for (stream, bound) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let got = run(stream, DType::F32)?;
            for (name, (g, e)) in ["H", "u", "x'"].iter().zip(got.iter().zip(&exact)) {
                let err = rel_diff(g, e);
                println!("dynamic={dynamic} {stream:?} {name}: rel diff {err:.2e}");
                assert!(
                    err < bound,
                    "dynamic={dynamic} {stream:?} {name}: rel diff {err:.2e}"
                );
            }
        }
    }
    Ok(())
}
