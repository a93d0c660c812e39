//! CUDA launch layer of the fused mHC ops (docs/ops.md): each function checks shapes, allocates
//! its outputs on the device, and launches the kernels of `kernels/*.cu` on candle's stream.
//!
//! Launches per op: coeffs forward 2 (dynamic: the projection over slices of D into a partial
//! buffer, then the per-token finish) or 1 (static); coeffs backward 1 (static) or 2
//! (dynamic: per-token activation/Sinkhorn backward, then dx and dphi in one pass over x), plus
//! the zeroing of the accumulated dphi / dalpha_b; pre and post 1 each way.

use super::{
    bwd_row_len, bwd_x_on_tensor_cores, DeviceLimits, Geometry, KernelSpec, Module,
    COEFFS_BWD_TOKEN, COEFFS_BWD_X, COEFFS_FINISH, COEFFS_PROJECT, COEFFS_STATIC, POST_BWD,
    POST_FWD, PRE_BWD, PRE_BWD_DH, PRE_BWD_DX_SUM, PRE_BWD_SUM, PRE_FWD,
};
use crate::mhc::MhcShape;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys::{CUdevice_attribute, CUfunction_attribute},
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/mhc_kernels.rs"));
}

/// Lanes per warp on NVIDIA: the kernels size their tiles by it (MHC_WAVE in compat.h).
const WAVE: usize = 32;

/// The fatbin of a module (sm_90 code + compute_90 PTX, from build.rs).
fn image(module: Module) -> &'static [u8] {
    match module {
        Module::Coeffs => embedded::MHC_COEFFS,
        Module::Pre => embedded::MHC_PRE,
        Module::Post => embedded::MHC_POST,
        Module::PreNorm => embedded::MHC_PRE_NORM,
        Module::RmsNorm => embedded::RMS_NORM,
    }
}

/// Per device: loaded modules, resolved functions, multiprocessor count. Modules hold their
/// context alive, so a cached function never outlives it.
#[derive(Default)]
struct DeviceCache {
    modules: HashMap<Module, Arc<CudaModule>>,
    functions: HashMap<String, CudaFunction>,
    multiprocessors: Option<usize>,
}

fn caches() -> &'static Mutex<HashMap<DeviceId, DeviceCache>> {
    static CACHES: OnceLock<Mutex<HashMap<DeviceId, DeviceCache>>> = OnceLock::new();
    CACHES.get_or_init(Default::default)
}

/// The kernel of `spec` for this dtype and n, loaded once per device.
pub(super) fn function(
    dev: &CudaDevice,
    spec: &KernelSpec,
    dtype: DType,
    streams: usize,
) -> Result<CudaFunction> {
    let symbol = spec.symbol(dtype, streams)?;
    let mut caches = caches().lock().expect("mhc kernel cache poisoned");
    let cache = caches.entry(dev.id()).or_default();
    if let Some(func) = cache.functions.get(&symbol) {
        return Ok(func.clone());
    }
    let module = match cache.modules.get(&spec.module) {
        Some(module) => module.clone(),
        None => {
            let ptx = candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_binary(
                image(spec.module).to_vec(),
            );
            let module = dev.cuda_stream().context().load_module(ptx).w()?;
            cache.modules.insert(spec.module, module.clone());
            module
        }
    };
    let func = module.load_function(&symbol).w()?;
    cache.functions.insert(symbol, func.clone());
    Ok(func)
}

fn multiprocessors(dev: &CudaDevice) -> Result<usize> {
    let mut caches = caches().lock().expect("mhc kernel cache poisoned");
    let cache = caches.entry(dev.id()).or_default();
    if let Some(count) = cache.multiprocessors {
        return Ok(count);
    }
    let count = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    cache.multiprocessors = Some(count);
    Ok(count)
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Test mode: every output these functions allocate without zeroing is first filled with NaN,
/// so a test that checks each element finite proves the kernels wrote all of them.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::SeqCst);
}

/// Storage element types the kernels take, with the NaN used for poisoning.
pub(super) trait StorageElem:
    CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static
{
    const NAN: Self;
}
impl StorageElem for f32 {
    const NAN: Self = f32::NAN;
}
impl StorageElem for bf16 {
    const NAN: Self = bf16::NAN;
}

