//! A real MLflow server per test, and reads through MLflow's own REST API
//! (plain `ureq`, not the client under test).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kd_tracking::{Options, server};
use serde_json::Value;

/// An `mlflow server` on a free loopback port with its store in a temporary
/// folder; stopped (process group killed) on drop, also when a test panics.
pub struct Mlflow {
    pub root: tempfile::TempDir,
    pub port: u16,
    pub url: String,
}

impl Mlflow {
    pub fn start() -> Mlflow {
        let root = tempfile::tempdir().expect("temp dir");
        // Bind port 0 to get a free port, then hand it to MLflow.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let info = server::up(root.path(), Some(port)).expect("mlflow server starts");
        assert_eq!(info.port, port);
        Mlflow {
            url: info.url,
            root,
            port,
        }
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&self) {
        server::kill(self.root.path())
            .expect("kill")
            .expect("server was running");
    }

    /// Starts it again on the same port and store.
    pub fn restart(&self) {
        let info = server::up(self.root.path(), Some(self.port)).expect("mlflow restarts");
        assert_eq!(info.url, self.url);
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        let _ = server::down(self.root.path());
    }
}

/// Short intervals so the tests run fast; still bounded everywhere.
pub fn fast() -> Options {
    Options {
        flush_interval: Duration::from_millis(200),
        finish_timeout: Duration::from_secs(20),
        // A loaded test machine makes SQLite-backed MLflow slow.
        request_timeout: Duration::from_secs(20),
        max_backoff: Duration::from_secs(1),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

pub fn get(url: &str, query: &[(&str, &str)]) -> Value {
    let mut req = agent().get(url);
    for (k, v) in query {
        req = req.query(*k, *v);
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.body_mut().read_json().expect("json answer")
}

pub fn run(uri: &str, run_id: &str) -> Value {
    get(
        &format!("{uri}/api/2.0/mlflow/runs/get"),
        &[("run_id", run_id)],
    )["run"]
        .clone()
}

/// Params or tags of a run as a map.
pub fn kv(run: &Value, what: &str) -> std::collections::BTreeMap<String, String> {
    run["data"][what]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                    (s("key"), s("value"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(step, value)` of every point the server holds for `key`, sorted by step.
pub fn history(uri: &str, run_id: &str, key: &str) -> Vec<(i64, f64)> {
    let v = get(
        &format!("{uri}/api/2.0/mlflow/metrics/get-history"),
        &[
            ("run_id", run_id),
            ("metric_key", key),
            ("max_results", "100000"),
        ],
    );
    let mut out: Vec<(i64, f64)> = v["metrics"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let value = match &m["value"] {
                        Value::String(s) if s == "NaN" => f64::NAN,
                        other => other.as_f64().expect("number"),
                    };
                    let step = m["step"].as_i64().unwrap_or(0);
                    (step, value)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|p| p.0);
    out
}

/// Files under `path` in a run's artifacts: `(path, size)`.
pub fn artifacts(uri: &str, run_id: &str, path: &str) -> Vec<(String, u64)> {
    let v = get(
        &format!("{uri}/api/2.0/mlflow/artifacts/list"),
        &[("run_id", run_id), ("path", path)],
    );
    v["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    let size = f["file_size"].as_u64().unwrap_or(0);
                    (f["path"].as_str().unwrap_or_default().to_string(), size)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn journal_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("journal line is JSON"))
        .collect()
}

pub fn run_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}
