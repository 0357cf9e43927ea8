//! `kd report` over run folders as users leave them (copies of a run, a
//! rerun of one seed, the same plan trained by two ranks), and what a run
//! prints and logs: metric names, epochs against steps, no top-5 for fewer
//! than 6 classes.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A plan that trains in a second or two: resnet8 on 64 synthetic images
/// of 4 classes, two steps per epoch.
const PLAN: &str = "
name: tiny_s0
seed: 0
device: cpu
data:
  source:
    kind: synthetic
    classes: 4
    train_size: 64
    test_size: 64
  batch_size: 32
student:
  arch: resnet8
stages:
- name: train
  epochs: 2
  methods:
  - method: ce
";

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Trains [`PLAN`] into `out`; returns the run's folder.
fn train(dir: &Path, out: &Path) -> PathBuf {
    let plan = dir.join("plan.yaml");
    std::fs::write(&plan, PLAN).unwrap();
    kd_cli::run([
        "kd".to_string(),
        "run".into(),
        s(&plan),
        "--out".into(),
        s(out),
        "--tracking-uri".into(),
        "none".into(),
    ])
    .unwrap();
    out.join("tiny_s0")
}

/// `kd report runs --out rep`; returns `report.md`.
fn report(runs: &Path, rep: &Path) -> String {
    kd_cli::run([
        "kd".to_string(),
        "report".into(),
        s(runs),
        "--out".into(),
        s(rep),
    ])
    .unwrap();
    std::fs::read_to_string(rep.join("report.md")).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Best and last test top-1 of a run's last epoch, read from its
/// `epochs.jsonl` rather than from the report.
fn finals(run: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(run.join("epochs.jsonl")).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let r = &last["record"];
    (
        r["best_top1"].as_f64().unwrap(),
        r["test_top1"].as_f64().unwrap(),
    )
}

#[test]
fn kd_report_counts_each_run_once_flags_reruns_and_keeps_world_sizes_apart() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let rep = dir.path().join("rep");
    let a = train(dir.path(), &runs.join("a"));
    let (best, last) = finals(&a);

    // One run in three `--out` folders is one run, not three seeds, and
    // its row carries no `_s0`.
    copy_dir(&a, &runs.join("b/tiny_s0"));
    copy_dir(&a, &runs.join("c/tiny_s0"));
    let md = report(&runs, &rep);
    let row = format!("| tiny | 1 (0) | {best:.2} | {last:.2} |");
    assert!(md.contains(&row), "expected\n{row}\nin\n{md}");
    assert_eq!(md.lines().count(), 3, "one row: {md}");

    // A second run of the same plan and seed is another run: counted, and
    // flagged in the row and in a note naming both folders.
    let d = train(dir.path(), &runs.join("d"));
    let md = report(&runs, &rep);
    let row = format!(
        "| tiny | 2 (0, 0), repeated seed 0 (see note) | {best:.2} ± 0.00 | {last:.2} ± 0.00 |"
    );
    assert!(md.contains(&row), "expected\n{row}\nin\n{md}");
    let note = format!(
        "Note: `tiny` holds 2 different runs of seed 0 ({}, {}):",
        a.display(),
        d.display()
    );
    assert!(md.contains(&note), "expected\n{note}\nin\n{md}");

    // The plan trained by two ranks (effective batch 64) is a row of its
    // own, and the labels say the effective batch that tells them apart.
    let e = train(dir.path(), &runs.join("e"));
    let plan = std::fs::read_to_string(e.join("plan.yaml")).unwrap();
    assert!(plan.contains("world_size: 1"), "{plan}");
    std::fs::write(
        e.join("plan.yaml"),
        plan.replace("world_size: 1", "world_size: 2"),
    )
    .unwrap();
    let md = report(&runs, &rep);
    assert!(
        md.contains("| tiny (batch 32) | 2 (0, 0), repeated seed 0 (see note) |"),
        "{md}"
    );
    let row = format!("| tiny (batch 64) | 1 (0) | {best:.2} | {last:.2} |");
    assert!(md.contains(&row), "expected\n{row}\nin\n{md}");
}

#[test]
fn a_run_of_4_classes_prints_and_logs_no_top5_and_plain_metric_names() {
    let dir = tempfile::tempdir().unwrap();
    let run = train(dir.path(), &dir.path().join("runs"));

    let console = std::fs::read_to_string(run.join("console.log")).unwrap();
    assert!(console.contains(" epoch   2 "), "{console}");
    assert!(!console.contains("top-5"), "{console}");
    let epochs = std::fs::read_to_string(run.join("epochs.jsonl")).unwrap();
    assert!(!epochs.contains("top5"), "{epochs}");

    let h = kd_tracking::metric_history(&run).unwrap();
    let keys: Vec<&str> = h.keys().map(String::as_str).collect();
    assert!(!keys.iter().any(|k| k.contains("top5")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.ends_with("ce/ce")), "{keys:?}");
    // Epoch metrics at the epoch index, step metrics at the global step
    // (two steps per epoch).
    let steps = |key: &str| -> Vec<i64> {
        let points = h.get(key).unwrap_or_else(|| panic!("{key} in {keys:?}"));
        points.iter().map(|p| p.0).collect()
    };
    assert_eq!(steps("epoch/loss/ce"), [0, 1]);
    assert_eq!(steps("epoch/test_acc_top1"), [0, 1]);
    assert_eq!(steps("loss/ce"), [0, 1, 2, 3]);
}
