//! kd's CPU autocast against PyTorch's: the forward of
//! `cpu_autocast_ref.py` (conv, BatchNorm, ReLU, pooling, linear, MSE) on
//! the same weights and input must give what `torch.autocast("cpu",
//! dtype=torch.bfloat16)` gave in the bootstrap venv's PyTorch, computed at
//! test time: the same ops in the same precisions, hence the same bits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use tch::{Kind, Reduction, Tensor};

fn reference() -> HashMap<String, Tensor> {
    let dir = std::env::temp_dir().join(format!("kd-cpu-autocast-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cpu_autocast_ref.py");
    let ok = Command::new("python")
        .arg(&script)
        .arg(&dir)
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(ok.success(), "{} failed", script.display());
    let t = Tensor::read_safetensors(dir.join("ref.safetensors")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    t.into_iter().collect()
}

/// The reference script's forward, op for op.
fn forward(t: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let y = t["x"].conv2d(&t["conv_w"], Some(&t["conv_b"]), [1, 1], [1, 1], [1, 1], 1);
    let y = Tensor::batch_norm(
        &y,
        Some(&t["bn_w"]),
        Some(&t["bn_b"]),
        Some(&t["bn_mean"]),
        Some(&t["bn_var"]),
        false,
        0.1,
        1e-5,
        false,
    );
    let y = y.relu().mean_dim([2i64, 3].as_slice(), false, None::<Kind>);
    let out = y.linear(&t["fc_w"], Some(&t["fc_b"]));
    let loss = out.mse_loss(&t["target"], Reduction::Mean);
    (out, loss)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn cpu_autocast_matches_torch_autocast() {
    let t = reference();
    let (out, loss) = kd_aten::cpu_autocast(|| forward(&t));
    assert_eq!(out.kind(), Kind::BFloat16, "the linear runs in bf16");
    assert_eq!(
        loss.kind(),
        Kind::Float,
        "MSE stays in fp32 under CPU autocast"
    );
    let d = max_abs_diff(&out, &t["out"]);
    assert_eq!(d, 0.0, "bf16 output differs from torch.autocast's by {d:e}");
    let (l, want) = (loss.double_value(&[]), t["loss"].double_value(&[0]));
    assert!(
        (l - want).abs() <= 1e-6 * want.abs(),
        "loss {l} vs torch.autocast's {want}"
    );
    // The check can fail: fp32 (no autocast) is a bf16 rounding away.
    let (fp32, _) = forward(&t);
    assert!(max_abs_diff(&fp32, &t["out_fp32"]) < 1e-5);
    assert!(max_abs_diff(&fp32, &t["out"]) > 1e-4);
    assert!(!kd_aten::cpu_autocast_enabled());
}
