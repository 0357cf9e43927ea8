//! kd's Vision Transformers and Swin against timm: for every case of
//! tests/vit/timm_ref.py (the bootstrap venv's timm, at test time), kd
//! builds the model from the same name and keyword arguments, loads
//! timm's `state_dict` as it is, and `kd probe model` (eval mode) must give
//! timm's logits, class token, last block's tokens, and for distilled
//! DeiTs the distillation token and head — also where weights made for
//! 224 px are loaded into a model for another image, patch or window size
//! (as timm's `checkpoint_filter_fn`s adapt them), and a Swin checkpoint in
//! the original repository's layout. For Swin: logits, the pooled
//! features, every stage's map and the last block's tokens, at 224 px and
//! CIFAR sizes, with shifted, whole-map and padded windows.

use std::path::Path;
use std::process::Command;

use kd_engine::tensors;
use kd_tests::root;

fn close(name: &str, got: &tch::Tensor, want: &tch::Tensor) -> Result<(), String> {
    if got.size() != want.size() {
        return Err(format!(
            "{name}: shape {:?} != timm's {:?}",
            got.size(),
            want.size()
        ));
    }
    let scale = want.abs().max().double_value(&[]).max(1e-6);
    let diff = (got - want).abs().max().double_value(&[]);
    // fp32 through a dozen blocks: relative to the tensor's largest entry.
    if diff <= 2e-5 * scale {
        Ok(())
    } else {
        Err(format!("{name}: max abs diff {diff:e} (scale {scale:e})"))
    }
}

#[test]
fn vits_give_timms_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("python")
        .arg(root().join("tests/vit/timm_ref.py"))
        .arg(dir.path())
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(ok.success(), "tests/vit/timm_ref.py failed");
    let cases = std::fs::read_to_string(dir.path().join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    for line in cases.lines() {
        let [i, name, weights] = line.split('\t').collect::<Vec<_>>()[..] else {
            panic!("cases.txt: {line}")
        };
        let file = |kind: &str| dir.path().join(format!("{i}.{kind}.safetensors"));
        let out = file("kd");
        let args: Vec<String> = [
            "kd",
            "probe",
            "model",
            name,
            "--weights",
            &s(&dir.path().join(weights)),
            "--input",
            &s(&file("input")),
            "--out",
            &s(&out),
            "--num-classes",
            "10",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Err(e) = kd_cli::run(&args) {
            failures.push(format!("{name}: {}", kd_cli::one_line(&e)));
            continue;
        }
        let got = tensors::read(&out).unwrap();
        let want = tensors::read(&file("expect")).unwrap();
        for (tap, w) in &want.tensors {
            match got.get(tap) {
                Some(g) => {
                    if let Err(e) = close(tap, g, w) {
                        failures.push(format!("{name}: {e}"));
                    }
                }
                None => failures.push(format!("{name}: kd gives no tap `{tap}`")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A Swin's arguments are checked by name, and data of another size is
/// refused with the argument that fits.
#[test]
fn swin_refuses_what_does_not_fit_and_says_which_argument() {
    use kd_models::{build, check_name, is_transformer};
    let name = "swin_tiny_patch4_window7_224(img_size=32,patch_size=2,window_size=4)";
    assert!(is_transformer(name));
    check_name(name).unwrap();
    for (bad, want) in [
        (
            "swin_tiny_patch4_window7_224(depth=2)",
            "a Swin takes no argument `depth`",
        ),
        (
            "swin_tiny_patch4_window7_224(img_size=30,patch_size=4)",
            "img_size 30 is not divisible by patch_size 4",
        ),
        (
            "swin_tiny_patch4_window7_224(window_size=0)",
            "window_size must be at least 1",
        ),
        (
            "swin_tiny_patch4_window7_224(embed_dim=64)",
            "do not split evenly",
        ),
    ] {
        let err = check_name(bad).unwrap_err().to_string();
        assert!(err.contains(want), "{bad}: {err}");
    }
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = build(name, &vs.root(), 10).unwrap();
    let probe = tch::Tensor::zeros([1, 3, 64, 64], tch::kind::FLOAT_CPU);
    let err = net.check_input(&probe).unwrap_err().to_string();
    assert!(err.contains("img_size=64"), "{err}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}
