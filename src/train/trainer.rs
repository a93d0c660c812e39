//! The training loop: batches -> forward/backward (with gradient accumulation) -> gradient
//! averaging over data-parallel ranks -> global-norm clipping -> AdamW -> logs, validation,
//! checkpoints. Data parallelism is seen only through [`GradSync`]; rank 0 alone logs and saves.

use super::checkpoint::{self, TrainState};
use super::optimizer::AdamW;
use super::schedule::learning_rate;
use crate::config::{Config, DTypeName, DeviceKind, Residual};
use crate::data::{self, Dataset, Sampler, TokenStream};
use crate::dist::{self, DistEnv, GradSync};
use crate::log::{amax_gains, Logger, Progress, Record};
use crate::model::params::Params;
use crate::model::Gpt;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// This process's data-parallel rank (only rank 0 logs and saves).
    pub rank: usize,
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
        DeviceKind::Cuda(ordinal) => crate::gpu::open_cuda(ordinal.unwrap_or(0))
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

/// Loss of deterministic validation batch `index` of `rows` sequences.
fn batch_loss(
    model: &Gpt,
    val: &TokenStream,
    index: usize,
    rows: usize,
    device: &Device,
) -> Result<f64> {
    let seq_len = model.config().seq_len;
    let (ids, targets) =
        batch_tensors(data::val_batch(val, index, rows, seq_len), seq_len, device)?;
    Ok(model.loss(&ids, &targets)?.0.to_scalar::<f32>()? as f64)
}

