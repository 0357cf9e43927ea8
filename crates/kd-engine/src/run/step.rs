//! One training step, in the engine's fixed order: teacher forward, student
//! forward, gradient taps, adversarial views, losses, backward and update,
//! after-step hooks. Nothing here waits for the device: the logged values
//! leave as one device tensor that the stage loop reads every few steps.

use kd_core::{Losses, Needs, Progress, Side, StepIo, Taps, ViewRef, ViewTaps};
use kd_data::Batch;
use tch::{Kind, Tensor};

use super::draws::Draws;
use super::methods::Active;
use super::nets::{Exec, Net};
use crate::optim::Optimizer;
use crate::{EngineError, Result, attack};

/// Everything a step needs that does not change within a stage.
pub(crate) struct StageNets<'a> {
    pub(crate) net: &'a Net,
    pub(crate) other: Option<&'a Net>,
    /// The other network is a teacher whose taps come from a cache: they
    /// arrive as a shared forward, and there is no network to run.
    pub(crate) cached: bool,
    pub(crate) net_trains: bool,
    pub(crate) mutual: bool,
    pub(crate) needs: &'a Needs,
    pub(crate) draws: &'a Draws,
    pub(crate) exec: &'a Exec,
}

impl StageNets<'_> {
    fn grad_of(&self, side: Side) -> bool {
        self.needs.grads.iter().any(|g| g.side == side)
    }

    /// How the teacher's forward on a batch may come from a group's shared
    /// one: its taps depend on the batch alone unless it is a peer that
    /// trains.
    pub(crate) fn teacher_share(&self) -> Option<Share> {
        teacher_share(
            (self.other.is_some() || self.cached) && !self.mutual,
            self.needs,
        )
    }

    pub(crate) fn frozen_teacher(&self) -> bool {
        self.teacher_share() == Some(Share::Frozen)
    }
}

/// What a run needs of a teacher forward shared by the runs of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Share {
    /// The taps alone.
    Frozen,
    /// The taps with their graph from an input that requires grad: the run
    /// takes gradient taps of the teacher.
    Graph,
}

/// `fixed`: the stage has a teacher that it does not train.
pub(crate) fn teacher_share(fixed: bool, needs: &Needs) -> Option<Share> {
    let graph = needs.grads.iter().any(|g| g.side == Side::Teacher);
    fixed.then_some(if graph { Share::Graph } else { Share::Frozen })
}

