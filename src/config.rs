//! Typed run configuration: TOML file + `--set key=value` overrides, defaults, validation.
//!
//! Every field has a default, unknown keys are rejected, and `validate` checks the relations between
//! fields (heads divide width, batch divides into micro-batches, ...) before any work starts.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name: outputs go to `<run_dir>/<name>/`.
    pub name: String,
    /// Parent folder of all runs.
    pub run_dir: PathBuf,
    /// `cpu` or `cuda` (`cuda:N` picks a GPU; data-parallel workers pick theirs from LOCAL_RANK).
    pub device: String,
    /// Storage dtype of weights and activations: `f32` or `bf16`. mHC coefficients are always f32.
    pub dtype: DTypeName,
    /// Seeds weight init and the batch sampler.
    pub seed: u64,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Residual {
    /// x + F(x): the baseline.
    Plain,
    /// n streams mixed by mHC (spec/mhc.md).
    Mhc,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MhcImpl {
    /// The custom ops (Rust on CPU, fused kernels on CUDA).
    Fused,
    /// The candle-ops reference (the oracle).
    Reference,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mlp {
    Gelu,
    Swiglu,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay to `min_lr_ratio * lr`.
    Cosine,
    /// The paper's: linear warmup, then x0.316 at 80% and x0.1 at 90% of the steps.
    Step,
    /// Linear warmup, then constant.
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub layers: usize,
    /// Model width C.
    pub width: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub mlp: Mlp,
    /// MLP hidden width = mlp_ratio * width (for SwiGLU: 2/3 of that, rounded up to a multiple of 8).
    pub mlp_ratio: usize,
    pub tie_embeddings: bool,
    pub norm_eps: f64,
    pub residual: Residual,
    /// n, the number of residual streams (mhc only).
    pub streams: usize,
    /// Sinkhorn-Knopp iterations t_max.
    pub sinkhorn_iters: usize,
    /// Dynamic (per-token) coefficients; `false` = static (H from the biases alone).
    pub dynamic: bool,
    pub mhc_impl: MhcImpl,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Global batch in sequences per optimizer step (summed over micro-batches and GPUs).
    pub batch_size: usize,
    /// Micro-batches per optimizer step on each worker.
    pub grad_accum: usize,
    pub steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Cosine decays to this fraction of `lr`.
    pub min_lr_ratio: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms, biases, mHC scalars).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Text files, folders of `.txt` files, or llm.c `.bin` token shards.
    pub train: Vec<PathBuf>,
    /// Optional separate validation files; when empty the last `val_fraction` of tokens is held out.
    pub val: Vec<PathBuf>,
    pub val_fraction: f64,
    /// A `tokenizer.json`; trained (byte-level BPE with `vocab_size`) and saved here when missing.
    /// Empty = `<cache_dir>/tokenizer-<vocab_size>-<hash of data.train>.json`, so changing the
    /// vocabulary or the corpus never reuses a stale tokenizer.
    pub tokenizer: PathBuf,
    /// Where encoded token ids are cached.
    pub cache_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Console/TensorBoard/metrics every N steps.
    pub every: usize,
    /// Validation every N steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Batches averaged for a validation loss.
    pub eval_batches: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub ckpt_every: usize,
    /// Keep only the newest N checkpoints; 0 keeps all.
    pub keep_ckpts: usize,
    /// Show the progress bar.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "tiny".into(),
            run_dir: "runs".into(),
            device: "cpu".into(),
            dtype: DTypeName::F32,
            seed: 1337,
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            data: DataConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 2048,
            layers: 2,
            width: 128,
            heads: 4,
            seq_len: 128,
            mlp: Mlp::Gelu,
            mlp_ratio: 4,
            tie_embeddings: true,
            norm_eps: 1e-6,
            residual: Residual::Mhc,
            streams: 4,
            sinkhorn_iters: 20,
            dynamic: true,
            mhc_impl: MhcImpl::Fused,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            grad_accum: 1,
            steps: 300,
            lr: 3e-3,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: vec!["data/kjv.txt".into()],
            val: vec![],
            val_fraction: 0.05,
            tokenizer: PathBuf::new(),
            cache_dir: "data/cache".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every: 1,
            eval_every: 100,
            eval_batches: 8,
            ckpt_every: 100,
            keep_ckpts: 3,
            progress: true,
        }
    }
}

