//! `mhc-train bench --train`: real training steps of the same model with plain residuals, the
//! mHC reference (candle ops) and the fused mHC ops: median step time, tokens/s, MFU, peak memory,
//! and mHC's overhead over plain.
//!
//! Each variant runs in a child process of its own (`bench --train-variant`), so device memory
//! and the allocator's pools of one variant cannot inflate another's peak.

use crate::bench::device::MemoryProbe;
use crate::config::{Config, MhcImpl, Residual};
use crate::data;
use crate::dist::DistEnv;
use crate::log::{Logger, Record};
use crate::train::trainer::{device_for, Trainer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;

/// The three models compared, as config overrides.
pub const VARIANTS: [(&str, Residual, MhcImpl); 3] = [
    ("plain", Residual::Plain, MhcImpl::Fused),
    ("mhc-reference", Residual::Mhc, MhcImpl::Reference),
    ("mhc-fused", Residual::Mhc, MhcImpl::Fused),
];

/// One variant's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBench {
    pub variant: String,
    pub params: usize,
    pub tokens_per_step: usize,
    /// Every timed step, in order (warm-up excluded).
    pub step_ms: Vec<f64>,
    pub median_step_ms: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per token (6 N for the matrices + 12 L S C for attention), the same count for
    /// every variant so MFU compares like with like.
    pub flops_per_token: f64,
    /// Achieved model FLOP/s over the device's peak (None when the peak is unknown).
    pub mfu: Option<f64>,
    /// Peak device memory in use during the steps, bytes (None on CPU).
    pub peak_memory_bytes: Option<f64>,
    pub final_loss: f64,
    /// Why the variant could not run (e.g. out of memory); the numbers are then empty.
    #[serde(default)]
    pub error: Option<String>,
}

impl TrainBench {
    fn failed(variant: &str, error: String) -> TrainBench {
        TrainBench {
            variant: variant.to_string(),
            params: 0,
            tokens_per_step: 0,
            step_ms: vec![],
            median_step_ms: f64::NAN,
            tokens_per_s: f64::NAN,
            flops_per_token: f64::NAN,
            mfu: None,
            peak_memory_bytes: None,
            final_loss: f64::NAN,
            error: Some(error),
        }
    }
}

/// 6 N + 12 L S C per token (Kaplan et al.; PaLM's appendix), N = matrix weights incl. LM head.
pub fn flops_per_token(config: &Config) -> f64 {
    let m = &config.model;
    let c = m.width as f64;
    let hidden = match m.mlp {
        crate::config::Mlp::Gelu => (m.mlp_ratio * m.width) as f64,
        crate::config::Mlp::Swiglu => ((2 * m.mlp_ratio * m.width / 3).div_ceil(8) * 8) as f64,
    };
    let mlp_matrices = if m.mlp == crate::config::Mlp::Swiglu {
        3.0
    } else {
        2.0
    };
    let per_layer = 4.0 * c * c + mlp_matrices * c * hidden;
    let matrices = m.layers as f64 * per_layer + c * m.vocab_size as f64;
    6.0 * matrices + 12.0 * (m.layers * m.seq_len * m.width) as f64
}

fn variant_config(base: &Config, name: &str) -> Result<Config> {
    let (_, residual, imp) = VARIANTS
        .iter()
        .find(|(n, _, _)| *n == name)
        .with_context(|| format!("unknown bench variant {name:?}"))?;
    let mut config = base.clone();
    config.model.residual = *residual;
    config.model.mhc_impl = *imp;
    config.name = format!("{}-bench-{name}", base.name);
    Ok(config)
}

