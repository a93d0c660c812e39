//! The fused mHC ops as candle custom ops (interface: docs/ops.md, math: spec/mhc.md).
//!
//! `coeffs`, `pre` and `post` have the signatures of `super::reference`. Each op has a CPU forward
//! (Rust in `super::cpu`), a CUDA forward (kernels through `crate::gpu::mhc`) and an exact backward
//! that returns all of an op's input gradients from one multi-output function per device.

use super::cpu;
use super::MhcShape;
use crate::custom_op::{cpu_slice, dispatch_elem, storage_slice};
use crate::model::rms_norm::{rms_norm_backward, RmsNormOp};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use crate::gpu::mhc::PreDx;

/// H [T, k] f32 for x [T, n, C]: dynamic (phi [nC, k] given) or static (phi None: H from b alone).
/// alpha [3] and b [k] are f32; gradients flow to x, phi, alpha and b.
pub fn coeffs(
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha: &Tensor,
    b: &Tensor,
    shape: &MhcShape,
) -> Result<Tensor> {
    let phi = coeffs_phi(x, phi, shape)?;
    let alpha_b = Tensor::cat(&[alpha, b], 0)?;
    let ext = x
        .contiguous()?
        .apply_op3(&phi, &alpha_b, CoeffsOp { shape: *shape })?;
    ext.narrow(1, 0, shape.k())
}

/// CoeffsOp's phi: the given one in dynamic mode; in static mode a zero-size one, which keeps the
/// op's arity and is never read.
fn coeffs_phi(x: &Tensor, phi: Option<&Tensor>, shape: &MhcShape) -> Result<Tensor> {
    match (phi, shape.dynamic) {
        (Some(phi), true) => phi.contiguous(),
        (None, false) => Tensor::zeros((0, shape.k()), DType::F32, x.device()),
        (Some(_), false) => bail!("mhc coeffs: phi given but shape.dynamic is false"),
        (None, true) => bail!("mhc coeffs: shape.dynamic is true but phi is missing"),
    }
}

/// One whole sublayer x' = H_res x + H_post f(H_pre x) through the chained ops: the backward
/// writes dx once instead of handing candle three [T, n, C] gradients to add. Returns (x', H).
///
/// Within one sublayer the backward always runs post -> (f) -> pre -> coeffs (H feeds pre and
/// post; pre's u feeds f, which feeds post), so post's backward leaves its dx and pre's its
/// (du, H) in a state the three ops share, and returns no gradient for x; the coefficient
/// backward forms dx = dx_post + H_pre (x) du + its own term (on CUDA in dynamic mode, in its
/// one pass over x) and returns it as x's only gradient from this sublayer. (CUDA in static
/// mode, where the coefficients make no pass over x: pre returns its dx and the coefficient
/// backward post's, and autograd adds the two.)
///
/// alpha_b [3 + k] f32 = (alpha_pre, alpha_post, alpha_res, b_0 .. b_{k-1}), the layout the
/// kernels read, taken as one tensor (the layer's parameter) so the forward starts with no
/// concatenation: on CUDA that was two copy kernels per sublayer.
pub fn sublayer(
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha_b: &Tensor,
    shape: &MhcShape,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    chained_sublayer(x, phi, alpha_b, shape, None, f)
}

/// F's leading RMSNorm (a pre-norm transformer's F(u) = G(RMSNorm(u) * gamma)), for
/// `sublayer_normed` to run fused into pre.
#[derive(Debug, Clone, Copy)]
pub struct PreNorm<'a> {
    /// [C] f32.
    pub gamma: &'a Tensor,
    pub eps: f64,
}

