//! The chained sublayer (`ops::sublayer`, dx written once by the coefficient backward) on the
//! CPU: its output and every gradient (x, phi, alpha, b, gamma of F = RMSNorm) equal those of the
//! unchained ops (coeffs -> pre -> F -> post, candle adding three dx) and of the f64 candle-ops
//! reference, in dynamic and static mode, f32 and bf16 storage; so do those of the chained
//! sublayer with the RMSNorm fused into pre (`ops::sublayer_normed`). Also: a loss that reaches
//! x' but whose F ignores u (pre's backward never runs) still gives the right dx.

use candle_core::{DType, Device, Tensor, Var};
use mhc_train::mhc::{ops, reference, MhcShape};
use mhc_train::model::rms_norm::rms_norm;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Chained,
    /// Chained, F's RMSNorm fused into pre.
    Normed,
    Unchained,
    Reference,
}

fn normal(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let dist = Normal::new(0.0, std).unwrap();
    (0..len).map(|_| dist.sample(rng) as f32).collect()
}

struct Case {
    shape: MhcShape,
    tokens: usize,
    x: Vec<f32>,
    phi: Vec<f32>,
    alpha: Vec<f32>,
    b: Vec<f32>,
    gamma: Vec<f32>,
    w: Vec<f32>,
}

fn case(streams: usize, width: usize, tokens: usize, dynamic: bool, seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shape = MhcShape {
        streams,
        width,
        sinkhorn_iters: 20,
        dynamic,
    };
    let (n, c, k) = (streams, width, shape.k());
    Case {
        shape,
        tokens,
        x: normal(&mut rng, tokens * n * c, 1.0),
        phi: normal(&mut rng, n * c * k, (1.0 / (n * c) as f64).sqrt()),
        alpha: if dynamic {
            vec![0.7, 1.1, 0.9]
        } else {
            vec![0.0; 3]
        },
        b: normal(&mut rng, k, 1.0),
        gamma: normal(&mut rng, c, 0.3).iter().map(|g| 1.0 + g).collect(),
        w: normal(&mut rng, tokens * n * c, 1.0),
    }
}

