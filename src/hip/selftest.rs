//! The fused mHC kernels on an AMD GPU against the candle-ops reference in f64 on the CPU: the
//! same cases, loss and bounds as the CUDA selftest (src/gpu/selftest.rs, spec/mhc.md "Numerics
//! and tests"). Forward outputs (H, u, x') and every gradient (x, phi, alpha, b, y) of
//! sum(W1 * x') + sum(W2 * u), for the unchained ops and the chained sublayer backward; the
//! fused RMSNorm's y, dx and dgamma. Relative error ||out - ref|| / ||ref|| below 1e-5 for f32
//! storage and 1e-2 for bf16, every output buffer NaN-poisoned first and every element checked
//! finite.

use super::mhc::{Chaining, Sublayer, SublayerF};
use super::rms_norm::RmsNorm;
use super::runtime::{Device, DeviceElem};
use crate::mhc::cpu::Elem;
use crate::mhc::{reference, MhcShape};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device as Cpu, Tensor, Var};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gpu::cases::{
    case_seed, cases, normal, rel_err, rms_norm_errors, rms_norm_label, run_seed, Case,
    RmsNormInputs, Tally, RMS_NORM_DIMS, RMS_NORM_EPS,
};

/// One case's inputs, x and y already rounded to the storage dtype (kept as f32 values), so
/// both sides see the same numbers.
struct Inputs {
    shape: MhcShape,
    tokens: usize,
    x: Vec<f32>,
    y: Vec<f32>,
    phi: Vec<f32>,
    alpha: Vec<f32>,
    b: Vec<f32>,
    w_post: Vec<f32>,
    w_pre: Vec<f32>,
}

fn round<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| T::from_f32(a).to_f32()).collect()
}

fn inputs<T: Elem>(case: &Case, seed: u64) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (t, n, c) = (case.tokens, case.streams, case.width);
    let shape = MhcShape {
        streams: n,
        width: c,
        sinkhorn_iters: 20,
        dynamic: case.dynamic,
    };
    let k = shape.k();
    let x = round::<T>(&normal(&mut rng, t * n * c, 1.0));
    let y = round::<T>(&normal(&mut rng, t * c, 1.0));
    let w_post = normal(&mut rng, t * n * c, 1.0);
    let w_pre = normal(&mut rng, t * c, 1.0);
    // phi ~ N(0, 1/(nC)) makes P / r ~ N(0, 1); alpha = scale (+-20% per group) sets the logits'
    // size, b ~ N(0, scale^2) likewise.
    let phi = if case.dynamic {
        normal(&mut rng, n * c * k, (1.0 / (n * c) as f64).sqrt())
    } else {
        Vec::new()
    };
    let alpha: Vec<f32> = if case.dynamic {
        (0..3)
            .map(|_| (case.scale * rng.random_range(0.8..1.2)) as f32)
            .collect()
    } else {
        vec![0.0; 3]
    };
    let b = normal(&mut rng, k, case.scale);
    Inputs {
        shape,
        tokens: t,
        x,
        y,
        phi,
        alpha,
        b,
        w_post,
        w_pre,
    }
}

/// Forward outputs and gradients, as f64 (None = not produced).
struct Results {
    h: Vec<f64>,
    u: Vec<f64>,
    x_out: Vec<f64>,
    dx: Vec<f64>,
    dphi: Option<Vec<f64>>,
    dalpha: Option<Vec<f64>>,
    db: Vec<f64>,
    dy: Vec<f64>,
}

fn f64s<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f32() as f64).collect()
}

