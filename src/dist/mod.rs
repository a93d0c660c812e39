//! Data parallelism: one process per device, torchrun-style environment ([`DistEnv`]), a TCP
//! rendezvous through MASTER_ADDR:MASTER_PORT, and gradient averaging behind [`GradSync`], the
//! trainer's only view of it. Backends: [`SingleProcess`] (world 1), [`TcpSync`] (CPU), and
//! NCCL (CUDA, feature `nccl`). [`launch`] is `--gpus N`.

pub mod env;
pub mod launcher;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp_sync;

pub use env::{DistEnv, Master};
pub use launcher::{args_without_gpus, launch, launch_program};
pub use rendezvous::{rendezvous, Links};
pub use tcp_sync::TcpSync;

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Duration;

/// The trainer's only view of data parallelism. Every rank must make the same calls in the same
/// order (collectives); a rank that does not, dies, or stalls makes the call fail on the others,
/// naming it.
pub trait GradSync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Averages the gradients over ranks; returns tensors of the same shapes/dtypes/devices,
    /// identical on every rank.
    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Averages a few host scalars (loss, token counts) over ranks.
    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()>;
    /// Errors (on every rank) naming the ranks whose `value` differs from rank 0's in any bit,
    /// e.g. a parameter checksum at start-up.
    fn check_same(&mut self, what: &str, value: f64) -> Result<()>;
}

/// World of one: every reduction is the identity.
pub struct SingleProcess;

impl GradSync for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(grads.to_vec())
    }

    fn all_reduce_scalars(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn check_same(&mut self, _what: &str, _value: f64) -> Result<()> {
        Ok(())
    }
}

/// Joins the run `env` describes: world 1 -> [`SingleProcess`]; a CUDA device -> NCCL (its
/// unique id sent through the rendezvous; needs the `nccl` feature); any other device ->
/// [`TcpSync`]. `timeout` bounds the rendezvous and every wait on a peer afterwards.
pub fn connect(env: &DistEnv, device: &Device, timeout: Duration) -> Result<Box<dyn GradSync>> {
    if env.world == 1 {
        return Ok(Box::new(SingleProcess));
    }
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        return Ok(Box::new(nccl::NcclSync::connect(env, device, timeout)?));
        #[cfg(not(feature = "nccl"))]
        anyhow::bail!(
            "rank {}: WORLD_SIZE={} on a CUDA device needs NCCL, but this binary was built without it: rebuild with --features nccl (or train on device = \"cpu\")",
            env.rank,
            env.world
        );
    }
    let links = rendezvous(env, timeout)?;
    Ok(Box::new(TcpSync::new(links, timeout)))
}
