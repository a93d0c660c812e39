//! The selftest cases shared by every launch layer (CUDA and HIP): the same shapes, logit scales
//! and tolerances on each vendor, and the random inputs drawn the same way.

use crate::mhc::{reference, MhcShape};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

pub const TOL_F32: f64 = 1e-5;
pub const TOL_BF16: f64 = 1e-2;

/// A selftest run's seed: the one given (to repeat a run), else the clock's nanoseconds (fresh
/// inputs every run; the run prints it).
pub fn run_seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

/// The input seed of case `index` of a run.
pub fn case_seed(run_seed: u64, index: usize) -> u64 {
    run_seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The bound on every relative error for storage `dtype` (spec/mhc.md).
pub fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_BF16
    }
}

/// ||a - b|| / ||b|| with None read as zeros of the other's length; an exact-zero reference asks
/// for an exact-zero result; NaN when `a` holds a non-finite element, so it fails every bound.
pub fn rel_err(name: &str, a: Option<&[f64]>, b: Option<&[f64]>) -> anyhow::Result<f64> {
    let len = a.or(b).map(|v| v.len()).unwrap_or(0);
    let zeros = vec![0.0; len];
    let (a, b) = (a.unwrap_or(&zeros), b.unwrap_or(&zeros));
    if a.len() != b.len() {
        anyhow::bail!("{name}: {} elements, reference has {}", a.len(), b.len())
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Ok(f64::NAN);
    }
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    Ok(if norm == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff / norm).sqrt()
    })
}

/// A selftest run's count of passed and failed cases.
#[derive(Debug, Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    /// Records one case: its relative errors (each must be below `tolerance(dtype)`; NaN fails),
    /// or the error that stopped it. Prints one line: "ok" or "FAIL", the case, the errors.
    pub fn record<N: std::fmt::Display>(
        &mut self,
        case: &dyn std::fmt::Display,
        dtype: DType,
        result: anyhow::Result<Vec<(N, f64)>>,
    ) {
        match result {
            Ok(errs) => {
                let ok = errs.iter().all(|(_, e)| *e < tolerance(dtype));
                let all = errs
                    .iter()
                    .map(|(name, e)| format!("{name} {e:.1e}"))
                    .collect::<Vec<_>>()
                    .join("  ");
                println!("{} {case}  {all}", if ok { "ok  " } else { "FAIL" });
                if ok {
                    self.passed += 1;
                } else {
                    self.failed += 1;
                }
            }
            Err(err) => {
                println!("FAIL {case}  error: {err:#}");
                self.failed += 1;
            }
        }
    }

    /// Prints the closing "N passed, M failed" line; an error naming `run` if any case failed.
    pub fn finish(&self, run: &str) -> anyhow::Result<()> {
        println!(
            "{} passed, {} failed (tolerance f32 {TOL_F32:e}, bf16 {TOL_BF16:e})",
            self.passed, self.failed
        );
        if self.failed > 0 {
            anyhow::bail!("{run}: {} case(s) failed", self.failed)
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub dtype: DType,
    pub streams: usize,
    pub width: usize,
    pub tokens: usize,
    /// Typical size of the logits Ht (through alpha and b).
    pub scale: f64,
    pub dynamic: bool,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<4} n={} C={:<4} T={:<5} scale={:<4} {:<7}",
            format!("{:?}", self.dtype).to_lowercase(),
            self.streams,
            self.width,
            self.tokens,
            self.scale,
            if self.dynamic { "dynamic" } else { "static" }
        )
    }
}

/// The cases: every dtype x n x mode x logit scale, with (T, C) rotating through
/// odd C (scalar path), 16-byte-aligned C (vector path), a single token, partial tiles and
/// several token ranges; plus one training-sized case per dtype.
pub fn cases() -> Vec<Case> {
    let sizes = [(1, 129), (37, 256), (300, 67), (130, 1032), (65, 5)];
    let mut cases = Vec::new();
    let mut i = 0;
    for dtype in [DType::F32, DType::BF16] {
        for streams in [2, 4, 8] {
            for dynamic in [true, false] {
                for scale in [0.01, 1.0, 3.0] {
                    let (tokens, width) = sizes[i % sizes.len()];
                    i += 1;
                    cases.push(Case {
                        dtype,
                        streams,
                        width,
                        tokens,
                        scale,
                        dynamic,
                    });
                }
            }
        }
        cases.push(Case {
            dtype,
            streams: 4,
            width: 1280,
            tokens: 2048,
            scale: 1.0,
            dynamic: true,
        });
    }
    cases
}

