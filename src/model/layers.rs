//! Transformer sublayers F: pre-RMSNorm + causal self-attention, pre-RMSNorm + MLP.
//!
//! Built from differentiable candle ops only (candle-nn's fused rms_norm, softmax_last_dim and rope
//! have no backward). Weights are f32 master copies cast to the compute dtype on use; norms and
//! softmax run in f32.

use super::params::{Init, Params};
use crate::config::{Mlp as MlpKind, ModelConfig};
use crate::mhc::ops::PreNorm;
use candle_core::{DType, Device, Module, Result, Tensor, D};

/// std of linear weights (GPT-2); residual output projections use STD / sqrt(2 * layers).
pub const INIT_STD: f64 = 0.02;

/// y = x / sqrt(mean(x^2) + eps) * gamma over the last dim, returned in x's dtype: the fused
/// op of `super::rms_norm` (one kernel each way on CUDA, exact backward).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    super::rms_norm::rms_norm(x, gamma, eps)
}

/// A bias-free linear layer y = x W^T with an f32 master weight [out, in].
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(
        params: &mut Params,
        name: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
    ) -> Result<Self> {
        let weight = params.f32_param(name, (d_out, d_in), Init::Normal(std), true)?;
        Ok(Self { weight })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        x.broadcast_matmul(&w.t()?)
    }
}

/// Rotary position embedding tables (cos, sin) [seq_len, head_dim / 2].
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, seq_len: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for i in 0..half {
                let freq = 10000f64.powf(-((2 * i) as f64) / head_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (seq_len, half), device)?,
            sin: Tensor::from_vec(sin, (seq_len, half), device)?,
        })
    }

    /// Rotates pairs (x1, x2) = (first half, second half) of the last dim of x [B, H, S, D].
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, seq, dim) = x.dims4()?;
        let half = dim / 2;
        let cos = self.cos.narrow(0, 0, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, 0, seq)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    }
}

/// F_attn(u) = proj(causal_attention(rope(q), rope(k), v)) with q, k, v = qkv(RMSNorm(u)).
pub struct Attention {
    norm: Tensor,
    qkv: Linear,
    proj: Linear,
    heads: usize,
    eps: f64,
}

impl Attention {
    pub fn new(params: &mut Params, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.width;
        let out_std = INIT_STD / (2.0 * cfg.layers as f64).sqrt();
        Ok(Self {
            norm: params.f32_param(&format!("{prefix}.norm"), c, Init::Const(1.0), false)?,
            qkv: Linear::new(params, &format!("{prefix}.qkv"), c, 3 * c, INIT_STD)?,
            proj: Linear::new(params, &format!("{prefix}.proj"), c, c, out_std)?,
            heads: cfg.heads,
            eps: cfg.norm_eps,
        })
    }

    /// u [B, S, C] -> [B, S, C].
    pub fn forward(&self, u: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        self.forward_normed(&rms_norm(u, &self.norm, self.eps)?, rope, mask)
    }

    /// The leading RMSNorm, for the mHC sublayer to run fused into its pre.
    pub fn norm(&self) -> PreNorm<'_> {
        PreNorm {
            gamma: &self.norm,
            eps: self.eps,
        }
    }

    /// `forward` after its RMSNorm: y = RMSNorm(u) [B, S, C] -> [B, S, C].
    pub fn forward_normed(&self, y: &Tensor, rope: &Rope, mask: &Tensor) -> Result<Tensor> {
        let (b, s, c) = y.dims3()?;
        let hd = c / self.heads;
        let qkv = self.qkv.forward(y)?;
        let qkv = qkv
            .reshape((b, s, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = rope.apply(&qkv.get(0)?.contiguous()?)?;
        let k = rope.apply(&qkv.get(1)?.contiguous()?)?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_add(&mask.narrow(0, 0, s)?.narrow(1, 0, s)?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, c))?;
        self.proj.forward(&out)
    }
}

/// Additive causal mask [S, S]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// F_mlp(u) = down(act(up(RMSNorm(u)))), act = GELU, or SwiGLU (silu(gate) * up).
pub struct Mlp {
    norm: Tensor,
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
    eps: f64,
}

impl Mlp {
    pub fn new(params: &mut Params, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.width;
        let out_std = INIT_STD / (2.0 * cfg.layers as f64).sqrt();
        let hidden = match cfg.mlp {
            MlpKind::Gelu => cfg.mlp_ratio * c,
            // 2/3 keeps the parameter count of the 2-matrix MLP; round up to a multiple of 8.
            MlpKind::Swiglu => (2 * cfg.mlp_ratio * c / 3).div_ceil(8) * 8,
        };
        let gate = match cfg.mlp {
            MlpKind::Gelu => None,
            MlpKind::Swiglu => Some(Linear::new(
                params,
                &format!("{prefix}.gate"),
                c,
                hidden,
                INIT_STD,
            )?),
        };
        Ok(Self {
            norm: params.f32_param(&format!("{prefix}.norm"), c, Init::Const(1.0), false)?,
            up: Linear::new(params, &format!("{prefix}.up"), c, hidden, INIT_STD)?,
            gate,
            down: Linear::new(params, &format!("{prefix}.down"), hidden, c, out_std)?,
            eps: cfg.norm_eps,
        })
    }

    pub fn forward(&self, u: &Tensor) -> Result<Tensor> {
        self.forward_normed(&rms_norm(u, &self.norm, self.eps)?)
    }

    /// The leading RMSNorm, for the mHC sublayer to run fused into its pre.
    pub fn norm(&self) -> PreNorm<'_> {
        PreNorm {
            gamma: &self.norm,
            eps: self.eps,
        }
    }

    /// `forward` after its RMSNorm: y = RMSNorm(u).
    pub fn forward_normed(&self, y: &Tensor) -> Result<Tensor> {
        let up = self.up.forward(y)?;
        let act = match &self.gate {
            None => up.gelu()?,
            Some(gate) => (candle_nn::ops::silu(&gate.forward(y)?)? * up)?,
        };
        self.down.forward(&act)
    }
}
