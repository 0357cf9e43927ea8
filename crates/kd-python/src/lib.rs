//! kd's embedded Python. kd loads this library (libloading) the first time
//! a `python:` module is named and calls [`kd_python_call`]; kd never links
//! libpython itself, so a zoo-only run initialises no Python, and a `kd`
//! binary copied to a machine whose Python differs still starts.
//!
//! Everything about tensors and modules happens in kd's Python shim
//! (`crates/kd-aten/python/embed.py`), which kd hands over as source: this
//! side only starts the interpreter, calls a shim function with text and
//! tensor handles, and passes the answer to kd while its tensors are alive.
//! Tensors cross as `TensorImpl` addresses in the one libtorch both sides
//! use: the same tensors, no copies, autograd intact.

use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

/// Receives one call's answer: `ok` 1 with the shim's text and the handles
/// of its tensors (alive for the duration of the call), or `ok` 0 with a
/// one-line error.
pub type Sink = unsafe extern "C" fn(
    ctx: *mut c_void,
    ok: i32,
    text: *const c_char,
    handles: *const usize,
    n: usize,
);

/// Calls the shim's `func` with `text` and the tensors whose `TensorImpl`
/// addresses are `handles` (kd keeps them alive), starting the interpreter
/// with `python` as its executable (so a venv's `pyvenv.cfg` gives it the
/// venv's packages) and loading `shim` on first use. The answer goes to
/// `sink`, exactly once.
///
/// # Safety
/// The strings are NUL-terminated; `handles` points at `n` live
/// `TensorImpl`s of the libtorch the shim's `torch` loads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kd_python_call(
    python: *const c_char,
    shim: *const c_char,
    func: *const c_char,
    text: *const c_char,
    handles: *const usize,
    n: usize,
    ctx: *mut c_void,
    sink: Sink,
) {
    let run = AssertUnwindSafe(|| {
        // SAFETY: the caller's contract.
        let (python, shim, func, text) = unsafe {
            (
                CStr::from_ptr(python),
                CStr::from_ptr(shim),
                CStr::from_ptr(func),
                CStr::from_ptr(text),
            )
        };
        let handles = if n == 0 {
            Vec::new()
        } else {
            // SAFETY: the caller's contract.
            unsafe { std::slice::from_raw_parts(handles, n) }.to_vec()
        };
        start(python)?;
        Python::attach(|py| call(py, shim, func, text, handles, ctx, sink))
    });
    let failed = match std::panic::catch_unwind(run) {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(_) => "kd's embedded Python panicked".to_string(),
    };
    let msg = CString::new(failed.replace('\0', " ")).unwrap_or_default();
    // SAFETY: the caller's sink.
    unsafe { sink(ctx, 0, msg.as_ptr(), std::ptr::null(), 0) };
}

fn call(
    py: Python<'_>,
    shim: &CStr,
    func: &CStr,
    text: &CStr,
    handles: Vec<usize>,
    ctx: *mut c_void,
    sink: Sink,
) -> Result<(), String> {
    static SHIM: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let say = |e: PyErr| e.to_string();
    let module = SHIM
        .get_or_try_init(py, || {
            PyModule::from_code(py, shim, c"kd_embed.py", c"kd_embed").map(Bound::unbind)
        })
        .map_err(say)?
        .bind(py);
    let utf8 = |s: &CStr| s.to_str().map(str::to_string).map_err(|e| e.to_string());
    let (func, text) = (utf8(func)?, utf8(text)?);
    // torch._C._wrap_tensor_impl and _tensor_impl_raw_handle speak in
    // unnamed capsules holding the TensorImpl address.
    let capsules = handles
        .iter()
        .map(|&h| {
            // SAFETY: a capsule around a pointer, no name, no destructor.
            let c = unsafe { pyo3::ffi::PyCapsule_New(h as *mut c_void, std::ptr::null(), None) };
            // SAFETY: a new reference, or null with the error set.
            unsafe { Bound::from_owned_ptr_or_err(py, c) }
        })
        .collect::<PyResult<Vec<_>>>()
        .map_err(say)?;
    // The shim answers (ok, text, tensors, capsules): the tensors stay
    // referenced by `answer` until kd has taken its own references.
    let answer = module
        .getattr("dispatch")
        .and_then(|d| d.call1((func, text, capsules)))
        .map_err(say)?;
    let (ok, reply, _tensors, caps): (bool, String, Bound<'_, PyAny>, Vec<Bound<'_, PyAny>>) =
        answer.extract().map_err(say)?;
    let mut out = Vec::with_capacity(caps.len());
    for c in &caps {
        // SAFETY: `c` is alive; a non-capsule sets an error, read below.
        let p = unsafe { pyo3::ffi::PyCapsule_GetPointer(c.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return Err(PyErr::take(py).map_or("not a tensor handle".into(), say));
        }
        out.push(p as usize);
    }
    let reply = CString::new(reply.replace('\0', " ")).map_err(|e| e.to_string())?;
    // SAFETY: the caller's sink; `answer` keeps the tensors alive.
    unsafe { sink(ctx, i32::from(ok), reply.as_ptr(), out.as_ptr(), out.len()) };
    Ok(())
}

/// Starts the interpreter once, with no signal handlers of its own (kd's
/// Ctrl-C and SIGTERM handling stays kd's), and releases the GIL so any
/// thread can take it.
fn start(python: &CStr) -> Result<(), String> {
    static STARTED: Mutex<bool> = Mutex::new(false);
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    if *started {
        return Ok(());
    }
    use pyo3::ffi;
    // SAFETY: the documented PyConfig sequence, on one thread (the lock).
    unsafe {
        if ffi::Py_IsInitialized() == 0 {
            let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
            ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
            let c = config.as_mut_ptr();
            (*c).install_signal_handlers = 0;
            let status = ffi::PyConfig_SetBytesString(c, &raw mut (*c).executable, python.as_ptr());
            let status = if ffi::PyStatus_Exception(status) != 0 {
                status
            } else {
                ffi::Py_InitializeFromConfig(c)
            };
            ffi::PyConfig_Clear(c);
            if ffi::PyStatus_Exception(status) != 0 {
                let why = if status.err_msg.is_null() {
                    "unknown error".into()
                } else {
                    CStr::from_ptr(status.err_msg).to_string_lossy()
                };
                return Err(format!(
                    "cannot start Python ({}): {why}",
                    python.to_string_lossy()
                ));
            }
            ffi::PyEval_SaveThread();
        }
    }
    *started = true;
    Ok(())
}
