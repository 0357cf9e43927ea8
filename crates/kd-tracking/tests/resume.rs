//! Run folders used more than once, against a real MLflow server: a run
//! killed and resumed from an earlier checkpoint, a finished run reopened,
//! and a journal written by older versions that holds steps twice. MLflow
//! gets each step once, and a finished run stays FINISHED.
//!
//! One server for the whole file (starting one takes ~20 s), so the checks
//! run in sequence inside one test.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kd_tracking::{RunSpec, RunStatus, Tracker, journaled_status, sync};

const EXPERIMENT: &str = "kd-resume";

/// Resumed training is bitwise exact: a replayed step logs the same value.
fn loss(step: i64) -> f64 {
    1.0 / (step + 1) as f64
}

#[test]
fn reused_run_folders_reach_mlflow_exactly_once() {
    let srv = Mlflow::start();
    let work = tempfile::tempdir().unwrap();
    killed_run_resumed_from_a_checkpoint_logs_each_step_once(&srv.url, work.path());
    finished_run_stays_finished_when_reopened(&srv.url, work.path());
    old_journal_with_duplicates_is_synced_once(&srv.url, work.path());
}

const HELPER_DIR: &str = "KD_RESUME_HELPER_DIR";
const HELPER_URI: &str = "KD_RESUME_HELPER_URI";
const HELPER_STEPS: &str = "KD_RESUME_HELPER_STEPS";

/// Runs in a child process (this test binary again): logs `lr` and the
/// steps `a..b`, then dies without finishing, as `kill -9` would leave it.
/// With a server, the first half of the steps is on the server before the
/// rest is logged, so the kill finds steps both shipped and only journaled.
#[test]
fn kill_helper() {
    let Ok(dir) = std::env::var(HELPER_DIR) else {
        return; // only meaningful as the child of the test above
    };
    let uri = std::env::var(HELPER_URI).ok();
    let steps = std::env::var(HELPER_STEPS).unwrap();
    let (a, b) = steps.split_once("..").unwrap();
    let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
    let spec = RunSpec::new(EXPERIMENT)
        .name("killed")
        .tracking_uri(uri.clone());
    let t = Tracker::start_with(&dir, spec, fast()).unwrap();
    t.param("lr", 0.1);
    let mid = a + (b - a) / 2;
    for s in a..mid {
        t.metric("train/loss", loss(s), s);
    }
    if let Some(uri) = &uri {
        wait_for(Duration::from_secs(30), "first half on the server", || {
            t.run_id()
                .is_some_and(|id| history(uri, &id, "train/loss").len() as i64 >= mid)
        });
    }
    for s in mid..b {
        t.metric("train/loss", loss(s), s);
    }
    let journal = Path::new(&dir).join("journal.jsonl");
    wait_for(Duration::from_secs(10), "the last step journaled", || {
        std::fs::read_to_string(&journal).is_ok_and(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|l| l["ev"] == "metric" && l["step"] == b - 1)
        })
    });
    std::process::abort();
}

fn kill_after(dir: &Path, uri: Option<&str>, steps: std::ops::Range<i64>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "kill_helper", "--test-threads=1"])
        .env(HELPER_DIR, dir)
        .env(HELPER_STEPS, format!("{}..{}", steps.start, steps.end))
        .stdout(std::process::Stdio::null());
    if let Some(uri) = uri {
        cmd.env(HELPER_URI, uri);
    }
    let started = Instant::now();
    let status = cmd.status().unwrap();
    assert!(!status.success(), "the helper must die, not finish");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// How often the journal holds each step of `key`.
fn journaled_steps(dir: &Path, key: &str) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for l in journal_lines(dir) {
        if l["ev"] == "metric" && l["key"] == key {
            *out.entry(l["step"].as_i64().unwrap()).or_default() += 1;
        }
    }
    out
}

fn journaled(dir: &Path, ev: &str) -> usize {
    journal_lines(dir).iter().filter(|l| l["ev"] == ev).count()
}