/// Mean validation loss over `batches` deterministic batches of `rows` sequences.
pub fn validation_loss(
    model: &Gpt,
    val: &TokenStream,
    batches: usize,
    rows: usize,
    device: &Device,
) -> Result<f64> {
    let mut total = 0.0;
    for index in 0..batches {
        total += batch_loss(model, val, index, rows, device)?;
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

/// How long a rank waits for its peers (rendezvous, and each collective afterwards).
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// One optimizer step's numbers (global over ranks).
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall time of the whole step, device work included.
    pub secs: f64,
    /// Of which gradient averaging over ranks.
    pub sync_secs: f64,
    /// Every mHC sublayer's H [T, k] of the first micro-batch (empty for plain residuals).
    pub coeffs: Vec<Tensor>,
}

/// A model, its optimizer and sampler, on one rank of a (possibly single-process) run.
pub struct Trainer {
    pub config: Config,
    pub params: Params,
    pub model: Gpt,
    pub device: Device,
    pub optimizer: AdamW,
    pub sampler: Sampler,
    pub state: TrainState,
    pub sync: Box<dyn GradSync>,
}

impl Trainer {
    /// Builds the model on this rank's device, joins the other ranks, checks that every rank
    /// starts from identical weights, and loads `resume_from` when given.
    pub fn new(config: &Config, env: &DistEnv, resume_from: Option<&Path>) -> Result<Trainer> {
        let t = &config.train;
        if !t.batch_size.is_multiple_of(env.world * t.grad_accum) {
            bail!(
                "train.batch_size ({}) must divide into {} ranks x {} micro-batches (train.grad_accum)",
                t.batch_size,
                env.world,
                t.grad_accum
            );
        }
        let device = device_for_rank(config, env)?;
        let mut params = Params::new(&device, config.seed);
        let model = Gpt::new(&mut params, &config.model, dtype_for(config))?;
        let mut optimizer = AdamW::new(&params, t)?;
        let mut sampler = Sampler::new(config.seed);
        let mut state = TrainState {
            step: 0,
            sampler: sampler.state(),
            tokens_seen: 0,
        };
        if let Some(dir) = resume_from {
            state = checkpoint::load(dir, &params, Some(&mut optimizer))?;
            sampler = Sampler::from_state(&state.sampler);
        }
        let mut sync = dist::connect(env, &device, PEER_TIMEOUT)?;
        sync.check_same("parameter checksum", checksum(&params)?)?;
        Ok(Trainer {
            config: config.clone(),
            params,
            model,
            device,
            optimizer,
            sampler,
            state,
            sync,
        })
    }

    /// Sequences per micro-batch on this rank.
    pub fn micro_rows(&self) -> usize {
        let t = &self.config.train;
        t.batch_size / (self.sync.world() * t.grad_accum)
    }

    /// One optimizer step on this rank's shard of the next global batch.
    pub fn step(&mut self, train: &TokenStream) -> Result<StepStats> {
        let began = Instant::now();
        let t = &self.config.train;
        let seq_len = self.config.model.seq_len;
        let lr = learning_rate(t, self.state.step);
        let (rank, world) = (self.sync.rank(), self.sync.world());
        let (inputs, targets) =
            self.sampler
                .next_batch(train, t.batch_size, seq_len, rank, world)?;
        let micro = self.micro_rows() * seq_len;
        let mut grads = None;
        let mut loss_sum = 0.0;
        let mut coeffs = Vec::new();
        for (index, (ids, tgt)) in inputs.chunks(micro).zip(targets.chunks(micro)).enumerate() {
            let (ids, tgt) = batch_tensors((ids.to_vec(), tgt.to_vec()), seq_len, &self.device)?;
            let (loss, out) = self.model.loss(&ids, &tgt)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let micro_grads = (loss / t.grad_accum as f64)?.backward()?;
            accumulate(&mut grads, micro_grads, &self.params)?;
            if index == 0 {
                coeffs = out.coeffs;
            }
        }
        let mut grads = grads.expect("grad_accum >= 1");
        let mut loss = [loss_sum / t.grad_accum as f64];
        self.sync.all_reduce_scalars(&mut loss)?;
        let loss = loss[0];
        if !loss.is_finite() {
            bail!(
                "training loss became {loss} at step {}",
                self.state.step + 1
            );
        }
        let sync_began = Instant::now();
        if world > 1 {
            let vars: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p)| p.var.as_tensor().clone())
                .collect();
            let local = vars
                .iter()
                .map(|v| grads.get(v).cloned().context("a parameter got no gradient"))
                .collect::<Result<Vec<_>>>()?;
            for (var, reduced) in vars.iter().zip(self.sync.all_reduce_mean(&local)?) {
                grads.insert(var, reduced);
            }
            self.device.synchronize()?;
        }
        let sync_secs = sync_began.elapsed().as_secs_f64();
        let grad_norm = global_norm(&grads, &self.params)?;
        let scale = if t.grad_clip > 0.0 && grad_norm > t.grad_clip {
            t.grad_clip / grad_norm
        } else {
            1.0
        };
        self.optimizer.step(&grads, lr, scale)?;
        self.device.synchronize()?;
        self.state.step += 1;
        self.state.tokens_seen += (t.batch_size * seq_len) as u64;
        self.state.sampler = self.sampler.state();
        Ok(StepStats {
            loss,
            lr,
            grad_norm,
            secs: began.elapsed().as_secs_f64(),
            sync_secs,
            coeffs,
        })
    }

    /// Mean validation loss over the config's eval batches, whatever the world size: the same
    /// `eval_batches * batch_size / grad_accum` rows, cut into this rank's micro-batches, which
    /// are dealt round-robin over the ranks.
    pub fn validation_loss(&mut self, val: &TokenStream) -> Result<f64> {
        let (rank, world) = (self.sync.rank(), self.sync.world());
        let chunks = self.config.log.eval_batches * world;
        let mut sums = [0.0, 0.0];
        for index in (rank..chunks).step_by(world) {
            sums[0] += batch_loss(&self.model, val, index, self.micro_rows(), &self.device)?;
            sums[1] += 1.0;
        }
        self.sync.all_reduce_scalars(&mut sums)?;
        Ok(sums[0] / sums[1])
    }
}

/// `device`, with `cuda` meaning this rank's GPU (LOCAL_RANK) in data-parallel runs.
fn device_for_rank(config: &Config, env: &DistEnv) -> Result<Device> {
    match config.device_kind()? {
        DeviceKind::Cuda(None) if env.world > 1 => crate::gpu::open_cuda(env.local_rank)
            .with_context(|| format!("rank {}: cannot open cuda:{}", env.rank, env.local_rank)),
        DeviceKind::Cuda(Some(_)) if env.world > 1 => bail!(
            "device {:?} with WORLD_SIZE={}: use device = \"cuda\" so each rank takes its LOCAL_RANK GPU",
            config.device,
            env.world
        ),
        _ => device_for(config),
    }
}

/// A host-side f64 fingerprint of all weights (sum + sum of squares), equal on ranks that hold
/// identical weights.
fn checksum(params: &Params) -> Result<f64> {
    let mut total = 0.0;
    for (_, p) in params.iter() {
        let w = p
            .var
            .as_tensor()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?;
        total += w.sum_all()?.to_scalar::<f64>()? + 0.5 * w.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total)
}

