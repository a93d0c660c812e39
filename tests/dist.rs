//! Data parallelism without GPUs: environment parsing, the TCP rendezvous, TcpSync's reductions
//! against hand-computed means, fault paths (dead, stuck and disagreeing ranks), and the
//! `--gpus N` launcher's error paths. Ranks are threads with real sockets on loopback.

use candle_core::{DType, Device, Tensor};
use mhc_train::dist::{
    args_without_gpus, connect, launch_program, rendezvous, DistEnv, GradSync, Master, TcpSync,
};
use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

fn env_error(vars: &[(&str, &str)]) -> String {
    DistEnv::from_lookup(lookup(vars)).unwrap_err().to_string()
}

/// A loopback port free at the time of the call.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world,
        local_rank: rank,
        master: Some(Master {
            host: "127.0.0.1".into(),
            port,
        }),
    }
}

/// Runs `body(rank)` on `world` threads (rank 0 last, so the others' connect retries are
/// exercised) and returns the results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    body: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = std::sync::Arc::new(body);
    let handles: Vec<_> = (0..world)
        .rev()
        .map(|rank| {
            let body = body.clone();
            let handle = std::thread::spawn(move || body(rank));
            if rank == world - 1 {
                std::thread::sleep(Duration::from_millis(50));
            }
            (rank, handle)
        })
        .collect();
    let mut results: Vec<(usize, T)> = handles
        .into_iter()
        .map(|(rank, h)| (rank, h.join().unwrap()))
        .collect();
    results.sort_by_key(|(rank, _)| *rank);
    results.into_iter().map(|(_, t)| t).collect()
}

fn tcp_sync(rank: usize, world: usize, port: u16, timeout: Duration) -> TcpSync {
    let links = rendezvous(&env(rank, world, port), Duration::from_secs(5)).unwrap();
    TcpSync::new(links, timeout)
}

#[test]
fn env_all_set() {
    let e = DistEnv::from_lookup(lookup(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node-0"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!((e.rank, e.world, e.local_rank), (3, 8, 1));
    assert_eq!(e.master.as_ref().unwrap().to_string(), "node-0:29500");
    assert!(!e.is_main());
}

#[test]
fn env_none_set_is_single_process() {
    let e = DistEnv::from_lookup(lookup(&[])).unwrap();
    assert_eq!(e, DistEnv::single());
    assert!(e.is_main());
    assert_eq!((e.rank, e.world, e.master), (0, 1, None));
}

#[test]
fn env_world_of_one_needs_no_master() {
    let e = DistEnv::from_lookup(lookup(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "2"),
    ]))
    .unwrap();
    assert_eq!((e.rank, e.world, e.local_rank, e.master), (0, 1, 2, None));
}

#[test]
fn env_partial_names_the_missing_variable() {
    let message = env_error(&[("RANK", "0")]);
    assert!(message.contains("WORLD_SIZE is not set"), "{message}");
    let message = env_error(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(message.contains("RANK is not set"), "{message}");
    let base = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
    let message = env_error(&base);
    assert!(message.contains("MASTER_ADDR is not set"), "{message}");
    let message = env_error(&[base.as_slice(), &[("MASTER_ADDR", "h")]].concat());
    assert!(message.contains("MASTER_PORT is not set"), "{message}");
    let message = env_error(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ]);
    assert!(message.contains("LOCAL_RANK is not set"), "{message}");
}

#[test]
fn env_bad_numbers_are_named() {
    let full = |name: &str, value: &'static str| {
        let mut vars = vec![
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        vars.iter_mut().find(|(k, _)| *k == name).unwrap().1 = value;
        env_error(&vars)
    };
    assert!(full("RANK", "abc").contains("RANK=\"abc\" is not a non-negative integer"));
    assert!(full("WORLD_SIZE", "-2").contains("WORLD_SIZE=\"-2\""));
    assert!(full("LOCAL_RANK", "1.5").contains("LOCAL_RANK=\"1.5\""));
    assert!(full("MASTER_PORT", "70000").contains("MASTER_PORT=\"70000\" is not a TCP port"));
    assert!(full("MASTER_PORT", "0").contains("MASTER_PORT=\"0\""));
    assert!(full("MASTER_ADDR", " ").contains("MASTER_ADDR is empty"));
    assert!(full("WORLD_SIZE", "0").contains("WORLD_SIZE=0"));
}

#[test]
fn env_rank_must_be_below_world() {
    let message = env_error(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ]);
    assert!(
        message.contains("RANK=2 is not below WORLD_SIZE=2"),
        "{message}"
    );
}

