//! Data parallelism on the CPU (the gloo-like fallback, and how CI tests data parallelism end to
//! end without GPUs): reductions through rank 0 over the rendezvous connections.
//!
//! Each rank sends its values to rank 0; rank 0 adds them in rank order (0, 1, 2, ...) in f64,
//! divides by the world size, and sends the same result bytes back to every rank. The order is
//! fixed, so results are deterministic run to run, and every rank receives identical values, so
//! parameters stay identical across ranks. Every wait has a deadline, and a peer that closes
//! its connection is noticed at once: a dead or stuck rank is an error naming it, not a hang.
//!
//! One message per call carries all gradients (TCP streams it; there is nothing to gain from
//! buckets on one connection), and candle's backward returns all gradients at once, so there is
//! no backward to overlap with.

use super::rendezvous::{describe, recv_exact, recv_frame, send_all, send_frame, Links, Peers};
use super::GradSync;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

/// Which reduction a message belongs to: ranks calling different reductions (a bug in the
/// caller) are reported instead of mixing unrelated numbers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Op {
    MeanF32 = 1,
    MeanF64 = 2,
    Same = 3,
}

const OK: u8 = 0;
const FAILED: u8 = 1;

pub struct TcpSync {
    links: Links,
    /// The longest wait for a peer within one call.
    timeout: Duration,
}

/// A wait on `peer` that failed. The message does not name this rank: the trainer's error
/// context does ("rank N: stopped; ...").
fn lost(peer: usize, e: &std::io::Error, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!("rank {peer} {}", describe(e, timeout))
}

impl TcpSync {
    pub fn new(links: Links, timeout: Duration) -> TcpSync {
        TcpSync { links, timeout }
    }

    /// One reduction: every rank's `payload` to rank 0, `combine` (on rank 0, given the payloads
    /// in rank order) makes the result every rank returns; an `Err` of `combine` becomes every
    /// rank's error.
    fn exchange(
        &mut self,
        op: Op,
        payload: &[u8],
        combine: impl FnOnce(&[Vec<u8>]) -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        match &mut self.links.peers {
            Peers::Leaf(stream) => {
                let mut header = vec![op as u8];
                header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                send_all(stream, &header, deadline)
                    .and_then(|()| send_all(stream, payload, deadline))
                    .map_err(|e| lost(0, &e, timeout))?;
                let mut status = [0u8];
                recv_exact(stream, &mut status, deadline).map_err(|e| lost(0, &e, timeout))?;
                let body = recv_frame(stream, deadline).map_err(|e| lost(0, &e, timeout))?;
                if status[0] == OK {
                    Ok(body)
                } else {
                    bail!("{}", String::from_utf8_lossy(&body))
                }
            }
            Peers::Root(streams) => {
                let mut payloads = vec![payload.to_vec()];
                let mut failure = None;
                for (index, stream) in streams.iter_mut().enumerate() {
                    let peer = index + 1;
                    match recv_message(stream, op, payload.len(), deadline) {
                        Ok(Ok(bytes)) => payloads.push(bytes),
                        Ok(Err(mismatch)) => {
                            failure = Some(format!("rank {peer} {mismatch}"));
                            break;
                        }
                        Err(e) => {
                            failure = Some(lost(peer, &e, timeout).to_string());
                            break;
                        }
                    }
                }
                let result = match failure {
                    Some(message) => Err(message),
                    None => combine(&payloads),
                };
                let (status, body) = match &result {
                    Ok(bytes) => (OK, bytes.as_slice()),
                    Err(message) => (FAILED, message.as_bytes()),
                };
                for (index, stream) in streams.iter_mut().enumerate() {
                    let sent = send_all(stream, &[status], deadline)
                        .and_then(|()| send_frame(stream, body, deadline));
                    // After a failure the others are told on a best-effort basis: the dead rank
                    // is the error to report, not a second one while telling the rest.
                    if let (Err(e), OK) = (sent, status) {
                        return Err(lost(index + 1, &e, timeout));
                    }
                }
                match result {
                    Ok(bytes) => Ok(bytes),
                    Err(message) => bail!("{message}"),
                }
            }
        }
    }
}

