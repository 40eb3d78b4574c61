//! Opening a CUDA device the way long GPU runs want it.
//!
//! candle allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
//! threshold is 0: every synchronisation hands freed memory back to the driver, and the next
//! step maps it again. A training or benchmark loop that synchronises each step then pays for
//! mapping every large temporary anew (measured on an H200: the scan's forward + backward at
//! batch 8 x 8192 tokens took several times its kernels' time). [`cuda`] raises the threshold so
//! the pool keeps what it has, as PyTorch's caching allocator does.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// CUDA device `ordinal` with a memory pool that keeps freed memory for reuse.
pub fn cuda(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let cu_device = d.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: plain driver calls on a device candle has just initialised; the value pointer
        // is a u64, the attribute's documented type.
        let ok = unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) == sys::CUresult::CUDA_SUCCESS
                && sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                ) == sys::CUresult::CUDA_SUCCESS
        };
        if !ok {
            eprintln!("warning: cuda:{ordinal}: could not make the memory pool keep freed memory");
        }
    }
    Ok(dev)
}

/// `cpu`, `cuda` or `cuda:N`. CUDA needs a build with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown device `{s}` (cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(format!(
            "device `{s}`: this build has no CUDA support; rebuild with `--features cuda`"
        )));
    }
    crate::device::cuda(ordinal)
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::Invalid(format!(
            "unknown dtype `{other}` (f32, bf16 or f16)"
        ))),
    }
}

/// How scripts spell a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// Memory in use on a device, from the CUDA memory pool every candle tensor is allocated from
/// (`cuMemAllocAsync`): what tensors hold, not what the driver has reserved, so it compares with
/// PyTorch's `max_memory_allocated`. cuBLAS workspaces and the CUDA context are outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUse {
    /// Bytes held now.
    pub current: u64,
    /// The most held at once since the last [`reset_peak_memory`].
    pub peak: u64,
}

/// The pool's current and peak use; `None` on the CPU (or a build without CUDA).
pub fn memory_use(device: &Device) -> Result<Option<MemoryUse>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        device.synchronize()?;
        let pool = default_pool(d)?;
        let read = |attr: sys::CUmemPool_attribute| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: the documented value type of the USED_MEM attributes is a u64.
            let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(Error::Other(format!(
                    "cuMemPoolGetAttribute({attr:?}): {r:?}"
                )));
            }
            Ok(v)
        };
        return Ok(Some(MemoryUse {
            current: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            peak: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        }));
    }
    let _ = device;
    Ok(None)
}

/// Start a new peak: the high-water mark drops to what is held now. No-op on the CPU.
pub fn reset_peak_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        device.synchronize()?;
        let pool = default_pool(d)?;
        let mut zero = 0u64;
        // SAFETY: resetting USED_MEM_HIGH takes a u64 that must be zero.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Other(format!("resetting the pool's peak: {r:?}")));
        }
    }
    let _ = device;
    Ok(())
}

#[cfg(feature = "cuda")]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain query on a device candle has initialised.
    let r =
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, d.cuda_stream().context().cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Other(format!("cuDeviceGetDefaultMemPool: {r:?}")));
    }
    Ok(pool)
}