#[test]
fn rendezvous_sends_a_128_byte_id_to_every_rank() {
    let port = free_port();
    let id: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let sent = id.clone();
    let received = on_ranks(3, move |rank| {
        let mut links = rendezvous(&env(rank, 3, port), Duration::from_secs(5)).unwrap();
        assert_eq!((links.rank(), links.world()), (rank, 3));
        // Only rank 0's bytes count: the others pass garbage.
        let mine = if rank == 0 {
            sent.clone()
        } else {
            vec![rank as u8; 7]
        };
        links.broadcast(&mine, Duration::from_secs(5)).unwrap()
    });
    for bytes in received {
        assert_eq!(bytes, id);
    }
}

#[test]
fn rendezvous_times_out_naming_master_when_rank_0_never_comes() {
    let port = free_port();
    let began = Instant::now();
    let message = rendezvous(&env(1, 2, port), Duration::from_millis(400))
        .err()
        .unwrap()
        .to_string();
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}",
        began.elapsed()
    );
    assert!(
        message.contains(&format!("MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}")),
        "{message}"
    );
    assert!(message.contains("rank 1: cannot reach rank 0"), "{message}");
}

#[test]
fn rendezvous_rank_0_names_the_missing_ranks() {
    let port = free_port();
    let results = on_ranks(3, move |rank| {
        if rank == 2 {
            return None; // never joins
        }
        rendezvous(&env(rank, 3, port), Duration::from_millis(600))
            .err()
            .map(|e| e.to_string())
    });
    let root = results[0].as_ref().unwrap();
    assert!(root.contains("missing ranks: 2"), "{root}");
    // Rank 1 connected, then rank 0 gave up: its error says so instead of hanging.
    let leaf = results[1].as_ref().unwrap();
    assert!(leaf.contains("rank 1: connected to rank 0"), "{leaf}");
}

#[test]
fn rendezvous_refuses_a_different_world_size() {
    let port = free_port();
    let results = on_ranks(2, move |rank| {
        let world = if rank == 0 { 2 } else { 3 };
        rendezvous(&env(rank, world, port), Duration::from_secs(2))
            .err()
            .map(|e| e.to_string())
    });
    let root = results[0].as_ref().unwrap();
    assert!(
        root.contains("rank 0 has WORLD_SIZE=2 but rank 1 has WORLD_SIZE=3"),
        "{root}"
    );
    assert!(results[1].is_some());
}

#[test]
fn tcp_sync_averages_tensors_and_scalars_over_3_ranks() {
    let port = free_port();
    let results = on_ranks(3, move |rank| {
        let mut sync = tcp_sync(rank, 3, port, Duration::from_secs(5));
        assert_eq!((sync.rank(), sync.world()), (rank, 3));
        let r = rank as f32;
        // a[i] = (r + 1) * i + r^2; b = [r, -r, 0.5 r, 2] in bf16 (exact in bf16).
        let a: Vec<f32> = (0..6).map(|i| (r + 1.0) * i as f32 + r * r).collect();
        let a = Tensor::from_vec(a, (2, 3), &Device::Cpu).unwrap();
        let b = Tensor::new(&[r, -r, 0.5 * r, 2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let out = sync.all_reduce_mean(&[a, b]).unwrap();
        let mut scalars = [rank as f64, 10.0 * rank as f64 + 0.25];
        sync.all_reduce_scalars(&mut scalars).unwrap();
        (out, scalars)
    });
    // Hand-computed means over r = 0, 1, 2: mean(r + 1) = 2, mean(r^2) = 5/3, mean(r) = 1.
    let want_a: Vec<f32> = (0..6).map(|i| 2.0 * i as f32 + 5.0 / 3.0).collect();
    let want_b = [1.0f32, -1.0, 0.5, 2.0];
    let first_a = results[0].0[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (out, scalars) in &results {
        assert_eq!(out[0].dims(), &[2, 3]);
        assert_eq!(out[0].dtype(), DType::F32);
        assert_eq!(out[1].dtype(), DType::BF16);
        let a = out[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in a.iter().zip(&want_a) {
            assert!((got - want).abs() < 1e-6, "{a:?} vs {want_a:?}");
        }
        // Every rank gets the same bits, so parameters stay identical.
        assert_eq!(a, first_a);
        let b = out[1]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(b, want_b);
        assert_eq!(*scalars, [1.0, 10.25]);
    }
}

#[test]
fn tcp_sync_check_same_names_the_differing_rank() {
    let port = free_port();
    let results = on_ranks(3, move |rank| {
        let mut sync = tcp_sync(rank, 3, port, Duration::from_secs(5));
        let same = sync.check_same("parameter checksum", 12.5);
        let value = if rank == 2 { 12.5 + 1e-12 } else { 12.5 };
        let differs = sync.check_same("parameter checksum", value);
        (same.is_ok(), differs.err().map(|e| e.to_string()))
    });
    for (rank, (same_ok, differs)) in results.iter().enumerate() {
        assert!(same_ok, "rank {rank}");
        let message = differs.as_ref().unwrap();
        assert!(
            message.contains("parameter checksum differs from rank 0's")
                && message.contains("rank 2 has"),
            "{message}"
        );
        assert!(!message.contains("rank 1 has"), "{message}");
    }
}

#[test]
fn tcp_sync_dead_rank_is_named_not_a_hang() {
    let port = free_port();
    let began = Instant::now();
    let results = on_ranks(3, move |rank| {
        let mut sync = tcp_sync(rank, 3, port, Duration::from_secs(5));
        if rank == 2 {
            drop(sync); // the process "dies": its socket closes
            return None;
        }
        Some(sync.all_reduce_scalars(&mut [1.0]).unwrap_err().to_string())
    });
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}",
        began.elapsed()
    );
    let root = results[0].as_ref().unwrap();
    assert!(root.contains("rank 2 closed its connection"), "{root}");
    // Rank 0 tells the others which rank failed.
    let leaf = results[1].as_ref().unwrap();
    assert!(leaf.contains("rank 2 closed its connection"), "{leaf}");
}

#[test]
fn tcp_sync_stuck_rank_times_out() {
    let port = free_port();
    let results = on_ranks(2, move |rank| {
        let mut sync = tcp_sync(rank, 2, port, Duration::from_millis(300));
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(1500)); // alive but never calls
            return None;
        }
        let began = Instant::now();
        let message = sync.all_reduce_scalars(&mut [1.0]).unwrap_err().to_string();
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "took {:?}",
            began.elapsed()
        );
        Some(message)
    });
    let root = results[0].as_ref().unwrap();
    assert!(
        root.contains("rank 1 did not answer within 300ms"),
        "{root}"
    );
}

