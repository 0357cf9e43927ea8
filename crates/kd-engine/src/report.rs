//! Summaries of several runs, one table for every command: a row per
//! configuration with its seeds and the mean ± sample standard deviation of
//! the best and the last test top-1 of each run's last stage, and where the
//! plan carries its source's number, that number and the gap to it.

use std::path::PathBuf;

use crate::{Paper, PaperEpoch, Plan, RunResult};

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub config: String,
    pub seeds: Vec<u64>,
    pub best: (f64, f64),
    pub last: (f64, f64),
    pub paper: Option<Paper>,
    /// Seeds held by more than one distinct run of the row, with those
    /// runs' folders: each still counts in the mean and std as a run of
    /// its own, which a reader must be told (a rerun of one seed is not a
    /// new sample of the seed-to-seed spread).
    pub repeated: Vec<(u64, Vec<PathBuf>)>,
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
    let mut by_seed: Vec<(u64, Vec<PathBuf>)> = Vec::new();
    for (p, r) in runs {
        match by_seed.iter_mut().find(|(s, _)| *s == p.seed) {
            Some((_, dirs)) => dirs.push(r.run_dir.clone()),
            None => by_seed.push((p.seed, vec![r.run_dir.clone()])),
        }
    }
    by_seed.retain(|(_, dirs)| dirs.len() > 1);
    Summary {
        config: config.to_string(),
        seeds: runs.iter().map(|(p, _)| p.seed).collect(),
        best: mean_std(&pick(|r| r.last().map(|s| s.best_top1))),
        last: mean_std(&pick(|r| r.last().map(|s| s.last_top1))),
        paper: runs.first().and_then(|(p, _)| p.paper.clone()),
        repeated: by_seed,
    }
}

/// A copy of a run's folder that [`one_per_run`] left out, and the folder
/// of the same run it kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    pub left_out: PathBuf,
    pub kept: PathBuf,
}

/// Each run once: of runs with the same identity (the same run, its folder
/// copied to another `--out`), the first is kept. A run without an identity
/// (`None`) is taken as distinct from every other.
pub fn one_per_run<'a>(
    runs: &[(Option<&str>, &'a Plan, &'a RunResult)],
) -> (Vec<(&'a Plan, &'a RunResult)>, Vec<Copied>) {
    let mut kept: Vec<(Option<&str>, &'a Plan, &'a RunResult)> = Vec::new();
    let mut copies = Vec::new();
    for &(id, plan, result) in runs {
        match kept.iter().find(|(k, _, _)| id.is_some() && *k == id) {
            Some((_, _, first)) => copies.push(Copied {
                left_out: result.run_dir.clone(),
                kept: first.run_dir.clone(),
            }),
            None => kept.push((id, plan, result)),
        }
    }
    let kept = kept.into_iter().map(|(_, p, r)| (p, r)).collect();
    (kept, copies)
}

/// Rows for runs that may differ: runs whose plans differ only in name and
/// seed form one configuration (world size and batch size are part of the
/// plan, so a 2-rank run and a 1-process run of one plan are two rows),
/// labelled by their names without the seed. Each entry counts as a run of
/// its own; [`one_per_run`] first takes out copies of one run.
pub fn group(runs: &[(&Plan, &RunResult)]) -> Vec<Summary> {
    let mut groups: Vec<(serde_json::Value, Vec<(&Plan, &RunResult)>)> = Vec::new();
    for &(plan, result) in runs {
        let key = configuration(plan);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push((plan, result)),
            None => groups.push((key, vec![(plan, result)])),
        }
    }
    let labels = unique_labels(&groups);
    groups
        .iter()
        .zip(labels)
        .map(|((_, members), label)| summarize(&label, members))
        .collect()
}

fn configuration(plan: &Plan) -> serde_json::Value {
    let mut p = plan.clone();
    p.name.clear();
    p.seed = 0;
    serde_json::to_value(&p).unwrap_or_default()
}

/// A run's name without the seed marker sweeps and recipes give it: a
/// separator (`_`, `-`, `.`), `s` or `seed`, and the run's own seed.
fn unseeded(plan: &Plan) -> &str {
    for marker in ["s", "seed"] {
        for sep in ['_', '-', '.'] {
            let suffix = format!("{sep}{marker}{}", plan.seed);
            if let Some(base) = plan.name.strip_suffix(&suffix)
                && !base.is_empty()
            {
                return base;
            }
        }
    }
    &plan.name
}

