//! The training loop: batches -> forward/backward (with gradient accumulation) -> global-norm
//! clipping -> AdamW -> logs, validation, checkpoints.

use super::checkpoint::{self, TrainState};
use super::optimizer::AdamW;
use super::schedule::learning_rate;
use crate::config::{Config, DTypeName, DeviceKind, Residual};
use crate::data::{self, Dataset, Sampler, TokenStream};
use crate::log::{amax_gains, Logger, Progress, Record};
use crate::model::params::Params;
use crate::model::Gpt;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub start_step: usize,
    pub steps: usize,
    /// Training loss of every step this process ran, in order.
    pub losses: Vec<f64>,
    pub final_val_loss: f64,
    pub wall_secs: f64,
    /// Median tokens/s over the steps run (first step excluded when there are several).
    pub tokens_per_sec: f64,
    pub last_checkpoint: PathBuf,
}

/// Tokens of the mHC health sample: H of the first tokens of a batch.
const HEALTH_TOKENS: usize = 256;

pub fn device_for(config: &Config) -> Result<Device> {
    Ok(match config.device_kind()? {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda(ordinal) => Device::new_cuda(ordinal.unwrap_or(0))
            .with_context(|| format!("cannot open device {:?}", config.device))?,
    })
}

pub fn dtype_for(config: &Config) -> DType {
    match config.dtype {
        DTypeName::F32 => DType::F32,
        DTypeName::Bf16 => DType::BF16,
    }
}

/// A built model and its parameters on a device.
pub struct Built {
    pub params: Params,
    pub model: Gpt,
    pub device: Device,
}

pub fn build_model(config: &Config) -> Result<Built> {
    let device = device_for(config)?;
    let mut params = Params::new(&device, config.seed);
    let model = Gpt::new(&mut params, &config.model, dtype_for(config))?;
    Ok(Built {
        params,
        model,
        device,
    })
}

/// `(ids, targets)` as [rows, seq_len] u32 tensors.
fn batch_tensors(
    (inputs, targets): (Vec<u32>, Vec<u32>),
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let rows = inputs.len() / seq_len;
    Ok((
        Tensor::from_vec(inputs, (rows, seq_len), device)?,
        Tensor::from_vec(targets, (rows, seq_len), device)?,
    ))
}

/// Mean validation loss over `batches` deterministic batches of `rows` sequences.
pub fn validation_loss(
    model: &Gpt,
    val: &TokenStream,
    batches: usize,
    rows: usize,
    device: &Device,
) -> Result<f64> {
    let seq_len = model.config().seq_len;
    let mut total = 0.0;
    for index in 0..batches {
        let (ids, targets) =
            batch_tensors(data::val_batch(val, index, rows, seq_len), seq_len, device)?;
        let (loss, _) = model.loss(&ids, &targets)?;
        total += loss.to_scalar::<f32>()? as f64;
    }
    Ok(total / batches as f64)
}

/// Adds `next` into `acc` parameter by parameter (gradient accumulation).
fn accumulate(acc: &mut Option<GradStore>, next: GradStore, params: &Params) -> Result<()> {
    match acc {
        None => *acc = Some(next),
        Some(acc) => {
            for (_, p) in params.iter() {
                let var = p.var.as_tensor();
                if let Some(g) = next.get(var) {
                    let sum = match acc.get(var) {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    };
                    acc.insert(var, sum);
                }
            }
        }
    }
    Ok(())
}

/// sqrt(sum of squares of all gradients), one device sync.
fn global_norm(grads: &GradStore, params: &Params) -> Result<f64> {
    let squares = params
        .iter()
        .filter_map(|(_, p)| grads.get(p.var.as_tensor()))
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&squares, 0)?
        .sum_all()?
        .to_scalar::<f32>()?
        .sqrt() as f64)
}

