//! The engine: turns a validated plan into training. It knows taps, gradient
//! taps, adversarial views, memory banks and stages; it never names a method.

mod error;
pub mod probe;
pub mod tensors;

pub use error::{EngineError, Result};
