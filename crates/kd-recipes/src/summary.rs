//! The sweep table: runs grouped by configuration, mean ± std over seeds.

use kd_engine::{Plan, RunResult};

/// A finished run with the plan it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub plan: Plan,
    pub result: RunResult,
}

/// Runs that differ only in name and seed form one configuration. Numbers
/// are the best and the last test top-1 of each run's last stage; std is
/// the sample standard deviation (n - 1), left out for a single run.
pub fn table(runs: &[RunRecord]) -> String {
    let mut groups: Vec<(serde_json::Value, Vec<&RunRecord>)> = Vec::new();
    for r in runs {
        let key = configuration(&r.plan);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut rows = vec![[
        "configuration".to_string(),
        "seeds".into(),
        "best top-1".into(),
        "last top-1".into(),
    ]];
    for (_, members) in &groups {
        let pick =
            |f: fn(&RunResult) -> f64| members.iter().map(|r| f(&r.result)).collect::<Vec<f64>>();
        let best = pick(|r| r.last().map_or(f64::NAN, |s| s.best_top1));
        let last = pick(|r| r.last().map_or(f64::NAN, |s| s.last_top1));
        let seeds: Vec<String> = members.iter().map(|r| r.plan.seed.to_string()).collect();
        rows.push([
            label(members),
            seeds.join(","),
            mean_std(&best),
            mean_std(&last),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn configuration(plan: &Plan) -> serde_json::Value {
    let mut p = plan.clone();
    p.name.clear();
    p.seed = 0;
    serde_json::to_value(&p).unwrap_or_default()
}

/// The names' common prefix without a trailing seed marker (`-s`, `_seed`),
/// or the one name of a single run.
fn label(members: &[&RunRecord]) -> String {
    let first = &members[0].plan.name;
    if members.len() == 1 {
        return first.clone();
    }
    let mut prefix = first.as_str();
    for r in &members[1..] {
        let common = prefix
            .chars()
            .zip(r.plan.name.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        prefix = &prefix[..common];
    }
    let mut prefix = prefix.trim_end_matches(|c: char| c.is_ascii_digit());
    for marker in ["seed", "s"] {
        if let Some(p) = prefix
            .strip_suffix(marker)
            .filter(|p| p.ends_with(['-', '_', '.']))
        {
            prefix = p;
            break;
        }
    }
    let prefix = prefix.trim_end_matches(['-', '_', '.', ' ']);
    if prefix.is_empty() {
        first.clone()
    } else {
        prefix.to_string()
    }
}

fn mean_std(xs: &[f64]) -> String {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return format!("{mean:.2}");
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    format!("{mean:.2} ± {:.2}", var.sqrt())
}

#[cfg(test)]
mod tests {
    use kd_engine::{ModelPlan, StageResult};

    use super::*;

    fn record(name: &str, seed: u64, lr: f64, best: f64, last: f64) -> RunRecord {
        let mut stage = kd_engine::StagePlan {
            name: "s".into(),
            epochs: 1,
            subject: Default::default(),
            train: vec![],
            methods: vec![],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
        };
        stage.optimizer.lr = lr;
        let plan = Plan {
            name: name.into(),
            seed,
            device: Default::default(),
            data: Default::default(),
            student: ModelPlan {
                arch: "resnet8".into(),
                weights: None,
            },
            teacher: None,
            stages: vec![stage],
        };
        let st = StageResult {
            name: "s".into(),
            epochs: vec![],
            best_top1: best,
            best_epoch: 0,
            last_top1: last,
            last_top5: 0.0,
            last_weights: "l".into(),
            best_weights: "b".into(),
        };
        RunRecord {
            plan,
            result: RunResult {
                name: name.into(),
                run_dir: "d".into(),
                stages: vec![st],
            },
        }
    }

    #[test]
    fn groups_by_configuration_with_sample_std() {
        let runs = [
            record("st-s0", 0, 0.05, 70.0, 69.0),
            record("st-s1", 1, 0.05, 72.0, 70.0),
            record("st-s2", 2, 0.05, 74.0, 71.0),
            record("hi-lr", 0, 0.1, 60.0, 59.5),
        ];
        let t = table(&runs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // mean 72, sample std 2 (population std would be 1.63).
        assert!(
            lines[1].starts_with("st ")
                && lines[1].contains("0,1,2")
                && lines[1].contains("72.00 ± 2.00")
                && lines[1].contains("70.00 ± 1.00"),
            "{t}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["hi-lr", "0", "60.00", "59.50"],
            "{t}"
        );
    }
}
