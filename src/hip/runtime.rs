//! A small HIP runtime layer over hip-sys: device choice by architecture, module loading from the
//! code objects build.rs embedded, device buffers, kernel launches checked against the kernel
//! table of `crate::gpu`, and events for timing. Every HIP status other than success becomes an
//! error naming the call, the status and HIP's description of it.
//!
//! Everything runs on the device's null stream, in order; host copies are synchronous.

use crate::gpu::{Arg, DeviceLimits, Elem, Geometry, KernelSpec, Module};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use half::bf16;
use hip_sys::hiprt as sys;
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/hip_kernels.rs"));
}

// The `extra` launch protocol of hipModuleLaunchKernel (macros in hip_runtime_api.h, absent from
// hip-sys): the argument buffer, its size, end of list.
const HIP_LAUNCH_PARAM_BUFFER_POINTER: usize = 1;
const HIP_LAUNCH_PARAM_BUFFER_SIZE: usize = 2;
const HIP_LAUNCH_PARAM_END: usize = 3;

/// Lanes per wave the embedded code objects were compiled for (MHC_WAVE in kernels/compat.h:
/// gfx9 runs 64-lane waves). A device reporting another warp size cannot run them.
pub const CODE_OBJECT_WAVE: usize = 64;

/// The name of the CPU emulator of an NVIDIA GPU (`scripts/build-hip-emulator.sh --nvidia`,
/// kernels/emulator/runtime.cpp's DEVICE_NAME): it runs the kernels' CUDA forms behind this HIP
/// API (32-lane warps, tensor-core products), so it gets NVIDIA's launch rules, as the CUDA
/// build's devices do. This is how CI runs the tensor-core kernels without a GPU.
pub const EMULATED_NVIDIA_NAME: &str =
    "CPU emulation of an NVIDIA GPU (the kernels' CUDA forms, 32-lane warps)";
const EMULATED_NVIDIA_WAVE: usize = 32;

/// The architectures with embedded code objects, e.g. ["gfx942", "gfx90a"].
pub fn embedded_archs() -> &'static [&'static str] {
    embedded::ARCHS
}

/// The embedded code object of one kernels/*.cu (by file stem) for one architecture.
pub fn code_object(arch: &str, stem: &str) -> Option<&'static [u8]> {
    embedded::OBJECTS
        .iter()
        .find(|(a, s, _)| *a == arch && *s == stem)
        .map(|(_, _, bytes)| *bytes)
}

/// Turns a HIP status into a Result: "hipMalloc(4096 bytes): hipErrorOutOfMemory (out of memory)".
pub fn check(status: sys::hipError_t, call: impl FnOnce() -> String) -> Result<()> {
    if status == sys::hipError_t::hipSuccess {
        return Ok(());
    }
    bail!("{}: {}", call(), describe(status))
}

/// "hipErrorNoDevice (no ROCm-capable device is detected)".
fn describe(status: sys::hipError_t) -> String {
    // SAFETY: HIP returns static NUL-terminated strings (or null) for any status value.
    let text = |ptr: *const std::os::raw::c_char| {
        if ptr.is_null() {
            String::from("?")
        } else {
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let name = text(unsafe { sys::hipGetErrorName(status) });
    let description = text(unsafe { sys::hipGetErrorString(status) });
    if description == name {
        format!("{name} (code {})", status as i32)
    } else {
        format!("{name} ({description}, code {})", status as i32)
    }
}

/// Number of AMD GPUs the HIP runtime sees; an error that says so when there is none.
pub fn device_count() -> Result<usize> {
    let mut count = 0;
    // SAFETY: plain query with a valid out-pointer.
    let status = unsafe { sys::hipGetDeviceCount(&mut count) };
    if status == sys::hipError_t::hipErrorNoDevice
        || (status == sys::hipError_t::hipSuccess && count <= 0)
    {
        bail!(
            "no AMD GPU found: the HIP runtime reports {} (is this a ROCm machine with an \
             MI200/MI300-class GPU, and is /dev/kfd accessible?)",
            if status == sys::hipError_t::hipSuccess {
                "0 devices".to_string()
            } else {
                describe(status)
            }
        )
    }
    check(status, || "hipGetDeviceCount".into())?;
    Ok(count as usize)
}

/// An element type of device buffers: f32, or bf16 kept as its bits (half::bf16 is a u16).
pub trait DeviceElem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    const NAN: Self;
}
impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
    const NAN: Self = f32::NAN;
}
impl DeviceElem for bf16 {
    const DTYPE: DType = DType::BF16;
    const NAN: Self = bf16::NAN;
}