/// `sublayer` for an F that begins with RMSNorm: x' = H_res x + H_post g(RMSNorm(H_pre x) *
/// gamma), the norm fused into pre (on CUDA one launch each way instead of pre's and the norm's,
/// and u never stored: its backward forms u again from x). Gradients flow to gamma too.
pub fn sublayer_normed(
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha_b: &Tensor,
    shape: &MhcShape,
    norm: PreNorm,
    g: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    if norm.gamma.dims() != [shape.width] || norm.gamma.dtype() != DType::F32 {
        bail!(
            "mhc sublayer: gamma is {:?} {:?}, expected [{}] f32",
            norm.gamma.dims(),
            norm.gamma.dtype(),
            shape.width
        )
    }
    chained_sublayer(x, phi, alpha_b, shape, Some(norm), g)
}

/// `sublayer` and `sublayer_normed`: f takes u, or y = RMSNorm(u) * gamma when `norm` is given.
fn chained_sublayer(
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha_b: &Tensor,
    shape: &MhcShape,
    norm: Option<PreNorm>,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let chain = Chain::default();
    let x = x.contiguous()?;
    let phi = coeffs_phi(&x, phi, shape)?;
    let alpha_b = alpha_b.contiguous()?;
    let coeffs = ChainedCoeffsOp {
        op: CoeffsOp { shape: *shape },
        chain: chain.clone(),
    };
    // H [T, k] itself, shared by pre and post (ext stays with the chain for the backward).
    let h = x.apply_op3(&phi, &alpha_b, coeffs)?;
    let op = PreOp { shape: *shape };
    let f_in = match norm {
        None => x.apply_op2(
            &h,
            ChainedPreOp {
                op,
                chain: chain.clone(),
            },
        )?,
        Some(norm) => x.apply_op3(
            &h,
            &norm.gamma.contiguous()?,
            ChainedPreNormOp {
                op,
                eps: norm.eps,
                chain: chain.clone(),
            },
        )?,
    };
    let y = f(&f_in)?.contiguous()?;
    let post = ChainedPostOp {
        op: PostOp { shape: *shape },
        chain,
    };
    Ok((x.apply_op3(&h, &y, post)?, h))
}

/// What the chained ops of one sublayer share: the coefficient forward's ext for its backward,
/// and what post's and pre's backward leave for the coefficient backward.
#[derive(Default)]
struct ChainState {
    /// ext [T, 2k + 1] = [H | P | r] (the chained coefficient op's output is H alone, so its
    /// gradient arrives as dH [T, k], with no narrow to pad back).
    ext: Option<Tensor>,
    /// post's dx [T, n, C].
    dx_post: Option<Tensor>,
    /// pre's (du [T, C], H [T, k]): its dx is H_pre[j] du.
    pre: Option<(Tensor, Tensor)>,
    /// Set by post's backward. On CUDA, pre's backward (which runs after it) then hands its dh
    /// to the coefficient backward as `dh_pre` instead of returning it: H's gradient is post's
    /// dh (and any other consumer's), and the per-token kernel adds pre's columns, where
    /// autograd would have launched a [T, k] add. (Without post's, pre returns its dh: H's
    /// gradient must not rest on a handover that no backward takes.)
    post_ran: bool,
    /// pre's dh [T, k], only its pre columns non-zero (CUDA).
    dh_pre: Option<Tensor>,
}

#[cfg(feature = "cuda")]
impl ChainState {
    /// What pre's backward returns as H's gradient on CUDA: nothing when post's backward ran
    /// (its dh goes to the coefficient backward through the chain), else dh itself.
    fn hand_over_dh_pre(&mut self, dh: Tensor) -> Option<Tensor> {
        if std::mem::take(&mut self.post_ran) {
            self.dh_pre = Some(dh);
            None
        } else {
            Some(dh)
        }
    }
}

type Chain = Arc<Mutex<ChainState>>;

fn lock(chain: &Chain) -> std::sync::MutexGuard<'_, ChainState> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
    chain
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `CoeffsOp` whose output is H [T, k] (ext kept in the chain) and whose backward also adds the
/// stashed post and pre contributions to dx.
struct ChainedCoeffsOp {
    op: CoeffsOp,
    chain: Chain,
}

