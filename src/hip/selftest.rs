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
use anyhow::{bail, Result};
use candle_core::DType;
use half::bf16;

use crate::gpu::cases::{
    case_seed, cases, mhc_errors, rms_norm_errors, rms_norm_label, run_seed, Case, MhcInputs,
    MhcResults, RmsNormInputs, Tally, RMS_NORM_DIMS, RMS_NORM_EPS,
};

fn f64s<T: Elem>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f32() as f64).collect()
}

/// The fused kernels on `dev`: forward, then the backward of the loss with dL/dx' = W1 and
/// dL/du = W2 in the storage dtype (as autograd hands them to the ops), dx's parts summed on the
/// host. `normed`: F = RMSNorm fused into pre instead of a given y, and dL/dx' = W1 alone
/// (`MhcInputs::oracle`).
fn fused<T: DeviceElem + Elem>(
    dev: &Device,
    inp: &MhcInputs,
    chaining: Chaining,
    normed: bool,
) -> Result<MhcResults> {
    let to_t = |v: &[f32]| v.iter().map(|&a| T::from_f32(a)).collect::<Vec<T>>();
    let alpha_b: Vec<f32> = inp.alpha.iter().chain(&inp.b).copied().collect();
    let x = to_t(&inp.x);
    let f = if normed {
        SublayerF::RmsNorm {
            gamma: &inp.gamma,
            eps: RMS_NORM_EPS,
        }
    } else {
        SublayerF::Given
    };
    let phi = inp.phi.as_deref().unwrap_or_default();
    let mut layer = Sublayer::new(dev, inp.shape, f, chaining, &x, phi, &alpha_b)?;
    layer.forward_pre(dev)?;
    if !normed {
        layer.y.copy_from_host(&to_t(&inp.y))?;
    }
    layer.forward_post(dev)?;
    layer.g.copy_from_host(&to_t(&inp.w_post))?;
    layer.backward_post(dev)?;
    if !normed {
        layer.du.copy_from_host(&to_t(&inp.w_pre))?;
    }
    layer.backward_pre(dev)?;
    let mut dx = vec![0.0; x.len()];
    for part in layer.dx_parts() {
        for (acc, v) in dx.iter_mut().zip(part.to_host()?) {
            *acc += v.to_f32() as f64;
        }
    }
    let dalpha_b = f64s(&layer.dalpha_b.to_host()?);
    Ok(MhcResults {
        h: f64s(&layer.h.to_host()?),
        u: f64s(&(if normed { &layer.y } else { &layer.u }).to_host()?),
        x_out: f64s(&layer.x_out.to_host()?),
        dx,
        dphi: if inp.shape.dynamic {
            Some(f64s(&layer.dphi.to_host()?))
        } else {
            None
        },
        dalpha: Some(dalpha_b[..3].to_vec()),
        db: dalpha_b[3..].to_vec(),
        dy: (!normed)
            .then(|| layer.dy.to_host().map(|v| f64s(&v)))
            .transpose()?,
        dgamma: layer
            .dgamma()
            .map(|d| d.to_host().map(|v| f64s(&v)))
            .transpose()?,
    })
}

/// The relative error of each output and gradient, for the unchained ops and then, with names
/// prefixed "c", for the chained sublayer backward and, prefixed "n", for the chained sublayer
/// with F = RMSNorm fused into pre.
fn check_case(dev: &Device, case: &Case, seed: u64) -> Result<Vec<(String, f64)>> {
    let inp = MhcInputs::new(case, seed)?;
    let (oracle, oracle_normed) = (inp.oracle(false)?, inp.oracle(true)?);
    let mut errors = Vec::new();
    let runs = [
        (Chaining::Unchained, false, "", &oracle),
        (Chaining::Chained, false, "c", &oracle),
        (Chaining::Chained, true, "n", &oracle_normed),
    ];
    for (chaining, normed, prefix, oracle) in runs {
        let fused = match case.dtype {
            DType::F32 => fused::<f32>(dev, &inp, chaining, normed)?,
            DType::BF16 => fused::<bf16>(dev, &inp, chaining, normed)?,
            other => bail!("selftest: storage dtype {other:?} is not supported"),
        };
        errors.extend(mhc_errors(prefix, &fused, oracle)?);
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
    tally.finish(&format!(
        "hip selftest (--seed {run_seed} repeats these inputs)"
    ))
}
