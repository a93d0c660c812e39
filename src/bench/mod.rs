//! `mhc-train bench`: the seed report's tables measured here (isolated ops, the mHC sublayer,
//! correctness, memory), real training steps, and their report (bench.json, bench.md, a plot).

pub mod device;
pub mod layer;
pub mod plot;
pub mod report;
pub mod train;