/// `PreOp` whose backward stashes (du, H) and returns dh only (on CUDA in static mode: dh and
/// the sublayer's dx, post's included; on CUDA after post's backward, dh goes to the chain
/// instead: `ChainState::post_ran`).
struct ChainedPreOp {
    op: PreOp,
    chain: Chain,
}

/// pre then RMSNorm as one op, (x, H, gamma) -> y = RMSNorm(H_pre x) * gamma, whose backward
/// returns dgamma and treats du as `ChainedPreOp`'s does.
struct ChainedPreNormOp {
    op: PreOp,
    eps: f64,
    chain: Chain,
}

/// `PostOp` whose backward stashes its dx and returns dh and dy only.
struct ChainedPostOp {
    op: PostOp,
    chain: Chain,
}

impl CustomOp3 for ChainedCoeffsOp {
    fn name(&self) -> &'static str {
        CoeffsOp::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        phi: &CpuStorage,
        phi_l: &Layout,
        alpha_b: &CpuStorage,
        alpha_b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ext, tokens) = self.op.cpu_ext(x, x_l, phi, phi_l, alpha_b, alpha_b_l)?;
        let k = self.op.shape.k();
        let h: Vec<f32> = ext
            .chunks_exact(2 * k + 1)
            .flat_map(|row| &row[..k])
            .copied()
            .collect();
        lock(&self.chain).ext = Some(Tensor::from_vec(ext, (tokens, 2 * k + 1), &Device::Cpu)?);
        Ok((CpuStorage::F32(h), Shape::from((tokens, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        phi: &candle_core::CudaStorage,
        phi_l: &Layout,
        alpha_b: &candle_core::CudaStorage,
        alpha_b_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = &self.op.shape;
        let coeffs =
            crate::gpu::mhc::coeffs_forward(shape, x, x_l, phi, phi_l, alpha_b, alpha_b_l)?;
        let (tokens, k) = (coeffs.tokens, shape.k());
        lock(&self.chain).ext = Some(Tensor::from_storage(
            candle_core::Storage::Cuda(coeffs.ext),
            (tokens, 2 * k + 1),
            candle_core::op::BackpropOp::none(),
            false,
        ));
        Ok((coeffs.h, Shape::from((tokens, k))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        alpha_b: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = &self.op.shape;
        // ext is read (it belongs to the forward); the backward's contributions are taken, not
        // read: a second backward through the same graph stashes afresh.
        let (ext, state) = {
            let mut chain = lock(&self.chain);
            let Some(ext) = chain.ext.clone() else {
                bail!("mhc-coeffs backward (chained): the forward's ext is missing")
            };
            let state = ChainState {
                ext: None,
                dx_post: chain.dx_post.take(),
                pre: chain.pre.take(),
                post_ran: std::mem::take(&mut chain.post_ran),
                dh_pre: chain.dh_pre.take(),
            };
            (ext, state)
        };
        let ext = &ext;
        #[cfg(feature = "cuda")]
        let grad = crate::gpu::mhc::CoeffsGrad {
            shape,
            x,
            phi,
            alpha_b,
            ext,
            dh,
            dh_pre: state.dh_pre.as_ref(),
        };
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && shape.dynamic {
            let tokens = x.dims()[0];
            let dx_post = match state.dx_post {
                Some(dx_post) => dx_post,
                None => x.zeros_like()?,
            };
            let (du, h) = match state.pre {
                Some(pre) => pre,
                None => (
                    Tensor::zeros((tokens, shape.width), x.dtype(), x.device())?,
                    Tensor::zeros((tokens, shape.k()), DType::F32, x.device())?,
                ),
            };
            let (dx, dphi, dalpha_b) =
                crate::gpu::chain::coeffs_backward_sum(&grad, &dx_post, &du, &h)?;
            return Ok((Some(dx), Some(dphi), Some(dalpha_b)));
        }
        // Static mode on CUDA (no pass over x to fuse into): pre's backward took post's dx and
        // returned the sublayer's dx; post's is still here only if pre's backward did not run.
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (_, _, dalpha_b) = crate::gpu::mhc::coeffs_backward(&grad)?;
            return Ok((state.dx_post, None, Some(dalpha_b)));
        }
        // CPU: add the contributions in f32 (f64 for f64 storage) and round once.
        let (dx, dphi, dalpha_b) = coeffs_backward(shape, x, phi, alpha_b, ext, dh)?;
        let acc = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut sum: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            let t = t.to_dtype(acc)?;
            sum = Some(match sum.take() {
                Some(s) => (s + t)?,
                None => t,
            });
            Ok(())
        };
        if let Some(dx) = dx {
            add(dx)?;
        }
        if let Some(dx_post) = state.dx_post {
            add(dx_post)?;
        }
        if let Some((du, h)) = state.pre {
            let h_pre = h.narrow(1, 0, shape.streams)?.to_dtype(acc)?.unsqueeze(2)?;
            add(h_pre.broadcast_mul(&du.to_dtype(acc)?.unsqueeze(1)?)?)?;
        }
        let dx = sum.map(|s| s.to_dtype(x.dtype())).transpose()?;
        Ok((dx, dphi, Some(dalpha_b)))
    }
}

impl CustomOp2 for ChainedPreOp {
    fn name(&self) -> &'static str {
        PreOp::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        h: &CpuStorage,
        h_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.op.cpu_fwd(x, x_l, h, h_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        h: &candle_core::CudaStorage,
        h_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.op.cuda_fwd(x, x_l, h, h_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        _u: &Tensor,
        du: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        chained_pre_backward(&self.chain, &self.op.shape, x, h, du.contiguous()?, None)
    }
}

/// pre's backward within the chain, from du (and dh when the caller has it already): returns
/// (dx, dh) for autograd and leaves (du, H) for the coefficient backward.
fn chained_pre_backward(
    chain: &Chain,
    shape: &MhcShape,
    x: &Tensor,
    h: &Tensor,
    du: Tensor,
    dh: Option<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let mut chain = lock(chain);
    let dh = match x.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if shape.dynamic => {
            let dh = match dh {
                Some(dh) => dh,
                None => crate::gpu::mhc::pre_backward(shape, x, h, &du, PreDx::None)?.1,
            };
            chain.hand_over_dh_pre(dh)
        }
        // Static mode on CUDA: the coefficient backward has no pass over x to fold dx into,
        // so pre's backward writes the sublayer's one dx = dx_post + H_pre (x) du (post's
        // backward ran first and stashed dx_post). Where the fused norm's backward gave dh (it
        // sums du in f32; pre's kernel reads du rounded to the storage dtype, and in bf16 db
        // was off by 5e-2 where dh's sums cancel), that is dx alone, x unread; else pre's
        // kernel writes dx and dh in one pass.
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let dx_post = chain.dx_post.take();
            let (dx, dh) = match (dh, &dx_post) {
                (Some(dh), Some(dx_post)) => (
                    Some(crate::gpu::mhc::pre_backward_dx_sum(
                        shape, h, &du, dx_post,
                    )?),
                    dh,
                ),
                (dh, _) => {
                    let dx = dx_post.as_ref().map_or(PreDx::Write, PreDx::AddTo);
                    let (dx, pre_dh) = crate::gpu::mhc::pre_backward(shape, x, h, &du, dx)?;
                    (dx, dh.unwrap_or(pre_dh))
                }
            };
            return Ok((dx, chain.hand_over_dh_pre(dh)));
        }
        // The CPU computes pre's dx too; only its dh is used here.
        _ => Some(match dh {
            Some(dh) => dh,
            None => pre_backward(shape, x, h, &du)?.1,
        }),
    };
    chain.pre = Some((du, h.clone()));
    Ok((None, dh))
}

impl CustomOp3 for ChainedPreNormOp {
    fn name(&self) -> &'static str {
        "mhc-pre-norm"
    }

    /// CPU: pre's and RMSNorm's CPU forwards in turn (u rounded to x's dtype between them, as
    /// the two ops apart would).
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        h: &CpuStorage,
        h_l: &Layout,
        gamma: &CpuStorage,
        gamma_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (u, u_shape) = self.op.cpu_fwd(x, x_l, h, h_l)?;
        RmsNormOp { eps: self.eps }.cpu_fwd(&u, &Layout::contiguous(u_shape), gamma, gamma_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        h: &candle_core::CudaStorage,
        h_l: &Layout,
        gamma: &candle_core::CudaStorage,
        gamma_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::pre_norm::forward(
            &self.op.shape,
            self.eps,
            (x, x_l),
            (h, h_l),
            (gamma, gamma_l),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        gamma: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = &self.op.shape;
        let (du, dh, dgamma) = match x.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::gpu::pre_norm::backward(shape, self.eps, x, h, gamma, dy)?,
            // CPU: u again, RMSNorm's backward, pre's dh.
            _ => {
                let u = x.apply_op2(h, PreOp { shape: *shape })?;
                let (du, dgamma) = rms_norm_backward(&u, gamma, dy, self.eps)?;
                let dh = pre_backward(shape, x, h, &du)?.1;
                (du, dh, dgamma)
            }
        };
        let (dx, dh) = chained_pre_backward(&self.chain, shape, x, h, du, Some(dh))?;
        Ok((dx, dh, Some(dgamma)))
    }
}

