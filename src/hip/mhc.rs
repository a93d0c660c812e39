//! The fused mHC ops on an AMD GPU: the same launch sequences as the CUDA layer
//! (src/gpu/mhc.rs, src/gpu/chain.rs), on device buffers the caller owns, so a benchmark
//! allocates once and times launches only. Kernels, argument lists and launch geometry all come
//! from the table in `crate::gpu` (`KernelSpec::args`, `KernelSpec::geometry` with this device's
//! wave size).
//!
//! Launches per op: coeffs forward 2 (dynamic: projection over slices of D, then the per-token
//! finish, through the partial sums in `CoeffsScratch`) or 1 (static); coeffs backward 1
//! (static) or 2 (dynamic; the second also sums the sublayer's dx when chained), plus the zeroing
//! of the accumulated dphi / dalpha_b; pre and post 1 each way.
//! Layouts as in docs/ops.md: x [T, n, C], h and dh [T, k], ext [T, 2k + 1], phi [nC, k],
//! alpha_b [3 + k].

use super::pre_norm::PreNorm;
use super::runtime::{Buffer, Device, DeviceElem, KernelArg};
use crate::gpu::{
    bwd_row_len, bwd_x_on_tensor_cores, KernelSpec, COEFFS_BWD_TOKEN, COEFFS_BWD_X,
    COEFFS_BWD_X_SUM, COEFFS_FINISH, COEFFS_PROJECT, COEFFS_STATIC, POST_BWD, POST_FWD, PRE_BWD,
    PRE_BWD_DH, PRE_BWD_DX_SUM, PRE_BWD_SUM, PRE_FWD,
};
use crate::mhc::MhcShape;
use anyhow::{bail, Result};

pub(super) fn check_len<T: DeviceElem>(
    op: &str,
    name: &str,
    buf: &Buffer<T>,
    want: usize,
) -> Result<()> {
    if buf.len() != want {
        bail!("{op}: {name} has {} elements, expected {want}", buf.len())
    }
    Ok(())
}

fn launch(
    dev: &Device,
    spec: &KernelSpec,
    shape: &MhcShape,
    dtype: candle_core::DType,
    tokens: usize,
    args: &[KernelArg],
) -> Result<()> {
    let geometry = spec.geometry(&dev.limits, shape, dtype, tokens);
    dev.launch(spec, dtype, shape.streams, &geometry, args)
}

/// Coefficients forward: ext [T, 2k+1] = [H | P | r] and h [T, k] = H. Static mode reads neither
/// x nor phi (phi may be empty). The projection's partial sums go to `scratch`.
#[allow(clippy::too_many_arguments)]
pub fn coeffs_forward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    phi: &Buffer<f32>,
    alpha_b: &Buffer<f32>,
    ext: &mut Buffer<f32>,
    h: &mut Buffer<f32>,
    scratch: &mut CoeffsScratch,
) -> Result<()> {
    let op = "mhc-coeffs";
    let (k, d) = (shape.k(), shape.streams * shape.width);
    check_len(op, "x", x, tokens * d)?;
    check_len(op, "phi", phi, if shape.dynamic { d * k } else { 0 })?;
    check_len(op, "alpha_b", alpha_b, 3 + k)?;
    check_len(op, "ext", ext, tokens * (2 * k + 1))?;
    check_len(op, "h", h, tokens * k)?;
    if tokens == 0 {
        return Ok(());
    }
    let (tokens_i, iters) = (tokens as i64, shape.sinkhorn_iters as i32);
    if shape.dynamic {
        let project = COEFFS_PROJECT.geometry(&dev.limits, shape, T::DTYPE, tokens);
        let (splits, d_per_split) = (project.grid.1 as usize, project.split_len as i64);
        let partial = &mut scratch.partial;
        if partial.len() < splits * tokens * (k + 1) {
            bail!(
                "{op}: scratch holds {} partial sums, the launch needs {}",
                partial.len(),
                splits * tokens * (k + 1)
            )
        }
        let args = [
            x.arg(),
            phi.arg(),
            partial.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I64(d as i64),
            KernelArg::I64(d_per_split),
        ];
        dev.launch(&COEFFS_PROJECT, T::DTYPE, shape.streams, &project, &args)?;
        let args = [
            partial.arg(),
            alpha_b.arg(),
            ext.arg_mut(),
            h.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I64(d as i64),
            KernelArg::I32(splits as i32),
            KernelArg::I32(iters),
        ];
        launch(dev, &COEFFS_FINISH, shape, T::DTYPE, tokens, &args)
    } else {
        let args = [
            alpha_b.arg(),
            ext.arg_mut(),
            h.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I32(iters),
        ];
        launch(dev, &COEFFS_STATIC, shape, T::DTYPE, tokens, &args)
    }
}

