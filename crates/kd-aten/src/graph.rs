//! CUDA graphs: a step's kernels captured once and launched again as one
//! graph, without the host issuing each of them (`at::cuda::CUDAGraph`, as
//! `torch.cuda.graph` uses it).

use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::{AtenError, check};

unsafe extern "C" {
    fn kd_cuda_graphs_built() -> i32;
    fn kd_cuda_graph_capture(
        device: i32,
        body: extern "C" fn(*mut c_void) -> *mut c_char,
        ctx: *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn kd_cuda_graph_replay(graph: *mut c_void) -> *mut c_char;
    fn kd_cuda_graph_free(graph: *mut c_void);
    #[link_name = "malloc"]
    fn libc_malloc(n: usize) -> *mut c_void;
}

/// A captured CUDA graph, with the memory pool its kernels use.
pub struct CudaGraph(*mut c_void);

// SAFETY: the graph is owned here and only used through `&self`/drop.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Whether this build has CUDA graphs (libtorch with CUDA and the CUDA
    /// runtime headers at build time).
    pub fn built() -> bool {
        // SAFETY: no arguments.
        unsafe { kd_cuda_graphs_built() != 0 }
    }

    /// Runs `body` once on a side stream of CUDA device `device`, recording
    /// the kernels it launches instead of executing them, and returns the
    /// graph with what `body` returned (tensors whose memory the graph's
    /// replays write). Nothing has run on the device yet: `replay` runs it.
    pub fn capture<T, F: FnOnce() -> Result<T, String>>(
        device: usize,
        body: F,
    ) -> Result<(CudaGraph, T), AtenError> {
        let mut call = Call {
            body: Some(body),
            out: None,
        };
        let mut graph = std::ptr::null_mut();
        // SAFETY: `call` outlives the capture, which calls `trampoline` with
        // it at most once, on this thread.
        check(unsafe {
            kd_cuda_graph_capture(
                device as i32,
                trampoline::<T, F>,
                (&mut call as *mut Call<T, F>).cast(),
                &mut graph,
            )
        })?;
        let graph = CudaGraph(graph);
        let out = call
            .out
            .ok_or_else(|| AtenError("the captured body did not run".into()))?;
        Ok((graph, out))
    }

    /// Launches the captured kernels again, on the device's current stream.
    pub fn replay(&self) -> Result<(), AtenError> {
        // SAFETY: a graph `capture` returned, not yet freed.
        check(unsafe { kd_cuda_graph_replay(self.0) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { kd_cuda_graph_free(self.0) }
    }
}

struct Call<T, F> {
    body: Option<F>,
    out: Option<T>,
}

/// Calls the body for the C++ side; its error (or a panic, which must not
/// unwind into C++) comes back as a malloc'd message.
extern "C" fn trampoline<T, F: FnOnce() -> Result<T, String>>(ctx: *mut c_void) -> *mut c_char {
    // SAFETY: `ctx` is the `Call` that `capture` passed.
    let call = unsafe { &mut *ctx.cast::<Call<T, F>>() };
    let Some(body) = call.body.take() else {
        return message("the capture body was called twice");
    };
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(out)) => {
            call.out = Some(out);
            std::ptr::null_mut()
        }
        Ok(Err(e)) => message(&e),
        Err(_) => message("the step panicked while it was being captured"),
    }
}

/// `msg` in malloc'd memory, which the shim's error convention frees.
fn message(msg: &str) -> *mut c_char {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let bytes = c.as_bytes_with_nul();
    // SAFETY: a fresh allocation of the right size, filled before use.
    unsafe {
        let p = libc_malloc(bytes.len()).cast::<u8>();
        if p.is_null() {
            return std::ptr::null_mut();
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        p.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU, a capture fails with a message (libtorch's, or this
    /// build's lack of CUDA graphs) and the body's result is not kept.
    #[test]
    fn capture_without_a_gpu_is_an_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = CudaGraph::capture(0, || Ok::<_, String>(1)).err().unwrap();
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn messages_survive_the_round_trip() {
        let p = message("bad\0step");
        // SAFETY: `message` follows the shim's convention.
        let back = unsafe { crate::take_error(p) };
        assert_eq!(back.as_deref(), Some("bad step"));
    }
}
