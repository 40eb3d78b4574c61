//! Which CUDA kernels the model may use, one value for the whole process, and the record of
//! which path each kernel-dispatching call took.
//!
//! Two owners dispatch to kernels: the Mamba-2 mixer ([`crate::model::mamba2::fused`], which
//! re-exports this module's API for its callers) and the attention of the generation engine
//! ([`crate::model::phi`], [`crate::kernels::attention`]). One policy switches both, so a
//! benchmark or a parity check turns a part off for the whole process in one place.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which CUDA kernels the model's ops may use: one value for the whole process, set by
/// [`set_policy`] (the library reads no environment variable; binaries that offer a switch read
/// theirs once, e.g. with [`KernelPolicy::from_env`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The CUDA kernels at all (off: the generic candle path everywhere, also on CUDA).
    pub kernels: bool,
    /// The tensor-core scan passes where they apply (off: the SIMT passes for inference and the
    /// generic path under autograd, which has no SIMT backward).
    pub tensor_cores: bool,
    /// Load the sm_80 PTX on every card, Hopper included (off: sm_90's on compute capability
    /// 9.x): how the Ampere/Ada build is run and checked on an H100.
    pub sm80_everywhere: bool,
    /// The generation engine's attention kernels (src/kernels/attention.rs), when `kernels` is
    /// on too (off: attention through tensor ops, so the two can be timed in one run).
    pub attention: bool,
}

impl KernelPolicy {
    /// Every kernel where it applies: the default.
    pub const ALL: Self = Self {
        kernels: true,
        tensor_cores: true,
        sm80_everywhere: false,
        attention: true,
    };
    /// The generic candle path only.
    pub const GENERIC: Self = Self {
        kernels: false,
        tensor_cores: false,
        sm80_everywhere: false,
        attention: false,
    };

    /// The policy the variables `MATVLM_MAMBA2_KERNELS`, `MATVLM_MAMBA2_TC` and
    /// `MATVLM_ATTENTION_KERNELS` ask for (each `0` switches its part off; unset or anything else
    /// leaves it on), and `MATVLM_PTX_ARCH=80` for the sm_80 PTX everywhere. For a binary's
    /// `main`, read once.
    pub fn from_env() -> Self {
        let on = |var: &str| std::env::var(var).map_or(true, |v| v != "0");
        Self {
            kernels: on("MATVLM_MAMBA2_KERNELS"),
            tensor_cores: on("MATVLM_MAMBA2_TC"),
            sm80_everywhere: std::env::var("MATVLM_PTX_ARCH").is_ok_and(|v| v == "80"),
            attention: on("MATVLM_ATTENTION_KERNELS"),
        }
    }

    fn bits(self) -> u8 {
        u8::from(self.kernels)
            | (u8::from(self.tensor_cores) << 1)
            | (u8::from(self.sm80_everywhere) << 2)
            | (u8::from(self.attention) << 3)
    }

    fn from_bits(b: u8) -> Self {
        Self {
            kernels: b & 1 != 0,
            tensor_cores: b & 2 != 0,
            sm80_everywhere: b & 4 != 0,
            attention: b & 8 != 0,
        }
    }
}

impl Default for KernelPolicy {
    fn default() -> Self {
        Self::ALL
    }
}

static POLICY: AtomicU8 = AtomicU8::new(11);

/// Set the process's kernel policy (benchmarks and parity checks switch it between runs).
pub fn set_policy(p: KernelPolicy) {
    POLICY.store(p.bits(), Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    crate::kernels::force_sm80(p.sm80_everywhere);
}

/// The process's kernel policy ([`KernelPolicy::ALL`] unless [`set_policy`] changed it).
pub fn policy() -> KernelPolicy {
    KernelPolicy::from_bits(POLICY.load(Ordering::Relaxed))
}

/// Whether the kernels are built in and allowed by the policy (they still need CUDA tensors).
pub fn kernels_enabled() -> bool {
    cfg!(feature = "cuda") && policy().kernels
}

/// Whether the engine's attention kernels are built in and allowed by the policy.
pub fn attention_kernels_enabled() -> bool {
    kernels_enabled() && policy().attention
}

thread_local! {
    static TRACE: RefCell<Option<Vec<&'static str>>> = const { RefCell::new(None) };
}

/// Run `f` and list the paths its kernel-dispatching calls took, in first-seen order, each once:
/// `op:path` with op `conv`, `conv-step`, `scan`, `scan-step`, `dt-step`, `norm` (the Mamba-2
/// mixer, [`crate::model::mamba2::fused`]) or `attention` and path `kernel`,
/// `simt`, `tc` (tensor-core forward), `tc-train` (tensor-core forward and backward kernels)
/// or `generic`. Calls nested in `f` on this thread only.
pub fn traced<R>(f: impl FnOnce() -> R) -> (R, Vec<&'static str>) {
    let outer = TRACE.with(|t| t.borrow_mut().replace(Vec::new()));
    let r = f();
    let seen = TRACE.with(|t| std::mem::replace(&mut *t.borrow_mut(), outer));
    (r, seen.unwrap_or_default())
}

/// Record the path a call took (for [`traced`]; nothing when no trace is open).
pub(crate) fn took(path: &'static str) {
    TRACE.with(|t| {
        if let Some(v) = t.borrow_mut().as_mut() {
            if !v.contains(&path) {
                v.push(path);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_is_set_and_read_back() {
        for p in [
            KernelPolicy::ALL,
            KernelPolicy::GENERIC,
            KernelPolicy {
                kernels: true,
                tensor_cores: false,
                sm80_everywhere: true,
                attention: false,
            },
        ] {
            assert_eq!(KernelPolicy::from_bits(p.bits()), p);
        }
        assert_eq!(policy(), KernelPolicy::default());
    }
}