/// x' and the gradients (x, phi, alpha, b, gamma) of sum(w * x'), all as f64. `f_uses_u`: F is
/// RMSNorm(u) (true) or a constant-in-u RMSNorm(gamma) row broadcast (false).
fn run(case: &Case, path: Path, dtype: DType, f_uses_u: bool) -> Vec<Tensor> {
    let cpu = Device::Cpu;
    let (t, n, c, k) = (
        case.tokens,
        case.shape.streams,
        case.shape.width,
        case.shape.k(),
    );
    let param = if path == Path::Reference {
        DType::F64
    } else {
        DType::F32
    };
    let var = |v: &[f32], dims: &[usize], dtype: DType| {
        Var::from_tensor(
            &Tensor::from_vec(v.to_vec(), dims, &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    // Storage-rounded x for every path, so all see the same values.
    let x_stored = Tensor::from_vec(case.x.clone(), (t, n, c), &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let x_dtype = if path == Path::Reference {
        DType::F64
    } else {
        dtype
    };
    let x = Var::from_tensor(&x_stored.to_dtype(x_dtype).unwrap()).unwrap();
    let phi = case
        .shape
        .dynamic
        .then(|| var(&case.phi, &[n * c, k], param));
    let alpha = var(&case.alpha, &[3], param);
    let b = var(&case.b, &[k], param);
    let gamma = var(&case.gamma, &[c], param);
    let f = |u: &Tensor| -> candle_core::Result<Tensor> {
        let g = gamma.as_tensor();
        let (u, g) = if path == Path::Reference {
            (u.clone(), g.clone())
        } else {
            (u.clone(), g.to_dtype(DType::F32)?)
        };
        let input = if f_uses_u {
            u
        } else {
            g.to_dtype(u.dtype())?.unsqueeze(0)?.repeat((t, 1))?
        };
        if path == Path::Reference {
            let ms = input.sqr()?.mean_keepdim(1)?;
            input
                .broadcast_div(&(ms + 1e-6)?.sqrt()?)?
                .broadcast_mul(&g)
        } else {
            rms_norm(&input, &g, 1e-6)
        }
    };
    let out = match path {
        Path::Chained => {
            let alpha_b = Tensor::cat(&[alpha.as_tensor(), b.as_tensor()], 0).unwrap();
            ops::sublayer(&x, phi.as_deref(), &alpha_b, &case.shape, f)
                .unwrap()
                .0
        }
        Path::Normed => {
            assert!(f_uses_u, "the fused norm normalises u");
            let alpha_b = Tensor::cat(&[alpha.as_tensor(), b.as_tensor()], 0).unwrap();
            let norm = ops::PreNorm {
                gamma: gamma.as_tensor(),
                eps: 1e-6,
            };
            ops::sublayer_normed(&x, phi.as_deref(), &alpha_b, &case.shape, norm, |y| {
                Ok(y.clone())
            })
            .unwrap()
            .0
        }
        Path::Unchained => {
            let h = ops::coeffs(&x, phi.as_deref(), &alpha, &b, &case.shape).unwrap();
            let u = ops::pre(&x, &h, &case.shape).unwrap();
            let y = f(&u).unwrap();
            ops::post(&x, &h, &y, &case.shape).unwrap()
        }
        Path::Reference => {
            let h = reference::coeffs(&x, phi.as_deref(), &alpha, &b, &case.shape).unwrap();
            let u = reference::pre(&x, &h, &case.shape).unwrap();
            let y = f(&u).unwrap();
            reference::post(&x, &h, &y, &case.shape).unwrap()
        }
    };
    let w = Tensor::from_vec(case.w.clone(), (t, n, c), &cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let loss = (out.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let grad = |v: &Var, name: &str| {
        f64_of(
            grads
                .get(v)
                .unwrap_or_else(|| panic!("no gradient for {name}")),
        )
    };
    let mut all = vec![f64_of(&out), grad(&x, "x")];
    if let Some(phi) = &phi {
        all.push(grad(phi, "phi"));
        all.push(grad(&alpha, "alpha"));
    }
    all.push(grad(&b, "b"));
    all.push(grad(&gamma, "gamma"));
    all
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

const NAMES_DYNAMIC: [&str; 7] = ["x'", "dx", "dphi", "dalpha", "db", "dgamma", ""];
const NAMES_STATIC: [&str; 5] = ["x'", "dx", "db", "dgamma", ""];

#[test]
fn chained_sublayer_matches_unchained_and_reference() {
    let mut seed = 1;
    for (n, c, t) in [(4usize, 33usize, 5usize), (2, 16, 9), (3, 7, 1)] {
        for dynamic in [true, false] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                seed += 1;
                let case = case(n, c, t, dynamic, seed);
                let chained = run(&case, Path::Chained, dtype, true);
                let normed = run(&case, Path::Normed, dtype, true);
                let unchained = run(&case, Path::Unchained, dtype, true);
                let oracle = run(&case, Path::Reference, dtype, true);
                let names: &[&str] = if dynamic {
                    &NAMES_DYNAMIC
                } else {
                    &NAMES_STATIC
                };
                for (i, name) in names.iter().take(chained.len()).enumerate() {
                    let vs_unchained = rel_err(&chained[i], &unchained[i]);
                    let vs_oracle = rel_err(&chained[i], &oracle[i]);
                    // Same arithmetic as the unchained ops except where the three dx terms
                    // are added (once, in f32, instead of candle's adds in the storage dtype).
                    let same = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                    assert!(
                        vs_unchained < same && vs_oracle < tol,
                        "{name} n={n} C={c} T={t} dynamic={dynamic} {dtype:?}: vs unchained \
                         {vs_unchained:e}, vs reference {vs_oracle:e}"
                    );
                    // The fused norm's CPU path is pre's and RMSNorm's code in turn.
                    let normed_vs_chained = rel_err(&normed[i], &chained[i]);
                    let normed_vs_oracle = rel_err(&normed[i], &oracle[i]);
                    assert!(
                        normed_vs_chained < same && normed_vs_oracle < tol,
                        "normed {name} n={n} C={c} T={t} dynamic={dynamic} {dtype:?}: vs \
                         chained {normed_vs_chained:e}, vs reference {normed_vs_oracle:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn chained_sublayer_without_pre_backward() {
    // F ignores u: pre's node is not on the path to the loss, its backward never runs, and the
    // coefficient backward must do without the stashed (du, H).
    for dynamic in [true, false] {
        let case = case(4, 12, 3, dynamic, 99);
        let chained = run(&case, Path::Chained, DType::F32, false);
        let oracle = run(&case, Path::Reference, DType::F32, false);
        for (i, (a, b)) in chained.iter().zip(&oracle).enumerate() {
            let err = rel_err(a, b);
            assert!(err < 1e-5, "output {i} dynamic={dynamic}: rel err {err:e}");
        }
    }
}