/// Scratch of the coefficient ops, allocated once so timed calls only launch: the forward
/// projection's partial sums [slices, T, k + 1] (dynamic mode), and for the backward dp [T,
/// bwd_row_len] and the Sinkhorn denominators [2 * iters * n, T]. Only the kernels read it.
pub struct CoeffsScratch {
    partial: Buffer<f32>,
    dp: Buffer<f32>,
    den: Buffer<f32>,
}

impl CoeffsScratch {
    /// For `tokens` tokens of storage type T (the projection's slicing follows `COEFFS_PROJECT`'s
    /// launch rule on this device).
    pub fn new<T: DeviceElem>(dev: &Device, shape: &MhcShape, tokens: usize) -> Result<Self> {
        let slices = if shape.dynamic && tokens > 0 {
            COEFFS_PROJECT
                .geometry(&dev.limits, shape, T::DTYPE, tokens)
                .grid
                .1 as usize
        } else {
            0
        };
        Ok(Self {
            partial: dev.alloc((slices * tokens * (shape.k() + 1)).max(1))?,
            dp: dev.alloc_out(tokens * bwd_row_len(&dev.limits, shape.streams, T::DTYPE))?,
            den: dev.alloc((2 * shape.sinkhorn_iters * shape.streams * tokens).max(1))?,
        })
    }
}

/// Gradient outputs of the coefficient backward; `dx` and `dphi` are unused in static mode.
pub struct CoeffsGrads<'a, T: DeviceElem> {
    pub dx: &'a mut Buffer<T>,
    pub dphi: &'a mut Buffer<f32>,
    pub dalpha_b: &'a mut Buffer<f32>,
}

/// The sublayer's other dx contributions, which the chained coefficient backward adds to its own
/// term so that dx is written once: post's dx [T, n, C] and H_pre[j] du (du [T, C], h [T, k]).
pub struct DxContributions<'a, T: DeviceElem> {
    pub dx_post: &'a Buffer<T>,
    pub du: &'a Buffer<T>,
    pub h: &'a Buffer<f32>,
}

