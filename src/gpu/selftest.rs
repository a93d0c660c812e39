//! The fused mHC kernels on a CUDA device against the candle-ops reference in f64 on the CPU
//! (spec/mhc.md, "Numerics and tests"): forward outputs (H, u, x') and every gradient (x, phi,
//! alpha, b, y) of the loss sum(W1 * x') + sum(W2 * u), and with F = RMSNorm fused into pre
//! (y = RMSNorm(u) * gamma in u's place, dgamma in y's) of sum(W1 * x'); relative error
//! ||out - ref|| / ||ref|| below 1e-5 for f32 storage and 1e-2 for bf16 storage, over
//! f32/bf16, n in {2, 4, 8}, odd and vector-aligned C, several T, logit scales 0.01 / 1 / 3,
//! static and dynamic mode. Every output
//! buffer the kernels write is NaN-poisoned first (`set_poison_outputs`), and every element is
//! checked finite: a NaN or an unwritten element never passes.

use super::mhc::set_poison_outputs;
use crate::mhc::ops;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};

use super::cases::{
    case_seed, cases, mhc_errors, rms_norm_errors, rms_norm_label, run_seed, Case, MhcInputs,
    MhcResults, RmsNormInputs, Tally, RMS_NORM_DIMS, RMS_NORM_EPS,
};

/// The fused ops on `device` (one by one, or as the chained sublayer), then the backward of
/// sum(W1 * x') + sum(W2 * u) in f32 by candle's autograd, with x and y in `storage` dtype and
/// the parameters in f32; every result read back as f64.
fn fused(
    inp: &MhcInputs,
    device: &Device,
    chaining: Chaining,
    storage: DType,
) -> anyhow::Result<MhcResults> {
    let shape = &inp.shape;
    let (t, n, c, k) = (inp.tokens, shape.streams, shape.width, shape.k());
    let tensor = |v: &[f32], dims: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_slice(v, dims, device)?)
    };
    let var = |v: &[f32], dims: &[usize], dtype: DType| -> anyhow::Result<Var> {
        Ok(Var::from_tensor(&tensor(v, dims)?.to_dtype(dtype)?)?)
    };
    let x = var(&inp.x, &[t, n, c], storage)?;
    let y = var(&inp.y, &[t, c], storage)?;
    let phi = inp
        .phi
        .as_ref()
        .map(|p| var(p, &[n * c, k], DType::F32))
        .transpose()?;
    let alpha = var(&inp.alpha, &[3], DType::F32)?;
    let b = var(&inp.b, &[k], DType::F32)?;
    let gamma = var(&inp.gamma, &[c], DType::F32)?;
    let (h, u, x_out) = match chaining {
        Chaining::Normed => {
            // F = the RMSNorm alone: g hands y_n back, reported in u's place.
            let mut y_n = None;
            let alpha_b = Tensor::cat(&[alpha.as_tensor(), b.as_tensor()], 0)?;
            let norm = ops::PreNorm {
                gamma: gamma.as_tensor(),
                eps: RMS_NORM_EPS,
            };
            let (x_out, h) =
                ops::sublayer_normed(&x, phi.as_deref(), &alpha_b, shape, norm, |y_in| {
                    y_n = Some(y_in.clone());
                    Ok(y_in.clone())
                })?;
            (h, y_n.context("sublayer did not call F")?, x_out)
        }
        Chaining::Chained => {
            // F hands back the independent y and keeps u for the loss.
            let mut u = None;
            let alpha_b = Tensor::cat(&[alpha.as_tensor(), b.as_tensor()], 0)?;
            let (x_out, h) = ops::sublayer(&x, phi.as_deref(), &alpha_b, shape, |u_in| {
                u = Some(u_in.clone());
                Ok(y.as_tensor().clone())
            })?;
            (h, u.context("sublayer did not call F")?, x_out)
        }
        Chaining::Unchained => {
            let h = ops::coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
            (
                h.clone(),
                ops::pre(&x, &h, shape)?,
                ops::post(&x, &h, &y, shape)?,
            )
        }
    };
    let mut loss = (x_out.to_dtype(DType::F32)? * tensor(&inp.w_post, &[t, n, c])?)?.sum_all()?;
    if chaining != Chaining::Normed {
        loss = (loss + (u.to_dtype(DType::F32)? * tensor(&inp.w_pre, &[t, c])?)?.sum_all()?)?;
    }
    let grads = loss.backward()?;
    let host = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
    };
    let grad = |v: &Var| -> anyhow::Result<Option<Vec<f64>>> { grads.get(v).map(host).transpose() };
    Ok(MhcResults {
        dx: grad(&x)?.context("x has no gradient")?,
        dphi: phi.as_ref().map(grad).transpose()?.flatten(),
        dalpha: grad(&alpha)?,
        db: grad(&b)?.context("b has no gradient")?,
        dy: match chaining {
            Chaining::Normed => None,
            _ => Some(grad(&y)?.context("y has no gradient")?),
        },
        dgamma: match chaining {
            Chaining::Normed => Some(grad(&gamma)?.context("gamma has no gradient")?),
            _ => None,
        },
        h: host(&h)?,
        u: host(&u)?,
        x_out: host(&x_out)?,
    })
}

/// The fused ops one by one (candle adds their three dx), as one chained sublayer
/// (`ops::sublayer`: dx written once), or chained with F = RMSNorm fused into pre
/// (`ops::sublayer_normed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaining {
    Unchained,
    Chained,
    Normed,
}

/// Runs one case; returns each quantity's relative error, for the unchained ops and then, with
/// names prefixed "c", for the chained sublayer and, prefixed "n", for the chained sublayer
/// with its RMSNorm fused into pre.
fn check(case: &Case, seed: u64, device: &Device) -> anyhow::Result<Vec<(String, f64)>> {
    let inp = MhcInputs::new(case, seed)?;
    let (oracle, oracle_normed) = (inp.oracle(false)?, inp.oracle(true)?);
    let runs = [
        (Chaining::Unchained, "", &oracle),
        (Chaining::Chained, "c", &oracle),
        (Chaining::Normed, "n", &oracle_normed),
    ];
    let mut errs = Vec::new();
    for (chaining, prefix, oracle) in runs {
        let fused = fused(&inp, device, chaining, case.dtype)?;
        errs.extend(mhc_errors(prefix, &fused, oracle)?);
    }
    Ok(errs)
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
    tally.finish(&format!(
        "gpu selftest (--seed {run_seed} repeats these inputs)"
    ))
}