/// One device of the HIP runtime with the code objects of its architecture loaded.
pub struct Device {
    ordinal: i32,
    /// Marketing name, e.g. "AMD Instinct MI300X".
    pub name: String,
    /// The embedded architecture whose code objects run here, e.g. "gfx942".
    pub arch: String,
    pub limits: DeviceLimits,
    modules: HashMap<Module, Loaded>,
    functions: Mutex<HashMap<String, Function>>,
    poison_outputs: AtomicBool,
}

struct Loaded(sys::hipModule_t);
// SAFETY: a module handle is an opaque runtime object usable from any thread.
unsafe impl Send for Loaded {}
unsafe impl Sync for Loaded {}

#[derive(Clone, Copy)]
struct Function(sys::hipFunction_t);
// SAFETY: as for modules.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

impl Device {
    /// Opens AMD GPU `ordinal`: checks that it runs 64-lane waves, picks the embedded code
    /// objects of its architecture and loads every module. (Or the emulated NVIDIA GPU, see
    /// [`EMULATED_NVIDIA_NAME`].)
    pub fn open(ordinal: usize) -> Result<Device> {
        let count = device_count()?;
        if ordinal >= count {
            bail!("AMD GPU {ordinal} does not exist: the HIP runtime sees {count} device(s)")
        }
        let ordinal = ordinal as i32;
        check(unsafe { sys::hipSetDevice(ordinal) }, || {
            format!("hipSetDevice({ordinal})")
        })?;
        let attribute = |attr: sys::hipDeviceAttribute_t, what: &str| -> Result<usize> {
            let mut value = 0;
            check(
                unsafe { sys::hipDeviceGetAttribute(&mut value, attr, ordinal) },
                || format!("hipDeviceGetAttribute({what}, device {ordinal})"),
            )?;
            usize::try_from(value)
                .ok()
                .filter(|v| *v > 0)
                .with_context(|| format!("device {ordinal} reports {what} = {value}"))
        };
        let wave = attribute(
            sys::hipDeviceAttribute_t::hipDeviceAttributeWarpSize,
            "warpSize",
        )?;
        let multiprocessors = attribute(
            sys::hipDeviceAttribute_t::hipDeviceAttributeMultiprocessorCount,
            "multiProcessorCount",
        )?;
        let name = device_name(ordinal)?;
        let emulated_nvidia = name == EMULATED_NVIDIA_NAME;
        let kernel_wave = if emulated_nvidia {
            EMULATED_NVIDIA_WAVE
        } else {
            CODE_OBJECT_WAVE
        };
        if wave != kernel_wave {
            bail!(
                "GPU {ordinal} ({name}) runs {wave}-lane waves; its kernels are built for \
                 {kernel_wave}-lane waves ({})",
                embedded_archs().join(", ")
            )
        }
        let (arch, modules) = load_modules(ordinal, &name)?;
        Ok(Device {
            ordinal,
            name,
            arch,
            limits: DeviceLimits {
                wave,
                multiprocessors,
                tensor_cores: emulated_nvidia,
            },
            modules,
            functions: Mutex::default(),
            poison_outputs: AtomicBool::new(false),
        })
    }

