//! Running plans: run folders, tracking sessions, lockstep groups and
//! sweeps. Every command that trains goes through [`execute_all`] or
//! [`run_batch`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use kd_core::Registry;
use kd_engine::report::summarize;
use kd_engine::{NoScripts, Plan, RunOptions, RunResult};

use crate::train::{self, TrainArgs};

use crate::{console, track};

/// Each plan with the result of running it.
pub(crate) fn paired<'a>(
    plans: &'a [Plan],
    results: &'a [RunResult],
) -> Vec<(&'a Plan, &'a RunResult)> {
    plans.iter().zip(results).collect()
}

thread_local! {
    /// The command being run, as the user would type it again with
    /// `--resume` (what an interrupted run tells them).
    static RESUME_COMMAND: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Remembers the command line for the interrupt message: `args` as given,
/// with `--resume` in place of `--overwrite` (the old run is the one to
/// continue) and added where missing.
pub(crate) fn remember_command(args: &[std::ffi::OsString]) {
    let mut words: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a != "--overwrite")
        .collect();
    if let Some(first) = words.first_mut() {
        *first = "kd".into();
    }
    if !words.iter().any(|w| w == "--resume") {
        words.push("--resume".into());
    }
    let line = words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
    RESUME_COMMAND.with(|c| *c.borrow_mut() = line);
}

/// `w` as a POSIX shell reads it back.
fn quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

fn resume_command() -> String {
    RESUME_COMMAND.with(|c| c.borrow().clone())
}

/// The plans of this launch, stamped with its data-parallel world size:
/// the launch decides it, as it decides the effective batch, and the run
/// folder's plan records it (a resume with another is refused, reports
/// keep the two apart). A saved plan made for another world size says so.
pub(crate) fn stamped(mut plans: Vec<Plan>) -> Vec<Plan> {
    let world = kd_dist::world_size();
    for p in &mut plans {
        if p.data.world_size != world && kd_dist::is_main() {
            eprintln!(
                "{}: the plan says {} process(es) (effective batch {}); this launch has {world} (effective batch {})",
                p.name,
                p.data.world_size,
                p.data.effective_batch(),
                p.data.batch_size * world
            );
        }
        p.data.world_size = world;
    }
    plans
}

/// Everything a flag command (`train-teacher`, `distill`) will run, as
/// batches of plans with their sweep's name, checked before anything is
/// written: every plan validated, every run name distinct, every folder
/// ready for the command.
pub(crate) fn check_all(
    registry: &Registry,
    batches: &[(&Vec<Plan>, &String)],
    train: &TrainArgs,
) -> Result<()> {
    let mut plans = Vec::new();
    let mut parents = Vec::new();
    for (batch, sweep) in batches {
        for p in batch.iter() {
            kd_engine::validate(p, registry, &NoScripts, &[])
                .with_context(|| format!("plan `{}`", p.name))?;
            plans.push(p.clone());
        }
        if batch.len() > 1 {
            parents.push(sweep.to_string());
        }
    }
    preflight(&plans, &train.exec(), &parents)
}

