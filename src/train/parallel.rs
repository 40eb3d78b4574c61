//! Data parallelism over the devices of one host: one rank per device, each a thread of this
//! process with its own copy of the models, its share of every batch and the same optimiser
//! state; the gradients are summed over the ranks after each step's backward
//! ([`super::collective::all_reduce_grads`]) so that every rank applies the same update.
//!
//! Batches: `batch_size` is the *global* micro-batch (all ranks together); rank `r` of `W`
//! takes rows `r * batch_size / W ..` of each one, so the data order, the loader state saved in
//! checkpoints and the global batch (`batch_size * accum`) do not depend on `W`, and a run
//! resumes with any number of ranks that divides `batch_size`. The learning rate and the other
//! optimiser settings are those of the global batch whatever `W` is (nothing is scaled with
//! the world size).
//!
//! Equivalence: every loss the modes use is normalised over its own micro-batch. With one
//! micro-batch per rank (`accum` 1), `W` ranks compute exactly what one rank accumulating `W`
//! micro-batches of `batch_size / W` computes, in the same order (the in-process sum adds the
//! ranks in rank order, as accumulation adds micro-batches), so on the CPU the weights are
//! bit-identical to that run. Against one rank with one micro-batch of `batch_size` they agree
//! up to f32 summation order for terms that are means over samples (the KL family); the
//! unsquared layer-wise L2 norm is taken per micro-batch, on each rank, as under DeepSpeed.
//!
//! Backends: [`Backend::Local`] runs every rank on the model's device and sums in shared memory
//! (tests, CPU); [`Backend::Nccl`] puts rank `r` on `cuda:r` and sums with NCCL (feature
//! `nccl`). `matrepl --gpus N` selects the latter for every training call of a script.

use std::ops::Range;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::collective::{Collective, GroupMember, LocalGroup};
use crate::model::vlm::Vlm;
use crate::{Error, Result};

/// How the tensors of a step are summed over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Threads on the model's device, summing in shared memory.
    #[default]
    Local,
    /// Rank `r` on `cuda:r`, summing with NCCL.
    Nccl,
}

/// The data-parallel layout of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Parallel {
    /// Number of ranks (1: no data parallelism).
    pub ranks: usize,
    pub backend: Backend,
    /// Gradient all-reduce bucket size in MiB (PyTorch DDP's default is 25).
    pub bucket_mb: f64,
}

impl Default for Parallel {
    fn default() -> Self {
        Self {
            ranks: 1,
            backend: Backend::Local,
            bucket_mb: 25.0,
        }
    }
}

/// What one rank is given.
pub struct RankCtx<'a> {
    pub rank: usize,
    pub world: usize,
    pub device: Device,
    pub comm: &'a dyn Collective,
    pub bucket_bytes: usize,
}

impl Parallel {
    /// `ranks` GPUs with NCCL (`matrepl --gpus N`).
    pub fn gpus(ranks: usize) -> Self {
        Self {
            ranks,
            backend: Backend::Nccl,
            ..Self::default()
        }
    }

    /// The layout and the device models load on for `matrepl --gpus N --device D`: no `--gpus`
    /// keeps `D` and one rank; `--gpus N` runs N NCCL ranks on cuda:0..N-1 with models loaded
    /// on cuda:0, so `D` must be left at `cpu` (the default) or be `cuda` / `cuda:0`.
    pub fn launch(gpus: Option<usize>, device: &str) -> Result<(Parallel, String)> {
        let Some(n) = gpus else {
            return Ok((Parallel::default(), device.to_string()));
        };
        if n == 0 {
            return Err(Error::Invalid("--gpus needs at least 1".into()));
        }
        if !matches!(device, "cpu" | "cuda" | "cuda:0") {
            return Err(Error::Invalid(format!(
                "--gpus {n} puts rank r on cuda:r and loads models on cuda:0; drop --device {device}"
            )));
        }
        let par = Parallel::gpus(n);
        par.check(n)?;
        Ok((par, "cuda:0".to_string()))
    }

