//! Against a real MLflow server: what a tracker logs arrives, read back
//! through MLflow's REST API; runs made without a server or ended by a crash
//! arrive through `sync`.
//!
//! One server for the whole file (starting one takes ~20 s), so the checks
//! run in sequence inside one test.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kd_tracking::{Client, Error, RunSpec, RunStatus, Tracker, metric_history, plot_curves, sync};

#[test]
fn runs_reach_a_real_mlflow_server() {
    let srv = Mlflow::start();
    let work = tempfile::tempdir().unwrap();
    nested_run_with_params_tags_metrics_and_artifact(&srv.url, work.path());
    error_keeps_mlflow_error_code(&srv.url);
    crashed_run_without_server_is_synced_and_failed(&srv.url, work.path(), false);
    crashed_run_without_server_is_synced_and_failed(&srv.url, work.path(), true);
}

fn nested_run_with_params_tags_metrics_and_artifact(uri: &str, work: &Path) {
    let spec = |name: &str| {
        RunSpec::new("kd-tests")
            .name(name)
            .tracking_uri(Some(uri.to_string()))
    };
    let parent = Tracker::start_with(work.join("sweep"), spec("sweep"), fast()).unwrap();
    let child_dir = work.join("sweep/trial-0");
    let child = parent
        .child(&child_dir, spec("trial-0").tag("kd.method", "st"))
        .unwrap();
    child.param("lr", 0.1);
    child.param("method", "st");
    child.tag("note", "hello");
    // More than one log-batch request can hold.
    let n = 1500;
    for s in 0..n {
        child.metric("train/loss", 1.0 / (s + 1) as f64, s);
    }
    child.metric("val/acc", 0.5, 10);
    child.metric("val/acc", f64::NAN, 20);
    let png = child_dir.join("curves.png");
    plot_curves(&metric_history(&child_dir).unwrap(), &png).unwrap();
    child.artifact(&png, "plots");

    let report = child.finish(RunStatus::Finished);
    assert!(!report.needs_sync(), "{report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
    let child_id = report.run_id.expect("child reached the server");
    let preport = parent.finish(RunStatus::Finished);
    assert!(!preport.needs_sync(), "{preport:?}");
    let parent_id = preport.run_id.expect("parent reached the server");

    let run = run(uri, &child_id);
    assert_eq!(run["info"]["status"], "FINISHED");
    assert!(
        run["info"]["end_time"].as_i64().unwrap() >= run["info"]["start_time"].as_i64().unwrap()
    );
    let params = kv(&run, "params");
    assert_eq!(params.get("lr").map(String::as_str), Some("0.1"));
    assert_eq!(params.get("method").map(String::as_str), Some("st"));
    let tags = kv(&run, "tags");
    assert_eq!(tags.get("note").map(String::as_str), Some("hello"));
    assert_eq!(tags.get("kd.method").map(String::as_str), Some("st"));
    assert_eq!(
        tags.get("mlflow.runName").map(String::as_str),
        Some("trial-0")
    );
    assert_eq!(tags.get("mlflow.parentRunId"), Some(&parent_id));
    assert_eq!(
        tags.get("mlflow.source.type").map(String::as_str),
        Some("LOCAL")
    );

    let loss = history(uri, &child_id, "train/loss");
    assert_eq!(loss.len(), n as usize, "every point exactly once");
    for (i, (step, value)) in loss.iter().enumerate() {
        assert_eq!(*step, i as i64);
        assert_eq!(*value, 1.0 / (i + 1) as f64);
    }
    let acc = history(uri, &child_id, "val/acc");
    assert_eq!(acc.len(), 2);
    assert_eq!(acc[0], (10, 0.5));
    assert!(acc[1].1.is_nan() && acc[1].0 == 20);

    // The 1500 points needed at least two requests, each acknowledged.
    let acks = std::fs::read_to_string(child_dir.join("acked.jsonl")).unwrap();
    assert!(acks.lines().count() >= 2, "{acks}");

    let files = artifacts(uri, &child_id, "plots");
    let size = std::fs::metadata(&png).unwrap().len();
    assert_eq!(files, vec![("plots/curves.png".to_string(), size)]);

    let prun = common::run(uri, &parent_id);
    assert_eq!(prun["info"]["status"], "FINISHED");
    assert_eq!(prun["info"]["run_name"], "sweep");

    // Nothing is left, so a sync sends nothing and duplicates nothing.
    let again = sync(&child_dir, uri).unwrap();
    assert_eq!((again.shipped, again.closed_as), (0, None));
    assert_eq!(again.run_id, child_id);
    assert_eq!(history(uri, &child_id, "train/loss").len(), n as usize);

    // Reopening the folder resumes the same server run.
    let resumed = Tracker::start_with(&child_dir, spec("ignored"), fast()).unwrap();
    assert_eq!(resumed.run_id().as_deref(), Some(child_id.as_str()));
    resumed.metric("train/loss", 0.0, n);
    let report = resumed.finish(RunStatus::Finished);
    assert!(!report.needs_sync(), "{report:?}");
    assert_eq!(history(uri, &child_id, "train/loss").len(), n as usize + 1);
    let run = common::run(uri, &child_id);
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(run["info"]["run_name"], "trial-0");
}

fn error_keeps_mlflow_error_code(uri: &str) {
    let c = Client::new(uri).unwrap();
    let e = c
        .update_run("0123456789abcdef0123456789abcdef", RunStatus::Failed, 1)
        .unwrap_err();
    assert_eq!(e.error_code(), Some("RESOURCE_DOES_NOT_EXIST"), "{e}");
    assert!(matches!(e, Error::Server { status: 404, .. }), "{e:?}");
    assert!(!e.is_transient());
    let e = c.get_or_create_experiment("").unwrap_err();
    assert_eq!(e.error_code(), Some("INVALID_PARAMETER_VALUE"), "{e}");
}

const CRASH_DIR: &str = "KD_TRACKING_CRASH_DIR";
const CRASH_INTERRUPT: &str = "KD_TRACKING_CRASH_INTERRUPT";

/// Runs in a child process (this test binary again): logs without a server,
/// then dies without finishing.
#[test]
fn crash_helper() {
    let Ok(dir) = std::env::var(CRASH_DIR) else {
        return; // only meaningful as the child of the test below
    };
    let t = Tracker::start(&dir, RunSpec::new("kd-tests").name("crashed")).unwrap();
    t.param("seed", 7);
    for s in 0..50 {
        t.metric("train/loss", s as f64 * 0.5, s);
    }
    if std::env::var(CRASH_INTERRUPT).is_ok() {
        t.interrupted();
    }
    // What reached the journal survives the crash; wait until all did.
    let journal = Path::new(&dir).join("journal.jsonl");
    let want = if std::env::var(CRASH_INTERRUPT).is_ok() {
        53
    } else {
        52
    };
    wait_for(Duration::from_secs(10), "journal lines", || {
        std::fs::read_to_string(&journal).is_ok_and(|t| t.lines().count() >= want)
    });
    std::process::abort();
}

fn crashed_run_without_server_is_synced_and_failed(uri: &str, work: &Path, interrupted: bool) {
    let dir = work.join(if interrupted {
        "interrupted"
    } else {
        "crashed"
    });
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_helper", "--test-threads=1"])
        .env(CRASH_DIR, &dir)
        .stdout(std::process::Stdio::null());
    if interrupted {
        cmd.env(CRASH_INTERRUPT, "1");
    }
    let started = Instant::now();
    let status = cmd.status().unwrap();
    assert!(!status.success(), "the helper must die, not finish");
    assert!(started.elapsed() < Duration::from_secs(30));

    // No server run yet: the journal has no run id.
    assert!(journal_lines(&dir).iter().all(|l| l["ev"] != "run_created"));
    let report = sync(&dir, uri).unwrap();
    let want = if interrupted {
        RunStatus::Killed
    } else {
        RunStatus::Failed
    };
    assert_eq!(report.closed_as, Some(want));
    assert!(report.rejected.is_empty(), "{report:?}");

    let run = run(uri, &report.run_id);
    assert_eq!(run["info"]["status"], want.as_str());
    assert_eq!(run["info"]["run_name"], "crashed");
    assert_eq!(
        kv(&run, "params").get("seed").map(String::as_str),
        Some("7")
    );
    let loss = history(uri, &report.run_id, "train/loss");
    let expect: Vec<(i64, f64)> = (0..50).map(|s| (s, s as f64 * 0.5)).collect();
    assert_eq!(loss, expect);

    // The run id is in the journal now, and a second sync has nothing to do.
    assert!(
        journal_lines(&dir)
            .iter()
            .any(|l| l["ev"] == "run_created" && l["run_id"] == report.run_id.as_str())
    );
    let again = sync(&dir, uri).unwrap();
    assert_eq!((again.shipped, again.closed_as), (0, None));
    assert_eq!(history(uri, &report.run_id, "train/loss").len(), 50);
}
