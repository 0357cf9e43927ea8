//! kd's Vision Transformers against timm: for every case of
//! tests/vit/timm_ref.py (the bootstrap venv's timm, at test time), kd
//! builds the model from the same name and keyword arguments, loads
//! timm's `state_dict` as it is, and `kd probe model` (eval mode) must give
//! timm's logits, class token, last block's tokens, and for distilled
//! DeiTs the distillation token and head — also where weights made for
//! 224 px are loaded into a model for another size (`pos_embed` resampled
//! as timm's `checkpoint_filter_fn` does).

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
        let (i, name) = line.split_once('\t').unwrap();
        let file = |kind: &str| dir.path().join(format!("{i}.{kind}.safetensors"));
        let out = file("kd");
        let args: Vec<String> = [
            "kd",
            "probe",
            "model",
            name,
            "--weights",
            &s(&file("weights")),
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

fn s(p: &Path) -> String {
    p.display().to_string()
}
