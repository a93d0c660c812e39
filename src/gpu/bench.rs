//! Timing of one mHC sublayer with F = RMSNorm on a CUDA device, fused kernels against the
//! candle-ops reference: forward and forward+backward, with CUDA events around each call, warm-up
//! first, the L2 cache flushed (a 256 MB write) before every timed call, medians of `reps`. The
//! device's memory pool keeps freed memory (`keep_freed_memory`), as a trainer's should.
//!
//! Bytes floor (what an ideal implementation must move through device memory, per call):
//! with X = T*n*C and U = T*C elements of the storage dtype,
//! - forward: read x for the coefficients and the aggregate (X), F reads u and writes y (2U),
//!   pre writes u (U), post reads x and y, writes x' (2X + U): 3X + 4U;
//! - backward: post reads g, x, y, writes dx, dy (3X + 2U), F reads dy, u, writes du (3U), pre and
//!   coeffs read x, du and add into dx (3X + U): 6X + 6U; so forward+backward 9X + 10U.
//!
//! Coefficients, parameters and their gradients are O(T*k + n*C*k) and left out.

use crate::mhc::apply::rms_norm;
use crate::mhc::{ops, reference, MhcShape};
use anyhow::{bail, Context};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

/// Bytes of the L2 flush write: well above the 50-60 MB L2 of an H100/H200.
const FLUSH_BYTES: usize = 256 << 20;

struct Timer {
    stream: Arc<CudaStream>,
    flush: Tensor,
}