/// Mixed into a case's seed for its RMSNorm's gamma ("norm").
const NORM_STREAM: u64 = 0x6e6f_726d;

/// One mHC case's inputs, on the host: x and y rounded to the storage dtype (kept as f32
/// values, so the fused side and the f64 oracle see the same numbers); parameters in f32; the
/// loss weights W1 (`w_post`, of x') and W2 (`w_pre`, of u) rounded to the storage dtype too: a
/// bf16 op receives its upstream gradient in bf16, so the oracle must see those same values.
pub struct MhcInputs {
    pub shape: MhcShape,
    pub tokens: usize,
    /// The storage dtype the values below are rounded to.
    pub dtype: DType,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// [nC, k]; None in static mode.
    pub phi: Option<Vec<f32>>,
    pub alpha: Vec<f32>,
    pub b: Vec<f32>,
    pub w_post: Vec<f32>,
    pub w_pre: Vec<f32>,
    /// [C]: the RMSNorm fused into pre (`oracle(true)`), 1 + N(0, 0.3^2) as in the RMSNorm
    /// cases; drawn from its own stream, so a seed's other inputs are those of earlier runs.
    pub gamma: Vec<f32>,
}

/// Forward outputs and gradients of one implementation, as f64 (None: not produced).
pub struct MhcResults {
    pub h: Vec<f64>,
    pub u: Vec<f64>,
    pub x_out: Vec<f64>,
    pub dx: Vec<f64>,
    pub dphi: Option<Vec<f64>>,
    pub dalpha: Option<Vec<f64>>,
    pub db: Vec<f64>,
    /// None with the RMSNorm fused into pre (y is then F's output, not an input).
    pub dy: Option<Vec<f64>>,
    /// Only with the RMSNorm fused into pre.
    pub dgamma: Option<Vec<f64>>,
}

impl MhcInputs {
    pub fn new(case: &Case, seed: u64) -> anyhow::Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (t, n, c) = (case.tokens, case.streams, case.width);
        let shape = MhcShape {
            streams: n,
            width: c,
            sinkhorn_iters: 20,
            dynamic: case.dynamic,
        };
        let k = shape.k();
        let stored = |v: Vec<f32>| -> anyhow::Result<Vec<f32>> {
            let len = v.len();
            Ok(Tensor::from_vec(v, len, &Device::Cpu)?
                .to_dtype(case.dtype)?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        };
        let x = stored(normal(&mut rng, t * n * c, 1.0))?;
        let y = stored(normal(&mut rng, t * c, 1.0))?;
        let w_post = stored(normal(&mut rng, t * n * c, 1.0))?;
        let w_pre = stored(normal(&mut rng, t * c, 1.0))?;
        // phi ~ N(0, 1/(nC)) makes P / r ~ N(0, 1); alpha = scale (+-20% per group) sets the
        // logits' size, b ~ N(0, scale^2) likewise.
        let phi = case
            .dynamic
            .then(|| normal(&mut rng, n * c * k, (1.0 / (n * c) as f64).sqrt()));
        let alpha: Vec<f32> = if case.dynamic {
            (0..3)
                .map(|_| (case.scale * rng.random_range(0.8..1.2)) as f32)
                .collect()
        } else {
            vec![0.0; 3]
        };
        let b = normal(&mut rng, k, case.scale);
        let mut norm_rng = ChaCha8Rng::seed_from_u64(seed ^ NORM_STREAM);
        let gamma = normal(&mut norm_rng, c, 0.3)
            .iter()
            .map(|g| 1.0 + g)
            .collect();
        Ok(Self {
            shape,
            tokens: t,
            dtype: case.dtype,
            x,
            y,
            phi,
            alpha,
            b,
            w_post,
            w_pre,
            gamma,
        })
    }

