//! Training: the loop, AdamW, the LR schedule, checkpoints (atomic, resumable), evaluation.

pub mod checkpoint;
pub mod eval;
pub mod optimizer;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, Summary};
