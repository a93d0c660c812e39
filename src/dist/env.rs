//! Where this process sits in a data-parallel run, read from the torchrun-style environment
//! (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the same binary runs under
//! torchrun, mpirun (with those variables exported), SLURM, or `mhc-train --gpus N`.

use anyhow::{bail, Result};
use std::fmt;

/// The variables this module reads, in the order their errors are reported.
pub const VARIABLES: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// Rank 0's rendezvous address: MASTER_ADDR (a host name or an IP address) and MASTER_PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            // An IPv6 literal: bracketed so the port stays readable.
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where this process sits. A single process is rank 0 of 1 with no master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// Index of this process among those on its node: the GPU it uses (`cuda:<local_rank>`).
    pub local_rank: usize,
    /// Set whenever `world > 1`.
    pub master: Option<Master>,
}

impl DistEnv {
    /// Rank 0 of 1.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master: None,
        }
    }

    /// Reads the process environment. None of the variables set = a single process; partial or
    /// inconsistent settings are an error naming the variable.
    pub fn from_env() -> Result<DistEnv> {
        DistEnv::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`DistEnv::from_env`], with the variables looked up by `var` (tests pass a map, since
    /// the process environment is shared by concurrently running tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let set: Vec<&str> = VARIABLES
            .iter()
            .copied()
            .filter(|name| var(name).is_some())
            .collect();
        if set.is_empty() {
            return Ok(DistEnv::single());
        }
        let required = |name: &str, why: &str| -> Result<String> {
            match var(name) {
                Some(value) => Ok(value),
                None => bail!(
                    "{name} is not set, but {} {} set: {why}",
                    set.join(", "),
                    if set.len() == 1 { "is" } else { "are" }
                ),
            }
        };
        let world = parse_count(
            "WORLD_SIZE",
            &required("WORLD_SIZE", "set WORLD_SIZE to the number of processes")?,
        )?;
        if world == 0 {
            bail!("WORLD_SIZE=0: a run needs at least one process");
        }
        let rank = parse_count(
            "RANK",
            &required("RANK", "set RANK to this process's index in 0..WORLD_SIZE")?,
        )?;
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}: ranks are 0..WORLD_SIZE-1");
        }
        if world == 1 {
            // One process needs no rendezvous; LOCAL_RANK may still pick its GPU.
            let local_rank = match var("LOCAL_RANK") {
                Some(value) => parse_count("LOCAL_RANK", &value)?,
                None => 0,
            };
            return Ok(DistEnv {
                rank,
                world,
                local_rank,
                master: None,
            });
        }
        let local_rank = parse_count(
            "LOCAL_RANK",
            &required(
                "LOCAL_RANK",
                "set LOCAL_RANK to this process's index on its node (its GPU)",
            )?,
        )?;
        if local_rank >= world {
            bail!("LOCAL_RANK={local_rank} is not below WORLD_SIZE={world}");
        }
        let host = required("MASTER_ADDR", "set MASTER_ADDR to rank 0's host")?;
        if host.trim().is_empty() {
            bail!("MASTER_ADDR is empty: set it to rank 0's host name or IP address");
        }
        let port_text = required(
            "MASTER_PORT",
            "set MASTER_PORT to a free TCP port on rank 0's host",
        )?;
        let port = match port_text.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => bail!("MASTER_PORT={port_text:?} is not a TCP port (1..65535)"),
        };
        Ok(DistEnv {
            rank,
            world,
            local_rank,
            master: Some(Master {
                host: host.trim().to_string(),
                port,
            }),
        })
    }

    /// Rank 0 alone writes logs, metrics and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

fn parse_count(name: &str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) => Ok(n),
        Err(_) => bail!("{name}={value:?} is not a non-negative integer"),
    }
}