impl Timer {
    fn new(device: &Device) -> anyhow::Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("bench: needs a CUDA device, got {:?}", device.location())
        };
        // As a trainer should: without it every large output is re-mapped on each call.
        super::mhc::keep_freed_memory(dev)?;
        Ok(Self {
            stream: dev.cuda_stream(),
            flush: Tensor::zeros(FLUSH_BYTES / 4, DType::F32, device)?,
        })
    }

    /// Median device time in ms of `f` over `reps` calls after 2 warm-up calls; L2 flushed
    /// before each call.
    fn median_ms(
        &self,
        reps: usize,
        mut f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        for _ in 0..2 {
            f()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            // A fresh write of the whole flush buffer evicts x and friends from L2.
            let _ = self.flush.affine(1.0, 1.0)?;
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.stream.record_event(flags).w()?;
            f()?;
            let end = self.stream.record_event(flags).w()?;
            times.push(start.elapsed_ms(&end).w()? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written) of a 1 GiB buffer into
/// a preallocated one.
fn copy_bandwidth(device: &Device, timer: &Timer) -> anyhow::Result<f64> {
    let Device::Cuda(dev) = device else {
        bail!("bench: needs a CUDA device")
    };
    let len = (1usize << 30) / 4;
    let src = Tensor::ones(len, DType::F32, device)?;
    let (storage, _) = src.storage_and_layout();
    let candle_core::Storage::Cuda(storage) = &*storage else {
        bail!("bench: tensor is not on the CUDA device")
    };
    let src_slice = storage.as_cuda_slice::<f32>()?;
    let mut dst = dev.alloc_zeros::<f32>(len)?;
    let ms = timer.median_ms(10, || {
        dev.memcpy_dtod(src_slice, &mut dst)?;
        Ok(())
    })?;
    Ok(2.0 * (len * 4) as f64 / (ms * 1e-3) / 1e9)
}

struct Sublayer {
    shape: MhcShape,
    x: Var,
    phi: Option<Var>,
    alpha: Var,
    b: Var,
    gamma: Var,
}

impl Sublayer {
    fn new(
        device: &Device,
        dtype: DType,
        tokens: usize,
        width: usize,
        streams: usize,
        dynamic: bool,
    ) -> anyhow::Result<Self> {
        let shape = MhcShape {
            streams,
            width,
            sinkhorn_iters: 20,
            dynamic,
        };
        let (n, k) = (streams, shape.k());
        let x = Tensor::randn(0f32, 1.0, (tokens, n, width), device)?.to_dtype(dtype)?;
        let phi = dynamic
            .then(|| {
                Tensor::randn(
                    0f32,
                    (1.0 / (n * width) as f32).sqrt(),
                    (n * width, k),
                    device,
                )
            })
            .transpose()?;
        let alpha_value = if dynamic { 0.5f32 } else { 0.0 };
        Ok(Self {
            shape,
            x: Var::from_tensor(&x)?,
            phi: phi.map(|p| Var::from_tensor(&p)).transpose()?,
            alpha: Var::from_tensor(&Tensor::full(alpha_value, 3, device)?)?,
            b: Var::from_tensor(&Tensor::randn(0f32, 1.0, k, device)?)?,
            gamma: Var::from_tensor(&Tensor::ones(width, DType::F32, device)?)?,
        })
    }

    /// x' of the sublayer, through the fused ops or the reference.
    fn forward(&self, fused: bool) -> candle_core::Result<Tensor> {
        let (x, shape) = (self.x.as_tensor(), &self.shape);
        let phi = self.phi.as_ref().map(|p| p.as_tensor());
        let (alpha, b) = (self.alpha.as_tensor(), self.b.as_tensor());
        if fused {
            let h = ops::coeffs(x, phi, alpha, b, shape)?;
            let y = rms_norm(&ops::pre(x, &h, shape)?, self.gamma.as_tensor())?;
            ops::post(x, &h, &y, shape)
        } else {
            let h = reference::coeffs(x, phi, alpha, b, shape)?;
            let y = rms_norm(&reference::pre(x, &h, shape)?, self.gamma.as_tensor())?;
            reference::post(x, &h, &y, shape)
        }
    }
}

/// The markdown table of fused vs reference timings for every (T, C, dtype, mode), n streams.
pub fn bench_mhc(
    device: &Device,
    tokens: &[usize],
    widths: &[usize],
    streams: usize,
    reps: usize,
) -> anyhow::Result<String> {
    let timer = Timer::new(device)?;
    let copy_gbs = copy_bandwidth(device, &timer).context("bench: copy bandwidth")?;
    let mut out = format!(
        "mHC sublayer (F = RMSNorm), n = {streams}, median of {reps}, L2 flushed; device-to-device \
         copy {copy_gbs:.0} GB/s (read + write). Floor bytes: fwd 3X + 4U, fwd+bwd 9X + 10U \
         (X = T*n*C, U = T*C elements); % = floor time at copy bandwidth / measured time.\n\n\
         | T | C | dtype | mode | impl | fwd ms | fwd GB/s | fwd % | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for &t in tokens {
        for &c in widths {
            for dtype in [DType::BF16, DType::F32] {
                for dynamic in [true, false] {
                    let elem = dtype.size_in_bytes() as f64;
                    let (x_bytes, u_bytes) =
                        ((t * streams * c) as f64 * elem, (t * c) as f64 * elem);
                    let floor_fwd = 3.0 * x_bytes + 4.0 * u_bytes;
                    let floor_all = 9.0 * x_bytes + 10.0 * u_bytes;
                    let layer = match Sublayer::new(device, dtype, t, c, streams, dynamic) {
                        Ok(layer) => layer,
                        Err(err) => {
                            out.push_str(&format!(
                                "| {t} | {c} | {dtype:?} | - | - | setup failed: {err} |\n"
                            ));
                            continue;
                        }
                    };
                    for fused in [true, false] {
                        let fwd = timer.median_ms(reps, || {
                            layer.forward(fused)?;
                            Ok(())
                        });
                        let all = timer.median_ms(reps, || {
                            layer.forward(fused)?.backward()?;
                            Ok(())
                        });
                        let cell = |r: &anyhow::Result<f64>, floor: f64| match r {
                            Ok(ms) => format!(
                                "{ms:.3} | {:.0} | {:.0}",
                                floor / (ms * 1e-3) / 1e9,
                                100.0 * floor / (copy_gbs * 1e9) / (ms * 1e-3)
                            ),
                            Err(err) => format!("error: {err} | - | -"),
                        };
                        out.push_str(&format!(
                            "| {t} | {c} | {} | {} | {} | {} | {} |\n",
                            format!("{dtype:?}").to_lowercase(),
                            if dynamic { "dynamic" } else { "static" },
                            if fused { "fused" } else { "reference" },
                            cell(&fwd, floor_fwd),
                            cell(&all, floor_all),
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Per-kernel table: each fused op alone (forward, and its backward launch layer), dynamic mode,
/// with the bytes it must move (X = T*n*C, U = T*C elements): coeffs fwd X, bwd 2X (read x, write
/// dx); pre fwd X + U, bwd 2X + U; post fwd 2X + U, bwd 3X + 2U.
pub fn bench_ops(
    device: &Device,
    tokens: usize,
    width: usize,
    streams: usize,
    reps: usize,
) -> anyhow::Result<String> {
    let timer = Timer::new(device)?;
    let copy_gbs = copy_bandwidth(device, &timer)?;
    let mut out = format!(
        "Fused ops alone, T = {tokens}, n = {streams}, C = {width}, dynamic, median of {reps}, \
         L2 flushed; copy {copy_gbs:.0} GB/s.\n\n| dtype | op | ms | GB/s | % of copy |\n|---|---|---|---|---|\n"
    );
    for dtype in [DType::BF16, DType::F32] {
        let layer = Sublayer::new(device, dtype, tokens, width, streams, true)?;
        let shape = layer.shape;
        let x = layer.x.as_tensor().detach();
        let phi = layer
            .phi
            .as_ref()
            .context("dynamic layer has phi")?
            .as_tensor()
            .detach();
        let alpha_b = Tensor::cat(&[layer.alpha.as_tensor(), layer.b.as_tensor()], 0)?.detach();
        let ext = x.apply_op3(&phi, &alpha_b, ops::CoeffsOp { shape })?;
        let h = ext.narrow(1, 0, shape.k())?.contiguous()?;
        let d_ext = Tensor::randn(0f32, 1.0, ext.dims(), device)?;
        let y = Tensor::randn(0f32, 1.0, (tokens, width), device)?.to_dtype(dtype)?;
        let g = Tensor::randn(0f32, 1.0, x.dims(), device)?.to_dtype(dtype)?;
        let elem = dtype.size_in_bytes() as f64;
        let (xb, ub) = (
            (tokens * streams * width) as f64 * elem,
            (tokens * width) as f64 * elem,
        );
        type Step<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
        let steps: [(&str, f64, Step); 6] = [
            (
                "coeffs fwd",
                xb,
                Box::new(|| {
                    x.apply_op3(&phi, &alpha_b, ops::CoeffsOp { shape })?;
                    Ok(())
                }),
            ),
            (
                "coeffs bwd",
                2.0 * xb,
                Box::new(|| {
                    super::mhc::coeffs_backward(&shape, &x, &phi, &alpha_b, &ext, &d_ext)?;
                    Ok(())
                }),
            ),
            (
                "pre fwd",
                xb + ub,
                Box::new(|| {
                    ops::pre(&x, &h, &shape)?;
                    Ok(())
                }),
            ),
            (
                "pre bwd",
                2.0 * xb + ub,
                Box::new(|| {
                    super::mhc::pre_backward(&shape, &x, &h, &y)?;
                    Ok(())
                }),
            ),
            (
                "post fwd",
                2.0 * xb + ub,
                Box::new(|| {
                    ops::post(&x, &h, &y, &shape)?;
                    Ok(())
                }),
            ),
            (
                "post bwd",
                3.0 * xb + 2.0 * ub,
                Box::new(|| {
                    super::mhc::post_backward(&shape, &x, &h, &y, &g)?;
                    Ok(())
                }),
            ),
        ];
        for (name, bytes, step) in steps.iter() {
            let ms = timer.median_ms(reps, step)?;
            let gbs = bytes / (ms * 1e-3) / 1e9;
            out.push_str(&format!(
                "| {} | {name} | {ms:.4} | {gbs:.0} | {:.0} |\n",
                format!("{dtype:?}").to_lowercase(),
                100.0 * gbs / copy_gbs
            ));
        }
    }
    Ok(out)
}
