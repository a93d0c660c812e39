//! Timing on a CUDA device for `mhc-train bench`: one mHC sublayer with F = RMSNorm (fused
//! kernels against the candle-ops reference, forward and forward+backward), isolated ops
//! (RMSNorm, sigmoid), correctness of fused bf16 against the f32 reference, peak pool memory.
//! The timed backward is seeded with an upstream gradient of x' (`SeedGradient`), as a training
//! step's backward reaches the layer. CUDA events around each call, warm-up first, the L2 cache
//! flushed (an in-place 256 MB memset) before every timed call, medians of `reps`. The device's
//! memory pool keeps freed memory (`keep_freed_memory`), as a trainer's should; it is trimmed
//! between variants so each one's peak starts from its own inputs.
//!
//! Bytes floor (what an ideal implementation must move through device memory, per call):
//! with X = T*n*C and U = T*C elements of the storage dtype,
//! - forward: read x for the coefficients and the aggregate (X), F reads u and writes y (2U),
//!   pre writes u (U), post reads x and y, writes x' (2X + U): 3X + 4U;
//! - backward: post reads g, x, y, writes dx, dy (3X + 2U), F reads dy, u, writes du (3U), pre and
//!   coeffs read x, du and add into dx (3X + U): 6X + 6U; so forward+backward 9X + 10U.
//!
//! Coefficients, parameters and their gradients are O(T*k + n*C*k) and left out.

use super::mhc::CoeffsGrad;
use crate::bench::report::{
    Diff, LayerConfig, Measurement, FUSED_BF16, FUSED_F32, REF_BF16, REF_F32,
};
use crate::mhc::apply::{rms_norm, RMS_NORM_EPS};
use crate::mhc::layer::split_alpha_b;
use crate::mhc::{ops, reference, MhcShape};
use anyhow::{bail, Context};
use candle_core::cuda_backend::cudarc::driver::sys::{self, CUevent_flags};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var};
use std::sync::Arc;

/// Bytes of the L2 flush write: well above the 50-60 MB L2 of an H100/H200.
pub const FLUSH_BYTES: usize = 256 << 20;
/// Untimed calls before the timed ones (module load, cuBLAS handles, pool growth).
pub const WARMUP: usize = 2;
/// What the "fused" RMSNorm rows of the isolated-op table run.
pub const FUSED_RMS_NORM: &str = "`candle_nn::ops::rms_norm` (candle's one-kernel forward; \
     gamma in the storage dtype)";

struct Timer {
    stream: Arc<CudaStream>,
    /// Written in place before each timed call: a memset allocates nothing, so the pool's
    /// high-water mark sees only the timed work.
    flush: std::cell::RefCell<CudaSlice<u8>>,
}