    /// Makes this device the calling thread's current one (HIP state is per thread).
    fn bind(&self) -> Result<()> {
        check(unsafe { sys::hipSetDevice(self.ordinal) }, || {
            format!("hipSetDevice({})", self.ordinal)
        })
    }

    /// Test mode: every output buffer `alloc_out` makes is first filled with NaN, so a check that
    /// every element is finite proves the kernels wrote all of them.
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison_outputs.store(on, Ordering::SeqCst);
    }

    fn function(&self, spec: &KernelSpec, dtype: DType, streams: usize) -> Result<Function> {
        let symbol = spec.symbol(dtype, streams)?;
        let mut functions = self.functions.lock().expect("HIP function cache poisoned");
        if let Some(func) = functions.get(&symbol) {
            return Ok(*func);
        }
        let module = self
            .modules
            .get(&spec.module)
            .with_context(|| format!("module {} not loaded", spec.module.stem()))?;
        let name = CString::new(symbol.clone()).expect("kernel names have no NUL");
        let mut func: sys::hipFunction_t = std::ptr::null_mut();
        check(
            unsafe { sys::hipModuleGetFunction(&mut func, module.0, name.as_ptr()) },
            || {
                format!(
                    "hipModuleGetFunction({symbol} in {}.{})",
                    spec.module.stem(),
                    self.arch
                )
            },
        )?;
        functions.insert(symbol, Function(func));
        Ok(Function(func))
    }

    /// An uninitialised buffer of `len` elements.
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<Buffer<T>> {
        self.bind()?;
        let bytes = len * std::mem::size_of::<T>();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            check(unsafe { sys::hipMalloc(&mut ptr, bytes) }, || {
                format!("hipMalloc({bytes} bytes)")
            })?;
        }
        Ok(Buffer {
            ptr,
            len,
            _elem: PhantomData,
        })
    }

    /// A buffer the kernel writes in full (NaN-filled first in poison mode).
    pub fn alloc_out<T: DeviceElem>(&self, len: usize) -> Result<Buffer<T>> {
        let mut buf = self.alloc(len)?;
        if self.poison_outputs.load(Ordering::Relaxed) {
            buf.fill(T::NAN)?;
        }
        Ok(buf)
    }

    /// A zero-filled buffer (for accumulated outputs).
    pub fn zeros<T: DeviceElem>(&self, len: usize) -> Result<Buffer<T>> {
        let mut buf = self.alloc(len)?;
        buf.zero()?;
        Ok(buf)
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<Buffer<T>> {
        let mut buf = self.alloc(host.len())?;
        buf.copy_from_host(host)?;
        Ok(buf)
    }

    /// Launches `spec`'s kernel for storage `dtype` and n = `streams` with `args`, which must
    /// match the table's argument list: same count, pointers where it has pointers (of the
    /// storage dtype or f32 as it says, writable where it writes), scalars of its width.
    pub fn launch(
        &self,
        spec: &KernelSpec,
        dtype: DType,
        streams: usize,
        geometry: &Geometry,
        args: &[KernelArg],
    ) -> Result<()> {
        let packed = pack_args(spec, dtype, args)?;
        let func = self.function(spec, dtype, streams)?;
        self.bind()?;
        let mut size = packed.len();
        let mut extra = [
            std::ptr::without_provenance_mut(HIP_LAUNCH_PARAM_BUFFER_POINTER),
            packed.as_ptr() as *mut c_void,
            std::ptr::without_provenance_mut(HIP_LAUNCH_PARAM_BUFFER_SIZE),
            &mut size as *mut usize as *mut c_void,
            std::ptr::without_provenance_mut(HIP_LAUNCH_PARAM_END),
        ];
        // SAFETY: the argument buffer matches the kernel's parameter list (pack_args checked it
        // against the table the .cu sources follow) and outlives the call, which copies it.
        let status = unsafe {
            sys::hipModuleLaunchKernel(
                func.0,
                geometry.grid.0,
                geometry.grid.1,
                1,
                geometry.block,
                1,
                1,
                geometry.shared_bytes as u32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        };
        check(status, || {
            format!(
                "launching {} (grid {:?}, block {})",
                spec.symbol(dtype, streams).unwrap_or_default(),
                geometry.grid,
                geometry.block
            )
        })
    }

    /// Waits for all work queued on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        check(unsafe { sys::hipDeviceSynchronize() }, || {
            "hipDeviceSynchronize".into()
        })
    }

    /// An event on the null stream.
    pub fn event(&self) -> Result<Event> {
        self.bind()?;
        let mut event: sys::hipEvent_t = std::ptr::null_mut();
        check(unsafe { sys::hipEventCreate(&mut event) }, || {
            "hipEventCreate".into()
        })?;
        Ok(Event(event))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for module in self.modules.values() {
            // Nothing useful to do with a failure while dropping.
            let _ = unsafe { sys::hipModuleUnload(module.0) };
        }
    }
}

