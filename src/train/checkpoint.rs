//! Checkpoints: `<run>/ckpt-<step>/` holding model.safetensors, optimizer.safetensors, state.json
//! and config.toml. Written into a temp folder and renamed into place, so a crash mid-write never
//! leaves a broken checkpoint, and the previous ones stay intact.

use crate::config::Config;
use crate::data::SamplerState;
use crate::model::params::Params;
use crate::train::optimizer::AdamW;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything besides tensors that resuming needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer updates completed.
    pub step: usize,
    /// The batch sampler's RNG position after `step` updates.
    pub sampler: SamplerState,
    /// Tokens trained on so far (all ranks).
    pub tokens_seen: u64,
}

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const CONFIG_FILE: &str = "config.toml";

pub fn checkpoint_dir(run: &Path, step: usize) -> PathBuf {
    run.join(format!("ckpt-{step:07}"))
}

/// Writes a checkpoint atomically and prunes old ones beyond `keep` (0 keeps all).
pub fn save(
    run: &Path,
    config: &Config,
    params: &Params,
    optimizer: &AdamW,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run, state.step);
    let tmp = run.join(format!(
        ".ckpt-{:07}.tmp-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    params.save(&tmp.join(MODEL_FILE))?;
    optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    std::fs::write(tmp.join(CONFIG_FILE), config.to_toml())?;
    // A checkpoint of the same step from an earlier attempt is replaced only once the new one is whole.
    let old = run.join(format!(
        ".ckpt-{:07}.old-{}",
        state.step,
        std::process::id()
    ));
    if dir.exists() {
        std::fs::rename(&dir, &old)?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if keep > 0 {
        for stale in list(run)?.into_iter().rev().skip(keep) {
            std::fs::remove_dir_all(stale.1)?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints of a run, sorted by step.
pub fn list(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    if !run.exists() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(run)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("ckpt-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if path.join(STATE_FILE).exists() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run)?.pop().map(|(_, p)| p))
}

/// The config a checkpoint was trained with.
pub fn read_config(dir: &Path) -> Result<Config> {
    if !dir.is_dir() {
        bail!(
            "checkpoint {} does not exist or is not a folder",
            dir.display()
        );
    }
    Config::load(&dir.join(CONFIG_FILE), &[])
        .with_context(|| format!("unreadable checkpoint {}", dir.display()))
}

/// Loads weights (and, when given, optimizer state) into an already built model; returns the
/// train state. A checkpoint of another model shape is refused with the mismatching tensor named.
pub fn load(dir: &Path, params: &Params, optimizer: Option<&mut AdamW>) -> Result<TrainState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "unreadable checkpoint: cannot read {}",
            state_path.display()
        )
    })?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| {
        format!(
            "unreadable checkpoint: {} is malformed",
            state_path.display()
        )
    })?;
    params
        .load(&dir.join(MODEL_FILE))
        .with_context(|| format!("cannot load weights of checkpoint {}", dir.display()))?;
    if let Some(opt) = optimizer {
        opt.load(&dir.join(OPTIMIZER_FILE)).with_context(|| {
            format!(
                "cannot load optimizer state of checkpoint {}",
                dir.display()
            )
        })?;
    }
    Ok(state)
}