/// The fused kernels on `dev`: forward, then the backward of the loss with dL/dx' = W1 and
/// dL/du = W2 in the storage dtype (as autograd hands them to the ops), dx's parts summed on the
/// host.
fn fused<T: DeviceElem + Elem>(dev: &Device, inp: &Inputs, chaining: Chaining) -> Result<Results> {
    let to_t = |v: &[f32]| v.iter().map(|&a| T::from_f32(a)).collect::<Vec<T>>();
    let alpha_b: Vec<f32> = inp.alpha.iter().chain(&inp.b).copied().collect();
    let x = to_t(&inp.x);
    let f = SublayerF::Given;
    let mut layer = Sublayer::new(dev, inp.shape, f, chaining, &x, &inp.phi, &alpha_b)?;
    layer.forward_pre(dev)?;
    layer.y.copy_from_host(&to_t(&inp.y))?;
    layer.forward_post(dev)?;
    layer.g.copy_from_host(&to_t(&inp.w_post))?;
    layer.backward_post(dev)?;
    layer.du.copy_from_host(&to_t(&inp.w_pre))?;
    layer.backward_pre(dev)?;
    let mut dx = vec![0.0; x.len()];
    for part in layer.dx_parts() {
        for (acc, v) in dx.iter_mut().zip(part.to_host()?) {
            *acc += v.to_f32() as f64;
        }
    }
    let dalpha_b = f64s(&layer.dalpha_b.to_host()?);
    Ok(Results {
        h: f64s(&layer.h.to_host()?),
        u: f64s(&layer.u.to_host()?),
        x_out: f64s(&layer.x_out.to_host()?),
        dx,
        dphi: if inp.shape.dynamic {
            Some(f64s(&layer.dphi.to_host()?))
        } else {
            None
        },
        dalpha: Some(dalpha_b[..3].to_vec()),
        db: dalpha_b[3..].to_vec(),
        dy: f64s(&layer.dy.to_host()?),
    })
}

/// The candle-ops reference in f64 on the CPU, gradients by autograd.
fn oracle(inp: &Inputs) -> Result<Results> {
    let (t, n, c, k) = (
        inp.tokens,
        inp.shape.streams,
        inp.shape.width,
        inp.shape.k(),
    );
    let var = |v: &[f32], dims: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(
            &Tensor::from_slice(v, dims, &Cpu::Cpu)?.to_dtype(DType::F64)?,
        )?)
    };
    let x = var(&inp.x, &[t, n, c])?;
    let y = var(&inp.y, &[t, c])?;
    let phi = if inp.shape.dynamic {
        Some(var(&inp.phi, &[n * c, k])?)
    } else {
        None
    };
    let alpha = var(&inp.alpha, &[3])?;
    let b = var(&inp.b, &[k])?;
    let shape = &inp.shape;
    let h = reference::coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
    let u = reference::pre(&x, &h, shape)?;
    let x_out = reference::post(&x, &h, &y, shape)?;
    let w_post = Tensor::from_slice(&inp.w_post, (t, n, c), &Cpu::Cpu)?.to_dtype(DType::F64)?;
    let w_pre = Tensor::from_slice(&inp.w_pre, (t, c), &Cpu::Cpu)?.to_dtype(DType::F64)?;
    let loss = ((&x_out * w_post)?.sum_all()? + (&u * w_pre)?.sum_all()?)?;
    let grads = loss.backward()?;
    let flat = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
    let grad = |v: &Var| -> Result<Option<Vec<f64>>> { grads.get(v).map(flat).transpose() };
    Ok(Results {
        h: flat(&h)?,
        u: flat(&u)?,
        x_out: flat(&x_out)?,
        dx: grad(&x)?.context("x has no gradient")?,
        dphi: match &phi {
            Some(phi) => grad(phi)?,
            None => None,
        },
        dalpha: grad(&alpha)?,
        db: grad(&b)?.context("b has no gradient")?,
        dy: grad(&y)?.context("y has no gradient")?,
    })
}

