//! A run of `kd` lands in a real MLflow server: params, tags, metrics with
//! their steps, artifacts, and a multi-seed sweep as a parent with children.
//! The server is the real `mlflow server` installed by the bootstrap.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

fn get(url: &str, path: &str, query: &[(&str, &str)]) -> Value {
    let mut req = ureq::get(&format!("{url}/api/2.0/mlflow/{path}"))
        .config()
        .timeout_global(Some(Duration::from_secs(30)))
        .build();
    for (k, v) in query {
        req = req.query(*k, *v);
    }
    req.call().unwrap().body_mut().read_json().unwrap()
}

fn post(url: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{url}/api/2.0/mlflow/{path}"))
        .send_json(body)
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

struct Server<'a>(&'a Path);
impl Drop for Server<'_> {
    fn drop(&mut self) {
        let _ = kd_tracking::server::down(self.0);
    }
}

#[test]
fn runs_arrive_in_mlflow_with_params_tags_metrics_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let info =
        kd_tracking::server::up(out, None).expect("mlflow server starts (run scripts/bootstrap)");
    let _guard = Server(out);
    let url = info.url.clone();
    kd_cli::run([
        "kd",
        "train-teacher",
        "--arch",
        "resnet8",
        "--epochs",
        "2",
        "--train-size",
        "128",
        "--batch-size",
        "32",
        "--seeds",
        "0,1",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--name",
        "t",
    ])
    .unwrap();

    let exp = get(
        &url,
        "experiments/get-by-name",
        &[("experiment_name", "kd")],
    );
    let exp_id = exp["experiment"]["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let runs = post(
        &url,
        "runs/search",
        serde_json::json!({"experiment_ids": [exp_id], "max_results": 100}),
    );
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "a parent sweep run and two seed runs");
    let tag = |r: &Value, k: &str| {
        r["data"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == k)
            .map(|t| t["value"].as_str().unwrap().to_string())
    };
    let parent = runs
        .iter()
        .find(|r| tag(r, "mlflow.runName").as_deref() == Some("t_sweep"))
        .expect("sweep parent run");
    let parent_id = parent["info"]["run_id"].as_str().unwrap();
    let child = runs
        .iter()
        .find(|r| tag(r, "mlflow.runName").as_deref() == Some("t_s1"))
        .expect("seed 1 run");
    assert_eq!(tag(child, "mlflow.parentRunId").as_deref(), Some(parent_id));
    assert_eq!(child["info"]["status"], "FINISHED");
    for t in [
        "kd.git_commit",
        "kd.device",
        "kd.libtorch",
        "kd.seed",
        "kd.host",
    ] {
        assert!(tag(child, t).is_some(), "tag {t} missing");
    }
    assert_eq!(tag(child, "kd.seed").as_deref(), Some("1"));
    let params = child["data"]["params"].as_array().unwrap();
    let param = |k: &str| {
        params
            .iter()
            .find(|p| p["key"] == k)
            .map(|p| p["value"].as_str().unwrap().to_string())
    };
    assert_eq!(param("student.arch").as_deref(), Some("resnet8"));
    assert_eq!(param("stages.0.optimizer.lr").as_deref(), Some("0.05"));
    assert_eq!(param("data.batch_size").as_deref(), Some("32"));

    // Per-epoch accuracy at steps 0 and 1, equal to what the run wrote locally.
    let run_id = child["info"]["run_id"].as_str().unwrap();
    let hist = get(
        &url,
        "metrics/get-history",
        &[("run_id", run_id), ("metric_key", "epoch/test_acc_top1")],
    );
    let points = hist["metrics"].as_array().unwrap();
    assert_eq!(
        points
            .iter()
            .map(|m| m["step"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1]
    );
    let local = std::fs::read_to_string(out.join("t_s1/epochs.jsonl")).unwrap();
    let local: Vec<f64> = local
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["record"]["test_top1"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let remote: Vec<f64> = points
        .iter()
        .map(|m| m["value"].as_f64().unwrap())
        .collect();
    assert_eq!(local, remote);
    let loss = get(
        &url,
        "metrics/get-history",
        &[("run_id", run_id), ("metric_key", "train/loss")],
    );
    assert!(
        loss["metrics"].as_array().unwrap().len() >= 2,
        "step-level loss logged"
    );

    let arts = get(&url, "artifacts/list", &[("run_id", run_id)]);
    let names: Vec<String> = arts["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    for want in ["plan.yaml", "console.log", "checkpoints", "plots"] {
        assert!(
            names.iter().any(|n| n == want),
            "artifact {want} missing from {names:?}"
        );
    }
    let sweep = get(
        &url,
        "metrics/get-history",
        &[
            ("run_id", parent_id),
            ("metric_key", "sweep/best_top1_mean"),
        ],
    );
    assert_eq!(sweep["metrics"].as_array().unwrap().len(), 1);
}