    /// Whether this layout uses more than the caller's own thread and device.
    pub fn is_parallel(&self) -> bool {
        self.ranks > 1 || self.backend == Backend::Nccl
    }

    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0).max(4.0) as usize
    }

    /// Refuse layouts that cannot run: no rank, a global micro-batch the ranks cannot share
    /// evenly, NCCL in a build without it.
    pub fn check(&self, batch_size: usize) -> Result<()> {
        if self.ranks == 0 {
            return Err(Error::Invalid("parallel: ranks must be at least 1".into()));
        }
        if !batch_size.is_multiple_of(self.ranks) {
            return Err(Error::Invalid(format!(
                "parallel: batch_size {batch_size} (the global micro-batch) does not split into \
                 {} equal shares; use a multiple of the rank count",
                self.ranks
            )));
        }
        if self.bucket_mb.is_nan() || self.bucket_mb <= 0.0 {
            return Err(Error::Invalid(format!(
                "parallel: bucket_mb must be > 0, got {}",
                self.bucket_mb
            )));
        }
        if self.backend == Backend::Nccl && !cfg!(feature = "nccl") {
            return Err(Error::Invalid(
                "parallel: the NCCL backend (matrepl --gpus N) needs a build with `--features nccl`"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The device of every rank: the model's own for [`Backend::Local`], `cuda:r` for NCCL,
    /// where the rank on the model's own GPU keeps `base` itself (a second handle on the same
    /// GPU would make the models' tensors look foreign there and be copied).
    pub fn devices(&self, base: &Device) -> Result<Vec<Device>> {
        match self.backend {
            Backend::Local => Ok(vec![base.clone(); self.ranks]),
            Backend::Nccl => (0..self.ranks)
                .map(|r| match base.location() {
                    candle_core::DeviceLocation::Cuda { gpu_id } if gpu_id == r => Ok(base.clone()),
                    _ => crate::device::cuda(r),
                })
                .collect(),
        }
    }
}

/// Rows `rank * n / world .. (rank + 1) * n / world` of a batch of `n` rows: the share of
/// `rank` (the shares are equal when `world` divides `n`, and always cover the batch in order).
pub fn shard_rows(n: usize, rank: usize, world: usize) -> Range<usize> {
    (rank * n / world)..((rank + 1) * n / world)
}

/// `vlm` with every tensor on `device` (the same model when it is there already).
pub fn on_device(vlm: &Vlm, device: &Device) -> Result<Vlm> {
    if vlm.device.same_device(device) {
        return Ok(vlm.clone());
    }
    let tensors = vlm
        .named_tensors()
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(device)?)))
        .collect::<Result<_>>()?;
    let mut moved = vlm.clone();
    moved.device = device.clone();
    moved.rebuilt(tensors)
}

/// Run `work` once per rank of `par`, each on its own thread with its device and its handle on
/// the group; returns every rank's result in rank order. A rank that fails aborts the group,
/// so the others stop at their next collective instead of waiting; the first failure (by
/// rank) is returned.
pub fn run_ranks<T: Send>(
    par: &Parallel,
    base: &Device,
    work: impl Fn(RankCtx<'_>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let devices = par.devices(base)?;
    let comms: Vec<Box<dyn GroupMember>> = match par.backend {
        Backend::Local => LocalGroup::new(par.ranks)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn GroupMember>)
            .collect(),
        #[cfg(feature = "nccl")]
        Backend::Nccl => super::nccl::NcclComm::group(&devices)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn GroupMember>)
            .collect(),
        #[cfg(not(feature = "nccl"))]
        Backend::Nccl => {
            return Err(Error::Invalid(
                "parallel: the NCCL backend needs a build with `--features nccl`".into(),
            ))
        }
    };
    let bucket_bytes = par.bucket_bytes();
    let work = &work;
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (comm, device))| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        let ctx = RankCtx {
                            rank,
                            world: par.ranks,
                            device,
                            comm: comm.as_collective(),
                            bucket_bytes,
                        };
                        let out = work(ctx);
                        if let Err(e) = &out {
                            comm.abort(&e.to_string());
                        }
                        out
                    })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    let why = format!("rank {rank} panicked");
                    comms[rank].abort(&why);
                    Err(Error::Other(why))
                }),
                Err(e) => Err(Error::Other(format!("starting rank {rank}: {e}"))),
            })
            .collect()
    });
    // A rank that failed on its own comes before those it made fail.
    let (mut own, mut induced, mut oks) = (None, None, Vec::new());
    for r in results {
        match r {
            Ok(v) => oks.push(v),
            Err(e) if e.to_string().contains("collective aborted") => {
                induced.get_or_insert(e);
            }
            Err(e) => {
                own.get_or_insert(e);
            }
        }
    }
    match own.or(induced) {
        Some(e) => Err(e),
        None => Ok(oks),
    }
}
