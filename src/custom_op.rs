//! CPU-side glue shared by the candle custom ops (the mHC ops in `mhc::ops`, the fused RMSNorm in
//! `model::rms_norm`): typed views of CPU storage and a dispatch over the storage element type.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, WithDType};

/// The contiguous elements of a CPU storage as `E`, or an error naming the op and the tensor.
pub(crate) fn cpu_slice<'a, E: WithDType>(
    op: &str,
    name: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [E]> {
    if s.dtype() != E::DTYPE {
        bail!(
            "{op}: {name} has dtype {:?}, expected {:?}",
            s.dtype(),
            E::DTYPE
        );
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!(
            "{op}: {name} must be contiguous (shape {:?}, stride {:?})",
            l.shape(),
            l.stride()
        );
    };
    Ok(&E::cpu_storage_as_slice(s)?[start..end])
}

/// The contiguous elements of a tensor's CPU storage (from `Tensor::storage_and_layout`) as `E`.
pub(crate) fn storage_slice<'a, E: WithDType>(
    op: &str,
    name: &str,
    s: &'a Storage,
    l: &Layout,
) -> Result<&'a [E]> {
    let Storage::Cpu(s) = s else {
        bail!("{op}: {name} is not on the CPU");
    };
    cpu_slice::<E>(op, name, s, l)
}

/// Runs `$body` with `$E` bound to the storage element type of x (f32, bf16 or f64; the CPU
/// paths of the ops take all three).
macro_rules! dispatch_elem {
    ($op:expr, $dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $E = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            candle_core::DType::F64 => {
                type $E = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: x has dtype {other:?}; supported are f32, bf16 and f64",
                $op
            ),
        }
    };
}
pub(crate) use dispatch_elem;
