//! `cuda_graph: true`: a stage's full-batch training step captured once as
//! a CUDA graph and replayed, so that the host launches one graph instead
//! of every kernel of the forward passes, losses, backward and update.
//!
//! What a graph bakes in is what its capture saw: the batch's buffers, the
//! learning rate, each method's weight and scheduled fields. The batch is
//! copied into the captured buffers before each replay; the schedule values
//! form the graph's key, and a step whose key differs captures again (an
//! epoch-wise schedule re-captures once an epoch; a graph replaced before
//! its second replay means a per-step schedule, such as the cosine learning
//! rate, and the stage goes on without graphs). The first steps of a
//! stage run eagerly (kernel selection, momentum buffers), and so does a
//! smaller last batch. A replay runs exactly the captured kernels, so its
//! losses are those of the uncaptured step.
//!
//! On the CPU, `KD_CUDA_GRAPH_EMULATE=1` runs this same bookkeeping with an
//! emulated graph that re-runs the step on the captured buffers: the tests
//! check the plumbing with it.

use kd_core::{Needs, Progress};
use kd_data::Batch;
use tch::Tensor;

use super::methods::Active;
use super::step::StepOut;
use crate::{EngineError, Result};

/// Eager steps at the start of a stage before the first capture.
const WARMUP: usize = 2;

/// Where a captured step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GraphBackend {
    /// A CUDA graph on this device index.
    Cuda(usize),
    /// The CPU stand-in of the tests (`KD_CUDA_GRAPH_EMULATE=1`).
    Emulated,
}

impl GraphBackend {
    /// The backend `cuda_graph: true` gets on `device`, or why it cannot.
    pub(crate) fn on(device: tch::Device) -> Result<GraphBackend> {
        match device {
            tch::Device::Cuda(i) if kd_aten::CudaGraph::built() => Ok(GraphBackend::Cuda(i)),
            tch::Device::Cuda(_) => Err(EngineError::Plan(
                "cuda_graph: this kd was built without the CUDA runtime headers, so without CUDA graphs".into(),
            )),
            _ if std::env::var("KD_CUDA_GRAPH_EMULATE").is_ok_and(|v| v == "1") => {
                Ok(GraphBackend::Emulated)
            }
            other => Err(EngineError::Plan(format!(
                "cuda_graph: true needs a CUDA device (this run is on {other:?}); drop it on the CPU"
            ))),
        }
    }
}

/// What the stage's methods ask for that a captured step cannot replay.
pub(crate) fn check(needs: &Needs) -> Result<()> {
    if !needs.views.is_empty() {
        return Err(EngineError::Plan(
            "cuda_graph cannot capture a step with adversarial views: the rows attacked differ from step to step; drop cuda_graph for this method".into(),
        ));
    }
    Ok(())
}

/// How a stage's steps ran, for the run's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub captures: usize,
    pub replays: usize,
    pub eager: usize,
}

struct Captured {
    key: Vec<u64>,
    /// `None` when emulated.
    graph: Option<kd_aten::CudaGraph>,
    /// The batch buffers the graph reads.
    inputs: Batch,
    /// What the captured step returned: its values tensor is rewritten by
    /// every replay.
    out: StepOut,
    replays: usize,
}

/// The captured step of a stage and when to capture again.
pub(crate) struct StepGraph {
    backend: GraphBackend,
    batch_size: i64,
    warmup: usize,
    captured: Option<Captured>,
    /// Set when a capture failed: the stage goes on eagerly.
    off: bool,
    pub(crate) stats: GraphStats,
}

impl StepGraph {
    pub(crate) fn new(backend: GraphBackend, batch_size: usize) -> StepGraph {
        StepGraph {
            backend,
            batch_size: batch_size as i64,
            warmup: WARMUP,
            captured: None,
            off: false,
            stats: GraphStats::default(),
        }
    }

