//! Methods: a registered name, a config checked against the method's own
//! fields when written, a weight and schedules of schedulable fields.

use std::sync::Arc;

use kd_engine::MethodPlan;
use rhai::{Dynamic, Engine, Map, NativeCallContext};

use super::schedules::weight_of;
use super::{Fallible, Session, def, to_json};
use crate::error::user;

fn method(s: &Session, name: &str, config: Option<Map>) -> Fallible<MethodPlan> {
    let entry = s.registry.get(name).map_err(|e| user(e.to_string()))?;
    let config = match config {
        Some(m) => to_json(&Dynamic::from_map(m))?,
        None => serde_json::Value::Null,
    };
    // Stored with every default filled in, so a saved plan does not change
    // meaning when a default does.
    let config = entry
        .resolve_config(config)
        .map_err(|e| user(e.to_string()))?;
    Ok(MethodPlan {
        config,
        ..MethodPlan::new(name, 1.0)
    })
}

pub(super) fn register(e: &mut Engine, s: &Arc<Session>) {
    e.register_type_with_name::<MethodPlan>("Method");
    e.register_fn("to_string", |m: &mut MethodPlan| {
        serde_json::to_string(m).unwrap_or_default()
    });
    let (s1, s2, s3, s4) = (Arc::clone(s), Arc::clone(s), Arc::clone(s), Arc::clone(s));
    def(
        e,
        "method",
        &["name: String", "Method"],
        "A registered method (`kd methods`) with its default config and weight 1.",
        move |name: &str| method(&s1, name, None),
    );
    def(
        e,
        "method",
        &["name: String", "config: Map", "Method"],
        "A method with some config fields set: `method(\"vid\", #{init_var: 5.0})`.\nAn unknown field fails here, naming the valid ones.",
        move |name: &str, config: Map| method(&s2, name, Some(config)),
    );
    def(
        e,
        "weight",
        &["method: Method", "weight: ?", "Method"],
        "The loss weight: a number, a schedule (`warmup`, `until_fraction`, `cosine`, `step`)\nor a function of progress: `|p| 8.0 * p.fraction`, `Fn(\"ramp\")`.",
        move |ctx: NativeCallContext, mut m: MethodPlan, w: Dynamic| -> Fallible<MethodPlan> {
            m.weight = weight_of(&ctx, &s3.sources, w, "weight")?;
            Ok(m)
        },
    );
    def(
        e,
        "label",
        &["method: Method", "label: String", "Method"],
        "Name of the method's loss terms in logs (default: the method name).",
        |mut m: MethodPlan, label: &str| {
            m.label = Some(label.to_string());
            m
        },
    );
    def(
        e,
        "schedule",
        &["method: Method", "field: String", "value: ?", "Method"],
        "Schedules a numeric config field the method declares schedulable,\nwith a number, a schedule or a function of progress: `.schedule(\"T\", cosine(8.0, 2.0))`.",
        move |ctx: NativeCallContext,
              mut m: MethodPlan,
              field: &str,
              w: Dynamic|
              -> Fallible<MethodPlan> {
            let entry = s4
                .registry
                .get(&m.method)
                .map_err(|e| user(e.to_string()))?;
            if !entry.schedulable.contains(&field) {
                let valid = if entry.schedulable.is_empty() {
                    "none".to_string()
                } else {
                    entry.schedulable.join(", ")
                };
                return Err(user(format!(
                    "method `{}`: field `{field}` cannot be scheduled; schedulable fields: {valid}",
                    m.method
                )));
            }
            let w = weight_of(&ctx, &s4.sources, w, &format!("schedule of `{field}`"))?;
            m.schedule.insert(field.to_string(), w);
            Ok(m)
        },
    );
}
