//! The chained mHC sublayer (`ops::sublayer`, F = the fused RMSNorm) on the first CUDA device:
//! its dx and dphi equal the unchained ops' at training size, and (printed) the forward and
//! forward+backward times of both, and of the fused RMSNorm against its candle-ops form. Needs a
//! GPU: built only with `--features cuda`; minutes of GPU time, so ignored by default:
//! `test-gpu_sublayer-cuda --ignored --nocapture` (MHC_BENCH_TOKENS picks the sizes).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use mhc_train::mhc::apply::{rms_norm, RMS_NORM_EPS};
use mhc_train::mhc::{ops, MhcShape};
use std::time::Instant;

/// Median wall time of `f` in ms (device synchronised around each run), after 3 warm-up runs.
fn median_ms<R>(device: &Device, mut f: impl FnMut() -> anyhow::Result<R>) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm).sqrt())
}

#[test]
#[ignore]
fn chained_sublayer_timing() -> anyhow::Result<()> {
    let device = mhc_train::gpu::open_cuda(0)?;
    let tokens: Vec<usize> = match std::env::var("MHC_BENCH_TOKENS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![1024, 16384, 65536],
    };
    let (n, c) = (4, 1280);
    println!("| T | path | fwd ms | fwd+bwd ms |");
    println!("|---|---|---|---|");
    for &t in &tokens {
        let shape = MhcShape {
            streams: n,
            width: c,
            sinkhorn_iters: 20,
            dynamic: true,
        };
        let k = shape.k();
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (t, n, c), &device)?.to_dtype(DType::BF16)?,
        )?;
        let phi = Var::from_tensor(&Tensor::randn(
            0f32,
            (1.0 / (n * c) as f32).sqrt(),
            (n * c, k),
            &device,
        )?)?;
        let alpha = Var::from_tensor(&Tensor::full(0.5f32, 3, &device)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, k, &device)?)?;
        let gamma = Var::from_tensor(&(Tensor::randn(0f32, 0.1, c, &device)? + 1.0)?)?;
        let g = Tensor::randn(0f32, 1.0, (t, n, c), &device)?.to_dtype(DType::BF16)?;
        let forward = |chained: bool| -> candle_core::Result<Tensor> {
            if chained {
                Ok(ops::sublayer(&x, Some(&phi), &alpha, &b, &shape, |u| rms_norm(u, &gamma))?.0)
            } else {
                let h = ops::coeffs(&x, Some(&phi), &alpha, &b, &shape)?;
                let y = rms_norm(&ops::pre(&x, &h, &shape)?, &gamma)?;
                ops::post(&x, &h, &y, &shape)
            }
        };
        let grads = |chained: bool| -> anyhow::Result<(Tensor, Tensor)> {
            let out = forward(chained)?;
            let grads = (out * &g)?.sum_all()?.backward()?;
            Ok((
                grads.get(&x).expect("dx").clone(),
                grads.get(&phi).expect("dphi").clone(),
            ))
        };
        let (dx_c, dphi_c) = grads(true)?;
        let (dx_u, dphi_u) = grads(false)?;
        let (ex, ephi) = (rel_err(&dx_c, &dx_u)?, rel_err(&dphi_c, &dphi_u)?);
        assert!(
            ex < 1e-2 && ephi < 1e-2,
            "T={t}: chained vs unchained dx {ex:e}, dphi {ephi:e}"
        );
        for chained in [false, true] {
            let fwd = median_ms(&device, || Ok(forward(chained)?))?;
            let both = median_ms(&device, || grads(chained))?;
            let path = if chained { "chained" } else { "unchained" };
            println!("| {t} | {path} | {fwd:.3} | {both:.3} |");
        }
        // F alone: fused RMSNorm vs its candle-ops form, u [T, C] bf16.
        let u =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, c), &device)?.to_dtype(DType::BF16)?)?;
        let dy = Tensor::randn(0f32, 1.0, (t, c), &device)?.to_dtype(DType::BF16)?;
        let candle_norm = |u: &Tensor| -> candle_core::Result<Tensor> {
            let u32 = u.to_dtype(DType::F32)?;
            let ms = u32.sqr()?.mean_keepdim(D::Minus1)?;
            u32.broadcast_div(&(ms + RMS_NORM_EPS)?.sqrt()?)?
                .broadcast_mul(&gamma)?
                .to_dtype(u.dtype())
        };
        for (name, fused) in [("rms-norm candle ops", false), ("rms-norm fused", true)] {
            let f = |u: &Tensor| {
                if fused {
                    rms_norm(u, &gamma)
                } else {
                    candle_norm(u)
                }
            };
            let fwd = median_ms(&device, || Ok(f(&u)?))?;
            let both = median_ms(&device, || {
                let y = f(&u)?;
                Ok((y * &dy)?.sum_all()?.backward()?)
            })?;
            println!("| {t} | {name} | {fwd:.3} | {both:.3} |");
        }
    }
    Ok(())
}
