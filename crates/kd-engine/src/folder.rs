//! The rules of a run folder: one folder holds one run.
//!
//! - Starting a run needs a folder that does not exist or is empty.
//! - Resuming needs the folder of that run, and the same plan as the one
//!   it saved in `plan.yaml`; with `extend`, the last stage may have more
//!   epochs than before and nothing else may differ.
//! - Overwriting moves the old folder to `<out>/.archive/<name>.<unix
//!   seconds>` before the new run starts.
//!
//! [`check`] decides without writing anything, so a command can check all
//! its runs before the first one changes a folder; [`open`] checks again
//! and then writes.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::plan::Plan;

/// What a command asks of a run's folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Start,
    Resume { extend: bool },
    Overwrite,
}

#[derive(Debug, Error)]
pub enum FolderError {
    #[error(
        "run folder {} already holds run `{name}`; continue it with --resume, start it again with --overwrite (the old folder is archived), or give the run another name",
        dir.display()
    )]
    Exists { dir: PathBuf, name: String },
    #[error(
        "{} exists and is not a run folder; pick another name or --out",
        dir.display()
    )]
    Foreign { dir: PathBuf },
    #[error("nothing to resume: there is no run in {} (drop --resume to start it)", dir.display())]
    Missing { dir: PathBuf },
    #[error(
        "cannot resume {}: this plan differs from the one it saved, in {}; {}",
        dir.display(),
        fields.join(", "),
        if *extend_would_do {
            "pass --extend to train the last stage longer"
        } else {
            "resume with the plan it saved (see its plan.yaml), or start again with --overwrite"
        }
    )]
    Differs {
        dir: PathBuf,
        fields: Vec<String>,
        extend_would_do: bool,
    },
    #[error("{}: {msg}", path.display())]
    Saved { path: PathBuf, msg: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
}

/// What [`open`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new run (in a new or empty folder).
    Started,
    /// The old run moved here first.
    Archived(PathBuf),
    /// The saved run continues with its own plan.
    Resumed,
    /// The saved run continues with more epochs; the differences, as
    /// `field: old -> new`.
    Extended(Vec<String>),
}

/// Whether `dir` holds a run: its plan, journal or checkpoint.
pub fn holds_run(dir: &Path) -> bool {
    ["plan.yaml", "journal.jsonl", "checkpoint.safetensors"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Decides what `mode` does with `dir` for `plan`; writes nothing.
pub fn check(plan: &Plan, dir: &Path, mode: Mode) -> Result<Opened, FolderError> {
    let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
    match mode {
        Mode::Start if empty => Ok(Opened::Started),
        Mode::Start if holds_run(dir) => Err(FolderError::Exists {
            dir: dir.to_path_buf(),
            name: plan.name.clone(),
        }),
        Mode::Start => Err(FolderError::Foreign {
            dir: dir.to_path_buf(),
        }),
        Mode::Overwrite if empty => Ok(Opened::Started),
        Mode::Overwrite if holds_run(dir) => Ok(Opened::Archived(archive_path(dir))),
        Mode::Overwrite => Err(FolderError::Foreign {
            dir: dir.to_path_buf(),
        }),
        Mode::Resume { extend } => {
            let saved_path = dir.join("plan.yaml");
            if !saved_path.exists() {
                return Err(FolderError::Missing {
                    dir: dir.to_path_buf(),
                });
            }
            let saved = canonical(&read_saved(&saved_path)?);
            let diffs = differences(&saved, &canonical(plan));
            if diffs.is_empty() {
                return Ok(Opened::Resumed);
            }
            let last = plan.stages.len().saturating_sub(1);
            let extends = saved.stages.len() == plan.stages.len()
                && diffs.iter().all(|d| {
                    d.path == format!("stages.{last}.epochs")
                        && plan.stages[last].epochs > saved.stages[last].epochs
                });
            let fields = diffs.iter().map(Diff::to_string).collect();
            match (extends, extend) {
                (true, true) => Ok(Opened::Extended(fields)),
                _ => Err(FolderError::Differs {
                    dir: dir.to_path_buf(),
                    fields,
                    extend_would_do: extends,
                }),
            }
        }
    }
}

/// Checks as [`check`] does, then prepares the folder: archives the old
/// run, creates the folder, writes `plan.yaml` (kept as it is on a plain
/// resume).
pub fn open(plan: &Plan, dir: &Path, mode: Mode) -> Result<Opened, FolderError> {
    let opened = check(plan, dir, mode)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| FolderError::Io { path, err }
    };
    if let Opened::Archived(to) = &opened {
        move_to(dir, to)?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if opened != Opened::Resumed {
        let yaml = serde_saphyr::to_string(&canonical(plan)).map_err(|e| FolderError::Saved {
            path: dir.join("plan.yaml"),
            msg: e.to_string(),
        })?;
        let path = dir.join("plan.yaml");
        std::fs::write(&path, yaml).map_err(io(&path))?;
    }
    Ok(opened)
}

/// Moves `dir` (a run, or a sweep's folder) to `<out>/.archive/`, as
/// `--overwrite` does; returns where it went.
pub fn archive(dir: &Path) -> Result<PathBuf, FolderError> {
    let to = archive_path(dir);
    move_to(dir, &to)?;
    Ok(to)
}

fn move_to(dir: &Path, to: &Path) -> Result<(), FolderError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| FolderError::Io { path, err }
    };
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(dir, to).map_err(io(dir))
}

