//! What the benchmarks need to know about the device: its name, its memory in use, its peak rate.

use anyhow::Result;
use candle_core::Device;

/// Device memory in use (total - free, as the driver reports it, so other processes count too:
/// benches run alone). On CPU every reading is NaN.
pub struct MemoryProbe {
    #[cfg(feature = "cuda")]
    context: Option<std::sync::Arc<cudarc::driver::CudaContext>>,
    baseline: f64,
}

impl MemoryProbe {
    /// Starts measuring: what is in use now becomes the baseline.
    pub fn new(device: &Device) -> Result<MemoryProbe> {
        let mut probe = MemoryProbe {
            #[cfg(feature = "cuda")]
            context: match device {
                Device::Cuda(cuda) => Some(cuda.cuda_stream().context().clone()),
                _ => None,
            },
            baseline: f64::NAN,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        probe.baseline = probe.used()?;
        Ok(probe)
    }

    pub fn baseline(&self) -> f64 {
        self.baseline
    }

    /// Bytes in use on the device now.
    pub fn used(&self) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Some(context) = &self.context {
            let (free, total) = context.mem_get_info()?;
            return Ok((total - free) as f64);
        }
        Ok(f64::NAN)
    }
}

/// The device's name ("NVIDIA H100 80GB HBM3", "cpu").
pub fn device_name(device: &Device) -> Result<String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => Ok(cuda.cuda_stream().context().name()?),
        _ => Ok("cpu".into()),
    }
}

/// Dense bf16 tensor-core peak in FLOP/s for GPUs we know (datasheets: H100/H200 SXM 989 TFLOP/s,
/// MI300X 1307, MI308X 1307 / 4.0 ~ 327 is not published reliably, so it is left unknown);
/// NaN when unknown: pass --peak-tflops.
pub fn bf16_peak_flops(name: &str) -> f64 {
    if name.contains("H100") || name.contains("H200") {
        989e12
    } else if name.contains("MI300X") {
        1307e12
    } else {
        f64::NAN
    }
}
