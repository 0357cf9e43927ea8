//! Weights that change over training: numbers, the engine's built-in
//! schedules (kept as data so plans stay serialisable) and script functions
//! of progress.

use kd_core::Progress;
use kd_engine::{Schedule, Weight};
use rhai::{Array, Dynamic, Engine, FnPtr, FuncRegistration, NativeCallContext};

use super::{Fallible, count, def, doc_comment, number};
use crate::error::user;
use crate::sandbox::Sources;

type Getter = fn(&mut Progress) -> i64;

pub(crate) fn register_progress(e: &mut Engine) {
    e.register_type_with_name::<Progress>("Progress");
    let getters: [(&str, &str, Getter); 5] = [
        ("epoch", "Zero-based epoch within the stage.", |p| {
            p.epoch as i64
        }),
        ("epochs", "Epochs of the stage.", |p| p.epochs as i64),
        ("step", "Zero-based step within the epoch.", |p| {
            p.step as i64
        }),
        ("steps_per_epoch", "Steps in one epoch.", |p| {
            p.steps_per_epoch as i64
        }),
        (
            "global_step",
            "Steps of the stage done before this one.",
            |p| p.global_step as i64,
        ),
    ];
    for (name, doc, get) in getters {
        FuncRegistration::new_getter(name)
            .with_params_info(["p: &mut Progress", "int"])
            .with_comments([doc_comment(doc)])
            .register_into_engine(e, get);
    }
    FuncRegistration::new_getter("fraction")
        .with_params_info(["p: &mut Progress", "float"])
        .with_comments(["/// Fraction of the stage done, in [0, 1)."])
        .register_into_engine(e, |p: &mut Progress| p.fraction());
    def(
        e,
        "progress",
        &[
            "epoch: int",
            "epochs: int",
            "step: int",
            "steps_per_epoch: int",
            "Progress",
        ],
        "A point of a stage, to try a schedule function: `print(ramp(progress(10, 240, 0, 390)))`.",
        |epoch: i64, epochs: i64, step: i64, steps_per_epoch: i64| -> Fallible<Progress> {
            let (epoch, epochs) = (count(epoch, "epoch")?, count(epochs, "epochs")?);
            let (step, steps_per_epoch) = (
                count(step, "step")?,
                count(steps_per_epoch, "steps_per_epoch")?,
            );
            Ok(Progress {
                epoch,
                epochs,
                step,
                steps_per_epoch,
                global_step: epoch * steps_per_epoch + step,
            })
        },
    );
}

fn checked(s: Schedule) -> Fallible<Schedule> {
    Weight::Schedule(s.clone())
        .check()
        .map_err(|e| user(e.to_string()))?;
    Ok(s)
}

pub(super) fn register(e: &mut Engine) {
    register_progress(e);
    e.register_type_with_name::<Schedule>("Schedule");
    e.register_fn("to_string", |s: &mut Schedule| {
        serde_json::to_string(s).unwrap_or_default()
    });
    def(
        e,
        "warmup",
        &["value: float", "epochs: float", "Schedule"],
        "Linear ramp from 0 to `value` over the first `epochs` epochs, then `value` (DKD).",
        |value: Dynamic, epochs: Dynamic| -> Fallible<Schedule> {
            checked(Schedule::Warmup {
                value: number(&value, "warmup value")?,
                epochs: number(&epochs, "warmup epochs")?,
            })
        },
    );
    def(
        e,
        "until_fraction",
        &["value: float", "fraction: float", "Schedule"],
        "`value` until `fraction` of the stage is done, then 0 (BSS's attack phase).",
        |value: Dynamic, fraction: Dynamic| -> Fallible<Schedule> {
            let fraction = number(&fraction, "until fraction")?;
            if !(0.0..=1.0).contains(&fraction) {
                return Err(user(format!(
                    "until fraction must be in [0, 1], got {fraction}"
                )));
            }
            Ok(Schedule::Until {
                value: number(&value, "until value")?,
                fraction,
            })
        },
    );
    def(
        e,
        "cosine",
        &["from: float", "to: float", "Schedule"],
        "Cosine from `from` at the start of the stage to `to` at its end.",
        |from: Dynamic, to: Dynamic| -> Fallible<Schedule> {
            Ok(Schedule::Cosine {
                from: number(&from, "cosine from")?,
                to: number(&to, "cosine to")?,
            })
        },
    );
    def(
        e,
        "step",
        &["epochs: Array", "values: Array", "Schedule"],
        "`values[i]` from epoch `epochs[i]` on; `epochs` starts at 0: `step([0, 50], [1.0, 0.0])`.",
        |epochs: Array, values: Array| -> Fallible<Schedule> {
            let epochs = epochs
                .iter()
                .map(|v| {
                    v.as_int()
                        .map_err(|t| user(format!("step epochs must be ints, got {t}")))
                        .and_then(|i| count(i, "step epoch"))
                })
                .collect::<Fallible<Vec<usize>>>()?;
            let values = values
                .iter()
                .map(|v| number(v, "step value"))
                .collect::<Fallible<Vec<f64>>>()?;
            checked(Schedule::Step { epochs, values })
        },
    );
}