impl CustomOp3 for ChainedPostOp {
    fn name(&self) -> &'static str {
        PostOp::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        h: &CpuStorage,
        h_l: &Layout,
        y: &CpuStorage,
        y_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.op.cpu_fwd(x, x_l, h, h_l, y, y_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        h: &candle_core::CudaStorage,
        h_l: &Layout,
        y: &candle_core::CudaStorage,
        y_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.op.cuda_fwd(x, x_l, h, h_l, y, y_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dh, dy) = post_backward(&self.op.shape, x, h, y, g)?;
        let mut chain = lock(&self.chain);
        chain.dx_post = Some(dx);
        chain.post_ran = true;
        Ok((None, Some(dh), Some(dy)))
    }
}

/// u [T, C] = sum_j H_pre[j] x_j, in x's dtype.
pub fn pre(x: &Tensor, h: &Tensor, shape: &MhcShape) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&h.contiguous()?, PreOp { shape: *shape })
}

/// x' [T, n, C] = H_res x + H_post y, in x's dtype (y [T, C] has x's dtype).
pub fn post(x: &Tensor, h: &Tensor, y: &Tensor, shape: &MhcShape) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&h.contiguous()?, &y.contiguous()?, PostOp { shape: *shape })
}

/// (x, phi, alpha_b) -> ext [T, 2k + 1] f32 = [H | P | r]. P and r are kept for the backward.
pub struct CoeffsOp {
    pub shape: MhcShape,
}

