//! Links every method plugin, so that its `register_method!` reaches the
//! registry. Adding a method is one line here (and one in Cargo.toml).

/// Forces the plugins to be linked; call once before reading the registry.
pub fn link() {}

pub use kd_plugin_ab;
pub use kd_plugin_afd;
pub use kd_plugin_at;
pub use kd_plugin_bss;
pub use kd_plugin_cc;
pub use kd_plugin_ce;
pub use kd_plugin_crd;
pub use kd_plugin_ctkd;
pub use kd_plugin_deit;
pub use kd_plugin_dist;
pub use kd_plugin_dkd;
pub use kd_plugin_dml;
pub use kd_plugin_fitnet;
pub use kd_plugin_fsp;
pub use kd_plugin_ft;
pub use kd_plugin_ickd;
pub use kd_plugin_irg;
pub use kd_plugin_kdsvd;
pub use kd_plugin_logits;
pub use kd_plugin_lwm;
pub use kd_plugin_mlkd;
pub use kd_plugin_nst;
pub use kd_plugin_ofa;
pub use kd_plugin_ofd;
pub use kd_plugin_pad;
pub use kd_plugin_pkt;
pub use kd_plugin_reviewkd;
pub use kd_plugin_rkd;
pub use kd_plugin_skd;
pub use kd_plugin_sobolev;
pub use kd_plugin_sp;
pub use kd_plugin_srd;
pub use kd_plugin_st;
pub use kd_plugin_torchscript;
pub use kd_plugin_ttm;
pub use kd_plugin_vid;
pub use kd_plugin_wttm;
