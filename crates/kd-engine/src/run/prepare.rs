//! A stage made ready to step: its methods built, parameters frozen or
//! trainable as the stage says, its optimiser and its loader.

use kd_core::{AugmentPolicy, AugmentSpec, Needs, Progress, Registry, Side, TapShapes};
use kd_data::{Batch, Loader, LoaderConfig, Splits};
use tch::Tensor;

use super::checkpoint::Carry;
use super::draws::Draws;
use super::graph::{self, StepGraph};
use super::methods::{Active, BuildEnv, build_stage};
use super::nets::{Exec, Net, named_vars, roles, shapes_of};
use super::step::{SharedTeacher, StageNets, StepOut, Update, step};
use crate::optim::Optimizer;
use crate::plan::{Part, Plan, Precision, StagePlan, Subject};
use crate::schedule::ScheduleResolver;
use crate::{EngineError, Result};

/// A stage ready to step: its methods, optimiser and where its draws come from.
pub(crate) struct Prepared {
    pub(crate) methods: Vec<Active>,
    pub(crate) peers: Vec<Active>,
    pub(crate) needs: Needs,
    pub(crate) opt: Optimizer,
    pub(crate) draws: Draws,
    pub(crate) net_trains: bool,
    pub(crate) mutual: bool,
    /// `cuda_graph: true`: the stage's captured step.
    pub(crate) graph: Option<StepGraph>,
    /// The teacher's taps come from a cache (the teacher is not built).
    pub(crate) cached_teacher: bool,
}

impl Prepared {
    /// The step's view of the stage: what stays fixed, with the networks
    /// in their roles, and what each step changes.
    pub(crate) fn split<'a>(
        &'a mut self,
        net: &'a Net,
        other: Option<&'a Net>,
        exec: &'a Exec,
    ) -> (
        StageNets<'a>,
        &'a mut [Active],
        &'a mut [Active],
        &'a mut Optimizer,
    ) {
        // A stage whose methods read nothing of the other network (cross-
        // entropy alone after an init stage, say) runs without it.
        let nets = StageNets {
            net,
            other: other.filter(|_| self.needs.teacher),
            cached: self.cached_teacher && self.needs.teacher,
            net_trains: self.net_trains,
            mutual: self.mutual,
            needs: &self.needs,
            draws: &self.draws,
            exec,
        };
        (nets, &mut self.methods, &mut self.peers, &mut self.opt)
    }

    /// One training step of the stage at learning rate `lr`: through its
    /// captured graph when the plan asks for one (whose steps compute
    /// their own teacher forward, so `shared` is not used then).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_step(
        &mut self,
        net: &Net,
        other: Option<&Net>,
        exec: &Exec,
        batch: &Batch,
        progress: Progress,
        shared: Option<&SharedTeacher>,
        lr: f64,
    ) -> Result<StepOut> {
        self.draws.seed_torch(progress);
        let key = match &self.graph {
            Some(_) => Some(graph::key(
                lr,
                &mut self.methods,
                &mut self.peers,
                progress,
            )?),
            None => None,
        };
        let mut graph = self.graph.take();
        let out = {
            let (nets, methods, peers, opt) = self.split(net, other, exec);
            match (&mut graph, key) {
                (Some(g), Some(key)) => g.step(key, batch, |b| {
                    step(
                        &nets,
                        methods,
                        peers,
                        b,
                        progress,
                        None,
                        Update::Sgd(opt, lr),
                    )
                }),
                _ => step(
                    &nets,
                    methods,
                    peers,
                    batch,
                    progress,
                    shared,
                    Update::Sgd(opt, lr),
                ),
            }
        };
        self.graph = graph;
        out
    }
}