impl Config {
    /// Reads a TOML file, applies `key=value` overrides (dotted keys, TOML values; bare words are
    /// strings), and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml_str(&text, overrides)
            .with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        for set in overrides {
            apply_override(&mut table, set)?;
        }
        let mut config: Config = toml::Value::Table(table).try_into()?;
        config.validate()?;
        if config.data.tokenizer.as_os_str().is_empty() {
            config.data.tokenizer = config.default_tokenizer_path();
        }
        Ok(config)
    }

    /// Where an automatically trained tokenizer lives: keyed by vocabulary size and training files.
    fn default_tokenizer_path(&self) -> PathBuf {
        // FNV-1a over the file names: stable across runs and Rust releases.
        let key = self
            .data
            .train
            .iter()
            .flat_map(|p| p.to_string_lossy().into_owned().into_bytes());
        let hash = key.fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let name = format!(
            "tokenizer-{}-{:08x}.json",
            self.model.vocab_size, hash as u32
        );
        self.data.cache_dir.join(name)
    }

    /// The folder of this run's outputs.
    pub fn run_path(&self) -> PathBuf {
        self.run_dir.join(&self.name)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Checks relations between fields; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let t = &self.train;
        let nonzero = [
            ("model.vocab_size", m.vocab_size),
            ("model.layers", m.layers),
            ("model.width", m.width),
            ("model.heads", m.heads),
            ("model.seq_len", m.seq_len),
            ("model.mlp_ratio", m.mlp_ratio),
            ("model.streams", m.streams),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.steps", t.steps),
            ("log.every", self.log.every),
            ("log.eval_batches", self.log.eval_batches),
        ];
        for (key, value) in nonzero {
            if value == 0 {
                bail!("{key} must be at least 1");
            }
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            bail!("name must be a plain folder name, got {:?}", self.name);
        }
        if !m.width.is_multiple_of(m.heads) {
            bail!(
                "model.heads ({}) must divide model.width ({})",
                m.heads,
                m.width
            );
        }
        if !(m.width / m.heads).is_multiple_of(2) {
            bail!("model.width / model.heads must be even for rotary embeddings");
        }
        if m.residual == Residual::Mhc && !(1..=16).contains(&m.streams) {
            bail!("model.streams must be in 1..=16, got {}", m.streams);
        }
        if m.residual == Residual::Mhc && m.sinkhorn_iters == 0 {
            bail!("model.sinkhorn_iters must be at least 1");
        }
        if m.norm_eps.is_nan() || m.norm_eps <= 0.0 {
            bail!("model.norm_eps must be positive");
        }
        if m.vocab_size < 260 {
            bail!("model.vocab_size must be at least 260 (256 bytes + special tokens)");
        }
        if !t.batch_size.is_multiple_of(t.grad_accum) {
            bail!(
                "train.grad_accum ({}) must divide train.batch_size ({})",
                t.grad_accum,
                t.batch_size
            );
        }
        let positive = [("train.lr", t.lr), ("train.eps", t.eps)];
        for (key, value) in positive {
            if !(value > 0.0 && value.is_finite()) {
                bail!("{key} must be positive and finite, got {value}");
            }
        }
        for (key, value) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&value) {
                bail!("{key} must be in [0, 1), got {value}");
            }
        }
        let unit = [
            ("train.min_lr_ratio", t.min_lr_ratio),
            ("data.val_fraction", self.data.val_fraction),
        ];
        for (key, value) in unit {
            if !(0.0..=1.0).contains(&value) {
                bail!("{key} must be in [0, 1], got {value}");
            }
        }
        if t.weight_decay < 0.0 || t.grad_clip < 0.0 {
            bail!("train.weight_decay and train.grad_clip must not be negative");
        }
        if self.data.train.is_empty() {
            bail!("data.train names no files");
        }
        if self.data.val.is_empty()
            && !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0)
        {
            bail!("data.val_fraction must be in (0, 1) when data.val is empty");
        }
        self.device_kind()?;
        Ok(())
    }

    /// Parses `device`: `cpu`, `cuda` or `cuda:N`.
    pub fn device_kind(&self) -> Result<DeviceKind> {
        match self.device.as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda(None)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceKind::Cuda(Some(ordinal))),
                _ => bail!("device must be cpu, cuda or cuda:N, got {other:?}"),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(Option<usize>),
}

/// `a.b.c=value`: walks (creating) tables and sets the leaf. The value is parsed as a TOML value
/// (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`); anything that does not parse is taken as a bare string.
fn apply_override(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .with_context(|| format!("--set expects key=value, got {set:?}"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set key {key:?} is malformed");
    }
    let (leaf, path) = parts.split_last().expect("split yields one part");
    let mut node = table;
    for part in path {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("--set {key}: {part} is not a table"))?;
    }
    node.insert(leaf.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let config = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(config.model, Config::default().model);
        let back = Config::from_toml_str(&config.to_toml(), &[]).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn tokenizer_path_follows_vocab_and_corpus() {
        let a = Config::from_toml_str("", &[]).unwrap().data.tokenizer;
        let b = Config::from_toml_str("", &["model.vocab_size=4096".into()])
            .unwrap()
            .data
            .tokenizer;
        let c = Config::from_toml_str("", &["data.train=[\"other.txt\"]".into()])
            .unwrap()
            .data
            .tokenizer;
        assert!(a.starts_with("data/cache") && a.to_string_lossy().contains("-2048-"));
        assert!(b.to_string_lossy().contains("-4096-"));
        assert_ne!(a, c);
        let own = Config::from_toml_str("[data]\ntokenizer = \"gpt2.json\"", &[]).unwrap();
        assert_eq!(own.data.tokenizer, PathBuf::from("gpt2.json"));
    }

    #[test]
    fn overrides_set_typed_values() {
        let sets = [
            "device=cuda".to_string(),
            "model.layers=6".to_string(),
            "train.lr=1e-4".to_string(),
            "model.residual=plain".to_string(),
        ];
        let config = Config::from_toml_str("", &sets).unwrap();
        assert_eq!(config.device, "cuda");
        assert_eq!(config.model.layers, 6);
        assert_eq!(config.train.lr, 1e-4);
        assert_eq!(config.model.residual, Residual::Plain);
    }

    fn error_of(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::from_toml_str(text, &sets).unwrap_err())
    }

    #[test]
    fn bad_configs_name_the_problem() {
        assert!(error_of("bogus = 1", &[]).contains("bogus"));
        assert!(error_of("[model]\nlayers = \"six\"", &[]).contains("layers"));
        assert!(error_of("[model]\nheads = 5", &[]).contains("model.heads"));
        assert!(error_of("[train]\nsteps = 0", &[]).contains("train.steps"));
        assert!(error_of("", &["train.grad_accum=3"]).contains("grad_accum"));
        assert!(error_of("", &["device=tpu"]).contains("device"));
        assert!(error_of("", &["noequals"]).contains("key=value"));
        assert!(error_of("", &["model.residual=dense"]).contains("residual"));
    }
}