    /// The candle-ops reference (`mhc::reference`) in f64 on the CPU, gradients by autograd: of
    /// sum(W1 * x') + sum(W2 * u) with y given, or (`normed`) of sum(W1 * x') with y =
    /// RMSNorm(u) * gamma (eps `RMS_NORM_EPS`), reported in u's place, the gradient reaching y
    /// rounded to the storage dtype as the ops see it.
    pub fn oracle(&self, normed: bool) -> anyhow::Result<MhcResults> {
        let shape = &self.shape;
        let (t, n, c, k) = (self.tokens, shape.streams, shape.width, shape.k());
        let cpu = &Device::Cpu;
        let f64_tensor = |v: &[f32], dims: &[usize]| -> anyhow::Result<Tensor> {
            Ok(Tensor::from_slice(v, dims, cpu)?.to_dtype(DType::F64)?)
        };
        let var = |v: &[f32], dims: &[usize]| -> anyhow::Result<Var> {
            Ok(Var::from_tensor(&f64_tensor(v, dims)?)?)
        };
        let x = var(&self.x, &[t, n, c])?;
        let y = var(&self.y, &[t, c])?;
        let phi = self.phi.as_ref().map(|p| var(p, &[n * c, k])).transpose()?;
        let alpha = var(&self.alpha, &[3])?;
        let b = var(&self.b, &[k])?;
        let gamma = var(&self.gamma, &[c])?;
        let h = reference::coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
        let u = reference::pre(&x, &h, shape)?;
        // Normed: the fused forward hands post y in the storage dtype, and the backward hands
        // the norm post's dL/dy in it (as autograd hands a bf16 op its gradient), so the oracle
        // runs in two stages at that boundary: post of y rounded, as a leaf; then the leaf's
        // gradient, rounded, through the norm, pre and the coefficients. (With one f64 pass, the
        // cancelling sums behind dalpha came out up to 1.1e-2 apart at bf16, T = 2048, from
        // those two roundings alone.)
        let (u, x_out, stages) = if normed {
            let ms = u.sqr()?.mean_keepdim(D::Minus1)?;
            let y_n = u
                .broadcast_div(&(ms + RMS_NORM_EPS)?.sqrt()?)?
                .broadcast_mul(&gamma)?;
            let y_leaf =
                Var::from_tensor(&y_n.detach().to_dtype(self.dtype)?.to_dtype(DType::F64)?)?;
            let x_out = reference::post(&x, &h, &y_leaf, shape)?;
            let post_grads = (&x_out * f64_tensor(&self.w_post, &[t, n, c])?)?
                .sum_all()?
                .backward()?;
            let dy = post_grads
                .get(&y_leaf)
                .ok_or_else(|| anyhow::anyhow!("y has no gradient"))?
                .to_dtype(self.dtype)?
                .to_dtype(DType::F64)?;
            let norm_grads = (&y_n * dy)?.sum_all()?.backward()?;
            (y_n, x_out, vec![post_grads, norm_grads])
        } else {
            let x_out = reference::post(&x, &h, &y, shape)?;
            let loss = ((&x_out * f64_tensor(&self.w_post, &[t, n, c])?)?.sum_all()?
                + (&u * f64_tensor(&self.w_pre, &[t, c])?)?.sum_all()?)?;
            (u, x_out, vec![loss.backward()?])
        };
        let flat = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1()?) };
        // A variable's gradient: the sum over the stages that reach it.
        let grad = |v: &Var| -> anyhow::Result<Option<Vec<f64>>> {
            let mut sum: Option<Tensor> = None;
            for g in stages.iter().filter_map(|grads| grads.get(v)) {
                sum = Some(match sum {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
            sum.as_ref().map(flat).transpose()
        };
        let needed = |v: &Var, name: &str| -> anyhow::Result<Vec<f64>> {
            grad(v)?.ok_or_else(|| anyhow::anyhow!("{name} has no gradient"))
        };
        Ok(MhcResults {
            h: flat(&h)?,
            u: flat(&u)?,
            x_out: flat(&x_out)?,
            dx: needed(&x, "x")?,
            dphi: phi.as_ref().map(grad).transpose()?.flatten(),
            dalpha: grad(&alpha)?,
            db: needed(&b, "b")?,
            dy: (!normed).then(|| needed(&y, "y")).transpose()?,
            dgamma: normed.then(|| needed(&gamma, "gamma")).transpose()?,
        })
    }
}

/// The relative error of each output and gradient of `fused` against `oracle`, with `prefix`
/// before each name.
pub fn mhc_errors(
    prefix: &str,
    fused: &MhcResults,
    oracle: &MhcResults,
) -> anyhow::Result<Vec<(String, f64)>> {
    type Pair<'a> = (&'static str, Option<&'a [f64]>, Option<&'a [f64]>);
    let pairs: [Pair; 9] = [
        ("H", Some(&fused.h), Some(&oracle.h)),
        ("u", Some(&fused.u), Some(&oracle.u)),
        ("x'", Some(&fused.x_out), Some(&oracle.x_out)),
        ("dx", Some(&fused.dx), Some(&oracle.dx)),
        ("dphi", fused.dphi.as_deref(), oracle.dphi.as_deref()),
        ("dalpha", fused.dalpha.as_deref(), oracle.dalpha.as_deref()),
        ("db", Some(&fused.db), Some(&oracle.db)),
        ("dy", fused.dy.as_deref(), oracle.dy.as_deref()),
        ("dgamma", fused.dgamma.as_deref(), oracle.dgamma.as_deref()),
    ];
    // dy and dgamma: one or the other, by whether the RMSNorm ran fused into pre.
    pairs
        .into_iter()
        .filter(|(_, a, b)| a.is_some() || b.is_some())
        .map(|(name, a, b)| Ok((format!("{prefix}{name}"), rel_err(name, a, b)?)))
        .collect()
}