/// A weight from a number, a built-in schedule or a function pointer
/// (`|p| ...` or `Fn("name")`).
pub(super) fn weight_of(
    ctx: &NativeCallContext,
    sources: &Sources,
    v: Dynamic,
    what: &str,
) -> Fallible<Weight> {
    let v = v.flatten();
    if v.is::<Schedule>() {
        return Ok(Weight::Schedule(v.cast::<Schedule>()));
    }
    if v.is_fnptr() {
        return script(ctx, sources, &v.cast::<FnPtr>());
    }
    if v.is_float() || v.is_int() {
        let w = number(&v, what)?;
        if !w.is_finite() {
            return Err(user(format!("{what} must be finite, got {w}")));
        }
        return Ok(Weight::Const(w));
    }
    Err(user(format!(
        "{what} must be a number, a schedule (warmup, until_fraction, cosine, step) or a function of progress like `|p| p.fraction`; got {}",
        ctx.engine().map_type_name(v.type_name())
    )))
}

fn script(ctx: &NativeCallContext, sources: &Sources, f: &FnPtr) -> Fallible<Weight> {
    let captured = f
        .curry()
        .iter()
        .map(literal)
        .collect::<Result<Vec<String>, String>>()
        .map_err(|t| {
            let t = ctx.engine().map_type_name(&t);
            user(format!("a schedule function captures a {t}, which a plan cannot store; capture numbers, strings, bools, arrays or maps"))
        })?;
    let file = sources
        .defining(ctx.call_source(), f.fn_name(), captured.len() + 1)
        .map_err(user)?;
    let name =
        crate::scripts::stable_name(&file.ast, f.fn_name(), captured.len() + 1).map_err(user)?;
    let function = if captured.is_empty() {
        name
    } else {
        format!("{name}({})", captured.join(", "))
    };
    Ok(Weight::Schedule(Schedule::Script {
        function,
        source: file.text.to_string(),
    }))
}

/// A value as Rhai source text; `Err` holds the type that has none.
pub(crate) fn literal(v: &Dynamic) -> Result<String, String> {
    let v = v.flatten_clone();
    if v.is_unit() {
        return Ok("()".into());
    }
    if let Ok(b) = v.as_bool() {
        return Ok(b.to_string());
    }
    if let Ok(i) = v.as_int() {
        return Ok(i.to_string());
    }
    if let Ok(f) = v.as_float() {
        if !f.is_finite() {
            return Err(format!("non-finite float ({f})"));
        }
        // `{:?}` keeps every digit and a decimal point or exponent.
        let s = format!("{f:?}");
        return Ok(if s.contains(['.', 'e']) {
            s
        } else {
            format!("{s}.0")
        });
    }
    if v.is_string() {
        return Ok(quote(&v.into_immutable_string().unwrap_or_default()));
    }
    if v.is_array() {
        let items = v
            .into_array()
            .unwrap_or_default()
            .iter()
            .map(literal)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(format!("[{}]", items.join(", ")));
    }
    if v.is_map() {
        let map = v.try_cast::<rhai::Map>().unwrap_or_default();
        let items = map
            .iter()
            .map(|(k, v)| Ok(format!("{}: {}", quote(k), literal(v)?)))
            .collect::<Result<Vec<_>, String>>()?;
        return Ok(format!("#{{{}}}", items.join(", ")));
    }
    Err(super::type_name(&v).to_string())
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