/// The relative error of each output and gradient, for the unchained ops and then, with names
/// prefixed "c", for the chained sublayer backward.
fn check_case(dev: &Device, case: &Case, seed: u64) -> Result<Vec<(String, f64)>> {
    let mut errors = Vec::new();
    for (chaining, prefix) in [(Chaining::Unchained, ""), (Chaining::Chained, "c")] {
        let (fused, oracle) = match case.dtype {
            DType::F32 => {
                let inp = inputs::<f32>(case, seed);
                (fused::<f32>(dev, &inp, chaining)?, oracle(&inp)?)
            }
            DType::BF16 => {
                let inp = inputs::<bf16>(case, seed);
                (fused::<bf16>(dev, &inp, chaining)?, oracle(&inp)?)
            }
            other => bail!("selftest: storage dtype {other:?} is not supported"),
        };
        type Pair<'a> = (&'static str, Option<&'a [f64]>, Option<&'a [f64]>);
        let pairs: [Pair; 8] = [
            ("H", Some(&fused.h), Some(&oracle.h)),
            ("u", Some(&fused.u), Some(&oracle.u)),
            ("x'", Some(&fused.x_out), Some(&oracle.x_out)),
            ("dx", Some(&fused.dx), Some(&oracle.dx)),
            ("dphi", fused.dphi.as_deref(), oracle.dphi.as_deref()),
            ("dalpha", fused.dalpha.as_deref(), oracle.dalpha.as_deref()),
            ("db", Some(&fused.db), Some(&oracle.db)),
            ("dy", Some(&fused.dy), Some(&oracle.dy)),
        ];
        for (name, a, b) in pairs {
            errors.push((format!("{prefix}{name}"), rel_err(name, a, b)?));
        }
    }
    Ok(errors)
}

/// One RMSNorm case on `dev` against the f64 oracle: y, dx and dgamma of sum(w * y).
fn check_rms_norm<T: DeviceElem + Elem>(
    dev: &Device,
    dims: &[usize],
    seed: u64,
) -> Result<Vec<(&'static str, f64)>> {
    let inp = RmsNormInputs::new(dims, <T as DeviceElem>::DTYPE, seed)?;
    let c = inp.gamma.len();
    let to_t = |v: &[f32]| v.iter().map(|&a| T::from_f32(a)).collect::<Vec<T>>();
    let mut norm = RmsNorm::new::<T>(dev, inp.x.len() / c, c, RMS_NORM_EPS)?;
    let x = dev.upload(&to_t(&inp.x))?;
    let gamma = dev.upload(&inp.gamma)?;
    let mut y = dev.alloc_out::<T>(inp.x.len())?;
    norm.forward(dev, &x, &gamma, &mut y)?;
    // dL/dy = w in the storage dtype, as autograd hands it to the op.
    let dy = dev.upload(&to_t(&inp.w))?;
    let mut dx = dev.alloc_out::<T>(inp.x.len())?;
    let mut dgamma = dev.alloc_out::<f32>(c)?;
    norm.backward(dev, &x, &gamma, &dy, &mut dx, &mut dgamma)?;
    let fused = [
        f64s(&y.to_host()?),
        f64s(&dx.to_host()?),
        f64s(&dgamma.to_host()?),
    ];
    rms_norm_errors(&fused, &inp.oracle(dims)?)
}

/// Runs every case on AMD GPU 0 (inputs from `seed`, else a fresh one), one line per case and a
/// closing "N passed, M failed" line; an error if any case fails or no AMD GPU is there.
pub fn selftest(seed: Option<u64>) -> Result<()> {
    let dev = Device::open(0)?;
    dev.set_poison_outputs(true);
    let run_seed = run_seed(seed);
    println!(
        "hip selftest on {} ({}, {} CUs, wave {}): fused kernels vs f64 reference, seed {run_seed}",
        dev.name, dev.arch, dev.limits.multiprocessors, dev.limits.wave
    );
    let mut tally = Tally::default();
    for (i, case) in cases().iter().enumerate() {
        tally.record(
            case,
            case.dtype,
            check_case(&dev, case, case_seed(run_seed, i)),
        );
    }
    for (i, dims) in RMS_NORM_DIMS.iter().enumerate() {
        let seed = case_seed(run_seed, 1000 + i);
        let label = |dtype| rms_norm_label(dims, dtype);
        let f32_case = check_rms_norm::<f32>(&dev, dims, seed);
        tally.record(&label(DType::F32), DType::F32, f32_case);
        let bf16_case = check_rms_norm::<bf16>(&dev, dims, seed);
        tally.record(&label(DType::BF16), DType::BF16, bf16_case);
    }
    tally.finish("hip selftest")
}