/// Builds a stage's methods and optimiser for `net` and `other`, shaped by
/// the taps of `probe` images. `init_seed` seeds the methods' initialisation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare_stage(
    env: &BuildEnv,
    exec: &Exec,
    init_seed: u64,
    draws: Draws,
    stage: &StagePlan,
    student: &mut Net,
    mut teacher: Option<&mut Net>,
    carry: &Carry,
    probe: &Tensor,
    cached_teacher: Option<&TapShapes>,
) -> Result<Prepared> {
    let net_trains = stage.train.contains(&Part::Network);
    let methods_train = stage.train.contains(&Part::Methods);
    let name = &stage.name;
    // Probes see every tap; what the stage reads is known once its methods
    // are built (below).
    student.model.read_taps(None);
    if let Some(t) = teacher.as_deref_mut() {
        t.model.read_taps(None);
    }
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    let s_shapes = shapes_of(net, probe);
    let t_shapes = match cached_teacher {
        Some(s) if stage.subject == Subject::Student => Some(s.clone()),
        _ => other.as_ref().map(|t| shapes_of(t, probe)),
    };
    tch::manual_seed(init_seed as i64);
    let (mut methods, mut peers, needs) =
        build_stage(stage, env, &s_shapes, t_shapes.as_ref(), carry)?;
    let mutual = needs.mutual;

    // Freezing and folding need mutable access; the loop below borrows again.
    {
        let (net, other): (&mut Net, Option<&mut Net>) = match stage.subject {
            Subject::Student => (&mut *student, teacher.as_deref_mut()),
            Subject::Teacher => (teacher.as_deref_mut().expect("checked by the caller"), None),
        };
        if net_trains {
            net.vs.unfreeze()
        } else {
            net.vs.freeze()
        }
        // A network this stage trains runs its BatchNorms; a teacher it does
        // not train runs them folded into its convolutions.
        net.model.fold_batchnorm(false);
        // The trained network computes only what the losses read of it (in
        // mutual learning the peer's methods read it too: everything then).
        // Not the teacher: one teacher forward serves a lockstep group or
        // fills a cache, and must be the same whatever each run reads.
        if !mutual {
            net.model.read_taps(Some(&needs.read(Side::Student)));
        }
        if let Some(o) = other {
            if mutual {
                o.vs.unfreeze()
            } else {
                o.vs.freeze()
            }
            o.model.fold_batchnorm(!mutual);
        }
    }
    let (net, other) = roles(stage.subject, student, teacher.as_deref());
    // Parameters of this stage's optimiser, named for the checkpoint.
    let mut params = Vec::new();
    if net_trains {
        params.extend(named_vars(&net.vs, "net."));
    }
    if let (Some(t), true) = (other, mutual) {
        params.extend(named_vars(&t.vs, "peer."));
    }
    for (prefix, list) in [("method.", &mut methods), ("peermethod.", &mut peers)] {
        for (i, a) in list.iter_mut().enumerate() {
            if methods_train {
                params.extend(named_vars(&a.vs, &format!("{prefix}{i}.")));
            } else {
                a.vs.freeze();
            }
        }
    }
    if stage.optimizer.kind == crate::plan::OptimizerKind::Dot {
        // DOT tells a task loss from a distillation loss on one network's
        // parameters, on one process (the reference's setting).
        if mutual {
            return Err(EngineError::Plan(format!(
                "stage `{name}`: the dot optimizer cannot train a mutual-learning pair; use sgd"
            )));
        }
        if kd_dist::group().is_some() {
            return Err(EngineError::Plan(format!(
                "stage `{name}`: the dot optimizer runs on one process; data-parallel jobs use sgd"
            )));
        }
    }
    let mut opt = Optimizer::new(stage.optimizer.clone(), params).with_clip(stage.clip_grad);
    if exec.precision == Precision::Fp16 {
        opt = opt.with_loss_scale(exec.device);
    }
    if opt.is_empty() {
        return Err(EngineError::Plan(format!(
            "stage `{name}` trains nothing: `train` is {:?} and those have no parameters",
            stage.train
        )));
    }

    Ok(Prepared {
        methods,
        peers,
        needs,
        opt,
        draws,
        net_trains,
        mutual,
        graph: None,
        cached_teacher: false,
    })
}

/// What preparing a stage of a run needs to know about the run.
pub(crate) struct StageCx<'a> {
    pub(crate) plan: &'a Plan,
    pub(crate) si: usize,
    pub(crate) registry: &'a Registry,
    pub(crate) exec: &'a Exec,
    pub(crate) splits: &'a Splits,
    pub(crate) scripts: &'a dyn ScheduleResolver,
    /// The teacher's tap shapes when its outputs come from a cache.
    pub(crate) cached_teacher: Option<&'a TapShapes>,
}

