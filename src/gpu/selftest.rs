//! The fused mHC kernels on a CUDA device against the candle-ops reference in f64 on the CPU
//! (spec/mhc.md, "Numerics and tests"): forward outputs (H, u, x') and every gradient (x, phi,
//! alpha, b, y) of the loss sum(W1 * x') + sum(W2 * u), relative error ||out - ref|| / ||ref||
//! below 1e-5 for f32 storage and 1e-2 for bf16 storage, over f32/bf16, n in {2, 4, 8}, odd and
//! vector-aligned C, several T, logit scales 0.01 / 1 / 3, static and dynamic mode. Every output
//! buffer the kernels write is NaN-poisoned first (`set_poison_outputs`), and every element is
//! checked finite: a NaN or an unwritten element never passes.

use super::mhc::set_poison_outputs;
use crate::mhc::{ops, reference, MhcShape};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cases::{
    self, case_seed, cases, normal, rms_norm_errors, rms_norm_label, run_seed, Case, RmsNormInputs,
    Tally, RMS_NORM_DIMS, RMS_NORM_EPS,
};

/// One case's inputs on the CPU: x, y in the storage dtype; parameters and loss weights f32.
struct Inputs {
    shape: MhcShape,
    x: Tensor,
    y: Tensor,
    phi: Option<Tensor>,
    alpha: Tensor,
    b: Tensor,
    w_post: Tensor,
    w_pre: Tensor,
}

fn inputs(case: &Case, seed: u64) -> anyhow::Result<Inputs> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cpu = Device::Cpu;
    let (t, n, c) = (case.tokens, case.streams, case.width);
    let shape = MhcShape {
        streams: n,
        width: c,
        sinkhorn_iters: 20,
        dynamic: case.dynamic,
    };
    let k = shape.k();
    // Rounded to the storage dtype once, so both sides see the same values.
    let stored = |v: Vec<f32>, dims: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(v, dims, &cpu)?.to_dtype(case.dtype)?)
    };
    let x = stored(normal(&mut rng, t * n * c, 1.0), &[t, n, c])?;
    let y = stored(normal(&mut rng, t * c, 1.0), &[t, c])?;
    let w_post = Tensor::from_vec(normal(&mut rng, t * n * c, 1.0), (t, n, c), &cpu)?;
    let w_pre = Tensor::from_vec(normal(&mut rng, t * c, 1.0), (t, c), &cpu)?;
    // phi ~ N(0, 1/(nC)) makes P / r ~ N(0, 1); alpha = scale (+-20% per group) sets the logits'
    // size, b ~ N(0, scale^2) likewise.
    let phi = if case.dynamic {
        let std = (1.0 / (n * c) as f64).sqrt();
        Some(Tensor::from_vec(
            normal(&mut rng, n * c * k, std),
            (n * c, k),
            &cpu,
        )?)
    } else {
        None
    };
    let alpha: Vec<f32> = if case.dynamic {
        (0..3)
            .map(|_| (case.scale * rng.random_range(0.8..1.2)) as f32)
            .collect()
    } else {
        vec![0.0; 3]
    };
    Ok(Inputs {
        shape,
        x,
        y,
        phi,
        alpha: Tensor::from_vec(alpha, 3, &cpu)?,
        b: Tensor::from_vec(normal(&mut rng, k, case.scale), k, &cpu)?,
        w_post,
        w_pre,
    })
}

/// Forward outputs and gradients of one implementation, all moved to f64 on the CPU.
struct Results {
    h: Tensor,
    u: Tensor,
    x_out: Tensor,
    dx: Tensor,
    dphi: Option<Tensor>,
    dalpha: Option<Tensor>,
    db: Tensor,
    dy: Tensor,
}

/// Runs coeffs -> pre, post and the backward of sum(W1 * x') + sum(W2 * u) on `device`, with x
/// and y in `storage` dtype and parameters in `param` dtype.
fn run(
    inp: &Inputs,
    device: &Device,
    fused: Option<Chaining>,
    storage: DType,
    param: DType,
) -> anyhow::Result<Results> {
    let var = |t: &Tensor, dtype: DType| -> anyhow::Result<Var> {
        Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)
    };
    let x = var(&inp.x, storage)?;
    let y = var(&inp.y, storage)?;
    let phi = inp.phi.as_ref().map(|p| var(p, param)).transpose()?;
    let alpha = var(&inp.alpha, param)?;
    let b = var(&inp.b, param)?;
    let shape = &inp.shape;
    let (h, u, x_out) = if fused == Some(Chaining::Chained) {
        // F hands back the independent y and keeps u for the loss.
        let mut u = None;
        let (x_out, h) = ops::sublayer(&x, phi.as_deref(), &alpha, &b, shape, |u_in| {
            u = Some(u_in.clone());
            Ok(y.as_tensor().clone())
        })?;
        (h, u.context("sublayer did not call F")?, x_out)
    } else if fused == Some(Chaining::Unchained) {
        let h = ops::coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
        (
            h.clone(),
            ops::pre(&x, &h, shape)?,
            ops::post(&x, &h, &y, shape)?,
        )
    } else {
        let h = reference::coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
        (
            h.clone(),
            reference::pre(&x, &h, shape)?,
            reference::post(&x, &h, &y, shape)?,
        )
    };
    let loss_dtype = param;
    let w_post = inp.w_post.to_dtype(loss_dtype)?.to_device(device)?;
    let w_pre = inp.w_pre.to_dtype(loss_dtype)?.to_device(device)?;
    let loss = ((x_out.to_dtype(loss_dtype)? * w_post)?.sum_all()?
        + (u.to_dtype(loss_dtype)? * w_pre)?.sum_all()?)?;
    let grads = loss.backward()?;
    let host = |t: &Tensor| -> anyhow::Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
    };
    let grad = |v: &Var| -> anyhow::Result<Option<Tensor>> { grads.get(v).map(host).transpose() };
    Ok(Results {
        dx: grad(&x)?.context("x has no gradient")?,
        dphi: match &phi {
            Some(phi) => grad(phi)?,
            None => None,
        },
        dalpha: grad(&alpha)?,
        db: grad(&b)?.context("b has no gradient")?,
        dy: grad(&y)?.context("y has no gradient")?,
        h: host(&h)?,
        u: host(&u)?,
        x_out: host(&x_out)?,
    })
}

