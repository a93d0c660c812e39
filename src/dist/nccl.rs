//! Gradient averaging over GPUs with NCCL (RCCL on AMD), one process per GPU.
//!
//! The unique id travels from rank 0 through the TCP rendezvous; the communicator runs on
//! candle's own CUDA stream, so the all-reduce is ordered after the backward's kernels and before
//! the optimizer's with no extra synchronisation. Gradients are flattened into f32 buckets of
//! about [`BUCKET_BYTES`] (one NCCL call per bucket, not per tensor) and averaged with
//! `ncclAvg`. Reducing in f32 even for bf16 gradients keeps the sum over ranks from rounding
//! at bf16 precision; it doubles the bytes moved, which a data-parallel step of this size hides.
//!
//! No overlap with the backward: candle's `backward()` returns every gradient at once when the
//! whole backward has run, so there is no point at which a finished bucket could start early.
//!
//! Faults: NCCL errors become errors naming the rank. A peer that dies leaves NCCL kernels
//! waiting forever, so completion is polled against the timeout instead of a blocking sync; the
//! host scalars go over the rendezvous connections ([`TcpSync`]), where a dead peer is noticed
//! at once and named. Dropping the communicator aborts it (cudarc's `Drop` calls ncclCommAbort).

use super::rendezvous::rendezvous;
use super::tcp_sync::TcpSync;
use super::{DistEnv, GradSync};
use anyhow::{bail, Context, Result};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::sys::CUevent_flags;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::ffi::c_char;
use std::time::{Duration, Instant};

/// Target size of one all-reduce: large enough to run at bus bandwidth, small enough that the
/// flattened copy is a small share of memory (PyTorch DDP's default is 25 MiB too).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

pub struct NcclSync {
    comm: Comm,
    device: CudaDevice,
    /// Host scalars, the start-up check, and a fast death notice for peers.
    host: TcpSync,
    rank: usize,
    timeout: Duration,
}

fn nccl_failed(rank: usize, what: &str, e: NcclError) -> anyhow::Error {
    anyhow::anyhow!(
        "rank {rank}: NCCL {what} failed with {:?} (run with NCCL_DEBUG=WARN for NCCL's reason)",
        e.0
    )
}

impl NcclSync {
    /// Rendezvous, unique id from rank 0, then one communicator over all ranks on `device`'s
    /// stream.
    pub fn connect(env: &DistEnv, device: &Device, timeout: Duration) -> Result<NcclSync> {
        let rank = env.rank;
        let Device::Cuda(cuda) = device else {
            bail!("rank {rank}: the NCCL backend needs a CUDA device, not {device:?}");
        };
        let mut links = rendezvous(env, timeout)?;
        let mine: Vec<u8> = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_failed(rank, "ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let shared = links.broadcast(&mine, timeout)?;
        if shared.len() != ID_BYTES {
            bail!(
                "rank {rank}: rank 0 sent a {}-byte NCCL id, expected {ID_BYTES}",
                shared.len()
            );
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (to, from) in internal.iter_mut().zip(&shared) {
            *to = *from as c_char;
        }
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, env.world, Id::uninit(internal))
            .map_err(|e| nccl_failed(rank, "ncclCommInitRank", e))?;
        Ok(NcclSync {
            comm,
            device: cuda.clone(),
            host: TcpSync::new(links, timeout),
            rank,
            timeout,
        })
    }

    /// The average over ranks of a contiguous f32 tensor, as a new 1-D tensor (queued on the
    /// stream; [`Self::wait`] bounds its completion).
    fn average(&self, bucket: &Tensor) -> Result<Tensor> {
        let count = bucket.elem_count();
        let stream = self.device.cuda_stream();
        // Every element is written by the all-reduce before anything reads it.
        let mut averaged = unsafe { stream.alloc::<f32>(count) }?;
        {
            let (storage, layout) = bucket.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                bail!("rank {}: a gradient is not on the GPU", self.rank);
            };
            let (start, end) = layout
                .contiguous_offsets()
                .context("a gradient bucket is not contiguous")?;
            let source = storage.as_cuda_slice::<f32>()?.slice(start..end);
            self.comm
                .all_reduce(&source, &mut averaged, &ReduceOp::Avg)
                .map_err(|e| nccl_failed(self.rank, "all-reduce", e))?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(averaged, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            count,
            BackpropOp::none(),
            false,
        ))
    }

    /// Waits for the queued collectives, at most the timeout: a dead or stuck peer leaves them
    /// unfinished forever, which must become an error, not a hang.
    fn wait(&self, what: &str) -> Result<()> {
        let stream = self.device.cuda_stream();
        let done = stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        let deadline = Instant::now() + self.timeout;
        while !done.try_is_complete()? {
            if Instant::now() >= deadline {
                bail!(
                    "rank {}: the NCCL {what} did not finish within {:?}: another rank died or is stuck (see its error)",
                    self.rank,
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

/// Consecutive runs of `grads` whose f32 size stays within [`BUCKET_BYTES`] (a larger tensor
/// is a bucket of its own); deterministic, so every rank builds the same buckets.
fn buckets(grads: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, grad) in grads.iter().enumerate() {
        let size = grad.elem_count() * 4;
        if index > start && bytes + size > BUCKET_BYTES {
            out.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < grads.len() {
        out.push(start..grads.len());
    }
    out
}

impl GradSync for NcclSync {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(grads.len());
        for range in buckets(grads) {
            let members = &grads[range];
            let flat = members
                .iter()
                .map(|g| g.to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let averaged = self.average(&Tensor::cat(&flat, 0)?)?;
            let mut offset = 0;
            for grad in members {
                let count = grad.elem_count();
                out.push(
                    averaged
                        .narrow(0, offset, count)?
                        .reshape(grad.shape())?
                        .to_dtype(grad.dtype())?,
                );
                offset += count;
            }
        }
        self.wait("gradient all-reduce")?;
        Ok(out)
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_scalars(values)
    }

    fn check_same(&mut self, what: &str, value: f64) -> Result<()> {
        self.host.check_same(what, value)
    }
}
