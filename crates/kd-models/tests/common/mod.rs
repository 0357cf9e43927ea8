//! Fixture access shared by the integration tests. The fixtures come from
//! tests/golden/models.py (PyTorch); nothing here derives expectations from
//! the Rust code under test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The `__metadata__` of a safetensors file (tch does not expose it): an
/// 8-byte little-endian header length, then the JSON header.
pub fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_value(header["__metadata__"].clone()).unwrap()
}

pub fn zoo_table() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture("model_zoo.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Elementwise |got - want| <= 1e-4 + 1e-4 |want|.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let got = got.to_kind(tch::Kind::Float);
    let want = want.to_kind(tch::Kind::Float);
    let diff = (&got - &want).abs();
    let tol = want.abs() * 1e-4 + 1e-4;
    let ok = bool::try_from(diff.le_tensor(&tol).all()).unwrap();
    let max = f64::try_from(diff.max()).unwrap();
    assert!(ok, "{what}: max |diff| {max:.3e}");
}

pub fn is_ignored(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}