/// (x, h) -> u [T, C].
pub struct PreOp {
    pub shape: MhcShape,
}

/// (x, h, y) -> x' [T, n, C].
pub struct PostOp {
    pub shape: MhcShape,
}

fn check_dims(op: &str, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        bail!("{op}: {name} has shape {got:?}, expected {want:?}");
    }
    Ok(())
}

/// T from x [T, n, C], checking n and C against the shape.
fn tokens_of(op: &str, shape: &MhcShape, x: &[usize]) -> Result<usize> {
    match x {
        [t, n, c] if *n == shape.streams && *c == shape.width => Ok(*t),
        _ => bail!(
            "{op}: x has shape {x:?}, expected [T, {}, {}]",
            shape.streams,
            shape.width
        ),
    }
}

impl CoeffsOp {
    const NAME: &'static str = "mhc-coeffs";

    fn check(&self, x: &[usize], phi: &[usize], alpha_b: &[usize]) -> Result<usize> {
        let (op, k) = (Self::NAME, self.shape.k());
        let tokens = tokens_of(op, &self.shape, x)?;
        let phi_rows = if self.shape.dynamic {
            self.shape.streams * self.shape.width
        } else {
            0
        };
        check_dims(op, "phi", phi, &[phi_rows, k])?;
        check_dims(op, "alpha_b", alpha_b, &[3 + k])?;
        Ok(tokens)
    }

