//! `kd bench`: times training steps of one distillation on a fixed batch,
//! and can write the starting point so that an outside reference (the
//! PyTorch loop of `scripts/bench-vs-torch`) computes exactly the same steps.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use kd_core::Registry;
use kd_engine::{Plan, Precision, StepHarness};

use crate::train::DeviceArg;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    teacher: String,
    #[arg(long)]
    student: String,
    /// `NAME[:WEIGHT]`, repeatable, as on `kd distill`.
    #[arg(long = "method", required = true)]
    methods: Vec<String>,
    /// Weight of the cross-entropy on labels (0 leaves it out).
    #[arg(long, default_value_t = 1.0)]
    ce: f64,
    /// `METHOD.FIELD=VALUE`, repeatable, e.g. `--config st.T=4`.
    #[arg(long = "config")]
    configs: Vec<String>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first (allocations, kernel selection).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// libtorch's intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    #[arg(long, default_value_t = 100)]
    classes: i64,
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    #[arg(long)]
    no_channels_last: bool,
    /// Capture the step as a CUDA graph after the warm-up steps and replay it.
    #[arg(long)]
    cuda_graph: bool,
    /// The step's optimiser, at its kind's defaults (`dot`: two backwards).
    #[arg(long, default_value = "sgd")]
    optimizer: kd_engine::OptimizerKind,
    /// Folder for `init.safetensors` (weights and batch before the first
    /// step) and `kd.json` (the timing and every step's loss).
    #[arg(long)]
    dump: Option<PathBuf>,
}

fn plan(a: &BenchArgs, registry: &Registry) -> Result<Plan> {
    let (_, methods) =
        crate::train::method_groups(registry, &a.methods, &[], &a.configs, a.ce)?.remove(0);
    let mut plan = kd_engine::bench_plan(&a.teacher, &a.student, methods, a.batch, a.classes);
    plan.device = a.device.into();
    plan.precision = a.precision;
    plan.channels_last = !a.no_channels_last;
    plan.cuda_graph = a.cuda_graph;
    if a.optimizer != kd_engine::OptimizerKind::Sgd {
        for stage in &mut plan.stages {
            stage.optimizer = kd_engine::OptimizerPlan {
                lr: stage.optimizer.lr,
                ..kd_engine::OptimizerPlan::of(a.optimizer)
            };
        }
    }
    Ok(plan)
}

pub fn bench(a: &BenchArgs, registry: &Registry) -> Result<()> {
    if a.steps == 0 || a.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let plan = plan(a, registry)?;
    let mut h = StepHarness::new(&plan, registry).context("building the step")?;
    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        kd_engine::tensors::write(&dir.join("init.safetensors"), &h.state())?;
    }
    for _ in 0..a.warmup {
        h.step_async()?;
    }
    let mut losses = h.read()?;
    let started = Instant::now();
    for _ in 0..a.steps {
        h.step_async()?;
    }
    losses.extend(h.read()?);
    let secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "images_per_sec": (a.batch * a.steps) as f64 / secs,
        "step_ms": 1e3 * secs / a.steps as f64,
        "losses": losses,
        "device": format!("{:?}", kd_engine::device(plan.device)?),
        "threads": tch::get_num_threads(),
        "precision": plan.precision,
        "channels_last": plan.channels_last,
        "cuda_graph": h.graph_stats().map(|s| serde_json::json!({
            "captures": s.captures, "replays": s.replays, "eager": s.eager,
        })),
    });
    if let Some(dir) = &a.dump {
        std::fs::write(dir.join("kd.json"), report.to_string())
            .with_context(|| format!("writing {}", dir.join("kd.json").display()))?;
    }
    println!("{report}");
    Ok(())
}