/// Coefficients backward from dh [T, k] = dL/dH (its pre columns plus those of `dh_pre`
/// [T, k] when given, as the CUDA chain hands pre's dh over): dalpha_b always; dx [T, n, C] and
/// dphi [nC, k] in dynamic mode, dx with `chained`'s contributions added when given.
#[allow(clippy::too_many_arguments)]
pub fn coeffs_backward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    phi: &Buffer<f32>,
    alpha_b: &Buffer<f32>,
    ext: &Buffer<f32>,
    dh: &Buffer<f32>,
    dh_pre: Option<&Buffer<f32>>,
    scratch: &mut CoeffsScratch,
    grads: CoeffsGrads<T>,
    chained: Option<DxContributions<T>>,
) -> Result<()> {
    let op = "mhc-coeffs backward";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    let d = n * c;
    check_len(op, "x", x, tokens * d)?;
    check_len(op, "phi", phi, if shape.dynamic { d * k } else { 0 })?;
    check_len(op, "alpha_b", alpha_b, 3 + k)?;
    check_len(op, "ext", ext, tokens * (2 * k + 1))?;
    check_len(op, "dh", dh, tokens * k)?;
    if let Some(dh_pre) = dh_pre {
        check_len(op, "dh_pre", dh_pre, tokens * k)?;
    }
    // Without dh_pre the kernel is told not to read it (add_dh_pre = 0); dh stands in.
    let add_dh_pre = i32::from(dh_pre.is_some());
    let dh_pre = dh_pre.unwrap_or(dh);
    check_len(
        op,
        "dp",
        &scratch.dp,
        tokens * bwd_row_len(&dev.limits, n, T::DTYPE),
    )?;
    check_len(op, "dalpha_b", grads.dalpha_b, 3 + k)?;
    if let Some(sum) = &chained {
        check_len(op, "dx_post", sum.dx_post, tokens * d)?;
        check_len(op, "du", sum.du, tokens * c)?;
        check_len(op, "h", sum.h, tokens * k)?;
    }
    let (tokens_i, d_i, iters) = (tokens as i64, d as i64, shape.sinkhorn_iters as i32);
    // dp's row layout by the launch rule (f32 rows on AMD, whose kernels have no tensor-core
    // pass; split bf16 rows on the emulated NVIDIA GPU).
    let split_dp = i32::from(bwd_x_on_tensor_cores(&dev.limits, n, T::DTYPE));
    grads.dalpha_b.zero()?;
    if tokens > 0 {
        let args = [
            alpha_b.arg(),
            ext.arg(),
            dh.arg(),
            dh_pre.arg(),
            scratch.dp.arg_mut(),
            scratch.den.arg_mut(),
            grads.dalpha_b.arg_mut(),
            KernelArg::I64(tokens_i),
            KernelArg::I64(d_i),
            KernelArg::I32(iters),
            KernelArg::I32(split_dp),
            KernelArg::I32(add_dh_pre),
        ];
        launch(dev, &COEFFS_BWD_TOKEN, shape, T::DTYPE, tokens, &args)?;
    }
    if !shape.dynamic {
        return Ok(());
    }
    check_len(op, "dx", grads.dx, tokens * d)?;
    check_len(op, "dphi", grads.dphi, d * k)?;
    grads.dphi.zero()?;
    if tokens == 0 || d == 0 {
        return Ok(());
    }
    match chained {
        None => {
            let geometry = COEFFS_BWD_X.geometry(&dev.limits, shape, T::DTYPE, tokens);
            let work_blocks = geometry.split_len as i64;
            let args = [
                x.arg(),
                phi.arg(),
                scratch.dp.arg(),
                grads.dx.arg_mut(),
                grads.dphi.arg_mut(),
                KernelArg::I64(tokens_i),
                KernelArg::I64(d_i),
                KernelArg::I64(work_blocks),
            ];
            dev.launch(&COEFFS_BWD_X, T::DTYPE, n, &geometry, &args)
        }
        Some(sum) => {
            let geometry = COEFFS_BWD_X_SUM.geometry(&dev.limits, shape, T::DTYPE, tokens);
            let work_blocks = geometry.split_len as i64;
            let args = [
                x.arg(),
                phi.arg(),
                scratch.dp.arg(),
                sum.dx_post.arg(),
                sum.du.arg(),
                sum.h.arg(),
                grads.dx.arg_mut(),
                grads.dphi.arg_mut(),
                KernelArg::I64(tokens_i),
                KernelArg::I64(d_i),
                KernelArg::I64(c as i64),
                KernelArg::I64(work_blocks),
            ];
            dev.launch(&COEFFS_BWD_X_SUM, T::DTYPE, n, &geometry, &args)
        }
    }
}

/// Aggregate: u [T, C] = sum_j H_pre[j] x_j.
pub fn pre_forward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    h: &Buffer<f32>,
    u: &mut Buffer<T>,
) -> Result<()> {
    let op = "mhc-pre";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    check_len(op, "x", x, tokens * n * c)?;
    check_len(op, "h", h, tokens * k)?;
    check_len(op, "u", u, tokens * c)?;
    if tokens == 0 || c == 0 {
        return Ok(());
    }
    let args = [
        x.arg(),
        h.arg(),
        u.arg_mut(),
        KernelArg::I64(tokens as i64),
        KernelArg::I64(c as i64),
    ];
    launch(dev, &PRE_FWD, shape, T::DTYPE, tokens, &args)
}

/// What pre's backward does with its dx term H_pre (x) du (docs/ops.md), as on CUDA
/// (`crate::gpu::mhc::PreDx`).
pub enum PreDx<'a, T: DeviceElem> {
    /// dh only (`PRE_BWD_DH`): the dynamic chained backward adds the term in the coefficient
    /// backward's pass over x.
    None,
    /// dx written (`PRE_BWD`).
    Write(&'a mut Buffer<T>),
    /// dx = dx_post + H_pre (x) du written (`PRE_BWD_SUM`): the static chained backward's one dx.
    AddTo {
        dx_post: &'a Buffer<T>,
        dx: &'a mut Buffer<T>,
    },
}

