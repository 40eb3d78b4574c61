//! The collective operation data parallelism needs (a sum over ranks), behind one interface, and
//! the gradient all-reduce in buckets built on it.
//!
//! - [`Collective`]: rank, world size, `all_reduce_sum`.
//! - [`LocalGroup`]: the in-process implementation, one thread per rank, exchanging tensors
//!   through shared memory. Tests and CPU runs use it; it sums in rank order, so a run over `W`
//!   ranks adds the ranks' gradients in exactly the order a single rank accumulating `W`
//!   micro-batches adds them.
//! - `NcclComm` (feature `nccl`, in `train::nccl`): NCCL on one GPU per rank.
//! - [`all_reduce_grads`]: the trainable set's gradients, flattened into buckets of a bounded
//!   size (one collective per bucket instead of one per tensor; a bucket's f32 staging copy is
//!   the only extra memory).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use super::params::{Grads, ParamSet};
use crate::{Error, Result};

/// A group of ranks that can sum tensors together. Every rank calls each operation in the same
/// order with tensors of the same shape and dtype (f32 or f64); each call returns the sum over
/// all ranks, the same on every rank.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum over ranks of `t`.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// The state of the exchange in progress.
struct Round {
    /// Each rank's contribution, until the last one arrives.
    parts: Vec<Option<Tensor>>,
    arrived: usize,
    /// The sum, while the ranks read it out.
    result: Option<Tensor>,
    taken: usize,
    /// Set when a rank gave up (its step failed): the others stop waiting and fail too.
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One rank of an in-process group ([`LocalGroup::new`] makes all of them).
#[derive(Clone)]
pub struct LocalGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl LocalGroup {
    /// The `world` ranks of a new group, rank `r` at index `r`; hand one to each thread.
    pub fn new(world: usize) -> Result<Vec<LocalGroup>> {
        if world == 0 {
            return Err(Error::Invalid("a group needs at least one rank".into()));
        }
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round {
                parts: vec![None; world],
                arrived: 0,
                result: None,
                taken: 0,
                aborted: None,
            }),
            changed: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                shared: shared.clone(),
                rank,
            })
            .collect())
    }

    /// Make every pending and later operation of the group fail with `why`: a rank whose work
    /// failed calls this, so that the others do not wait for it forever.
    pub fn abort(&self, why: &str) {
        let mut round = self.lock();
        round
            .aborted
            .get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left the round in an unknown state; the
        // abort message below is what the others report.
        self.shared
            .round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'g>(&self, guard: MutexGuard<'g, Round>) -> Result<MutexGuard<'g, Round>> {
        let guard = self
            .shared
            .changed
            .wait(guard)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &guard.aborted {
            Some(why) => Err(Error::Other(format!("collective aborted: {why}"))),
            None => Ok(guard),
        }
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let world = self.shared.world;
        let mut round = self.lock();
        if let Some(why) = &round.aborted {
            return Err(Error::Other(format!("collective aborted: {why}")));
        }
        // The previous round is still being read out.
        while round.result.is_some() {
            round = self.wait(round)?;
        }
        round.parts[self.rank] = Some(t.clone());
        round.arrived += 1;
        if round.arrived == world {
            let mut parts = round.parts.iter_mut().map(Option::take);
            let mut sum = parts
                .next()
                .flatten()
                .ok_or_else(|| Error::Other("collective: rank 0's part is missing".into()))?;
            for (r, part) in parts.enumerate() {
                let part = part.ok_or_else(|| {
                    Error::Other(format!("collective: rank {}'s part is missing", r + 1))
                })?;
                if part.dims() != sum.dims() || part.dtype() != sum.dtype() {
                    let why = format!(
                        "rank {} sent {:?} {:?}, rank 0 {:?} {:?}",
                        r + 1,
                        part.dims(),
                        part.dtype(),
                        sum.dims(),
                        sum.dtype()
                    );
                    round.aborted = Some(why.clone());
                    self.shared.changed.notify_all();
                    return Err(Error::Other(format!("collective: {why}")));
                }
                sum = (sum + part)?;
            }
            round.arrived = 0;
            round.result = Some(sum);
            round.taken = 0;
            self.shared.changed.notify_all();
        } else {
            while round.result.is_none() {
                round = self.wait(round)?;
            }
        }
        let out = round
            .result
            .clone()
            .ok_or_else(|| Error::Other("collective: the sum vanished".into()))?;
        round.taken += 1;
        if round.taken == world {
            round.result = None;
            self.shared.changed.notify_all();
        }
        Ok(out)
    }
}

/// Sum `grads` over the ranks of `comm` in place, in buckets of at most `bucket_bytes` (f32)
/// following the parameter order; the result is the plain sum (the caller divides). `present`
/// says, per parameter, whether any rank has a gradient for it (summed with the step's
/// scalars beforehand): a parameter no rank has a gradient for stays `None`, one that only some
/// ranks have counts as zeros on the others. Buckets are f32: half-precision gradients are
/// widened for the sum and narrowed back.
pub fn all_reduce_grads(
    comm: &dyn Collective,
    params: &ParamSet,
    grads: &mut Grads,
    present: &[bool],
    bucket_bytes: usize,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    if present.len() != params.len() || grads.len() != params.len() {
        return Err(Error::Invalid(format!(
            "all-reduce of {} gradients with {} presence flags for {} parameters",
            grads.len(),
            present.len(),
            params.len()
        )));
    }
    let bucket_elems = (bucket_bytes / 4).max(1);
    let mut reduced: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut bucket: Vec<(usize, Tensor)> = Vec::new();
    let mut filled = 0usize;
    let flush =
        |bucket: &mut Vec<(usize, Tensor)>, reduced: &mut Vec<Option<Tensor>>| -> Result<()> {
            if bucket.is_empty() {
                return Ok(());
            }
            let flat: Vec<Tensor> = bucket
                .iter()
                .map(|(_, g)| g.to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let sum = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let mut offset = 0;
            for (i, g) in bucket.drain(..) {
                let n = g.elem_count();
                let part = sum.narrow(0, offset, n)?.reshape(g.shape())?;
                reduced[i] = Some(part.to_dtype(g.dtype())?);
                offset += n;
            }
            Ok(())
        };
    for (i, (_, var)) in params.iter().enumerate() {
        if !present[i] {
            continue;
        }
        let g = match grads.get(i) {
            Some(g) => g.clone(),
            None => Tensor::zeros(var.shape(), var.dtype(), var.device())?,
        };
        if filled > 0 && filled + g.elem_count() > bucket_elems {
            flush(&mut bucket, &mut reduced)?;
            filled = 0;
        }
        filled += g.elem_count();
        bucket.push((i, g));
    }
    flush(&mut bucket, &mut reduced)?;
    *grads = Grads::from_vec(params, reduced)?;
    Ok(())
}

/// A group member as the rank runner (`parallel::run_ranks`) holds it: the collective and a way to give up.
pub trait GroupMember: Send + Sync {
    fn as_collective(&self) -> &dyn Collective;
    /// Make the other ranks' pending and later collectives fail (this rank failed).
    fn abort(&self, why: &str);
}

impl GroupMember for LocalGroup {
    fn as_collective(&self) -> &dyn Collective {
        self
    }

    fn abort(&self, why: &str) {
        LocalGroup::abort(self, why);
    }
}
