//! Runs as their folders keep them: `plan.yaml` and `epochs.jsonl`, read
//! back for `kd report` without MLflow and without the checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{EngineError, EpochRecord, Plan, Result, RunResult, StageResult};

/// Why a folder holding a run was left out of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub dir: PathBuf,
    pub why: String,
}

/// The run folders at or under `paths` (a run, a sweep's folder, an
/// output folder), sorted; archived runs (`.archive`) and MLflow's own
/// folder are not runs of the report.
pub fn find(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for path in paths {
        if !path.is_dir() {
            return Err(EngineError::Plan(format!(
                "{}: no such folder; give run folders or folders holding them",
                path.display()
            )));
        }
        let mut stack = vec![path.clone()];
        while let Some(dir) = stack.pop() {
            if dir.join("plan.yaml").is_file() {
                found.push(dir);
                continue;
            }
            let entries = std::fs::read_dir(&dir).map_err(|e| EngineError::io(&dir, e))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let hidden = name.to_string_lossy().starts_with('.');
                if entry.path().is_dir() && !hidden && name != "mlflow" {
                    stack.push(entry.path());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// A finished run's plan and result, or why it cannot be reported: still
/// running or stopped before its last epoch, or its files unreadable.
pub fn read(dir: &Path) -> std::result::Result<(Plan, RunResult), Skipped> {
    let skip = |why: String| Skipped {
        dir: dir.to_path_buf(),
        why,
    };
    let plan =
        crate::folder::read_saved(&dir.join("plan.yaml")).map_err(|e| skip(e.to_string()))?;
    let path = dir.join("epochs.jsonl");
    let text =
        std::fs::read_to_string(&path).map_err(|e| skip(format!("no epochs.jsonl ({e})")))?;
    // Keyed by epoch: a run stopped between its log line and its checkpoint
    // repeats that epoch on resume, and the later line is the kept one.
    let mut by_stage: BTreeMap<String, BTreeMap<usize, EpochRecord>> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        #[derive(serde::Deserialize)]
        struct Line {
            stage: String,
            record: EpochRecord,
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| skip(format!("epochs.jsonl line {}: {e}", i + 1)))?;
        by_stage
            .entry(l.stage)
            .or_default()
            .insert(l.record.epoch, l.record);
    }
    let mut stages = Vec::new();
    for stage in &plan.stages {
        let records: Vec<EpochRecord> = by_stage
            .remove(&stage.name)
            .unwrap_or_default()
            .into_values()
            .collect();
        if records.len() < stage.epochs {
            return Err(skip(format!(
                "not finished: stage `{}` has {} of {} epochs",
                stage.name,
                records.len(),
                stage.epochs
            )));
        }
        stages.push(stage_result(&stage.name, records));
    }
    let result = RunResult {
        name: plan.name.clone(),
        run_dir: dir.to_path_buf(),
        stages,
    };
    Ok((plan, result))
}

fn stage_result(name: &str, epochs: Vec<EpochRecord>) -> StageResult {
    let last = epochs.last().expect("a finished stage has epochs");
    let (best_top1, last_top1, last_top5) = (last.best_top1, last.test_top1, last.test_top5);
    // The running best took its final value at the best epoch (chosen on
    // validation accuracy where there is a split, so not simply the
    // highest test top-1).
    let best_epoch = epochs
        .iter()
        .find(|r| r.best_top1 == best_top1)
        .map_or(last.epoch, |r| r.epoch);
    StageResult {
        name: name.to_string(),
        best_top1,
        best_epoch,
        last_top1,
        last_top5,
        last_weights: PathBuf::new(),
        best_weights: PathBuf::new(),
        epochs,
    }
}
