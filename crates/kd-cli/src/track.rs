//! MLflow tracking of a run: an [`Observer`] that forwards the engine's
//! events to a [`Tracker`] (journal first, shipped in the background), plus
//! what a run records about itself: the flattened plan, git commit, teacher
//! checksum, device, libtorch version, host.

use std::path::Path;

use kd_engine::{EpochRecord, Observer, Paper, Plan, StageResult};
use kd_tracking::{RunSpec, RunStatus, Tracker};

pub const EXPERIMENT: &str = "kd";

pub struct Tracking {
    pub tracker: Tracker,
    /// The source's number and the stage it is compared at (the last).
    paper: Option<(Paper, String)>,
}

/// `a.b.0.c = value` for every leaf of a JSON value.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(
                    &if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    },
                    x,
                    out,
                );
            }
        }
        serde_json::Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), x, out);
            }
        }
        serde_json::Value::Null => {}
        other => {
            let mut s = match other {
                serde_json::Value::String(s) => s.clone(),
                x => x.to_string(),
            };
            // MLflow caps param values; a script schedule carries its source.
            if s.len() > 500 {
                s.truncate(497);
                s.push_str("...");
            }
            out.push((prefix.to_string(), s));
        }
    }
}

pub fn plan_params(plan: &Plan) -> Vec<(String, String)> {
    let mut out = Vec::new();
    flatten(
        "",
        &serde_json::to_value(plan).unwrap_or_default(),
        &mut out,
    );
    out
}

use kd_engine::tensors::sha256_file;