/// Aggregate backward: dh [T, k] (only the pre columns non-zero) and pre's dx as `dx` says.
#[allow(clippy::too_many_arguments)]
pub fn pre_backward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    h: &Buffer<f32>,
    du: &Buffer<T>,
    dx: PreDx<T>,
    dh: &mut Buffer<f32>,
) -> Result<()> {
    let op = "mhc-pre backward";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    check_len(op, "x", x, tokens * n * c)?;
    check_len(op, "h", h, tokens * k)?;
    check_len(op, "du", du, tokens * c)?;
    check_len(op, "dh", dh, tokens * k)?;
    match &dx {
        PreDx::None => {}
        PreDx::Write(dx) => check_len(op, "dx", dx, tokens * n * c)?,
        PreDx::AddTo { dx_post, dx } => {
            check_len(op, "dx_post", dx_post, tokens * n * c)?;
            check_len(op, "dx", dx, tokens * n * c)?;
        }
    }
    if tokens == 0 {
        return Ok(());
    }
    let (tokens_i, c_i) = (tokens as i64, c as i64);
    match dx {
        PreDx::None => {
            let args = [
                x.arg(),
                h.arg(),
                du.arg(),
                dh.arg_mut(),
                KernelArg::I64(tokens_i),
                KernelArg::I64(c_i),
            ];
            launch(dev, &PRE_BWD_DH, shape, T::DTYPE, tokens, &args)
        }
        PreDx::Write(dx) => {
            let args = [
                x.arg(),
                h.arg(),
                du.arg(),
                dx.arg_mut(),
                dh.arg_mut(),
                KernelArg::I64(tokens_i),
                KernelArg::I64(c_i),
            ];
            launch(dev, &PRE_BWD, shape, T::DTYPE, tokens, &args)
        }
        PreDx::AddTo { dx_post, dx } => {
            let args = [
                x.arg(),
                h.arg(),
                du.arg(),
                dx_post.arg(),
                dx.arg_mut(),
                dh.arg_mut(),
                KernelArg::I64(tokens_i),
                KernelArg::I64(c_i),
            ];
            launch(dev, &PRE_BWD_SUM, shape, T::DTYPE, tokens, &args)
        }
    }
}

/// The static chained backward's one dx where the fused RMSNorm's backward gave dh: dx [T, n,
/// C] = dx_post + H_pre (x) du (`PRE_BWD_DX_SUM`), x unread.
#[allow(clippy::too_many_arguments)]
pub fn pre_backward_dx_sum<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    h: &Buffer<f32>,
    du: &Buffer<T>,
    dx_post: &Buffer<T>,
    dx: &mut Buffer<T>,
) -> Result<()> {
    let op = "mhc-pre backward (dx sum)";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    check_len(op, "h", h, tokens * k)?;
    check_len(op, "du", du, tokens * c)?;
    check_len(op, "dx_post", dx_post, tokens * n * c)?;
    check_len(op, "dx", dx, tokens * n * c)?;
    if tokens == 0 {
        return Ok(());
    }
    let args = [
        h.arg(),
        du.arg(),
        dx_post.arg(),
        dx.arg_mut(),
        KernelArg::I64(tokens as i64),
        KernelArg::I64(c as i64),
    ];
    launch(dev, &PRE_BWD_DX_SUM, shape, T::DTYPE, tokens, &args)
}

/// Mix + distribute: x' [T, n, C] = H_res x + H_post y.
#[allow(clippy::too_many_arguments)]
pub fn post_forward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    h: &Buffer<f32>,
    y: &Buffer<T>,
    out: &mut Buffer<T>,
) -> Result<()> {
    let op = "mhc-post";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    check_len(op, "x", x, tokens * n * c)?;
    check_len(op, "h", h, tokens * k)?;
    check_len(op, "y", y, tokens * c)?;
    check_len(op, "out", out, tokens * n * c)?;
    if tokens == 0 || c == 0 {
        return Ok(());
    }
    let args = [
        x.arg(),
        h.arg(),
        y.arg(),
        out.arg_mut(),
        KernelArg::I64(tokens as i64),
        KernelArg::I64(c as i64),
    ];
    launch(dev, &POST_FWD, shape, T::DTYPE, tokens, &args)
}

