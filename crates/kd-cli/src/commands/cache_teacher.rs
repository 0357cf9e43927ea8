//! `kd cache-teacher`: the frozen teacher's outputs on every batch a
//! `kd distill` run with the same flags will train, written once so that
//! runs with `--teacher-cache` never run the teacher (docs/teacher-cache.md).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use kd_core::Registry;
use kd_engine::{CacheDtype, CacheSpec, CacheWriter, MethodPlan, ModelPlan, Plan, Subject};

use crate::out::outln;
use crate::train::{LABEL_LOSS, TrainArgs};

const GIB: f64 = (1u64 << 30) as f64;

#[derive(clap::Args, Debug)]
#[command(mut_arg("out", |a| a
    .required(true)
    .default_value(None::<&str>)
    .help("Folder the cache is written to (continued when it holds this cache already)")))]
pub struct Args {
    /// Teacher's zoo name (`kd models`).
    #[arg(long, required_unless_present = "from", requires = "teacher_weights")]
    teacher: Option<String>,
    /// Teacher weights (safetensors or a `torch.save` file); the cache is
    /// matched to the file's SHA-256.
    #[arg(long, requires = "teacher")]
    teacher_weights: Option<PathBuf>,
    /// A recipe (`.rhai`) or saved plans (`.yaml`) instead of flags: the
    /// cache covers every seed and student stage of their plans that have
    /// a trained teacher (one teacher and one data set among them). The
    /// training flags below are then ignored.
    #[arg(long, conflicts_with = "teacher")]
    from: Option<PathBuf>,
    /// With --from: `NAME=VALUE`, a recipe's `param("NAME", default)`.
    #[arg(long = "set", requires = "from")]
    sets: Vec<String>,
    /// Store the top K logits and the remaining probability mass instead
    /// of all of them (0: all, exact).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Storage precision of logits and taps: fp32 (exact), fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    dtype: CacheDtype,
    /// Teacher taps to store besides the logits, e.g. `feat/3,embed`.
    #[arg(long, value_delimiter = ',')]
    taps: Vec<String>,
    /// Stage indices to cache: each stage of a recipe draws its own
    /// batches (`kd distill` trains stage 0).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    stages: Vec<usize>,
    /// Data-parallel ranks the runs will use (each rank's share of a step
    /// is stored apart, as that rank's teacher would compute it).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Refuse to write more than this many GiB.
    #[arg(long, default_value_t = 20.0)]
    max_gib: f64,
    #[command(flatten)]
    train: TrainArgs,
}

pub fn run(a: &Args, registry: &Registry) -> Result<()> {
    let t = &a.train;
    if a.world == 0 {
        bail!("--world takes the number of data-parallel ranks, at least 1");
    }
    let (mut plan, spec) = match &a.from {
        Some(path) => from_plans(path, &a.sets, registry, a)?,
        None => from_flags(a)?,
    };
    plan.data.world_size = a.world;
    let mut w = CacheWriter::new(&plan, spec, &t.out, t.folders.overwrite)?;
    let (total, left) = w.sizes();
    let m = &w.manifest;
    outln!(
        "teacher cache {}: {} seed(s) x {} stage(s) x {} epochs x {} rows, {:.1} MiB per epoch: {:.2} GiB, {:.2} GiB to write",
        t.out.display(),
        m.seeds.len(),
        m.stages.len(),
        m.epochs,
        m.rows_per_epoch,
        m.bytes_per_epoch as f64 / (1u64 << 20) as f64,
        total as f64 / GIB,
        left as f64 / GIB
    )?;
    if left as f64 > a.max_gib * GIB {
        bail!(
            "the cache would write {:.2} GiB, above --max-gib {}; raise --max-gib, or store less (--top-k 10 --dtype fp16, fewer --taps or epochs)",
            left as f64 / GIB,
            a.max_gib
        );
    }
    let ips = w.write(true)?;
    let m = &w.manifest;
    if left > 0 {
        outln!("wrote {} epoch file(s) at {ips:.1} img/s", m.written.len())?;
    } else {
        outln!("nothing to write: every epoch is cached")?;
    }
    outln!(
        "teacher test top-1 {:.2}%, top-5 {:.2}%",
        m.teacher_test.0,
        m.teacher_test.1
    )?;
    if let Some(ap) = &m.approximation {
        outln!(
            "stored logits approximate the teacher's: KL mean {:.3e} (T=1), {:.3e} (T=4), max {:.3e} (T=1)",
            ap.kl_t1_mean,
            ap.kl_t4_mean,
            ap.kl_t1_max
        )?;
    }
    Ok(())
}

/// The plan and spec of `kd distill`'s flags.
fn from_flags(a: &Args) -> Result<(Plan, CacheSpec)> {
    let t = &a.train;
    let (Some(arch), Some(weights)) = (&a.teacher, &a.teacher_weights) else {
        bail!("give --teacher and --teacher-weights, or --from a recipe or plan");
    };
    let teacher = ModelPlan {
        weights: Some(weights.clone()),
        ..ModelPlan::new(arch)
    };
    // The student is not part of a cache: only the teacher and the batches.
    let plan = t.plan(
        "cache".into(),
        ModelPlan::new(arch),
        Some(teacher),
        "distill",
        vec![MethodPlan::new(LABEL_LOSS, 1.0)],
        t.seeds.first().copied().unwrap_or(0),
    )?;
    let spec = CacheSpec {
        seeds: t.seeds.clone(),
        stages: a.stages.clone(),
        epochs: t.epochs,
        top_k: a.top_k,
        dtype: a.dtype,
        taps: a.taps.clone(),
    };
    Ok((plan, spec))
}

/// One plan standing for a recipe's (or a plan file's) plans with a
/// trained teacher, and a spec covering their seeds, student stages and
/// epochs.
fn from_plans(
    path: &std::path::Path,
    sets: &[String],
    registry: &Registry,
    a: &Args,
) -> Result<(Plan, CacheSpec)> {
    let scripts = kd_recipes::Scripts::new();
    let plans = if kd_recipes::is_recipe(path) {
        super::plan::load_recipe(path, sets)?.plans(registry)?
    } else {
        super::plan::saved_plans(path, sets, registry, &scripts)?
    };
    let taught: Vec<&Plan> = plans
        .iter()
        .filter(|p| p.teacher.as_ref().is_some_and(|t| t.weights.is_some()))
        .filter(|p| p.stages.iter().all(|s| s.subject == Subject::Student))
        .collect();
    let first = taught.first().with_context(|| {
        format!(
            "{}: no plan distils from a teacher loaded from a file; nothing to cache",
            path.display()
        )
    })?;
    let key = |p: &Plan| (p.teacher.clone(), p.data.clone());
    if let Some(other) = taught.iter().find(|p| key(p) != key(first)) {
        bail!(
            "{}: plans `{}` and `{}` differ in teacher or data; a cache holds one teacher on one data set, write one per pair",
            path.display(),
            first.name,
            other.name
        );
    }
    let mut seeds: Vec<u64> = taught.iter().map(|p| p.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let stages = (0..taught.iter().map(|p| p.stages.len()).max().unwrap_or(0)).collect();
    let epochs = taught
        .iter()
        .flat_map(|p| p.stages.iter().map(|s| s.epochs))
        .max()
        .unwrap_or(0);
    let spec = CacheSpec {
        seeds,
        stages,
        epochs,
        top_k: a.top_k,
        dtype: a.dtype,
        taps: a.taps.clone(),
    };
    Ok(((*first).clone(), spec))
}