fn device_name(ordinal: i32) -> Result<String> {
    let mut name = [0 as std::os::raw::c_char; 256];
    check(
        unsafe { sys::hipDeviceGetName(name.as_mut_ptr(), name.len() as i32, ordinal) },
        || format!("hipDeviceGetName(device {ordinal})"),
    )?;
    Ok(unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string())
}

/// The device's gcnArchName ("gfx942:sramecc+:xnack-"), read from hipGetDeviceProperties into
/// a buffer far larger than any version's hipDeviceProp_t, at the offset of hip-sys's layout
/// (ROCm 5.4; the struct grew and moved fields later). None when what sits there is not a gfx
/// name, i.e. the runtime's layout differs.
fn gcn_arch_name(ordinal: i32) -> Option<String> {
    const SPACE: usize = 16 << 10;
    #[repr(C, align(16))]
    struct Space([u8; SPACE]);
    assert!(std::mem::size_of::<sys::hipDeviceProp_t>() <= SPACE);
    let mut space = Box::new(Space([0; SPACE]));
    let props = space.0.as_mut_ptr().cast::<sys::hipDeviceProp_t>();
    // SAFETY: the runtime writes at most its own struct size, well below SPACE.
    let status = unsafe { sys::hipGetDeviceProperties(props, ordinal) };
    if status != sys::hipError_t::hipSuccess {
        return None;
    }
    let offset = std::mem::offset_of!(sys::hipDeviceProp_t, gcnArchName);
    let field = &space.0[offset..offset + 256];
    let end = field.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&field[..end]).ok()?;
    name.starts_with("gfx").then(|| name.to_string())
}

/// Loads every module of the device's architecture. The architecture comes from gcnArchName
/// (its base before ':' must be an embedded one); when the runtime's property layout hides it,
/// each embedded architecture is tried in turn and the one the runtime accepts is kept.
fn load_modules(ordinal: i32, name: &str) -> Result<(String, HashMap<Module, Loaded>)> {
    let archs = embedded_archs();
    let candidates: Vec<&str> = match gcn_arch_name(ordinal) {
        Some(full) => {
            let base = full.split(':').next().unwrap_or(&full).to_string();
            match archs.iter().find(|a| **a == base) {
                Some(arch) => vec![*arch],
                None => bail!(
                    "AMD GPU {ordinal} ({name}) is {full}; this binary has kernels for {} only",
                    archs.join(", ")
                ),
            }
        }
        None => archs.to_vec(),
    };
    let mut refusals = Vec::new();
    for arch in candidates {
        match load_arch(arch) {
            Ok(modules) => return Ok((arch.to_string(), modules)),
            Err(err) => refusals.push(format!("{arch}: {err:#}")),
        }
    }
    bail!(
        "AMD GPU {ordinal} ({name}) accepts none of the embedded code objects ({})",
        refusals.join("; ")
    )
}