/// Several plans as child runs of one parent run, which gets the summary.
/// Plans that share their teacher weights, data, seed and batch size train
/// in lockstep (one teacher forward per batch for all of them) unless
/// `ex.solo`; each run's results are those it gets alone.
pub fn run_sweep(
    registry: &Registry,
    plans: &[Plan],
    ex: &Exec,
    sweep: &str,
) -> Result<Vec<RunResult>> {
    if plans.len() == 1 {
        return Ok(vec![execute(registry, &plans[0], ex, None)?]);
    }
    if !kd_dist::is_main() {
        // Other ranks train the same runs and record nothing.
        return run_batch(registry, plans, ex).into_iter().collect();
    }
    let uri = kd_tracking::resolve_uri(ex.tracking_uri, None, ex.out);
    let spec = kd_tracking::RunSpec::new(track::EXPERIMENT)
        .name(sweep.to_string())
        .tracking_uri(uri)
        .tag("kd.sweep", plans.len().to_string());
    let dir = ex.out.join(sweep);
    if ex.folders.overwrite && kd_engine::folder::holds_run(&dir) {
        kd_engine::folder::archive(&dir)?;
    }
    let parent = kd_tracking::Tracker::start(dir, spec)?;
    let mut results: Vec<Option<RunResult>> = plans.iter().map(|_| None).collect();
    for group in lockstep_groups(plans, ex.solo) {
        let members: Vec<Plan> = group.iter().map(|&i| plans[i].clone()).collect();
        let mut failed = None;
        for (&i, r) in group
            .iter()
            .zip(execute_group(registry, &members, ex, Some(&parent))?)
        {
            match r {
                Ok(r) => results[i] = Some(r),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            parent.finish(kd_tracking::RunStatus::Failed);
            return Err(e);
        }
    }
    let results: Vec<RunResult> = results.into_iter().flatten().collect();
    let s = summarize(sweep, &paired(plans, &results));
    for (k, v) in [
        ("best_top1_mean", s.best.0),
        ("best_top1_std", s.best.1),
        ("last_top1_mean", s.last.0),
        ("last_top1_std", s.last.1),
    ] {
        parent.metric(&format!("sweep/{k}"), v, 0);
    }
    parent.finish(kd_tracking::RunStatus::Finished);
    Ok(results)
}

/// The plans of a recipe's `run(...)` or `run_all(...)`, in lockstep groups
/// (unless `ex.solo`); one result per plan.
pub(crate) fn run_batch(registry: &Registry, plans: &[Plan], ex: &Exec) -> Vec<Result<RunResult>> {
    let mut results: Vec<Option<Result<RunResult>>> = plans.iter().map(|_| None).collect();
    for group in lockstep_groups(plans, ex.solo) {
        let members: Vec<Plan> = group.iter().map(|&i| plans[i].clone()).collect();
        match execute_group(registry, &members, ex, None) {
            Ok(rs) => group
                .iter()
                .zip(rs)
                .for_each(|(&i, r)| results[i] = Some(r)),
            Err(e) => {
                let msg = format!("{e:#}");
                group
                    .iter()
                    .for_each(|&i| results[i] = Some(Err(anyhow::anyhow!("{msg}"))));
            }
        }
    }
    results.into_iter().flatten().collect()
}

/// Indices of the plans, grouped by [`kd_engine::lockstep_key`] in order of
/// first appearance; every plan alone when `solo` or when it has no key.
fn lockstep_groups(plans: &[Plan], solo: bool) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let key = if solo {
            None
        } else {
            kd_engine::lockstep_key(p)
        };
        match groups.iter_mut().find(|(k, _)| key.is_some() && *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups.into_iter().map(|(_, m)| m).collect()
}

/// Set by Ctrl-C, SIGTERM or SIGHUP (torchrun, SLURM's preemption and
/// `--signal`, `docker stop`); the engine stops at the next step, keeping
/// its checkpoint, and the run ends KILLED, resumable.
fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

/// Checks every run folder of a command before any is changed: the rules of
/// [`kd_engine::folder`], and for `--resume`, that at least one of the runs
/// exists (the others are runs an interrupted sweep had not reached).
/// `parents`: sweep folders (their runs hold only a journal).
pub(crate) fn preflight(plans: &[Plan], ex: &Exec, parents: &[String]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for name in plans.iter().map(|p| &p.name).chain(parents) {
        if !seen.insert(name) {
            bail!(
                "this command would create run `{name}` twice (in {}); give every seed, method group and baseline its own name (distinct --seeds, --compare groups of other methods, another --name)",
                ex.out.join(name).display()
            );
        }
    }
    let dirs: Vec<PathBuf> = plans.iter().map(|p| ex.out.join(&p.name)).collect();
    if ex.folders.resume && !dirs.iter().any(|d| kd_engine::folder::holds_run(d)) {
        let dir = dirs
            .first()
            .cloned()
            .unwrap_or_else(|| ex.out.to_path_buf());
        return Err(kd_engine::folder::FolderError::Missing { dir }.into());
    }
    for (plan, dir) in plans.iter().zip(&dirs) {
        kd_engine::folder::check(plan, dir, folder_mode(ex, dir))?;
    }
    // Every rank checks before rank 0 writes anything.
    if let Some(g) = kd_dist::group() {
        g.barrier()?;
    }
    for name in parents {
        let dir = ex.out.join(name);
        if !ex.folders.resume && !ex.folders.overwrite && kd_engine::folder::holds_run(&dir) {
            bail!(
                "sweep folder {} already holds sweep `{name}`; continue it with --resume, start it again with --overwrite, or give the runs another name",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The folder rule for one run of the command.
fn folder_mode(ex: &Exec, dir: &Path) -> kd_engine::folder::Mode {
    use kd_engine::folder::Mode;
    let f = ex.folders;
    match (f.resume, f.overwrite) {
        (true, _) if kd_engine::folder::holds_run(dir) => Mode::Resume { extend: f.extend },
        (true, _) => Mode::Start,
        (false, true) => Mode::Overwrite,
        (false, false) => Mode::Start,
    }
}

/// Where and how plans run: output folder, resume, tracking.
pub struct Exec<'a> {
    pub out: &'a Path,
    pub folders: train::FolderArgs,
    /// Run the plans of a sweep one after another, never in lockstep.
    pub solo: bool,
    pub tracking_uri: Option<&'a str>,
    pub recipe: Option<&'a Path>,
    pub scripts: &'a dyn kd_engine::ScheduleResolver,
}

/// Runs one plan in `out/<plan name>`, printing epochs to stderr and logging
/// to MLflow (journal first) as a run, or a child run of `parent`.
pub fn execute(
    registry: &Registry,
    plan: &Plan,
    ex: &Exec,
    parent: Option<&kd_tracking::Tracker>,
) -> Result<RunResult> {
    execute_group(registry, std::slice::from_ref(plan), ex, parent)?
        .pop()
        .expect("one result per plan")
}

/// What one run keeps open while it trains: its folder, tracking and log.
struct Session {
    name: String,
    run_dir: PathBuf,
    tracking: track::Tracking,
    log: Option<std::fs::File>,
    journal_only: bool,
    /// `--tracking-uri`, repeated in the hint to sync.
    flag_uri: Option<String>,
    resume: bool,
}

impl Session {
    fn start(plan: &Plan, ex: &Exec, parent: Option<&kd_tracking::Tracker>) -> Result<Session> {
        use kd_engine::folder::Opened;
        let run_dir = ex.out.join(&plan.name);
        let device = format!("{:?}", kd_engine::device(plan.device)?);
        let opened = kd_engine::folder::open(plan, &run_dir, folder_mode(ex, &run_dir))?;
        let uri = kd_tracking::resolve_uri(ex.tracking_uri, None, ex.out);
        let journal_only = uri.is_none();
        let mut tags = track::run_tags(plan, &device, ex.recipe);
        match &opened {
            Opened::Archived(to) => {
                eprintln!("{}: the old run moved to {}", plan.name, to.display());
                tags.push(("kd.overwrote".into(), to.display().to_string()));
            }
            Opened::Extended(fields) => {
                eprintln!("{}: extended ({})", plan.name, fields.join(", "));
                tags.push(("kd.extended".into(), fields.join("; ")));
            }
            _ => {}
        }
        let resumed = matches!(opened, Opened::Resumed | Opened::Extended(_));
        let tracking = track::Tracking::start(&run_dir, plan, uri, parent, tags, !resumed)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("console.log"))
            .ok();
        let start = start_line(plan, &device, resumed);
        eprintln!("{start}");
        if let Some(f) = &mut log {
            use std::io::Write;
            let _ = writeln!(f, "{start}");
        }
        Ok(Session {
            name: plan.name.clone(),
            run_dir,
            tracking,
            log,
            journal_only,
            flag_uri: ex.tracking_uri.map(str::to_string),
            resume: resumed,
        })
    }

    fn finish(self, result: &Result<RunResult, kd_engine::EngineError>) {
        let status = match result {
            Ok(_) => kd_tracking::RunStatus::Finished,
            Err(kd_engine::EngineError::Interrupted(_)) => kd_tracking::RunStatus::Killed,
            Err(_) => kd_tracking::RunStatus::Failed,
        };
        let report = self.tracking.finish(&self.run_dir, status);
        if let Some(hint) = sync_hint(
            &self.run_dir,
            self.journal_only,
            report.needs_sync(),
            self.flag_uri.as_deref(),
        ) {
            eprintln!("{hint}");
        }
    }
}

/// The first line of a run: where it trains, by how many processes, and
/// the batch its optimiser steps on, which a data-parallel job multiplies.
fn start_line(plan: &Plan, device: &str, resumed: bool) -> String {
    let d = &plan.data;
    let procs = match d.world_size {
        1 => "1 process".to_string(),
        n => format!("{n} processes x batch {}", d.batch_size),
    };
    format!(
        "[{}] {} on {device}, {procs}, effective batch {}, seed {}",
        plan.name,
        if resumed { "resumes" } else { "starts" },
        d.effective_batch(),
        plan.seed
    )
}

/// What to tell the user when the server does not have the whole run yet:
/// the `kd sync` command that sends it, with the server they named.
fn sync_hint(
    dir: &Path,
    journal_only: bool,
    needs_sync: bool,
    flag_uri: Option<&str>,
) -> Option<String> {
    let dir = dir.display();
    if journal_only {
        return Some(format!(
            "tracking: no MLflow server given; the run is journaled in {dir}; `kd sync {dir} --tracking-uri URL` sends it"
        ));
    }
    let flag = flag_uri
        .map(|u| format!(" --tracking-uri {u}"))
        .unwrap_or_default();
    needs_sync.then(|| {
        format!(
            "tracking: the server has not received everything yet; `kd sync {dir}{flag}` sends the rest"
        )
    })
}

/// Runs `plans` in lockstep (see [`kd_engine::run_group`]), each in its own
/// folder with its own tracking; one result per plan.
fn execute_group(
    registry: &Registry,
    plans: &[Plan],
    ex: &Exec,
    parent: Option<&kd_tracking::Tracker>,
) -> Result<Vec<Result<RunResult>>> {
    if !kd_dist::is_main() {
        return execute_quietly(registry, plans, ex);
    }
    let mut sessions = plans
        .iter()
        .map(|p| Session::start(p, ex, parent))
        .collect::<Result<Vec<_>>>()?;
    let dirs: Vec<(PathBuf, bool)> = sessions
        .iter()
        .map(|s| (s.run_dir.clone(), s.resume))
        .collect();
    let results = {
        let mut consoles: Vec<console::Console> = sessions
            .iter_mut()
            .map(|s| console::Console {
                run: s.name.clone(),
                log: s.log.take(),
                next: Some(&mut s.tracking),
            })
            .collect();
        let mut opts: Vec<RunOptions> = consoles
            .iter_mut()
            .zip(&dirs)
            .map(|(c, (dir, resume))| RunOptions {
                run_dir: dir.clone(),
                resume: *resume,
                observer: c,
                scripts: ex.scripts,
                stop: Some(stop_flag()),
                log_every: 10,
                progress_bar: plans.len() == 1
                    && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            })
            .collect();
        kd_engine::run_group(plans, registry, &mut opts)?
    };
    Ok(sessions
        .into_iter()
        .zip(results)
        .map(|(s, r)| {
            s.finish(&r);
            r.map_err(with_resume_command)
        })
        .collect())
}

/// An interrupted run's error says the command that continues it.
fn with_resume_command(e: kd_engine::EngineError) -> anyhow::Error {
    match e {
        kd_engine::EngineError::Interrupted(ckpt) => anyhow::anyhow!(
            "interrupted at a safe point (checkpoint {}); continue with: {}",
            ckpt.display(),
            resume_command()
        ),
        e => e.into(),
    }
}

/// A rank other than 0 of a data-parallel job: the same training, reading
/// the run folder to resume, writing nothing and tracking nothing.
fn execute_quietly(
    registry: &Registry,
    plans: &[Plan],
    ex: &Exec,
) -> Result<Vec<Result<RunResult>>> {
    let mut silent: Vec<kd_engine::Silent> = plans.iter().map(|_| kd_engine::Silent).collect();
    let mut opts: Vec<RunOptions> = plans
        .iter()
        .zip(silent.iter_mut())
        .map(|(p, observer)| {
            let dir = ex.out.join(&p.name);
            RunOptions {
                resume: matches!(
                    folder_mode(ex, &dir),
                    kd_engine::folder::Mode::Resume { .. }
                ),
                run_dir: dir,
                observer,
                scripts: ex.scripts,
                stop: Some(stop_flag()),
                log_every: 10,
                progress_bar: false,
            }
        })
        .collect();
    Ok(kd_engine::run_group(plans, registry, &mut opts)?
        .into_iter()
        .map(|r| r.map_err(with_resume_command))
        .collect())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sync_hint_names_the_server_the_user_gave() {
        let dir = Path::new("runs/x_s0");
        let hint = sync_hint(dir, false, true, Some("http://h:5000")).unwrap();
        assert!(
            hint.contains("`kd sync runs/x_s0 --tracking-uri http://h:5000`"),
            "{hint}"
        );
        let hint = sync_hint(dir, false, true, None).unwrap();
        assert!(hint.contains("`kd sync runs/x_s0`"), "{hint}");
        assert_eq!(sync_hint(dir, false, false, Some("http://h:5000")), None);
    }
}
