//! The few libtorch calls kd needs that `tch` does not bind, through a small
//! C++ shim (`cpp/kd_aten.cpp`) compiled against the same libtorch:
//! PyTorch's multi-tensor SGD update, channels-last memory order, inference
//! mode, autocast's lower precision on CUDA, bf16 autocast on the CPU, and
//! CUDA graphs; and modules
//! kd did not build: TorchScript files and PyTorch modules in an embedded
//! Python.

mod foreign;
mod graph;
mod jit;
mod optim;
mod pickle;
mod python;

pub use foreign::{ForeignError, ForeignModule, Named};
pub use graph::CudaGraph;
pub use jit::{JitModule, save_state_dict};
pub use optim::{AdamwStep, LambStep, adamw_foreach, clip_grad_norm, foreach_lerp_, lamb};
pub use python::{PythonModule, source_file as python_source_file};

use std::ffi::{CStr, c_char, c_void};

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
#[error("libtorch: {0}")]
pub struct AtenError(String);

type RawTensor = *mut c_void;

unsafe extern "C" {
    fn kd_sgd_foreach(
        params: *const RawTensor,
        grads: *const RawTensor,
        bufs: *const RawTensor,
        n: i64,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: i32,
    ) -> *mut c_char;
    fn kd_grads_to_none(params: *const RawTensor, n: i64) -> *mut c_char;
    fn kd_leaky_relu(t: RawTensor, slope: f64, out: *mut RawTensor) -> *mut c_char;
    fn kd_onednn_linear(
        x: RawTensor,
        w: RawTensor,
        b: RawTensor,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn kd_onednn_linear_forwards() -> i64;
    fn kd_channels_last(t: RawTensor, out: *mut RawTensor) -> *mut c_char;
    fn kd_is_channels_last(t: RawTensor) -> i32;
    fn kd_inference_mode_new() -> *mut c_void;
    fn kd_inference_mode_free(guard: *mut c_void);
    fn kd_set_cuda_autocast_dtype(bf16: i32) -> *mut c_char;
    fn kd_cuda_autocast_is_bf16() -> i32;
    fn kd_cpu_bf16_supported() -> i32;
    fn kd_cpu_autocast_new() -> *mut c_void;
    fn kd_cpu_autocast_free(guard: *mut c_void);
    fn kd_cpu_autocast_enabled() -> i32;
    fn kd_pth_pickle(path: *const c_char, out: *mut *mut c_char, len: *mut i64) -> *mut c_char;
    fn kd_pickle_tensors(
        path: *const c_char,
        pkl: *const c_char,
        pkl_len: i64,
        names: *mut *mut *mut c_char,
        tensors: *mut *mut *mut c_void,
        n: *mut i64,
    ) -> *mut c_char;
}

/// Turns the shim's error convention (a malloc'd message or null) into a Result.
fn check(err: *mut c_char) -> Result<(), AtenError> {
    // SAFETY: every shim function returns null or a message from malloc.
    match unsafe { take_error(err) } {
        None => Ok(()),
        Some(msg) => Err(AtenError(msg)),
    }
}

/// The message a shim function returned under `cpp/kd_ffi.h`'s convention
/// (null on success, else a malloc'd NUL-terminated string, freed here),
/// cut to its first line: libtorch appends a C++ stack trace.
///
/// # Safety
/// `err` is null or a pointer a kd shim returned, not yet freed.
pub unsafe fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { libc_free(err.cast()) };
    Some(msg.lines().next().unwrap_or_default().to_string())
}

unsafe extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

fn raw(t: &Tensor) -> RawTensor {
    t.as_ptr() as RawTensor
}

/// One training-mode BatchNorm forward: the arguments of
/// `torch.nn.functional.batch_norm`. The zoo's training-BatchNorm hook
/// (kd-models) hands these over, and SyncBatchNorm (kd-dist) takes them.
#[derive(Debug, Clone, Copy)]
pub struct BatchNormArgs<'a> {
    pub input: &'a Tensor,
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub momentum: f64,
    pub eps: f64,
}

