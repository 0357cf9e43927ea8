//! A stage's methods: built from the registry with the taps they ask for,
//! their schedules compiled, their parameters carried between stages.

use kd_core::{BuildCx, DynMethod, Needs, Progress, Registry, TapShapes};
use tch::{Device, Kind, Tensor, nn};

use super::checkpoint::Carry;
use super::nets::{Exec, Net, roles, shapes_of};
use crate::plan::{DeviceChoice, ModelPlan, Plan, StagePlan, Subject};
use crate::schedule::{ScheduleFn, ScheduleResolver};
use crate::{EngineError, Result};

/// A method instance of a stage, with its own parameters and schedules.
pub(crate) struct Active {
    pub(crate) label: String,
    pub(crate) method: Box<dyn DynMethod>,
    pub(crate) vs: nn::VarStore,
    pub(crate) weight: Box<dyn ScheduleFn>,
    pub(crate) fields: Vec<(String, Box<dyn ScheduleFn>)>,
    /// Adversarial views this method requested (indices into `Needs::views`).
    pub(crate) views: std::ops::Range<usize>,
}

impl Active {
    /// Sets the scheduled config fields for this point of the stage and
    /// returns the weight of the method's terms.
    pub(crate) fn schedule(&mut self, progress: Progress) -> Result<f64> {
        for (field, f) in self.fields.iter_mut() {
            let v = f.value(progress)?;
            self.method.set_scheduled(field, v)?;
        }
        self.weight.value(progress)
    }
}

/// What building a stage's methods needs to know about the run.
pub(crate) struct BuildEnv<'a> {
    pub(crate) registry: &'a Registry,
    pub(crate) device: Device,
    pub(crate) n_data: i64,
    pub(crate) classes: i64,
    pub(crate) scripts: &'a dyn ScheduleResolver,
}

fn build_methods(
    stage: &StagePlan,
    cx: &BuildEnv,
    s_shapes: &TapShapes,
    t_shapes: Option<&TapShapes>,
    needs: &mut Needs,
    carry: &Carry,
    prefix: &str,
) -> Result<Vec<Active>> {
    let mut out: Vec<Active> = Vec::new();
    for mp in &stage.methods {
        let entry = cx.registry.get(&mp.method)?;
        if out.iter().any(|a| a.label == mp.label()) {
            return Err(EngineError::Plan(format!(
                "stage `{}` uses label `{}` twice; give one a distinct `label`",
                stage.name,
                mp.label()
            )));
        }
        let vs = nn::VarStore::new(cx.device);
        let first_view = needs.views.len();
        let method = {
            let mut bcx = BuildCx::new(
                entry.name,
                s_shapes,
                t_shapes,
                vs.root(),
                needs,
                cx.n_data,
                cx.classes,
            );
            entry.build(mp.config.clone(), &mut bcx)?
        };
        let views = first_view..needs.views.len();
        if let Some(saved) = carry.get(&format!("{prefix}{}", mp.label())) {
            let vars = vs.variables();
            for (name, t) in saved {
                if let Some(v) = vars.get(name).filter(|v| v.size() == t.size()) {
                    tch::no_grad(|| v.shallow_clone().copy_(t));
                }
            }
        }
        let mut fields = Vec::new();
        for (field, w) in &mp.schedule {
            if !entry.schedulable.contains(&field.as_str()) {
                return Err(EngineError::Plan(format!(
                    "method `{}`: field `{field}` cannot be scheduled; schedulable: {:?}",
                    mp.method, entry.schedulable
                )));
            }
            fields.push((field.clone(), w.compile(cx.scripts)?));
        }
        out.push(Active {
            label: mp.label().to_string(),
            method,
            vs,
            weight: mp.weight.compile(cx.scripts)?,
            fields,
            views,
        });
    }
    Ok(out)
}

/// Builds a stage's methods, and in mutual learning a second instance of
/// each for the peer with the roles swapped.
pub(crate) fn build_stage(
    stage: &StagePlan,
    env: &BuildEnv,
    s_shapes: &TapShapes,
    t_shapes: Option<&TapShapes>,
    carry: &Carry,
) -> Result<(Vec<Active>, Vec<Active>, Needs)> {
    let mut needs = Needs::default();
    let methods = build_methods(stage, env, s_shapes, t_shapes, &mut needs, carry, "")?;
    if !needs.mutual {
        return Ok((methods, Vec::new(), needs));
    }
    let t = t_shapes.expect("mutual requires a teacher, checked at build");
    let mut peer_needs = Needs::default();
    let peers = build_methods(
        stage,
        env,
        t,
        Some(s_shapes),
        &mut peer_needs,
        carry,
        "peer/",
    )?;
    if !needs.grads.is_empty() || !needs.views.is_empty() || needs.contrast.is_some() {
        return Err(EngineError::Plan(format!(
            "stage `{}`: mutual learning cannot be combined with gradient taps, adversarial views or contrast sampling",
            stage.name
        )));
    }
    Ok((methods, peers, needs))
}

/// Checks a plan against the registry, the model zoo, the taps and the data
/// description without loading data or training. `check_files`: also check
/// that weight files which exist fit their models (off for plans whose
/// weights an earlier run of the same recipe will write).
pub fn validate(
    plan: &Plan,
    registry: &Registry,
    scripts: &dyn ScheduleResolver,
    check_files: bool,
) -> Result<()> {
    let (n_train, classes) = kd_data::describe(&plan.data.source)?;
    let n_data = n_train - (n_train as f64 * plan.data.val_fraction).round() as i64;
    let device = Device::Cpu;
    let net_of = |m: &ModelPlan| -> Result<Net> {
        let vs = nn::VarStore::new(device);
        let model = kd_models::build(&m.arch, &vs.root(), classes)?;
        let mut net = Net { vs, model };
        // Files that exist must fit; a missing one (like a missing data set)
        // is reported by the run that needs it, naming the file.
        if let (Some(w), true) = (&m.weights, check_files)
            && w.exists()
        {
            kd_models::load_weights(&mut net.vs, w)?;
        }
        Ok(net)
    };
    let student = net_of(&plan.student)?;
    let teacher = plan.teacher.as_ref().map(net_of).transpose()?;
    if plan.stages.is_empty() {
        return Err(EngineError::Plan("the plan has no stages".into()));
    }
    if plan.data.batch_size == 0 {
        return Err(EngineError::Plan("batch_size must be at least 1".into()));
    }
    if plan.device == DeviceChoice::Cpu {
        Exec::of(plan, Device::Cpu)?;
    }
    let probe = Tensor::zeros([2, 3, 32, 32], (Kind::Float, device));
    let env = BuildEnv {
        registry,
        device,
        n_data,
        classes,
        scripts,
    };
    for stage in &plan.stages {
        if stage.epochs == 0 || stage.methods.is_empty() {
            return Err(EngineError::Plan(format!(
                "stage `{}` needs at least one epoch and one method",
                stage.name
            )));
        }
        if stage.subject == Subject::Teacher && teacher.is_none() {
            return Err(EngineError::Plan(format!(
                "stage `{}` trains the teacher, but the plan has none",
                stage.name
            )));
        }
        let (net, other) = roles(stage.subject, &student, teacher.as_ref());
        let s_shapes = shapes_of(net, &probe);
        let t_shapes = other.map(|t| shapes_of(t, &probe));
        build_stage(stage, &env, &s_shapes, t_shapes.as_ref(), &Carry::new())
            .map_err(|e| EngineError::Plan(format!("stage `{}`: {e}", stage.name)))?;
    }
    Ok(())
}