/// The observed bug: steps 10..30 were logged before the kill, the resume
/// from the checkpoint at step 10 logged them again, and after sync MLflow
/// showed each of them twice.
fn killed_run_resumed_from_a_checkpoint_logs_each_step_once(uri: &str, work: &Path) {
    let dir = work.join("killed");
    kill_after(&dir, Some(uri), 0..30);
    let before = journal_lines(&dir)
        .iter()
        .filter(|l| l["ev"] == "metric")
        .count();
    assert_eq!(before, 30);

    let spec = RunSpec::new(EXPERIMENT)
        .name("ignored on resume")
        .tracking_uri(Some(uri.to_string()));
    let t = Tracker::start_with(&dir, spec, fast()).unwrap();
    t.param("lr", 0.1);
    for s in 10..40 {
        t.metric("train/loss", loss(s), s);
    }
    let report = t.finish(RunStatus::Finished);
    assert!(!report.needs_sync(), "{report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
    let run_id = report.run_id.unwrap();

    let again = sync(&dir, uri).unwrap();
    assert_eq!((again.shipped, again.closed_as), (0, None));

    let expect: Vec<(i64, f64)> = (0..40).map(|s| (s, loss(s))).collect();
    assert_eq!(
        history(uri, &run_id, "train/loss"),
        expect,
        "each step once"
    );
    assert!(
        journaled_steps(&dir, "train/loss")
            .values()
            .all(|&n| n == 1)
    );
    assert_eq!(journaled(&dir, "param"), 1, "the same lr is journaled once");
    let run = common::run(uri, &run_id);
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(
        kv(&run, "params").get("lr").map(String::as_str),
        Some("0.1")
    );
}

/// The observed bug: `x_s0` finished, later attempts reused its folder and
/// failed, and MLflow showed it FAILED.
fn finished_run_stays_finished_when_reopened(uri: &str, work: &Path) {
    let dir = work.join("finished");
    let spec = || {
        RunSpec::new(EXPERIMENT)
            .name("x_s0")
            .tracking_uri(Some(uri.to_string()))
    };
    let t = Tracker::start_with(&dir, spec(), fast()).unwrap();
    for s in 0..5 {
        t.metric("train/loss", loss(s), s);
    }
    let report = t.finish(RunStatus::Finished);
    assert!(!report.needs_sync(), "{report:?}");
    let run_id = report.run_id.unwrap();
    let status = || common::run(uri, &run_id)["info"]["status"].clone();
    assert_eq!(status(), "FINISHED");

    // Reopened (an extended resume): the new points arrive, the status does
    // not move, neither while it trains nor when it fails.
    let t = Tracker::start_with(&dir, spec(), fast()).unwrap();
    for s in 5..8 {
        t.metric("train/loss", loss(s), s);
    }
    wait_for(Duration::from_secs(30), "the appended points", || {
        history(uri, &run_id, "train/loss").len() == 8
    });
    assert_eq!(
        status(),
        "FINISHED",
        "a reopened finished run is not RUNNING"
    );
    let report = t.finish(RunStatus::Failed);
    assert!(!report.needs_sync(), "{report:?}");
    assert_eq!(status(), "FINISHED");

    // Reopened and killed: sync does not close it as FAILED.
    kill_after(&dir, None, 8..10);
    let synced = sync(&dir, uri).unwrap();
    assert_eq!(synced.run_id, run_id);
    assert_eq!(synced.closed_as, None);
    assert!(synced.rejected.is_empty(), "{synced:?}");
    assert_eq!(status(), "FINISHED");
    let expect: Vec<(i64, f64)> = (0..10).map(|s| (s, loss(s))).collect();
    assert_eq!(history(uri, &run_id, "train/loss"), expect);

    assert_eq!(journaled(&dir, "status"), 1, "only the first FINISHED");
    assert_eq!(journaled_status(&dir).unwrap(), Some(RunStatus::Finished));
}

/// Journals written before steps were checked hold replayed steps twice, and
/// a finished run's later statuses; `sync` ships each step once (the first
/// value) and keeps the run FINISHED.
fn old_journal_with_duplicates_is_synced_once(uri: &str, work: &Path) {
    let dir = work.join("old");
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = vec![
        r#"{"ev":"start","experiment":"kd-resume","run_name":"old","tags":{},"pid":1}"#.to_string(),
        r#"{"ev":"param","key":"lr","value":"0.1"}"#.to_string(),
    ];
    let metric = |s: i64, v: f64| format!(r#"{{"ev":"metric","key":"m","value":{v},"step":{s}}}"#);
    lines.extend((0..6).map(|s| metric(s, loss(s))));
    lines.push(r#"{"ev":"status","status":"FINISHED"}"#.into());
    lines.push(r#"{"ev":"resume","pid":1}"#.into());
    lines.push(r#"{"ev":"param","key":"lr","value":"0.1"}"#.into());
    // Kept out of MLflow even where a replay logged another value.
    lines.extend((3..9).map(|s| metric(s, if s < 6 { 7.0 } else { loss(s) })));
    lines.push(r#"{"ev":"status","status":"FAILED"}"#.into());
    let text: String = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let head = format!(
                r#"{{"seq":{},"time":{},"#,
                i + 1,
                1_700_000_000_000i64 + i as i64
            );
            format!("{head}{}\n", &l[1..])
        })
        .collect();
    std::fs::write(dir.join("journal.jsonl"), text).unwrap();
    assert_eq!(journaled_status(&dir).unwrap(), Some(RunStatus::Finished));

    let report = sync(&dir, uri).unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.closed_as, None);
    let expect: Vec<(i64, f64)> = (0..9).map(|s| (s, loss(s))).collect();
    assert_eq!(history(uri, &report.run_id, "m"), expect);
    let run = common::run(uri, &report.run_id);
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(
        kv(&run, "params").get("lr").map(String::as_str),
        Some("0.1")
    );
    let again = sync(&dir, uri).unwrap();
    assert_eq!(again.shipped, 0);
}