/// SGD hyper-parameters of one update (PyTorch's `torch.optim.SGD`, no
/// dampening, not maximising).
#[derive(Debug, Clone, Copy)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// One SGD update of `params` from `grads`, keeping momentum in `bufs`
/// (zero before the first update), with the ATen calls of PyTorch's
/// multi-tensor SGD: a handful of fused kernels for the whole list on CUDA.
pub fn sgd_foreach(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    step: SgdStep,
) -> Result<(), AtenError> {
    let n = params.len();
    if grads.len() != n || bufs.len() != n {
        return Err(AtenError(format!(
            "sgd: {n} parameters but {} gradients and {} buffers",
            grads.len(),
            bufs.len()
        )));
    }
    let (p, g, b): (Vec<_>, Vec<_>, Vec<_>) = (
        params.iter().map(raw).collect(),
        grads.iter().map(raw).collect(),
        bufs.iter().map(raw).collect(),
    );
    // SAFETY: the pointers are live tch tensors (at::Tensor*) for the call.
    check(unsafe {
        kd_sgd_foreach(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n as i64,
            step.lr,
            step.momentum,
            step.weight_decay,
            i32::from(step.nesterov),
        )
    })
}

/// Drops the gradients of `params`, as `zero_grad(set_to_none=True)`.
pub fn grads_to_none(params: &[Tensor]) -> Result<(), AtenError> {
    let p: Vec<_> = params.iter().map(raw).collect();
    // SAFETY: live tensors for the call.
    check(unsafe { kd_grads_to_none(p.as_ptr(), p.len() as i64) })
}

/// `F.leaky_relu(t, slope)`, differentiable: one kernel forward and one
/// backward (tch's `leaky_relu` has the slope fixed at 0.01).
pub fn leaky_relu(t: &Tensor, slope: f64) -> Result<Tensor, AtenError> {
    let mut out: RawTensor = std::ptr::null_mut();
    // SAFETY: `t` is live; on success the shim hands over a new at::Tensor.
    check(unsafe { kd_leaky_relu(raw(t), slope, &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `F.linear(x, w, b)`. On the CPU at fp32 (outside autocast, on a CPU
/// whose oneDNN has its AVX-512 kernels) it runs forward and backward as
/// oneDNN fp32 matmuls (`cpp/kd_linear.cpp`: faster than the MKL sgemm
/// ATen calls on a transformer's shapes); everywhere else, and with
/// `KD_ONEDNN_LINEAR=0` in the environment, it is ATen's `linear`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    if onednn_linear_fits(x, w) {
        let mut out: RawTensor = std::ptr::null_mut();
        let b = b.map_or(std::ptr::null_mut(), raw);
        // SAFETY: live tensors (b may be null); on success the shim hands
        // over a new at::Tensor.
        if check(unsafe { kd_onednn_linear(raw(x), raw(w), b, &mut out) }).is_ok() {
            return unsafe { Tensor::from_ptr(out.cast()) };
        }
        // The shim refused (it checks what this test does): ATen's then.
    }
    x.linear(w, b)
}

/// How many [`linear`] forwards of this process ran through oneDNN.
pub fn onednn_linear_forwards() -> i64 {
    // SAFETY: a plain getter.
    unsafe { kd_onednn_linear_forwards() }
}

/// Whether [`linear`] takes the oneDNN path for these operands.
pub fn onednn_linear_fits(x: &Tensor, w: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        std::env::var("KD_ONEDNN_LINEAR").map_or(true, |v| v != "0") && cpu_bf16_supported()
    });
    on && x.device() == tch::Device::Cpu
        && x.kind() == tch::Kind::Float
        && w.kind() == tch::Kind::Float
        && !cpu_autocast_enabled()
}

/// `t` with channels-last strides (NHWC in memory, NCHW in shape).
pub fn channels_last(t: &Tensor) -> Result<Tensor, AtenError> {
    let mut out: RawTensor = std::ptr::null_mut();
    // SAFETY: `t` is live; on success the shim hands over a new at::Tensor.
    check(unsafe { kd_channels_last(raw(t), &mut out) })?;
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: `t` is live for the call.
    unsafe { kd_is_channels_last(raw(t)) != 0 }
}

/// Runs `f` in libtorch's inference mode: no autograd bookkeeping at all
/// (not even version counters). Tensors made inside cannot later be saved
/// for a backward pass.
pub fn inference_mode<T>(f: impl FnOnce() -> T) -> T {
    struct Guard(*mut c_void);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: made by kd_inference_mode_new on this thread.
            unsafe { kd_inference_mode_free(self.0) }
        }
    }
    // SAFETY: the guard lives on this thread until `f` returns.
    let _guard = Guard(unsafe { kd_inference_mode_new() });
    f()
}

