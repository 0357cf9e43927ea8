//! Every crate under plugins/ must be linked into the facade: a plugin that is
//! written but not linked would silently be missing from `kd methods`.

use std::path::Path;

use kd_core::Registry;

#[test]
fn every_plugin_is_registered() {
    kd_methods::link();
    let registry = Registry::global().expect("no duplicate method names");
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&plugins).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("Cargo.toml").exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if registry.get(&name).is_err() {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "plugins not linked into crates/kd-methods: {missing:?}"
    );
}
