//! Collectives for methods in data-parallel training. A method whose state
//! must stay the same on every rank (a memory bank fed by each batch) asks
//! for the whole job's batch here; in a single process these return their
//! input. The engine installs the job's collectives before training.

use std::sync::OnceLock;

use tch::Tensor;

use crate::Result;

/// The operations a data-parallel job offers methods.
pub trait Collective: Send + Sync {
    /// Every rank's `t` (same shape on every rank), concatenated along
    /// dimension 0 in rank order.
    fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor>;
    /// The mean of `t` over the ranks, in place.
    fn all_reduce_mean(&self, t: &Tensor) -> Result<()>;
}

static JOB: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Installs the job's collectives (once; later calls are ignored).
pub fn install(c: Box<dyn Collective>) {
    let _ = JOB.set(c);
}

/// `t` from every rank, concatenated in rank order; `t` itself alone.
pub fn all_gather_cat(t: &Tensor) -> Result<Tensor> {
    match JOB.get() {
        Some(c) => c.all_gather_cat(t),
        None => Ok(t.shallow_clone()),
    }
}

/// Replaces `t` with its mean over the ranks; nothing alone.
pub fn all_reduce_mean(t: &Tensor) -> Result<()> {
    match JOB.get() {
        Some(c) => c.all_reduce_mean(t),
        None => Ok(()),
    }
}
