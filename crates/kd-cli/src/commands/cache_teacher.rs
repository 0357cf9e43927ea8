//! `kd cache-teacher`: the frozen teacher's outputs on every batch a
//! `kd distill` run with the same flags will train, written once so that
//! runs with `--teacher-cache` never run the teacher (docs/teacher-cache.md).

use std::path::PathBuf;

use anyhow::{Result, bail};
use kd_engine::{CacheDtype, CacheSpec, CacheWriter, MethodPlan, ModelPlan};

use crate::out::outln;
use crate::train::TrainArgs;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(clap::Args, Debug)]
#[command(mut_arg("out", |a| a
    .required(true)
    .default_value(None::<&str>)
    .help("Folder the cache is written to (continued when it holds this cache already)")))]
pub struct Args {
    /// Teacher's zoo name (`kd models`).
    #[arg(long)]
    teacher: String,
    /// Teacher weights (safetensors or a `torch.save` file); the cache is
    /// matched to the file's SHA-256.
    #[arg(long)]
    teacher_weights: PathBuf,
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

pub fn run(a: &Args) -> Result<()> {
    let t = &a.train;
    if a.world == 0 {
        bail!("--world takes the number of data-parallel ranks, at least 1");
    }
    let teacher = ModelPlan {
        arch: a.teacher.clone(),
        weights: Some(a.teacher_weights.clone()),
        source_sha256: None,
    };
    // The student is not part of a cache: only the teacher and the batches.
    let mut plan = t.plan(
        "cache".into(),
        ModelPlan::new(&a.teacher),
        Some(teacher),
        "distill",
        vec![MethodPlan::new("ce", 1.0)],
        t.seeds.first().copied().unwrap_or(0),
    )?;
    plan.data.world_size = a.world;
    let spec = CacheSpec {
        seeds: t.seeds.clone(),
        stages: a.stages.clone(),
        epochs: t.epochs,
        top_k: a.top_k,
        dtype: a.dtype,
        taps: a.taps.clone(),
    };
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
