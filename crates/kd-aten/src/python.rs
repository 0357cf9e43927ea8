//! Python specs, `FILE.py:NAME(args)` or `package.module:NAME(args)`: a
//! PyTorch module of the user's (a network, or a loss), built by the
//! bootstrap venv's Python and compiled there with `torch.jit.script`
//! (`python/script_spec.py`), then loaded as a [`JitModule`]. Python runs
//! once per spec and process, in a child process; training runs no Python.
//! Modules TorchScript cannot compile are refused with the compiler's
//! message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::JitModule;

/// A spec that could not be built: the message names the spec and what
/// Python, or TorchScript's compiler, said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

const SCRIPT: &str = include_str!("../python/script_spec.py");

fn bad(spec: &str, reason: impl std::fmt::Display) -> SpecError {
    SpecError(format!("{spec}: {reason}"))
}

/// The Python with the PyTorch kd links: the venv's, else `python3`.
fn python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|v| Path::new(&v).join("bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "python3".into())
}

/// The `.py` file a spec names, if it names one.
pub fn source_file(spec: &str) -> Option<&Path> {
    let (target, _) = spec.split_once(':')?;
    target.ends_with(".py").then(|| Path::new(target))
}

/// The module `spec` names, scripted, on `device`.
pub fn load_spec(spec: &str, device: tch::Device) -> Result<JitModule, SpecError> {
    JitModule::load(&scripted(spec)?, device).map_err(|e| bad(spec, e))
}

/// The TorchScript file for `spec`, scripted once per process.
fn scripted(spec: &str) -> Result<PathBuf, SpecError> {
    static DONE: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let done = done.get_or_insert_with(HashMap::new);
    if let Some(p) = done.get(spec).filter(|p| p.exists()) {
        return Ok(p.clone());
    }
    // One file per spec, rewritten by each process that scripts it (a
    // package's module may have changed since): written under a name of
    // this process's, then renamed, so ranks scripting the same spec at
    // once each read a whole file.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(spec, &mut h);
    let name = format!("kd-scripted-{:016x}.pt", std::hash::Hasher::finish(&h));
    let out = std::env::temp_dir().join(name);
    let part = out.with_extension(format!("{}.part", std::process::id()));
    let run = Command::new(python())
        .args(["-c", SCRIPT, spec])
        .arg(&part)
        .output()
        .map_err(|e| bad(spec, format!("cannot run {}: {e}", python().display())))?;
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        let _ = std::fs::remove_file(&part);
        return Err(bad(spec, last.trim()));
    }
    std::fs::rename(&part, &out).map_err(|e| {
        bad(
            spec,
            format!("cannot move {} into place: {e}", part.display()),
        )
    })?;
    done.insert(spec.to_string(), out.clone());
    Ok(out)
}
