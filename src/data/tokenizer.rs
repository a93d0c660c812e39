//! The tokenizer: a byte-level BPE trained on the training text on first use, or any
//! `tokenizer.json` the user puts at `data.tokenizer` (GPT-2's, for instance).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use super::corpus::write_atomically;

/// Separates documents (input files) in the token stream, as in GPT-2.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Loads a `tokenizer.json` as is.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// Errors when the tokenizer can emit ids the model has no embedding for.
pub(crate) fn check_vocab(tokenizer: &Tokenizer, path: &Path, vocab_size: usize) -> Result<()> {
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    if tokenizer_vocab > vocab_size {
        bail!(
            "tokenizer {} has a vocabulary of {tokenizer_vocab} tokens, larger than \
             model.vocab_size = {vocab_size}; raise model.vocab_size to at least {tokenizer_vocab} \
             or point data.tokenizer at another file",
            path.display()
        );
    }
    Ok(())
}

/// The tokenizer at `path`, trained on `train_files` and saved there first when the file is missing.
pub(crate) fn load_or_train(
    path: &Path,
    vocab_size: usize,
    train_files: &[PathBuf],
) -> Result<Tokenizer> {
    if !path.exists() {
        let tokenizer = train_byte_level_bpe(train_files, vocab_size)?;
        let json = tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialise the trained tokenizer: {e}"))?;
        write_atomically(path, json.as_bytes())?;
    }
    // Loading what was saved (rather than keeping the trained object) makes a fresh run and a
    // resumed run use exactly the same tokenizer.
    let tokenizer = load_tokenizer(path)?;
    check_vocab(&tokenizer, path, vocab_size)?;
    Ok(tokenizer)
}

/// Trains a GPT-2 style byte-level BPE: every byte is in the alphabet, so any text encodes and
/// `decode(encode(s)) == s`. The vocabulary counts the 256 bytes and `<|endoftext|>`.
pub fn train_byte_level_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    // The byte alphabet plus the special token must fit, or the trainer would silently exceed it.
    let minimum = ByteLevel::alphabet().len() + 1;
    if vocab_size < minimum {
        bail!("model.vocab_size = {vocab_size} is too small for a byte-level BPE (needs at least {minimum})");
    }
    let mut texts = Vec::with_capacity(files.len());
    for file in files {
        texts.push(super::corpus::read_text(file)?);
    }
    // No prefix space: it would add a byte that decode cannot remove.
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level))
    .with_decoder(Some(byte_level))
    .build()
    .map_err(|e| anyhow!("cannot build the tokenizer: {e}"))?;
    // Lines with their endings, as the crate's own train_from_files feeds them.
    let lines = texts.iter().flat_map(|text| text.split_inclusive('\n'));
    tokenizer
        .train(&mut trainer, lines)
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    Ok(tokenizer.into())
}

/// The id of `<|endoftext|>`, when the tokenizer has one (a user's tokenizer may not).
pub(crate) fn end_of_text_id(tokenizer: &Tokenizer) -> Option<u32> {
    tokenizer.token_to_id(END_OF_TEXT)
}

/// Encodes `chunks` (pieces of `file` cut at line ends) in parallel and concatenates the ids.
pub(crate) fn encode_chunks(
    tokenizer: &Tokenizer,
    chunks: Vec<&str>,
    file: &Path,
) -> Result<Vec<u32>> {
    let encodings = tokenizer
        .encode_batch_fast(chunks, false)
        .map_err(|e| anyhow!("cannot tokenize {}: {e}", file.display()))?;
    let mut ids = Vec::with_capacity(encodings.iter().map(|e| e.len()).sum());
    for encoding in &encodings {
        ids.extend_from_slice(encoding.get_ids());
    }
    Ok(ids)
}

/// Reads the tokenizer file's bytes (for the cache key).
pub(crate) fn tokenizer_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read tokenizer {}", path.display()))
}
