//! Input files and token streams: text files and folders (encoded once, cached under
//! `data.cache_dir`) or llm.c / nanoGPT `.bin` shards (read as they are).

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use tokenizers::Tokenizer;

use super::tokenizer::{encode_chunks, end_of_text_id};

/// A sequence of token ids, stored as u16 when every id fits (vocab <= 65536), else as u32.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStream {
    tokens: Tokens,
}

#[derive(Clone, Debug, PartialEq)]
enum Tokens {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl TokenStream {
    pub fn len(&self) -> usize {
        match &self.tokens {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `index`; panics when out of range, like slice indexing.
    pub fn get(&self, index: usize) -> u32 {
        match &self.tokens {
            Tokens::U16(t) => u32::from(t[index]),
            Tokens::U32(t) => t[index],
        }
    }

    /// Tokens `range` as u32 (the whole stream with `0..len()`).
    pub fn to_vec(&self, range: Range<usize>) -> Vec<u32> {
        let mut out = Vec::with_capacity(range.len());
        self.extend_into(range, &mut out);
        out
    }

    /// Appends tokens `range` to `out`.
    pub(crate) fn extend_into(&self, range: Range<usize>, out: &mut Vec<u32>) {
        match &self.tokens {
            Tokens::U16(t) => out.extend(t[range].iter().map(|&id| u32::from(id))),
            Tokens::U32(t) => out.extend_from_slice(&t[range]),
        }
    }

    /// Bytes per stored token.
    pub fn bytes_per_token(&self) -> usize {
        match &self.tokens {
            Tokens::U16(_) => 2,
            Tokens::U32(_) => 4,
        }
    }

    /// Splits at `at`: (tokens before, tokens from `at` on).
    pub(crate) fn split_at(self, at: usize) -> (TokenStream, TokenStream) {
        let (head, tail) = match self.tokens {
            Tokens::U16(mut t) => {
                let tail = t.split_off(at);
                (Tokens::U16(t), Tokens::U16(tail))
            }
            Tokens::U32(mut t) => {
                let tail = t.split_off(at);
                (Tokens::U32(t), Tokens::U32(tail))
            }
        };
        (TokenStream { tokens: head }, TokenStream { tokens: tail })
    }

    /// Stores `ids` in the narrowest width that holds ids below `vocab_size`.
    fn from_ids(ids: Vec<u32>, vocab_size: usize) -> Self {
        let tokens = if vocab_size <= 1 << 16 {
            Tokens::U16(ids.into_iter().map(|id| id as u16).collect())
        } else {
            Tokens::U32(ids)
        };
        TokenStream { tokens }
    }
}

/// What the inputs are; every input of a run (train and val) must be of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InputKind {
    Text,
    Bin,
}

fn kind_of(file: &Path) -> InputKind {
    if file.extension().is_some_and(|e| e == "bin") {
        InputKind::Bin
    } else {
        InputKind::Text
    }
}

/// Expands `paths` (files, or folders searched recursively for `.txt` files, sorted so the
/// token stream does not depend on directory order) and checks every file exists and is non-empty.
/// `key` names the config field in errors.
pub(crate) fn expand_inputs(paths: &[PathBuf], key: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).with_context(|| {
            format!(
                "{key}: input {} does not exist or cannot be read",
                path.display()
            )
        })?;
        if meta.is_dir() {
            let mut found = Vec::new();
            collect_txt(path, &mut found)?;
            if found.is_empty() {
                bail!("{key}: folder {} contains no .txt files", path.display());
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    for file in &files {
        let len = fs::metadata(file)
            .with_context(|| format!("{key}: cannot read {}", file.display()))?
            .len();
        if len == 0 {
            bail!("{key}: input file {} is empty", file.display());
        }
    }
    Ok(files)
}

fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list folder {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_txt(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "txt") {
            out.push(path);
        }
    }
    Ok(())
}

/// The one kind shared by all `files`, or an error naming a file of each kind.
pub(crate) fn common_kind(files: &[PathBuf]) -> Result<InputKind> {
    let first = files.first().context("no input files")?;
    let kind = kind_of(first);
    if let Some(other) = files.iter().find(|f| kind_of(f) != kind) {
        bail!(
            "data inputs mix .bin token shards and text files ({} and {}); use one kind only",
            first.display(),
            other.display()
        );
    }
    Ok(kind)
}

/// Reads a UTF-8 text file.
pub(crate) fn read_text(file: &Path) -> Result<String> {
    let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Errors unless every id is below `vocab_size`; `source` names the file the ids came from.
fn check_ids(ids: impl Iterator<Item = u32>, vocab_size: usize, source: &Path) -> Result<()> {
    for (position, id) in ids.enumerate() {
        if id as usize >= vocab_size {
            bail!(
                "{}: token id {id} at position {position} is >= model.vocab_size = {vocab_size}",
                source.display()
            );
        }
    }
    Ok(())
}

/// llm.c's shard header: 256 little-endian int32, then `header[2]` uint16 tokens.
pub const BIN_MAGIC: i32 = 20240520;
pub const BIN_VERSION: i32 = 1;
const BIN_HEADER_BYTES: usize = 256 * 4;

/// Reads and concatenates llm.c `.bin` shards, checking their headers and ids.
pub(crate) fn read_bin_shards(files: &[PathBuf], vocab_size: usize) -> Result<TokenStream> {
    let mut ids = Vec::new();
    for file in files {
        let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        if bytes.len() < BIN_HEADER_BYTES {
            bail!(
                "{}: too short for an llm.c token shard ({} bytes, the header alone is {BIN_HEADER_BYTES})",
                file.display(),
                bytes.len()
            );
        }
        let header =
            |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        if header(0) != BIN_MAGIC {
            bail!(
                "{}: bad magic number {} in the .bin header (an llm.c token shard starts with {BIN_MAGIC})",
                file.display(),
                header(0)
            );
        }
        if header(1) != BIN_VERSION {
            bail!(
                "{}: unsupported .bin version {} (only version {BIN_VERSION}, uint16 tokens, is read)",
                file.display(),
                header(1)
            );
        }
        let count = usize::try_from(header(2)).with_context(|| {
            format!(
                "{}: negative token count {} in the .bin header",
                file.display(),
                header(2)
            )
        })?;
        let body = &bytes[BIN_HEADER_BYTES..];
        if body.len() != 2 * count {
            bail!(
                "{}: the .bin header says {count} tokens ({} bytes) but the file holds {} bytes after the header",
                file.display(),
                2 * count,
                body.len()
            );
        }
        let start = ids.len();
        ids.extend(
            body.chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
        );
        check_ids(ids[start..].iter().copied(), vocab_size, file)?;
    }
    Ok(TokenStream::from_ids(ids, vocab_size))
}

/// Text inputs encoded as one stream, each file followed by `<|endoftext|>` (when the tokenizer
/// has it). The ids are cached in `cache_dir` under a name that hashes the input paths, sizes,
/// mtimes and the tokenizer file, so a changed input or tokenizer re-encodes.
pub(crate) fn encode_text_cached(
    files: &[PathBuf],
    tokenizer: &Tokenizer,
    tokenizer_json: &[u8],
    vocab_size: usize,
    cache_dir: &Path,
) -> Result<TokenStream> {
    let cache = cache_dir.join(cache_file_name(files, tokenizer_json, vocab_size)?);
    if cache.exists() {
        let stream = read_cache(&cache, vocab_size)?;
        check_ids((0..stream.len()).map(|i| stream.get(i)), vocab_size, &cache)?;
        return Ok(stream);
    }
    let eot = end_of_text_id(tokenizer);
    let mut ids = Vec::new();
    for file in files {
        let text = read_text(file)?;
        let file_ids = encode_chunks(tokenizer, line_chunks(&text, 1 << 16), file)?;
        check_ids(file_ids.iter().copied(), vocab_size, file)?;
        ids.extend_from_slice(&file_ids);
        ids.extend(eot);
    }
    let stream = TokenStream::from_ids(ids, vocab_size);
    write_cache(&cache, &stream)?;
    Ok(stream)
}

/// Cuts `text` into pieces of about `target` bytes at line ends, so they can be encoded in
/// parallel. The byte-level pre-tokenizer splits at line ends (almost always) anyway, and the
/// tokenizer was trained on lines, so the cut costs no compression.
fn line_chunks(text: &str, target: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for line in text.split_inclusive('\n') {
        end += line.len();
        if end - start >= target {
            chunks.push(&text[start..end]);
            start = end;
        }
    }
    if start < end {
        chunks.push(&text[start..end]);
    }
    chunks
}

/// Bumped when the cache layout or the way text is encoded changes.
const CACHE_VERSION: &str = "mhc-train token cache v1";
const CACHE_MAGIC: &[u8; 8] = b"MHCTOK01";
const CACHE_HEADER_BYTES: usize = 8 + 4 + 8;

fn cache_file_name(files: &[PathBuf], tokenizer_json: &[u8], vocab_size: usize) -> Result<String> {
    let mut hash = Fnv1a64::new();
    hash.write(CACHE_VERSION.as_bytes());
    hash.write(&(vocab_size as u64).to_le_bytes());
    for file in files {
        let meta = fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        let mtime = meta
            .modified()
            .with_context(|| format!("cannot read the modification time of {}", file.display()))?
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        hash.write(file.as_os_str().as_encoded_bytes());
        hash.write(&[0]);
        hash.write(&meta.len().to_le_bytes());
        hash.write(&mtime.as_secs().to_le_bytes());
        hash.write(&mtime.subsec_nanos().to_le_bytes());
    }
    hash.write(tokenizer_json);
    Ok(format!("tokens-{:016x}.tok", hash.finish()))
}

/// FNV-1a, 64 bit: stable across Rust versions and platforms (std's hasher is not), which a cache
/// key stored on disk needs.
struct Fnv1a64(u64);

impl Fnv1a64 {
    fn new() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Cache layout: magic, u32 bytes per token, u64 token count, then the little-endian tokens.
fn write_cache(path: &Path, stream: &TokenStream) -> Result<()> {
    let mut bytes =
        Vec::with_capacity(CACHE_HEADER_BYTES + stream.len() * stream.bytes_per_token());
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&(stream.bytes_per_token() as u32).to_le_bytes());
    bytes.extend_from_slice(&(stream.len() as u64).to_le_bytes());
    match &stream.tokens {
        Tokens::U16(t) => t
            .iter()
            .for_each(|id| bytes.extend_from_slice(&id.to_le_bytes())),
        Tokens::U32(t) => t
            .iter()
            .for_each(|id| bytes.extend_from_slice(&id.to_le_bytes())),
    }
    write_atomically(path, &bytes)
}

fn read_cache(path: &Path, vocab_size: usize) -> Result<TokenStream> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read token cache {}", path.display()))?;
    let corrupt = |why: &str| {
        anyhow::anyhow!(
            "token cache {} is corrupt ({why}); delete it to re-encode",
            path.display()
        )
    };
    if bytes.len() < CACHE_HEADER_BYTES || &bytes[..8] != CACHE_MAGIC {
        return Err(corrupt("bad header"));
    }
    let width = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let count = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let expected_width = if vocab_size <= 1 << 16 { 2 } else { 4 };
    if width != expected_width {
        return Err(corrupt("token width does not match the vocabulary size"));
    }
    let body = &bytes[CACHE_HEADER_BYTES..];
    if body.len() != count * width {
        return Err(corrupt("length does not match the header"));
    }
    let tokens = if width == 2 {
        Tokens::U16(
            body.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        )
    } else {
        Tokens::U32(
            body.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    };
    Ok(TokenStream { tokens })
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over `path`, so a crash
/// never leaves a half-written file that a later run would trust.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let mut tmp_name = path
        .file_name()
        .context("path has no file name")?
        .to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage whether or not removing it works.
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        // Test vectors from the FNV reference (isthe.com/chongo/tech/comp/fnv).
        let hash = |s: &str| {
            let mut h = Fnv1a64::new();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf29ce484222325);
        assert_eq!(hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn line_chunks_cut_at_line_ends_and_cover_the_text() {
        let text = "ab\ncd\nef\n\ngh";
        let chunks = line_chunks(text, 4);
        assert_eq!(chunks, vec!["ab\ncd\n", "ef\n\n", "gh"]);
        assert_eq!(chunks.concat(), text);
    }
}