    /// The CPU forward's ext [T, 2k + 1] and T.
    fn cpu_ext(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        phi: &CpuStorage,
        phi_l: &Layout,
        alpha_b: &CpuStorage,
        alpha_b_l: &Layout,
    ) -> Result<(Vec<f32>, usize)> {
        let op = Self::NAME;
        let tokens = self.check(x_l.dims(), phi_l.dims(), alpha_b_l.dims())?;
        let phi = cpu_slice::<f32>(op, "phi", phi, phi_l)?;
        let alpha_b = cpu_slice::<f32>(op, "alpha_b", alpha_b, alpha_b_l)?;
        let ext = dispatch_elem!(op, x.dtype(), E => {
            let x = cpu_slice::<E>(op, "x", x, x_l)?;
            cpu::coeffs_forward(&self.shape, tokens, x, phi, alpha_b)
        });
        Ok((ext, tokens))
    }
}

impl CustomOp3 for CoeffsOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        phi: &CpuStorage,
        phi_l: &Layout,
        alpha_b: &CpuStorage,
        alpha_b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ext, tokens) = self.cpu_ext(x, x_l, phi, phi_l, alpha_b, alpha_b_l)?;
        Ok((
            CpuStorage::F32(ext),
            Shape::from((tokens, 2 * self.shape.k() + 1)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        phi: &candle_core::CudaStorage,
        phi_l: &Layout,
        alpha_b: &candle_core::CudaStorage,
        alpha_b_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let coeffs =
            crate::gpu::mhc::coeffs_forward(&self.shape, x, x_l, phi, phi_l, alpha_b, alpha_b_l)?;
        let shape = Shape::from((coeffs.tokens, 2 * self.shape.k() + 1));
        Ok((coeffs.ext, shape))
    }

    /// Only d_ext's H columns carry a gradient (`coeffs` narrows ext to H).
    fn bwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        alpha_b: &Tensor,
        ext: &Tensor,
        d_ext: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dh = d_ext.narrow(1, 0, self.shape.k())?;
        let (dx, dphi, dalpha_b) = coeffs_backward(&self.shape, x, phi, alpha_b, ext, &dh)?;
        Ok((dx, dphi, Some(dalpha_b)))
    }
}

