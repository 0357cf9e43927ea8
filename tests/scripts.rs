//! The benchmark scripts run end to end at CI size (no timing is asserted):
//! `scripts/bench-vs-torch --smoke` (kd and the PyTorch loop compute the
//! same first step), `scripts/bench-sweep --smoke` (every run of a
//! lockstep sweep equals its solo run) and `scripts/bench-data --smoke`
//! (kd's ImageFolder pipeline and torchvision's DataLoader on 16 JPEGs,
//! also with timm's RandAugment),
//! `scripts/bench-cache --smoke` (a cached run equals its online run),
//! `scripts/bench-bf16 --smoke` (kd's three precisions and PyTorch's fp32
//! and bf16 variants start from the same first loss).
//! They drive the `kd` binary that `make test` builds first.

use std::process::Command;

use kd_tests::{kd, root};

fn script(name: &str, extra: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root().join("scripts").join(name))
        .args(["--smoke", "--kd"])
        .arg(kd())
        .arg("--out")
        .arg(out.path())
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{name} failed:\n{text}");
    text
}

#[test]
fn bench_vs_torch_runs_both_sides_on_the_same_step() {
    let text = script("bench-vs-torch", &["--threads", "1"]);
    assert!(text.contains("kd/eager"), "{text}");
    assert!(text.contains("resnet20->resnet8"), "{text}");
}

#[test]
fn bench_sweep_runs_equal_their_solo_runs() {
    let text = script("bench-sweep", &["--threads", "1"]);
    assert!(
        text.contains("every run equals its solo run bit for bit"),
        "{text}"
    );
    assert!(text.contains("sweep of 5 runs"), "{text}");
}

#[test]
fn bench_data_times_kd_and_torchvision_on_the_same_images() {
    let text = script("bench-data", &[]);
    assert!(text.contains("16 training images"), "{text}");
    assert!(
        text.contains("kd img/s") && text.contains("torchvision"),
        "{text}"
    );
}

#[test]
fn bench_data_runs_timms_randaugment_on_both_sides() {
    let text = script("bench-data", &["--aa", "rand-m9-inc1"]);
    assert!(
        text.contains("--aa rand-m9-inc1"),
        "kd ran without it:\n{text}"
    );
    assert!(text.contains("torchvision"), "{text}");
}

#[test]
fn bench_cache_replays_the_online_run_exactly() {
    let text = script("bench-cache", &["--threads", "1"]);
    assert!(
        text.contains("cached weights equal the online run's byte for byte"),
        "{text}"
    );
    assert!(text.contains("sweep of 7 logit methods"), "{text}");
}

#[test]
fn bench_bf16_runs_every_precision_on_both_sides() {
    let text = script("bench-bf16", &["--threads", "1"]);
    for row in [
        "kd fp32",
        "kd teacher-bf16",
        "kd bf16",
        "torch autocast",
        "torch eager",
    ] {
        assert!(text.contains(row), "no `{row}` row:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
}

/// docs/methods.md is what `scripts/methods-doc` assembles from
/// docs/methods.d/, not a page edited apart from its rows.
#[test]
fn the_methods_page_is_assembled_from_its_rows() {
    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("methods.md");
    let run = Command::new(root().join("scripts/methods-doc"))
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let committed = std::fs::read_to_string(root().join("docs/methods.md")).unwrap();
    assert_eq!(
        std::fs::read_to_string(&page).unwrap(),
        committed,
        "docs/methods.md differs from scripts/methods-doc's output: edit docs/methods.d/ and run the script"
    );
}
