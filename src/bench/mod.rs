//! `mhc-train bench`: the seed report's tables measured here, and real training steps.

pub mod device;
pub mod layer;
pub mod train;
