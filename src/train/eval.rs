//! `mhc-train eval`: validation loss and perplexity of a checkpoint, plus a text sample.

use super::checkpoint;
use super::trainer::{build_model, validation_loss, Built};
use crate::data;
use anyhow::{Context, Result};
use rand::SeedableRng;
use std::path::Path;

pub struct EvalOptions {
    pub batches: Option<usize>,
    pub prompt: String,
    pub tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    /// Overrides of the checkpoint's config (e.g. device=cuda).
    pub overrides: Vec<String>,
}

pub struct EvalReport {
    pub step: usize,
    pub val_loss: f64,
    pub perplexity: f64,
    /// The prompt's continuation; None without a tokenizer (pre-tokenized data).
    pub sample: Option<String>,
}

pub fn evaluate(dir: &Path, options: &EvalOptions) -> Result<EvalReport> {
    let mut config = checkpoint::read_config(dir)?;
    if !options.overrides.is_empty() {
        config = crate::config::Config::from_toml_str(&config.to_toml(), &options.overrides)?;
    }
    let dataset = data::load_dataset(&config.data, config.model.vocab_size, config.model.seq_len)?;
    let Built {
        params,
        model,
        device,
    } = build_model(&config)?;
    let state = checkpoint::load(dir, &params, None)?;
    let rows = config.train.batch_size / config.train.grad_accum;
    let batches = options.batches.unwrap_or(config.log.eval_batches);
    let val_loss = validation_loss(&model, &dataset.val, batches, rows, &device)?;
    let sample = match &dataset.tokenizer {
        None => None,
        Some(tokenizer) => {
            let prompt = tokenizer
                .encode(options.prompt.as_str(), false)
                .map_err(anyhow::Error::msg)
                .context("cannot encode the prompt")?
                .get_ids()
                .to_vec();
            anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
            let ids = model.generate(
                &prompt,
                options.tokens,
                options.temperature,
                &mut rng,
                &device,
            )?;
            Some(tokenizer.decode(&ids, false).map_err(anyhow::Error::msg)?)
        }
    };
    Ok(EvalReport {
        step: state.step,
        val_loss,
        perplexity: val_loss.exp(),
        sample,
    })
}
