//! `kd sync`: what the MLflow server missed, sent from the journals.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::out::outln;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder, or a folder of runs (default: runs).
    #[arg(default_value = "runs")]
    path: PathBuf,
    /// MLflow tracking server (else MLFLOW_TRACKING_URI, else `kd mlflow
    /// up`'s).
    #[arg(long)]
    tracking_uri: Option<String>,
}

pub fn run(a: &Args) -> Result<()> {
    let path = a.path.as_path();
    if !path.is_dir() {
        bail!(
            "{}: no such folder; give a run folder or a folder of runs",
            path.display()
        );
    }
    let single = path.join("journal.jsonl").exists();
    let root = if single {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    let uri = kd_tracking::resolve_uri(a.tracking_uri.as_deref(), None, root)
        .context("no tracking server: pass --tracking-uri, set MLFLOW_TRACKING_URI, or start one with `kd mlflow up`")?;
    let reports = if single {
        vec![(path.to_path_buf(), kd_tracking::sync(path, &uri))]
    } else {
        kd_tracking::sync_all(path, &uri)
    };
    let mut failed = 0;
    for (dir, r) in reports {
        match r {
            Ok(rep) => outln!(
                "{}: {} sent{}",
                dir.display(),
                rep.shipped,
                rep.closed_as
                    .map(|s| format!(", closed as {s:?}"))
                    .unwrap_or_default()
            )?,
            Err(e) => {
                failed += 1;
                eprintln!("{}: {e}", dir.display());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} run(s) could not be synced");
    }
    Ok(())
}
