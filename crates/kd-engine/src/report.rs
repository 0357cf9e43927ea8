//! Summaries of several runs, one table for every command: a row per
//! configuration with its seeds and the mean ± sample standard deviation of
//! the best and the last test top-1 of each run's last stage, and where the
//! plan carries its source's number, that number and the gap to it.

use crate::{Paper, PaperEpoch, Plan, RunResult};

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub config: String,
    pub seeds: Vec<u64>,
    pub best: (f64, f64),
    pub last: (f64, f64),
    pub paper: Option<Paper>,
}

impl Summary {
    /// Mean top-1 of these runs less the source's number, read at the
    /// epoch the source reports (the best where it does not say).
    pub fn gap(&self) -> Option<f64> {
        self.paper
            .as_ref()
            .map(|p| paper_gap(p, self.best.0, self.last.0))
    }
}

/// A run's (or a mean's) distance to a published number: its best or last
/// top-1, as the source reports, less the source's.
pub fn paper_gap(paper: &Paper, best: f64, last: f64) -> f64 {
    match paper.epoch {
        PaperEpoch::Last => last - paper.top1,
        PaperEpoch::Best | PaperEpoch::Unstated => best - paper.top1,
    }
}

/// Mean and sample standard deviation, n − 1 (0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// One row for runs the caller knows to share a configuration.
pub fn summarize(config: &str, runs: &[(&Plan, &RunResult)]) -> Summary {
    let pick = |f: fn(&RunResult) -> Option<f64>| -> Vec<f64> {
        runs.iter().filter_map(|(_, r)| f(r)).collect()
    };
    Summary {
        config: config.to_string(),
        seeds: runs.iter().map(|(p, _)| p.seed).collect(),
        best: mean_std(&pick(|r| r.last().map(|s| s.best_top1))),
        last: mean_std(&pick(|r| r.last().map(|s| s.last_top1))),
        paper: runs.first().and_then(|(p, _)| p.paper.clone()),
    }
}

/// Rows for runs that may differ: runs whose plans differ only in name and
/// seed form one configuration, labelled by their names' common prefix.
pub fn group(runs: &[(&Plan, &RunResult)]) -> Vec<Summary> {
    let mut groups: Vec<(serde_json::Value, Vec<(&Plan, &RunResult)>)> = Vec::new();
    for &(plan, result) in runs {
        let key = configuration(plan);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push((plan, result)),
            None => groups.push((key, vec![(plan, result)])),
        }
    }
    groups
        .iter()
        .map(|(_, members)| summarize(&label(members), members))
        .collect()
}

fn configuration(plan: &Plan) -> serde_json::Value {
    let mut p = plan.clone();
    p.name.clear();
    p.seed = 0;
    serde_json::to_value(&p).unwrap_or_default()
}

/// The names' common prefix without a trailing seed marker (`-s`, `_seed`),
/// or the one name of a single run.
fn label(members: &[(&Plan, &RunResult)]) -> String {
    let first = &members[0].0.name;
    if members.len() == 1 {
        return first.clone();
    }
    let mut prefix = first.as_str();
    for (p, _) in &members[1..] {
        let common = prefix
            .chars()
            .zip(p.name.chars())
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

/// `mean ± std` to two decimals; the std is left out for a single run.
fn cell((m, s): (f64, f64), n: usize) -> String {
    if n < 2 {
        format!("{m:.2}")
    } else {
        format!("{m:.2} ± {s:.2}")
    }
}

/// A plain-text table, one row per summary; the std is left out for a
/// single run.
pub fn table(rows: &[Summary]) -> String {
    let mut cells = vec![[
        "configuration".to_string(),
        "seeds".into(),
        "best top-1 (%)".into(),
        "last top-1 (%)".into(),
    ]];
    for r in rows {
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        cells.push([
            r.config.clone(),
            seeds.join(","),
            cell(r.best, r.seeds.len()),
            cell(r.last, r.seeds.len()),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The rows as a Markdown table, with the source's number and the gap
/// when any row has one.
pub fn markdown(rows: &[Summary]) -> String {
    let papers = rows.iter().any(|r| r.paper.is_some());
    let mut out = String::from("| configuration | seeds | best top-1 (%) | last top-1 (%) |");
    if papers {
        out.push_str(" paper (%) | gap | source |");
    }
    out.push_str(if papers {
        "\n|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|\n"
    });
    for r in rows {
        let n = r.seeds.len();
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "| {} | {} ({}) | {} | {} |",
            r.config.replace('|', "\\|"),
            n,
            seeds.join(", "),
            cell(r.best, n),
            cell(r.last, n)
        ));
        if papers {
            match (&r.paper, r.gap()) {
                (Some(p), Some(gap)) => {
                    let runs = p.runs.map_or(String::new(), |k| format!(", mean of {k}"));
                    let epoch = match p.epoch {
                        PaperEpoch::Best => "best",
                        PaperEpoch::Last => "last",
                        PaperEpoch::Unstated => "epoch unstated",
                    };
                    out.push_str(&format!(
                        " {:.2} ({epoch}{runs}) | {gap:+.2} | {} |",
                        p.top1,
                        p.source.replace('|', "\\|")
                    ));
                }
                _ => out.push_str(" | | |"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelPlan, StagePlan, StageResult};

    #[test]
    fn sample_std_like_numpy_ddof1() {
        let (m, s) = mean_std(&[70.0, 71.0, 72.5]);
        assert!((m - 71.166_666_666_666_67).abs() < 1e-9);
        // numpy.std([70, 71, 72.5], ddof=1) = 1.2583057392117916
        assert!((s - 1.258_305_739_211_791_6).abs() < 1e-9);
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    }

    fn record(name: &str, seed: u64, lr: f64, best: f64, last: f64) -> (Plan, RunResult) {
        let mut stage = StagePlan {
            name: "s".into(),
            epochs: 1,
            subject: Default::default(),
            train: vec![],
            methods: vec![],
            optimizer: Default::default(),
            lr_schedule: Default::default(),
            keep_optimizer: false,
        };
        stage.optimizer.lr = lr;
        let plan = Plan {
            precision: Default::default(),
            channels_last: true,
            batchnorm: Default::default(),
            cuda_graph: false,
            paper: None,
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
        let result = RunResult {
            name: name.into(),
            run_dir: "d".into(),
            stages: vec![st],
        };
        (plan, result)
    }

    #[test]
    fn groups_by_configuration_with_sample_std() {
        let runs = [
            record("st-s0", 0, 0.05, 70.0, 69.0),
            record("st-s1", 1, 0.05, 72.0, 70.0),
            record("st-s2", 2, 0.05, 74.0, 71.0),
            record("hi-lr", 0, 0.1, 60.0, 59.5),
        ];
        let refs: Vec<(&Plan, &RunResult)> = runs.iter().map(|(p, r)| (p, r)).collect();
        let t = table(&group(&refs));
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
