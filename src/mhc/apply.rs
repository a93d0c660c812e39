//! `mhc-apply`: one mHC sublayer run on tensors read from a safetensors file, results written to
//! another. It lets anyone (a PyTorch port, a notebook, the GPU checks) feed the fused ops or the
//! reference exactly the inputs they want and compare what comes out, gradients included.
//!
//! The sublayer is x' = H_res x + H_post F(H_pre x) with F = RMSNorm(gamma):
//! F(u) = u / sqrt(mean(u^2) + RMS_NORM_EPS) * gamma, computed in f32 (spec/mhc.md for the rest).

use super::{ops, reference, MhcShape};
use crate::config::MhcImpl;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// epsilon of F's RMSNorm: F(u) = u / sqrt(mean(u^2) + RMS_NORM_EPS) * gamma.
pub const RMS_NORM_EPS: f64 = 1e-6;
/// Sinkhorn iterations when the input file has no `sinkhorn_iters` tensor.
pub const DEFAULT_SINKHORN_ITERS: usize = 20;

/// The tensors `mhc-apply` reads and writes (shown by the CLI's --help).
pub const APPLY_HELP: &str = "\
Runs one mHC sublayer x' = H_res x + H_post F(H_pre x), F = RMSNorm(gamma):
F(u) = u / sqrt(mean(u^2) + 1e-6) * gamma (in f32), on tensors from a safetensors file.

Input tensors (T tokens, n streams, C width, k = n*n + 2n):
  x               [T, n, C]  f32 or bf16   residual streams
  phi             [n*C, k]   f32           projection; absent = static mode (H from b alone)
  alpha           [3]        f32           (alpha_pre, alpha_post, alpha_res); optional in static mode (zeros)
  b               [k]        f32           biases, columns [pre (n) | post (n) | res (n*n, row-major)]
  gamma           [C]        f32           RMSNorm weight of F
  dout            [T, n, C]  any float     optional: gradient of the output; enables the backward
  sinkhorn_iters  scalar     int or float  optional: Sinkhorn iterations (default 20)

Output tensors:
  x_out  [T, n, C]  x's dtype   the sublayer's output x'
  h      [T, k]     f32         the coefficients [H_pre | H_post | H_res]
  with dout, the gradients of sum(x_out * dout):
  dx [T, n, C] (x's dtype), dphi [n*C, k] (dynamic mode only), dalpha [3], db [k], dgamma [C]

The output file is written to a temporary file beside it, then renamed.";

/// Every tensor name the input may hold.
const INPUT_NAMES: [&str; 7] = ["x", "phi", "alpha", "b", "gamma", "dout", "sinkhorn_iters"];

/// The inputs of one `mhc-apply` run, read and checked (shapes and dtypes as in `APPLY_HELP`).
pub struct ApplyInputs {
    pub shape: MhcShape,
    /// [T, n, C], f32 or bf16.
    pub x: Tensor,
    /// [n*C, k] f32; None in static mode.
    pub phi: Option<Tensor>,
    /// [3] f32 (zeros when static mode leaves it out).
    pub alpha: Tensor,
    /// [k] f32.
    pub b: Tensor,
    /// [C] f32.
    pub gamma: Tensor,
    /// [T, n, C]: the gradient of the output, when the backward is asked for.
    pub dout: Option<Tensor>,
}

/// Reads `input` onto `device` and checks every tensor: one clear error for the first problem,
/// before any work.
pub fn read_inputs(input: &Path, device: &Device) -> Result<ApplyInputs> {
    let mut tensors = candle_core::safetensors::load(input, device)
        .with_context(|| format!("reading safetensors file {}", input.display()))?;
    if let Some(unknown) = tensors
        .keys()
        .find(|name| !INPUT_NAMES.contains(&name.as_str()))
    {
        bail!(
            "{}: unknown tensor {unknown:?}; expected some of {INPUT_NAMES:?}",
            input.display()
        );
    }
    let x = tensors
        .remove("x")
        .context("input has no tensor \"x\" [T, n, C]")?;
    let (tokens, n, c) = match *x.dims() {
        [t, n, c] if t > 0 && n > 0 && c > 0 => (t, n, c),
        _ => bail!(
            "tensor \"x\" has shape {:?}, expected [T, n, C] with all sizes > 0",
            x.dims()
        ),
    };
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        bail!(
            "tensor \"x\" has dtype {:?}, expected f32 or bf16",
            x.dtype()
        );
    }
    let phi = tensors.remove("phi");
    let shape = MhcShape {
        streams: n,
        width: c,
        sinkhorn_iters: sinkhorn_iters(tensors.remove("sinkhorn_iters"))?,
        dynamic: phi.is_some(),
    };
    let k = shape.k();
    let phi = phi
        .map(|t| checked_f32("phi", t, &[n * c, k]))
        .transpose()?;
    let alpha = match (tensors.remove("alpha"), shape.dynamic) {
        (Some(t), _) => checked_f32("alpha", t, &[3])?,
        (None, false) => Tensor::zeros(3, DType::F32, device)?,
        (None, true) => bail!("input has \"phi\" (dynamic mode) but no tensor \"alpha\" [3]"),
    };
    let b = checked_f32(
        "b",
        tensors
            .remove("b")
            .context("input has no tensor \"b\" [k]")?,
        &[k],
    )?;
    let gamma = tensors
        .remove("gamma")
        .context("input has no tensor \"gamma\" [C]")?;
    let gamma = checked_f32("gamma", gamma, &[c])?;
    let dout = tensors
        .remove("dout")
        .map(|t| checked_shape("dout", t, &[tokens, n, c]))
        .transpose()?;
    Ok(ApplyInputs {
        shape,
        x,
        phi,
        alpha,
        b,
        gamma,
        dout,
    })
}

