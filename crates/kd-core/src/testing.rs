//! Unit-test support for method crates: build a method on hand-made taps the
//! way the engine would (shapes probed from the tensors, parameters in a
//! fresh CPU `VarStore`) and run its loss once, without any engine.
//!
//! ```ignore
//! let s = testing::maps(vec![map], 2);
//! let loss = testing::loss::<At>(json!({"taps": ["feat/0"]}), &s, Some(&t))?;
//! // Parameters to inspect or set, or a step other than the default one:
//! let mut b = testing::build::<Ofd>(json!({"taps": ["preact/0"]}), &s, Some(&t))?;
//! let names = b.names();
//! let out = b.losses_with(&StepIo { train: false, ..testing::io(&s, Some(&t), &y) })?;
//! ```

use serde_json::Value;
use tch::{Device, Kind, Tensor, nn};

use crate::{
    BuildCx, Losses, Method, Needs, Progress, Result, StepIo, TapShapes, Taps, build_config,
};

/// Size of the data set that `BuildCx` reports (memory banks are this long)
/// unless [`build_on`] is given another.
pub const N_DATA: i64 = 10;

/// Taps from feature maps (also used as pre-activations) and logits; the
/// embedding is the flattened last map, or the logits when there are no maps.
pub fn taps(maps: Vec<Tensor>, logits: Tensor) -> Taps {
    let embed = maps
        .last()
        .map_or_else(|| logits.shallow_clone(), |m| m.flatten(1, -1));
    Taps {
        preact: maps.iter().map(Tensor::shallow_clone).collect(),
        feat: maps,
        embed,
        logits,
        extra: Vec::new(),
    }
}

/// Taps of logits alone, one row per sample.
pub fn logits(rows: &[&[f32]]) -> Taps {
    let b = rows.len() as i64;
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    taps(vec![], Tensor::from_slice(&flat).view([b, -1]))
}

/// Taps from feature maps alone, with zero logits over `classes`.
pub fn maps(maps: Vec<Tensor>, classes: i64) -> Taps {
    let b = maps.first().map_or(1, |m| m.size()[0]);
    taps(
        maps,
        Tensor::zeros([b, classes], (Kind::Float, Device::Cpu)),
    )
}

/// Like [`maps`], but the maps are pre-activations and `feat` is their ReLU,
/// as in a network (for methods that tell the two apart).
pub fn preacts(preact: Vec<Tensor>, classes: i64) -> Taps {
    let mut taps = maps(preact.iter().map(Tensor::relu).collect(), classes);
    taps.preact = preact;
    taps
}

/// One training step's inputs: all-zero progress, no gradient taps, views or
/// (contrast) indices. Change fields with struct update syntax:
/// `StepIo { train: false, ..io(&s, Some(&t), &y) }`.
pub fn io<'a>(s: &'a Taps, t: Option<&'a Taps>, target: &'a Tensor) -> StepIo<'a> {
    StepIo {
        student: s,
        teacher: t,
        grads: &[],
        views: &[],
        augmented: None,
        target,
        index: None,
        contrast_index: None,
        progress: Progress::default(),
        train: true,
        soft_target: None,
    }
}

/// A method built on the shapes of given taps, with what it asked for.
pub struct Built<M> {
    pub method: M,
    /// The method's own parameters and buffers.
    pub vs: nn::VarStore,
    /// What the method requested at build time.
    pub needs: Needs,
    pub classes: i64,
}

/// Builds `M` from a JSON config on the shapes of `s` (and `t`).
pub fn build<M: Method>(cfg: Value, s: &Taps, t: Option<&Taps>) -> Result<Built<M>> {
    build_typed::<M>(build_config::<M>(cfg)?, s, t)
}

/// Builds `M` from a typed config on the shapes of `s` (and `t`), with
/// [`N_DATA`] samples and as many classes as the student has logits.
pub fn build_typed<M: Method>(cfg: M::Config, s: &Taps, t: Option<&Taps>) -> Result<Built<M>> {
    let classes = s.logits.size().last().copied().unwrap_or(1);
    let ts = t.map(TapShapes::of);
    build_on::<M>(cfg, &TapShapes::of(s), ts.as_ref(), N_DATA, classes)
}

/// Builds `M` on given per-sample shapes, data-set size and class count: for
/// build-time checks that need no tensors, or numbers the taps do not give.
pub fn build_on<M: Method>(
    cfg: M::Config,
    s: &TapShapes,
    t: Option<&TapShapes>,
    n_data: i64,
    classes: i64,
) -> Result<Built<M>> {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut needs = Needs::default();
    let method = {
        let mut cx = BuildCx::new(M::NAME, s, t, vs.root(), &mut needs, n_data, classes);
        M::build(cfg, &mut cx)?
    };
    Ok(Built {
        method,
        vs,
        needs,
        classes,
    })
}

impl<M: Method> Built<M> {
    /// The loss terms of one training step on `s` (and `t`): [`io`] with
    /// all-zero targets, one per row of the student's logits.
    pub fn losses(&mut self, s: &Taps, t: Option<&Taps>) -> Result<Losses> {
        let b = s.logits.size()[0];
        let target = Tensor::zeros([b], (Kind::Int64, Device::Cpu));
        self.losses_with(&io(s, t, &target))
    }

    /// The total loss of [`Built::losses`].
    pub fn loss(&mut self, s: &Taps, t: Option<&Taps>) -> Result<f64> {
        Ok(self.losses(s, t)?.total().double_value(&[]))
    }

    /// The loss terms for a hand-assembled step.
    pub fn losses_with(&mut self, io: &StepIo) -> Result<Losses> {
        let mut out = Losses::default();
        self.method.losses(io, &mut out)?;
        Ok(out)
    }

    /// Names of the method's parameters and buffers, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vs.variables().into_keys().collect();
        names.sort();
        names
    }

    /// The same, each followed by its shape: `conv.weight[8, 4, 3, 3]`.
    pub fn names_and_sizes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| format!("{k}{:?}", v.size()))
            .collect();
        names.sort();
        names
    }
}

/// Builds `M` from a JSON config and returns the total loss of one step.
pub fn loss<M: Method>(cfg: Value, s: &Taps, t: Option<&Taps>) -> Result<f64> {
    build::<M>(cfg, s, t)?.loss(s, t)
}

/// Builds `M` from a typed config and returns the total loss of one step.
pub fn loss_typed<M: Method>(cfg: M::Config, s: &Taps, t: Option<&Taps>) -> Result<f64> {
    build_typed::<M>(cfg, s, t)?.loss(s, t)
}