#[test]
fn tcp_sync_reports_ranks_out_of_step() {
    let port = free_port();
    let results = on_ranks(2, move |rank| {
        let mut sync = tcp_sync(rank, 2, port, Duration::from_secs(5));
        let message = if rank == 0 {
            sync.all_reduce_scalars(&mut [1.0, 2.0])
        } else {
            sync.all_reduce_scalars(&mut [1.0])
        };
        message.unwrap_err().to_string()
    });
    for message in results {
        assert!(message.contains("ranks out of step"), "{message}");
    }
}

/// The point of data parallelism: 2 ranks with half a batch each, gradients averaged, equal the
/// gradient of the whole batch on one process (up to f32 rounding).
#[test]
fn two_ranks_with_half_batches_give_the_full_batch_gradient() {
    let (rows, width) = (8usize, 5usize);
    let x: Vec<f32> = (0..rows * width)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let y: Vec<f32> = (0..rows).map(|i| (i as f32).sin()).collect();
    let w: Vec<f32> = (0..width).map(|i| 0.1 * i as f32 - 0.2).collect();
    // Mean squared error of x w - y over the given rows; returns dL/dw.
    let grad = move |from: usize, to: usize| -> Tensor {
        let w = candle_core::Var::from_vec(w.clone(), (width, 1), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(
            x[from * width..to * width].to_vec(),
            (to - from, width),
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::from_vec(y[from..to].to_vec(), (to - from, 1), &Device::Cpu).unwrap();
        let loss = x
            .matmul(w.as_tensor())
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        loss.backward().unwrap().get(w.as_tensor()).unwrap().clone()
    };
    let full = grad(0, rows)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let port = free_port();
    let per_rank = on_ranks(2, move |rank| {
        let mut sync = connect(&env(rank, 2, port), &Device::Cpu, Duration::from_secs(5)).unwrap();
        let half = rows / 2;
        let local = grad(rank * half, (rank + 1) * half);
        sync.all_reduce_mean(&[local]).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    for got in &per_rank {
        for (g, f) in got.iter().zip(&full) {
            assert!(
                (g - f).abs() <= 1e-6 * f.abs().max(1.0),
                "{got:?} vs {full:?}"
            );
        }
    }
    assert_eq!(per_rank[0], per_rank[1]);
}

#[test]
fn connect_with_world_1_is_the_identity() {
    let mut sync = connect(&DistEnv::single(), &Device::Cpu, Duration::from_secs(1)).unwrap();
    assert_eq!((sync.rank(), sync.world()), (0, 1));
    let t = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
    let out = sync.all_reduce_mean(std::slice::from_ref(&t)).unwrap();
    assert_eq!(out[0].to_vec1::<f32>().unwrap(), [1.5, -2.0]);
    let mut values = [3.0];
    sync.all_reduce_scalars(&mut values).unwrap();
    assert_eq!(values, [3.0]);
    sync.check_same("x", 1.0).unwrap();
}

fn sh(script: &str) -> Vec<OsString> {
    vec!["-c".into(), script.into()]
}

#[test]
fn launch_with_zero_workers_is_refused() {
    let message = launch_program(Path::new("/bin/sh"), 0, &sh("true"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("--gpus 0"), "{message}");
}

#[test]
fn launch_sets_each_workers_environment() {
    // Each worker checks its own variables and fails (naming itself) if one is wrong.
    let script = r#"[ "$WORLD_SIZE" = 3 ] && [ "$LOCAL_RANK" = "$RANK" ] && [ "$RANK" -lt 3 ] \
        && [ "$MASTER_ADDR" = 127.0.0.1 ] && [ "$MASTER_PORT" -gt 0 ] && [ -n "$NCCL_NVLS_ENABLE" ]"#;
    launch_program(Path::new("/bin/sh"), 3, &sh(script)).unwrap();
}

#[test]
fn launch_names_the_failed_worker_and_kills_the_hanging_ones() {
    let began = Instant::now();
    let message = launch_program(
        Path::new("/bin/sh"),
        3,
        &sh(r#"if [ "$RANK" = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 30"#),
    )
    .unwrap_err()
    .to_string();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
    assert!(message.contains("worker rank 1"), "{message}");
    assert!(message.contains("exited with status 3"), "{message}");
    assert!(
        message.contains("stopped the 2 other running worker(s)"),
        "{message}"
    );
}

#[test]
fn launch_reports_a_worker_killed_by_a_signal() {
    let message = launch_program(
        Path::new("/bin/sh"),
        2,
        &sh(r#"if [ "$RANK" = 0 ]; then kill -9 $$; fi; exec sleep 30"#),
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("worker rank 0"), "{message}");
    assert!(message.contains("killed by signal 9"), "{message}");
}

#[test]
fn worker_arguments_drop_gpus() {
    let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        args_without_gpus(args(&["--config", "c.toml", "--gpus", "8", "--resume"])),
        args(&["--config", "c.toml", "--resume"])
    );
    assert_eq!(
        args_without_gpus(args(&["--gpus=2", "train", "--set", "device=cuda"])),
        args(&["train", "--set", "device=cuda"])
    );
}

/// Two GPUs of one machine (ranks as threads): NCCL averages known gradients, bucketed (one
/// tensor larger than a bucket), in f32 and bf16, equal to the hand-computed mean on both ranks.
/// Run by hand on a GPU machine: `cargo test --release --features nccl --test dist nccl`.
#[cfg(feature = "nccl")]
#[test]
fn nccl_averages_gradients_over_two_gpus() {
    use mhc_train::dist::nccl::BUCKET_BYTES;
    let port = free_port();
    let big = BUCKET_BYTES / 4 + 3;
    let results = on_ranks(2, move |rank| {
        let device = Device::new_cuda(rank).expect("this test needs 2 CUDA GPUs");
        let mut sync = connect(&env(rank, 2, port), &device, Duration::from_secs(60)).unwrap();
        assert_eq!((sync.rank(), sync.world()), (rank, 2));
        let r = rank as f32;
        // a = (r + 1) * [0, 1, ..., 5] as [2, 3]; b = r + 0.5 everywhere (bigger than a bucket);
        // c = [r, -2r, 4] in bf16.
        let a = (Tensor::arange(0f32, 6.0, &device).unwrap() * (r as f64 + 1.0))
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::full(r + 0.5, big, &device).unwrap();
        let c = Tensor::new(&[r, -2.0 * r, 4.0], &device)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let out = sync.all_reduce_mean(&[a, b, c]).unwrap();
        let mut scalars = [r as f64, 3.0];
        sync.all_reduce_scalars(&mut scalars).unwrap();
        sync.check_same("checksum", 7.0).unwrap();
        let c_dtype = out[2].dtype();
        let host: Vec<Vec<f32>> = out
            .iter()
            .map(|t| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (host, out[0].dims().to_vec(), c_dtype, scalars)
    });
    // Means over r = 0, 1: mean(r + 1) = 1.5, mean(r + 0.5) = 1, mean(r) = 0.5.
    let want_a: Vec<f32> = (0..6).map(|i| 1.5 * i as f32).collect();
    for (host, dims, c_dtype, scalars) in &results {
        assert_eq!(host[0], want_a);
        assert_eq!(dims, &[2, 3]);
        assert_eq!(host[1].len(), big);
        assert!(host[1].iter().all(|&x| x == 1.0));
        assert_eq!(host[2], [0.5, -1.0, 4.0]);
        assert_eq!(*c_dtype, DType::BF16);
        assert_eq!(*scalars, [0.5, 3.0]);
    }
}
