//! The plumbing every CUDA kernel of the crate shares (only with the `cuda` feature): which PTX
//! a device loads, how a kernel is found, how an op reads its side inputs and wraps its outputs.
//!
//! The kernels themselves live beside the model code that owns them: the Mamba-2 mixer's in
//! [`crate::model::mamba2::kernels`] (`kernels/{conv,ssd,ssd_tc,ssd_bwd,norm}.cu`), the attention
//! step of the generation engine in [`attention`] (`kernels/attention.cu`).
//!
//! The PTX is compiled by build.rs (nvcc at build time; that file says why) for sm_80 and sm_90
//! and loaded once per device by candle's module cache.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Storage, StorageRef, Tensor};

pub mod attention;

/// `$body` with `$t` the Rust type of `$dtype` (f32, f16 or bf16: what every kernel entry is
/// stamped for); another dtype is an error naming the op `$op`.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}

pub(crate) use by_dtype;

/// The PTX of one `kernels/*.cu` file for each target build.rs compiles (sm_80, sm_90), under
/// the module names candle caches them by.
pub struct Module {
    pub names: [&'static str; 2],
    pub ptx: [&'static str; 2],
}

macro_rules! module {
    ($file:literal) => {
        Module {
            names: [
                concat!("matvlm_", $file, "_sm80"),
                concat!("matvlm_", $file, "_sm90"),
            ],
            ptx: [
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".sm80.ptx")),
                include_str!(concat!(env!("OUT_DIR"), "/", $file, ".sm90.ptx")),
            ],
        }
    };
}

pub(crate) use module;

impl Module {
    /// The module name and PTX for `dev`'s target.
    pub fn pick(&self, dev: &CudaDevice) -> candle_core::Result<(&'static str, &'static str)> {
        let i = usize::from(target(dev)?.arch == 90);
        Ok((self.names[i], self.ptx[i]))
    }
}

/// Kernel `$name` of module `$module` (a [`Module`]) in the PTX for `$dev`'s target.
macro_rules! load {
    ($module:expr, $dev:expr, $name:expr $(,)?) => {{
        let (module, ptx) = $module.pick(&$dev)?;
        $dev.get_or_load_custom_func($name, module, ptx)
    }};
}
pub(crate) use load;

static FORCE_SM80: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Load the sm_80 PTX on every card, Hopper included; set by the kernel policy
/// (`KernelPolicy::sm80_everywhere` through `kernel_policy::set_policy`).
pub fn force_sm80(on: bool) {
    FORCE_SM80.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// What a device runs the kernels as: its compute capability, the PTX target taken for it
/// (90 on Hopper, 80 on every 8.x card, or 80 everywhere when the policy says so) and the
/// dynamic shared memory a block may opt into there (227 KiB on H100, 163 KiB on A100, 99 KiB
/// on L40 or RTX 4090).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub device: String,
    pub compute_capability: (i32, i32),
    pub arch: u32,
    pub smem_opt_in: usize,
    /// Streaming multiprocessors (how many blocks a launch needs to fill the card).
    pub sms: usize,
}

/// The [`Target`] of `dev`, read from the driver once per device; an error naming the device
/// where no kernel applies (compute capability below 8.0: no `mma.sync` for bf16, no
/// `cp.async`).
pub fn target(dev: &CudaDevice) -> candle_core::Result<Target> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    static TARGETS: Mutex<Vec<(usize, Target)>> = Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let ordinal = ctx.ordinal();
    let force_sm80 = FORCE_SM80.load(std::sync::atomic::Ordering::Relaxed);
    let mut known = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
    let t = match known.iter().find(|(o, _)| *o == ordinal) {
        Some((_, t)) => t.clone(),
        None => {
            let (major, minor) = ctx.compute_capability().w()?;
            let t = Target {
                device: ctx.name().w()?,
                compute_capability: (major, minor),
                arch: if major >= 9 { 90 } else { 80 },
                smem_opt_in: ctx
                    .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                    .w()? as usize,
                sms: ctx
                    .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .w()? as usize,
            };
            known.push((ordinal, t.clone()));
            t
        }
    };
    if t.compute_capability.0 < 8 {
        bail!(
            "CUDA kernels: {} (cuda:{ordinal}) has compute capability {}.{}; the kernels need \
             8.0 or newer (turn them off with the kernel policy to use the generic path)",
            t.device,
            t.compute_capability.0,
            t.compute_capability.1
        );
    }
    Ok(Target {
        arch: if force_sm80 { 80 } else { t.arch },
        ..t
    })
}

/// Dynamic shared memory a block may use without an opt-in attribute.
pub const SMEM_LIMIT: usize = 48 * 1024;
/// An error unless `t` (the side input `name` of `op`) holds `want` elements, which the kernel
/// will read: a wrong shape must fail here, not read out of bounds.
pub(crate) fn check_elems(
    t: &Tensor,
    want: usize,
    op: &str,
    name: &str,
) -> candle_core::Result<()> {
    if t.elem_count() != want {
        bail!(
            "{op}: {name} has shape {:?} ({} elements), the kernel reads {want}",
            t.dims(),
            t.elem_count()
        );
    }
    Ok(())
}

