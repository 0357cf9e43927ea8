//! The template builds into a `kd` that knows its method: `methods` lists
//! it, and `probe loss` runs it on a fixture written by PyTorch, whose loss
//! and gradient it must match (the check a method author runs first).

use std::path::Path;
use std::process::Command;

const KD: &str = env!("CARGO_BIN_EXE_kd-template");

#[test]
fn kd_methods_lists_the_template_method() {
    let out = Command::new(KD).arg("methods").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.lines()
            .any(|l| l.starts_with("cos_logits") && l.contains("template")),
        "{text}"
    );
    // kd's own methods are still there.
    assert!(text.lines().any(|l| l.starts_with("st ")), "{text}");
}

/// The expected values come from PyTorch (the bootstrap venv's `python`),
/// never from the code under test.
#[test]
fn probe_loss_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("cos_logits.safetensors");
    let script = format!(
        r#"
import json, torch
from safetensors.torch import save_file
torch.manual_seed(0)
s = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
t = torch.randn(8, 10, dtype=torch.float64)
loss = (1 - torch.nn.functional.cosine_similarity(s, t / 2.0, dim=1, eps=1e-8)).mean()
loss.backward()
save_file({{
    "student/logits": s.detach().float(), "teacher/logits": t.float(),
    "batch/target": torch.randint(0, 10, (8,)),
    "expect/loss": loss.detach().float(), "expect/grad/student/logits": s.grad.float(),
}}, "{}", metadata={{"method": "cos_logits", "params": json.dumps({{"T": 2.0}})}})
"#,
        fixture.display()
    );
    let py = Command::new("python")
        .args(["-c", &script])
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(py.success());
    let out = dir.path().join("out.safetensors");
    let run = Command::new(KD)
        .args(["probe", "loss", "--fixture"])
        .arg(&fixture)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = kd_engine::tensors::read(&out).unwrap();
    let want = kd_engine::tensors::read(Path::new(&fixture)).unwrap();
    for (g, w) in [
        ("loss", "expect/loss"),
        ("grad/student/logits", "expect/grad/student/logits"),
    ] {
        let (a, b) = (got.get(g).unwrap(), want.get(w).unwrap());
        let err = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "{g}: off by {err:e} (scale {scale:e})");
    }
}
