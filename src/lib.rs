//! mhc-train: train transformers whose residual stream is n streams mixed by mHC
//! (Manifold-Constrained Hyper-Connections), with fused GPU kernels as candle custom ops.
//!
//! Data flows one way: config -> data -> model (with mHC ops) -> train loop -> log/checkpoint.

pub mod bench;
pub mod config;
mod custom_op;
pub mod data;
pub mod dist;
pub mod gpu;
#[cfg(feature = "hip")]
pub mod hip;
pub mod log;
pub mod mhc;
pub mod model;
pub mod train;
