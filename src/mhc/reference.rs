//! The mHC reference in plain candle ops: the oracle every custom op and fused kernel is checked
//! against (spec/mhc.md). Every step is an ordinary candle op, so candle's autograd gives the exact
//! backward of the forward that was run; nothing here is tuned for speed beyond avoiding needless
//! work (the mixes are batched matmuls over [T, n, C]).
//!
//! Compute dtype: F64 when x is F64, F32 otherwise (bf16 storage is upcast, as the kernels do).

use candle_core::{DType, Result, Tensor};

use super::{MhcShape, EPS_RMS, EPS_SINKHORN};

/// The dtype all arithmetic runs in for a stream stored as `storage`.
fn compute_dtype(storage: DType) -> DType {
    if storage == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks that `x` is `[T, n, C]` for `shape` and returns T.
fn tokens_of(x: &Tensor, shape: &MhcShape) -> Result<usize> {
    let (tokens, streams, width) = x.dims3()?;
    if streams != shape.streams || width != shape.width {
        candle_core::bail!(
            "mhc: x has shape {:?}, expected [T, n={}, C={}]",
            x.dims(),
            shape.streams,
            shape.width
        )
    }
    Ok(tokens)
}

/// Checks that `h` is `[T, k]` for `shape`.
fn check_h(h: &Tensor, tokens: usize, shape: &MhcShape) -> Result<()> {
    if h.dims() != [tokens, shape.k()] {
        candle_core::bail!(
            "mhc: H has shape {:?}, expected [T={tokens}, k={}]",
            h.dims(),
            shape.k()
        )
    }
    Ok(())
}

/// sigmoid(z) = 1 / (1 + exp(-z)) by candle-nn's op, whose backward is the exact
/// g * s * (1 - s) from the result (composing it from exp/recip would give inf * 0 = NaN in the
/// backward for very negative z). The input is made contiguous because H's column groups are
/// narrows of one [T, k] tensor.
fn sigmoid(z: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(&z.contiguous()?)
}

/// alpha [3] spread to one value per column of H: n x alpha_pre, n x alpha_post, n*n x alpha_res.
fn alpha_per_column(alpha: &Tensor, shape: &MhcShape) -> Result<Tensor> {
    let group: Vec<u32> = (0..shape.k())
        .map(|c| match c {
            c if c < shape.post_offset() => 0,
            c if c < shape.res_offset() => 1,
            _ => 2,
        })
        .collect();
    let group = Tensor::from_vec(group, shape.k(), alpha.device())?;
    alpha.index_select(&group, 0)
}

/// H [T, k] (k = n*n + 2n, columns [pre | post | res row-major]) from x [T, n, C].
/// Compute dtype: F64 if x is F64, else F32 (x is upcast; phi/alpha/b must already be in the
/// compute dtype). phi [n*C, k] (None in static mode: then Ht = b for every token, alpha unused),
/// alpha [3] = (alpha_pre, alpha_post, alpha_res), b [k].
/// P = xbar . phi; r = sqrt(mean(xbar^2) + EPS_RMS); Ht_c = alpha_g(c) * P_c / r + b_c;
/// H_pre = sigmoid, H_post = 2 sigmoid, H_res = sinkhorn(reshape(Ht_res, n, n)).
pub fn coeffs(
    x: &Tensor,
    phi: Option<&Tensor>,
    alpha: &Tensor,
    b: &Tensor,
    shape: &MhcShape,
) -> Result<Tensor> {
    let tokens = tokens_of(x, shape)?;
    let (n, k) = (shape.streams, shape.k());
    if phi.is_some() != shape.dynamic {
        candle_core::bail!(
            "mhc coeffs: phi must be given exactly when shape.dynamic (dynamic = {}, phi given = {})",
            shape.dynamic,
            phi.is_some()
        )
    }
    if b.dims() != [k] {
        candle_core::bail!("mhc coeffs: b has shape {:?}, expected [k={k}]", b.dims())
    }
    let ht = match phi {
        Some(phi) => {
            if phi.dims() != [n * shape.width, k] {
                candle_core::bail!(
                    "mhc coeffs: phi has shape {:?}, expected [n*C={}, k={k}]",
                    phi.dims(),
                    n * shape.width
                )
            }
            if alpha.dims() != [3] {
                candle_core::bail!(
                    "mhc coeffs: alpha has shape {:?}, expected [3]",
                    alpha.dims()
                )
            }
            let xbar = x
                .to_dtype(compute_dtype(x.dtype()))?
                .reshape((tokens, n * shape.width))?;
            let p = xbar.matmul(phi)?;
            let r = (xbar.sqr()?.mean_keepdim(1)? + EPS_RMS)?.sqrt()?;
            p.broadcast_div(&r)?
                .broadcast_mul(&alpha_per_column(alpha, shape)?)?
                .broadcast_add(b)?
        }
        // Static mode: every token gets the same Ht = b; broadcast_as sums b's gradient over tokens.
        None => b.unsqueeze(0)?.broadcast_as((tokens, k))?,
    };
    let h_pre = sigmoid(&ht.narrow(1, 0, n)?)?;
    let h_post = (sigmoid(&ht.narrow(1, shape.post_offset(), n)?)? * 2.0)?;
    let res_logits = ht
        .narrow(1, shape.res_offset(), n * n)?
        .contiguous()?
        .reshape((tokens, n, n))?;
    let h_res = sinkhorn(&res_logits, shape.sinkhorn_iters)?.reshape((tokens, n * n))?;
    Tensor::cat(&[h_pre, h_post, h_res], 1)
}

/// Sinkhorn-Knopp on logits [T, n, n]: M0 = exp(L - max(L)) (max per token), then t_max times
/// column-normalise then row-normalise, each as M / (sum + EPS_SINKHORN).
///
/// The max is kept in the autograd graph (not detached): with EPS_SINKHORN > 0 the output depends
/// on it, weakly at small logits but measurably when a column's entries are all far below the
/// max (dropping it moves dx by ~2e-4 relative at logit scale 3), and keeping it makes the
/// gradient exact for the forward that was run, which is what finite differences check. It is
/// taken as a gather at the argmax so that at ties exactly one element (the first) receives the
/// max's gradient, as a kernel tracking one argmax would do; candle's max backward would route
/// it to every tied element.
pub fn sinkhorn(logits: &Tensor, iters: usize) -> Result<Tensor> {
    let (tokens, rows, cols) = logits.dims3()?;
    if rows != cols {
        candle_core::bail!("mhc sinkhorn: logits {:?} are not [T, n, n]", logits.dims())
    }
    let flat = logits.reshape((tokens, rows * cols))?;
    let argmax = flat.argmax_keepdim(1)?;
    let max = flat.gather(&argmax, 1)?.reshape((tokens, 1, 1))?;
    let mut m = logits.broadcast_sub(&max)?.exp()?;
    for _ in 0..iters {
        // Column j sums over rows i (dim 1); row i sums over columns j (dim 2).
        m = m.broadcast_div(&(m.sum_keepdim(1)? + EPS_SINKHORN)?)?;
        m = m.broadcast_div(&(m.sum_keepdim(2)? + EPS_SINKHORN)?)?;
    }
    Ok(m)
}

/// u [T, C] = sum_j H_pre[j] x_j, in x's dtype (computed in the compute dtype).
pub fn pre(x: &Tensor, h: &Tensor, shape: &MhcShape) -> Result<Tensor> {
    let tokens = tokens_of(x, shape)?;
    check_h(h, tokens, shape)?;
    let dtype = compute_dtype(x.dtype());
    // [T, 1, n] x [T, n, C] -> [T, 1, C]
    let h_pre = h
        .narrow(1, 0, shape.streams)?
        .to_dtype(dtype)?
        .contiguous()?
        .unsqueeze(1)?;
    h_pre
        .matmul(&x.to_dtype(dtype)?.contiguous()?)?
        .squeeze(1)?
        .to_dtype(x.dtype())
}

/// x' [T, n, C]: x'_i = sum_j H_res[i, j] x_j + H_post[i] y, in x's dtype.
pub fn post(x: &Tensor, h: &Tensor, y: &Tensor, shape: &MhcShape) -> Result<Tensor> {
    let tokens = tokens_of(x, shape)?;
    check_h(h, tokens, shape)?;
    if y.dims() != [tokens, shape.width] {
        candle_core::bail!(
            "mhc post: y has shape {:?}, expected [T={tokens}, C={}]",
            y.dims(),
            shape.width
        )
    }
    let n = shape.streams;
    let dtype = compute_dtype(x.dtype());
    let h = h.to_dtype(dtype)?;
    let h_res = h
        .narrow(1, shape.res_offset(), n * n)?
        .contiguous()?
        .reshape((tokens, n, n))?;
    let h_post = h.narrow(1, shape.post_offset(), n)?.unsqueeze(2)?; // [T, n, 1]
    let mixed = h_res.matmul(&x.to_dtype(dtype)?.contiguous()?)?; // [T, n, C]
    let distributed = h_post.broadcast_mul(&y.to_dtype(dtype)?.unsqueeze(1)?)?; // [T, n, C]
    (mixed + distributed)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn alpha_columns_follow_the_layout() -> Result<()> {
        let shape = MhcShape {
            streams: 2,
            width: 3,
            sinkhorn_iters: 1,
            dynamic: true,
        };
        let alpha = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?;
        let cols = alpha_per_column(&alpha, &shape)?.to_vec1::<f64>()?;
        assert_eq!(cols, vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]);
        Ok(())
    }
}