/// Let `func` use `bytes` of dynamic shared memory (beyond the default 48 KiB), up to what
/// `dev` allows a block.
pub(crate) fn allow_smem(
    dev: &CudaDevice,
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: usize,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    if bytes > SMEM_LIMIT {
        let t = target(dev)?;
        if bytes > t.smem_opt_in {
            bail!(
                "kernels: {bytes} bytes of shared memory exceed the {} a block may use on {}",
                t.smem_opt_in,
                t.device
            );
        }
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
    }
    Ok(())
}

pub(crate) fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("kernels: unsupported dtype {other:?} (f32, f16, bf16 only)"),
    })
}

pub(crate) fn i32_of(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("kernels: {what} = {v} exceeds i32")))
}

pub(crate) fn grid(n: usize, per: usize) -> candle_core::Result<u32> {
    u32::try_from(n.div_ceil(per))
        .map_err(|_| candle_core::Error::Msg(format!("kernels: grid of {n} too large")))
}

/// A side input of an op: its storage, read-locked for the duration of the launch.
pub(crate) struct Side<'a> {
    pub(crate) guard: StorageRef<'a>,
    pub(crate) layout: &'a Layout,
    pub(crate) name: &'static str,
}

impl<'a> Side<'a> {
    pub(crate) fn new(t: &'a Tensor, name: &'static str) -> Self {
        let (guard, layout) = t.storage_and_layout();
        Self {
            guard,
            layout,
            name,
        }
    }

    /// The tensor's elements as a contiguous device view of `T`.
    pub(crate) fn view<T: CudaDType>(&self) -> candle_core::Result<CudaView<'_, T>> {
        let Storage::Cuda(s) = &*self.guard else {
            bail!("kernels: {} is not on a CUDA device", self.name)
        };
        let Some((o1, o2)) = self.layout.contiguous_offsets() else {
            bail!("kernels: {} is not contiguous", self.name)
        };
        Ok(s.as_cuda_slice::<T>()?.slice(o1..o2))
    }

    /// The device the tensor lives on.
    pub(crate) fn device(&self) -> candle_core::Result<CudaDevice> {
        match &*self.guard {
            Storage::Cuda(s) => Ok(s.device.clone()),
            _ => bail!("kernels: {} is not on a CUDA device", self.name),
        }
    }

    pub(crate) fn dims(&self) -> &[usize] {
        self.layout.dims()
    }

    /// A device view from the tensor's first element to the end of its storage, and its
    /// strides, for a strided layout; an error unless every element the layout addresses lies
    /// in that view.
    pub(crate) fn strided_view<T: CudaDType>(
        &self,
    ) -> candle_core::Result<(CudaView<'_, T>, Vec<usize>)> {
        let Storage::Cuda(s) = &*self.guard else {
            bail!("kernels: {} is not on a CUDA device", self.name)
        };
        let slice = s.as_cuda_slice::<T>()?;
        let start = self.layout.start_offset();
        let strides = self.layout.stride().to_vec();
        let last: usize = self
            .layout
            .dims()
            .iter()
            .zip(&strides)
            .map(|(&n, &st)| n.saturating_sub(1) * st)
            .sum();
        if self.layout.dims().contains(&0) || start + last >= slice.len() {
            bail!(
                "kernels: {} ({:?}, strides {strides:?}) addresses beyond its storage",
                self.name,
                self.layout.dims()
            );
        }
        Ok((slice.slice(start..), strides))
    }
}

/// A device slice as a tensor with no autograd history.
pub(crate) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The offset and `(batch, row)` strides of a `[B, L, C]` layout whose channels are contiguous.
pub(crate) fn rows_layout(l: &Layout, what: &str) -> candle_core::Result<(usize, i64, i64)> {
    match l.stride() {
        &[sb, st, 1] => Ok((l.start_offset(), sb as i64, st as i64)),
        other => bail!("kernels: {what} has strides {other:?}, channels must be contiguous"),
    }
}

pub(crate) fn take<T>(slot: &Mutex<Option<T>>, what: &str) -> candle_core::Result<T> {
    slot.lock()
        .ok()
        .and_then(|mut s| s.take())
        .ok_or_else(|| candle_core::Error::Msg(format!("kernels: {what} was not produced")))
}

pub(crate) fn cpu_only_error(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: CUDA kernel called on the CPU"))
}

/// The pointer argument of an optional input: the view, or a null device pointer.
pub(crate) enum Opt<'a, T> {
    Some(CudaView<'a, T>),
    Null(u64),
}

impl<'a, T> Opt<'a, T> {
    pub(crate) fn push<'b>(
        &'b self,
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'b>,
    ) {
        match self {
            Opt::Some(v) => b.arg(v),
            Opt::Null(p) => b.arg(p),
        };
    }
}

pub(crate) fn opt_view<'a, T: CudaDType>(
    s: &'a Option<Side<'a>>,
) -> candle_core::Result<Opt<'a, T>> {
    Ok(match s {
        Some(s) => Opt::Some(s.view::<T>()?),
        None => Opt::Null(0),
    })
}
