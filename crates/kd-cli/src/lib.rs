//! The `kd` command line. `run` is the whole program, callable in-process by
//! the tests; `main.rs` only maps its result to an exit code.

mod bench;
mod bench_data;
mod console;
mod report;
mod track;
mod train;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kd_core::Registry;
use kd_engine::report::{group, summarize, table};
use kd_engine::{ModelPlan, NoScripts, Plan, RunOptions, RunResult};

use crate::train::{TrainArgs, apply_config, parse_method};

#[derive(Parser, Debug)]
#[command(
    name = "kd",
    version,
    about = "Knowledge distillation on libtorch: recipes, plugins, tracking"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a network from scratch on the labels (to serve as a teacher).
    TrainTeacher {
        /// Zoo name (`kd models`).
        #[arg(long)]
        arch: String,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Distill a frozen teacher into a student with one or more methods.
    Distill {
        /// Teacher's zoo name (`kd models`).
        #[arg(long)]
        teacher: String,
        /// Teacher weights: safetensors, or a `torch.save` file (a
        /// state_dict, or a checkpoint dict holding one); PyTorch's
        /// parameter names load as they are.
        #[arg(long)]
        teacher_weights: PathBuf,
        /// Student's zoo name (`kd models`).
        #[arg(long)]
        student: String,
        /// `NAME[:WEIGHT]`, repeatable, e.g. `--method st:0.9`.
        #[arg(long = "method", required = true)]
        methods: Vec<String>,
        /// Another group of methods to distil with, beside `--method`'s:
        /// `NAME[:WEIGHT][+NAME[:WEIGHT]...]`, repeatable, e.g. `--compare
        /// at:1000 --compare crd:0.8+st:0.1`. Each group is its own run per
        /// seed; the runs of one seed train in lockstep, computing each
        /// batch's teacher forward once for all groups.
        #[arg(long = "compare")]
        compare: Vec<String>,
        /// Weight of the cross-entropy on labels (0 leaves it out).
        #[arg(long, default_value_t = 1.0)]
        ce: f64,
        /// `METHOD.FIELD=VALUE`, repeatable, e.g. `--config st.T=4`.
        #[arg(long = "config")]
        configs: Vec<String>,
        /// Also train the student without a teacher, same seeds, and compare.
        #[arg(long)]
        baseline: bool,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Run a recipe (`.rhai`) or a saved plan (YAML, as printed by `kd plan`).
    Run {
        /// The recipe (`.rhai`) or saved plans (`.yaml`).
        path: PathBuf,
        /// `NAME=VALUE`: overrides a recipe's `param("NAME", default)`.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Folder holding run folders.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        #[command(flatten)]
        folders: train::FolderArgs,
        /// MLflow tracking server (else MLFLOW_TRACKING_URI, else `kd mlflow
        /// up`'s).
        #[arg(long)]
        tracking_uri: Option<String>,
        /// Train the plans of a sweep one after another, never in lockstep
        /// with a shared teacher forward.
        #[arg(long)]
        solo: bool,
    },
    /// Print the plans a recipe resolves to, as YAML, validated (weights,
    /// data folders, numbers, methods); nothing trains. Given saved plans
    /// (`.yaml`), validates and prints them.
    Plan {
        /// The recipe (`.rhai`) or saved plans (`.yaml`).
        recipe: PathBuf,
        /// `NAME=VALUE`: overrides a recipe's `param("NAME", default)`.
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// List the model zoo.
    Models,
    /// The local MLflow server (SQLite store and artifacts under OUT/mlflow).
    #[command(subcommand)]
    Mlflow(Mlflow),
    /// Send to MLflow whatever a run (or every run under a folder) has not
    /// delivered yet; marks runs whose process died FAILED or KILLED.
    Sync {
        /// A run folder, or a folder of runs (default: runs).
        #[arg(default_value = "runs")]
        path: PathBuf,
        /// MLflow tracking server (else MLFLOW_TRACKING_URI, else `kd mlflow
        /// up`'s).
        #[arg(long)]
        tracking_uri: Option<String>,
    },
    /// List registered methods with their config fields and defaults.
    Methods {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Conformance checks against a PyTorch reference.
    #[command(subcommand)]
    Probe(Probe),
    /// Time training steps of one distillation on a fixed batch (what
    /// `scripts/bench-vs-torch` compares with PyTorch).
    Bench(bench::BenchArgs),
    /// Images per second of the ImageFolder training pipeline alone (what
    /// `scripts/bench-data` compares with torchvision's DataLoader).
    #[command(hide = true)]
    BenchData(bench_data::BenchDataArgs),
    /// Summarise finished runs: per configuration, mean ± std over seeds of
    /// the best and last top-1, and the gap to the number the recipe's
    /// source reports; writes report.md and report.png.
    Report(report::ReportArgs),
}

#[derive(Subcommand, Debug)]
enum Mlflow {
    /// Start the server on loopback and print the UI address.
    Up {
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Stop the server started by `up`.
    Down {
        #[arg(long, default_value = "runs")]
        out: PathBuf,
    },
    /// Print the server's address if it runs.
    Status {
        #[arg(long, default_value = "runs")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum Probe {
    /// Run a method on a fixture's taps; write loss, tap gradients and method state.
    Loss {
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Then time this many more calls (loss, backward, after-step) and
        /// print `{"ms_per_call": ...}`.
        #[arg(long, default_value_t = 0)]
        repeat: usize,
    },
    /// Run one training step of a method on a fixture's networks and batch
    /// (student in train mode, teacher in eval mode, no update); write the
    /// loss, the gradient of every student parameter, the student's buffers
    /// and the method state.
    Step {
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a zoo model in eval mode on `input`; write `logits` and every tap.
    Model {
        name: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        num_classes: i64,
    },
}

/// The supervised term of the shortcut commands (`train-teacher`,
/// `distill`); recipes name their losses themselves. The only method the
/// command line names, and only as the default a flag (`--ce`) weights.
const LABEL_LOSS: &str = "ce";

/// Runs `kd` with the given arguments (the first is the program name).
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    if matches!(
        cli.cmd,
        Cmd::TrainTeacher { .. } | Cmd::Distill { .. } | Cmd::Run { .. }
    ) {
        join_world()?;
    }
    kd_methods::link();
    let registry = Registry::global()?;
    match cli.cmd {
        Cmd::TrainTeacher { arch, train } => {
            let name = train
                .name
                .clone()
                .unwrap_or_else(|| format!("teacher_{arch}"));
            let student = ModelPlan {
                arch,
                weights: None,
            };
            let runs = seeds(&train, &name, |run_name, seed| {
                train.plan(
                    run_name,
                    student.clone(),
                    None,
                    "train",
                    vec![kd_engine::MethodPlan::new(LABEL_LOSS, 1.0)],
                    seed,
                )
            })?;
            let results = execute_all(&registry, &runs, &train, &format!("{name}_sweep"))?;
            let rows = vec![summarize(&name, &paired(&runs, &results))];
            if kd_dist::is_main() {
                print!("{}", table(&rows));
            }
            Ok(())
        }
        Cmd::Distill {
            teacher,
            teacher_weights,
            student,
            methods,
            compare,
            ce,
            configs,
            baseline,
            train,
        } => {
            let groups = method_groups(&methods, &compare, &configs, ce)?;
            let t = ModelPlan {
                arch: teacher.clone(),
                weights: Some(teacher_weights),
            };
            let s = ModelPlan {
                arch: student.clone(),
                weights: None,
            };
            let mut rows = Vec::new();
            if baseline {
                let base = format!("{student}_baseline");
                let base_runs = seeds(&train, &base, |run_name, seed| {
                    train.plan(
                        run_name,
                        s.clone(),
                        None,
                        "train",
                        vec![kd_engine::MethodPlan::new(LABEL_LOSS, 1.0)],
                        seed,
                    )
                })?;
                let results = execute_all(&registry, &base_runs, &train, &format!("{base}_sweep"))?;
                rows.push(summarize(
                    &format!("{student} alone (ce)"),
                    &paired(&base_runs, &results),
                ));
            }
            let default_name = |label: &str| format!("{student}_from_{teacher}_{label}");
            let name_of = |label: &str| match (&train.name, groups.len()) {
                (Some(n), 1) => n.clone(),
                (Some(n), _) => format!("{n}_{label}"),
                (None, _) => default_name(label),
            };
            let mut kd_runs = Vec::new();
            for (label, group) in &groups {
                kd_runs.extend(seeds(&train, &name_of(label), |run_name, seed| {
                    train.plan(
                        run_name,
                        s.clone(),
                        Some(t.clone()),
                        "distill",
                        group.clone(),
                        seed,
                    )
                })?);
            }
            let sweep = format!("{}_sweep", name_of(&groups[0].0));
            let results = execute_all(&registry, &kd_runs, &train, &sweep)?;
            let per_group = kd_runs.len() / groups.len();
            for (g, (label, _)) in groups.iter().enumerate() {
                let range = g * per_group..(g + 1) * per_group;
                rows.push(summarize(
                    &format!("{student} from {teacher} ({label})"),
                    &paired(&kd_runs[range.clone()], &results[range]),
                ));
            }
            if kd_dist::is_main() {
                print!("{}", table(&rows));
            }
            Ok(())
        }
        Cmd::Plan { recipe, sets } => {
            let plans = if kd_recipes::is_recipe(&recipe) {
                load_recipe(&recipe, &sets)?.plans(&registry)?
            } else {
                saved_plans(&recipe, &sets, &registry, &kd_recipes::Scripts::new())?
            };
            print!("{}", kd_recipes::to_yaml(&plans)?);
            Ok(())
        }
        Cmd::Run {
            path,
            sets,
            out,
            folders,
            tracking_uri,
            solo,
        } => {
            let scripts = kd_recipes::Scripts::new();
            let ex = Exec {
                out: &out,
                folders,
                solo,
                tracking_uri: tracking_uri.as_deref(),
                recipe: Some(&path),
                scripts: &scripts,
            };
            if kd_recipes::is_recipe(&path) {
                let recipe = load_recipe(&path, &sets)?;
                // Every run folder the recipe reaches is checked before the
                // first run changes one (planning validates the rest).
                preflight(&recipe.plans(&registry)?, &ex, &[])?;
                let runs = recipe
                    .execute_batched(&registry, &mut |plans| run_batch(&registry, plans, &ex))?;
                if kd_dist::is_main() {
                    eprint!("{}", kd_recipes::summary_table(&runs));
                }
                return Ok(());
            }
            let plans = saved_plans(&path, &sets, &registry, &scripts)?;
            preflight(&plans, &ex, &[])?;
            let results = run_batch(&registry, &plans, &ex)
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
            if kd_dist::is_main() {
                print!("{}", table(&group(&paired(&plans, &results))));
            }
            Ok(())
        }
        Cmd::Mlflow(Mlflow::Up { out, port }) => {
            let info = kd_tracking::server::up(&out, port)?;
            println!("{}", info.url);
            Ok(())
        }
        Cmd::Mlflow(Mlflow::Down { out }) => {
            match kd_tracking::server::down(&out)? {
                Some(info) => println!("stopped {}", info.url),
                None => println!("no server was running under {}", out.display()),
            }
            Ok(())
        }
        Cmd::Mlflow(Mlflow::Status { out }) => {
            match kd_tracking::server::status(&out)? {
                Some(info) => println!("{}", info.url),
                None => println!("no server running under {}", out.display()),
            }
            Ok(())
        }
        Cmd::Sync { path, tracking_uri } => sync(&path, tracking_uri.as_deref()),
        Cmd::Models => {
            for name in kd_models::names() {
                println!("{name}");
            }
            Ok(())
        }
        Cmd::Probe(Probe::Model {
            name,
            weights,
            input,
            out,
            num_classes,
        }) => probe_model(&name, &weights, &input, &out, num_classes),
        Cmd::Methods { json } => print_methods(&registry, json),
        Cmd::Bench(args) => bench::bench(&args, &registry),
        Cmd::BenchData(args) => bench_data::bench_data(&args),
        Cmd::Report(args) => report::report(&args),
        Cmd::Probe(Probe::Loss {
            fixture,
            out,
            repeat,
        }) => {
            let result = kd_engine::probe::probe_loss(&fixture, &registry, repeat)
                .with_context(|| format!("probing {}", fixture.display()))?;
            kd_engine::tensors::write(&out, &result)?;
            if let Some(ms) = result.metadata.get("ms_per_call") {
                println!(
                    "{}",
                    serde_json::json!({ "ms_per_call": ms.parse::<f64>().unwrap_or(f64::NAN) })
                );
            }
            Ok(())
        }
        Cmd::Probe(Probe::Step { fixture, out }) => {
            let result = kd_engine::probe::probe_step(&fixture, &registry)
                .with_context(|| format!("probing {}", fixture.display()))?;
            kd_engine::tensors::write(&out, &result)?;
            Ok(())
        }
    }
}

/// Joins the data-parallel job torchrun (or the user) described in the
/// environment, if any: Gloo on CPUs, NCCL when CUDA is there.
/// `KD_DIST_TIMEOUT` (seconds, default 120) bounds the rendezvous and every
/// collective, so a rank that dies or hangs stops the others.
fn join_world() -> Result<()> {
    let Some(world) = kd_dist::World::from_env()? else {
        return Ok(());
    };
    if kd_dist::group().is_some() {
        return Ok(());
    }
    let secs: u64 = match std::env::var("KD_DIST_TIMEOUT") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("KD_DIST_TIMEOUT={v} is not a number of seconds"))?,
        Err(_) => 120,
    };
    let nccl = tch::Cuda::is_available() && kd_dist::has_nccl();
    let pg = kd_dist::ProcessGroup::new(world, nccl, std::time::Duration::from_secs(secs))?;
    Ok(kd_dist::init(pg)?)
}

/// `kd distill`'s method groups: `--method`'s, then each `--compare`'s,
/// labelled by their method names, each with `--config` applied where it
/// names one of its methods and the label loss at weight `ce` in front.
pub(crate) fn method_groups(
    methods: &[String],
    compare: &[String],
    configs: &[String],
    ce: f64,
) -> Result<Vec<(String, Vec<kd_engine::MethodPlan>)>> {
    let specs = std::iter::once(methods.to_vec()).chain(
        compare
            .iter()
            .map(|c| c.split('+').map(str::to_string).collect()),
    );
    let mut groups = Vec::new();
    for spec in specs {
        let label = spec
            .iter()
            .map(|m| m.split(':').next().unwrap_or(m))
            .collect::<Vec<_>>()
            .join("+");
        let group = spec
            .iter()
            .map(|m| parse_method(m))
            .collect::<Result<Vec<_>>>()?;
        groups.push((label, group));
    }
    for c in configs {
        let method = c.split(['.', '=']).next().unwrap_or_default();
        let mut applied = false;
        for (_, group) in groups
            .iter_mut()
            .filter(|(_, g)| g.iter().any(|m| m.method == method))
        {
            apply_config(group, c)?;
            applied = true;
        }
        if !applied {
            bail!("--config `{c}`: no --method or --compare group uses `{method}`");
        }
    }
    if ce > 0.0 {
        for (_, group) in &mut groups {
            group.insert(0, kd_engine::MethodPlan::new(LABEL_LOSS, ce));
        }
    }
    Ok(groups)
}

/// Saved plans (YAML), each validated.
fn saved_plans(
    path: &Path,
    sets: &[String],
    registry: &Registry,
    scripts: &kd_recipes::Scripts,
) -> Result<Vec<Plan>> {
    if path.is_dir() {
        bail!(
            "{} is a folder; give a recipe (.rhai) or saved plans (.yaml)",
            path.display()
        );
    }
    if !sets.is_empty() {
        bail!("--set applies to recipes (.rhai), not to saved plans");
    }
    let plans = kd_recipes::read_plans(path)?;
    for plan in &plans {
        kd_recipes::validate(plan, registry, scripts)?;
    }
    Ok(plans)
}

fn load_recipe(path: &Path, sets: &[String]) -> Result<kd_recipes::Recipe> {
    if path.is_dir() {
        bail!(
            "{} is a folder; give a recipe (.rhai) or saved plans (.yaml)",
            path.display()
        );
    }
    let overrides = sets
        .iter()
        .map(|s| kd_recipes::parse_set(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(kd_recipes::Recipe::load(path, &overrides)?)
}

/// Each plan with the result of running it.
fn paired<'a>(plans: &'a [Plan], results: &'a [RunResult]) -> Vec<(&'a Plan, &'a RunResult)> {
    plans.iter().zip(results).collect()
}

/// One plan per seed; the run name gets a `_s<seed>` suffix.
fn seeds(
    train: &TrainArgs,
    name: &str,
    mut make: impl FnMut(String, u64) -> Result<Plan>,
) -> Result<Vec<Plan>> {
    if train.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    train
        .seeds
        .iter()
        .map(|&seed| make(format!("{name}_s{seed}"), seed))
        .collect()
}

fn execute_all(
    registry: &Registry,
    plans: &[Plan],
    train: &TrainArgs,
    sweep: &str,
) -> Result<Vec<RunResult>> {
    // Validate every plan before the first one trains.
    for p in plans {
        kd_engine::validate(p, registry, &NoScripts, &[])
            .with_context(|| format!("plan `{}`", p.name))?;
    }
    let ex = Exec {
        out: &train.out,
        folders: train.folders,
        solo: train.solo,
        tracking_uri: train.tracking_uri.as_deref(),
        recipe: None,
        scripts: &NoScripts,
    };
    let parents = match plans.len() {
        1 => vec![],
        _ => vec![sweep.to_string()],
    };
    preflight(plans, &ex, &parents)?;
    run_sweep(registry, plans, &ex, sweep)
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
fn run_batch(registry: &Registry, plans: &[Plan], ex: &Exec) -> Vec<Result<RunResult>> {
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

/// Set by Ctrl-C; the engine stops at the next step, keeping its checkpoint.
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
fn preflight(plans: &[Plan], ex: &Exec, parents: &[String]) -> Result<()> {
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("console.log"))
            .ok();
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
            Ok(r?)
        })
        .collect())
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
        .map(|r| r.map_err(anyhow::Error::from))
        .collect())
}

fn sync(path: &Path, flag: Option<&str>) -> Result<()> {
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
    let uri = kd_tracking::resolve_uri(flag, None, root)
        .context("no tracking server: pass --tracking-uri, set MLFLOW_TRACKING_URI, or start one with `kd mlflow up`")?;
    let reports = if single {
        vec![(path.to_path_buf(), kd_tracking::sync(path, &uri))]
    } else {
        kd_tracking::sync_all(path, &uri)
    };
    let mut failed = 0;
    for (dir, r) in reports {
        match r {
            Ok(rep) => println!(
                "{}: {} sent{}",
                dir.display(),
                rep.shipped,
                rep.closed_as
                    .map(|s| format!(", closed as {s:?}"))
                    .unwrap_or_default()
            ),
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

fn probe_model(
    name: &str,
    weights: &Path,
    input: &Path,
    out: &Path,
    num_classes: i64,
) -> Result<()> {
    let file = kd_engine::tensors::read(input)?;
    let x = file
        .get("input")
        .context("input file has no tensor named `input`")?;
    let classes = if num_classes > 0 {
        num_classes
    } else {
        infer_classes(weights)?
    };
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::build(name, &vs.root(), classes)?;
    kd_models::load_weights(&mut vs, weights)?;
    let taps = tch::no_grad(|| net.forward_taps(&x.to_kind(tch::Kind::Float), false));
    let mut outf = kd_engine::tensors::TensorFile::default();
    for (tap, t) in taps.named() {
        outf.push(tap.to_string(), t);
    }
    kd_engine::tensors::write(out, &outf)?;
    Ok(())
}

/// Number of classes from the classifier's bias in a weights file.
fn infer_classes(weights: &Path) -> Result<i64> {
    let file = kd_engine::tensors::read(weights)?;
    file.tensors
        .iter()
        .find(|(n, _)| kd_models::is_classifier_bias(n))
        .map(|(_, t)| t.size()[0])
        .context("cannot tell the number of classes from the weights; pass --num-classes")
}

fn print_methods(registry: &Registry, json: bool) -> Result<()> {
    if json {
        let all: Vec<_> = registry
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "summary": e.summary, "config": e.default_config(), "schedulable": e.schedulable}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for e in registry.iter() {
        let fields: Vec<String> = e
            .fields()
            .iter()
            .map(|f| format!("{}={}", f.name, f.default))
            .collect();
        println!("{:<10} {}", e.name, e.summary);
        if !fields.is_empty() {
            println!("{:<10}   config: {}", "", fields.join(", "));
        }
    }
    Ok(())
}

/// An error and its causes on one line, each said once: a cause whose text
/// an outer message already holds (many wrap their source's text) is left
/// out, so no prefix or OS error repeats.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

/// Maps errors to one line on stderr and an exit code; `--help` and
/// `--version` print normally.
pub fn main_exit<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(clap_err) = e.downcast_ref::<clap::Error>() {
                let _ = clap_err.print();
                return if clap_err.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
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