/// Forward passes of a teacher in this process (training steps, and one
/// per evaluated batch): a run replaying a teacher cache makes none.
static TEACHER_FORWARDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn count_teacher_forwards(n: u64) {
    TEACHER_FORWARDS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// How many forward passes of a teacher this process has made.
pub fn teacher_forwards() -> u64 {
    TEACHER_FORWARDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A batch's teacher forward, computed once for the runs of a group.
pub(crate) struct SharedTeacher {
    /// The taps, without graph.
    pub(crate) taps: Taps,
    /// The input (requiring grad) and the taps with their graph, when some
    /// run of the group takes gradient taps of the teacher.
    pub(crate) live: Option<(Tensor, Taps)>,
}

impl SharedTeacher {
    /// The frozen teacher `t` on `x` (images in the weights' layout), as a
    /// step of a run alone computes it; with `graph`, as one that takes
    /// gradient taps of it does.
    pub(crate) fn compute(t: &Net, x: &Tensor, graph: bool, exec: &Exec) -> Result<Self> {
        count_teacher_forwards(1);
        if !graph {
            return Ok(SharedTeacher {
                taps: t.frozen_taps(x, exec),
                live: None,
            });
        }
        let x = x.detach().set_requires_grad(true);
        let live = t.taps(&x, false, exec)?;
        Ok(SharedTeacher {
            taps: live.detach(),
            live: Some((x, live)),
        })
    }
}

/// What a step does with its loss.
pub(crate) enum Update<'a> {
    /// Training: backward, then an SGD step at this learning rate.
    Sgd(&'a mut Optimizer, f64),
    /// Backward only, leaving the gradients for the caller (the probe, on
    /// networks whose gradients start empty).
    Backward,
}

/// What a step leaves for the stage loop.
pub(crate) struct StepOut {
    /// The weight applied to each method's terms.
    pub(crate) weights: Vec<f64>,
    /// `label/term` of each value below.
    pub(crate) names: Vec<String>,
    /// `[term values (before weights)…, total, correct]`, fp32, still on
    /// the device.
    pub(crate) values: Tensor,
    pub(crate) n: i64,
}

/// Both networks' taps on the batch, and the gradient taps.
struct Forward {
    /// The teacher's (or peer's) taps, with their graph when it has one.
    t_live: Option<Taps>,
    t_taps: Option<Taps>,
    student: Taps,
    grads: Vec<Tensor>,
}

/// `teacher`: the frozen teacher's forward on this batch when the caller
/// has it already (computed once for several students).
pub(crate) fn step(
    nets: &StageNets,
    methods: &mut [Active],
    peers: &mut [Active],
    batch: &Batch,
    progress: Progress,
    teacher: Option<&SharedTeacher>,
    update: Update,
) -> Result<StepOut> {
    let x = nets.exec.input(&batch.images)?;
    let y = &batch.labels;
    let fwd = forward(nets, &x, y, teacher)?;
    let views = adversarial_views(nets, methods, &fwd, batch, &x, progress)?;
    let augmented = augmented_view(nets, batch)?;
    let io = StepIo {
        augmented: augmented.as_ref(),
        ..step_io(&fwd, &views, batch, progress)
    };
    let split = matches!(&update, Update::Sgd(opt, _) if opt.splits_losses());
    let (weights, terms, total, parts) = losses(nets, methods, peers, &fwd, &io, batch, split)?;
    let values = scalars(&terms, &total, &fwd.student.logits, y);
    match update {
        Update::Sgd(opt, lr) => {
            opt.zero_grad()?;
            match parts {
                Some(Parts { task, kd }) => opt.backward_split(task.as_ref(), kd.as_ref())?,
                None => opt.backward(&total)?,
            }
            opt.average_over_ranks()?;
            opt.step(lr)?;
        }
        // A SyncBatchNorm backward is a collective and may fail.
        Update::Backward => total.f_backward()?,
    }
    tch::no_grad(|| {
        methods
            .iter_mut()
            .try_for_each(|a| a.method.after_step(&io))
    })?;
    Ok(StepOut {
        weights,
        names: terms.into_iter().map(|(n, _)| n).collect(),
        values,
        n: y.size()[0],
    })
}

fn forward(
    nets: &StageNets,
    x: &Tensor,
    y: &Tensor,
    shared: Option<&SharedTeacher>,
) -> Result<Forward> {
    let exec = nets.exec;
    let input_for = |side| {
        if nets.grad_of(side) {
            x.detach().set_requires_grad(true)
        } else {
            x.shallow_clone()
        }
    };
    let share = nets.teacher_share();
    let clone = |t: &Taps| t.map(Tensor::shallow_clone);
    let shared = shared.and_then(|s| match (share, &s.live) {
        (Some(Share::Frozen), _) => Some((x.shallow_clone(), clone(&s.taps))),
        (Some(Share::Graph), Some((input, live))) => Some((input.shallow_clone(), clone(live))),
        _ => None,
    });
    // A frozen teacher runs in eval mode without graph unless a gradient
    // tap of it was asked for; a peer trains.
    let (t_input, t_live) = match (shared, nets.other) {
        (Some((input, taps)), _) => (input, Some(taps)),
        (None, None) => (x.shallow_clone(), None),
        (None, Some(t)) => {
            count_teacher_forwards(1);
            let input = input_for(Side::Teacher);
            let taps = match share {
                Some(Share::Frozen) => t.frozen_taps(&input, exec),
                _ => t.taps(&input, nets.mutual, exec)?,
            };
            (input, Some(taps))
        }
    };
    let s_input = input_for(Side::Student);
    let student = if nets.net_trains || nets.grad_of(Side::Student) {
        nets.net.taps(&s_input, nets.net_trains, exec)?
    } else {
        nets.net.frozen_taps(&s_input, exec)
    };
    let grads = nets
        .needs
        .grads
        .iter()
        .map(|g| match g.side {
            // Said here, before the shim's own refusal arrives as a libtorch
            // error with a C++ backtrace.
            Side::Student if g.create_graph && exec.sync_bn && nets.net_trains => {
                Err(EngineError::Plan(
                    "batchnorm: sync does not support second derivatives (a gradient tap taken with create_graph); use batchnorm: batch for methods that take one".into(),
                ))
            }
            Side::Student => {
                let grad = target_grad(&student, &s_input, g.wrt, y, g.create_graph)?;
                Ok(if g.create_graph { grad } else { grad.detach() })
            }
            Side::Teacher => {
                let t = t_live.as_ref().expect("teacher grads need a teacher");
                Ok(target_grad(t, &t_input, g.wrt, y, false)?.detach())
            }
        })
        .collect::<Result<_>>()?;
    let t_taps = t_live.as_ref().map(Taps::detach);
    Ok(Forward {
        t_live,
        t_taps,
        student,
        grads,
    })
}

/// Both networks on the batch's strongly augmented view, for the methods
/// that asked for it: the student as it trains (graph, batch statistics),
/// the teacher frozen.
fn augmented_view(nets: &StageNets, batch: &Batch) -> Result<Option<ViewTaps>> {
    if nets.needs.augmented.is_none() {
        return Ok(None);
    }
    let strong = batch.strong.as_ref().ok_or_else(|| {
        EngineError::Plan("a method asks for the augmented view, but the batch has none".into())
    })?;
    let teacher = match nets.other {
        Some(t) if nets.frozen_teacher() => t,
        _ => {
            return Err(EngineError::Plan(
                "the augmented view needs a frozen teacher (not a peer that trains, nor one with gradient taps)".into(),
            ));
        }
    };
    let x = nets.exec.input(strong)?;
    count_teacher_forwards(1);
    let student = if nets.net_trains {
        nets.net.taps(&x, true, nets.exec)?
    } else {
        nets.net.frozen_taps(&x, nets.exec)
    };
    Ok(Some(ViewTaps {
        student,
        teacher: teacher.frozen_taps(&x, nets.exec),
    }))
}

/// Gradient of the target-class logit w.r.t. the input or a tap.
fn target_grad(
    taps: &Taps,
    input: &Tensor,
    wrt: Option<kd_core::Tap>,
    target: &Tensor,
    create_graph: bool,
) -> Result<Tensor> {
    let picked = taps
        .logits
        .gather(1, &target.unsqueeze(1), false)
        .sum(Kind::Float);
    let x = match wrt {
        Some(t) => taps.get(t).expect("grad taps are validated at build"),
        None => input,
    };
    // Fallible: through SyncBatchNorm this backward is a collective, and a
    // second-order one (`create_graph`) is refused.
    Ok(Tensor::f_run_backward(&[&picked], &[x], true, create_graph)?.remove(0))
}

fn step_io<'a>(
    fwd: &'a Forward,
    views: &'a [Option<ViewTaps>],
    batch: &'a Batch,
    progress: Progress,
) -> StepIo<'a> {
    StepIo {
        student: &fwd.student,
        teacher: fwd.t_taps.as_ref(),
        grads: &fwd.grads,
        views,
        augmented: None,
        target: &batch.labels,
        index: Some(&batch.index),
        contrast_index: batch.contrast_index.as_ref(),
        progress,
        train: true,
        // Mixup/CutMix: the loader mixed the images both networks saw.
        soft_target: batch.soft_target.as_ref(),
    }
}

