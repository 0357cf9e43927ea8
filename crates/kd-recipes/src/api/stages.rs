//! Stages: epochs, methods, which parts train, optimiser and LR schedule.

use kd_engine::{EmaPlan, LrSchedule, MethodPlan, Part, Sgd, StagePlan, Subject};
use rhai::{Array, Dynamic, Engine, Map};

use super::{Fallible, count, def, number, positive, typed};
use crate::error::user;

fn stage(name: &str, epochs: i64, subject: Subject) -> Fallible<StagePlan> {
    Ok(StagePlan {
        name: name.to_string(),
        epochs: positive(epochs, "epochs")?,
        subject,
        train: vec![Part::Network, Part::Methods],
        methods: Vec::new(),
        optimizer: Sgd::default(),
        lr_schedule: LrSchedule::Constant,
        keep_optimizer: false,
        clip_grad: None,
        ema: None,
    })
}

fn part(v: &Dynamic) -> Fallible<Part> {
    match v.clone().into_string().as_deref() {
        Ok("network") => Ok(Part::Network),
        Ok("methods") => Ok(Part::Methods),
        Ok(other) => Err(user(format!(
            "unknown part `{other}`; parts: network, methods"
        ))),
        Err(t) => Err(user(format!(
            "train parts are strings (\"network\", \"methods\"), got {t}"
        ))),
    }
}