/// The common prefix of the members' names without their seeds (a single
/// run's name without its seed).
fn label(members: &[(&Plan, &RunResult)]) -> String {
    let first = unseeded(members[0].0);
    let mut prefix = first;
    for (p, _) in &members[1..] {
        let common = prefix
            .chars()
            .zip(unseeded(p).chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        prefix = &prefix[..common];
    }
    let prefix = prefix.trim_end_matches(['-', '_', '.', ' ']);
    if prefix.is_empty() {
        first.to_string()
    } else {
        prefix.to_string()
    }
}

/// A label per group, no two alike: groups whose names give the same label
/// get what tells them apart, the effective batch first (the same plan run
/// by one process and by two ranks), then the plan fields they differ in.
fn unique_labels(groups: &[(serde_json::Value, Vec<(&Plan, &RunResult)>)]) -> Vec<String> {
    let base: Vec<String> = groups.iter().map(|(_, m)| label(m)).collect();
    let mut labels = base.clone();
    for (i, (key, members)) in groups.iter().enumerate() {
        let alike: Vec<usize> = (0..groups.len())
            .filter(|&j| j != i && base[j] == base[i])
            .collect();
        if alike.is_empty() {
            continue;
        }
        let data = &members[0].0.data;
        let other_data = |j: usize| &groups[j].1[0].0.data;
        let mut parts = Vec::new();
        if alike
            .iter()
            .any(|&j| other_data(j).effective_batch() != data.effective_batch())
        {
            parts.push(format!("batch {}", data.effective_batch()));
        }
        let batch_shown = !parts.is_empty();
        // The fields in which this group differs from any of the alike
        // ones, with this group's values, in plan order.
        let mut fields: Vec<crate::folder::Diff> = Vec::new();
        for &j in &alike {
            for d in crate::folder::value_differences(&groups[j].0, key) {
                if !fields.iter().any(|f| f.path == d.path) {
                    fields.push(d);
                }
            }
        }
        fields.sort_by(|a, b| a.path.cmp(&b.path));
        parts.extend(
            fields
                .iter()
                // The batch's two factors are in `batch N` already when it differs.
                .filter(|d| {
                    !batch_shown
                        || !matches!(d.path.as_str(), "data.batch_size" | "data.world_size")
                })
                .take(2)
                .map(|d| format!("{} {}", d.path, d.new)),
        );
        if !parts.is_empty() {
            labels[i] = format!("{} ({})", base[i], parts.join(", "));
        }
    }
    // Groups still alike (differing beyond the two fields shown, or only
    // in fields the others have) are numbered rather than shown as one.
    for i in 0..labels.len() {
        let before = labels[..i].iter().filter(|l| **l == labels[i]).count();
        if before > 0 {
            labels[i] = format!("{} #{}", labels[i], before + 1);
        }
    }
    labels
}

/// What a row's seeds cell adds when a seed has several distinct runs:
/// visible in the row itself, not only in a note below the table.
fn repeated(r: &Summary) -> String {
    if r.repeated.is_empty() {
        return String::new();
    }
    let seeds: Vec<String> = r.repeated.iter().map(|(s, _)| s.to_string()).collect();
    format!(", repeated seed {} (see note)", seeds.join(", "))
}

/// One line per seed that several distinct runs of a row hold, naming
/// their folders.
pub fn notes(rows: &[Summary]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        for (seed, dirs) in &r.repeated {
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            out.push(format!(
                "`{}` holds {} different runs of seed {seed} ({}): each counts in the mean and std as a run of its own; report one of the folders to keep one.",
                r.config,
                dirs.len(),
                dirs.join(", ")
            ));
        }
    }
    out
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
            format!("{}{}", seeds.join(","), repeated(r)),
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
    for n in notes(rows) {
        out.push_str(&format!("note: {n}\n"));
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
            "| {} | {} ({}){} | {} | {} |",
            r.config.replace('|', "\\|"),
            n,
            seeds.join(", "),
            repeated(r),
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
    let notes = notes(rows);
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&format!("Note: {n}\n"));
        }
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
            clip_grad: None,
            ema: None,
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
            student: ModelPlan::new("resnet8"),
            teacher: None,
            teacher_cache: None,
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
            run_dir: format!("out/{name}").into(),
            stages: vec![st],
        };
        (plan, result)
    }

    fn refs(runs: &[(Plan, RunResult)]) -> Vec<(&Plan, &RunResult)> {
        runs.iter().map(|(p, r)| (p, r)).collect()
    }

    fn labels(rows: &[Summary]) -> Vec<&str> {
        rows.iter().map(|r| r.config.as_str()).collect()
    }

    #[test]
    fn labels_leave_out_the_seed_even_for_a_single_run() {
        let runs = [
            record("teacher_resnet20_s0", 0, 0.05, 90.0, 89.0),
            // Digits that are not the seed marker stay.
            record("resnet20", 0, 0.1, 80.0, 79.0),
            record("wrn_40_2-seed3", 3, 0.2, 70.0, 69.0),
            record("lr_s1", 0, 0.3, 60.0, 59.0),
        ];
        assert_eq!(
            labels(&group(&refs(&runs))),
            ["teacher_resnet20", "resnet20", "wrn_40_2", "lr_s1"]
        );
    }

    #[test]
    fn world_sizes_are_rows_of_their_own_told_apart_by_the_effective_batch() {
        let mut runs = [
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s1", 1, 0.05, 72.0, 71.0),
            record("st_s0", 0, 0.05, 60.0, 59.0),
        ];
        runs[2].0.data.world_size = 2;
        let rows = group(&refs(&runs));
        assert_eq!(labels(&rows), ["st (batch 64)", "st (batch 128)"]);
        assert_eq!(rows[0].seeds, [0, 1]);
        assert_eq!(rows[1].seeds, [0]);
        assert_eq!(rows[1].best, (60.0, 0.0));
    }

    #[test]
    fn rows_alike_in_name_show_the_fields_they_differ_in() {
        let runs = [
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s0", 0, 0.1, 60.0, 59.0),
        ];
        assert_eq!(
            labels(&group(&refs(&runs))),
            [
                "st (stages.0.optimizer.lr 0.05)",
                "st (stages.0.optimizer.lr 0.1)"
            ]
        );
    }

    #[test]
    fn copies_of_one_run_count_once() {
        let runs = [
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s1", 1, 0.05, 72.0, 71.0),
        ];
        let ids = [Some("run a"), Some("run a"), Some("run a"), None];
        let with_ids: Vec<_> = ids
            .iter()
            .zip(&runs)
            .map(|(i, (p, r))| (*i, p, r))
            .collect();
        let (kept, copies) = one_per_run(&with_ids);
        assert_eq!(kept.len(), 2);
        assert_eq!(copies.len(), 2);
        let rows = group(&kept);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].seeds, [0, 1]);
        assert!(rows[0].repeated.is_empty());
        assert_eq!(rows[0].best, (71.0, 2f64.sqrt()));
    }

    #[test]
    fn runs_without_an_identity_are_never_taken_for_copies() {
        let runs = [
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s0", 0, 0.05, 71.0, 69.0),
        ];
        let with_ids: Vec<_> = runs.iter().map(|(p, r)| (None, p, r)).collect();
        let (kept, copies) = one_per_run(&with_ids);
        assert_eq!((kept.len(), copies.len()), (2, 0));
    }

    #[test]
    fn two_runs_of_one_seed_in_a_row_are_flagged() {
        let mut runs = [
            record("st_s0", 0, 0.05, 70.0, 69.0),
            record("st_s0", 0, 0.05, 72.0, 69.0),
            record("st_s1", 1, 0.05, 74.0, 69.0),
        ];
        runs[1].1.run_dir = "other/st_s0".into();
        let rows = group(&refs(&runs));
        let md = markdown(&rows);
        assert!(
            md.contains("| st | 3 (0, 0, 1), repeated seed 0 (see note) | 72.00 ± 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("Note: `st` holds 2 different runs of seed 0 (out/st_s0, other/st_s0)"),
            "{md}"
        );
        let t = table(&rows);
        assert!(
            t.contains("0,0,1, repeated seed 0") && t.contains("note: `st`"),
            "{t}"
        );
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
