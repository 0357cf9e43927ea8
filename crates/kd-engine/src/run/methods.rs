//! A stage's methods: built from the registry with the taps they ask for,
//! their schedules compiled, their parameters carried between stages.

use kd_core::{BuildCx, DynMethod, Needs, Progress, Registry, TapShapes};
use tch::{Device, nn};

use super::checkpoint::Carry;

use crate::plan::StagePlan;
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
    /// Whether it reads the teacher (a distillation loss; otherwise a task
    /// loss on the labels), for DOT's two momenta.
    pub(crate) distills: bool,
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
        let (method, distills) = {
            let mut bcx = BuildCx::new(
                entry.name,
                s_shapes,
                t_shapes,
                vs.root(),
                needs,
                cx.n_data,
                cx.classes,
            );
            let method = entry.build(mp.config.clone(), &mut bcx)?;
            (method, bcx.distills())
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
            distills,
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