/// Tags every run carries, so a number can be traced to what made it.
pub fn run_tags(plan: &Plan, device: &str, recipe: Option<&Path>) -> Vec<(String, String)> {
    let mut tags = vec![
        // The binary's build, not the folder the run started in.
        ("kd.git_commit".into(), env!("KD_GIT_COMMIT").to_string()),
        ("kd.git_dirty".into(), env!("KD_GIT_DIRTY").to_string()),
        ("kd.device".into(), device.to_string()),
        (
            "kd.libtorch".into(),
            env!("KD_LIBTORCH_VERSION").to_string(),
        ),
        (
            "kd.host".into(),
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        ("kd.seed".into(), plan.seed.to_string()),
        // Data-parallel: ranks, each with the plan's batch size.
        (
            "kd.world_size".into(),
            kd_dist::group().map_or(1, |g| g.world.size).to_string(),
        ),
        ("kd.version".into(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(w) = plan.teacher.as_ref().and_then(|t| t.weights.as_ref()) {
        tags.push((
            "kd.teacher_sha256".into(),
            sha256_file(w).unwrap_or_else(|| "missing".into()),
        ));
    }
    for (role, m) in [
        ("student", Some(&plan.student)),
        ("teacher", plan.teacher.as_ref()),
    ] {
        if let Some(file) = m.and_then(|m| m.source_file()) {
            tags.push((
                format!("kd.{role}_source_sha256"),
                sha256_file(file).unwrap_or_else(|| "missing".into()),
            ));
        }
    }
    if let Some(r) = recipe {
        tags.push(("kd.recipe".into(), r.display().to_string()));
        tags.push((
            "kd.recipe_sha256".into(),
            sha256_file(r).unwrap_or_else(|| "missing".into()),
        ));
    }
    tags
}

impl Tracking {
    pub fn start(
        run_dir: &Path,
        plan: &Plan,
        uri: Option<String>,
        parent: Option<&Tracker>,
        tags: Vec<(String, String)>,
        params: bool,
    ) -> anyhow::Result<Tracking> {
        let mut spec = RunSpec::new(EXPERIMENT)
            .name(plan.name.clone())
            .tracking_uri(uri);
        for (k, v) in tags {
            spec = spec.tag(k, v);
        }
        let tracker = match parent {
            Some(p) => p.child(run_dir, spec)?,
            None => Tracker::start(run_dir, spec)?,
        };
        // A resumed run logged its params when it started; an extended one
        // would change `epochs`, which MLflow refuses (a tag says so).
        if params {
            for (k, v) in plan_params(plan) {
                tracker.param(&k, v);
            }
            // Ranks of a data-parallel job, each with the plan's batch size.
            tracker.param("world_size", kd_dist::group().map_or(1, |g| g.world.size));
        }
        let last_stage = plan.stages.last().map(|s| s.name.clone());
        let paper = plan.paper.clone().zip(last_stage);
        Ok(Tracking { tracker, paper })
    }

    /// Plots, plan, log; then the final status.
    pub fn finish(self, run_dir: &Path, status: RunStatus) -> kd_tracking::FinishReport {
        self.tracker.flush();
        if let Ok(history) = kd_tracking::metric_history(run_dir) {
            let png = run_dir.join("curves.png");
            if kd_tracking::plot_curves(&history, &png).is_ok() {
                self.tracker.artifact(&png, "plots");
            }
        }
        for f in ["plan.yaml", "console.log", "epochs.jsonl"] {
            if run_dir.join(f).exists() {
                self.tracker.artifact(run_dir.join(f), "");
            }
        }
        if status == RunStatus::Killed {
            self.tracker.interrupted();
        }
        self.tracker.finish(status)
    }
}

/// A metric's key without a repeated last part: a method's term named
/// after the method (`m/m`) is logged as `loss/m`, not `loss/m/m`.
fn metric_key(key: &str) -> &str {
    match key.rsplit_once('/') {
        Some((head, last)) if head.rsplit('/').next() == Some(last) => head,
        _ => key,
    }
}

/// Epoch metrics are logged with the run's epoch index (from 0, counted on
/// across stages) as their step, step metrics with the global step, as
/// `curves.png` plots them.
impl Observer for Tracking {
    fn metrics(&mut self, step: i64, values: &[(String, f64)]) {
        for (k, v) in values {
            self.tracker.metric(metric_key(k), *v, step);
        }
    }

    fn teacher_eval(&mut self, stage: &str, top1: f64, top5: f64) {
        let t = &self.tracker;
        t.metric(&format!("stage/{stage}/teacher_top1"), top1, 0);
        // NaN: fewer than 6 classes, where top-5 is 100% by construction.
        if top5.is_finite() {
            t.metric(&format!("stage/{stage}/teacher_top5"), top5, 0);
        }
    }

    fn epoch(&mut self, stage: &str, global: i64, r: &EpochRecord) {
        let t = &self.tracker;
        t.metric("epoch/train_loss", r.train_loss, global);
        t.metric("epoch/train_acc_top1", r.train_top1, global);
        t.metric("epoch/test_acc_top1", r.test_top1, global);
        if r.test_top5.is_finite() {
            t.metric("epoch/test_acc_top5", r.test_top5, global);
        }
        t.metric("epoch/best_acc_top1", r.best_top1, global);
        t.metric("epoch/lr", r.lr, global);
        t.metric("epoch/images_per_sec", r.images_per_sec, global);
        t.metric("epoch/eval_secs", r.eval_secs, global);
        if let Some(a) = r.val_top1 {
            t.metric("epoch/val_acc_top1", a, global);
        }
        if let Some(b) = r.val_top5.filter(|b| b.is_finite()) {
            t.metric("epoch/val_acc_top5", b, global);
        }
        if let Some(p) = r.peer_top1 {
            t.metric("epoch/peer_test_acc_top1", p, global);
        }
        if let Some(e) = r.ema_top1 {
            t.metric("epoch/ema_test_acc_top1", e, global);
        }
        if let Some(e) = r.ema_top5.filter(|e| e.is_finite()) {
            t.metric("epoch/ema_test_acc_top5", e, global);
        }
        for (label, w) in &r.weights {
            t.metric(&format!("epoch/weight/{label}"), *w, global);
        }
        for (term, v) in &r.terms {
            t.metric(metric_key(&format!("epoch/loss/{term}")), *v, global);
        }
        t.tag("kd.stage", stage);
    }

    fn stage_end(&mut self, result: &StageResult) {
        let t = &self.tracker;
        t.metric(
            &format!("stage/{}/best_top1", result.name),
            result.best_top1,
            0,
        );
        t.metric(
            &format!("stage/{}/last_top1", result.name),
            result.last_top1,
            0,
        );
        if let Some((paper, _)) = self.paper.as_ref().filter(|(_, s)| *s == result.name) {
            let gap = kd_engine::report::paper_gap(paper, result.best_top1, result.last_top1);
            t.metric("paper/gap_top1", gap, 0);
        }
    }

    fn artifact(&mut self, path: &Path) {
        self.tracker.artifact(path, "checkpoints");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::epoch_record;

    /// What `observe` makes a tracker journal: every metric point by key.
    fn logged(observe: impl FnOnce(&mut Tracking)) -> kd_tracking::History {
        let dir = tempfile::tempdir().unwrap();
        let tracker = Tracker::start(dir.path(), RunSpec::new(EXPERIMENT)).unwrap();
        let mut t = Tracking {
            tracker,
            paper: None,
        };
        observe(&mut t);
        t.tracker.finish(RunStatus::Finished);
        kd_tracking::metric_history(dir.path()).unwrap()
    }

    #[test]
    fn metric_names_do_not_repeat_a_term_named_after_its_method() {
        let h = logged(|t| {
            t.metrics(7, &[("loss/a/a".into(), 2.0), ("train/loss".into(), 2.0)]);
            t.epoch("s", 3, &epoch_record(80.0));
        });
        let keys: Vec<&str> = h.keys().map(String::as_str).collect();
        for want in ["loss/a", "epoch/loss/a", "epoch/loss/b/x", "train/loss"] {
            assert!(keys.contains(&want), "{want} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.ends_with("a/a")), "{keys:?}");
        // Step metrics at the global step, epoch metrics at the epoch index.
        assert_eq!(h["loss/a"], [(7, 2.0)]);
        assert_eq!(h["epoch/test_acc_top1"], [(3, 40.0)]);
    }

    #[test]
    fn no_top5_metric_for_fewer_than_6_classes() {
        let with = logged(|t| {
            t.teacher_eval("s", 40.0, 90.0);
            t.epoch("s", 0, &epoch_record(80.0));
        });
        assert!(
            with.contains_key("epoch/test_acc_top5") && with.contains_key("stage/s/teacher_top5")
        );
        let without = logged(|t| {
            t.teacher_eval("s", 40.0, f64::NAN);
            t.epoch("s", 0, &epoch_record(f64::NAN));
        });
        let keys: Vec<&String> = without.keys().collect();
        assert!(!keys.iter().any(|k| k.contains("top5")), "{keys:?}");
        assert!(without.contains_key("epoch/test_acc_top1"));
    }
}