/// `cases::rel_err` of two tensors (read as f64 on the CPU).
fn rel_err(name: &str, a: Option<&Tensor>, b: Option<&Tensor>) -> anyhow::Result<f64> {
    let f64s = |t: Option<&Tensor>| -> anyhow::Result<Option<Vec<f64>>> {
        Ok(match t {
            Some(t) => Some(t.flatten_all()?.to_vec1::<f64>()?),
            None => None,
        })
    };
    let (a, b) = (f64s(a)?, f64s(b)?);
    cases::rel_err(name, a.as_deref(), b.as_deref())
}

/// The fused ops one by one (candle adds their three dx) or as one chained sublayer
/// (`ops::sublayer`: dx written once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaining {
    Unchained,
    Chained,
}

/// Runs one case; returns each quantity's relative error, for the unchained ops and then, with
/// names prefixed "c", for the chained sublayer.
fn check(case: &Case, seed: u64, device: &Device) -> anyhow::Result<Vec<(String, f64)>> {
    let inp = inputs(case, seed)?;
    let oracle = run(&inp, &Device::Cpu, None, DType::F64, DType::F64)?;
    let mut errs = Vec::new();
    for (chaining, prefix) in [(Chaining::Unchained, ""), (Chaining::Chained, "c")] {
        let fused = run(&inp, device, Some(chaining), case.dtype, DType::F32)?;
        for (name, e) in compare(&fused, &oracle)? {
            errs.push((format!("{prefix}{name}"), e));
        }
    }
    Ok(errs)
}

/// Relative error of each output and gradient of `fused` against `oracle`.
fn compare(fused: &Results, oracle: &Results) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let pairs: [(&'static str, Option<&Tensor>, Option<&Tensor>); 8] = [
        ("H", Some(&fused.h), Some(&oracle.h)),
        ("u", Some(&fused.u), Some(&oracle.u)),
        ("x'", Some(&fused.x_out), Some(&oracle.x_out)),
        ("dx", Some(&fused.dx), Some(&oracle.dx)),
        ("dphi", fused.dphi.as_ref(), oracle.dphi.as_ref()),
        ("dalpha", fused.dalpha.as_ref(), oracle.dalpha.as_ref()),
        ("db", Some(&fused.db), Some(&oracle.db)),
        ("dy", Some(&fused.dy), Some(&oracle.dy)),
    ];
    pairs
        .into_iter()
        .map(|(name, a, b)| Ok((name, rel_err(name, a, b)?)))
        .collect()
}

/// One RMSNorm case (`crate::model::rms_norm` on the device vs candle ops in f64 on the CPU):
/// relative errors of y, dx and dgamma for the loss sum(w * y).
fn check_rms_norm(
    dims: &[usize],
    dtype: DType,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let inp = RmsNormInputs::new(dims, dtype, seed)?;
    let x = Var::from_tensor(&Tensor::from_slice(&inp.x, dims, device)?.to_dtype(dtype)?)?;
    let gamma = Var::from_tensor(&Tensor::from_slice(&inp.gamma, inp.gamma.len(), device)?)?;
    let y = crate::model::rms_norm::rms_norm(&x, &gamma, RMS_NORM_EPS)?;
    let w = Tensor::from_slice(&inp.w, dims, device)?;
    let grads = (y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
    let host = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
    };
    let fused = [
        host(&y)?,
        host(grads.get(&x).context("x has no gradient")?)?,
        host(grads.get(&gamma).context("gamma has no gradient")?)?,
    ];
    rms_norm_errors(&fused, &inp.oracle(dims)?)
}

/// Runs every case on `device` (a CUDA device; inputs from `seed`, else a fresh one), printing
/// one line per case and a final "N passed, M failed" line; an error if any case fails.
pub fn selftest(device: &Device, seed: Option<u64>) -> anyhow::Result<()> {
    if !device.is_cuda() {
        bail!(
            "gpu selftest: needs a CUDA device, got {:?}",
            device.location()
        )
    }
    set_poison_outputs(true);
    let run_seed = run_seed(seed);
    println!("gpu selftest: fused kernels vs f64 reference, seed {run_seed}");
    let mut tally = Tally::default();
    for (i, case) in cases().iter().enumerate() {
        tally.record(
            case,
            case.dtype,
            check(case, case_seed(run_seed, i), device),
        );
    }
    for (i, dims) in RMS_NORM_DIMS.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = case_seed(run_seed, 1000 + i);
            let result = check_rms_norm(dims, dtype, seed, device);
            tally.record(&rms_norm_label(dims, dtype), dtype, result);
        }
    }
    set_poison_outputs(false);
    tally.finish("gpu selftest")
}
