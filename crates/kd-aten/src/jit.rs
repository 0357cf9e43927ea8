//! TorchScript modules (`torch.jit.script` or `trace` files) loaded into
//! the process's libtorch: their parameters and buffers under their
//! `state_dict` names (the module's own tensors, so an optimiser updating
//! them updates the module), the train/eval switch, and a forward that
//! returns named outputs.

use std::ffi::{CString, c_char, c_void};
use std::path::Path;

use tch::{Device, Tensor};

use crate::foreign::{ForeignError, ForeignModule, Named};
use crate::{AtenError, check, raw, take_named};

unsafe extern "C" {
    fn kd_save_state_dict(
        names: *const *const c_char,
        tensors: *const *mut c_void,
        n: i64,
        path: *const c_char,
    ) -> *mut c_char;
    fn kd_jit_load(path: *const c_char, cuda_index: i32, out: *mut *mut c_void) -> *mut c_char;
    fn kd_jit_free(m: *mut c_void);
    fn kd_jit_tensors(
        m: *mut c_void,
        buffers: i32,
        names: *mut *mut *mut c_char,
        tensors: *mut *mut *mut c_void,
        n: *mut i64,
    ) -> *mut c_char;
    fn kd_jit_train(m: *mut c_void, on: i32) -> *mut c_char;
    fn kd_jit_forward(
        m: *mut c_void,
        x: *mut c_void,
        names: *mut *mut *mut c_char,
        tensors: *mut *mut *mut c_void,
        n: *mut i64,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn kd_jit_loss(
        m: *mut c_void,
        s_names: *const *const c_char,
        s: *const *mut c_void,
        ns: i64,
        t_names: *const *const c_char,
        t: *const *mut c_void,
        nt: i64,
        target: *mut c_void,
        names: *mut *mut *mut c_char,
        tensors: *mut *mut *mut c_void,
        n: *mut i64,
    ) -> *mut c_char;
}

/// Writes `named` as `torch.save(state_dict)` does: `torch.load(path)` in
/// PyTorch gives a dict of str to Tensor, ready for `load_state_dict`.
pub fn save_state_dict(named: &[(String, Tensor)], path: &Path) -> Result<(), AtenError> {
    let c_path = c_path(path)?;
    let names = c_names(named)?;
    let name_ptrs = ptrs(&names);
    let tensors = raws(named);
    check(unsafe {
        kd_save_state_dict(
            name_ptrs.as_ptr(),
            tensors.as_ptr(),
            tensors.len() as i64,
            c_path.as_ptr(),
        )
    })
}

fn c_path(path: &Path) -> Result<CString, AtenError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| AtenError("the path holds a NUL byte".into()))
}

/// The names of `named` as C strings; a NUL byte in one is an error.
fn c_names(named: &[(String, Tensor)]) -> Result<Vec<CString>, AtenError> {
    named
        .iter()
        .map(|(n, _)| CString::new(n.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| AtenError("a tensor name holds a NUL byte".into()))
}

fn ptrs(names: &[CString]) -> Vec<*const c_char> {
    names.iter().map(|c| c.as_ptr()).collect()
}

fn raws(named: &[(String, Tensor)]) -> Vec<*mut c_void> {
    named.iter().map(|(_, t)| raw(t)).collect()
}

/// A loaded TorchScript module.
pub struct JitModule {
    raw: *mut c_void,
}

// SAFETY: a torch::jit::Module is a handle to its object; kd uses each from
// one thread at a time, and libtorch allows moving it between threads.
unsafe impl Send for JitModule {}

impl Drop for JitModule {
    fn drop(&mut self) {
        unsafe { kd_jit_free(self.raw) }
    }
}

impl JitModule {
    /// Loads the module at `path` with its tensors on `device`.
    pub fn load(path: &Path, device: Device) -> Result<JitModule, AtenError> {
        let c_path = c_path(path)?;
        let cuda = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let mut raw = std::ptr::null_mut();
        check(unsafe { kd_jit_load(c_path.as_ptr(), cuda, &mut raw) })?;
        Ok(JitModule { raw })
    }

    fn tensors(&self, buffers: bool) -> Result<Named, AtenError> {
        let (mut names, mut tensors, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0i64);
        check(unsafe {
            kd_jit_tensors(
                self.raw,
                i32::from(buffers),
                &mut names,
                &mut tensors,
                &mut n,
            )
        })?;
        // SAFETY: the shim succeeded.
        Ok(unsafe { take_named(names, tensors, n) })
    }
}

impl ForeignModule for JitModule {
    fn parameters(&self) -> Result<Named, ForeignError> {
        Ok(self.tensors(false)?)
    }

    fn buffers(&self) -> Result<Named, ForeignError> {
        Ok(self.tensors(true)?)
    }

    /// `module.train(on)`: every submodule's `training` flag.
    fn set_train(&self, on: bool) -> Result<(), ForeignError> {
        Ok(check(unsafe { kd_jit_train(self.raw, i32::from(on)) })?)
    }

    /// `forward(x)`: a Tensor output as `logits`, a `Dict[str, Tensor]`
    /// entry by entry.
    fn forward(&self, x: &Tensor) -> Result<Named, ForeignError> {
        let (mut names, mut tensors, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0i64);
        check(unsafe { kd_jit_forward(self.raw, raw(x), &mut names, &mut tensors, &mut n) })?;
        // SAFETY: the shim succeeded.
        Ok(unsafe { take_named(names, tensors, n) })
    }

    /// A loss module's `forward(student, teacher, target)` on taps by name:
    /// a Tensor output as `loss`, a `Dict[str, Tensor]` of terms by name.
    fn loss(
        &self,
        student: &Named,
        teacher: &Named,
        target: &Tensor,
    ) -> Result<Named, ForeignError> {
        let (sn, tn) = (c_names(student)?, c_names(teacher)?);
        let (snp, tnp, sr, tr) = (ptrs(&sn), ptrs(&tn), raws(student), raws(teacher));
        let (mut names, mut tensors, mut n) = (std::ptr::null_mut(), std::ptr::null_mut(), 0i64);
        check(unsafe {
            kd_jit_loss(
                self.raw,
                snp.as_ptr(),
                sr.as_ptr(),
                sr.len() as i64,
                tnp.as_ptr(),
                tr.as_ptr(),
                tr.len() as i64,
                raw(target),
                &mut names,
                &mut tensors,
                &mut n,
            )
        })?;
        // SAFETY: the shim succeeded.
        Ok(unsafe { take_named(names, tensors, n) })
    }
}