/// The lower precision autocast uses on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

pub fn set_cuda_autocast_dtype(kind: HalfKind) -> Result<(), AtenError> {
    // SAFETY: a plain setter.
    check(unsafe { kd_set_cuda_autocast_dtype(i32::from(kind == HalfKind::Bf16)) })
}

/// The lower precision autocast uses on CUDA now.
pub fn cuda_autocast_dtype() -> HalfKind {
    // SAFETY: a plain getter.
    match unsafe { kd_cuda_autocast_is_bf16() } {
        0 => HalfKind::F16,
        _ => HalfKind::Bf16,
    }
}

/// Whether this CPU runs bf16 convolutions and matmuls in oneDNN, as
/// `torch.ops.mkldnn._is_mkldnn_bf16_supported()` says (AVX-512 or newer on
/// x86; native bf16 instructions, AVX512_BF16 or AMX, make it fast).
pub fn cpu_bf16_supported() -> bool {
    // SAFETY: a plain query; the shim catches everything.
    unsafe { kd_cpu_bf16_supported() != 0 }
}

/// Runs `f` under `torch.autocast("cpu", dtype=torch.bfloat16)`:
/// convolutions and matmuls in bf16 through oneDNN, the ops autocast keeps
/// in fp32 in fp32, everything else in its inputs' type. `tch::autocast`
/// only switches CUDA's autocast, whence this.
pub fn cpu_autocast<T>(f: impl FnOnce() -> T) -> T {
    struct Guard(*mut c_void);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: made by kd_cpu_autocast_new on this thread.
            unsafe { kd_cpu_autocast_free(self.0) }
        }
    }
    // SAFETY: the guard lives on this thread until `f` returns (or unwinds).
    let _guard = Guard(unsafe { kd_cpu_autocast_new() });
    f()
}

/// Whether CPU autocast is on for this thread.
pub fn cpu_autocast_enabled() -> bool {
    // SAFETY: a plain getter.
    unsafe { kd_cpu_autocast_enabled() != 0 }
}

/// Every tensor of a file written by Python's `torch.save` (a state_dict,
/// or a checkpoint dict holding one), with dotted names (`model.fc.weight`
/// for `{"model": {"fc.weight": ...}}`); other values are left out. Read by
/// libtorch's own unpickler, which runs no Python code.
pub fn pickle_tensors(path: &std::path::Path) -> Result<Vec<(String, Tensor)>, AtenError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| AtenError("the path holds a NUL byte".into()))?;
    let (mut raw_pkl, mut len) = (std::ptr::null_mut(), 0i64);
    check(unsafe { kd_pth_pickle(c_path.as_ptr(), &mut raw_pkl, &mut len) })?;
    // SAFETY: the shim malloc'd `len` bytes at `raw_pkl`.
    let pkl = unsafe { std::slice::from_raw_parts(raw_pkl as *const u8, len as usize) }.to_vec();
    unsafe { libc_free(raw_pkl.cast()) };
    let pkl = pickle::plain_dicts(&pkl).unwrap_or(pkl);
    let (mut names, mut tensors, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0i64);
    check(unsafe {
        kd_pickle_tensors(
            c_path.as_ptr(),
            pkl.as_ptr().cast(),
            pkl.len() as i64,
            &mut names,
            &mut tensors,
            &mut n,
        )
    })?;
    // SAFETY: the shim succeeded, so it filled the three outputs.
    Ok(unsafe { take_named(names, tensors, n) })
}

