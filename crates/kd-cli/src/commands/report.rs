//! `kd report`: the finished runs under some folders, one row per
//! configuration (runs differing only in name and seed), as a Markdown
//! table and a bar chart, each with the source's number where the plan
//! carries one.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kd_engine::report::{Summary, group, markdown};
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
    let pairs: Vec<_> = runs.iter().map(|(p, r)| (p, r)).collect();
    let rows = group(&pairs);
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

/// Bars of the number each row is compared at: the last epoch's mean where
/// the source reports the last epoch, else the best's.
fn bars(rows: &[Summary]) -> Vec<Bar> {
    rows.iter()
        .map(|r| {
            let last = r
                .paper
                .as_ref()
                .is_some_and(|p| p.epoch == kd_engine::PaperEpoch::Last);
            let (mean, std) = if last { r.last } else { r.best };
            let label = if last {
                format!("{} (last)", r.config)
            } else {
                r.config.clone()
            };
            Bar {
                label,
                mean,
                std: if r.seeds.len() > 1 { std } else { f64::NAN },
                paper: r.paper.as_ref().map(|p| p.top1),
            }
        })
        .collect()
}

fn title(rows: &[Summary]) -> String {
    let papers = rows.iter().any(|r| r.paper.is_some());
    let base = "best test top-1 (%), mean and std over seeds";
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