/// Gradient outputs of the post backward.
pub struct PostGrads<'a, T: DeviceElem> {
    pub dx: &'a mut Buffer<T>,
    pub dh: &'a mut Buffer<f32>,
    pub dy: &'a mut Buffer<T>,
}

/// Mix + distribute backward from g [T, n, C]: dx, dh (only post/res columns non-zero), dy.
#[allow(clippy::too_many_arguments)]
pub fn post_backward<T: DeviceElem>(
    dev: &Device,
    shape: &MhcShape,
    tokens: usize,
    x: &Buffer<T>,
    h: &Buffer<f32>,
    y: &Buffer<T>,
    g: &Buffer<T>,
    grads: PostGrads<T>,
) -> Result<()> {
    let op = "mhc-post backward";
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    check_len(op, "x", x, tokens * n * c)?;
    check_len(op, "h", h, tokens * k)?;
    check_len(op, "y", y, tokens * c)?;
    check_len(op, "g", g, tokens * n * c)?;
    check_len(op, "dx", grads.dx, tokens * n * c)?;
    check_len(op, "dh", grads.dh, tokens * k)?;
    check_len(op, "dy", grads.dy, tokens * c)?;
    if tokens == 0 {
        return Ok(());
    }
    let args = [
        x.arg(),
        h.arg(),
        y.arg(),
        g.arg(),
        grads.dx.arg_mut(),
        grads.dh.arg_mut(),
        grads.dy.arg_mut(),
        KernelArg::I64(tokens as i64),
        KernelArg::I64(c as i64),
    ];
    launch(dev, &POST_BWD, shape, T::DTYPE, tokens, &args)
}

/// F of the sublayer, y = F(u).
#[derive(Debug, Clone, Copy)]
pub enum SublayerF<'a> {
    /// The caller writes y after `forward_pre` and du after `backward_post` (to check the mHC
    /// ops on any y and du).
    Given,
    /// RMSNorm with this gamma [C] and eps, on the device, fused into pre as the trainer runs a
    /// pre-norm sublayer (`crate::mhc::ops::sublayer_normed`): u is never written, y =
    /// RMSNorm(u) * gamma, and its backward leaves du, pre's dh and dgamma.
    RmsNorm { gamma: &'a [f32], eps: f64 },
}

/// How the backward forms dx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chaining {
    /// Each op writes its own dx term: post's, pre's and (dynamic) the coefficients'.
    Unchained,
    /// As the trainer on CUDA (`crate::mhc::ops::sublayer`): in dynamic mode pre computes dh
    /// only and the coefficient backward writes the sublayer's whole dx in its pass over x; in
    /// static mode pre's backward writes it, post's dx added.
    Chained,
}

impl Chaining {
    /// Whether the coefficient backward sums the sublayer's dx (chained, dynamic mode), so pre's
    /// dx term has no buffer of its own (and pre's backward runs for dh only, and only without
    /// the fused RMSNorm, whose backward writes dh_pre).
    fn sums_dx_in_coeffs(self, shape: &MhcShape) -> bool {
        self == Chaining::Chained && shape.dynamic
    }
}

/// The RMSNorm of a sublayer (fused into pre) and its buffers.
struct SublayerRmsNorm {
    norm: PreNorm,
    gamma: Buffer<f32>,
    dgamma: Buffer<f32>,
}

/// Every buffer of one mHC sublayer x' = H_res x + H_post F(H_pre x) on the device, forward and
/// backward, allocated once, so a benchmark times launches only. The gradient of x comes back
/// as the buffers of `dx_parts`, whose sum it is (one buffer for the chained dynamic backward).
pub struct Sublayer<T: DeviceElem> {
    pub shape: MhcShape,
    pub tokens: usize,
    pub chaining: Chaining,
    pub x: Buffer<T>,
    pub phi: Buffer<f32>,
    pub alpha_b: Buffer<f32>,
    pub ext: Buffer<f32>,
    pub h: Buffer<f32>,
    pub u: Buffer<T>,
    pub y: Buffer<T>,
    pub x_out: Buffer<T>,
    /// dL/dx'.
    pub g: Buffer<T>,
    /// dL/du.
    pub du: Buffer<T>,
    pub dx_post: Buffer<T>,
    pub dh_post: Buffer<f32>,
    pub dy: Buffer<T>,
    /// pre's dx term (unused by the chained dynamic backward).
    pub dx_pre: Buffer<T>,
    /// pre's dh: the coefficient backward adds its pre columns to dh_post's (as on CUDA).
    pub dh_pre: Buffer<f32>,
    /// Dynamic mode: the coefficient backward's dx, its own term (unchained) or the whole dx
    /// (chained).
    pub dx_coeffs: Buffer<T>,
    pub dphi: Buffer<f32>,
    pub dalpha_b: Buffer<f32>,
    rms_norm: Option<SublayerRmsNorm>,
    scratch: CoeffsScratch,
}