/// The paper's Amax gains of H_res per sublayer (max over sampled tokens) and of their product
/// over all sublayers (the composite residual map), from each sublayer's H [T, k].
fn mhc_health(coeffs: &[Tensor], n: usize, record: &mut Record) -> Result<()> {
    if coeffs.is_empty() {
        return Ok(());
    }
    let res_offset = 2 * n;
    let tokens = coeffs[0].dim(0)?.min(HEALTH_TOKENS);
    let mut composite: Vec<Vec<f64>> = vec![identity(n); tokens];
    for (index, h) in coeffs.iter().enumerate() {
        let h_res = h
            .narrow(0, 0, tokens)?
            .narrow(1, res_offset, n * n)?
            .to_dtype(DType::F64)?;
        let rows = h_res.to_vec2::<f64>()?;
        let (mut fwd, mut bwd) = (0f64, 0f64);
        for (token, m) in rows.iter().enumerate() {
            let (f, b) = amax_gains(m, n);
            fwd = fwd.max(f);
            bwd = bwd.max(b);
            // The layer applied after the ones before: composite = H_res(l) * composite.
            composite[token] = matmul(m, &composite[token], n);
        }
        let sublayer = if index % 2 == 0 { "attn" } else { "mlp" };
        let name = format!("layer{}.{sublayer}", index / 2);
        record.scalars.push((format!("mhc/amax_fwd/{name}"), fwd));
        record.scalars.push((format!("mhc/amax_bwd/{name}"), bwd));
    }
    let (mut fwd, mut bwd) = (0f64, 0f64);
    for m in &composite {
        let (f, b) = amax_gains(m, n);
        fwd = fwd.max(f);
        bwd = bwd.max(b);
    }
    record.scalars.push(("mhc/composite_amax_fwd".into(), fwd));
    record.scalars.push(("mhc/composite_amax_bwd".into(), bwd));
    Ok(())
}