/// An output buffer every element of which the kernel writes (NaN-filled in test mode).
pub(super) fn alloc_out<T: StorageElem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        return dev.clone_htod(&vec![T::NAN; len]);
    }
    // SAFETY: callers pass only buffers their kernels write in full before anything reads them.
    unsafe { dev.alloc::<T>(len) }
}

/// The contiguous elements of a tensor's storage, as a view from its start offset.
pub(super) fn view<'a, T: StorageElem>(
    op: &str,
    name: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: {name} is not contiguous (layout {layout:?})")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

pub(super) fn check_dims(op: &str, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        bail!("{op}: {name} has shape {got:?}, expected {want:?}")
    }
    Ok(())
}

/// T from x [T, n, C], checking n and C against the shape.
pub(super) fn tokens_of(op: &str, shape: &MhcShape, x: &[usize]) -> Result<usize> {
    match x {
        [t, n, c] if *n == shape.streams && *c == shape.width => Ok(*t),
        _ => bail!(
            "{op}: x has shape {x:?}, expected [T, n={}, C={}]",
            shape.streams,
            shape.width
        ),
    }
}

/// Checks the coefficient parameters: alpha_b [3 + k], phi [D, k] (dynamic) or [0, k] (static).
fn check_coeff_params(op: &str, shape: &MhcShape, alpha_b: &[usize], phi: &[usize]) -> Result<()> {
    let (k, d) = (shape.k(), shape.streams * shape.width);
    check_dims(op, "alpha_b", alpha_b, &[3 + k])?;
    check_dims(op, "phi", phi, &[if shape.dynamic { d } else { 0 }, k])
}

/// The launch rules' view of this device (the table's `KernelSpec::geometry`).
pub(super) fn limits(dev: &CudaDevice) -> Result<DeviceLimits> {
    Ok(DeviceLimits {
        wave: WAVE,
        multiprocessors: multiprocessors(dev)?,
        tensor_cores: true,
    })
}

/// The launch configuration of `func` over `geometry`. A kernel with dynamic shared memory is
/// allowed it first (an attribute of the function): by default static and dynamic together may
/// not pass 48 KB.
pub(super) fn cfg(func: &CudaFunction, geometry: &Geometry) -> Result<LaunchConfig> {
    if geometry.shared_bytes > 0 {
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            geometry.shared_bytes as i32,
        )
        .w()?;
    }
    Ok(LaunchConfig {
        grid_dim: (geometry.grid.0, geometry.grid.1, 1),
        block_dim: (geometry.block, 1, 1),
        shared_mem_bytes: geometry.shared_bytes as u32,
    })
}

pub(super) fn wrap<T: StorageElem>(dev: &CudaDevice, slice: CudaSlice<T>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

pub(super) fn tensor(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Borrows a tensor's CUDA storage and layout.
macro_rules! cuda_storage {
    ($op:expr, $name:expr, $t:expr => $s:ident, $l:ident) => {
        let (guard, $l) = $t.storage_and_layout();
        let $s = match &*guard {
            Storage::Cuda(s) => s,
            _ => bail!("{}: {} is not on a CUDA device", $op, $name),
        };
    };
}
pub(super) use cuda_storage;

/// Runs `$body` with `$T` bound to the storage element type of the kernels' x (f32 or bf16),
/// or fails naming the op: the launch functions are written once, for any `StorageElem`.
macro_rules! dispatch_storage {
    ($op:expr, $dtype:expr, $T:ident => $body:block) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => bail!(
                "{}: x dtype {other:?} is not supported on CUDA (f32 or bf16)",
                $op
            ),
        }
    };
}
pub(super) use dispatch_storage;

// ------------------------------------------------------------------------------------------------
// coeffs

/// The coefficients of T tokens: ext [T, 2k+1] f32 = [H | P | r] (what the backward reads) and
/// h [T, k] = H (what pre and post read), both written by the last kernel.
pub struct Coeffs {
    pub ext: CudaStorage,
    pub h: CudaStorage,
    pub tokens: usize,
}