/// A stage of a run ready to step, with its loader.
pub(crate) fn prepare(
    cx: &StageCx,
    stage: &StagePlan,
    student: &mut Net,
    teacher: Option<&mut Net>,
    carry: &Carry,
) -> Result<(Prepared, Loader)> {
    let device = cx.exec.device;
    let probe = probe_images(cx.plan, cx.splits, device)?;
    let env = BuildEnv {
        registry: cx.registry,
        device,
        n_data: cx.splits.train.len(),
        classes: cx.splits.train.num_classes,
        scripts: cx.scripts,
    };
    let mut prep = prepare_stage(
        &env,
        cx.exec,
        cx.plan.seed + cx.si as u64,
        Draws::seeded(cx.plan.seed, cx.si),
        stage,
        student,
        teacher,
        carry,
        &probe,
        cx.cached_teacher,
    )?;
    prep.cached_teacher = cx.cached_teacher.is_some();
    if let Some(backend) = cx.exec.graph {
        graph::check(&prep.needs)?;
        // AdamW's and LAMB's bias corrections change every step: a
        // captured update would replay the first one's.
        if stage.optimizer.kind != crate::plan::OptimizerKind::Sgd {
            return Err(EngineError::Plan(format!(
                "stage `{}`: cuda_graph captures SGD updates only, not {} (its bias correction changes every step); drop cuda_graph",
                stage.name,
                stage.optimizer.kind.name()
            )));
        }
        prep.graph = Some(StepGraph::new(backend, cx.plan.data.batch_size));
    }
    let contrast = prep.needs.contrast.as_ref().map(|c| (c.k, c.other_classes));
    let strong = match prep.needs.augmented {
        Some(AugmentSpec {
            policy: AugmentPolicy::RandAugment { n: 2 },
        }) => true,
        Some(other) => {
            return Err(EngineError::Plan(format!(
                "the loader draws RandAugment with 2 operations, not {other:?}"
            )));
        }
        None => false,
    };
    let shard = kd_dist::group().map(|g| (g.world.rank, g.world.size));
    let loader = train_loader(cx.plan, cx.splits, cx.si, contrast, strong, shard, device)?;
    Ok((prep, loader))
}

/// Two training images, unaugmented: the batch that shapes a stage's taps.
pub(crate) fn probe_images(plan: &Plan, splits: &Splits, device: tch::Device) -> Result<Tensor> {
    let l = Loader::new(&splits.train, loader_cfg(plan, None, false), 0, device)?;
    Ok(l.batch(&[0, 1], 0, 0)?.images)
}

/// The training loader of stage `si` of `plan`, as a run draws it: its
/// order and augmentation keyed by the plan's seed and the stage;
/// `shard`: `(rank, world)` of a data-parallel job. The teacher cache
/// writes what this loader yields, so the two must not diverge.
pub(crate) fn train_loader(
    plan: &Plan,
    splits: &Splits,
    si: usize,
    contrast: Option<(usize, bool)>,
    strong: bool,
    shard: Option<(usize, usize)>,
    device: tch::Device,
) -> Result<Loader> {
    let loader = Loader::new(
        &splits.train,
        loader_cfg(plan, contrast, plan.data.augment),
        plan.seed.wrapping_add(si as u64 * 7919),
        device,
    )?;
    // Training batches only: evaluation and the probe batch are never
    // erased or mixed.
    let loader = match plan.data.randaugment {
        Some(ra) => loader.rand_augment(ra)?,
        None => loader,
    };
    let loader = match &plan.data.random_erasing {
        Some(re) => loader.random_erasing(re.clone())?,
        None => loader,
    };
    let loader = match &plan.data.mixup {
        Some(m) => loader.mixup(m.clone())?,
        None => loader,
    };
    let loader = if strong {
        loader.strong_view()?
    } else {
        loader
    };
    Ok(match shard {
        Some((rank, world)) => loader.shard(rank, world),
        None => loader,
    })
}

fn loader_cfg(plan: &Plan, contrast: Option<(usize, bool)>, augment: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: plan.data.batch_size,
        shuffle: true,
        augment,
        padding: plan.data.crop_padding,
        drop_last: false,
        contrast,
    }
}