pub fn normal(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let dist = Normal::new(0.0, std).expect("positive std");
    (0..len).map(|_| dist.sample(rng) as f32).collect()
}

/// The RMSNorm cases (x's dims): odd C (scalar path), aligned C, one row, 3-D x, more columns
/// than the kernel's register dgamma partials cover (its atomic tail), and a training size.
pub const RMS_NORM_DIMS: [&[usize]; 6] = [
    &[1, 129],
    &[37, 256],
    &[300, 67],
    &[4, 5, 1032],
    &[3, 9000],
    &[4096, 1280],
];
/// eps of the RMSNorm cases.
pub const RMS_NORM_EPS: f64 = 1e-5;

/// One RMSNorm case's inputs: x (rounded to the storage dtype, kept as f32 values), gamma [C]
/// (1 + N(0, 0.3^2): not all ones, which would hide a kernel that ignores it) and the loss
/// weights w of sum(w * y).
pub struct RmsNormInputs {
    pub x: Vec<f32>,
    pub gamma: Vec<f32>,
    pub w: Vec<f32>,
}

impl RmsNormInputs {
    pub fn new(dims: &[usize], dtype: DType, seed: u64) -> anyhow::Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let len: usize = dims.iter().product();
        let c = dims.last().copied().unwrap_or(0);
        let x = Tensor::from_vec(normal(&mut rng, len, 1.0), len, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let gamma = normal(&mut rng, c, 0.3).iter().map(|g| 1.0 + g).collect();
        let w = normal(&mut rng, len, 1.0);
        Ok(Self { x, gamma, w })
    }

    /// (y, dx, dgamma) of the loss sum(w * y) by candle ops in f64 on the CPU, the gradients by
    /// autograd.
    pub fn oracle(&self, dims: &[usize]) -> anyhow::Result<[Vec<f64>; 3]> {
        let cpu = &Device::Cpu;
        let f64_var = |v: &[f32], dims: &[usize]| -> anyhow::Result<Var> {
            Ok(Var::from_tensor(
                &Tensor::from_slice(v, dims, cpu)?.to_dtype(DType::F64)?,
            )?)
        };
        let x = f64_var(&self.x, dims)?;
        let gamma = f64_var(&self.gamma, &[self.gamma.len()])?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x
            .broadcast_div(&(ms + RMS_NORM_EPS)?.sqrt()?)?
            .broadcast_mul(&gamma)?;
        let w = Tensor::from_slice(&self.w, dims, cpu)?.to_dtype(DType::F64)?;
        let grads = (&y * w)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1()?) };
        let grad = |v: &Var| -> anyhow::Result<Vec<f64>> {
            flat(grads.get(v).ok_or_else(|| anyhow::anyhow!("no gradient"))?)
        };
        Ok([flat(&y)?, grad(&x)?, grad(&gamma)?])
    }
}

/// The relative errors of y, dx and dgamma against `oracle`.
pub fn rms_norm_errors(
    fused: &[Vec<f64>; 3],
    oracle: &[Vec<f64>; 3],
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    ["y", "dx", "dgamma"]
        .into_iter()
        .zip(fused.iter().zip(oracle))
        .map(|(name, (a, b))| Ok((name, rel_err(name, Some(a), Some(b))?)))
        .collect()
}

/// The label of an RMSNorm case in the selftest's output.
pub fn rms_norm_label(dims: &[usize], dtype: DType) -> String {
    format!(
        "rms-norm {:<4} {dims:?}",
        format!("{dtype:?}").to_lowercase()
    )
}
