//! Weights saved by Python's `torch.save` load without Python: a bare
//! state_dict, and RepDistiller's checkpoint dict (model wrapped in
//! DataParallel, optimizer state beside it). Written by
//! tests/golden/pth.py, with the same weights as safetensors to compare.

use std::path::{Path, PathBuf};

use tch::{Device, nn::VarStore};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/fixtures")
        .join(name)
}

fn loaded(path: &Path) -> VarStore {
    let mut vs = VarStore::new(Device::Cpu);
    kd_models::build("resnet8", &vs.root(), 10).unwrap();
    kd_models::load_weights(&mut vs, path).unwrap_or_else(|e| panic!("{e}"));
    vs
}

fn assert_same(a: &VarStore, b: &VarStore) {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    for (name, x) in &va {
        assert!(x.equal(&vb[name]), "{name} differs");
    }
}

#[test]
fn a_bare_state_dict_loads_as_its_safetensors_twin() {
    let pth = loaded(&fixture("pth_resnet8_bare.pth"));
    assert_same(&pth, &loaded(&fixture("pth_resnet8.safetensors")));
}

#[test]
fn a_checkpoint_dict_with_data_parallel_keys_loads_its_model() {
    let pth = loaded(&fixture("pth_resnet8_checkpoint.pth"));
    assert_same(
        &pth,
        &loaded(&fixture("pth_resnet8_checkpoint.safetensors")),
    );
    // And not the other weights: the two fixtures differ by an SGD step.
    let bare = loaded(&fixture("pth_resnet8_bare.pth"));
    assert!(!pth.variables()["conv1.weight"].equal(&bare.variables()["conv1.weight"]));
}

#[test]
fn a_checkpoint_of_another_model_says_what_does_not_fit() {
    let mut vs = VarStore::new(Device::Cpu);
    kd_models::build("resnet20", &vs.root(), 10).unwrap();
    let e = kd_models::load_weights(&mut vs, &fixture("pth_resnet8_checkpoint.pth")).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn the_ordered_dict_of_state_dict_loads_as_it_is_saved() {
    // `torch.save(model.state_dict())`: an OrderedDict with `_metadata`,
    // which libtorch's unpickler alone turns into None.
    let pth = loaded(&fixture("pth_resnet8_ordered.pth"));
    assert_same(&pth, &loaded(&fixture("pth_resnet8.safetensors")));
}

#[test]
fn a_state_dict_under_the_state_dict_key_loads() {
    let pth = loaded(&fixture("pth_resnet8_state_dict.pth"));
    assert_same(&pth, &loaded(&fixture("pth_resnet8.safetensors")));
}

#[test]
fn half_precision_weights_load_into_the_float_model() {
    let pth = loaded(&fixture("pth_resnet8_fp16.pth"));
    let twin = loaded(&fixture("pth_resnet8_fp16.safetensors"));
    assert_same(&pth, &twin);
    assert!(
        pth.variables()
            .values()
            .all(|t| t.kind() != tch::Kind::Half),
        "fp16 values are widened into the model's own kinds"
    );
}

#[test]
fn a_torch_save_file_without_tensors_says_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.pth");
    // torch.save({'epoch': 3, 'acc': 71.2}) from Python 3.11 / torch 2.11,
    // written by tests/golden/pth.py.
    std::fs::copy(fixture("pth_no_tensors.pth"), &path).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    kd_models::build("resnet8", &vs.root(), 10).unwrap();
    let e = kd_models::load_weights(&mut vs, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds no tensors") && e.contains("a dict with keys epoch acc"),
        "{e}"
    );
}

/// `torch.save(model)` pickles the module's class, which libtorch cannot
/// rebuild: the error's conversion command must work with the venv's torch
/// (2.11 loads `weights_only=True` by default, which refuses modules).
#[test]
fn a_whole_pickled_model_gets_a_conversion_command_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let safetensors = fixture("pth_resnet8.safetensors");
    // A module class of the user's own, holding resnet8's tensors under
    // their state_dict names, saved whole.
    std::fs::write(
        dir.path().join("holder.py"),
        "import torch\n\
         class Holder(torch.nn.Module):\n\
         \x20   def __init__(self, sd):\n\
         \x20       super().__init__()\n\
         \x20       for key, t in sd.items():\n\
         \x20           *path, leaf = key.split('.')\n\
         \x20           m = self\n\
         \x20           for p in path:\n\
         \x20               if not hasattr(m, p):\n\
         \x20                   m.add_module(p, torch.nn.Module())\n\
         \x20               m = getattr(m, p)\n\
         \x20           if t.is_floating_point() and 'running' not in leaf:\n\
         \x20               m.register_parameter(leaf, torch.nn.Parameter(t))\n\
         \x20           else:\n\
         \x20               m.register_buffer(leaf, t)\n",
    )
    .unwrap();
    let save = format!(
        "import torch, safetensors.torch as st, holder; torch.save(holder.Holder(st.load_file('{}')), 'whole.pth')",
        safetensors.display()
    );
    let ok = std::process::Command::new("python")
        .args(["-c", &save])
        .current_dir(dir.path())
        .status()
        .expect("python (the bootstrap venv) runs");
    assert!(ok.success(), "writing the whole-model pickle failed");

    let whole = dir.path().join("whole.pth");
    let mut vs = VarStore::new(Device::Cpu);
    kd_models::build("resnet8", &vs.root(), 10).unwrap();
    let msg = kd_models::load_weights(&mut vs, &whole)
        .unwrap_err()
        .to_string();
    let command = msg
        .split_once("with: ")
        .map(|(_, c)| c.split(" (reading it as one failed").next().unwrap_or(c))
        .unwrap_or_else(|| panic!("no conversion command in: {msg}"));
    let ok = std::process::Command::new("bash")
        .args(["-c", command])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(ok.success(), "the suggested command failed: {command}");
    let converted = loaded(&dir.path().join("whole.pth.safetensors"));
    assert_same(&converted, &loaded(&safetensors));
}