/// Asks each method for the rows and classes it attacks, runs the attack
/// on the teacher and evaluates both networks on the result.
fn adversarial_views(
    nets: &StageNets,
    methods: &mut [Active],
    fwd: &Forward,
    batch: &Batch,
    x: &Tensor,
    progress: Progress,
) -> Result<Vec<Option<ViewTaps>>> {
    let needs = nets.needs;
    let mut views: Vec<Option<ViewTaps>> = (0..needs.views.len()).map(|_| None).collect();
    if needs.views.is_empty() {
        return Ok(views);
    }
    if nets.exec.sync_bn && nets.net_trains {
        // Each rank attacks its own choice of rows, possibly none: the
        // ranks' extra training forwards (SyncBatchNorm collectives) would
        // not pair up.
        return Err(EngineError::Plan(
            "batchnorm: sync cannot train with adversarial views: each rank attacks a different number of its rows; use batchnorm: batch".into(),
        ));
    }
    let teacher = nets
        .other
        .expect("adversarial views need a teacher, checked at build");
    let y = &batch.labels;
    let draws = nets.draws.for_step(progress, y.size()[0], x.device());
    let io = step_io(fwd, &[], batch, progress);
    for a in methods.iter_mut() {
        for v in a.views.clone() {
            let picked = a.method.attack_targets(ViewRef(v), &io, &draws)?;
            let Some((rows, classes)) = picked.filter(|(rows, _)| rows.numel() > 0) else {
                continue;
            };
            let adv = attack::attack(
                teacher.model.as_ref(),
                &x.index_select(0, &rows),
                &y.index_select(0, &rows),
                &classes,
                &needs.views[v],
            );
            count_teacher_forwards(1);
            views[v] = Some(ViewTaps {
                student: nets.net.taps(&adv, nets.net_trains, nets.exec)?,
                teacher: teacher.frozen_taps(&adv, nets.exec),
            });
        }
    }
    Ok(views)
}

