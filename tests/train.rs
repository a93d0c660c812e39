//! End-to-end training on CPU: the loss falls (mhc and plain), checkpoints round-trip, a resumed run
//! equals an uninterrupted one, and bad input fails early with one clear message.

use mhc_train::config::{Config, MhcImpl, Residual, Schedule};
use mhc_train::train::{checkpoint, train};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small slice of the shipped corpus, so tests train a tokenizer and encode in well under a second.
fn corpus(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv.txt")).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..120_000]).unwrap();
    path
}

fn small_config(dir: &Path, name: &str, residual: Residual) -> Config {
    let mut c = Config {
        name: name.into(),
        run_dir: dir.join("runs"),
        ..Config::default()
    };
    c.model.vocab_size = 320;
    c.model.layers = 1;
    c.model.width = 32;
    c.model.heads = 2;
    c.model.seq_len = 32;
    c.model.residual = residual;
    c.train.batch_size = 8;
    c.train.steps = 150;
    c.train.lr = 1e-2;
    c.train.warmup_steps = 10;
    c.data.train = vec![corpus(dir)];
    c.data.tokenizer = dir.join("tokenizer.json");
    c.data.cache_dir = dir.join("cache");
    c.log.every = 10;
    c.log.eval_every = 0;
    c.log.eval_batches = 2;
    c.log.ckpt_every = 0;
    c.log.progress = false;
    c.validate().unwrap();
    c
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn loss_falls_for_mhc_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    for (residual, imp) in [
        (Residual::Mhc, MhcImpl::Fused),
        (Residual::Mhc, MhcImpl::Reference),
        (Residual::Plain, MhcImpl::Fused),
    ] {
        let mut config = small_config(dir.path(), &format!("{residual:?}-{imp:?}"), residual);
        config.model.mhc_impl = imp;
        let summary = train(&config, false).unwrap();
        let start = summary.losses[0];
        let end = mean(&summary.losses[summary.losses.len() - 10..]);
        // ln(320) = 5.77 at init; a bigram model of this text is far below that.
        assert!(
            (start - (320f64).ln()).abs() < 0.5,
            "{residual:?}: initial loss {start}"
        );
        assert!(
            end < start - 1.5,
            "{residual:?} {imp:?}: loss {start} -> {end}"
        );
        assert!(summary.final_val_loss.is_finite() && summary.final_val_loss < start - 1.5);
        // the run folder holds the resolved config, both logs and the final checkpoint
        let run = &summary.run_dir;
        assert!(run.join("config.toml").exists() && run.join("metrics.jsonl").exists());
        assert!(std::fs::read_dir(run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents")));
        assert_eq!(
            checkpoint::latest(run).unwrap(),
            Some(checkpoint::checkpoint_dir(run, 150))
        );
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value =
            serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        assert_eq!(last["step"], 150);
        if residual == Residual::Mhc {
            // doubly stochastic H_res: forward gain (max row sum) is 1 up to Sinkhorn's tolerance
            let gain = last["mhc/amax_fwd/layer0.attn"].as_f64().unwrap();
            assert!((gain - 1.0).abs() < 1e-3, "amax_fwd {gain}");
            assert!(last["mhc/composite_amax_bwd"].as_f64().unwrap() < 1.2);
        }
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), "whole", Residual::Mhc);
    config.train.steps = 12;
    config.train.grad_accum = 2;
    config.train.schedule = Schedule::Cosine;
    config.log.ckpt_every = 6;
    config.log.keep_ckpts = 0;
    let whole = train(&config, false).unwrap();

    // The "interrupted" run: a copy of the first checkpoint only, then --resume.
    let mut resumed = config.clone();
    resumed.name = "resumed".into();
    let from = checkpoint::checkpoint_dir(&whole.run_dir, 6);
    let to = checkpoint::checkpoint_dir(&resumed.run_path(), 6);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let second = train(&resumed, true).unwrap();
    assert_eq!(second.start_step, 6);
    assert_eq!(
        second.losses,
        whole.losses[6..].to_vec(),
        "resumed losses differ"
    );

    // The checkpoint holds exactly the weights that were trained: eval of both final
    // checkpoints gives the same validation loss.
    let options = mhc_train::train::eval::EvalOptions {
        batches: Some(2),
        prompt: "And God said".into(),
        tokens: 8,
        temperature: 0.0,
        seed: 0,
        overrides: vec![],
    };
    let a = mhc_train::train::eval::evaluate(&whole.last_checkpoint, &options).unwrap();
    let b = mhc_train::train::eval::evaluate(&second.last_checkpoint, &options).unwrap();
    assert_eq!(a.step, 12);
    assert_eq!(a.val_loss, b.val_loss);
    assert_eq!(a.val_loss, whole.final_val_loss);
    assert_eq!(a.sample, b.sample);
    assert!(!a.sample.unwrap().is_empty());
}

fn cli(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mhc-train"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the small config as TOML and returns its path.
fn config_file(dir: &Path, config: &Config) -> String {
    let path = dir.join(format!("{}.toml", config.name));
    std::fs::write(&path, config.to_toml()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn bad_input_fails_early_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut config = small_config(d, "bad", Residual::Mhc);
    config.train.steps = 2;
    let file = config_file(d, &config);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--config".into(),
                d.join("missing.toml").display().to_string(),
            ],
            "cannot read config file",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "model.bogus=1".into(),
            ],
            "bogus",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "model.heads=3".into(),
            ],
            "model.heads",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "train.steps=0".into(),
            ],
            "train.steps",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "model.layers=\"two\"".into(),
            ],
            "layers",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "model.seq_len=1000000".into(),
            ],
            "seq_len",
        ),
        (
            vec![
                "--config".into(),
                file.clone(),
                "--set".into(),
                "data.train=[\"nope.txt\"]".into(),
            ],
            "nope.txt",
        ),
        (
            vec![
                "eval".into(),
                "--checkpoint".into(),
                d.join("no-such-ckpt").display().to_string(),
            ],
            "no-such-ckpt",
        ),
    ];
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = cli(&args, d);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one message, got {err}");
    }
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (ok, err) = cli(
        &[
            "--config",
            &file,
            "--set",
            &format!("data.train=[{:?}]", empty.display().to_string()),
        ],
        d,
    );
    assert!(!ok && err.contains("empty"), "{err}");
}