/// Runs `warmup + steps` training steps of one variant in this process.
pub fn run_variant(
    base: &Config,
    name: &str,
    warmup: usize,
    steps: usize,
    peak_flops: f64,
) -> Result<TrainBench> {
    let config = variant_config(base, name)?;
    let dataset = data::load_dataset(&config.data, config.model.vocab_size, config.model.seq_len)?;
    // The probe's baseline is the bare context, so the peak counts weights, optimizer state and
    // activations.
    let memory = MemoryProbe::new(&device_for(&config)?)?;
    let mut trainer = Trainer::new(&config, &DistEnv::single(), None)?;
    let mut step_ms = Vec::with_capacity(steps);
    let mut peak = memory.used()?;
    let mut final_loss = f64::NAN;
    for index in 0..warmup + steps {
        let stats = trainer.step(&dataset.train)?;
        peak = peak.max(memory.used()?);
        final_loss = stats.loss;
        if index >= warmup {
            step_ms.push(stats.secs * 1e3);
        }
    }
    let median_step_ms = median(&step_ms);
    let tokens_per_step = config.train.batch_size * config.model.seq_len;
    let tokens_per_s = tokens_per_step as f64 / (median_step_ms / 1e3);
    let flops = flops_per_token(&config);
    Ok(TrainBench {
        variant: name.to_string(),
        params: trainer.params.count(),
        tokens_per_step,
        step_ms,
        median_step_ms,
        tokens_per_s,
        flops_per_token: flops,
        mfu: Some(flops * tokens_per_s / peak_flops).filter(|m| m.is_finite()),
        peak_memory_bytes: Some(peak - memory.baseline()).filter(|m| m.is_finite()),
        final_loss,
        error: None,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every variant in a child process (`exe bench --train-variant NAME ...`), collects their
/// JSON results, logs each step time to TensorBoard under `out/train-<variant>/`.
pub fn run_all(
    config_path: &Path,
    overrides: &[String],
    warmup: usize,
    steps: usize,
    out: &Path,
) -> Result<Vec<TrainBench>> {
    let exe = std::env::current_exe().context("cannot find the mhc-train executable")?;
    let mut results = Vec::new();
    for (name, _, _) in VARIANTS {
        let mut command = Command::new(&exe);
        command
            .arg("bench")
            .arg("--config")
            .arg(config_path)
            .args(["--train-variant", name])
            .args([
                "--warmup",
                &warmup.to_string(),
                "--steps",
                &steps.to_string(),
            ]);
        for set in overrides {
            command.args(["--set", set]);
        }
        let output = command
            .output()
            .with_context(|| format!("cannot start the {name} bench"))?;
        if !output.status.success() {
            // One variant failing (the reference running out of memory, say) still leaves the
            // others worth reporting.
            let error = String::from_utf8_lossy(&output.stderr);
            let error = error
                .lines()
                .last()
                .unwrap_or("no message")
                .trim()
                .to_string();
            results.push(TrainBench::failed(name, error));
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("the {name} training bench printed no result"))?;
        let result: TrainBench = serde_json::from_str(line)?;
        let mut logger = Logger::create(&out.join(format!("train-{name}")), None)?;
        for (step, ms) in result.step_ms.iter().enumerate() {
            logger.log(&Record {
                step: warmup + step + 1,
                scalars: vec![
                    ("bench/step_time_ms".into(), *ms),
                    (
                        "bench/tokens_per_s".into(),
                        result.tokens_per_step as f64 / (ms / 1e3),
                    ),
                ],
            })?;
        }
        logger.flush()?;
        results.push(result);
    }
    Ok(results)
}

/// The Markdown table, with mHC's overhead over the plain model in percent.
pub fn markdown(results: &[TrainBench]) -> String {
    let plain = results
        .iter()
        .find(|r| r.variant == "plain")
        .map(|r| r.median_step_ms);
    let mut md = String::from(
        "| variant | params | median step (ms) | tokens/s | MFU | peak memory (GiB) | overhead vs plain | final loss |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        if let Some(error) = &r.error {
            md += &format!("| {} | failed: {error} | | | | | | |\n", r.variant);
            continue;
        }
        let overhead = plain
            .map(|p| format!("{:+.1}%", (r.median_step_ms / p - 1.0) * 100.0))
            .unwrap_or_default();
        md += &format!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} | {:.4} |\n",
            r.variant,
            r.params,
            r.median_step_ms,
            r.tokens_per_s,
            r.mfu.map_or("n/a".into(), |m| format!("{:.1}%", m * 100.0)),
            r.peak_memory_bytes
                .map_or("n/a".into(), |b| format!("{:.2}", b / (1u64 << 30) as f64)),
            overhead,
            r.final_loss
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_matches_hand_count() {
        let mut c = Config::default();
        c.model.layers = 2;
        c.model.width = 4;
        c.model.mlp_ratio = 4;
        c.model.vocab_size = 300;
        c.model.seq_len = 8;
        // per layer: 4*16 (qkv + proj) + 2*4*16 (up, down) = 192; two layers 384; head 1200.
        let expect = 6.0 * (384.0 + 1200.0) + 12.0 * (2 * 8 * 4) as f64;
        assert_eq!(flops_per_token(&c), expect);
    }
}
