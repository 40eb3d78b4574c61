//! Opening a CUDA device the way long GPU runs want it.
//!
//! candle allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
//! threshold is 0: every synchronisation hands freed memory back to the driver, and the next
//! step maps it again. A training or benchmark loop that synchronises each step then pays for
//! mapping every large temporary anew (measured on an H200: the scan's forward + backward at
//! batch 8 x 8192 tokens took several times its kernels' time). [`cuda`] raises the threshold so
//! the pool keeps what it has, as PyTorch's caching allocator does.

use candle_core::Device;

use crate::Result;

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