#[test]
fn checkpoints_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut config = small_config(d, "keep", Residual::Mhc);
    config.train.steps = 4;
    config.log.ckpt_every = 2;
    let file = config_file(d, &config);
    let (ok, err) = cli(&["--config", &file], d);
    assert!(ok, "{err}");
    let run = config.run_path();
    let saved = checkpoint::latest(&run).unwrap().unwrap();
    let weights = std::fs::read(saved.join("model.safetensors")).unwrap();

    // A second run under the same name would overwrite: refused.
    let (ok, err) = cli(&["--config", &file], d);
    assert!(!ok && err.contains("--resume"), "{err}");
    // Resuming with another model shape: refused, naming the field.
    let (ok, err) = cli(
        &["--config", &file, "--resume", "--set", "model.width=64"],
        d,
    );
    assert!(!ok && err.contains("model.width"), "{err}");
    // A corrupt checkpoint: a clear error.
    let broken = d.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(saved.join("config.toml"), broken.join("config.toml")).unwrap();
    std::fs::write(broken.join("state.json"), "{not json").unwrap();
    let (ok, err) = cli(&["eval", "--checkpoint", &broken.display().to_string()], d);
    assert!(!ok && err.contains("unreadable checkpoint"), "{err}");

    // A diverging run (huge lr, no clipping) stops with a message and keeps the last good checkpoint.
    let (ok, err) = cli(
        &[
            "--config",
            &file,
            "--resume",
            "--set",
            "train.steps=40",
            "--set",
            "train.lr=1e30",
            "--set",
            "train.schedule=\"constant\"",
            "--set",
            "train.grad_clip=0",
        ],
        d,
    );
    assert!(!ok && err.contains("training loss became"), "{err}");
    assert!(
        err.contains(&saved.display().to_string()) || err.contains("ckpt-"),
        "{err}"
    );
    let still = checkpoint::latest(&run).unwrap().unwrap();
    assert!(
        std::fs::read(still.join("model.safetensors"))
            .unwrap()
            .len()
            == weights.len()
    );
    let state = std::fs::read_to_string(still.join("state.json")).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&state).is_ok());
}