fn load_arch(arch: &str) -> Result<HashMap<Module, Loaded>> {
    let mut modules = HashMap::new();
    for module in Module::ALL {
        let image = code_object(arch, module.stem())
            .with_context(|| format!("no embedded {}.{arch} code object", module.stem()))?;
        let mut handle: sys::hipModule_t = std::ptr::null_mut();
        let loaded = check(
            unsafe { sys::hipModuleLoadData(&mut handle, image.as_ptr().cast()) },
            || format!("hipModuleLoadData({}.{arch})", module.stem()),
        );
        if let Err(err) = loaded {
            for done in modules.values() {
                let Loaded(h) = done;
                let _ = unsafe { sys::hipModuleUnload(*h) };
            }
            return Err(err);
        }
        modules.insert(module, Loaded(handle));
    }
    Ok(modules)
}

/// A device allocation of `len` elements of T, freed on drop.
pub struct Buffer<T: DeviceElem> {
    ptr: *mut c_void,
    len: usize,
    _elem: PhantomData<T>,
}
// SAFETY: device memory is not tied to a host thread.
unsafe impl<T: DeviceElem> Send for Buffer<T> {}
unsafe impl<T: DeviceElem> Sync for Buffer<T> {}

impl<T: DeviceElem> Buffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() != self.len {
            bail!(
                "copy to device: {} host elements into a buffer of {}",
                host.len(),
                self.len
            )
        }
        if self.len == 0 {
            return Ok(());
        }
        let status = unsafe {
            sys::hipMemcpy(
                self.ptr,
                host.as_ptr().cast(),
                self.bytes(),
                sys::hipMemcpyKind::hipMemcpyHostToDevice,
            )
        };
        check(status, || {
            format!("hipMemcpy host->device ({} bytes)", self.bytes())
        })
    }

    /// The buffer's contents (waits for the work queued before).
    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut host = vec![T::NAN; self.len];
        if self.len > 0 {
            let status = unsafe {
                sys::hipMemcpy(
                    host.as_mut_ptr().cast(),
                    self.ptr,
                    self.bytes(),
                    sys::hipMemcpyKind::hipMemcpyDeviceToHost,
                )
            };
            check(status, || {
                format!("hipMemcpy device->host ({} bytes)", self.bytes())
            })?;
        }
        Ok(host)
    }

    /// Sets every byte to zero (queued on the null stream).
    pub fn zero(&mut self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let status =
            unsafe { sys::hipMemsetAsync(self.ptr, 0, self.bytes(), std::ptr::null_mut()) };
        check(status, || format!("hipMemsetAsync({} bytes)", self.bytes()))
    }

    /// Sets every element to `value` (queued on the null stream).
    pub fn fill(&mut self, value: T) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let status = match std::mem::size_of::<T>() {
            4 => {
                // SAFETY: T is 4 bytes (f32).
                let bits: u32 = unsafe { std::mem::transmute_copy(&value) };
                unsafe {
                    sys::hipMemsetD32Async(self.ptr, bits as i32, self.len, std::ptr::null_mut())
                }
            }
            2 => {
                // SAFETY: T is 2 bytes (bf16).
                let bits: u16 = unsafe { std::mem::transmute_copy(&value) };
                unsafe { sys::hipMemsetD16Async(self.ptr, bits, self.len, std::ptr::null_mut()) }
            }
            other => bail!("fill: no {other}-byte memset"),
        };
        check(status, || {
            format!(
                "hipMemsetD{}Async({} elements)",
                8 * std::mem::size_of::<T>(),
                self.len
            )
        })
    }

    /// Copies all of `src` (same length) on the device, queued on the null stream.
    pub fn copy_from(&mut self, src: &Buffer<T>) -> Result<()> {
        if src.len != self.len {
            bail!(
                "device copy: {} elements into a buffer of {}",
                src.len,
                self.len
            )
        }
        if self.len == 0 {
            return Ok(());
        }
        let status = unsafe {
            sys::hipMemcpyAsync(
                self.ptr,
                src.ptr,
                self.bytes(),
                sys::hipMemcpyKind::hipMemcpyDeviceToDevice,
                std::ptr::null_mut(),
            )
        };
        check(status, || {
            format!("hipMemcpyAsync device->device ({} bytes)", self.bytes())
        })
    }

    /// As a kernel argument the kernel only reads.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Pointer {
            ptr: self.ptr,
            dtype: T::DTYPE,
            writable: false,
        }
    }

    /// As a kernel argument the kernel writes or adds to.
    pub fn arg_mut(&mut self) -> KernelArg {
        KernelArg::Pointer {
            ptr: self.ptr,
            dtype: T::DTYPE,
            writable: true,
        }
    }
}