impl<T: DeviceElem> Sublayer<T> {
    /// Uploads x [T, n, C], phi [nC, k] (empty in static mode), alpha_b [3 + k] and F's
    /// parameters; allocates the rest.
    pub fn new(
        dev: &Device,
        shape: MhcShape,
        f: SublayerF,
        chaining: Chaining,
        x: &[T],
        phi: &[f32],
        alpha_b: &[f32],
    ) -> Result<Self> {
        let (n, c, k) = (shape.streams, shape.width, shape.k());
        let d = n * c;
        if d == 0 || !x.len().is_multiple_of(d) {
            bail!(
                "mhc sublayer: x has {} elements, not a multiple of n*C = {d}",
                x.len()
            )
        }
        let tokens = x.len() / d;
        let folds_pre_dx = chaining.sums_dx_in_coeffs(&shape);
        let rms_norm = match f {
            SublayerF::Given => None,
            SublayerF::RmsNorm { gamma, eps } => {
                if chaining != Chaining::Chained {
                    bail!("mhc sublayer: the fused RMSNorm runs in the chained backward only")
                }
                if gamma.len() != c {
                    bail!(
                        "mhc sublayer: gamma has {} elements, expected C = {c}",
                        gamma.len()
                    )
                }
                Some(SublayerRmsNorm {
                    norm: PreNorm::new::<T>(dev, shape, tokens, eps)?,
                    gamma: dev.upload(gamma)?,
                    dgamma: dev.alloc_out(c)?,
                })
            }
        };
        let dynamic_len = |len: usize| if shape.dynamic { len } else { 0 };
        let pre_dx_len = if folds_pre_dx { 0 } else { tokens * d };
        Ok(Self {
            shape,
            tokens,
            chaining,
            x: dev.upload(x)?,
            phi: dev.upload(phi)?,
            alpha_b: dev.upload(alpha_b)?,
            ext: dev.alloc_out(tokens * (2 * k + 1))?,
            h: dev.alloc_out(tokens * k)?,
            u: dev.alloc_out(tokens * c)?,
            y: dev.alloc_out(tokens * c)?,
            x_out: dev.alloc_out(tokens * d)?,
            g: dev.alloc(tokens * d)?,
            du: dev.alloc_out(tokens * c)?,
            dx_post: dev.alloc_out(tokens * d)?,
            dh_post: dev.alloc_out(tokens * k)?,
            dy: dev.alloc_out(tokens * c)?,
            dx_pre: dev.alloc_out(pre_dx_len)?,
            dh_pre: dev.alloc_out(tokens * k)?,
            dx_coeffs: dev.alloc_out(dynamic_len(tokens * d))?,
            dphi: dev.alloc(dynamic_len(d * k))?,
            dalpha_b: dev.alloc(3 + k)?,
            rms_norm,
            scratch: CoeffsScratch::new::<T>(dev, &shape, tokens)?,
        })
    }

    /// ext, h, and u = H_pre x, or y = F(u) when F is the RMSNorm (u not written then).
    pub fn forward_pre(&mut self, dev: &Device) -> Result<()> {
        let (shape, t) = (&self.shape, self.tokens);
        coeffs_forward(
            dev,
            shape,
            t,
            &self.x,
            &self.phi,
            &self.alpha_b,
            &mut self.ext,
            &mut self.h,
            &mut self.scratch,
        )?;
        match &self.rms_norm {
            Some(f) => f.norm.forward(dev, &self.x, &self.h, &f.gamma, &mut self.y),
            None => pre_forward(dev, shape, t, &self.x, &self.h, &mut self.u),
        }
    }