/// Two CPU workers (TCP gradient averaging) with global batch B train like one process with
/// batch B: the same losses step by step (up to f32 reduction order), the same validation loss.
#[test]
fn data_parallel_workers_match_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut config = small_config(d, "one", Residual::Mhc);
    config.train.steps = 8;
    config.log.every = 1;
    let one = config_file(d, &config);
    config.name = "two".into();
    let two = config_file(d, &config);
    let (ok, err) = cli(&["--config", &one], d);
    assert!(ok, "{err}");
    let (ok, err) = cli(&["--config", &two, "--gpus", "2"], d);
    assert!(ok, "{err}");
    let losses = |name: &str, key: &str| -> Vec<f64> {
        let text =
            std::fs::read_to_string(d.join("runs").join(name).join("metrics.jsonl")).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
            .collect()
    };
    let (a, b) = (losses("one", "train/loss"), losses("two", "train/loss"));
    assert_eq!(a.len(), 8);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "{a:?} vs {b:?}");
    }
    let (va, vb) = (losses("one", "val/loss"), losses("two", "val/loss"));
    assert!((va[0] - vb[0]).abs() < 1e-4 * va[0], "{va:?} vs {vb:?}");
    // A worker that cannot start (bad rank setup) fails the launch, naming the rank.
    let (ok, err) = cli(
        &[
            "--config",
            &two,
            "--gpus",
            "2",
            "--set",
            "train.batch_size=9",
        ],
        d,
    );
    assert!(!ok && err.contains("rank"), "{err}");
}

/// `bench --train` runs the three variants in child processes and reports consistent numbers.
#[test]
fn training_bench_reports_every_variant() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = small_config(d, "bench", Residual::Mhc);
    let file = config_file(d, &config);
    let out = d.join("bench-out");
    let (ok, err) = cli(
        &[
            "bench",
            "--train",
            "--config",
            &file,
            "--warmup",
            "1",
            "--steps",
            "3",
            "--out",
            &out.display().to_string(),
        ],
        d,
    );
    assert!(ok, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let variants: Vec<&str> = json["train"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(variants, ["plain", "mhc-reference", "mhc-fused"]);
    for r in json["train"]["results"].as_array().unwrap() {
        let steps: Vec<f64> = r["step_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(steps.len(), 3);
        let median = r["median_step_ms"].as_f64().unwrap();
        assert!(steps.contains(&median) && median > 0.0);
        let tokens = r["tokens_per_step"].as_f64().unwrap();
        assert_eq!(tokens, (8 * 32) as f64);
        assert!((r["tokens_per_s"].as_f64().unwrap() - tokens / (median / 1e3)).abs() < 1e-6);
        assert!(r["final_loss"].as_f64().unwrap().is_finite());
    }
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("| mhc-fused |") && md.contains("overhead vs plain"));
    // The layer tables need the GPU build: one clear message here.
    let (ok, err) = cli(&["bench", "--config", &file], d);
    assert!(!ok && err.contains("need a CUDA build"), "{err}");
    // every variant's step times are in its own TensorBoard run
    for v in variants {
        assert!(out
            .join(format!("train-{v}"))
            .join("metrics.jsonl")
            .exists());
    }
}

/// Torchrun-style workers (no launcher watching them): when rank 1 is killed mid-run, rank 0
/// ends on its own within seconds with an error naming rank 1 (no hang), and the checkpoint it
/// saved before stays whole: `eval` loads it.
#[test]
fn a_killed_worker_ends_the_other_naming_it_and_the_checkpoint_stays_whole() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut config = small_config(d, "killed", Residual::Mhc);
    config.train.steps = 1_000_000; // runs until rank 1 is killed
    config.log.ckpt_every = 2;
    config.log.every = 1_000;
    let file = config_file(d, &config);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let spawn = |rank: &str| {
        let log = std::fs::File::create(d.join(format!("rank{rank}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_mhc-train"))
            .args(["--config", &file])
            .envs([
                ("RANK", rank),
                ("LOCAL_RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
            ])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let (mut rank0, mut rank1) = (spawn("0"), spawn("1"));
    let run = d.join("runs").join("killed");
    let started = Instant::now();
    // Wait for a second checkpoint, so the kill lands mid-run, after saves.
    while checkpoint::list(&run).map_or(0, |l| l.len()) < 2 {
        if started.elapsed() > Duration::from_secs(300) || rank0.try_wait().unwrap().is_some() {
            let _ = (rank0.kill(), rank1.kill());
            panic!(
                "no checkpoints: {}",
                std::fs::read_to_string(d.join("rank0.log")).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = rank0.try_wait().unwrap() {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            rank0.kill().unwrap();
            panic!("rank 0 still running 60 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(d.join("rank0.log")).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("rank 1 closed its connection"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let latest = checkpoint::latest(&run).unwrap().unwrap();
    let (ok, eval_err) = cli(&["eval", "--checkpoint", &latest.display().to_string()], d);
    assert!(ok, "{eval_err}");
}