pub(super) fn register(e: &mut Engine) {
    e.register_type_with_name::<StagePlan>("Stage");
    e.register_fn("to_string", |s: &mut StagePlan| {
        serde_json::to_string(s).unwrap_or_default()
    });
    def(
        e,
        "stage",
        &["name: String", "epochs: int", "Stage"],
        "A stage training the student; add methods with `.add(method(...))`.",
        |name: &str, epochs: i64| stage(name, epochs, Subject::Student),
    );
    def(
        e,
        "teacher_stage",
        &["name: String", "epochs: int", "Stage"],
        "A stage training the teacher itself (the plan needs a teacher), e.g. with `method(\"ce\")`.",
        |name: &str, epochs: i64| stage(name, epochs, Subject::Teacher),
    );
    def(
        e,
        "epochs",
        &["stage: Stage", "n: int", "Stage"],
        "Number of epochs.",
        |mut s: StagePlan, n: i64| -> Fallible<StagePlan> {
            s.epochs = positive(n, "epochs")?;
            Ok(s)
        },
    );
    def(
        e,
        "add",
        &["stage: Stage", "method: Method", "Stage"],
        "Adds a loss; the stage minimises the weighted sum of its methods' losses.",
        |mut s: StagePlan, m: MethodPlan| {
            s.methods.push(m);
            s
        },
    );
    def(
        e,
        "train",
        &["stage: Stage", "parts: Array", "Stage"],
        "What the optimiser updates: `[\"network\", \"methods\"]` (default),\nor `[\"methods\"]` for an initialisation stage of connectors.",
        |mut s: StagePlan, parts: Array| -> Fallible<StagePlan> {
            s.train = parts.iter().map(part).collect::<Fallible<_>>()?;
            Ok(s)
        },
    );
    def(
        e,
        "sgd",
        &["stage: Stage", "config: Map", "Stage"],
        "SGD settings `#{lr, momentum, nesterov, weight_decay}`; missing keys keep\ntheir defaults (lr 0.05, momentum 0.9, no Nesterov, weight decay 5e-4).",
        |mut s: StagePlan, config: Map| -> Fallible<StagePlan> {
            if config.contains_key("kind") {
                return Err(user(
                    "sgd: takes SGD settings, no `kind`; choose the optimiser with `.optimizer(#{kind: \"adamw\", ...})`".to_string(),
                ));
            }
            s.optimizer = typed::<Sgd>(&Dynamic::from_map(config), "sgd")?;
            Ok(s)
        },
    );
    def(
        e,
        "optimizer",
        &["stage: Stage", "config: Map", "Stage"],
        "The stage's optimiser: `#{kind, ...}` with kind \"sgd\" (the default;\nlr, momentum, nesterov, weight_decay, no_decay_1d), \"adamw\"\n(torch.optim.AdamW: lr 1e-3, betas [0.9, 0.999], eps 1e-8,\nweight_decay 0.01, no_decay_1d true), \"lamb\" (timm's Lamb: eps 1e-6,\nmax_grad_norm 1, trust_clip, always_adapt) or \"dot\" (mdistiller's\nDistillation-Oriented Trainer: SGD keys without nesterov, and delta\n0.075: momentum - delta for the task losses' gradients, momentum + delta\nfor the distillation losses'); missing keys keep the kind's defaults. `no_decay_1d`: no weight decay on norm weights, biases,\npos_embed, cls_token, dist_token (timm's parameter groups).",
        |mut s: StagePlan, config: Map| -> Fallible<StagePlan> {
            s.optimizer = typed::<Sgd>(&Dynamic::from_map(config), "optimizer")?;
            Ok(s)
        },
    );
    def(
        e,
        "clip_grad",
        &["stage: Stage", "max_norm: float", "Stage"],
        "Clips the gradients' global 2-norm to `max_norm` before each update\n(torch.nn.utils.clip_grad_norm_), after data-parallel averaging.",
        |mut s: StagePlan, max_norm: Dynamic| -> Fallible<StagePlan> {
            let m = number(&max_norm, "clip_grad")?;
            if !(m.is_finite() && m > 0.0) {
                return Err(user(format!(
                    "clip_grad must be a finite number > 0, got {m}"
                )));
            }
            s.clip_grad = Some(m);
            Ok(s)
        },
    );
    def(
        e,
        "ema",
        &["stage: Stage", "config: Map", "Stage"],
        "Keeps an EMA of the trained network (timm's ModelEmaV3), evaluated\nbeside it each epoch and saved as `<stage>.ema.safetensors`:\n`#{decay, min_decay, update_after_step, warmup, warmup_gamma,\nwarmup_power, exclude_buffers}` (defaults 0.9998, 0, 0, false, 1, 2/3, false).",
        |mut s: StagePlan, config: Map| -> Fallible<StagePlan> {
            s.ema = Some(typed::<EmaPlan>(&Dynamic::from_map(config), "ema")?);
            Ok(s)
        },
    );
    def(
        e,
        "keep_optimizer",
        &["stage: Stage", "Stage"],
        "Continues the previous stage's optimiser: the momentum buffers of the\nparameters both stages train carry over (one SGD for both, as KD-Zoo's\nAB and FSP); lr and the other settings stay this stage's.",
        |mut s: StagePlan| {
            s.keep_optimizer = true;
            s
        },
    );
    def(
        e,
        "keep_optimizer",
        &["stage: Stage", "on: bool", "Stage"],
        "Whether to continue the previous stage's optimiser (default false).",
        |mut s: StagePlan, on: bool| {
            s.keep_optimizer = on;
            s
        },
    );
    def(
        e,
        "lr",
        &["stage: Stage", "lr: float", "Stage"],
        "Base learning rate.",
        |mut s: StagePlan, lr: Dynamic| -> Fallible<StagePlan> {
            s.optimizer.lr = number(&lr, "lr")?;
            Ok(s)
        },
    );
    def(
        e,
        "multistep",
        &["stage: Stage", "milestones: Array", "gamma: float", "Stage"],
        "LR times `gamma` at each milestone epoch: `.multistep([150, 180, 210], 0.1)`.",
        |mut s: StagePlan, milestones: Array, gamma: Dynamic| -> Fallible<StagePlan> {
            s.lr_schedule = multistep(&milestones, number(&gamma, "gamma")?)?;
            Ok(s)
        },
    );
    def(
        e,
        "multistep",
        &["stage: Stage", "milestones: Array", "Stage"],
        "LR times 0.1 at each milestone epoch.",
        |mut s: StagePlan, milestones: Array| -> Fallible<StagePlan> {
            s.lr_schedule = multistep(&milestones, 0.1)?;
            Ok(s)
        },
    );
    def(
        e,
        "cosine_lr",
        &["stage: Stage", "warmup_epochs: int", "Stage"],
        "Cosine LR decay to 0 over the stage, after a linear warm-up.",
        |mut s: StagePlan, warmup: i64| -> Fallible<StagePlan> {
            s.lr_schedule = LrSchedule::Cosine {
                warmup_epochs: count(warmup, "warmup_epochs")?,
                min_lr: 0.0,
                warmup_lr: 0.0,
            };
            Ok(s)
        },
    );
    def(
        e,
        "cosine_lr",
        &["stage: Stage", "config: Map", "Stage"],
        "Cosine LR decay with timm's knobs: `#{warmup_epochs, warmup_lr, min_lr}`\n(defaults 0, 0, 0): a linear warm-up from `warmup_lr`, then the decay\nto `min_lr`, per step: `.cosine_lr(#{warmup_epochs: 20, warmup_lr: 5e-7, min_lr: 1e-5})`.",
        |mut s: StagePlan, config: Map| -> Fallible<StagePlan> {
            let mut c = config;
            c.insert("kind".into(), Dynamic::from("cosine"));
            s.lr_schedule = typed::<LrSchedule>(&Dynamic::from_map(c), "cosine_lr")?;
            Ok(s)
        },
    );
    def(
        e,
        "constant_lr",
        &["stage: Stage", "Stage"],
        "Constant LR (the default).",
        |mut s: StagePlan| {
            s.lr_schedule = LrSchedule::Constant;
            s
        },
    );
}

fn multistep(milestones: &Array, gamma: f64) -> Fallible<LrSchedule> {
    let milestones = milestones
        .iter()
        .map(|v| {
            v.as_int()
                .map_err(|t| user(format!("milestones must be ints, got {t}")))
                .and_then(|i| count(i, "milestone"))
        })
        .collect::<Fallible<Vec<usize>>>()?;
    if milestones.windows(2).any(|w| w[0] >= w[1]) {
        return Err(user(format!(
            "milestones must increase, got {milestones:?}"
        )));
    }
    Ok(LrSchedule::Multistep { milestones, gamma })
}