/// `<out>/.archive/<name>.<unix seconds>`, numbered on if taken.
fn archive_path(dir: &Path) -> PathBuf {
    let out = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.{secs}", name.unwrap_or_else(|| "run".into()));
    let mut to = out.join(".archive").join(&base);
    let mut n = 1;
    while to.exists() {
        to = out.join(".archive").join(format!("{base}.{n}"));
        n += 1;
    }
    to
}

pub(crate) fn read_saved(path: &Path) -> Result<Plan, FolderError> {
    let text = std::fs::read_to_string(path).map_err(|err| FolderError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| FolderError::Saved {
        path: path.to_path_buf(),
        msg: format!("not a plan kd can read ({e})"),
    })
}

/// `plan` in the form runs are saved and compared in, so that a resume
/// compares meaning, not spelling: files and folders as absolute paths
/// with links resolved (the same teacher from another working directory is
/// the same teacher), a TorchScript architecture with its file's SHA-256
/// (a changed module is a change), and method configs with every default
/// filled in (a default given explicitly is no change).
pub fn canonical(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    let absolute = |path: &mut PathBuf| {
        if let Ok(c) = path.canonicalize() {
            *path = c;
        }
    };
    for model in std::iter::once(&mut p.student).chain(p.teacher.as_mut()) {
        if let Some(w) = model.weights.as_mut() {
            absolute(w);
        }
        if let Some(given) = model.source_file().map(std::path::Path::to_path_buf) {
            let mut file = given.clone();
            absolute(&mut file);
            model.arch =
                model
                    .arch
                    .replacen(&given.display().to_string(), &file.display().to_string(), 1);
            // A saved plan keeps the SHA-256 it was saved with; a new one
            // gets the file's, so a changed file is a difference.
            if model.source_sha256.is_none() {
                model.source_sha256 = crate::tensors::sha256_file(&file);
            }
        }
    }
    match &mut p.data.source {
        kd_data::DataSource::Cifar10 { path }
        | kd_data::DataSource::Cifar100 { path }
        | kd_data::DataSource::ImageFolder { path, .. } => absolute(path),
        _ => {}
    }
    if let Ok(registry) = kd_core::Registry::global() {
        for m in p.stages.iter_mut().flat_map(|s| s.methods.iter_mut()) {
            if let Ok(c) = registry
                .get(&m.method)
                .and_then(|e| e.resolve_config(m.config.clone()))
            {
                m.config = c;
            }
        }
    }
    p
}

/// Settings that cannot change a run's numbers, so a resume may change
/// them (docs/runs.md lists them): whether undecodable images are skipped
/// (a run that met one stopped with an error, so any run that trained
/// skipped nothing), and the reference number the report compares with.
fn free_to_change(path: &str) -> bool {
    path.ends_with(".skip_corrupt") || path == "paper" || path.starts_with("paper.")
}

/// Weights files compared by contents where their paths differ: the same
/// file copied or moved is the same teacher.
fn same_contents(diff: &Diff) -> bool {
    diff.path.ends_with(".weights")
        && matches!(
            (crate::tensors::sha256_file(Path::new(&diff.old)), crate::tensors::sha256_file(Path::new(&diff.new))),
            (Some(a), Some(b)) if a == b
        )
}

/// One field in which two plans differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    /// Dotted path, e.g. `stages.0.optimizer.lr`.
    pub path: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.path, self.old, self.new)
    }
}

/// Every leaf in which `new` differs from `old` and the numbers can, in
/// order.
pub fn differences(old: &Plan, new: &Plan) -> Vec<Diff> {
    let mut out = value_differences(&to_value(old), &to_value(new));
    out.retain(|d| !free_to_change(&d.path) && !same_contents(d));
    out
}

/// Every leaf in which JSON value `new` differs from `old`, by dotted path.
pub(crate) fn value_differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<Diff> {
    let mut out = Vec::new();
    diff("", old, new, &mut out);
    out
}

fn to_value(plan: &Plan) -> serde_json::Value {
    serde_json::to_value(plan).unwrap_or(serde_json::Value::Null)
}

fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<Diff>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    let show = |v: Option<&Value>| match v {
        None | Some(Value::Null) => "(none)".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff(&join(k), p, q, out),
                    (p, q) => out.push(Diff {
                        path: join(k),
                        old: show(p),
                        new: show(q),
                    }),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&join(&i.to_string()), p, q, out);
            }
        }
        (Value::Array(x), Value::Array(y)) => out.push(Diff {
            path: path.to_string(),
            old: format!("{} entries", x.len()),
            new: format!("{} entries", y.len()),
        }),
        _ if a != b => out.push(Diff {
            path: path.to_string(),
            old: show(Some(a)),
            new: show(Some(b)),
        }),
        _ => {}
    }
}
