//! NCCL as a [`Collective`]: one communicator per GPU of this process (rank `r` on `cuda:r`),
//! created together with `ncclCommInitAll`, each then driven by its rank's thread. Sums run
//! on the stream candle computes on, so they are ordered after the backward that produced the
//! gradients without an explicit synchronisation.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::collective::{Collective, GroupMember};
use crate::{Error, Result};

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: Comm,
    rank: usize,
    world: usize,
    /// Set when a rank of the group failed: later collectives fail at once instead of waiting
    /// for it.
    failed: Arc<Mutex<Option<String>>>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; each `NcclComm` belongs to one rank, and only that rank's thread calls it
// (`run_ranks` hands it out by reference to exactly one thread).
unsafe impl Send for NcclComm {}
// SAFETY: as above: shared references exist, but only one thread uses them.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Communicators for `devices` (CUDA devices, rank `r` at index `r`), created at once.
    pub fn group(devices: &[Device]) -> Result<Vec<NcclComm>> {
        let streams = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(c) => Ok(c.cuda_stream()),
                other => Err(Error::Invalid(format!(
                    "NCCL ranks need CUDA devices, got {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let world = streams.len();
        let comms = Comm::from_devices(streams)
            .map_err(|e| Error::Other(format!("creating {world} NCCL communicators: {e:?}")))?;
        let failed = Arc::new(Mutex::new(None));
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| NcclComm {
                comm,
                rank,
                world,
                failed: failed.clone(),
            })
            .collect())
    }
}

/// The sum over ranks as a candle operation on the tensor's own storage.
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl AllReduce<'_> {
    fn sum<T>(&self, s: &CudaStorage, layout: &Layout) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let n = layout.shape().elem_count();
        let (start, end) = match layout.contiguous_offsets() {
            Some(o) => o,
            None => candle_core::bail!("all-reduce needs a contiguous tensor"),
        };
        debug_assert_eq!(end - start, n);
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: every element is written by the all-reduce below before anyone reads it.
        let mut dst = unsafe { s.device.alloc::<T>(n)? };
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce of a CPU tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.sum::<f32>(s, l)?,
            DType::F64 => self.sum::<f64>(s, l)?,
            other => candle_core::bail!("NCCL all-reduce of {other:?} (f32 or f64 only)"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if let Some(why) = self.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(Error::Other(format!("collective aborted: {why}")));
        }
        let op = AllReduce { comm: &self.comm };
        Ok(t.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

impl GroupMember for NcclComm {
    fn as_collective(&self) -> &dyn Collective {
        self
    }

    /// Later collectives of every rank fail at once. A peer already blocked inside an NCCL
    /// collective cannot be released short of destroying its communicator, which its own
    /// thread holds; the failure is printed so that a hung run says why.
    fn abort(&self, why: &str) {
        let why = format!("rank {} failed: {why}", self.rank);
        eprintln!("{why}");
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(why);
        }
    }
}