/// Trains as the config says, as one rank of the run the environment describes (RANK,
/// WORLD_SIZE, ...; none set = a single process). With `resume`, continues from the run's newest
/// checkpoint; without, refuses a run folder that already holds checkpoints (nothing saved is
/// overwritten).
pub fn train(config: &Config, resume: bool) -> Result<Summary> {
    let env = DistEnv::from_env()?;
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
    let mut trainer = Trainer::new(config, &env, resume_from.as_deref())
        .with_context(|| format!("rank {} of {}", env.rank, env.world))?;
    let main = env.is_main();
    let mut logger = if main {
        std::fs::create_dir_all(&run)
            .with_context(|| format!("cannot create run folder {}", run.display()))?;
        write_atomically(&run.join("config.toml"), &config.to_toml())?;
        Some(Logger::create(
            &run,
            resume_from.as_ref().map(|_| trainer.state.step),
        )?)
    } else {
        None
    };

    let t = &config.train;
    let tokens_per_step = (t.batch_size * config.model.seq_len) as f64;
    let start_step = trainer.state.step;
    let progress = Progress::new(t.steps, start_step, main && config.log.progress);
    if main {
        progress.message(&format!(
            "run {}: {} parameters, {} train / {} val tokens, device {} x {}, {:?}",
            run.display(),
            trainer.params.count(),
            train_tokens.len(),
            val_tokens.len(),
            config.device,
            env.world,
            config.dtype
        ));
    }
    let began = Instant::now();
    let mut losses = Vec::new();
    let mut rates = Vec::new();
    let mut last_checkpoint = resume_from.clone().unwrap_or_default();
    let mut final_val_loss = f64::NAN;

    while trainer.state.step < t.steps {
        let stats = match trainer.step(&train_tokens) {
            Ok(stats) => stats,
            Err(error) => {
                let kept = checkpoint::latest(&run)?
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none saved yet".into());
                return Err(error.context(format!(
                    "rank {}: stopped; last good checkpoint: {kept}",
                    env.rank
                )));
            }
        };
        let step = trainer.state.step;
        let tokens_per_s = tokens_per_step / stats.secs;
        losses.push(stats.loss);
        rates.push(tokens_per_s);
        progress.update(step, stats.loss, tokens_per_s);

        let is_last = step == t.steps;
        let log_now = is_last || step.is_multiple_of(config.log.every);
        let eval_now =
            is_last || (config.log.eval_every > 0 && step.is_multiple_of(config.log.eval_every));
        let mut record = Record {
            step,
            scalars: vec![
                ("train/loss".into(), stats.loss),
                ("lr".into(), stats.lr),
                ("grad_norm".into(), stats.grad_norm),
                ("step_time_ms".into(), stats.secs * 1e3),
                ("allreduce_ms".into(), stats.sync_secs * 1e3),
                ("tokens_per_s".into(), tokens_per_s),
                ("tokens_seen".into(), trainer.state.tokens_seen as f64),
            ],
        };
        if log_now && config.model.residual == Residual::Mhc {
            mhc_health(&stats.coeffs, config.model.streams, &mut record)?;
        }
        if eval_now {
            let val = trainer.validation_loss(&val_tokens)?;
            record.scalars.push(("val/loss".into(), val));
            record.scalars.push(("val/perplexity".into(), val.exp()));
            if main {
                progress.message(&format!(
                    "step {step}: train loss {:.4}, val loss {val:.4}, ppl {:.2}",
                    stats.loss,
                    val.exp()
                ));
            }
            final_val_loss = val;
        }
        if let Some(logger) = logger.as_mut().filter(|_| log_now || eval_now) {
            logger.log(&record)?;
        }
        let save_now =
            is_last || (config.log.ckpt_every > 0 && step.is_multiple_of(config.log.ckpt_every));
        if main && save_now {
            last_checkpoint = checkpoint::save(
                &run,
                config,
                &trainer.params,
                &trainer.optimizer,
                &trainer.state,
                config.log.keep_ckpts,
            )?;
            progress.message(&format!("saved {}", last_checkpoint.display()));
        }
    }
    // Data parallelism must leave every rank with the same weights.
    let fingerprint = checksum(&trainer.params)?;
    trainer
        .sync
        .check_same("final parameter checksum", fingerprint)?;
    if let Some(logger) = logger.as_mut() {
        logger.flush()?;
    }
    progress.finish();
    let measured = if rates.len() > 1 {
        &rates[1..]
    } else {
        &rates[..]
    };
    Ok(Summary {
        rank: env.rank,
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
