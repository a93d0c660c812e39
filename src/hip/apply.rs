//! `mhc-train mhc-apply --device hip`: one mHC sublayer with F = RMSNorm on an AMD GPU, with the
//! same input and output files as on CPU and CUDA (`crate::mhc::apply::APPLY_HELP`). The mHC ops
//! run as fused kernels; F (forward and backward) and the sum of dx's three contributions run on
//! the host in f32, as candle computes them (no RMSNorm or elementwise kernel in kernels/ yet).

use super::mhc::Sublayer;
use super::runtime::{Device, DeviceElem};
use crate::mhc::apply::{read_inputs, write_atomically, ApplyInputs, RMS_NORM_EPS};
use crate::mhc::cpu::Elem;
use crate::mhc::MhcShape;
use anyhow::{bail, Result};
use candle_core::{DType, Device as Cpu, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::path::Path;

/// Reads `input`, runs the sublayer on AMD GPU 0, writes `output`.
pub fn mhc_apply(input: &Path, output: &Path) -> Result<()> {
    let ApplyInputs {
        shape,
        x,
        phi,
        alpha,
        b,
        gamma,
        dout,
    } = read_inputs(input, &Cpu::Cpu)?;
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let phi = phi.as_ref().map(values).transpose()?.unwrap_or_default();
    let alpha_b = [values(&alpha)?, values(&b)?].concat();
    let gamma = values(&gamma)?;
    let dout = dout.as_ref().map(values).transpose()?;
    let inputs = Inputs {
        shape,
        phi: &phi,
        alpha_b: &alpha_b,
        gamma: &gamma,
        dout: dout.as_deref(),
    };
    let dev = Device::open(0)?;
    let x_flat = x.flatten_all()?;
    let out = match x.dtype() {
        DType::F32 => run::<f32>(&dev, &x_flat.to_vec1::<f32>()?, &inputs)?,
        DType::BF16 => run::<bf16>(&dev, &x_flat.to_vec1::<bf16>()?, &inputs)?,
        other => bail!("tensor \"x\" has dtype {other:?}, expected f32 or bf16"),
    };
    write_atomically(&out, output)
}

struct Inputs<'a> {
    shape: MhcShape,
    phi: &'a [f32],
    alpha_b: &'a [f32],
    gamma: &'a [f32],
    dout: Option<&'a [f32]>,
}

fn run<T: DeviceElem + Elem>(
    dev: &Device,
    x: &[T],
    inp: &Inputs,
) -> Result<HashMap<String, Tensor>> {
    let shape = inp.shape;
    let (n, c, k) = (shape.streams, shape.width, shape.k());
    let tokens = x.len() / (n * c);
    let mut layer = Sublayer::new(dev, shape, false, x, inp.phi, inp.alpha_b)?;
    layer.forward_pre(dev)?;
    let u = layer.u.to_host()?;
    let y = rms_norm(&u, inp.gamma, c);
    layer.y.copy_from_host(&y)?;
    layer.forward_post(dev)?;
    let cpu = &Cpu::Cpu;
    let mut out = HashMap::from([
        (
            "x_out".to_string(),
            Tensor::from_vec(layer.x_out.to_host()?, (tokens, n, c), cpu)?,
        ),
        (
            "h".to_string(),
            Tensor::from_vec(layer.h.to_host()?, (tokens, k), cpu)?,
        ),
    ]);
    let Some(dout) = inp.dout else {
        return Ok(out);
    };
    // dL/dx' of sum(x_out * dout) in x's dtype, as autograd hands it to the op.
    let g: Vec<T> = dout.iter().map(|&v| T::from_f32(v)).collect();
    layer.g.copy_from_host(&g)?;
    layer.backward_post(dev)?;
    let dy = layer.dy.to_host()?;
    let (du, dgamma) = rms_norm_backward(&u, inp.gamma, &dy, c);
    layer.du.copy_from_host(&du)?;
    layer.backward_pre(dev)?;
    // dx = the three contributions, added in x's dtype in autograd's order (post, pre, coeffs).
    let mut dx = layer.dx_post.to_host()?;
    let mut parts = vec![layer.dx_pre.to_host()?];
    if shape.dynamic {
        parts.push(layer.dx_coeffs.to_host()?);
    }
    for part in parts {
        for (acc, v) in dx.iter_mut().zip(part) {
            *acc = T::from_f32(acc.to_f32() + v.to_f32());
        }
    }
    let dalpha_b = layer.dalpha_b.to_host()?;
    out.insert("dx".into(), Tensor::from_vec(dx, (tokens, n, c), cpu)?);
    if shape.dynamic {
        out.insert(
            "dphi".into(),
            Tensor::from_vec(layer.dphi.to_host()?, (n * c, k), cpu)?,
        );
    }
    out.insert("dalpha".into(), Tensor::from_slice(&dalpha_b[..3], 3, cpu)?);
    out.insert("db".into(), Tensor::from_slice(&dalpha_b[3..], k, cpu)?);
    out.insert("dgamma".into(), Tensor::from_vec(dgamma, c, cpu)?);
    Ok(out)
}

/// 1 / sqrt(mean(u_t^2) + eps) of one row, in f32.
fn inv_rms<T: Elem>(row: &[T]) -> f32 {
    let mean = row.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>() / row.len() as f32;
    1.0 / (mean + RMS_NORM_EPS as f32).sqrt()
}

/// F(u) = u / sqrt(mean(u^2) + eps) * gamma per row of C, in f32, rounded to u's dtype.
fn rms_norm<T: Elem>(u: &[T], gamma: &[f32], c: usize) -> Vec<T> {
    u.chunks_exact(c)
        .flat_map(|row| {
            let inv = inv_rms(row);
            row.iter()
                .zip(gamma)
                .map(move |(v, g)| T::from_f32(v.to_f32() * inv * g))
        })
        .collect()
}

/// F's backward: du (u's dtype) and dgamma (f32) from dy. With s = 1/rms and yhat = u s:
/// dgamma_c = sum_t dy yhat, du = s (gamma dy) - u s^3 mean_c(gamma dy u).
fn rms_norm_backward<T: Elem>(u: &[T], gamma: &[f32], dy: &[T], c: usize) -> (Vec<T>, Vec<f32>) {
    let mut du = Vec::with_capacity(u.len());
    let mut dgamma = vec![0.0f32; c];
    for (row, dy_row) in u.chunks_exact(c).zip(dy.chunks_exact(c)) {
        let s = inv_rms(row);
        let mut dot = 0.0f32;
        for ((v, d), (g, dg)) in row.iter().zip(dy_row).zip(gamma.iter().zip(&mut dgamma)) {
            let (v, d) = (v.to_f32(), d.to_f32());
            *dg += d * v * s;
            dot += g * d * v;
        }
        let mean = dot / c as f32;
        for ((v, d), g) in row.iter().zip(dy_row).zip(gamma) {
            let (v, d) = (v.to_f32(), d.to_f32());
            du.push(T::from_f32(s * g * d - v * s * s * s * mean));
        }
    }
    (du, dgamma)
}
