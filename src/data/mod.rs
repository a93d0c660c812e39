//! The data pipeline: tokenizer (trained on first use or the user's), token streams (text encoded
//! once and cached, or llm.c `.bin` shards), the train/val split, and batch sampling that is
//! seeded, resumable and sharded by data-parallel rank.

mod corpus;
mod sampler;
mod tokenizer;

pub use corpus::{TokenStream, BIN_MAGIC, BIN_VERSION};
pub use sampler::{val_batch, Sampler, SamplerState};
pub use tokenizer::{load_tokenizer, train_byte_level_bpe, END_OF_TEXT};

use anyhow::{bail, Result};
use corpus::InputKind;

use crate::config::DataConfig;

pub struct Dataset {
    pub train: TokenStream,
    pub val: TokenStream,
    /// None only for `.bin` inputs when no tokenizer file exists (training needs none then).
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

/// Loads/trains the tokenizer, encodes (cached), splits. Errors: missing/empty inputs, unreadable
/// files, bad .bin header, token >= vocab_size, either split shorter than seq_len + 1 tokens
/// (message names seq_len and the split length).
pub fn load_dataset(cfg: &DataConfig, vocab_size: usize, seq_len: usize) -> Result<Dataset> {
    if cfg.train.is_empty() {
        bail!("data.train names no input files");
    }
    let train_files = corpus::expand_inputs(&cfg.train, "data.train")?;
    let val_files = corpus::expand_inputs(&cfg.val, "data.val")?;
    let all_files: Vec<_> = train_files.iter().chain(&val_files).cloned().collect();
    let kind = corpus::common_kind(&all_files)?;

    let (train, val, tokenizer) = match kind {
        InputKind::Text => {
            let tokenizer = tokenizer::load_or_train(&cfg.tokenizer, vocab_size, &train_files)?;
            let json = tokenizer::tokenizer_bytes(&cfg.tokenizer)?;
            let encode = |files: &[_]| {
                corpus::encode_text_cached(files, &tokenizer, &json, vocab_size, &cfg.cache_dir)
            };
            let train = encode(&train_files)?;
            let val = if val_files.is_empty() {
                None
            } else {
                Some(encode(&val_files)?)
            };
            (train, val, Some(tokenizer))
        }
        InputKind::Bin => {
            // Shards are already tokens; a tokenizer is only loaded (for decoding samples) if present.
            let tokenizer = if cfg.tokenizer.exists() {
                let tokenizer = load_tokenizer(&cfg.tokenizer)?;
                tokenizer::check_vocab(&tokenizer, &cfg.tokenizer, vocab_size)?;
                Some(tokenizer)
            } else {
                None
            };
            let train = corpus::read_bin_shards(&train_files, vocab_size)?;
            let val = if val_files.is_empty() {
                None
            } else {
                Some(corpus::read_bin_shards(&val_files, vocab_size)?)
            };
            (train, val, tokenizer)
        }
    };

    let (train, val) = match val {
        Some(val) => (train, val),
        None => split_tail(train, cfg.val_fraction)?,
    };
    for (name, split) in [("training", &train), ("validation", &val)] {
        if split.len() < seq_len + 1 {
            bail!(
                "the {name} split has {} tokens, fewer than seq_len + 1 = {} (seq_len = {seq_len}); \
                 use more data, a shorter model.seq_len, or a different data.val_fraction",
                split.len(),
                seq_len + 1
            );
        }
    }
    Ok(Dataset {
        train,
        val,
        tokenizer,
    })
}

/// The last `val_fraction` of the stream (rounded to whole tokens) becomes validation.
fn split_tail(stream: TokenStream, val_fraction: f64) -> Result<(TokenStream, TokenStream)> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!("data.val_fraction = {val_fraction} must be in (0, 1) when data.val is empty");
    }
    let val_len = (stream.len() as f64 * val_fraction).round() as usize;
    let at = stream.len() - val_len;
    Ok(stream.split_at(at))
}
