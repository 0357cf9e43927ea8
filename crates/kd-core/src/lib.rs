//! The plugin API of `kd`.
//!
//! A distillation method is a type implementing [`Method`], registered with
//! [`register_method!`]. When a run is planned the engine calls
//! [`Method::build`] with a [`BuildCx`]: the method states everything it needs
//! (feature taps, gradient taps, adversarial views, contrast indices, its own
//! trainable modules) as typed requests and keeps the handles it gets back.
//! Each training step the engine answers those requests in a [`StepIo`] and
//! the method returns named loss terms. Nothing in this crate runs training.

pub mod dist;
mod error;
mod method;
mod progress;
mod registry;
mod tap;
pub mod testing;

pub use error::{KdError, Result};
pub use method::{
    AttackSpec, AugmentPolicy, AugmentSpec, BuildCx, ContrastSpec, DynMethod, GradRef, Losses,
    Method, Needs, StepIo, TapRef, ViewRef, ViewTaps, set_scheduled_field,
};
pub use progress::Progress;
pub use registry::{ConfigField, MethodEntry, Registry, build_config};
pub use tap::{Side, Tap, TapShapes, Taps};

// Plugins register through `register_method!` and never name `inventory`.
#[doc(hidden)]
pub use inventory;
#[doc(hidden)]
pub use serde_json;
