//! A module kd did not build: a TorchScript file ([`crate::JitModule`]) or
//! a PyTorch module running in kd's embedded Python
//! ([`crate::PythonModule`]). Both hand kd their own tensors (parameters
//! and buffers under `state_dict` names) and run their own forward, so the
//! engine trains, checkpoints and taps either the same way.

use tch::{Tensor, nn};

/// Tensors by name.
pub type Named = Vec<(String, Tensor)>;

/// What a foreign module reported, or why it could not be run: one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ForeignError(pub String);

impl From<crate::AtenError> for ForeignError {
    fn from(e: crate::AtenError) -> Self {
        ForeignError(e.to_string())
    }
}

pub trait ForeignModule: Send {
    /// Parameters by `state_dict` name: the module's own tensors.
    fn parameters(&self) -> Result<Named, ForeignError>;

    /// The buffers its `state_dict` holds (BatchNorm's running statistics).
    fn buffers(&self) -> Result<Named, ForeignError>;

    /// `module.train(on)`.
    fn set_train(&self, on: bool) -> Result<(), ForeignError>;

    /// `forward(x)`: a Tensor output as `logits`, a `Dict[str, Tensor]`
    /// entry by entry (and taps read by hooks, for Python modules).
    fn forward(&self, x: &Tensor) -> Result<Named, ForeignError>;

    /// A loss module's `forward(student, teacher, target)` on taps by name:
    /// a Tensor output as `loss`, a `Dict[str, Tensor]` of terms by name.
    fn loss(
        &self,
        student: &Named,
        teacher: &Named,
        target: &Tensor,
    ) -> Result<Named, ForeignError>;

    /// Adds the parameters (trainable) and buffers under `p` by their
    /// `state_dict` names, as the module's own tensors: what an optimiser
    /// or a weights file does to them, the module computes with.
    fn add_to(&self, p: &nn::Path) -> Result<(), ForeignError> {
        let params = self.parameters()?.into_iter().map(|x| (true, x));
        let buffers = self.buffers()?.into_iter().map(|x| (false, x));
        for (trainable, (name, t)) in params.chain(buffers) {
            // A VarStore name's dots are its path: `layer1.0.conv1.weight`
            // is variable `weight` under `layer1` / `0` / `conv1`.
            let mut parts: Vec<&str> = name.split('.').collect();
            let leaf = parts.pop().unwrap_or_default();
            let sub = parts.iter().fold(p.clone(), |q, s| &q / *s);
            let _ = sub.add(leaf, t, trainable);
        }
        Ok(())
    }
}
