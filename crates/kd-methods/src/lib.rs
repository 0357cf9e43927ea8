//! Links every method plugin, so that its `register_method!` reaches the
//! registry. Adding a method is one line here (and one in Cargo.toml).

/// Forces the plugins to be linked; call once before reading the registry.
pub fn link() {}

pub use kd_plugin_ce;
pub use kd_plugin_logits;
pub use kd_plugin_st;
