//! The GPT model: token embedding -> (mHC: copy into n streams) -> L blocks of two sublayers
//! (attention, MLP) -> (mHC: mean over streams) -> final RMSNorm -> LM head.
//!
//! residual = "plain": x <- x + F(x). residual = "mhc": x <- H_res x + H_post F(H_pre x) per token.

use super::layers::{causal_mask, rms_norm, Attention, Linear, Mlp, Rope, INIT_STD};
use super::params::{Init, Params};
use crate::config::{ModelConfig, Residual};
use crate::mhc::layer::Mhc;
use crate::mhc::MhcShape;
use candle_core::{DType, Device, Module, Result, Tensor, D};

struct Block {
    attn: Attention,
    mlp: Mlp,
    /// (attention's, MLP's) mHC wrappers; None for plain residuals.
    mhc: Option<(Mhc, Mhc)>,
}

pub struct Gpt {
    cfg: ModelConfig,
    dtype: DType,
    wte: Tensor,
    lm_head: Linear,
    blocks: Vec<Block>,
    norm_f: Tensor,
    rope: Rope,
    mask: Tensor,
}

/// The forward pass's outputs: logits and, for mHC, every sublayer's H [T, k] (detached).
pub struct Output {
    pub logits: Tensor,
    pub coeffs: Vec<Tensor>,
}

impl Gpt {
    pub fn new(params: &mut Params, cfg: &ModelConfig, dtype: DType) -> Result<Self> {
        let device = params.device().clone();
        let wte = params.f32_param(
            "wte",
            (cfg.vocab_size, cfg.width),
            Init::Normal(INIT_STD),
            true,
        )?;
        let lm_head = if cfg.tie_embeddings {
            Linear::from_weight(wte.clone())
        } else {
            Linear::new(params, "lm_head", cfg.width, cfg.vocab_size, INIT_STD)?
        };
        let shape = MhcShape {
            streams: cfg.streams,
            width: cfg.width,
            sinkhorn_iters: cfg.sinkhorn_iters,
            dynamic: cfg.dynamic,
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("blocks.{l}");
            let mhc = match cfg.residual {
                Residual::Plain => None,
                Residual::Mhc => Some((
                    Mhc::new(params, &format!("{p}.attn_mhc"), shape, cfg.mhc_impl)?,
                    Mhc::new(params, &format!("{p}.mlp_mhc"), shape, cfg.mhc_impl)?,
                )),
            };
            blocks.push(Block {
                attn: Attention::new(params, &format!("{p}.attn"), cfg)?,
                mlp: Mlp::new(params, &format!("{p}.mlp"), cfg)?,
                mhc,
            });
        }
        let norm_f = params.f32_param("norm_f", cfg.width, Init::Const(1.0), false)?;
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            wte,
            lm_head,
            blocks,
            norm_f,
            rope: Rope::new(cfg.width / cfg.heads, cfg.seq_len, &device)?,
            mask: causal_mask(cfg.seq_len, &device)?,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// ids [B, S] u32 -> logits [B, S, V] f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Output> {
        let (b, s) = ids.dims2()?;
        if s > self.cfg.seq_len {
            candle_core::bail!(
                "sequence of {s} tokens exceeds model.seq_len {}",
                self.cfg.seq_len
            );
        }
        let (c, t) = (self.cfg.width, b * s);
        let emb = self
            .wte
            .to_dtype(self.dtype)?
            .embedding(&ids.flatten_all()?)?; // [T, C]
        let mut coeffs = Vec::new();
        let hidden = match self.cfg.residual {
            Residual::Plain => {
                let mut x = emb.reshape((b, s, c))?;
                for block in &self.blocks {
                    x = (&x + block.attn.forward(&x, &self.rope, &self.mask)?)?;
                    x = (&x + block.mlp.forward(&x)?)?;
                }
                x.reshape((t, c))?
            }
            Residual::Mhc => {
                let n = self.cfg.streams;
                // Expand: the embedding is copied into all n streams.
                let mut x = emb.unsqueeze(1)?.broadcast_as((t, n, c))?.contiguous()?;
                for block in &self.blocks {
                    let (attn_mhc, mlp_mhc) = block.mhc.as_ref().expect("mhc blocks have mHC");
                    // F's leading RMSNorm runs inside the mHC sublayer (fused into pre).
                    let (x1, h1) = attn_mhc.forward(&x, block.attn.norm(), |y| {
                        let out = block.attn.forward_normed(
                            &y.reshape((b, s, c))?,
                            &self.rope,
                            &self.mask,
                        )?;
                        out.reshape((t, c))
                    })?;
                    let (x2, h2) =
                        mlp_mhc.forward(&x1, block.mlp.norm(), |y| block.mlp.forward_normed(y))?;
                    coeffs.push(h1.detach());
                    coeffs.push(h2.detach());
                    x = x2;
                }
                // Readout: mean over the n streams.
                x.mean(1)?
            }
        };
        let hidden = rms_norm(&hidden, &self.norm_f, self.cfg.norm_eps)?;
        let logits = self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?;
        Ok(Output {
            logits: logits.reshape((b, s, self.cfg.vocab_size))?,
            coeffs,
        })
    }

    /// Mean cross-entropy of next-token prediction; ids, targets [B, S] u32.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<(Tensor, Output)> {
        let out = self.forward(ids)?;
        let v = self.cfg.vocab_size;
        let loss =
            candle_nn::loss::cross_entropy(&out.logits.reshape(((), v))?, &targets.flatten_all()?)?;
        Ok((loss, out))
    }

    /// Greedy (temperature 0) or sampled continuation of `prompt` by `count` tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        count: usize,
        temperature: f64,
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<Vec<u32>> {
        let mut tokens = prompt.to_vec();
        for _ in 0..count {
            let start = tokens.len().saturating_sub(self.cfg.seq_len);
            let window = &tokens[start..];
            let ids = Tensor::from_slice(window, (1, window.len()), device)?;
            let logits = self.forward(&ids)?.logits.get(0)?.get(window.len() - 1)?;
            let next = if temperature <= 0.0 {
                logits.argmax(D::Minus1)?.to_scalar::<u32>()?
            } else {
                let probs = candle_nn::ops::softmax(&(logits / temperature)?, D::Minus1)?;
                let probs = probs.to_vec1::<f32>()?;
                let dist = rand::distr::weighted::WeightedIndex::new(&probs)
                    .map_err(candle_core::Error::wrap)?;
                rand::distr::Distribution::sample(&dist, rng) as u32
            };
            tokens.push(next);
        }
        Ok(tokens[prompt.len()..].to_vec())
    }
}
