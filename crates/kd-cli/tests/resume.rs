//! A distillation run killed with SIGKILL in the middle of an epoch and then
//! resumed must end with exactly the weights of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KD: &str = env!("CARGO_BIN_EXE_kd");

fn kd(args: &[&str]) -> Command {
    let mut c = Command::new(KD);
    c.args(args)
        .args(["--device", "cpu"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let small = ["--train-size", "320", "--batch-size", "16"];
    let status = kd(&[
        "train-teacher",
        "--arch",
        "resnet8",
        "--epochs",
        "1",
        "--out",
        out,
        "--name",
        "t",
    ])
    .args(small)
    .status()
    .unwrap();
    assert!(status.success());
    let teacher = dir.path().join("t_s0/train.last.safetensors");
    let distill = |name: &str| {
        let mut c = kd(&[
            "distill",
            "--teacher",
            "resnet8",
            "--teacher-weights",
            teacher.to_str().unwrap(),
            "--student",
            "resnet8",
        ]);
        c.args([
            "--method", "st:0.9", "--method", "sp:3000", "--ce", "0.1", "--epochs", "3", "--out",
            out, "--name", name,
        ])
        .args(small);
        c
    };
    assert!(distill("a").status().unwrap().success());

    let mut child = distill("b").spawn().unwrap();
    let epochs = dir.path().join("b_s0/epochs.jsonl");
    let started = Instant::now();
    while lines(&epochs) < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "first epoch never finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Some steps into the second epoch.
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        lines(&epochs),
        1,
        "the kill must land inside the second epoch"
    );

    assert!(distill("b").arg("--resume").status().unwrap().success());
    let a = std::fs::read(dir.path().join("a_s0/distill.last.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b_s0/distill.last.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    assert_eq!(lines(&epochs), 3);
}
