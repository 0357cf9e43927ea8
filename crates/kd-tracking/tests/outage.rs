//! The server dies mid-run, twice: training goes on, the tracker catches up
//! by itself when the server returns, `finish` does not hang while it is
//! away, and `sync` delivers the rest. Every point arrives exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kd_tracking::{RunSpec, RunStatus, Tracker, sync};

fn value(step: i64) -> f64 {
    (step as f64).sqrt() - 3.0
}

#[test]
fn server_outage_loses_and_duplicates_nothing() {
    let srv = Mlflow::start();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("run");
    let spec = RunSpec::new("kd-outage")
        .name("outage")
        .tracking_uri(Some(srv.url.clone()));
    let t = Tracker::start_with(&dir, spec, fast()).unwrap();
    let log = |steps: std::ops::Range<i64>| {
        for s in steps {
            let started = Instant::now();
            t.metric("loss", value(s), s);
            // Logging never waits for the server.
            assert!(started.elapsed() < Duration::from_millis(50));
        }
    };
    let count = |t: &Tracker| {
        t.run_id()
            .map_or(0, |id| history(&srv.url, &id, "loss").len())
    };

    log(0..100);
    wait_for(Duration::from_secs(30), "first 100 points", || {
        count(&t) == 100
    });
    let run_id = t.run_id().unwrap();

    srv.kill();
    log(100..200);
    std::thread::sleep(Duration::from_secs(2)); // the shipper fails and backs off
    srv.restart();
    log(200..300);
    wait_for(Duration::from_secs(30), "catch-up after restart", || {
        count(&t) == 300
    });

    srv.kill();
    log(300..400);
    std::thread::sleep(Duration::from_secs(1)); // the shipper notices
    let started = Instant::now();
    let report = t.finish(RunStatus::Finished);
    // One last attempt against a server known to be away, not the full
    // finish timeout (20 s here).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "finish must give up on a dead server: {:?}",
        started.elapsed()
    );
    assert!(report.needs_sync(), "{report:?}");
    assert!(report.error.is_some(), "{report:?}");
    assert_eq!(report.run_id.as_deref(), Some(run_id.as_str()));

    srv.restart();
    let synced = sync(&dir, &srv.url).unwrap();
    assert_eq!(synced.run_id, run_id);
    assert!(synced.shipped > 0);
    assert_eq!(synced.closed_as, None, "the journal holds the final status");

    let got = history(&srv.url, &run_id, "loss");
    let expect: Vec<(i64, f64)> = (0..400).map(|s| (s, value(s))).collect();
    assert_eq!(got, expect, "every point exactly once");
    assert_eq!(common::run(&srv.url, &run_id)["info"]["status"], "FINISHED");

    let again = sync(&dir, &srv.url).unwrap();
    assert_eq!(again.shipped, 0);
    assert_eq!(history(&srv.url, &run_id, "loss").len(), 400);
}
