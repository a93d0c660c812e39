//! CPU kernels of the fused mHC ops: plain Rust, one token at a time, tokens in parallel (rayon).
//!
//! The algorithm is the one the GPU kernels run (spec/mhc.md, docs/ops.md): all arithmetic and
//! accumulation in f32, whatever the storage dtype of x. Every output buffer starts filled with NaN
//! and each element is then written exactly once, so an element a kernel forgot would show up as
//! NaN in the tests (the "poisoned outputs" rule) instead of a plausible zero.
//!
//! Layouts (all row-major, contiguous): x [T, n, C], H [T, k] with columns
//! `[pre (n) | post (n) | res (n*n, i*n + j)]`, phi [nC, k], alpha_b [3 + k] =
//! (alpha_pre, alpha_post, alpha_res, b_0..b_{k-1}), ext [T, 2k + 1] = `[H | P | r]`.

use super::{MhcShape, EPS_RMS, EPS_SINKHORN};
use candle_core::WithDType;
use half::bf16;
use rayon::prelude::*;

/// eps_r in f32, as the kernels use it.
const EPS_R: f32 = EPS_RMS as f32;
/// eps_s in f32, as the kernels use it.
const EPS_S: f32 = EPS_SINKHORN as f32;
/// Rows of dphi handled together when forming dphi = xbar^T dP: a block of x columns stays in cache.
const DPHI_ROW_BLOCK: usize = 16;

