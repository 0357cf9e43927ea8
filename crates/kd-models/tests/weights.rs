//! load_weights / save_weights on the PyTorch-written resnet20 fixture.

mod common;

use std::path::Path;

use common::{fixture, read};
use kd_models::{ModelError, build, load_weights, save_weights};
use tch::nn::VarStore;
use tch::{Device, Tensor};

fn resnet20() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    build("resnet20", &vs.root(), 10).unwrap();
    vs
}

fn torch_weights() -> Vec<(String, Tensor)> {
    let mut w: Vec<(String, Tensor)> = read(&fixture("model_resnet20.safetensors"))
        .into_iter()
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn write(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> std::path::PathBuf {
    let path = dir.join(name);
    Tensor::write_safetensors(tensors, &path).unwrap();
    path
}

fn assert_same_values(a: &VarStore, b: &VarStore) {
    let b = b.variables();
    let a = a.variables();
    assert_eq!(a.len(), b.len());
    for (k, v) in a {
        assert!(v.equal(&b[&k]), "{k} differs");
    }
}

#[test]
fn pytorch_state_dict_loads_with_num_batches_tracked_ignored() {
    let mut vs = resnet20();
    load_weights(&mut vs, &fixture("model_resnet20.safetensors")).unwrap();
    let file = torch_weights();
    assert!(
        file.iter().any(|(k, _)| k.ends_with("num_batches_tracked")),
        "fixture lacks the counter"
    );
    let vars = vs.variables();
    for (k, t) in &file {
        if let Some(v) = vars.get(k) {
            assert!(v.equal(t), "{k} not loaded");
        }
    }
}

#[test]
fn data_parallel_prefix_is_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let prefixed: Vec<(String, Tensor)> = torch_weights()
        .into_iter()
        .map(|(k, t)| (format!("module.{k}"), t))
        .collect();
    let path = write(dir.path(), "dp.safetensors", &prefixed);
    let mut a = resnet20();
    load_weights(&mut a, &path).unwrap();
    let mut b = resnet20();
    load_weights(&mut b, &fixture("model_resnet20.safetensors")).unwrap();
    assert_same_values(&a, &b);
}

#[test]
fn mismatch_names_missing_unexpected_and_misshaped_keys_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut w: Vec<(String, Tensor)> = torch_weights()
        .into_iter()
        .filter(|(k, _)| k != "layer2.0.conv1.weight")
        .collect();
    w.push((
        "extra.weight".into(),
        Tensor::zeros([3], (tch::Kind::Float, Device::Cpu)),
    ));
    for (k, t) in w.iter_mut() {
        if k == "fc.weight" {
            *t = t.narrow(0, 0, 5).contiguous();
        }
    }
    let path = write(dir.path(), "bad.safetensors", &w);
    let mut vs = resnet20();
    let before = vs.variables()["fc.bias"].copy();
    let err = load_weights(&mut vs, &path).unwrap_err();
    assert!(matches!(err, ModelError::Mismatch { .. }));
    let msg = err.to_string();
    assert!(msg.contains("1 missing: layer2.0.conv1.weight"), "{msg}");
    assert!(msg.contains("1 unexpected: extra.weight"), "{msg}");
    assert!(
        msg.contains("fc.weight (file [5, 64], model [10, 64])"),
        "{msg}"
    );
    assert!(
        before.equal(&vs.variables()["fc.bias"]),
        "a failed load changed the model"
    );
}

#[test]
fn long_lists_are_cut_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<(String, Tensor)> = torch_weights()
        .into_iter()
        .filter(|(k, _)| k == "fc.bias")
        .collect();
    let path = write(dir.path(), "one.safetensors", &w);
    let mut vs = resnet20();
    let total = vs.variables().len();
    let msg = load_weights(&mut vs, &path).unwrap_err().to_string();
    // Sorted: the first names listed are the alphabetically first keys.
    assert!(
        msg.contains(&format!(
            "{} missing: bn1.bias, bn1.running_mean",
            total - 1
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("and {} more", total - 1 - 10)),
        "{msg}"
    );
}

#[test]
fn unreadable_file_is_an_error() {
    let mut vs = resnet20();
    let err = load_weights(&mut vs, Path::new("/nonexistent/w.safetensors")).unwrap_err();
    assert!(matches!(err, ModelError::Read { .. }), "{err}");
}

#[test]
fn save_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    tch::manual_seed(3);
    let mut a = resnet20();
    load_weights(&mut a, &fixture("model_resnet20.safetensors")).unwrap();
    save_weights(&a, &path).unwrap();
    let saved: Vec<String> = {
        let mut k: Vec<String> = read(&path).into_keys().collect();
        k.sort();
        k
    };
    let mut vars: Vec<String> = a.variables().into_keys().collect();
    vars.sort();
    assert_eq!(saved, vars);
    let mut b = resnet20();
    load_weights(&mut b, &path).unwrap();
    assert_same_values(&a, &b);
}

/// Weights for another class count: refused as they are; with
/// `reset_classifier`, everything but the classifier loads (resnet's `fc`,
/// a distilled DeiT's `head` and `head_dist`) and the classifier keeps its
/// fresh initialisation.
#[test]
fn reset_classifier_loads_all_but_the_classifier() {
    use kd_models::{LoadOptions, load_weights_with};
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "r20.safetensors", &torch_weights());
    for (arch, classes, heads) in [
        ("resnet20", 10, &["fc."][..]),
        (
            "deit_tiny_distilled_patch16_224(img_size=32,patch_size=8,depth=2)",
            10,
            &["head.", "head_dist."][..],
        ),
    ] {
        let file = if arch == "resnet20" {
            file.clone()
        } else {
            let src = VarStore::new(Device::Cpu);
            build(arch, &src.root(), classes).unwrap();
            let path = dir.path().join("deit.safetensors");
            save_weights(&src, &path).unwrap();
            path
        };
        let mut vs = VarStore::new(Device::Cpu);
        build(arch, &vs.root(), 7).unwrap();
        let fresh: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
        let err = load_weights(&mut vs, &file).unwrap_err();
        assert!(matches!(err, ModelError::Mismatch { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("{}weight", heads[0])),
            "{err}"
        );
        let opts = LoadOptions {
            reset_classifier: true,
        };
        load_weights_with(&mut vs, &file, opts).unwrap();
        let saved = read(&file);
        let now = vs.variables();
        for (k, before) in &fresh {
            let is_head = heads.iter().any(|h| k.starts_with(h));
            if is_head {
                assert!(
                    now[k].equal(before),
                    "{arch}: {k} should keep its fresh values"
                );
                assert_eq!(now[k].size()[0], 7, "{arch}: {k}");
            } else {
                assert!(
                    now[k].equal(&saved[k]),
                    "{arch}: {k} not loaded from the file"
                );
            }
        }
    }
}
