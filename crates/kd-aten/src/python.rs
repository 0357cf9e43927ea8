//! PyTorch modules of the user's, run in kd's process by an embedded
//! Python: `FILE.py:NAME(args)` or `package.module:NAME(args)`, with
//! optional taps by submodule path (`[feat/1=layer2]`). The module's
//! forward and backward are PyTorch's own, on kd's tensors: both sides use
//! the one libtorch, and tensors cross as their `TensorImpl`.
//!
//! The interpreter lives in `libkd_python.so` (crates/kd-python), loaded
//! on the first `python:` spec: `kd` does not link libpython, so a run
//! without Python modules initialises no Python. The Python is the venv's
//! (`$VIRTUAL_ENV`), else `python3` on `PATH`; what runs there is
//! `python/embed.py`.

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::json;
use tch::{Device, Tensor};

use crate::foreign::{ForeignError, ForeignModule, Named};

const SHIM: &str = include_str!("../python/embed.py");

/// The library's file name.
const LIBRARY: &str = "libkd_python.so";

type Sink = unsafe extern "C" fn(*mut c_void, i32, *const c_char, *const usize, usize);
type CallFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const c_char,
    *const c_char,
    *const usize,
    usize,
    *mut c_void,
    Sink,
);

unsafe extern "C" {
    fn kd_tensor_impl(t: *mut c_void) -> usize;
    fn kd_tensor_from_impl(imp: usize) -> *mut c_void;
}

/// The `.py` file a spec names, if it names one.
pub fn source_file(spec: &str) -> Option<&Path> {
    let (target, _) = spec.split_once(':')?;
    target.ends_with(".py").then(|| Path::new(target))
}

struct Embedded {
    call: CallFn,
    python: CString,
    shim: CString,
    // Kept loaded for the process's life: `call` points into it.
    _lib: libloading::Library,
}

/// The embedded interpreter's library, loaded once.
fn embedded() -> Result<&'static Embedded, ForeignError> {
    static LOADED: OnceLock<Result<Embedded, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = library()?;
            // Global, so libpython's symbols (a dependency of the library)
            // resolve for the extension modules Python loads (torch._C).
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            // SAFETY: kd's own library, whose initialisers only set up Rust
            // statics; the symbol has the signature declared above.
            let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
                .map(libloading::Library::from)
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            let call = *unsafe { lib.get::<CallFn>(b"kd_python_call\0") }
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let python = python()?;
            let c = |s: &[u8]| CString::new(s).map_err(|_| "a NUL byte in a path".to_string());
            Ok(Embedded {
                call,
                python: c(python.as_os_str().as_encoded_bytes())?,
                shim: c(SHIM.as_bytes())?,
                _lib: lib,
            })
        })
        .as_ref()
        .map_err(|e| ForeignError(e.clone()))
}

/// `$KD_PYTHON_LIB`, else `libkd_python.so` beside the running binary (or
/// one folder up, where test binaries run from `target/*/deps`).
fn library() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KD_PYTHON_LIB") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find kd's binary: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join(LIBRARY), dir.join("..").join(LIBRARY)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "python: modules run in kd's embedded Python, and its library {LIBRARY} is not beside {} (build it with `cargo build -p kd-python`, as `make build` does, or set KD_PYTHON_LIB)",
                exe.display()
            )
        })
}

/// The venv's Python, else `python3` on `PATH`, as an absolute path (the
/// interpreter reads its `pyvenv.cfg` beside it).
fn python() -> Result<PathBuf, String> {
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        let p = Path::new(&v).join("bin/python");
        if p.exists() {
            return Ok(p);
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
        .ok_or_else(|| "python: modules need a Python with PyTorch: no $VIRTUAL_ENV and no python3 on PATH (scripts/bootstrap makes the venv)".to_string())
}

struct Answer {
    ok: bool,
    text: String,
    tensors: Vec<Tensor>,
}

unsafe extern "C" fn take_answer(
    ctx: *mut c_void,
    ok: i32,
    text: *const c_char,
    handles: *const usize,
    n: usize,
) {
    // SAFETY: `ctx` is the `Option<Answer>` of `call`, and the handles are
    // live TensorImpls while this runs (the contract of kd_python_call).
    unsafe {
        let handles = if n == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(handles, n)
        };
        let tensors = handles
            .iter()
            .map(|&h| Tensor::from_ptr(kd_tensor_from_impl(h).cast()))
            .collect();
        *ctx.cast::<Option<Answer>>() = Some(Answer {
            ok: ok != 0,
            text: CStr::from_ptr(text).to_string_lossy().into_owned(),
            tensors,
        });
    }
}