impl Timer {
    fn new(device: &Device) -> anyhow::Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("bench: needs a CUDA device, got {:?}", device.location())
        };
        // As a trainer should: without it every large output is re-mapped on each call.
        super::mhc::keep_freed_memory(dev)?;
        let stream = dev.cuda_stream();
        let flush = stream.alloc_zeros::<u8>(FLUSH_BYTES).w()?;
        Ok(Self {
            stream,
            flush: std::cell::RefCell::new(flush),
        })
    }

    /// Median device time in ms of `f` over `reps` calls after `WARMUP` warm-up calls; L2
    /// flushed before each call.
    fn median_ms(
        &self,
        reps: usize,
        mut f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<f64> {
        for _ in 0..WARMUP {
            f()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            // A write of the whole flush buffer evicts x and friends from L2.
            self.stream
                .memset_zeros(&mut *self.flush.borrow_mut())
                .w()?;
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
    /// [3 + k] = (alpha | b), one parameter as the trainer's layer holds it.
    alpha_b: Var,
    gamma: Var,
    /// Upstream gradient of x' for the timed backward (`SeedGradient`).
    g: Tensor,
}

/// Seeds a backward pass with a given gradient of `out`, as a training step's backward reaches a
/// layer with the next layer's gradient: `out.apply_op1(SeedGradient(g))?.backward()`. Its
/// forward is a zero scalar and its backward hands `g` to `out` as it is. (`out.backward()` would
/// seed with a tensor of ones: a fill of x' that is no part of the layer, 110 us at T = 16384,
/// C = 1280 on an H200.)
pub struct SeedGradient(pub Tensor);

impl CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "seed-gradient"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        Ok((candle_core::CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dev = &storage.device;
        let zero = dev.alloc_zeros::<f32>(1)?;
        Ok((super::mhc::wrap(dev, zero), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
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
        let alpha_b = Tensor::cat(
            &[
                Tensor::full(alpha_value, 3, device)?,
                Tensor::randn(0f32, 1.0, k, device)?,
            ],
            0,
        )?;
        Ok(Self {
            shape,
            x: Var::from_tensor(&x)?,
            phi: phi.map(|p| Var::from_tensor(&p)).transpose()?,
            alpha_b: Var::from_tensor(&alpha_b)?,
            // Not all ones: a gamma of ones would hide a kernel that ignores it.
            gamma: Var::from_tensor(&(Tensor::randn(0f32, 0.1, width, device)? + 1.0)?)?,
            g: Tensor::randn(0f32, 1.0, (tokens, n, width), device)?.to_dtype(dtype)?,
        })
    }

    /// One forward and backward pass, the backward seeded with `g`.
    fn forward_backward(&self, fused: bool) -> candle_core::Result<()> {
        let seed = self
            .forward(fused)?
            .apply_op1(SeedGradient(self.g.clone()))?;
        seed.backward()?;
        Ok(())
    }

    /// The same sublayer with x upcast to f32 (parameters are f32 already): the reference's
    /// inputs hold exactly the values the bf16 one sees.
    fn to_f32(&self) -> candle_core::Result<Self> {
        let copy = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?.copy()?);
        Ok(Self {
            shape: self.shape,
            x: copy(&self.x)?,
            phi: self.phi.as_ref().map(copy).transpose()?,
            alpha_b: copy(&self.alpha_b)?,
            gamma: copy(&self.gamma)?,
            g: self.g.to_dtype(DType::F32)?,
        })
    }

    /// x' and the gradient of sum(x' * g) in x, both as f32.
    fn output_and_dx(&self, fused: bool, g: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let out = self.forward(fused)?.to_dtype(DType::F32)?;
        let grads = (&out * g)?.sum_all()?.backward()?;
        let dx = grads
            .get(self.x.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("bench: no gradient for x".into()))?
            .to_dtype(DType::F32)?;
        Ok((out, dx))
    }

    /// x' of the sublayer, through the fused ops or the reference.
    fn forward(&self, fused: bool) -> candle_core::Result<Tensor> {
        let (x, shape) = (self.x.as_tensor(), &self.shape);
        let phi = self.phi.as_ref().map(|p| p.as_tensor());
        let alpha_b = self.alpha_b.as_tensor();
        if fused {
            // The trainer's path: the chained sublayer (dx written once in the backward), F's
            // RMSNorm fused into pre.
            let norm = ops::PreNorm {
                gamma: self.gamma.as_tensor(),
                eps: RMS_NORM_EPS,
            };
            Ok(ops::sublayer_normed(x, phi, alpha_b, shape, norm, |y| Ok(y.clone()))?.0)
        } else {
            // The reference takes alpha and b apart (views, no copies).
            let (alpha, b) = split_alpha_b(alpha_b, shape)?;
            let h = reference::coeffs(x, phi, &alpha, &b, shape)?;
            let y = candle_ops_rms_norm(&reference::pre(x, &h, shape)?, self.gamma.as_tensor())?;
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
                            layer.forward_backward(fused)?;
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

/// F of the candle-ops variants: RMSNorm over the last axis as candle basic ops in f32 (upcast,
/// mean of squares, sqrt, divide, scale, cast back), what `mhc::apply::rms_norm` ran before the
/// fused RMSNorm op; the fused variants use `mhc::apply::rms_norm`, whatever the trainer runs.
fn candle_ops_rms_norm(u: &Tensor, gamma: &Tensor) -> candle_core::Result<Tensor> {
    let u32 = u.to_dtype(DType::F32)?;
    let rms = (u32.sqr()?.mean_keepdim(1)? + RMS_NORM_EPS)?.sqrt()?;
    u32.broadcast_div(&rms)?
        .broadcast_mul(gamma)?
        .to_dtype(u.dtype())
}

/// The CUDA driver's version as `major.minor` (cuDriverGetVersion).
pub fn driver_cuda_version() -> String {
    let mut version = 0i32;
    // SAFETY: a plain driver query with a valid out-pointer.
    match unsafe { sys::cuDriverGetVersion(&mut version) }.result() {
        Ok(()) => format!("{}.{}", version / 1000, version % 1000 / 10),
        Err(err) => format!("unknown ({err:?})"),
    }
}

/// The device's default memory pool, which candle's stream-ordered allocations come from: its
/// bytes in use and their high-water mark.
struct Pool {
    pool: sys::CUmemoryPool,
    stream: Arc<CudaStream>,
}

impl Pool {
    fn new(dev: &candle_core::CudaDevice) -> anyhow::Result<Self> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().w()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain driver query on this context's device with a valid out-pointer.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .w()?;
        Ok(Self { pool, stream })
    }

    fn attribute(&self, attribute: sys::CUmemPool_attribute) -> anyhow::Result<f64> {
        let mut value = 0u64;
        // SAFETY: the byte-count attributes are 64-bit values.
        unsafe {
            sys::cuMemPoolGetAttribute(self.pool, attribute, (&mut value as *mut u64).cast())
        }
        .result()
        .w()?;
        Ok(value as f64)
    }

    /// Bytes allocated from the pool and not yet freed.
    fn used(&self) -> anyhow::Result<f64> {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Highest `used()` since the last `reset_peak`.
    fn peak(&self) -> anyhow::Result<f64> {
        let high = self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        Ok(high.max(self.used()?))
    }

    /// Waits for pending frees, hands unused pool memory back to the device (so one variant's
    /// kept memory cannot crowd out the next) and restarts the high-water mark.
    fn reset_peak(&self) -> anyhow::Result<()> {
        self.stream.synchronize().w()?;
        // SAFETY: plain driver calls on a valid pool; the high-water mark can only be set to 0.
        unsafe { sys::cuMemPoolTrimTo(self.pool, 0) }.result().w()?;
        let mut zero = 0u64;
        unsafe {
            sys::cuMemPoolSetAttribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        }
        .result()
        .w()?;
        Ok(())
    }
}

/// The layer bench on one CUDA device: timer, pool and copy bandwidth.
pub struct Bench {
    device: Device,
    timer: Timer,
    pool: Pool,
    copy_gbs: f64,
}

impl Bench {
    pub fn new(device: &Device) -> anyhow::Result<Self> {
        let timer = Timer::new(device)?;
        let Device::Cuda(dev) = device else {
            bail!("bench: needs a CUDA device")
        };
        let pool = Pool::new(dev)?;
        let copy_gbs = copy_bandwidth(device, &timer).context("bench: copy bandwidth")?;
        Ok(Self {
            device: device.clone(),
            timer,
            pool,
            copy_gbs,
        })
    }

    /// Device-to-device copy bandwidth, GB/s (read + write).
    pub fn copy_gbs(&self) -> f64 {
        self.copy_gbs
    }

    /// Per-kernel table: each fused op alone (forward, and its backward launch layer), dynamic mode,
    /// with the bytes it must move (X = T*n*C, U = T*C elements): coeffs fwd X, bwd 2X (read x, write
    /// dx); pre fwd X + U, bwd 2X + U; post fwd 2X + U, bwd 3X + 2U; the chained sublayer's pieces:
    /// coeffs bwd summing dx 3X + U (read x, dx_post, du, write dx), pre bwd dh only X + U; F =
    /// RMSNorm fwd 2U, bwd 3U; pre with the RMSNorm fused (what the trainer runs in place of the
    /// last three) fwd X + U, bwd X + 2U (read x and dy, write du).
    pub fn ops_alone(
        &self,
        tokens: usize,
        width: usize,
        streams: usize,
        reps: usize,
    ) -> anyhow::Result<String> {
        let (device, timer, copy_gbs) = (&self.device, &self.timer, self.copy_gbs);
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
            let alpha_b = layer.alpha_b.as_tensor().detach();
            let ext = x.apply_op3(&phi, &alpha_b, ops::CoeffsOp { shape })?;
            let h = ext.narrow(1, 0, shape.k())?.contiguous()?;
            let dh = Tensor::randn(0f32, 1.0, h.dims(), device)?;
            let y = Tensor::randn(0f32, 1.0, (tokens, width), device)?.to_dtype(dtype)?;
            let g = Tensor::randn(0f32, 1.0, x.dims(), device)?.to_dtype(dtype)?;
            let grad = CoeffsGrad {
                shape: &shape,
                x: &x,
                phi: &phi,
                alpha_b: &alpha_b,
                ext: &ext,
                dh: &dh,
                dh_pre: None,
            };
            let elem = dtype.size_in_bytes() as f64;
            let (xb, ub) = (
                (tokens * streams * width) as f64 * elem,
                (tokens * width) as f64 * elem,
            );
            let gamma = layer.gamma.as_tensor();
            type Step<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
            let steps: [(&str, f64, Step); 12] = [
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
                        super::mhc::coeffs_backward(&grad)?;
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
                        super::mhc::pre_backward(&shape, &x, &h, &y, super::mhc::PreDx::Write)?;
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
                (
                    "coeffs bwd, dx summed (chained)",
                    3.0 * xb + ub,
                    Box::new(|| {
                        // pre's dh handed over as the trainer's chain does (dh stands in).
                        let grad = CoeffsGrad {
                            dh_pre: Some(&dh),
                            ..grad
                        };
                        super::chain::coeffs_backward_sum(&grad, &g, &y, &h)?;
                        Ok(())
                    }),
                ),
                (
                    "pre bwd, dh only (chained)",
                    xb + ub,
                    Box::new(|| {
                        super::mhc::pre_backward(&shape, &x, &h, &y, super::mhc::PreDx::None)?;
                        Ok(())
                    }),
                ),
                (
                    "rmsnorm fwd (F)",
                    2.0 * ub,
                    Box::new(|| {
                        rms_norm(&y, gamma)?;
                        Ok(())
                    }),
                ),
                (
                    "rmsnorm bwd (F)",
                    3.0 * ub,
                    Box::new(|| {
                        super::rms_norm::backward(RMS_NORM_EPS, &y, gamma, &y)?;
                        Ok(())
                    }),
                ),
                (
                    "pre + rmsnorm fwd (fused)",
                    xb + ub,
                    Box::new(|| {
                        let (x_g, x_l) = x.storage_and_layout();
                        let (h_g, h_l) = h.storage_and_layout();
                        let (gamma_g, gamma_l) = gamma.storage_and_layout();
                        let (Storage::Cuda(x_s), Storage::Cuda(h_s), Storage::Cuda(gamma_s)) =
                            (&*x_g, &*h_g, &*gamma_g)
                        else {
                            bail!("bench: pre + rmsnorm inputs are not on the CUDA device")
                        };
                        super::pre_norm::forward(
                            &shape,
                            RMS_NORM_EPS,
                            (x_s, x_l),
                            (h_s, h_l),
                            (gamma_s, gamma_l),
                        )?;
                        Ok(())
                    }),
                ),
                (
                    "pre + rmsnorm bwd (fused)",
                    xb + 2.0 * ub,
                    Box::new(|| {
                        super::pre_norm::backward(&shape, RMS_NORM_EPS, &x, &h, gamma, &y)?;
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

    /// Median forward time of an isolated op ("rmsnorm" or "sigmoid") on a random rows x cols
    /// tensor, variant one of `report::OP_VARIANTS`.
    pub fn op(
        &self,
        op: &str,
        rows: usize,
        cols: usize,
        variant: &str,
        reps: usize,
    ) -> Measurement {
        self.op_result(op, rows, cols, variant, reps)
            .unwrap_or_else(Measurement::failed)
    }

    fn op_result(
        &self,
        op: &str,
        rows: usize,
        cols: usize,
        variant: &str,
        reps: usize,
    ) -> anyhow::Result<Measurement> {
        let (dtype, fused) = match variant {
            REF_F32 => (DType::F32, false),
            REF_BF16 => (DType::BF16, false),
            FUSED_F32 => (DType::F32, true),
            FUSED_BF16 => (DType::BF16, true),
            other => bail!("bench: unknown op variant {other:?}"),
        };
        let d = &self.device;
        let x = Tensor::randn(0f32, 1.0, (rows, cols), d)?.to_dtype(dtype)?;
        let gamma = (Tensor::randn(0f32, 0.1, cols, d)? + 1.0)?;
        let gamma_storage = gamma.to_dtype(dtype)?;
        let run = || -> candle_core::Result<Tensor> {
            match (op, fused) {
                ("rmsnorm", false) => candle_ops_rms_norm(&x, &gamma),
                ("rmsnorm", true) => {
                    candle_nn::ops::rms_norm(&x, &gamma_storage, RMS_NORM_EPS as f32)
                }
                ("sigmoid", false) => (x.neg()?.exp()? + 1.0)?.recip(),
                ("sigmoid", true) => candle_nn::ops::sigmoid(&x),
                _ => Err(candle_core::Error::Msg(format!("bench: unknown op {op:?}"))),
            }
        };
        let ms = self.timer.median_ms(reps, || {
            run()?;
            Ok(())
        })?;
        Ok(Measurement {
            ms: Some(ms),
            ..Measurement::default()
        })
    }

    /// Forward and forward+backward of one sublayer variant (`report::LAYER_VARIANTS`): median
    /// time and peak pool memory, inputs and parameters included.
    pub fn layer(
        &self,
        config: &LayerConfig,
        variant: &str,
        reps: usize,
    ) -> (Measurement, Measurement) {
        let (dtype, fused) = match variant {
            REF_F32 => (DType::F32, false),
            REF_BF16 => (DType::BF16, false),
            FUSED_BF16 => (DType::BF16, true),
            other => {
                let m = Measurement::failed(format!("unknown layer variant {other:?}"));
                return (m.clone(), m);
            }
        };
        let base = match self.pool.reset_peak().and_then(|()| self.pool.used()) {
            Ok(base) => base,
            Err(err) => return (Measurement::failed(&err), Measurement::failed(err)),
        };
        let layer = match Sublayer::new(
            &self.device,
            dtype,
            config.tokens,
            config.width,
            config.streams,
            config.dynamic,
        ) {
            Ok(layer) => layer,
            Err(err) => return (Measurement::failed(&err), Measurement::failed(err)),
        };
        let measure = |backward: bool| -> Measurement {
            let result = (|| -> anyhow::Result<Measurement> {
                // Not the input-making temporaries (x made in f32, then cast): only the calls.
                self.pool.reset_peak()?;
                let ms = self.timer.median_ms(reps, || {
                    if backward {
                        layer.forward_backward(fused)?;
                    } else {
                        layer.forward(fused)?;
                    }
                    Ok(())
                })?;
                Ok(Measurement {
                    ms: Some(ms),
                    peak_bytes: Some(self.pool.peak()? - base).filter(|b| *b > 0.0),
                    error: None,
                })
            })();
            result.unwrap_or_else(Measurement::failed)
        };
        let fwd = measure(false);
        let fwd_bwd = measure(true);
        (fwd, fwd_bwd)
    }

    /// Fused bf16 against the candle-ops f32 reference on the same inputs: (x', dx) differences.
    pub fn accuracy(&self, config: &LayerConfig) -> anyhow::Result<(Diff, Diff)> {
        self.pool.reset_peak()?;
        let fused = Sublayer::new(
            &self.device,
            DType::BF16,
            config.tokens,
            config.width,
            config.streams,
            config.dynamic,
        )?;
        let reference = fused.to_f32()?;
        let g = Tensor::randn(0f32, 1.0, fused.x.as_tensor().dims(), &self.device)?;
        let (out, dx) = fused.output_and_dx(true, &g)?;
        let (out_ref, dx_ref) = reference.output_and_dx(false, &g)?;
        Ok((diff(&out, &out_ref)?, diff(&dx, &dx_ref)?))
    }
}

/// Differences of two f32 tensors, reduced on the device (training sizes hold 10^9 elements).
fn diff(fused: &Tensor, reference: &Tensor) -> candle_core::Result<Diff> {
    let d = (fused - reference)?;
    let abs = d.abs()?;
    let scalar =
        |t: Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
    // Sums in f64 on the device: f32 sums over 10^9 terms lose digits.
    let sum64 = |t: &Tensor| scalar(t.to_dtype(DType::F64)?.sum_all()?);
    Ok(Diff::from_sums(
        scalar(abs.max_all()?)?,
        sum64(&abs)?,
        sum64(&d.sqr()?)?,
        sum64(&reference.sqr()?)?,
        d.elem_count(),
    ))
}