/// Reads `input`, runs the sublayer with `imp` on `device`, writes `output` (see `APPLY_HELP`).
pub fn mhc_apply(input: &Path, output: &Path, imp: MhcImpl, device: &Device) -> Result<()> {
    let ApplyInputs {
        shape,
        x,
        phi,
        alpha,
        b,
        gamma,
        dout,
    } = read_inputs(input, device)?;
    let x = Var::from_tensor(&x)?;
    let phi = phi.map(|t| Var::from_tensor(&t)).transpose()?;
    let alpha = Var::from_tensor(&alpha)?;
    let b = Var::from_tensor(&b)?;
    let gamma = Var::from_tensor(&gamma)?;
    let (h, x_out) = sublayer(imp, &shape, &x, phi.as_deref(), &alpha, &b, &gamma)?;

    let mut out = HashMap::from([
        ("x_out".to_string(), x_out.clone()),
        ("h".to_string(), h.contiguous()?),
    ]);
    if let Some(dout) = dout {
        let loss = (x_out.to_dtype(DType::F32)? * dout.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = loss.backward()?;
        let mut grad_of = |name: &str, var: &Tensor| -> Result<()> {
            // A parameter the chosen impl never used (alpha in static mode) has gradient zero.
            let grad = match grads.get(var) {
                Some(g) => g.clone(),
                None => var.zeros_like()?,
            };
            out.insert(name.to_string(), grad);
            Ok(())
        };
        grad_of("dx", &x)?;
        if let Some(phi) = &phi {
            grad_of("dphi", phi)?;
        }
        grad_of("dalpha", &alpha)?;
        grad_of("db", &b)?;
        grad_of("dgamma", &gamma)?;
    }
    write_atomically(&out, output)
}

/// H and x' of one sublayer through the chosen implementation.
fn sublayer(
    imp: MhcImpl,
    shape: &MhcShape,
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha: &Tensor,
    b: &Tensor,
    gamma: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match imp {
        // The chained ops with the RMSNorm fused into pre: the backward writes dx once.
        MhcImpl::Fused => {
            let alpha_b = Tensor::cat(&[alpha, b], 0)?;
            let norm = ops::PreNorm {
                gamma,
                eps: RMS_NORM_EPS,
            };
            let (x_out, h) =
                ops::sublayer_normed(x, phi, &alpha_b, shape, norm, |y| Ok(y.clone()))?;
            Ok((h, x_out))
        }
        MhcImpl::Reference => {
            let h = reference::coeffs(x, phi, alpha, b, shape)?;
            let u = reference::pre(x, &h, shape)?;
            let y = rms_norm(&u, gamma)?;
            let x_out = reference::post(x, &h, &y, shape)?;
            Ok((h, x_out))
        }
    }
}

/// F(u) = u / sqrt(mean(u^2) + RMS_NORM_EPS) * gamma over the last axis, back in u's dtype: the
/// fused RMSNorm op (`crate::model::rms_norm`).
pub fn rms_norm(u: &Tensor, gamma: &Tensor) -> candle_core::Result<Tensor> {
    crate::model::rms_norm::rms_norm(u, gamma, RMS_NORM_EPS)
}

/// t with its shape checked against `want`.
fn checked_shape(name: &str, t: Tensor, want: &[usize]) -> Result<Tensor> {
    if t.dims() != want {
        bail!(
            "tensor {name:?} has shape {:?}, expected {want:?}",
            t.dims()
        );
    }
    Ok(t)
}

/// t with its shape checked and its dtype required to be f32 (mHC parameters are f32).
fn checked_f32(name: &str, t: Tensor, want: &[usize]) -> Result<Tensor> {
    let t = checked_shape(name, t, want)?;
    if t.dtype() != DType::F32 {
        bail!("tensor {name:?} has dtype {:?}, expected f32", t.dtype());
    }
    Ok(t)
}

/// t_max from the optional one-element `sinkhorn_iters` tensor.
fn sinkhorn_iters(t: Option<Tensor>) -> Result<usize> {
    let Some(t) = t else {
        return Ok(DEFAULT_SINKHORN_ITERS);
    };
    if t.elem_count() != 1 {
        bail!(
            "tensor \"sinkhorn_iters\" has shape {:?}, expected a scalar",
            t.dims()
        );
    }
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
    if !((1.0..=1e4).contains(&v) && v.fract() == 0.0) {
        bail!("tensor \"sinkhorn_iters\" is {v}, expected an integer in 1..=10000");
    }
    Ok(v as usize)
}

/// Writes `tensors` to `<dir>/.<name>.tmp-<pid>`, then renames it to `path`: a reader never sees
/// a half-written file.
pub fn write_atomically(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("output path {} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        // Best effort: the error being returned is the one that matters.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
