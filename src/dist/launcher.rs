//! `mhc-train --gpus N`: the single-node convenience that starts N workers (this same binary,
//! the same arguments minus `--gpus`) with the torchrun-style environment set per worker, and
//! watches them: when one fails, the others are killed at once, so a crash never leaves the
//! rest hanging in a collective.

use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// How often the workers' states are polled.
const POLL: Duration = Duration::from_millis(20);

/// Spawns `n` copies of the current executable with `args` and the environment of each rank
/// (see [`launch_program`]). Refused inside an already distributed environment.
pub fn launch(n: usize, args: &[OsString]) -> Result<()> {
    if let Some(name) = super::env::VARIABLES
        .iter()
        .find(|name| std::env::var_os(name).is_some())
    {
        bail!("--gpus starts its own workers, but {name} is already set (running under torchrun, mpirun or SLURM?): leave --gpus out there");
    }
    let exe = std::env::current_exe()
        .context("cannot find the mhc-train executable to start the workers")?;
    launch_program(&exe, n, args)
}

/// Spawns `n` workers running `program args`, each with RANK = LOCAL_RANK = i, WORLD_SIZE = n,
/// MASTER_ADDR = 127.0.0.1, MASTER_PORT = a free port, and NCCL_NVLS_ENABLE = 0 unless already
/// set (NVLink multicast is unavailable on the lent machines). Waits for all; when a worker
/// exits non-zero or dies, kills the others and returns an error naming that rank and status.
pub fn launch_program(program: &Path, n: usize, args: &[OsString]) -> Result<()> {
    if n == 0 {
        bail!("--gpus 0: at least one worker is needed");
    }
    let port = free_port()?;
    let mut workers: Vec<(usize, Child)> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            command.env("NCCL_NVLS_ENABLE", "0");
        }
        match command.spawn() {
            Ok(child) => workers.push((rank, child)),
            Err(e) => {
                kill_all(&mut workers);
                return Err(e).with_context(|| {
                    format!("cannot start worker rank {rank} ({})", program.display())
                });
            }
        }
    }
    loop {
        let mut running = 0;
        for (rank, child) in workers.iter_mut() {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    let (rank, pid) = (*rank, child.id());
                    let killed = kill_all(&mut workers);
                    bail!(
                        "worker rank {rank} (pid {pid}) {}; stopped the {killed} other running worker(s)",
                        describe(status)
                    );
                }
                Ok(None) => running += 1,
                Err(e) => {
                    let rank = *rank;
                    kill_all(&mut workers);
                    return Err(e).with_context(|| format!("cannot watch worker rank {rank}"));
                }
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Kills and reaps the workers still running; returns how many there were.
fn kill_all(workers: &mut [(usize, Child)]) -> usize {
    let mut killed = 0;
    for (_, child) in workers.iter_mut() {
        if let Ok(None) = child.try_wait() {
            // SIGKILL: a worker blocked in a collective would not act on a polite signal.
            // Checkpoints are written to a temporary name and renamed, so the last one survives.
            let _ = child.kill();
            let _ = child.wait();
            killed += 1;
        }
    }
    killed
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended abnormally ({status})"),
    }
}

/// A port free now on loopback (the OS picks it). Another process could take it before rank 0
/// binds it; then rank 0 fails with an error naming the port, and a rerun picks another.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free TCP port for the rendezvous")?;
    Ok(listener.local_addr()?.port())
}

/// The command line minus `--gpus N` / `--gpus=N`: what each worker runs.
pub fn args_without_gpus<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == OsStr::new("--gpus") {
            args.next();
        } else if !arg.to_string_lossy().starts_with("--gpus=") {
            out.push(arg);
        }
    }
    out
}
