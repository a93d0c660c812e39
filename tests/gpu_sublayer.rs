//! The chained mHC sublayer (`ops::sublayer`, F = the fused RMSNorm) on the first CUDA device:
//! its dx and dphi equal the unchained ops' at training size, and (printed) the forward and
//! forward+backward times of both, and of the fused RMSNorm against its candle-ops form. Needs a
//! GPU: built only with `--features cuda`; minutes of GPU time, so ignored by default:
//! `test-gpu_sublayer-cuda --ignored --nocapture` (MHC_BENCH_TOKENS picks the sizes).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use mhc_train::gpu::bench::SeedGradient;
use mhc_train::mhc::apply::{rms_norm, RMS_NORM_EPS};
use mhc_train::mhc::layer::split_alpha_b;
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

/// One dynamic sublayer's inputs at n = 4 (bf16 x, f32 parameters) and an upstream gradient g.
struct Sublayer {
    shape: MhcShape,
    x: Var,
    phi: Var,
    /// [3 + k] = (alpha | b), one parameter as the trainer's layer holds it.
    alpha_b: Var,
    gamma: Var,
    g: Tensor,
}

impl Sublayer {
    fn new(device: &Device, tokens: usize, width: usize) -> anyhow::Result<Self> {
        let shape = MhcShape {
            streams: 4,
            width,
            sinkhorn_iters: 20,
            dynamic: true,
        };
        let (n, k) = (shape.streams, shape.k());
        let randn = |std: f32, dims: &[usize]| Tensor::randn(0f32, std, dims, device);
        Ok(Self {
            shape,
            x: Var::from_tensor(&randn(1.0, &[tokens, n, width])?.to_dtype(DType::BF16)?)?,
            phi: Var::from_tensor(&randn((1.0 / (n * width) as f32).sqrt(), &[n * width, k])?)?,
            alpha_b: Var::from_tensor(&Tensor::cat(
                &[Tensor::full(0.5f32, 3, device)?, randn(1.0, &[k])?],
                0,
            )?)?,
            gamma: Var::from_tensor(&(randn(0.1, &[width])? + 1.0)?)?,
            g: randn(1.0, &[tokens, n, width])?.to_dtype(DType::BF16)?,
        })
    }

    /// x' through the chained sublayer (the trainer's path) or the three unchained ops.
    fn forward(&self, chained: bool) -> candle_core::Result<Tensor> {
        let (x, shape) = (self.x.as_tensor(), &self.shape);
        let (phi, alpha_b) = (&self.phi, self.alpha_b.as_tensor());
        let f = |u: &Tensor| rms_norm(u, &self.gamma);
        if chained {
            // The trainer's path: F's RMSNorm fused into pre.
            let norm = ops::PreNorm {
                gamma: self.gamma.as_tensor(),
                eps: RMS_NORM_EPS,
            };
            Ok(ops::sublayer_normed(x, Some(phi), alpha_b, shape, norm, |y| Ok(y.clone()))?.0)
        } else {
            let (alpha, b) = split_alpha_b(alpha_b, shape)?;
            let h = ops::coeffs(x, Some(phi), &alpha, &b, shape)?;
            ops::post(x, &h, &f(&ops::pre(x, &h, shape)?)?, shape)
        }
    }

    /// The backward of `out` seeded with g, as `mhc-train bench` runs it.
    fn backward_seeded(&self, out: &Tensor) -> candle_core::Result<()> {
        out.apply_op1(SeedGradient(self.g.clone()))?.backward()?;
        Ok(())
    }

    /// (dx, dphi) of sum(x' * g).
    fn grads(&self, chained: bool) -> anyhow::Result<(Tensor, Tensor)> {
        let grads = (self.forward(chained)? * &self.g)?.sum_all()?.backward()?;
        Ok((
            grads.get(&self.x).expect("dx").clone(),
            grads.get(&self.phi).expect("dphi").clone(),
        ))
    }
}

fn tokens_from_env() -> anyhow::Result<Vec<usize>> {
    Ok(match std::env::var("MHC_BENCH_TOKENS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![1024, 16384, 65536],
    })
}

#[test]
#[ignore]
fn chained_sublayer_timing() -> anyhow::Result<()> {
    let device = mhc_train::gpu::open_cuda(0)?;
    let c = 1280;
    println!("| T | path | fwd ms | fwd+bwd ms |");
    println!("|---|---|---|---|");
    for t in tokens_from_env()? {
        let layer = Sublayer::new(&device, t, c)?;
        let gamma = layer.gamma.as_tensor();
        let (dx_c, dphi_c) = layer.grads(true)?;
        let (dx_u, dphi_u) = layer.grads(false)?;
        let (ex, ephi) = (rel_err(&dx_c, &dx_u)?, rel_err(&dphi_c, &dphi_u)?);
        assert!(
            ex < 1e-2 && ephi < 1e-2,
            "T={t}: chained vs unchained dx {ex:e}, dphi {ephi:e}"
        );
        for chained in [false, true] {
            let fwd = median_ms(&device, || Ok(layer.forward(chained)?))?;
            let both = median_ms(&device, || layer.grads(chained))?;
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
                .broadcast_mul(gamma)?
                .to_dtype(u.dtype())
        };
        for (name, fused) in [("rms-norm candle ops", false), ("rms-norm fused", true)] {
            let f = |u: &Tensor| {
                if fused {
                    rms_norm(u, gamma)
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

/// One fused forward+backward of the chained sublayer as `mhc-train bench` times it (the
/// backward seeded with g by `SeedGradient`), for Nsight Compute: after warm-up, exactly one step
/// runs between cuProfilerStart and cuProfilerStop (`ncu --profile-from-start off` sees only its
/// kernels).
/// Prints how long the host takes to enqueue the forward and the backward, against the synced
/// wall time, so the kernels' summed time can be set against both.
#[test]
#[ignore]
fn chained_sublayer_one_step_profile() -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
    let device = mhc_train::gpu::open_cuda(0)?;
    let c = std::env::var("MHC_BENCH_WIDTHS").map_or(Ok(1280), |v| v.trim().parse())?;
    for t in tokens_from_env()? {
        let layer = Sublayer::new(&device, t, c)?;
        let mut rows = Vec::new();
        for _ in 0..12 {
            device.synchronize()?;
            let start = Instant::now();
            let out = layer.forward(true)?;
            let forward = start.elapsed();
            layer.backward_seeded(&out)?;
            let enqueued = start.elapsed();
            device.synchronize()?;
            rows.push((forward, enqueued - forward, start.elapsed()));
        }
        rows.sort_by_key(|r| r.2);
        let (fwd, bwd, wall) = rows[rows.len() / 2];
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "T={t} C={c}: host enqueue fwd {:.3} ms, bwd {:.3} ms; synced wall {:.3} ms (median of 12)",
            ms(fwd),
            ms(bwd),
            ms(wall)
        );
        device.synchronize()?;
        profiler_start()?;
        let out = layer.forward(true)?;
        layer.backward_seeded(&out)?;
        device.synchronize()?;
        profiler_stop()?;
    }
    Ok(())
}