    /// x' = H_res x + H_post y.
    pub fn forward_post(&mut self, dev: &Device) -> Result<()> {
        post_forward(
            dev,
            &self.shape,
            self.tokens,
            &self.x,
            &self.h,
            &self.y,
            &mut self.x_out,
        )
    }

    /// From g: dx_post, dh_post, dy, and when F is the RMSNorm du, dh_pre and dgamma.
    pub fn backward_post(&mut self, dev: &Device) -> Result<()> {
        let grads = PostGrads {
            dx: &mut self.dx_post,
            dh: &mut self.dh_post,
            dy: &mut self.dy,
        };
        post_backward(
            dev,
            &self.shape,
            self.tokens,
            &self.x,
            &self.h,
            &self.y,
            &self.g,
            grads,
        )?;
        if let Some(f) = &mut self.rms_norm {
            f.norm.backward(
                dev,
                &self.x,
                &self.h,
                &f.gamma,
                &self.dy,
                &mut self.du,
                &mut self.dh_pre,
                &mut f.dgamma,
            )?;
        }
        Ok(())
    }

    /// From du: dh_pre (unless the fused RMSNorm's backward wrote it) and pre's dx (none when
    /// the chained dynamic backward folds it in; the sublayer's dx, post's added, when chained
    /// in static mode), then the coefficient backward from dh_post and dh_pre (dalpha_b;
    /// dynamic: dx_coeffs and dphi).
    pub fn backward_pre(&mut self, dev: &Device) -> Result<()> {
        let (shape, t) = (&self.shape, self.tokens);
        let chained = self.chaining == Chaining::Chained;
        let sum_in_coeffs = self.chaining.sums_dx_in_coeffs(shape);
        let dx_pre = match (chained, shape.dynamic) {
            (true, true) => PreDx::None,
            (true, false) => PreDx::AddTo {
                dx_post: &self.dx_post,
                dx: &mut self.dx_pre,
            },
            (false, _) => PreDx::Write(&mut self.dx_pre),
        };
        // With the RMSNorm fused into pre, its backward wrote dh_pre (from du in f32); pre's
        // dx term, where it has a buffer, is then written alone, x unread.
        match (&self.rms_norm, dx_pre) {
            (None, dx_pre) => pre_backward(
                dev,
                shape,
                t,
                &self.x,
                &self.h,
                &self.du,
                dx_pre,
                &mut self.dh_pre,
            )?,
            (Some(_), PreDx::AddTo { dx_post, dx }) => {
                pre_backward_dx_sum(dev, shape, t, &self.h, &self.du, dx_post, dx)?
            }
            // Chained in dynamic mode: the coefficient backward writes dx. (The fused RMSNorm
            // runs chained only: `Sublayer::new`.)
            (Some(_), _) => {}
        }
        let grads = CoeffsGrads {
            dx: &mut self.dx_coeffs,
            dphi: &mut self.dphi,
            dalpha_b: &mut self.dalpha_b,
        };
        let contributions = sum_in_coeffs.then_some(DxContributions {
            dx_post: &self.dx_post,
            du: &self.du,
            h: &self.h,
        });
        coeffs_backward(
            dev,
            shape,
            t,
            &self.x,
            &self.phi,
            &self.alpha_b,
            &self.ext,
            &self.dh_post,
            Some(&self.dh_pre),
            &mut self.scratch,
            grads,
            contributions,
        )
    }

    /// The buffers whose sum is dL/dx, in autograd's order (post, pre, coefficients).
    pub fn dx_parts(&self) -> Vec<&Buffer<T>> {
        match (self.shape.dynamic, self.chaining) {
            (true, Chaining::Chained) => vec![&self.dx_coeffs],
            (true, Chaining::Unchained) => vec![&self.dx_post, &self.dx_pre, &self.dx_coeffs],
            (false, Chaining::Chained) => vec![&self.dx_pre],
            (false, Chaining::Unchained) => vec![&self.dx_post, &self.dx_pre],
        }
    }

    /// F's dgamma [C] (RMSNorm on the device only).
    pub fn dgamma(&self) -> Option<&Buffer<f32>> {
        self.rms_norm.as_ref().map(|f| &f.dgamma)
    }
}