fn identity(n: usize) -> Vec<f64> {
    (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect()
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    (0..n * n)
        .map(|ij| {
            (0..n)
                .map(|l| a[(ij / n) * n + l] * b[l * n + ij % n])
                .sum()
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Trains as the config says. With `resume`, continues from the run's newest checkpoint;
/// without, refuses a run folder that already holds checkpoints (nothing saved is overwritten).
pub fn train(config: &Config, resume: bool) -> Result<Summary> {
    let run = config.run_path();
    let resume_from = if resume {
        let dir = checkpoint::latest(&run)?
            .with_context(|| format!("--resume: no checkpoint in {}", run.display()))?;
        let saved = checkpoint::read_config(&dir)?;
        if saved.model != config.model {
            bail!(
                "--resume: checkpoint {} was trained with another model ({}); use its config",
                dir.display(),
                model_difference(&saved, config)
            );
        }
        Some(dir)
    } else {
        if !checkpoint::list(&run)?.is_empty() {
            bail!(
                "run folder {} already holds checkpoints: pass --resume to continue it, or set another name (--set name=...)",
                run.display()
            );
        }
        None
    };

    // Data before any model work: bad paths and too-short data fail fast.
    let Dataset {
        train: train_tokens,
        val: val_tokens,
        ..
    } = data::load_dataset(&config.data, config.model.vocab_size, config.model.seq_len)?;
    let Built {
        params,
        model,
        device,
    } = build_model(config)?;
    let mut optimizer = AdamW::new(&params, &config.train)?;
    let mut sampler = Sampler::new(config.seed);
    let mut state = TrainState {
        step: 0,
        sampler: sampler.state(),
        tokens_seen: 0,
    };
    if let Some(dir) = &resume_from {
        state = checkpoint::load(dir, &params, Some(&mut optimizer))?;
        sampler = Sampler::from_state(&state.sampler);
    }

    std::fs::create_dir_all(&run)
        .with_context(|| format!("cannot create run folder {}", run.display()))?;
    write_atomically(&run.join("config.toml"), &config.to_toml())?;
    let mut logger = Logger::create(&run, resume_from.as_ref().map(|_| state.step))?;

    let t = &config.train;
    let seq_len = config.model.seq_len;
    let micro_rows = t.batch_size / t.grad_accum;
    let tokens_per_step = (t.batch_size * seq_len) as u64;
    let start_step = state.step;
    let progress = Progress::new(t.steps, start_step, config.log.progress);
    progress.message(&format!(
        "run {}: {} parameters, {} train / {} val tokens, device {}, {:?}",
        run.display(),
        params.count(),
        train_tokens.len(),
        val_tokens.len(),
        config.device,
        config.dtype
    ));
    let began = Instant::now();
    let mut losses = Vec::new();
    let mut rates = Vec::new();
    let mut last_checkpoint = resume_from.clone().unwrap_or_default();
    let mut final_val_loss = f64::NAN;

    for step in start_step..t.steps {
        let step_began = Instant::now();
        let lr = learning_rate(t, step);
        let (inputs, targets) = sampler.next_batch(&train_tokens, t.batch_size, seq_len, 0, 1)?;
        let mut grads = None;
        let mut loss_sum = 0.0;
        let mut health = None;
        for micro in 0..t.grad_accum {
            let rows = micro * micro_rows * seq_len..(micro + 1) * micro_rows * seq_len;
            let (ids, tgt) = batch_tensors(
                (inputs[rows.clone()].to_vec(), targets[rows].to_vec()),
                seq_len,
                &device,
            )?;
            let (loss, out) = model.loss(&ids, &tgt)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accumulate(
                &mut grads,
                (loss / t.grad_accum as f64)?.backward()?,
                &params,
            )?;
            if micro == 0 {
                health = Some(out.coeffs);
            }
        }
        let loss = loss_sum / t.grad_accum as f64;
        if !loss.is_finite() {
            let kept = checkpoint::latest(&run)?
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none saved yet".into());
            bail!(
                "training loss became {loss} at step {}; stopped. Last good checkpoint: {kept}",
                step + 1
            );
        }
        let grads = grads.expect("grad_accum >= 1");
        let grad_norm = global_norm(&grads, &params)?;
        let scale = if t.grad_clip > 0.0 && grad_norm > t.grad_clip {
            t.grad_clip / grad_norm
        } else {
            1.0
        };
        optimizer.step(&grads, lr, scale)?;
        state.step = step + 1;
        state.tokens_seen += tokens_per_step;
        state.sampler = sampler.state();

        let step_secs = step_began.elapsed().as_secs_f64();
        let tokens_per_s = tokens_per_step as f64 / step_secs;
        losses.push(loss);
        rates.push(tokens_per_s);
        progress.update(state.step, loss, tokens_per_s);

        let is_last = state.step == t.steps;
        let mut record = Record {
            step: state.step,
            scalars: vec![
                ("train/loss".into(), loss),
                ("lr".into(), lr),
                ("grad_norm".into(), grad_norm),
                ("step_time_ms".into(), step_secs * 1e3),
                ("tokens_per_s".into(), tokens_per_s),
                ("tokens_seen".into(), state.tokens_seen as f64),
            ],
        };
        let log_now = is_last || state.step.is_multiple_of(config.log.every);
        let eval_now = is_last
            || (config.log.eval_every > 0 && state.step.is_multiple_of(config.log.eval_every));
        if log_now && config.model.residual == Residual::Mhc {
            mhc_health(
                &health.unwrap_or_default(),
                config.model.streams,
                &mut record,
            )?;
        }
        if eval_now {
            let val = validation_loss(
                &model,
                &val_tokens,
                config.log.eval_batches,
                micro_rows,
                &device,
            )?;
            record.scalars.push(("val/loss".into(), val));
            record.scalars.push(("val/perplexity".into(), val.exp()));
            progress.message(&format!(
                "step {}: train loss {loss:.4}, val loss {val:.4}, ppl {:.2}",
                state.step,
                val.exp()
            ));
            final_val_loss = val;
        }
        if log_now || eval_now {
            logger.log(&record)?;
        }
        if is_last
            || (config.log.ckpt_every > 0 && state.step.is_multiple_of(config.log.ckpt_every))
        {
            last_checkpoint = checkpoint::save(
                &run,
                config,
                &params,
                &optimizer,
                &state,
                config.log.keep_ckpts,
            )?;
            progress.message(&format!("saved {}", last_checkpoint.display()));
        }
    }
    logger.flush()?;
    progress.finish();
    let measured = if rates.len() > 1 {
        &rates[1..]
    } else {
        &rates[..]
    };
    Ok(Summary {
        run_dir: run,
        start_step,
        steps: t.steps,
        losses,
        final_val_loss,
        wall_secs: began.elapsed().as_secs_f64(),
        tokens_per_sec: median(measured),
        last_checkpoint,
    })
}

/// Names the first model field that differs between two configs.
fn model_difference(a: &Config, b: &Config) -> String {
    let (a, b) = (
        serde_json::to_value(&a.model).unwrap_or_default(),
        serde_json::to_value(&b.model).unwrap_or_default(),
    );
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .iter()
            .find(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "model.{k} = {v} there, {} here",
                    b.get(k).cloned().unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "same fields".into()),
        _ => "unknown".into(),
    }
}

/// Temp file + rename: readers never see half a file.
pub fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