/// A storage dtype of x, y, u, x' (and of their gradients): converted to f32 on load and rounded
/// back on store.
pub trait Elem: WithDType {
    /// The poison value output buffers start with.
    const NAN: Self;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const NAN: Self = f32::NAN;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    const NAN: Self = bf16::NAN;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f64 {
    const NAN: Self = f64::NAN;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

/// The group of column c (0 = pre, 1 = post, 2 = res): alpha_g(c) = alpha_b[group(c)].
fn group(shape: &MhcShape, c: usize) -> usize {
    if c < shape.post_offset() {
        0
    } else if c < shape.res_offset() {
        1
    } else {
        2
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Per-thread scratch of the Sinkhorn recurrence: every iterate and every normaliser.
struct SinkhornScratch {
    /// `iterates[h]` (n*n each) is M before half-step h; `iterates[0]` = M0, the last is H_res.
    iterates: Vec<f32>,
    /// `denoms[h]` (n each) = s + eps_s of half-step h (column sums for even h, row sums for odd h).
    denoms: Vec<f32>,
    /// Index of the (first) largest logit, the one whose value is subtracted in M0.
    argmax: usize,
}

impl SinkhornScratch {
    fn new(shape: &MhcShape) -> Self {
        let n = shape.streams;
        let half_steps = 2 * shape.sinkhorn_iters;
        Self {
            iterates: vec![0.0; (half_steps + 1) * n * n],
            denoms: vec![0.0; half_steps * n],
            argmax: 0,
        }
    }

    /// H_res, the last iterate of the latest `forward`.
    fn result(&self, n: usize) -> &[f32] {
        &self.iterates[self.iterates.len() - n * n..]
    }

    /// Sinkhorn forward on the logits L (n*n, row-major), keeping every iterate:
    /// M0 = exp(L - max L); t_max times: M = M / (colsum(M) + eps_s), then M = M / (rowsum(M) + eps_s).
    fn forward(&mut self, n: usize, logits: &[f32]) {
        let nn = n * n;
        self.argmax = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[self.argmax] {
                self.argmax = i;
            }
        }
        let max = logits[self.argmax];
        for (m, &l) in self.iterates[..nn].iter_mut().zip(logits) {
            *m = (l - max).exp();
        }
        let half_steps = self.denoms.len() / n;
        for h in 0..half_steps {
            let (done, rest) = self.iterates.split_at_mut((h + 1) * nn);
            let x = &done[h * nn..];
            let y = &mut rest[..nn];
            let d = &mut self.denoms[h * n..(h + 1) * n];
            if h % 2 == 0 {
                // Columns: s_j = sum_i X[i, j].
                for (j, dj) in d.iter_mut().enumerate() {
                    *dj = (0..n).map(|i| x[i * n + j]).sum::<f32>() + EPS_S;
                }
                for i in 0..n {
                    for j in 0..n {
                        y[i * n + j] = x[i * n + j] / d[j];
                    }
                }
            } else {
                // Rows: s_i = sum_j X[i, j].
                for (i, di) in d.iter_mut().enumerate() {
                    *di = x[i * n..(i + 1) * n].iter().sum::<f32>() + EPS_S;
                }
                for i in 0..n {
                    for j in 0..n {
                        y[i * n + j] = x[i * n + j] / d[i];
                    }
                }
            }
        }
    }

    /// SinkhornBackward of the latest `forward`: overwrites `grad` (n*n) from dH_res to dL.
    /// Each half-step Y = X / (s + eps) has the vector-Jacobian product
    /// dX = (dY - <dY, Y>_axis) / (s + eps), taken over all 2*t_max half-steps in reverse;
    /// then dL = dM0 * M0, plus the gradient through the subtracted max m = L[argmax]:
    /// dM0/dm = -M0, so dL[argmax] -= sum(dM0 * M0). The spec allows dropping that term, but with
    /// eps_s > 0 the result is not scale-invariant: at logit scale 3 dropping it moves dx by
    /// ~1e-4 relative, ten times the f32 bound against the reference (which keeps it).
    fn backward(&self, n: usize, grad: &mut [f32]) {
        let nn = n * n;
        let half_steps = self.denoms.len() / n;
        for h in (0..half_steps).rev() {
            let y = &self.iterates[(h + 1) * nn..(h + 2) * nn];
            let d = &self.denoms[h * n..(h + 1) * n];
            if h % 2 == 0 {
                for j in 0..n {
                    let dot: f32 = (0..n).map(|i| grad[i * n + j] * y[i * n + j]).sum();
                    for i in 0..n {
                        grad[i * n + j] = (grad[i * n + j] - dot) / d[j];
                    }
                }
            } else {
                for ((grad_i, y_i), d_i) in grad.chunks_exact_mut(n).zip(y.chunks_exact(n)).zip(d) {
                    let dot: f32 = grad_i.iter().zip(y_i).map(|(g, y)| g * y).sum();
                    for g in grad_i {
                        *g = (*g - dot) / d_i;
                    }
                }
            }
        }
        let mut total = 0.0f32;
        for (g, m0) in grad.iter_mut().zip(&self.iterates[..nn]) {
            *g *= m0;
            total += *g;
        }
        grad[self.argmax] -= total;
    }
}

/// Ht_c = alpha_g(c) * P_c / r + b_c for every column. Forward and backward both call this, so the
/// backward differentiates bit for bit the logits the forward used.
fn logits(shape: &MhcShape, alpha_b: &[f32], p: &[f32], r: f32, ht: &mut [f32]) {
    let b = &alpha_b[3..];
    for (c, h) in ht.iter_mut().enumerate() {
        *h = alpha_b[group(shape, c)] * p[c] / r + b[c];
    }
}

/// H from Ht: H_pre = sigmoid, H_post = 2 * sigmoid, H_res = Sinkhorn(reshape(Ht_res, n x n)).
fn activations(shape: &MhcShape, ht: &[f32], scratch: &mut SinkhornScratch, h: &mut [f32]) {
    let (n, post, res) = (shape.streams, shape.post_offset(), shape.res_offset());
    for c in 0..post {
        h[c] = sigmoid(ht[c]);
    }
    for c in post..res {
        h[c] = 2.0 * sigmoid(ht[c]);
    }
    scratch.forward(n, &ht[res..]);
    h[res..].copy_from_slice(scratch.result(n));
}

/// dHt from dH (in place) for H computed from Ht: dHt_pre = dH_pre * s(1 - s) with s = H_pre,
/// dHt_post = dH_post * H_post * (1 - H_post / 2), dHt_res = SinkhornBackward(dH_res).
/// `scratch` must hold the Sinkhorn forward of these logits.
fn activations_backward(shape: &MhcShape, h: &[f32], scratch: &SinkhornScratch, grad: &mut [f32]) {
    let (n, post, res) = (shape.streams, shape.post_offset(), shape.res_offset());
    for c in 0..post {
        grad[c] *= h[c] * (1.0 - h[c]);
    }
    for c in post..res {
        grad[c] *= h[c] * (1.0 - 0.5 * h[c]);
    }
    scratch.backward(n, &mut grad[res..]);
}

/// Coefficients forward: ext [T, 2k + 1] = [H | P | r] per token.
/// Dynamic: P = xbar . phi, r = sqrt(mean(xbar^2) + eps_r). Static (`phi` empty, x unread but for
/// T): P = 0, r = 1, so H = activations of b, computed once and copied to every token.
pub fn coeffs_forward<E: Elem>(
    shape: &MhcShape,
    tokens: usize,
    x: &[E],
    phi: &[f32],
    alpha_b: &[f32],
) -> Vec<f32> {
    let k = shape.k();
    let nc = shape.streams * shape.width;
    let row_len = 2 * k + 1;
    let mut ext = vec![f32::NAN; tokens * row_len];
    if !shape.dynamic {
        let mut row = vec![f32::NAN; row_len];
        let (h, pr) = row.split_at_mut(k);
        pr[..k].fill(0.0);
        pr[k] = 1.0;
        let mut ht = vec![0.0; k];
        logits(shape, alpha_b, &pr[..k], 1.0, &mut ht);
        activations(shape, &ht, &mut SinkhornScratch::new(shape), h);
        for out in ext.chunks_exact_mut(row_len) {
            out.copy_from_slice(&row);
        }
        return ext;
    }
    ext.par_chunks_mut(row_len)
        .zip(x.par_chunks(nc))
        .for_each_init(
            || {
                (
                    SinkhornScratch::new(shape),
                    vec![0.0f32; k],
                    vec![0.0f32; nc],
                )
            },
            |(scratch, ht, xbar), (out, x_t)| {
                for (xf, &xe) in xbar.iter_mut().zip(x_t) {
                    *xf = xe.to_f32();
                }
                let (h, pr) = out.split_at_mut(k);
                let (p, r) = pr.split_at_mut(k);
                // P_c = sum_e xbar_e phi[e, c], accumulated in f32 in order of e.
                p.fill(0.0);
                let mut sum_sq = 0.0f32;
                for (&xe, phi_e) in xbar.iter().zip(phi.chunks_exact(k)) {
                    sum_sq += xe * xe;
                    for (pc, &w) in p.iter_mut().zip(phi_e) {
                        *pc += xe * w;
                    }
                }
                r[0] = (sum_sq / nc as f32 + EPS_R).sqrt();
                logits(shape, alpha_b, p, r[0], ht);
                activations(shape, ht, scratch, h);
            },
        );
    ext
}

/// Aggregate: u[t] = sum_j H_pre[t, j] x[t, j]  -> u [T, C].
pub fn pre_forward<E: Elem>(shape: &MhcShape, x: &[E], h: &[f32]) -> Vec<E> {
    let (n, c_width, k) = (shape.streams, shape.width, shape.k());
    let tokens = h.len() / k;
    let mut u = vec![E::NAN; tokens * c_width];
    u.par_chunks_mut(c_width)
        .zip(x.par_chunks(n * c_width))
        .zip(h.par_chunks(k))
        .for_each(|((u_t, x_t), h_t)| {
            for (c, u_c) in u_t.iter_mut().enumerate() {
                let acc: f32 = (0..n).map(|j| h_t[j] * x_t[j * c_width + c].to_f32()).sum();
                *u_c = E::from_f32(acc);
            }
        });
    u
}

/// Mix + distribute: x'[t, i] = sum_j H_res[t, i, j] x[t, j] + H_post[t, i] y[t]  -> x' [T, n, C].
pub fn post_forward<E: Elem>(shape: &MhcShape, x: &[E], h: &[f32], y: &[E]) -> Vec<E> {
    let (n, c_width, k) = (shape.streams, shape.width, shape.k());
    let (post, res) = (shape.post_offset(), shape.res_offset());
    let tokens = h.len() / k;
    let mut out = vec![E::NAN; tokens * n * c_width];
    out.par_chunks_mut(n * c_width)
        .zip(x.par_chunks(n * c_width))
        .zip(h.par_chunks(k).zip(y.par_chunks(c_width)))
        .for_each(|((out_t, x_t), (h_t, y_t))| {
            for i in 0..n {
                let h_res_i = &h_t[res + i * n..res + (i + 1) * n];
                for c in 0..c_width {
                    let mut acc = h_t[post + i] * y_t[c].to_f32();
                    for (j, &hr) in h_res_i.iter().enumerate() {
                        acc += hr * x_t[j * c_width + c].to_f32();
                    }
                    out_t[i * c_width + c] = E::from_f32(acc);
                }
            }
        });
    out
}

/// Gradients of the coefficients op. `dx` and `dphi` are None in static mode.
pub struct CoeffsGrads<E> {
    /// dx [T, n, C] in x's dtype.
    pub dx: Option<Vec<E>>,
    /// dphi [nC, k], summed over tokens.
    pub dphi: Option<Vec<f32>>,
    /// (dalpha_pre, dalpha_post, dalpha_res, db_0..db_{k-1}), summed over tokens.
    pub dalpha_b: Vec<f32>,
}

/// Coefficients backward from dh [T, k] = dL/dH (P and r, kept in ext for the backward, never
/// receive a gradient: the public `coeffs` narrows ext to H).
///
/// Per token: dHt from dH (activations_backward), then
/// db_c += dHt_c; dalpha_g += sum_{c in g} dHt_c * P_c / r; dP_c = alpha_g(c) * dHt_c / r;
/// dr = - sum_c alpha_g(c) * dHt_c * P_c / r^2; dxbar = phi dP^T + dr * xbar / (nC * r);
/// dphi += xbar^T dP. Sums over tokens run in token order, so results do not depend on threads.
pub fn coeffs_backward<E: Elem>(
    shape: &MhcShape,
    x: &[E],
    phi: &[f32],
    alpha_b: &[f32],
    ext: &[f32],
    dh: &[f32],
) -> CoeffsGrads<E> {
    let k = shape.k();
    let nc = shape.streams * shape.width;
    let row_len = 2 * k + 1;
    let tokens = ext.len() / row_len;
    let mut dalpha_b = vec![0.0f32; 3 + k];
    if !shape.dynamic {
        // Every token has the same H (from b alone) and dHt is linear in dH, so one backward of
        // sum_t dH_t gives db = sum_t dHt_t; P = 0 makes dalpha = 0.
        let mut grad = vec![0.0f32; k];
        for d_t in dh.chunks_exact(k) {
            for (g, &d) in grad.iter_mut().zip(d_t) {
                *g += d;
            }
        }
        let mut scratch = SinkhornScratch::new(shape);
        let mut ht = vec![0.0f32; k];
        let mut h = vec![0.0f32; k];
        logits(shape, alpha_b, &vec![0.0; k], 1.0, &mut ht);
        activations(shape, &ht, &mut scratch, &mut h);
        activations_backward(shape, &h, &scratch, &mut grad);
        dalpha_b[3..].copy_from_slice(&grad);
        return CoeffsGrads {
            dx: None,
            dphi: None,
            dalpha_b,
        };
    }

    // Pass 1, per token: dHt [T, k], dP [T, k], the token's dalpha terms [T, 3] and dx.
    let mut dht = vec![f32::NAN; tokens * k];
    let mut dp = vec![f32::NAN; tokens * k];
    let mut dalpha_t = vec![f32::NAN; tokens * 3];
    let mut dx = vec![E::NAN; tokens * nc];
    dht.par_chunks_mut(k)
        .zip(dp.par_chunks_mut(k))
        .zip(dalpha_t.par_chunks_mut(3).zip(dx.par_chunks_mut(nc)))
        .zip(ext.par_chunks(row_len).zip(dh.par_chunks(k)))
        .zip(x.par_chunks(nc))
        .for_each_init(
            || {
                (
                    SinkhornScratch::new(shape),
                    vec![0.0f32; k],
                    vec![0.0f32; k],
                )
            },
            |(scratch, ht, h), ((((dht_t, dp_t), (dalpha_tt, dx_t)), (ext_t, dh_t)), x_t)| {
                let p = &ext_t[k..2 * k];
                let r = ext_t[2 * k];
                logits(shape, alpha_b, p, r, ht);
                activations(shape, ht, scratch, h);
                dht_t.copy_from_slice(dh_t);
                activations_backward(shape, h, scratch, dht_t);
                dalpha_tt.fill(0.0);
                let mut dr = 0.0f32;
                for c in 0..k {
                    let g = group(shape, c);
                    let dht_p_over_r = dht_t[c] * p[c] / r;
                    dalpha_tt[g] += dht_p_over_r;
                    dp_t[c] = alpha_b[g] * dht_t[c] / r;
                    dr -= alpha_b[g] * dht_p_over_r / r;
                }
                let dr_scale = dr / (nc as f32 * r);
                for ((dx_e, phi_e), &xe) in dx_t.iter_mut().zip(phi.chunks_exact(k)).zip(x_t) {
                    let proj: f32 = phi_e.iter().zip(dp_t.iter()).map(|(w, d)| w * d).sum();
                    *dx_e = E::from_f32(proj + dr_scale * xe.to_f32());
                }
            },
        );

    // Pass 2: db and dalpha, summed over tokens in order.
    for (dht_t, dalpha_tt) in dht.chunks_exact(k).zip(dalpha_t.chunks_exact(3)) {
        for (acc, d) in dalpha_b[..3].iter_mut().zip(dalpha_tt) {
            *acc += d;
        }
        for (acc, d) in dalpha_b[3..].iter_mut().zip(dht_t) {
            *acc += d;
        }
    }

    // Pass 3: dphi[e, c] = sum_t xbar[t, e] dP[t, c], blocks of rows e in parallel.
    let mut dphi = vec![f32::NAN; nc * k];
    dphi.par_chunks_mut(DPHI_ROW_BLOCK * k)
        .enumerate()
        .for_each(|(block, dphi_b)| {
            dphi_b.fill(0.0);
            let e0 = block * DPHI_ROW_BLOCK;
            let rows = dphi_b.len() / k;
            for (x_t, dp_t) in x.chunks_exact(nc).zip(dp.chunks_exact(k)) {
                for (xe, dphi_e) in x_t[e0..e0 + rows].iter().zip(dphi_b.chunks_exact_mut(k)) {
                    let xe = xe.to_f32();
                    for (acc, d) in dphi_e.iter_mut().zip(dp_t) {
                        *acc += xe * d;
                    }
                }
            }
        });

    CoeffsGrads {
        dx: Some(dx),
        dphi: Some(dphi),
        dalpha_b,
    }
}

/// Aggregate backward: dH_pre[j] = <du, x_j>, dx_j = H_pre[j] du  -> (dx [T, n, C], dh [T, k] with
/// only the pre columns non-zero).
pub fn pre_backward<E: Elem>(shape: &MhcShape, x: &[E], h: &[f32], du: &[E]) -> (Vec<E>, Vec<f32>) {
    let (n, c_width, k) = (shape.streams, shape.width, shape.k());
    let tokens = h.len() / k;
    let mut dx = vec![E::NAN; tokens * n * c_width];
    let mut dh = vec![f32::NAN; tokens * k];
    dx.par_chunks_mut(n * c_width)
        .zip(dh.par_chunks_mut(k))
        .zip(x.par_chunks(n * c_width))
        .zip(h.par_chunks(k).zip(du.par_chunks(c_width)))
        .for_each(|(((dx_t, dh_t), x_t), (h_t, du_t))| {
            dh_t.fill(0.0);
            for j in 0..n {
                let x_j = &x_t[j * c_width..(j + 1) * c_width];
                let dx_j = &mut dx_t[j * c_width..(j + 1) * c_width];
                let mut dot = 0.0f32;
                for ((dx_c, x_c), du_c) in dx_j.iter_mut().zip(x_j).zip(du_t) {
                    let du_c = du_c.to_f32();
                    dot += du_c * x_c.to_f32();
                    *dx_c = E::from_f32(h_t[j] * du_c);
                }
                dh_t[j] = dot;
            }
        });
    (dx, dh)
}

/// Mix + distribute backward from g = dL/dx' [T, n, C]:
/// dy = sum_i H_post[i] g_i, dH_post[i] = <g_i, y>, dH_res[i, j] = <g_i, x_j>,
/// dx_j = sum_i H_res[i, j] g_i  -> (dx [T, n, C], dh [T, k] with only post/res columns non-zero,
/// dy [T, C]).
pub fn post_backward<E: Elem>(
    shape: &MhcShape,
    x: &[E],
    h: &[f32],
    y: &[E],
    g: &[E],
) -> (Vec<E>, Vec<f32>, Vec<E>) {
    let (n, c_width, k) = (shape.streams, shape.width, shape.k());
    let (post, res) = (shape.post_offset(), shape.res_offset());
    let tokens = h.len() / k;
    let mut dx = vec![E::NAN; tokens * n * c_width];
    let mut dh = vec![f32::NAN; tokens * k];
    let mut dy = vec![E::NAN; tokens * c_width];
    dx.par_chunks_mut(n * c_width)
        .zip(dh.par_chunks_mut(k).zip(dy.par_chunks_mut(c_width)))
        .zip(x.par_chunks(n * c_width).zip(h.par_chunks(k)))
        .zip(y.par_chunks(c_width).zip(g.par_chunks(n * c_width)))
        .for_each_init(
            || {
                (
                    vec![0.0f32; n * c_width],
                    vec![0.0f32; n * c_width],
                    vec![0.0f32; c_width],
                )
            },
            |(gf, xf, yf), (((dx_t, (dh_t, dy_t)), (x_t, h_t)), (y_t, g_t))| {
                for (a, b) in gf.iter_mut().zip(g_t) {
                    *a = b.to_f32();
                }
                for (a, b) in xf.iter_mut().zip(x_t) {
                    *a = b.to_f32();
                }
                for (a, b) in yf.iter_mut().zip(y_t) {
                    *a = b.to_f32();
                }
                dh_t[..post].fill(0.0);
                for c in 0..c_width {
                    let acc: f32 = (0..n).map(|i| h_t[post + i] * gf[i * c_width + c]).sum();
                    dy_t[c] = E::from_f32(acc);
                }
                for i in 0..n {
                    let g_i = &gf[i * c_width..(i + 1) * c_width];
                    dh_t[post + i] = g_i.iter().zip(yf.iter()).map(|(a, b)| a * b).sum();
                    for j in 0..n {
                        let x_j = &xf[j * c_width..(j + 1) * c_width];
                        dh_t[res + i * n + j] = g_i.iter().zip(x_j).map(|(a, b)| a * b).sum();
                    }
                }
                for j in 0..n {
                    for c in 0..c_width {
                        let acc: f32 = (0..n)
                            .map(|i| h_t[res + i * n + j] * gf[i * c_width + c])
                            .sum();
                        dx_t[j * c_width + c] = E::from_f32(acc);
                    }
                }
            },
        );
    (dx, dh, dy)
}
