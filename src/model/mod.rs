//! The transformer: parameters, sublayers, and the GPT model with plain or mHC residuals.

pub mod gpt;
pub mod layers;
pub mod params;
pub mod rms_norm;

pub use gpt::{Gpt, Output};