/// Calls the shim's `func` with JSON arguments and tensors.
fn call(
    func: &str,
    args: serde_json::Value,
    tensors: &[&Tensor],
) -> Result<(Reply, Vec<Tensor>), ForeignError> {
    let e = embedded()?;
    let (func, args) = (
        CString::new(func).expect("shim function names have no NUL"),
        CString::new(args.to_string())
            .map_err(|_| ForeignError("a NUL byte in an argument".into()))?,
    );
    // SAFETY: `as_ptr` is the at::Tensor* kd_tensor_impl reads.
    let handles: Vec<usize> = tensors
        .iter()
        .map(|t| unsafe { kd_tensor_impl(t.as_ptr() as *mut c_void) })
        .collect();
    let mut answer: Option<Answer> = None;
    // SAFETY: the strings are NUL-terminated, the tensors outlive the call,
    // and `take_answer` fills `answer`, the context it is given.
    unsafe {
        (e.call)(
            e.python.as_ptr(),
            e.shim.as_ptr(),
            func.as_ptr(),
            args.as_ptr(),
            handles.as_ptr(),
            handles.len(),
            (&raw mut answer).cast(),
            take_answer,
        )
    };
    match answer {
        Some(a) if a.ok => Ok((reply(&a.text)?, a.tensors)),
        Some(a) => Err(ForeignError(a.text)),
        None => Err(ForeignError("kd's embedded Python gave no answer".into())),
    }
}

/// What the shim answers (fields absent from an answer default).
#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct Reply {
    id: i64,
    names: Vec<String>,
    parameters: usize,
}

fn reply(text: &str) -> Result<Reply, ForeignError> {
    serde_json::from_str(text)
        .map_err(|e| ForeignError(format!("kd's embedded Python answered `{text}`: {e}")))
}

fn zip(names: Vec<String>, tensors: Vec<Tensor>) -> Named {
    names.into_iter().zip(tensors).collect()
}

/// A PyTorch module in kd's embedded Python.
pub struct PythonModule {
    id: i64,
    params: Named,
    buffers: Named,
}

impl PythonModule {
    /// Builds the module `spec` names and moves it to `device`.
    pub fn load(spec: &str, device: Device) -> Result<PythonModule, ForeignError> {
        let device = match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            Device::Mps => "mps".into(),
            _ => "cpu".into(),
        };
        let (r, tensors) = call("load", json!({"spec": spec, "device": device}), &[])?;
        let n = r.parameters;
        let mut all = zip(r.names, tensors);
        let buffers = all.split_off(n.min(all.len()));
        Ok(PythonModule {
            id: r.id,
            params: all,
            buffers,
        })
    }
}

fn shallow(named: &Named) -> Named {
    named
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

impl ForeignModule for PythonModule {
    fn parameters(&self) -> Result<Named, ForeignError> {
        Ok(shallow(&self.params))
    }

    fn buffers(&self) -> Result<Named, ForeignError> {
        Ok(shallow(&self.buffers))
    }

    fn set_train(&self, on: bool) -> Result<(), ForeignError> {
        call("train", json!({"id": self.id, "on": on}), &[]).map(|_| ())
    }

    fn forward(&self, x: &Tensor) -> Result<Named, ForeignError> {
        let (r, out) = call("forward", json!({"id": self.id}), &[x])?;
        Ok(zip(r.names, out))
    }

    fn loss(
        &self,
        student: &Named,
        teacher: &Named,
        target: &Tensor,
    ) -> Result<Named, ForeignError> {
        let names = |side: &Named| side.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let args = json!({"id": self.id, "student": names(student), "teacher": names(teacher)});
        let tensors: Vec<&Tensor> = student
            .iter()
            .chain(teacher)
            .map(|(_, t)| t)
            .chain([target])
            .collect();
        let (r, out) = call("loss", args, &tensors)?;
        Ok(zip(r.names, out))
    }
}

impl Drop for PythonModule {
    fn drop(&mut self) {
        let _ = call("drop", json!({"id": self.id}), &[]);
    }
}
