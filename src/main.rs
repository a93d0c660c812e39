//! mhc-train's command line: parse, dispatch. All work lives in the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mhc_train::config::{Config, MhcImpl};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mhc-train",
    version,
    about = "Train transformers whose residual stream is n streams mixed by mHC (Manifold-Constrained Hyper-Connections).",
    long_about = "Train transformers whose residual stream is n streams mixed by mHC (Manifold-Constrained \
Hyper-Connections, arXiv 2512.24880), with fused kernels as candle custom ops.\n\n\
Training is the default command: `mhc-train --config configs/tiny.toml`. A run writes \
<run_dir>/<name>/: config.toml, TensorBoard event files, metrics.jsonl, ckpt-<step>/.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file (see configs/). Every field has a default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config field: --set train.lr=1e-3 --set device=cuda (repeatable; dotted keys).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run from its newest checkpoint (same config; resumed losses equal an
    /// uninterrupted run's).
    #[arg(long)]
    resume: bool,
    /// Data parallel on this node: start N worker processes (one per GPU, each taking
    /// cuda:<LOCAL_RANK>) and wait for them. Under torchrun/mpirun/SLURM leave this out: the
    /// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT variables are read instead.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Train (the default when no command is given).
    Train(TrainArgs),
    /// Validation loss and perplexity of a checkpoint, and a continuation of a prompt.
    Eval {
        /// A checkpoint folder: runs/<name>/ckpt-<step>.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Validation batches to average (default: the config's log.eval_batches).
        #[arg(long)]
        batches: Option<usize>,
        /// Text to continue.
        #[arg(long, default_value = "And God said")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 48)]
        tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override a field of the checkpoint's config (e.g. device=cuda).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Fused GPU kernels against the candle-ops reference on fresh random inputs (every shape,
    /// dtype and gradient of the spec's test matrix); non-zero exit if any case fails.
    Selftest {
        /// cuda, cuda:N or hip.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Seed of the random inputs, to repeat a run (each run prints its seed; default: fresh).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Benchmarks (CUDA): the mHC sublayer tables (fused vs reference, the seed report's sizes and
    /// training sizes, GB/s vs the bytes floor); --train times training steps (plain vs mHC
    /// reference vs mHC fused).
    Bench(BenchArgs),
    /// Run one mHC sublayer (F = RMSNorm) on tensors from a safetensors file, forward and
    /// (with `dout`) backward, to cross-check other implementations.
    #[command(after_help = mhc_train::mhc::apply::APPLY_HELP)]
    MhcApply {
        /// Input safetensors file (tensor names below).
        #[arg(long = "in")]
        input: PathBuf,
        /// Output safetensors file (written atomically).
        #[arg(long = "out")]
        output: PathBuf,
        /// fused = the custom ops (CPU Rust / CUDA kernels); reference = candle ops.
        #[arg(long = "impl", value_enum, default_value = "fused")]
        imp: ImplArg,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Time real training steps of plain, mHC reference and mHC fused models built from --config.
    #[arg(long)]
    train: bool,
    /// With --train: also run the layer tables (the default when --train is not given).
    #[arg(long)]
    layers: bool,
    /// Config of the --train bench, and the device of the layer tables (default
    /// configs/small.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config field (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Untimed steps before timing (--train).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed steps per variant (--train).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Device peak in TFLOP/s for MFU (default: known bf16 peaks of H100/H200/MI300X).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Output folder (default runs/bench-<unix time>): bench.json, bench.md, speedup.png,
    /// TensorBoard runs.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `hip` runs the layer tables on an AMD GPU (a --features hip build); default: the config's
    /// device.
    #[arg(long)]
    device: Option<String>,
    /// Timed calls per cell of the layer tables (median reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Timed calls per cell of the isolated-op tables (median reported).
    #[arg(long, default_value_t = 100)]
    op_reps: usize,
    /// Internal: run one --train variant in this process and print its JSON result.
    #[arg(long, hide = true)]
    train_variant: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImplArg {
    Fused,
    Reference,
}

fn main() {
    // candle attaches a captured backtrace to some errors when RUST_BACKTRACE is set; the user
    // gets one clear line instead (panics still honour RUST_BACKTRACE).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    if let Err(error) = run(Cli::parse()) {
        // One line: causes joined by ": ", and parser messages (TOML) folded onto the line.
        let message = format!("{error:#}");
        eprintln!(
            "error: {}",
            message.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Eval {
            checkpoint,
            batches,
            prompt,
            tokens,
            temperature,
            seed,
            set,
        }) => {
            let options = mhc_train::train::eval::EvalOptions {
                batches,
                prompt,
                tokens,
                temperature,
                seed,
                overrides: set,
            };
            let report = mhc_train::train::eval::evaluate(&checkpoint, &options)?;
            println!("checkpoint {} (step {})", checkpoint.display(), report.step);
            println!(
                "val loss {:.4}  perplexity {:.2}",
                report.val_loss, report.perplexity
            );
            match report.sample {
                Some(text) => println!("sample: {}{}", options.prompt, text),
                None => println!("sample: none (no tokenizer for pre-tokenized data)"),
            }
            Ok(())
        }
        Some(Command::Bench(args)) => bench(args),
        Some(Command::Selftest { device, seed }) => selftest(&device, seed),
        Some(Command::MhcApply {
            input,
            output,
            imp,
            device,
        }) => {
            #[cfg(feature = "hip")]
            let hip = || mhc_train::hip::mhc_apply(&input, &output);
            #[cfg(not(feature = "hip"))]
            let hip = || Ok(());
            if let Some(result) = on_hip(&device, hip) {
                result?;
                println!("wrote {}", output.display());
                return Ok(());
            }
            let config = Config::from_toml_str("", &[format!("device={device:?}")])?;
            let device = mhc_train::train::trainer::device_for(&config)?;
            let imp = match imp {
                ImplArg::Fused => MhcImpl::Fused,
                ImplArg::Reference => MhcImpl::Reference,
            };
            mhc_train::mhc::apply::mhc_apply(&input, &output, imp, &device)?;
            println!("wrote {}", output.display());
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path, &args.set)?,
        None => Config::from_toml_str("", &args.set)?,
    };
    if let Some(workers) = args.gpus {
        // The config was checked above, once, before any worker starts.
        let worker_args = mhc_train::dist::args_without_gpus(std::env::args_os().skip(1));
        mhc_train::dist::launch(workers, &worker_args)?;
        println!("all {workers} workers finished");
        return Ok(());
    }
    let summary = mhc_train::train::train(&config, args.resume)?;
    if summary.rank != 0 {
        return Ok(());
    }
    let first = summary.losses.first().copied().unwrap_or(f64::NAN);
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    println!(
        "done: steps {}..{} in {:.1} s, loss {first:.4} -> {last:.4}, val loss {:.4}, {:.0} tokens/s (median)",
        summary.start_step, summary.steps, summary.wall_secs, summary.final_val_loss, summary.tokens_per_sec
    );
    println!("checkpoint: {}", summary.last_checkpoint.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    use mhc_train::bench::{device, layer, report, train};
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| "configs/small.toml".into());
    #[cfg(feature = "hip")]
    let hip = || mhc_train::hip::bench(args.reps);
    #[cfg(not(feature = "hip"))]
    let hip = || Ok(String::new());
    if let Some(tables) = on_hip(args.device.as_deref().unwrap_or(""), hip) {
        println!("{}", tables?);
        return Ok(());
    }
    let mut sets = args.set.clone();
    if let Some(device) = &args.device {
        sets.push(format!("device={device:?}"));
    }
    let config = Config::load(&config_path, &sets)?;
    if let Some(variant) = &args.train_variant {
        let dev = mhc_train::train::trainer::device_for(&config)?;
        let peak = match args.peak_tflops {
            Some(tflops) => tflops * 1e12,
            None if config.dtype == mhc_train::config::DTypeName::Bf16 => {
                device::bf16_peak_flops(&device::device_name(&dev)?)
            }
            None => f64::NAN,
        };
        let result = train::run_variant(&config, variant, args.warmup, args.steps, peak)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        config.run_dir.join(format!("bench-{secs}"))
    });
    let layers = !args.train || args.layers;
    if layers && !cfg!(feature = "cuda") {
        anyhow::bail!(
            "bench: the layer tables need a CUDA build (scripts/build-cuda.sh); this binary has \
             none (bench --train alone runs here)"
        );
    }
    std::fs::create_dir_all(&out)?;
    // Training steps first, each variant in a child process: this process holds no device
    // memory yet that could crowd them out.
    let train = if args.train {
        let results = train::run_all(&config_path, &args.set, args.warmup, args.steps, &out)?;
        Some(report::TrainSection {
            config_path: config_path.display().to_string(),
            overrides: args.set.clone(),
            dtype: format!("{:?}", config.dtype).to_lowercase(),
            warmup: args.warmup,
            steps: args.steps,
            config: serde_json::to_value(&config)?,
            results,
        })
    } else {
        None
    };
    let device = mhc_train::train::trainer::device_for(&config)?;
    // Before the layer tables: the clocks as the run found them.
    let header = report::Header::collect(device::device_name(&device)?, layer::cuda_version());
    let layer = if layers {
        Some(layer::run(&device, args.reps, args.op_reps)?)
    } else {
        None
    };
    let report = report::Report {
        header,
        layer,
        train,
    };
    let md = report.write(&out)?;
    println!("{md}");
    println!("wrote {}", out.display());
    Ok(())
}

/// `--device hip`: the AMD path (kernels through hip-sys, no candle), when built with it.
fn on_hip<T>(device: &str, run: impl FnOnce() -> Result<T>) -> Option<Result<T>> {
    if device != "hip" {
        return None;
    }
    if cfg!(feature = "hip") {
        Some(run())
    } else {
        Some(Err(anyhow::anyhow!(
            "--device hip: this binary was built without --features hip (scripts/build-hip.sh)"
        )))
    }
}

fn selftest(device: &str, seed: Option<u64>) -> Result<()> {
    #[cfg(feature = "hip")]
    let hip = || mhc_train::hip::selftest(seed);
    #[cfg(not(feature = "hip"))]
    let hip = || Ok(());
    if let Some(result) = on_hip(device, hip) {
        return result;
    }
    let config = Config::from_toml_str("", &[format!("device={device:?}")])?;
    let device = mhc_train::train::trainer::device_for(&config)?;
    #[cfg(feature = "cuda")]
    return mhc_train::gpu::selftest::selftest(&device, seed);
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!(
        "selftest needs a GPU build (--features cuda); this binary has none (device {device:?}, \
         seed {seed:?})"
    )
}