/// CoeffsOp forward: ext and h (`Coeffs`).
pub fn coeffs_forward(
    shape: &MhcShape,
    x: &CudaStorage,
    x_l: &Layout,
    phi: &CudaStorage,
    phi_l: &Layout,
    alpha_b: &CudaStorage,
    alpha_b_l: &Layout,
) -> Result<Coeffs> {
    let op = "mhc-coeffs";
    dispatch_storage!(op, x.dtype(), T => {
        let dev = &x.device;
        let (n, k) = (shape.streams, shape.k());
        let tokens = tokens_of(op, shape, x_l.dims())?;
        let d = n * shape.width;
        check_coeff_params(op, shape, alpha_b_l.dims(), phi_l.dims())?;
        let alpha_b = view::<f32>(op, "alpha_b", alpha_b, alpha_b_l)?;
        let ext_len = tokens * (2 * k + 1);
        let mut ext = alloc_out::<f32>(dev, ext_len)?;
        let mut h = alloc_out::<f32>(dev, tokens * k)?;
        let (tokens_i, iters) = (tokens as i64, shape.sinkhorn_iters as i32);
        if tokens > 0 {
            let dtype = x.dtype();
            if shape.dynamic {
                let x = view::<T>(op, "x", x, x_l)?;
                let phi = view::<f32>(op, "phi", phi, phi_l)?;
                let limits = limits(dev)?;
                let project = COEFFS_PROJECT.geometry(&limits, shape, dtype, tokens);
                let splits = project.grid.1 as usize;
                let mut partial = alloc_out::<f32>(dev, splits * tokens * (k + 1))?;
                let (d_i, d_per_split_i, splits_i) =
                    (d as i64, project.split_len as i64, splits as i32);
                let stream = dev.cuda_stream();
                let func = function(dev, &COEFFS_PROJECT, dtype, n)?;
                let mut b = stream.launch_builder(&func);
                b.arg(&x).arg(&phi).arg(&mut partial);
                b.arg(&tokens_i).arg(&d_i).arg(&d_per_split_i);
                unsafe { b.launch(cfg(&func, &project)?) }.w()?;
                let func = function(dev, &COEFFS_FINISH, dtype, n)?;
                let finish = COEFFS_FINISH.geometry(&limits, shape, dtype, tokens);
                let mut b = stream.launch_builder(&func);
                b.arg(&partial).arg(&alpha_b).arg(&mut ext).arg(&mut h);
                b.arg(&tokens_i).arg(&d_i).arg(&splits_i).arg(&iters);
                unsafe { b.launch(cfg(&func, &finish)?) }.w()?;
            } else {
                let func = function(dev, &COEFFS_STATIC, dtype, n)?;
                let geometry = COEFFS_STATIC.geometry(&limits(dev)?, shape, dtype, tokens);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&alpha_b).arg(&mut ext).arg(&mut h);
                b.arg(&tokens_i).arg(&iters);
                unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
            }
        }
        Ok(Coeffs {
            ext: wrap(dev, ext),
            h: wrap(dev, h),
            tokens,
        })
    })
}

/// What the coefficient backward reads: the forward's inputs x, phi, alpha_b and its ext, and
/// dL/dH as dh [T, k] plus, when given, `dh_pre`'s pre columns (pre's dh, which the chained
/// backward hands over here rather than have autograd add the two).
#[derive(Clone, Copy)]
pub struct CoeffsGrad<'a> {
    pub shape: &'a MhcShape,
    pub x: &'a Tensor,
    pub phi: &'a Tensor,
    pub alpha_b: &'a Tensor,
    pub ext: &'a Tensor,
    pub dh: &'a Tensor,
    pub dh_pre: Option<&'a Tensor>,
}

