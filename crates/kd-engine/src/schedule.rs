//! Loss weights and method fields that change over training.
//!
//! A weight is a number or a schedule. Built-in schedules are evaluated here;
//! `Script` schedules name a function of a recipe and are turned into
//! callables by the recipe layer through [`ScheduleResolver`], so the engine
//! never depends on the scripting language.

use kd_core::Progress;
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Weight {
    Const(f64),
    Schedule(Schedule),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Linear ramp from 0 to `value` over the first `epochs` epochs (DKD).
    Warmup { value: f64, epochs: f64 },
    /// `value` until `fraction` of the stage, then 0 (BSS's attack phase).
    Until { value: f64, fraction: f64 },
    /// Cosine from `from` to `to` over the stage.
    Cosine { from: f64, to: f64 },
    /// `values[i]` from epoch `epochs[i]` on (`epochs[0]` is 0).
    Step {
        epochs: Vec<usize>,
        values: Vec<f64>,
    },
    /// A function of the recipe, `fn name(p)` with `p.epoch`, `p.step`,
    /// `p.fraction`; `source` is the recipe text it was compiled from.
    Script { function: String, source: String },
}

/// A weight as a function of progress.
pub trait ScheduleFn: Send {
    fn value(&mut self, p: Progress) -> Result<f64>;
}

struct Builtin(Schedule);

impl ScheduleFn for Builtin {
    fn value(&mut self, p: Progress) -> Result<f64> {
        let epoch_f = p.epoch as f64 + p.step as f64 / p.steps_per_epoch.max(1) as f64;
        Ok(match &self.0 {
            Schedule::Warmup { value, epochs } => value * (epoch_f / epochs.max(1e-12)).min(1.0),
            Schedule::Until { value, fraction } => {
                if p.fraction() < *fraction {
                    *value
                } else {
                    0.0
                }
            }
            Schedule::Cosine { from, to } => {
                to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * p.fraction()).cos())
            }
            Schedule::Step { epochs, values } => {
                let i = epochs.iter().rposition(|&e| p.epoch >= e).unwrap_or(0);
                values[i]
            }
            Schedule::Script { .. } => {
                unreachable!("script schedules are resolved by the recipe layer")
            }
        })
    }
}

struct Constant(f64);

impl ScheduleFn for Constant {
    fn value(&mut self, _: Progress) -> Result<f64> {
        Ok(self.0)
    }
}

/// Turns `Script` schedules into callables (the recipe layer implements it).
pub trait ScheduleResolver {
    fn resolve(&self, function: &str, source: &str) -> Result<Box<dyn ScheduleFn>>;
}

/// For plans without script schedules.
pub struct NoScripts;

impl ScheduleResolver for NoScripts {
    fn resolve(&self, function: &str, _: &str) -> Result<Box<dyn ScheduleFn>> {
        Err(EngineError::Plan(format!(
            "schedule `{function}` is a recipe function; run the recipe with `kd run`"
        )))
    }
}

impl Weight {
    pub fn check(&self) -> Result<()> {
        match self {
            Weight::Schedule(Schedule::Step { epochs, values })
                if epochs.len() != values.len() || epochs.first() != Some(&0) =>
            {
                Err(EngineError::Plan(
                    "step schedule needs as many values as epochs, starting at epoch 0".into(),
                ))
            }
            Weight::Schedule(Schedule::Warmup { epochs, .. }) if *epochs <= 0.0 => {
                Err(EngineError::Plan("warmup epochs must be positive".into()))
            }
            _ => Ok(()),
        }
    }

    pub fn compile(&self, scripts: &dyn ScheduleResolver) -> Result<Box<dyn ScheduleFn>> {
        self.check()?;
        Ok(match self {
            Weight::Const(v) => Box::new(Constant(*v)),
            Weight::Schedule(Schedule::Script { function, source }) => {
                scripts.resolve(function, source)?
            }
            Weight::Schedule(s) => Box::new(Builtin(s.clone())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: usize, step: usize) -> Progress {
        Progress {
            epoch,
            epochs: 100,
            step,
            steps_per_epoch: 10,
            global_step: epoch * 10 + step,
        }
    }

    fn eval(s: Schedule, p: Progress) -> f64 {
        Weight::Schedule(s)
            .compile(&NoScripts)
            .unwrap()
            .value(p)
            .unwrap()
    }

    #[test]
    fn builtins_follow_their_definition() {
        let warm = || Schedule::Warmup {
            value: 8.0,
            epochs: 20.0,
        };
        assert_eq!(eval(warm(), at(0, 0)), 0.0);
        assert!((eval(warm(), at(10, 0)) - 4.0).abs() < 1e-12);
        assert_eq!(eval(warm(), at(50, 0)), 8.0);
        let until = || Schedule::Until {
            value: 2.0,
            fraction: 0.75,
        };
        assert_eq!(eval(until(), at(74, 9)), 2.0);
        assert_eq!(eval(until(), at(75, 0)), 0.0);
        let step = || Schedule::Step {
            epochs: vec![0, 50],
            values: vec![1.0, 0.0],
        };
        assert_eq!(eval(step(), at(49, 9)), 1.0);
        assert_eq!(eval(step(), at(50, 0)), 0.0);
        assert!((eval(Schedule::Cosine { from: 1.0, to: 0.0 }, at(50, 0)) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn weights_parse_as_number_or_schedule() {
        let w: Weight = serde_json::from_str("0.9").unwrap();
        assert_eq!(w, Weight::Const(0.9));
        let w: Weight =
            serde_json::from_str(r#"{"kind": "warmup", "value": 8, "epochs": 20}"#).unwrap();
        assert_eq!(
            w,
            Weight::Schedule(Schedule::Warmup {
                value: 8.0,
                epochs: 20.0
            })
        );
        let bad = Weight::Schedule(Schedule::Step {
            epochs: vec![5],
            values: vec![1.0],
        });
        assert!(bad.check().is_err());
    }
}