/// A leaf's message: its bytes, or (inner `Err`) how it does not match rank 0's call.
fn recv_message(
    stream: &mut std::net::TcpStream,
    op: Op,
    len: usize,
    deadline: Instant,
) -> std::io::Result<std::result::Result<Vec<u8>, String>> {
    let mut header = [0u8; 9];
    recv_exact(stream, &mut header, deadline)?;
    let their_len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes")) as usize;
    if header[0] != op as u8 || their_len != len {
        return Ok(Err(format!(
            "called reduction {} of {their_len} bytes while rank 0 called {op:?} of {len} bytes (ranks out of step)",
            header[0]
        )));
    }
    let mut bytes = vec![0u8; len];
    recv_exact(stream, &mut bytes, deadline)?;
    Ok(Ok(bytes))
}

/// Element-wise mean over the payloads (rank order), summed in f64: `read`/`write` convert
/// one element of `size` bytes.
fn mean_of(
    payloads: &[Vec<u8>],
    size: usize,
    read: impl Fn(&[u8]) -> f64,
    write: impl Fn(f64, &mut Vec<u8>),
) -> Vec<u8> {
    let count = payloads[0].len() / size;
    let mut sums = vec![0f64; count];
    for payload in payloads {
        for (sum, bytes) in sums.iter_mut().zip(payload.chunks_exact(size)) {
            *sum += read(bytes);
        }
    }
    let world = payloads.len() as f64;
    let mut out = Vec::with_capacity(payloads[0].len());
    for sum in sums {
        write(sum / world, &mut out);
    }
    out
}

impl GradSync for TcpSync {
    fn rank(&self) -> usize {
        self.links.rank()
    }

    fn world(&self) -> usize {
        self.links.world()
    }

    fn all_reduce_mean(&mut self, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut payload = Vec::new();
        for grad in grads {
            for x in grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                payload.extend_from_slice(&x.to_le_bytes());
            }
        }
        let reduced = self.exchange(Op::MeanF32, &payload, |payloads| {
            Ok(mean_of(
                payloads,
                4,
                |b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
                |x, out| out.extend_from_slice(&(x as f32).to_le_bytes()),
            ))
        })?;
        let mut values = reduced
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
        grads
            .iter()
            .map(|grad| {
                let part: Vec<f32> = values.by_ref().take(grad.elem_count()).collect();
                Ok(Tensor::from_vec(part, grad.shape(), grad.device())?.to_dtype(grad.dtype())?)
            })
            .collect()
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()> {
        let payload: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let reduced = self.exchange(Op::MeanF64, &payload, |payloads| {
            Ok(mean_of(
                payloads,
                8,
                |b| f64::from_le_bytes(b.try_into().expect("8 bytes")),
                |x, out| out.extend_from_slice(&x.to_le_bytes()),
            ))
        })?;
        for (value, bytes) in values.iter_mut().zip(reduced.chunks_exact(8)) {
            *value = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    fn check_same(&mut self, what: &str, value: f64) -> Result<()> {
        let what = what.to_string();
        self.exchange(Op::Same, &value.to_le_bytes(), move |payloads| {
            let of = |b: &Vec<u8>| f64::from_le_bytes(b.as_slice().try_into().expect("8 bytes"));
            let reference = of(&payloads[0]);
            // Bit equality: identical computations on identical data give identical bits.
            let differing: Vec<String> = payloads
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, b)| of(b).to_bits() != reference.to_bits())
                .map(|(rank, b)| format!("rank {rank} has {:e}", of(b)))
                .collect();
            if differing.is_empty() {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "{what} differs from rank 0's ({reference:e}): {}",
                    differing.join(", ")
                ))
            }
        })?;
        Ok(())
    }
}
