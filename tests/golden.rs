//! Every golden fixture under tests/golden/fixtures (written by the PyTorch
//! reference script tests/golden/gen.py) goes through `kd probe loss`, or
//! `kd probe step` for step fixtures (metadata `probe = step`: a training
//! step on networks, for methods that need them); the loss must match to
//! 1e-5 relative, gradients, buffers and method state to 1e-4.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kd_engine::tensors;
use tch::Tensor;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fixtures");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            // Model and checkpoint-import fixtures have tests of their own.
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with("model_") && !name.starts_with("pth_")
        })
        .collect();
    all.sort();
    all
}

/// max |a - b| / (atol + rtol |b|) must stay below 1. The absolute floor
/// is at most a tenth of the relative tolerance at the tensor's largest
/// entry: a fixed 1e-6 would accept anything for gradients that are
/// themselves around 1e-6 (Sobolev's are).
fn close(a: &Tensor, b: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if a.size() != b.size() {
        return Err(format!("shape {:?} != expected {:?}", a.size(), b.size()));
    }
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    let scale = if b.numel() == 0 {
        0.0
    } else {
        b.abs().max().double_value(&[])
    };
    let atol = atol.min(0.1 * rtol * scale);
    if (&a - &b).abs().max().double_value(&[]) == 0.0 {
        return Ok(());
    }
    let err = ((&a - &b).abs() / (b.abs() * rtol + atol))
        .max()
        .double_value(&[]);
    if err.is_finite() && err <= 1.0 {
        Ok(())
    } else {
        let diff = (&a - &b).abs().max().double_value(&[]);
        Err(format!(
            "max abs diff {diff:e} exceeds tolerance (ratio {err:.3})"
        ))
    }
}

fn check(fixture: &Path, out_dir: &Path) -> Result<(), String> {
    let out = out_dir.join(fixture.file_name().unwrap());
    let want = tensors::read(fixture).map_err(|e| e.to_string())?;
    let step = want.metadata.get("probe").is_some_and(|p| p == "step");
    kd_cli::run([
        "kd",
        "probe",
        if step { "step" } else { "loss" },
        "--fixture",
        fixture.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .map_err(|e| format!("{e:#}"))?;
    let got = tensors::read(&out).map_err(|e| e.to_string())?;
    let get = |name: &str| {
        got.get(name)
            .ok_or_else(|| format!("probe output lacks `{name}`"))
    };
    let mut checked = 0;
    for (name, expected) in want.with_prefix("expect/") {
        let (rtol, atol) = if name == "loss" {
            (1e-5, 1e-7)
        } else {
            (1e-4, 1e-6)
        };
        close(get(name)?, expected, rtol, atol).map_err(|e| format!("{name}: {e}"))?;
        checked += 1;
    }
    if want.get("expect/loss").is_none() || checked < 2 {
        return Err("fixture has no expected loss and gradients".into());
    }
    // A step fixture covers every student parameter: none may go unchecked.
    if step {
        let unchecked: Vec<&str> = got
            .tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| n.starts_with("grad/") || n.starts_with("buffers/"))
            .filter(|n| want.get(&format!("expect/{n}")).is_none())
            .collect();
        if !unchecked.is_empty() {
            return Err(format!(
                "the fixture has no expectation for {}",
                unchecked.join(", ")
            ));
        }
    }
    Ok(())
}

#[test]
fn golden_fixtures_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let filter = std::env::var("KD_GOLDEN").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in fixtures() {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        if filter
            .as_ref()
            .is_some_and(|only| !stem.starts_with(only.as_str()))
        {
            continue;
        }
        ran += 1;
        if let Err(e) = check(&f, dir.path()) {
            failures.push(format!("{stem}: {e}"));
        }
    }
    assert!(ran > 0, "no fixtures found");
    assert!(
        failures.is_empty(),
        "{} of {ran} fixtures differ from PyTorch:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Convolution kernels (4-d weights) that a step fixture gives `side`.
fn convolutions(file: &tensors::TensorFile, side: &str) -> usize {
    file.with_prefix(&format!("{side}.weights/"))
        .filter(|(_, t)| t.dim() == 4)
        .count()
}

/// Every method checked on networks has a step fixture whose teacher is
/// deeper than its student: one as deep has no block before the last of a
/// stage, so such fixtures never send a teacher's gradient tap or attack
/// through those blocks, nor take as many ReLU decisions as a deep teacher
/// does (the reason step fixtures are checked for their conditioning).
#[test]
fn step_methods_have_a_fixture_with_a_deeper_teacher() {
    let mut deeper: BTreeMap<String, bool> = BTreeMap::new();
    for f in fixtures() {
        let file = tensors::read(&f).unwrap();
        if !matches!(file.metadata.get("probe"), Some(p) if p == "step") {
            continue;
        }
        let deep = convolutions(&file, "teacher") > convolutions(&file, "student");
        *deeper.entry(file.metadata["method"].clone()).or_default() |= deep;
    }
    assert!(!deeper.is_empty(), "no step fixtures found");
    let missing: Vec<&str> = deeper
        .iter()
        .filter(|(_, deep)| !**deep)
        .map(|(m, _)| m.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "no step fixture with a teacher deeper than the student for {}",
        missing.join(", ")
    );
}
