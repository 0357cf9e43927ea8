//! Data-parallel training over Gloo on loopback: two ranks started by hand
//! with torchrun's variables, and under torchrun itself. One run, written
//! by rank 0 alone; a rank that dies stops the other with an error.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KD: &str = env!("CARGO_BIN_EXE_kd");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rank(r: usize, port: u16, out: &Path, epochs: &str) -> Child {
    Command::new(KD)
        .args(["train-teacher", "--arch", "resnet8", "--epochs", epochs])
        .args([
            "--train-size",
            "128",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ])
        .args(["--name", "dp", "--out", out.to_str().unwrap()])
        .env("WORLD_SIZE", "2")
        .env("RANK", r.to_string())
        .env("LOCAL_RANK", r.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("KD_DIST_TIMEOUT", "30")
        .env_remove("MLFLOW_TRACKING_URI")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Files under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn two_ranks_train_one_run_that_rank_0_writes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ranks: Vec<Child> = (0..2).map(|r| rank(r, port, dir.path(), "1")).collect();
    let outs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(files(dir.path()), ["dp_s0"], "one run folder");
    let run = dir.path().join("dp_s0");
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert_eq!(
        journal.matches("\"ev\":\"start\"").count(),
        1,
        "one tracked run"
    );
    assert!(journal.contains("\"kd.world_size\":\"2\""), "{journal}");
    assert_eq!(
        std::fs::read_to_string(run.join("epochs.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    // Rank 1 prints no summary: the table is rank 0's.
    assert!(String::from_utf8_lossy(&outs[0].stdout).contains("best top-1"));
    assert!(
        outs[1].stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&outs[1].stdout)
    );
}

#[test]
fn a_dead_rank_stops_the_other_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let survivor = rank(0, port, dir.path(), "200");
    let mut victim = rank(1, port, dir.path(), "200");
    // Let them join and train a little, then kill rank 1.
    std::thread::sleep(Duration::from_secs(8));
    victim.kill().unwrap();
    let killed = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 went on: {err}");
    assert!(
        took < Duration::from_secs(60),
        "rank 0 took {took:?} to stop"
    );
    assert!(
        err.contains("error: ") && err.contains("distributed"),
        "{err}"
    );
}

#[test]
fn torchrun_launches_the_same_job() {
    let torchrun = std::env::var_os("VIRTUAL_ENV")
        .map(|v| Path::new(&v).join("bin/torchrun"))
        .filter(|p| p.exists())
        .expect("torchrun from the bootstrap venv (source scripts/env.sh)");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(torchrun)
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args([
            "--no-python",
            KD,
            "train-teacher",
            "--arch",
            "resnet8",
            "--epochs",
            "1",
        ])
        .args([
            "--train-size",
            "64",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ])
        .args(["--name", "tr", "--out", dir.path().to_str().unwrap()])
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files(dir.path()), ["tr_s0"]);
    let journal = std::fs::read_to_string(dir.path().join("tr_s0/journal.jsonl")).unwrap();
    assert!(journal.contains("\"kd.world_size\":\"2\""));
}
