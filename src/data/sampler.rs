//! Batches of windows: random ones for training (seeded, resumable, sharded by rank) and
//! deterministic ones for validation.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::corpus::TokenStream;

/// Everything needed to continue drawing exactly where a run stopped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SamplerState {
    pub seed: u64,
    /// ChaCha8's position in its output stream, in 32-bit words.
    #[serde(with = "u128_as_string")]
    pub word_pos: u128,
}

/// Draws training windows. Every rank of a data-parallel run owns an identical sampler, draws all
/// the global batch's window starts, and keeps only its slice of the rows, so the ranks stay in
/// step without communicating and together cover the global batch exactly once.
pub struct Sampler {
    seed: u64,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Sampler {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    pub fn from_state(state: &SamplerState) -> Self {
        let mut sampler = Sampler::new(state.seed);
        sampler.rng.set_word_pos(state.word_pos);
        sampler
    }

    /// One global batch: `global_batch` window starts; returns this rank's rows as flat
    /// (inputs, targets), each `rows * seq_len` u32, rows = global_batch / world.
    /// Row i's inputs are `tokens[s..s + seq_len]` and its targets `tokens[s + 1..s + seq_len + 1]`.
    pub fn next_batch(
        &mut self,
        stream: &TokenStream,
        global_batch: usize,
        seq_len: usize,
        rank: usize,
        world: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        // Checked before drawing, so an error leaves the sampler where it was.
        if world == 0 || rank >= world {
            bail!("rank {rank} is not in a world of {world} workers");
        }
        if global_batch == 0 || !global_batch.is_multiple_of(world) {
            bail!("the global batch of {global_batch} sequences does not divide evenly over {world} workers");
        }
        check_window_fits(stream, seq_len)?;
        let max_start = (stream.len() - seq_len - 1) as u64;
        let starts: Vec<usize> = (0..global_batch)
            .map(|_| self.rng.random_range(0..=max_start) as usize)
            .collect();
        let rows = global_batch / world;
        Ok(windows(
            stream,
            &starts[rank * rows..(rank + 1) * rows],
            seq_len,
        ))
    }
}

/// Deterministic validation batch number `index` (same on every call), `rows` windows.
///
/// The split is cut into K = (len - 1) / seq_len non-overlapping windows; global row g (counting
/// across batches) takes window (g * stride) mod K with a stride near K / golden ratio and coprime
/// to K. So the first K rows visit every window exactly once, and any prefix of batches samples
/// the whole split evenly rather than only its beginning.
///
/// Panics when the stream is shorter than `seq_len + 1` tokens (`load_dataset` rules that out).
pub fn val_batch(
    stream: &TokenStream,
    index: usize,
    rows: usize,
    seq_len: usize,
) -> (Vec<u32>, Vec<u32>) {
    if let Err(e) = check_window_fits(stream, seq_len) {
        panic!("val_batch: {e}");
    }
    let windows_in_split = (stream.len() - 1) / seq_len;
    let stride = coprime_stride(windows_in_split);
    let starts: Vec<usize> = (0..rows)
        .map(|row| {
            let global_row = (index * rows + row) % windows_in_split;
            (global_row * stride) % windows_in_split * seq_len
        })
        .collect();
    windows(stream, &starts, seq_len)
}

/// The integer nearest `k / golden ratio` (at least 1) that shares no factor with `k`.
fn coprime_stride(k: usize) -> usize {
    let mut stride = ((k as f64) * 0.618_033_988_749_895).round().max(1.0) as usize;
    while gcd(stride, k) != 1 {
        stride += 1;
    }
    stride
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn check_window_fits(stream: &TokenStream, seq_len: usize) -> Result<()> {
    if seq_len == 0 {
        bail!("seq_len must be at least 1");
    }
    if stream.len() < seq_len + 1 {
        bail!(
            "a window needs seq_len + 1 = {} tokens but the stream has only {}",
            seq_len + 1,
            stream.len()
        );
    }
    Ok(())
}

/// Inputs and targets (inputs shifted by one token) of the windows starting at `starts`.
fn windows(stream: &TokenStream, starts: &[usize], seq_len: usize) -> (Vec<u32>, Vec<u32>) {
    let mut inputs = Vec::with_capacity(starts.len() * seq_len);
    let mut targets = Vec::with_capacity(starts.len() * seq_len);
    for &s in starts {
        stream.extend_into(s..s + seq_len, &mut inputs);
        stream.extend_into(s + 1..s + seq_len + 1, &mut targets);
    }
    (inputs, targets)
}

/// u128 as a decimal string: JSON readers often and TOML always lose integers above 2^63.
mod u128_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_is_coprime_so_k_rows_visit_every_window_once() {
        for k in 1..200 {
            let stride = coprime_stride(k);
            let mut seen: Vec<usize> = (0..k).map(|g| g * stride % k).collect();
            seen.sort();
            assert_eq!(
                seen,
                (0..k).collect::<Vec<_>>(),
                "k = {k}, stride = {stride}"
            );
        }
        assert_eq!(coprime_stride(100), 63); // round(61.8) = 62 shares 2 with 100.
    }
}
