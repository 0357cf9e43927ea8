//! A run records the code that made it: the commit the `kd` binary was
//! built from, wherever the command is started.

use std::path::Path;
use std::process::Command;

const KD: &str = env!("CARGO_BIN_EXE_kd");

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn git_commit_tag_is_the_binarys_not_the_working_folders() {
    let elsewhere = tempfile::tempdir().unwrap();
    git(elsewhere.path(), &["init", "-q"]);
    git(
        elsewhere.path(),
        &["commit", "-q", "--allow-empty", "-m", "other"],
    );
    let other = git(elsewhere.path(), &["rev-parse", "HEAD"]);
    let ours = git(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &["rev-parse", "HEAD"],
    );
    assert_ne!(other, ours);

    let out = elsewhere.path().join("runs");
    let status = Command::new(KD)
        .args(["train-teacher", "--arch", "resnet8", "--epochs", "1"])
        .args([
            "--train-size",
            "32",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ])
        .args(["--name", "t", "--out", out.to_str().unwrap()])
        .env_remove("MLFLOW_TRACKING_URI")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let journal = std::fs::read_to_string(out.join("t_s0/journal.jsonl")).unwrap();
    let start: serde_json::Value = serde_json::from_str(journal.lines().next().unwrap()).unwrap();
    assert_eq!(start["tags"]["kd.git_commit"], ours.as_str(), "{start}");
}