type Terms = Vec<(String, Tensor)>;

/// The total split into the task losses' (methods that read no teacher,
/// and terms a method marks as task) and the distillation losses' sums,
/// for DOT.
struct Parts {
    task: Option<Tensor>,
    kd: Option<Tensor>,
}

fn accumulate(sum: &mut Option<Tensor>, v: &Tensor) {
    *sum = Some(match sum.take() {
        Some(acc) => acc + v,
        None => v.shallow_clone(),
    });
}

/// Each method's terms (and in mutual learning the peer's, with the roles
/// swapped) and the weighted total; with `split`, its task and distillation
/// parts too.
fn losses(
    nets: &StageNets,
    methods: &mut [Active],
    peers: &mut [Active],
    fwd: &Forward,
    io: &StepIo,
    batch: &Batch,
    split: bool,
) -> Result<(Vec<f64>, Terms, Tensor, Option<Parts>)> {
    let progress = io.progress;
    let mut weights = Vec::with_capacity(methods.len());
    let mut terms = Terms::new();
    let mut total: Option<Tensor> = None;
    let mut parts = split.then_some(Parts {
        task: None,
        kd: None,
    });
    let mut add = |w: f64, losses: Losses, prefix: String, distills: bool, terms: &mut Terms| {
        for (i, (t, v)) in losses.terms.into_iter().enumerate() {
            let weighted = &v * w;
            if let Some(p) = parts.as_mut() {
                let kd = distills && !losses.task_terms.contains(&i);
                accumulate(if kd { &mut p.kd } else { &mut p.task }, &weighted);
            }
            accumulate(&mut total, &weighted);
            terms.push((format!("{prefix}{t}"), v));
        }
    };
    for a in methods.iter_mut() {
        let w = a.schedule(progress)?;
        weights.push(w);
        let mut l = Losses::default();
        a.method.losses(io, &mut l)?;
        add(w, l, format!("{}/", a.label), a.distills, &mut terms);
    }
    if nets.mutual {
        let t_live = fwd.t_live.as_ref().expect("mutual learning has a peer");
        let s_det = fwd.student.detach();
        let peer_io = StepIo {
            student: t_live,
            teacher: Some(&s_det),
            grads: &[],
            views: &[],
            ..step_io(fwd, &[], batch, progress)
        };
        for a in peers.iter_mut() {
            let w = a.schedule(progress)?;
            let mut l = Losses::default();
            a.method.losses(&peer_io, &mut l)?;
            add(w, l, format!("peer/{}/", a.label), a.distills, &mut terms);
        }
    }
    let total = total.ok_or_else(|| EngineError::Plan("no loss terms in this step".into()))?;
    Ok((weights, terms, total, parts))
}

/// `[terms…, total, correct]` as one fp32 device tensor: the stage loop
/// copies many steps of these to the host at once.
fn scalars(terms: &Terms, total: &Tensor, logits: &Tensor, y: &Tensor) -> Tensor {
    let correct = logits.argmax(1, false).eq_tensor(y).sum(Kind::Float);
    let mut parts: Vec<Tensor> = terms
        .iter()
        .map(|(_, t)| t.detach().to_kind(Kind::Float).reshape([1]))
        .collect();
    parts.push(total.detach().to_kind(Kind::Float).reshape([1]));
    parts.push(correct.reshape([1]));
    Tensor::cat(&parts, 0)
}