impl<T: DeviceElem> Drop for Buffer<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // A failed free leaves nothing to recover.
            let _ = unsafe { sys::hipFree(self.ptr) };
        }
    }
}

/// One kernel argument as passed to `Device::launch`.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg {
    Pointer {
        ptr: *mut c_void,
        dtype: DType,
        writable: bool,
    },
    I64(i64),
    I32(i32),
}

/// The kernel argument buffer of `args` (C layout: each argument at its natural alignment),
/// after checking them against the table's argument list of `spec` for storage `dtype`.
pub fn pack_args(spec: &KernelSpec, dtype: DType, args: &[KernelArg]) -> Result<Vec<u8>> {
    if args.len() != spec.args.len() {
        bail!(
            "{}: {} arguments given, the kernel table lists {}",
            spec.stem,
            args.len(),
            spec.args.len()
        )
    }
    let mut packed: Vec<u8> = Vec::with_capacity(8 * args.len());
    let mut put = |bytes: &[u8]| {
        while !packed.len().is_multiple_of(bytes.len()) {
            packed.push(0);
        }
        packed.extend_from_slice(bytes);
    };
    for (want, got) in spec.args.iter().zip(args) {
        let elem_dtype = |elem: &Elem| match elem {
            Elem::Storage => dtype,
            Elem::F32 => DType::F32,
        };
        match (want, got) {
            (Arg::In(_, elem), KernelArg::Pointer { ptr, dtype: d, .. })
                if *d == elem_dtype(elem) =>
            {
                put(&(*ptr as usize as u64).to_ne_bytes())
            }
            (
                Arg::Out(_, elem) | Arg::Accumulate(_, elem),
                KernelArg::Pointer {
                    ptr,
                    dtype: d,
                    writable: true,
                },
            ) if *d == elem_dtype(elem) => put(&(*ptr as usize as u64).to_ne_bytes()),
            (Arg::I64(_), KernelArg::I64(v)) => put(&v.to_ne_bytes()),
            (Arg::I32(_), KernelArg::I32(v)) => put(&v.to_ne_bytes()),
            _ => bail!(
                "{}: argument {want:?} (storage {dtype:?}) given {got:?}",
                spec.stem
            ),
        }
    }
    Ok(packed)
}

/// A HIP event for timing work on the null stream.
pub struct Event(sys::hipEvent_t);

impl Event {
    pub fn record(&self) -> Result<()> {
        check(
            unsafe { sys::hipEventRecord(self.0, std::ptr::null_mut()) },
            || "hipEventRecord".into(),
        )
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        check(unsafe { sys::hipEventSynchronize(end.0) }, || {
            "hipEventSynchronize".into()
        })?;
        let mut ms = 0f32;
        check(
            unsafe { sys::hipEventElapsedTime(&mut ms, self.0, end.0) },
            || "hipEventElapsedTime".into(),
        )?;
        Ok(ms as f64)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = unsafe { sys::hipEventDestroy(self.0) };
    }
}
