//! `kd report`: the finished runs under some folders, each counted once
//! however many copies of its folder there are, one row per configuration
//! (runs differing only in name and seed), as a Markdown table and a bar
//! chart, each with the source's number where the plan carries one.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kd_engine::report::{Summary, group, markdown, one_per_run};
use kd_engine::saved;
use kd_tracking::{Bar, plot_bars};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Run folders, sweep folders or output folders; every finished run
    /// under them is reported.
    #[arg(default_value = "runs")]
    pub runs: Vec<PathBuf>,
    /// Folder for `report.md` and `report.png`.
    #[arg(long, short, default_value = ".")]
    pub out: PathBuf,
}

pub fn report(args: &ReportArgs) -> Result<()> {
    let dirs = saved::find(&args.runs)?;
    let mut runs = Vec::new();
    for dir in &dirs {
        match saved::read(dir) {
            Ok(run) => runs.push(run),
            Err(s) => eprintln!("kd report: left out {}: {}", s.dir.display(), s.why),
        }
    }
    if runs.is_empty() {
        bail!(
            "no finished runs under {}; a run folder holds plan.yaml and epochs.jsonl",
            list(&args.runs)
        );
    }
    // Copies of one run folder (the same journal) are one run, not seeds.
    let ids: Vec<Option<String>> = runs
        .iter()
        .map(|(_, r)| kd_tracking::run_identity(&r.run_dir).ok().flatten())
        .collect();
    let with_ids: Vec<_> = ids
        .iter()
        .zip(&runs)
        .map(|(id, (p, r))| (id.as_deref(), p, r))
        .collect();
    let (distinct, copies) = one_per_run(&with_ids);
    for c in &copies {
        eprintln!(
            "kd report: {} is a copy of {} (the same run); counted once",
            c.left_out.display(),
            c.kept.display()
        );
    }
    let rows = group(&distinct);
    let table = markdown(&rows);
    print!("{table}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let md = args.out.join("report.md");
    std::fs::write(&md, &table).with_context(|| format!("cannot write {}", md.display()))?;
    let png = args.out.join("report.png");
    plot_bars(&bars(&rows), &title(&rows), &png)
        .with_context(|| format!("cannot draw {}", png.display()))?;
    eprintln!("kd report: {} and {}", md.display(), png.display());
    Ok(())
}

/// A row's best and last top-1 (the std left out for a single run).
fn bars(rows: &[Summary]) -> Vec<Bar> {
    rows.iter()
        .map(|r| {
            let spread =
                |(mean, std): (f64, f64)| (mean, if r.seeds.len() > 1 { std } else { f64::NAN });
            Bar {
                label: r.config.clone(),
                best: spread(r.best),
                last: spread(r.last),
                paper: r.paper.as_ref().map(|p| p.top1),
            }
        })
        .collect()
}

fn title(rows: &[Summary]) -> String {
    let papers = rows.iter().any(|r| r.paper.is_some());
    let base = "test top-1 (%), mean and std over seeds";
    if papers {
        format!("{base}; red: the source's number")
    } else {
        base.to_string()
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_has_a_best_and_a_last_bar() {
        let row = |seeds: Vec<u64>| Summary {
            config: "st".into(),
            seeds,
            best: (72.0, 2.0),
            last: (70.0, 1.0),
            paper: None,
            repeated: vec![],
        };
        let b = bars(&[row(vec![0, 1]), row(vec![0])]);
        assert_eq!((b[0].best, b[0].last), ((72.0, 2.0), (70.0, 1.0)));
        assert_eq!((b[1].best.0, b[1].last.0), (72.0, 70.0));
        assert!(
            b[1].best.1.is_nan() && b[1].last.1.is_nan(),
            "no spread of one run"
        );
    }
}