/// CoeffsOp backward: (dx, dphi, dalpha_b); dx and dphi are None in static mode.
pub fn coeffs_backward(g: &CoeffsGrad) -> Result<(Option<Tensor>, Option<Tensor>, Tensor)> {
    let op = "mhc-coeffs backward";
    let (shape, x, phi) = (g.shape, g.x, g.phi);
    dispatch_storage!(op, x.dtype(), T => {
        let (dp, dalpha_b) = coeffs_backward_token(op, g)?;
        if !shape.dynamic {
            return Ok((None, None, dalpha_b));
        }
        let (n, k) = (shape.streams, shape.k());
        let tokens = x.dims()[0];
        let d = n * shape.width;
        cuda_storage!(op, "x", x => x_s, x_l);
        cuda_storage!(op, "phi", phi => phi_s, phi_l);
        let dev = &x_s.device;
        let x_v = view::<T>(op, "x", x_s, x_l)?;
        let phi_v = view::<f32>(op, "phi", phi_s, phi_l)?;
        let mut dx = alloc_out::<T>(dev, tokens * d)?;
        let mut dphi = dev.alloc_zeros::<f32>(d * k)?;
        if tokens > 0 && d > 0 {
            let func = function(dev, &COEFFS_BWD_X, x.dtype(), n)?;
            let geometry = COEFFS_BWD_X.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let work_blocks_i = geometry.split_len as i64;
            let (tokens_i, d_i) = (tokens as i64, d as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&phi_v).arg(&dp).arg(&mut dx).arg(&mut dphi);
            b.arg(&tokens_i).arg(&d_i).arg(&work_blocks_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        let dx = tensor(wrap(dev, dx), (tokens, n, shape.width));
        let dphi = tensor(wrap(dev, dphi), (d, k));
        Ok((Some(dx), Some(dphi), dalpha_b))
    })
}

/// The per-token stage of the coefficient backward (activations, Sinkhorn VJP): dp [T,
/// bwd_row_len] (dP and coef per token, in the row layout of the pass over x that reads it) and
/// dalpha_b [3 + k], the kernel adding dh_pre's pre columns to dh's.
pub(super) fn coeffs_backward_token(op: &str, g: &CoeffsGrad) -> Result<(CudaSlice<f32>, Tensor)> {
    let CoeffsGrad {
        shape,
        x,
        phi,
        alpha_b,
        ext,
        dh,
        dh_pre,
    } = *g;
    let (n, k) = (shape.streams, shape.k());
    let tokens = tokens_of(op, shape, x.dims())?;
    let d = n * shape.width;
    check_coeff_params(op, shape, alpha_b.dims(), phi.dims())?;
    check_dims(op, "ext", ext.dims(), &[tokens, 2 * k + 1])?;
    check_dims(op, "dh", dh.dims(), &[tokens, k])?;
    let dh = dh.contiguous()?;
    if let Some(dh_pre) = dh_pre {
        check_dims(op, "dh_pre", dh_pre.dims(), &[tokens, k])?;
    }
    let dh_pre = dh_pre.map(Tensor::contiguous).transpose()?;
    // Without dh_pre the kernel is told not to read it (add_dh_pre = 0); dh stands in.
    let add_dh_pre = i32::from(dh_pre.is_some());
    let dh_pre = dh_pre.unwrap_or_else(|| dh.clone());
    cuda_storage!(op, "alpha_b", alpha_b => alpha_b_s, alpha_b_l);
    cuda_storage!(op, "ext", ext => ext_s, ext_l);
    cuda_storage!(op, "dh", dh => dh_s, dh_l);
    cuda_storage!(op, "dh_pre", dh_pre => dh_pre_s, dh_pre_l);
    let dev = &ext_s.device;
    let alpha_b_v = view::<f32>(op, "alpha_b", alpha_b_s, alpha_b_l)?;
    let ext_v = view::<f32>(op, "ext", ext_s, ext_l)?;
    let dh_v = view::<f32>(op, "dh", dh_s, dh_l)?;
    let dh_pre_v = view::<f32>(op, "dh_pre", dh_pre_s, dh_pre_l)?;
    let stream = dev.cuda_stream();

    let mut dalpha_b = dev.alloc_zeros::<f32>(3 + k)?;
    let limits = limits(dev)?;
    let row = bwd_row_len(&limits, n, x.dtype());
    let split_dp = i32::from(bwd_x_on_tensor_cores(&limits, n, x.dtype()));
    let mut dp = alloc_out::<f32>(dev, tokens * row)?;
    let (tokens_i, d_i, iters) = (tokens as i64, d as i64, shape.sinkhorn_iters as i32);
    if tokens > 0 {
        // Sinkhorn scratch: the 2n denominators of each half-step, per token. Only read back
        // by the thread that wrote them, never returned.
        let mut den = unsafe { dev.alloc::<f32>((2 * shape.sinkhorn_iters * n * tokens).max(1))? };
        let func = function(dev, &COEFFS_BWD_TOKEN, x.dtype(), n)?;
        // One thread per token and a long serial Sinkhorn per thread: one-wave blocks spread
        // small T over more multiprocessors.
        let geometry = COEFFS_BWD_TOKEN.geometry(&limits, shape, x.dtype(), tokens);
        let mut b = stream.launch_builder(&func);
        b.arg(&alpha_b_v).arg(&ext_v).arg(&dh_v).arg(&dh_pre_v);
        b.arg(&mut dp).arg(&mut den).arg(&mut dalpha_b);
        b.arg(&tokens_i).arg(&d_i).arg(&iters);
        b.arg(&split_dp).arg(&add_dh_pre);
        unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
    }
    Ok((dp, tensor(wrap(dev, dalpha_b), 3 + k)))
}

// ------------------------------------------------------------------------------------------------
// pre

/// PreOp forward: u [T, C] in x's dtype.
pub fn pre_forward(
    shape: &MhcShape,
    x: &CudaStorage,
    x_l: &Layout,
    h: &CudaStorage,
    h_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "mhc-pre";
    dispatch_storage!(op, x.dtype(), T => {
        let dev = &x.device;
        let (n, c) = (shape.streams, shape.width);
        let tokens = tokens_of(op, shape, x_l.dims())?;
        check_dims(op, "h", h_l.dims(), &[tokens, shape.k()])?;
        let mut u = alloc_out::<T>(dev, tokens * c)?;
        if tokens > 0 && c > 0 {
            let func = function(dev, &PRE_FWD, x.dtype(), n)?;
            let geometry = PRE_FWD.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let x_v = view::<T>(op, "x", x, x_l)?;
            let h_v = view::<f32>(op, "h", h, h_l)?;
            let (tokens_i, c_i) = (tokens as i64, c as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&h_v).arg(&mut u).arg(&tokens_i).arg(&c_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((wrap(dev, u), Shape::from((tokens, c))))
    })
}

/// What pre's backward does with its dx term H_pre (x) du (docs/ops.md).
#[derive(Clone, Copy)]
pub enum PreDx<'a> {
    /// dh only (`PRE_BWD_DH`): the dynamic chained backward adds the term in the coefficient
    /// backward's pass over x.
    None,
    /// dx written (`PRE_BWD`).
    Write,
    /// dx = dx_post + H_pre (x) du written (`PRE_BWD_SUM`): the static chained backward's one dx.
    AddTo(&'a Tensor),
}

/// PreOp backward: dx [T, n, C] as `dx` says (None for `PreDx::None`) and dh [T, k] f32 (only
/// the pre columns non-zero), in one pass.
pub fn pre_backward(
    shape: &MhcShape,
    x: &Tensor,
    h: &Tensor,
    du: &Tensor,
    dx: PreDx,
) -> Result<(Option<Tensor>, Tensor)> {
    let op = "mhc-pre backward";
    dispatch_storage!(op, x.dtype(), T => {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let tokens = tokens_of(op, shape, x.dims())?;
        check_dims(op, "h", h.dims(), &[tokens, k])?;
        check_dims(op, "du", du.dims(), &[tokens, c])?;
        let (x, h, du) = (x.contiguous()?, h.contiguous()?, du.contiguous()?);
        cuda_storage!(op, "x", x => x_s, x_l);
        cuda_storage!(op, "h", h => h_s, h_l);
        cuda_storage!(op, "du", du => du_s, du_l);
        let dev = &x_s.device;
        let mut dh = alloc_out::<f32>(dev, tokens * k)?;
        let x_v = view::<T>(op, "x", x_s, x_l)?;
        let h_v = view::<f32>(op, "h", h_s, h_l)?;
        let du_v = view::<T>(op, "du", du_s, du_l)?;
        let (tokens_i, c_i) = (tokens as i64, c as i64);
        let (limits, stream) = (limits(dev)?, dev.cuda_stream());
        let dx = match dx {
            PreDx::None => {
                if tokens > 0 {
                    let func = function(dev, &PRE_BWD_DH, x.dtype(), n)?;
                    let geometry = PRE_BWD_DH.geometry(&limits, shape, x.dtype(), tokens);
                    let mut b = stream.launch_builder(&func);
                    b.arg(&x_v).arg(&h_v).arg(&du_v).arg(&mut dh);
                    b.arg(&tokens_i).arg(&c_i);
                    unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
                }
                None
            }
            PreDx::Write => {
                let mut dx = alloc_out::<T>(dev, tokens * n * c)?;
                if tokens > 0 {
                    let func = function(dev, &PRE_BWD, x.dtype(), n)?;
                    let geometry = PRE_BWD.geometry(&limits, shape, x.dtype(), tokens);
                    let mut b = stream.launch_builder(&func);
                    b.arg(&x_v).arg(&h_v).arg(&du_v).arg(&mut dx).arg(&mut dh);
                    b.arg(&tokens_i).arg(&c_i);
                    unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
                }
                Some(dx)
            }
            PreDx::AddTo(dx_post) => {
                check_dims(op, "dx_post", dx_post.dims(), x.dims())?;
                let dx_post = dx_post.contiguous()?;
                cuda_storage!(op, "dx_post", dx_post => dx_post_s, dx_post_l);
                let mut dx = alloc_out::<T>(dev, tokens * n * c)?;
                if tokens > 0 {
                    let func = function(dev, &PRE_BWD_SUM, x.dtype(), n)?;
                    let geometry = PRE_BWD_SUM.geometry(&limits, shape, x.dtype(), tokens);
                    let dx_post_v = view::<T>(op, "dx_post", dx_post_s, dx_post_l)?;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&x_v).arg(&h_v).arg(&du_v).arg(&dx_post_v);
                    b.arg(&mut dx).arg(&mut dh).arg(&tokens_i).arg(&c_i);
                    unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
                }
                Some(dx)
            }
        };
        Ok((
            dx.map(|dx| tensor(wrap(dev, dx), (tokens, n, c))),
            tensor(wrap(dev, dh), (tokens, k)),
        ))
    })
}

/// The static chained backward's one dx where the fused RMSNorm's backward gave dh: dx [T, n,
/// C] = dx_post + H_pre (x) du (`PRE_BWD_DX_SUM`), x unread.
pub fn pre_backward_dx_sum(
    shape: &MhcShape,
    h: &Tensor,
    du: &Tensor,
    dx_post: &Tensor,
) -> Result<Tensor> {
    let op = "mhc-pre backward (dx sum)";
    dispatch_storage!(op, du.dtype(), T => {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let tokens = du.dim(0)?;
        check_dims(op, "du", du.dims(), &[tokens, c])?;
        check_dims(op, "h", h.dims(), &[tokens, k])?;
        check_dims(op, "dx_post", dx_post.dims(), &[tokens, n, c])?;
        let (h, du, dx_post) = (h.contiguous()?, du.contiguous()?, dx_post.contiguous()?);
        cuda_storage!(op, "h", h => h_s, h_l);
        cuda_storage!(op, "du", du => du_s, du_l);
        cuda_storage!(op, "dx_post", dx_post => dx_post_s, dx_post_l);
        let dev = &du_s.device;
        let mut dx = alloc_out::<T>(dev, tokens * n * c)?;
        if tokens > 0 {
            let h_v = view::<f32>(op, "h", h_s, h_l)?;
            let du_v = view::<T>(op, "du", du_s, du_l)?;
            let dx_post_v = view::<T>(op, "dx_post", dx_post_s, dx_post_l)?;
            let (tokens_i, c_i) = (tokens as i64, c as i64);
            let (limits, stream) = (limits(dev)?, dev.cuda_stream());
            let func = function(dev, &PRE_BWD_DX_SUM, du.dtype(), n)?;
            let geometry = PRE_BWD_DX_SUM.geometry(&limits, shape, du.dtype(), tokens);
            let mut b = stream.launch_builder(&func);
            b.arg(&h_v).arg(&du_v).arg(&dx_post_v).arg(&mut dx);
            b.arg(&tokens_i).arg(&c_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok(tensor(wrap(dev, dx), (tokens, n, c)))
    })
}

// ------------------------------------------------------------------------------------------------
// post

/// PostOp forward: x' [T, n, C] in x's dtype.
pub fn post_forward(
    shape: &MhcShape,
    x: &CudaStorage,
    x_l: &Layout,
    h: &CudaStorage,
    h_l: &Layout,
    y: &CudaStorage,
    y_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "mhc-post";
    dispatch_storage!(op, x.dtype(), T => {
        let dev = &x.device;
        let (n, c) = (shape.streams, shape.width);
        let tokens = tokens_of(op, shape, x_l.dims())?;
        check_dims(op, "h", h_l.dims(), &[tokens, shape.k()])?;
        check_dims(op, "y", y_l.dims(), &[tokens, c])?;
        let mut out = alloc_out::<T>(dev, tokens * n * c)?;
        if tokens > 0 && c > 0 {
            let func = function(dev, &POST_FWD, x.dtype(), n)?;
            let geometry = POST_FWD.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let x_v = view::<T>(op, "x", x, x_l)?;
            let h_v = view::<f32>(op, "h", h, h_l)?;
            let y_v = view::<T>(op, "y", y, y_l)?;
            let (tokens_i, c_i) = (tokens as i64, c as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v)
                .arg(&h_v)
                .arg(&y_v)
                .arg(&mut out)
                .arg(&tokens_i)
                .arg(&c_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((wrap(dev, out), Shape::from((tokens, n, c))))
    })
}

/// PostOp backward: (dx [T, n, C], dh [T, k] f32 with only post/res columns non-zero, dy [T, C]).
pub fn post_backward(
    shape: &MhcShape,
    x: &Tensor,
    h: &Tensor,
    y: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "mhc-post backward";
    dispatch_storage!(op, x.dtype(), T => {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let tokens = tokens_of(op, shape, x.dims())?;
        check_dims(op, "h", h.dims(), &[tokens, k])?;
        check_dims(op, "y", y.dims(), &[tokens, c])?;
        check_dims(op, "g", g.dims(), &[tokens, n, c])?;
        let (x, h, y, g) = (
            x.contiguous()?,
            h.contiguous()?,
            y.contiguous()?,
            g.contiguous()?,
        );
        cuda_storage!(op, "x", x => x_s, x_l);
        cuda_storage!(op, "h", h => h_s, h_l);
        cuda_storage!(op, "y", y => y_s, y_l);
        cuda_storage!(op, "g", g => g_s, g_l);
        let dev = &x_s.device;
        let mut dx = alloc_out::<T>(dev, tokens * n * c)?;
        let mut dh = alloc_out::<f32>(dev, tokens * k)?;
        let mut dy = alloc_out::<T>(dev, tokens * c)?;
        if tokens > 0 {
            let func = function(dev, &POST_BWD, x.dtype(), n)?;
            let geometry = POST_BWD.geometry(&limits(dev)?, shape, x.dtype(), tokens);
            let x_v = view::<T>(op, "x", x_s, x_l)?;
            let h_v = view::<f32>(op, "h", h_s, h_l)?;
            let y_v = view::<T>(op, "y", y_s, y_l)?;
            let g_v = view::<T>(op, "g", g_s, g_l)?;
            let (tokens_i, c_i) = (tokens as i64, c as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x_v).arg(&h_v).arg(&y_v).arg(&g_v);
            b.arg(&mut dx).arg(&mut dh).arg(&mut dy);
            b.arg(&tokens_i).arg(&c_i);
            unsafe { b.launch(cfg(&func, &geometry)?) }.w()?;
        }
        Ok((
            tensor(wrap(dev, dx), (tokens, n, c)),
            tensor(wrap(dev, dh), (tokens, k)),
            tensor(wrap(dev, dy), (tokens, c)),
        ))
    })
}

/// Makes the device's default memory pool keep freed memory (release threshold = u64::MAX)
/// instead of handing it back to the driver at every synchronisation. candle allocates every
/// tensor with cuMemAllocAsync from that pool; with the default threshold of 0, large buffers are
/// unmapped and mapped again each step, which costs more than the kernels that fill them (seen
/// on an H100: ops writing 671 MB outputs ran at half the copy bandwidth). The memory stays
/// reusable by every later allocation on the device.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver calls on this context's device with valid out-pointers.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .w()?;
    let mut threshold = u64::MAX;
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .w()
}