/// Backward of `CoeffsOp` on x's device from dh [T, k] = dL/dH (see `cpu::coeffs_backward`):
/// (dx, dphi, dalpha_b); dx and dphi are None in static mode.
pub fn coeffs_backward(
    shape: &MhcShape,
    x: &Tensor,
    phi: &Tensor,
    alpha_b: &Tensor,
    ext: &Tensor,
    dh: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Tensor)> {
    let op = "mhc-coeffs backward";
    let dh = dh.contiguous()?;
    let tokens = CoeffsOp { shape: *shape }.check(x.dims(), phi.dims(), alpha_b.dims())?;
    let k = shape.k();
    check_dims(op, "ext", ext.dims(), &[tokens, 2 * k + 1])?;
    check_dims(op, "dh", dh.dims(), &[tokens, k])?;
    match x.device() {
        Device::Cpu => {
            let (phi_s, phi_s_l) = phi.storage_and_layout();
            let phi_v = storage_slice::<f32>(op, "phi", &phi_s, phi_s_l)?;
            let (alpha_b_s, alpha_b_s_l) = alpha_b.storage_and_layout();
            let alpha_b_v = storage_slice::<f32>(op, "alpha_b", &alpha_b_s, alpha_b_s_l)?;
            let (ext_s, ext_s_l) = ext.storage_and_layout();
            let ext_v = storage_slice::<f32>(op, "ext", &ext_s, ext_s_l)?;
            let (dh_s, dh_s_l) = dh.storage_and_layout();
            let dh_v = storage_slice::<f32>(op, "dh", &dh_s, dh_s_l)?;
            let dev = Device::Cpu;
            dispatch_elem!(op, x.dtype(), E => {
                // Static mode never reads x.
                let (x_s, x_s_l) = x.storage_and_layout();
                let x_v: &[E] = if shape.dynamic {
                    storage_slice::<E>(op, "x", &x_s, x_s_l)?
                } else {
                    &[]
                };
                let g = cpu::coeffs_backward::<E>(shape, x_v, phi_v, alpha_b_v, ext_v, dh_v);
                let dx = g.dx.map(|v| Tensor::from_vec(v, x.shape(), &dev)).transpose()?;
                let dphi = g.dphi.map(|v| Tensor::from_vec(v, phi.shape(), &dev)).transpose()?;
                Ok((dx, dphi, Tensor::from_vec(g.dalpha_b, 3 + k, &dev)?))
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::gpu::mhc::coeffs_backward(&crate::gpu::mhc::CoeffsGrad {
            shape,
            x,
            phi,
            alpha_b,
            ext,
            dh: &dh,
            dh_pre: None,
        }),
        other => bail!("{op}: no implementation for device {:?}", other.location()),
    }
}

impl PreOp {
    const NAME: &'static str = "mhc-pre";

    fn check(&self, x: &[usize], h: &[usize]) -> Result<usize> {
        let tokens = tokens_of(Self::NAME, &self.shape, x)?;
        check_dims(Self::NAME, "h", h, &[tokens, self.shape.k()])?;
        Ok(tokens)
    }
}

impl CustomOp2 for PreOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        h: &CpuStorage,
        h_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = Self::NAME;
        let tokens = self.check(x_l.dims(), h_l.dims())?;
        let h = cpu_slice::<f32>(op, "h", h, h_l)?;
        let u = dispatch_elem!(op, x.dtype(), E => {
            let x = cpu_slice::<E>(op, "x", x, x_l)?;
            E::to_cpu_storage_owned(cpu::pre_forward(&self.shape, x, h))
        });
        Ok((u, Shape::from((tokens, self.shape.width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        h: &candle_core::CudaStorage,
        h_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::mhc::pre_forward(&self.shape, x, x_l, h, h_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        _u: &Tensor,
        du: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dh) = pre_backward(&self.shape, x, h, du)?;
        Ok((Some(dx), Some(dh)))
    }
}

/// Backward of `PreOp` on x's device: (dx [T, n, C], dh [T, k] with only the pre columns non-zero).
pub fn pre_backward(
    shape: &MhcShape,
    x: &Tensor,
    h: &Tensor,
    du: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let op = "mhc-pre backward";
    let du = du.contiguous()?;
    let tokens = PreOp { shape: *shape }.check(x.dims(), h.dims())?;
    check_dims(op, "du", du.dims(), &[tokens, shape.width])?;
    match x.device() {
        Device::Cpu => {
            let (h_s, h_s_l) = h.storage_and_layout();
            let h_v = storage_slice::<f32>(op, "h", &h_s, h_s_l)?;
            dispatch_elem!(op, x.dtype(), E => {
                let (x_s, x_s_l) = x.storage_and_layout();
                let x_v = storage_slice::<E>(op, "x", &x_s, x_s_l)?;
                let (du_s, du_s_l) = du.storage_and_layout();
                let du_v = storage_slice::<E>(op, "du", &du_s, du_s_l)?;
                let (dx, dh) = cpu::pre_backward::<E>(shape, x_v, h_v, du_v);
                let dev = Device::Cpu;
                Ok((Tensor::from_vec(dx, x.shape(), &dev)?, Tensor::from_vec(dh, h.shape(), &dev)?))
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => match crate::gpu::mhc::pre_backward(shape, x, h, &du, PreDx::Write)? {
            (Some(dx), dh) => Ok((dx, dh)),
            (None, _) => bail!("{op}: the CUDA launch returned no dx"),
        },
        other => bail!("{op}: no implementation for device {:?}", other.location()),
    }
}

impl PostOp {
    const NAME: &'static str = "mhc-post";

    fn check(&self, x: &[usize], h: &[usize], y: &[usize]) -> Result<usize> {
        let tokens = tokens_of(Self::NAME, &self.shape, x)?;
        check_dims(Self::NAME, "h", h, &[tokens, self.shape.k()])?;
        check_dims(Self::NAME, "y", y, &[tokens, self.shape.width])?;
        Ok(tokens)
    }
}

impl CustomOp3 for PostOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        h: &CpuStorage,
        h_l: &Layout,
        y: &CpuStorage,
        y_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = Self::NAME;
        let tokens = self.check(x_l.dims(), h_l.dims(), y_l.dims())?;
        let h = cpu_slice::<f32>(op, "h", h, h_l)?;
        let out = dispatch_elem!(op, x.dtype(), E => {
            let x = cpu_slice::<E>(op, "x", x, x_l)?;
            let y = cpu_slice::<E>(op, "y", y, y_l)?;
            E::to_cpu_storage_owned(cpu::post_forward(&self.shape, x, h, y))
        });
        Ok((
            out,
            Shape::from((tokens, self.shape.streams, self.shape.width)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        h: &candle_core::CudaStorage,
        h_l: &Layout,
        y: &candle_core::CudaStorage,
        y_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::mhc::post_forward(&self.shape, x, x_l, h, h_l, y, y_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dh, dy) = post_backward(&self.shape, x, h, y, g)?;
        Ok((Some(dx), Some(dh), Some(dy)))
    }
}

/// Backward of `PostOp` on x's device: (dx [T, n, C], dh [T, k] with only the post/res columns
/// non-zero, dy [T, C]).
pub fn post_backward(
    shape: &MhcShape,
    x: &Tensor,
    h: &Tensor,
    y: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "mhc-post backward";
    let g = g.contiguous()?;
    let tokens = PostOp { shape: *shape }.check(x.dims(), h.dims(), y.dims())?;
    check_dims(op, "g", g.dims(), x.dims())?;
    match x.device() {
        Device::Cpu => {
            let (h_s, h_s_l) = h.storage_and_layout();
            let h_v = storage_slice::<f32>(op, "h", &h_s, h_s_l)?;
            dispatch_elem!(op, x.dtype(), E => {
                let (x_s, x_s_l) = x.storage_and_layout();
                let x_v = storage_slice::<E>(op, "x", &x_s, x_s_l)?;
                let (y_s, y_s_l) = y.storage_and_layout();
                let y_v = storage_slice::<E>(op, "y", &y_s, y_s_l)?;
                let (g_s, g_s_l) = g.storage_and_layout();
                let g_v = storage_slice::<E>(op, "g", &g_s, g_s_l)?;
                let (dx, dh, dy) = cpu::post_backward::<E>(shape, x_v, h_v, y_v, g_v);
                let dev = Device::Cpu;
                Ok((
                    Tensor::from_vec(dx, x.shape(), &dev)?,
                    Tensor::from_vec(dh, (tokens, shape.k()), &dev)?,
                    Tensor::from_vec(dy, y.shape(), &dev)?,
                ))
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::gpu::mhc::post_backward(shape, x, h, y, &g),
        other => bail!("{op}: no implementation for device {:?}", other.location()),
    }
}