/// Named tensors a shim function handed out: `n` malloc'd names and `n`
/// new'd tensors, in two malloc'd arrays; all freed or owned here.
///
/// # Safety
/// The pointers must come from a shim function that returned success.
unsafe fn take_named(
    names: *mut *mut c_char,
    tensors: *mut *mut c_void,
    n: i64,
) -> Vec<(String, Tensor)> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        unsafe {
            let name = CStr::from_ptr(*names.add(i)).to_string_lossy().into_owned();
            libc_free((*names.add(i)).cast());
            let t = Tensor::from_ptr((*tensors.add(i)).cast());
            out.push((name, t));
        }
    }
    unsafe {
        libc_free(names.cast());
        libc_free(tensors.cast());
    }
    out
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn leaky_relu_takes_its_slope_both_ways() {
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.25, 3.0]).set_requires_grad(true);
        let y = leaky_relu(&x, 0.1).unwrap();
        let want = [-0.2f32, -0.05, 0.0, 0.25, 3.0];
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), want);
        y.sum(tch::Kind::Float).backward();
        let g = Vec::<f32>::try_from(&x.grad()).unwrap();
        assert_eq!(g, [0.1f32, 0.1, 0.1, 1.0, 1.0]);
    }

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let t = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&t));
        let c = channels_last(&t).unwrap();
        assert!(is_channels_last(&c));
        assert_eq!(c.stride(), [60, 1, 15, 3]);
        assert!(c.equal(&t));
    }

    #[test]
    fn errors_come_back_as_messages() {
        let p = vec![Tensor::zeros([3], (Kind::Float, Device::Cpu))];
        let g = vec![Tensor::zeros([4], (Kind::Float, Device::Cpu))];
        let err = sgd_foreach(
            &p,
            &g,
            &p,
            SgdStep {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 1e-4,
                nesterov: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("libtorch"), "{err}");
    }

    /// Plumbing only: the setting autocast reads on CUDA (no GPU needed).
    #[test]
    fn cuda_autocast_dtype_is_set() {
        for kind in [HalfKind::Bf16, HalfKind::F16, HalfKind::Bf16] {
            set_cuda_autocast_dtype(kind).unwrap();
            assert_eq!(cuda_autocast_dtype(), kind);
        }
    }

    /// Nested regions keep autocast on until the outermost ends, which
    /// then drops the cached bf16 weights: a weight changed between two
    /// regions (an optimiser step) is cast afresh.
    #[test]
    fn cpu_autocast_nests_and_recasts_updated_weights() {
        let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([2, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(!cpu_autocast_enabled());
        let first = cpu_autocast(|| {
            let inner = cpu_autocast(|| x.linear(&w, None::<Tensor>));
            assert!(cpu_autocast_enabled(), "still on after the inner region");
            inner
        });
        assert!(!cpu_autocast_enabled());
        assert_eq!(first.kind(), Kind::BFloat16);
        let _ = tch::no_grad(|| w.shallow_clone().fill_(2.0));
        let second = cpu_autocast(|| x.linear(&w, None::<Tensor>));
        let values = |t: &Tensor| Vec::<f32>::try_from(&t.to_kind(Kind::Float).view(-1)).unwrap();
        assert_eq!(values(&first), [4.0, 4.0]);
        assert_eq!(values(&second), [8.0, 8.0]);
    }

    #[test]
    fn inference_mode_tensors_are_marked() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let y = inference_mode(|| &x * 2.0);
        assert!(y.is_inference());
        assert!(!(&x * 2.0).is_inference());
    }
}
