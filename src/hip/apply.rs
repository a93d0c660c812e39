//! `mhc-train mhc-apply --device hip`: one mHC sublayer with F = RMSNorm on an AMD GPU, with the
//! same input and output files as on CPU and CUDA (`crate::mhc::apply::APPLY_HELP`). Everything
//! runs as fused kernels, as the trainer's chained sublayer on CUDA: F is the fused RMSNorm and
//! the backward writes dx once (docs/ops.md).

use super::mhc::{Chaining, Sublayer, SublayerF};
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
    let f = SublayerF::RmsNorm {
        gamma: inp.gamma,
        eps: RMS_NORM_EPS,
    };
    let chaining = Chaining::Chained;
    let mut layer = Sublayer::new(dev, shape, f, chaining, x, inp.phi, inp.alpha_b)?;
    layer.forward_pre(dev)?;
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
    layer.backward_pre(dev)?;
    // The chained backward writes dx in one buffer, in both modes.
    let [dx] = layer.dx_parts()[..] else {
        bail!("mhc-apply --device hip: the chained backward left dx in several parts")
    };
    let dx = dx.to_host()?;
    let dalpha_b = layer.dalpha_b.to_host()?;
    let dgamma = layer.dgamma().expect("F is RMSNorm").to_host()?;
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
