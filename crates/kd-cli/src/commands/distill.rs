//! `kd distill`: a student distilled from a frozen teacher, with one or
//! more method groups and, on request, the student trained alone beside.

use std::path::PathBuf;

use anyhow::Result;
use kd_core::Registry;
use kd_engine::ModelPlan;
use kd_engine::report::{summarize, table};

use crate::exec::{self, paired};
use crate::out::out;
use crate::train::{TrainArgs, label_runs, method_groups, seeds};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Teacher's zoo name (`kd models`).
    #[arg(long)]
    teacher: String,
    /// Teacher weights: safetensors, or a `torch.save` file (a
    /// state_dict, or a checkpoint dict holding one); PyTorch's
    /// parameter names load as they are.
    #[arg(long)]
    teacher_weights: PathBuf,
    /// Read the teacher's outputs from a cache written by `kd
    /// cache-teacher` with the same teacher, data flags and seeds; the
    /// teacher is never built or run.
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// Student's zoo name (`kd models`).
    #[arg(long)]
    student: String,
    /// `NAME[:WEIGHT]`, repeatable, e.g. `--method st:0.9`.
    #[arg(long = "method", required = true)]
    methods: Vec<String>,
    /// Another group of methods to distil with, beside `--method`'s:
    /// `NAME[:WEIGHT][+NAME[:WEIGHT]...]`, repeatable, e.g. `--compare
    /// at:1000 --compare crd:0.8+st:0.1`. Each group is its own run per
    /// seed, named after its methods; the runs of one seed train in
    /// lockstep, computing each batch's teacher forward once for all groups.
    #[arg(long = "compare")]
    compare: Vec<String>,
    /// Weight of the cross-entropy on labels (0 leaves it out).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    ce: f64,
    /// `METHOD.FIELD=VALUE`, repeatable, e.g. `--config st.T=4`.
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Also train the student without a teacher, same seeds, and compare
    /// (runs `NAME_baseline_s<seed>`).
    #[arg(long)]
    baseline: bool,
    #[command(flatten)]
    train: TrainArgs,
}

pub fn run(a: &Args, registry: &Registry) -> Result<()> {
    let train = &a.train;
    let groups = method_groups(registry, &a.methods, &a.compare, &a.configs, a.ce)?;
    let teacher = ModelPlan {
        weights: Some(a.teacher_weights.clone()),
        ..ModelPlan::new(&a.teacher)
    };
    let student = ModelPlan::new(&a.student);
    // `--name` names the command's runs: the distilled ones, their sweep,
    // and the baseline beside them.
    let name = train
        .name
        .clone()
        .unwrap_or_else(|| format!("{}_from_{}", short(&a.student), short(&a.teacher)));
    let base_name = match &train.name {
        Some(n) => format!("{n}_baseline"),
        None => format!("{}_baseline", short(&a.student)),
    };
    let group_name = |label: &str| match (&train.name, groups.len()) {
        (Some(n), 1) => n.clone(),
        _ => format!("{name}_{label}"),
    };
    let base_runs = if a.baseline {
        label_runs(train, &base_name, &student)?
    } else {
        Vec::new()
    };
    let mut kd_runs = Vec::new();
    for (label, group) in &groups {
        kd_runs.extend(seeds(train, &group_name(label), |run_name, seed| {
            let plan = train.plan(
                run_name,
                student.clone(),
                Some(teacher.clone()),
                "distill",
                group.clone(),
                seed,
            )?;
            Ok(kd_engine::Plan {
                teacher_cache: a.teacher_cache.clone(),
                ..plan
            })
        })?);
    }
    let base_sweep = format!("{base_name}_sweep");
    let kd_sweep = format!("{name}_sweep");
    exec::check_all(
        registry,
        &[(&base_runs, &base_sweep), (&kd_runs, &kd_sweep)],
        train,
    )?;
    let ex = train.exec();
    let mut rows = Vec::new();
    if a.baseline {
        let results = exec::run_sweep(registry, &base_runs, &ex, &base_sweep)?;
        rows.push(summarize(
            &format!("{} alone (ce)", short(&a.student)),
            &paired(&base_runs, &results),
        ));
    }
    let results = exec::run_sweep(registry, &kd_runs, &ex, &kd_sweep)?;
    let per_group = kd_runs.len() / groups.len();
    for (g, (label, _)) in groups.iter().enumerate() {
        let range = g * per_group..(g + 1) * per_group;
        rows.push(summarize(
            &format!("{} from {} ({label})", short(&a.student), short(&a.teacher)),
            &paired(&kd_runs[range.clone()], &results[range]),
        ));
    }
    if kd_dist::is_main() {
        out!("{}", table(&rows))?;
    }
    Ok(())
}

/// A model's name in run folders.
fn short(arch: &str) -> String {
    kd_models::torchscript::short_name(arch)
}
