//! The `kd` binary under random command lines: subcommands with random
//! combinations of flags and values (valid, contradictory, out of range,
//! misspelt), at tiny sizes, with the reader of stdout sometimes closing
//! it early (`kd methods | head`). Whatever the arguments, kd exits 0,
//! with a one-line error (1), or with clap's usage error (2); it never
//! panics and is never killed by a signal.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// Command lines per CI run (`KD_FUZZ_SCALE` multiplies it).
const CLI_CASES: u32 = 64;

use kd_tests::{kd, root};

/// What the generated command lines start with: a subcommand and the
/// arguments it cannot do without (some of them wrong on purpose).
fn heads(teacher: &Path) -> Vec<Vec<String>> {
    let t = teacher.display().to_string();
    let r = |p: &str| root().join(p).display().to_string();
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect();
    let mut heads: Vec<Vec<String>> = [
        "methods",
        "methods --json",
        "models",
        "mlflow status",
        "mlflow up --help",
        "report",
        "sync",
        "nonsense",
        "--version",
        "distill --help",
        "train-teacher --arch resnet8",
        "train-teacher --arch resnet9000",
        "train-teacher --arch python:nowhere.py:Net(width=2)",
        "train-teacher --arch torchscript:missing.pt",
        "probe model resnet8 --weights missing.safetensors --input missing --out o",
        "probe loss --fixture missing --out o",
    ]
    .iter()
    .map(|s| words(s))
    .collect();
    heads.push(words(&format!("plan {}", r("recipes/quickstart.rhai"))));
    heads.push(words(&format!(
        "plan {} --set epochs=1",
        r("recipes/examples/three_losses.rhai")
    )));
    heads.push(words(&format!(
        "run {} --set epochs=0",
        r("recipes/quickstart.rhai")
    )));
    for method in ["st", "at", "att", "fitnet", "kd"] {
        heads.push(words(&format!(
            "distill --teacher resnet8 --teacher-weights {t} --student resnet8 --method {method}"
        )));
    }
    heads
}

/// Flags drawn at random after the head; the training ones at tiny sizes.
const FLAGS: &[&str] = &[
    "--epochs 1",
    "--epochs 0",
    "--train-size 64",
    "--classes 4",
    "--batch-size 32",
    "--lr -1",
    "--lr 0.05",
    "--lr nan",
    "--momentum 1.5",
    "--weight-decay -0.1",
    "--cosine",
    "--milestones 5",
    "--milestones 1,1",
    "--seeds 0,0",
    "--seeds 1",
    "--seeds",
    "--compare st",
    "--compare at:1000",
    "--compare +",
    "--config st.T=4",
    "--config st.T=abc",
    "--config nope",
    "--baseline",
    "--name fuzz",
    "--resume",
    "--extend",
    "--overwrite",
    "--data digits",
    "--data cifar10:/nonexistent",
    "--data what",
    "--image-size 32",
    "--precision bf16",
    "--device cuda",
    "--val-fraction 2",
    "--ce 0",
    "--solo",
    "--json",
    "-o",
    "--",
    "--help",
];

/// Draws that make one command line.
#[derive(Debug, Clone)]
struct Case {
    head: usize,
    flags: Vec<usize>,
    /// Bytes of stdout read before the pipe is closed; `None` reads all.
    read: Option<usize>,
}

fn cases(heads: usize) -> impl Strategy<Value = Case> {
    (
        0..heads,
        prop::collection::vec(0..FLAGS.len(), 0..5),
        prop::option::of(0usize..64),
    )
        .prop_map(|(head, flags, read)| Case { head, flags, read })
}

/// Runs one command line; an error describes how kd misbehaved.
fn check(args: &[String], read: Option<usize>, cwd: &Path) -> Result<(), String> {
    let mut child = Command::new(kd())
        .args(args)
        .current_dir(cwd)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("MLFLOW_TRACKING_URI")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start kd: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    match read {
        Some(n) => {
            let mut buf = vec![0; n];
            let _ = stdout.read_exact(&mut buf);
            drop(stdout);
        }
        None => {
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let err = errs.join().unwrap_or_default();
    let shown = || format!("`kd {}`: {status}; stderr:\n{err}", args.join(" "));
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        return Err(format!("panicked: {}", shown()));
    }
    match status.code() {
        Some(0) | Some(2) => Ok(()),
        Some(1) => {
            let last = err.lines().rev().find(|l| !l.trim().is_empty());
            match last {
                Some(l) if l.starts_with("error: ") => Ok(()),
                _ => Err(format!("failed without an `error:` line: {}", shown())),
            }
        }
        _ => Err(format!("exited abnormally: {}", shown())),
    }
}

#[test]
fn random_command_lines_exit_cleanly() {
    let teacher = root().join("tests/golden/fixtures/pth_resnet8.safetensors");
    let heads = heads(&teacher);
    let mut runner = TestRunner::new(kd_tests::fuzz_config(CLI_CASES));
    let count = std::cell::Cell::new(0u32);
    let result = runner.run(&cases(heads.len()), |case| {
        count.set(count.get() + 1);
        let dir = tempfile::tempdir().unwrap();
        let mut args = heads[case.head].clone();
        for &f in &case.flags {
            args.extend(FLAGS[f].split_whitespace().map(str::to_string));
        }
        if matches!(args[0].as_str(), "distill" | "train-teacher" | "run") {
            args.extend([
                "--out".into(),
                dir.path().join("runs").display().to_string(),
            ]);
        }
        // Training at tiny sizes unless the draw set them itself.
        if matches!(args[0].as_str(), "distill" | "train-teacher") {
            let has = |flag: &str| args.iter().any(|a| a == flag);
            let mut tiny = Vec::new();
            if !has("--epochs") {
                tiny.extend(["--epochs", "1"]);
            }
            if !has("--train-size") && !has("--data") {
                tiny.extend(["--train-size", "64"]);
            }
            if !has("--batch-size") {
                tiny.extend(["--batch-size", "32"]);
            }
            // Before a `--` the draw may have put in.
            let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
            args.splice(at..at, tiny.into_iter().map(str::to_string));
        }
        check(&args, case.read, dir.path()).map_err(TestCaseError::fail)
    });
    println!("cli fuzz: {} command lines run", count.get());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The two commands of the issue, with stdout closed after the first bytes.
#[test]
fn listings_into_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let quickstart = root().join("recipes/quickstart.rhai").display().to_string();
    for args in [vec!["methods".to_string()], vec!["plan".into(), quickstart]] {
        check(&args, Some(0), dir.path()).unwrap();
    }
}