    /// One training step on `batch`: `body` is the step on the batch it is
    /// given; `key` holds the values the step bakes in.
    pub(crate) fn step(
        &mut self,
        key: Vec<u64>,
        batch: &Batch,
        mut body: impl FnMut(&Batch) -> Result<StepOut>,
    ) -> Result<StepOut> {
        let full = batch.labels.size()[0] == self.batch_size;
        if self.off || !full || self.warmup > 0 {
            if full {
                self.warmup = self.warmup.saturating_sub(1);
            }
            self.stats.eager += 1;
            return body(batch);
        }
        if let Some(c) = self.captured.as_mut().filter(|c| c.key == key) {
            copy_batch(&mut c.inputs, batch)?;
            self.stats.replays += 1;
            c.replays += 1;
            return match &c.graph {
                Some(g) => {
                    g.replay()?;
                    Ok(detached(&c.out))
                }
                None => body(&c.inputs),
            };
        }
        // A new graph: the old one's memory pool goes first.
        if self.captured.take().is_some_and(|c| c.replays < 2) {
            eprintln!(
                "cuda_graph: the learning rate or a loss weight changes every step (a per-step schedule), so each step would be captured anew; the stage goes on without graphs"
            );
            self.off = true;
            self.stats.eager += 1;
            return body(batch);
        }
        let inputs = clone_batch(batch);
        let captured = match self.backend {
            GraphBackend::Emulated => body(&inputs).map(|out| (None, out)),
            GraphBackend::Cuda(device) => {
                kd_aten::CudaGraph::capture(device, || body(&inputs).map_err(|e| e.to_string()))
                    .map_err(EngineError::from)
                    .and_then(|(g, out)| {
                        g.replay()?;
                        Ok((Some(g), out))
                    })
            }
        };
        match captured {
            Ok((graph, out)) => {
                self.stats.captures += 1;
                let first = detached(&out);
                self.captured = Some(Captured {
                    key,
                    graph,
                    inputs,
                    out,
                    replays: 0,
                });
                Ok(first)
            }
            // Nothing of a failed capture ran on the device: the step runs
            // eagerly, and so does the rest of the stage.
            Err(e) if self.backend != GraphBackend::Emulated => {
                eprintln!("cuda_graph: capturing the step failed ({e}); the stage goes on without");
                self.off = true;
                self.stats.eager += 1;
                body(batch)
            }
            Err(e) => Err(e),
        }
    }
}

/// The values a graph's step bakes in: the learning rate, and each method's
/// weight and scheduled fields at `progress`.
pub(crate) fn key(
    lr: f64,
    methods: &mut [Active],
    peers: &mut [Active],
    progress: Progress,
) -> Result<Vec<u64>> {
    let mut key = vec![lr.to_bits()];
    for a in methods.iter_mut().chain(peers.iter_mut()) {
        key.push(a.weight.value(progress)?.to_bits());
        for (_, f) in a.fields.iter_mut() {
            key.push(f.value(progress)?.to_bits());
        }
    }
    Ok(key)
}

/// A step's output whose values stay put when the graph is replayed again.
fn detached(out: &StepOut) -> StepOut {
    StepOut {
        weights: out.weights.clone(),
        names: out.names.clone(),
        values: out.values.copy(),
        n: out.n,
    }
}

fn clone_batch(b: &Batch) -> Batch {
    Batch {
        images: b.images.copy(),
        labels: b.labels.copy(),
        soft_target: b.soft_target.as_ref().map(Tensor::copy),
        index: b.index.copy(),
        contrast_index: b.contrast_index.as_ref().map(Tensor::copy),
        strong: b.strong.as_ref().map(Tensor::copy),
    }
}

/// Copies `from` into the captured buffers `to` (same shapes: full batches).
fn copy_batch(to: &mut Batch, from: &Batch) -> Result<()> {
    to.images.f_copy_(&from.images)?;
    to.labels.f_copy_(&from.labels)?;
    to.index.f_copy_(&from.index)?;
    for (t, f) in [
        (&mut to.soft_target, &from.soft_target),
        (&mut to.contrast_index, &from.contrast_index),
        (&mut to.strong, &from.strong),
    ] {
        match (t, f) {
            (Some(t), Some(f)) => t.f_copy_(f)?,
            (None, None) => {}
            _ => {
                return Err(EngineError::Plan(
                    "cuda_graph: a batch differs in its parts from the captured one".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (The emulation's variable is set only by the integration tests,
    /// which run in their own processes.)
    #[test]
    fn graphs_are_refused_on_the_cpu() {
        let err = GraphBackend::on(tch::Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("needs a CUDA device"), "{err}");
    }
}
