//! The conformance harness. `probe_loss` runs one method on taps read from a
//! fixture, as a training step would (with both networks' taps on an
//! augmented view when the fixture gives them), and writes the loss, the
//! gradients w.r.t. every student tap (the view's too) and the method's
//! parameters and buffers after the call. `probe_step` runs one training
//! step of a method on networks and a batch read from a fixture, for methods
//! that need the networks themselves (gradient taps, adversarial views), and
//! writes the loss, the gradients w.r.t. every student parameter, the
//! student's buffers and the method's state after the step.

use std::path::Path;

use kd_core::{BuildCx, Losses, Needs, Progress, Registry, StepIo, Tap, TapShapes, Taps, ViewTaps};
use tch::{Device, Kind, Tensor, nn};

use crate::error::guarded;
use crate::plan::{MethodPlan, StagePlan, Subject};
use crate::run::{self, Net};
use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result};

/// Taps, their shapes, and the given (tap, leaf tensor) pairs.
type GivenTaps = (Taps, TapShapes, Vec<(Tap, Tensor)>);

/// Taps given by a fixture; absent ones are empty placeholders that no
/// method can reach, since `BuildCx` validates against the given shapes.
fn taps_from(file: &TensorFile, prefix: &str, requires_grad: bool) -> Result<Option<GivenTaps>> {
    let mut given = Vec::new();
    for (name, t) in file.with_prefix(prefix) {
        let tap = Tap::parse(name).ok_or_else(|| {
            EngineError::Plan(format!("fixture tensor `{prefix}{name}` is not a tap name"))
        })?;
        let t = t
            .to_kind(Kind::Float)
            .detach()
            .set_requires_grad(requires_grad);
        given.push((tap, t));
    }
    if given.is_empty() {
        return Ok(None);
    }
    let depth = given
        .iter()
        .filter_map(|(t, _)| match t {
            Tap::Feat(k) | Tap::Preact(k) => Some(k + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut taps = Taps {
        feat: (0..depth).map(|_| Tensor::new()).collect(),
        preact: (0..depth).map(|_| Tensor::new()).collect(),
        embed: Tensor::new(),
        logits: Tensor::new(),
        extra: Vec::new(),
    };
    let mut shapes = TapShapes::default();
    for (tap, t) in &given {
        shapes.taps.push((*tap, t.size()[1..].to_vec()));
        let slot = match *tap {
            Tap::Feat(k) => &mut taps.feat[k],
            Tap::Preact(k) => &mut taps.preact[k],
            Tap::Embed => &mut taps.embed,
            Tap::Logits => &mut taps.logits,
            other => {
                taps.extra.push((other, t.shallow_clone()));
                continue;
            }
        };
        *slot = t.shallow_clone();
    }
    Ok(Some((taps, shapes, given)))
}

/// Runs the fixture at `path` through its method. See tests/golden/gen.py
/// for the fixture layout. With `repeat` > 0 the call (loss, backward,
/// after-step hook) then runs that many more times, and the output's
/// metadata `ms_per_call` says how long each took: `scripts/bench-losses`
/// sets it beside PyTorch's time on the same taps.
pub fn probe_loss(path: &Path, registry: &Registry, repeat: usize) -> Result<TensorFile> {
    guarded("libtorch refused the fixture's tensors", || {
        loss_of_fixture(path, registry, repeat)
    })
}

fn loss_of_fixture(path: &Path, registry: &Registry, repeat: usize) -> Result<TensorFile> {
    let file = tensors::read(path)?;
    let bad = |msg: String| EngineError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let method = file
        .metadata
        .get("method")
        .ok_or_else(|| bad("metadata has no `method`".into()))?;
    let entry = registry.get(method)?;
    let params: serde_json::Value = match file.metadata.get("params") {
        Some(p) => serde_json::from_str(p)
            .map_err(|e| bad(format!("metadata `params` is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let (student, s_shapes, s_leaves) = taps_from(&file, "student/", true)?
        .ok_or_else(|| bad("no `student/<tap>` tensors".into()))?;
    let teacher = taps_from(&file, "teacher/", false)?;
    // Both networks on the augmented second view.
    let augmented = match (
        taps_from(&file, "aug/student/", true)?,
        taps_from(&file, "aug/teacher/", false)?,
    ) {
        (Some(s), Some(t)) => Some((
            ViewTaps {
                student: s.0,
                teacher: t.0,
            },
            s.2,
            t.2,
        )),
        (None, None) => None,
        _ => {
            return Err(bad(
                "an augmented view needs both `aug/student/<tap>` and `aug/teacher/<tap>`".into(),
            ));
        }
    };
    let target = file
        .get("batch/target")
        .ok_or_else(|| bad("no `batch/target`".into()))?;
    let index = file.get("batch/index");
    let contrast_index = file.get("batch/contrast_index");
    let max_index = [index, contrast_index]
        .into_iter()
        .flatten()
        .map(|t| t.max().int64_value(&[]) + 1)
        .max();
    let n_data = match file.metadata.get("n_data") {
        Some(n) => n
            .parse()
            .map_err(|_| bad(format!("metadata `n_data` is not an integer: {n}")))?,
        None => max_index.unwrap_or(target.size()[0]),
    };
    let num_classes = s_shapes.get(Tap::Logits).map(|s| s[0]).unwrap_or(10);
    let mut batch_taps = given_taps(&s_leaves, teacher.as_ref());
    if let Some((_, s, t)) = &augmented {
        for (side, given) in [("student", s), ("teacher", t)] {
            batch_taps.extend(
                given
                    .iter()
                    .map(|(tap, t)| (format!("aug/{side}/{tap}"), t)),
            );
        }
    }
    check_batch(&batch_taps, target, num_classes)
        .and_then(|n| check_indices([index, contrast_index], n_data).map(|_| n))
        .map_err(bad)?;

    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut needs = Needs::default();
    let mut m = {
        let mut cx = BuildCx::new(
            entry.name,
            &s_shapes,
            teacher.as_ref().map(|t| &t.1),
            vs.root(),
            &mut needs,
            n_data,
            num_classes,
        );
        entry.build(params, &mut cx)?
    };
    if !needs.grads.is_empty() || !needs.views.is_empty() {
        return Err(EngineError::Plan(format!(
            "method `{method}` needs gradient taps or adversarial views; `kd probe loss` feeds taps only"
        )));
    }
    if augmented.is_some() && needs.augmented.is_none() {
        return Err(bad(format!(
            "gives `aug/*` taps, but method `{method}` asks for no augmented view"
        )));
    }
    set_vars(&mut vs, &file, path)?;
    // Leaves whose gradients are written: the batch's student taps, then the view's.
    let aug_leaves: &[(Tap, Tensor)] = augmented.as_ref().map_or(&[], |a| &a.1);

    let io = StepIo {
        student: &student,
        teacher: teacher.as_ref().map(|t| &t.0),
        grads: &[],
        views: &[],
        augmented: augmented.as_ref().map(|a| &a.0),
        target,
        index,
        contrast_index,
        progress: Progress {
            epoch: 0,
            epochs: 1,
            step: 0,
            steps_per_epoch: 1,
            global_step: 0,
        },
        train: true,
        soft_target: None,
    };
    let mut losses = Losses::default();
    m.losses(&io, &mut losses)?;
    let loss = losses.total();
    loss.backward();
    tch::no_grad(|| m.after_step(&io))?;
    let all_leaves: Vec<(Tap, Tensor)> = s_leaves
        .iter()
        .chain(aug_leaves)
        .map(|(tap, t)| (*tap, t.shallow_clone()))
        .collect();
    let ms_per_call = (repeat > 0)
        .then(|| time_calls(m.as_mut(), &io, &all_leaves, &vs, repeat))
        .transpose()?;

    let mut out = TensorFile::default();
    if let Some(ms) = ms_per_call {
        out.metadata.insert("ms_per_call".into(), ms.to_string());
    }
    out.metadata.insert("method".into(), method.clone());
    out.push("loss", &loss.to_kind(Kind::Float));
    for (name, t) in &losses.terms {
        out.push(format!("terms/{name}"), t);
    }
    for (i, (tap, leaf)) in all_leaves.iter().enumerate() {
        let g = leaf.grad();
        let g = if g.defined() { g } else { leaf.zeros_like() };
        let side = if i < s_leaves.len() { "" } else { "aug/" };
        out.push(format!("grad/{side}student/{tap}"), &g);
    }
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        out.push(format!("method/{name}"), &t);
    }
    Ok(out)
}

/// Every tap of the fixture, student's then teacher's.
fn given_taps<'a>(
    student: &'a [(Tap, Tensor)],
    teacher: Option<&'a GivenTaps>,
) -> Vec<(String, &'a Tensor)> {
    let mut out: Vec<(String, &Tensor)> = student
        .iter()
        .map(|(tap, t)| (format!("student/{tap}"), t))
        .collect();
    if let Some((_, _, given)) = teacher {
        out.extend(given.iter().map(|(tap, t)| (format!("teacher/{tap}"), t)));
    }
    out
}

/// The batch a fixture describes: one label in `0..classes` per sample,
/// and every tap with that many samples. Returns the batch size.
fn check_batch(taps: &[(String, &Tensor)], target: &Tensor, classes: i64) -> Result<i64, String> {
    if target.dim() != 1 || target.is_floating_point() {
        return Err(format!(
            "`batch/target` must be a 1-D integer tensor, got {:?} of {:?}",
            target.size(),
            target.kind()
        ));
    }
    let n = target.size()[0];
    if n > 0 {
        let (lo, hi) = (target.min().int64_value(&[]), target.max().int64_value(&[]));
        if lo < 0 || hi >= classes {
            return Err(format!(
                "`batch/target` holds labels {lo}..={hi}, outside 0..{classes} (the logits' classes)"
            ));
        }
    }
    for (name, t) in taps {
        if t.dim() < 2 || t.size()[0] != n {
            return Err(format!(
                "`{name}` has shape {:?}; taps are [batch, ...] with the batch of `batch/target` ({n})",
                t.size()
            ));
        }
    }
    Ok(n)
}

/// Data-set indices are integers in `0..n_data`.
fn check_indices(indices: [Option<&Tensor>; 2], n_data: i64) -> Result<(), String> {
    for t in indices.into_iter().flatten() {
        if t.is_floating_point() || t.numel() == 0 {
            continue;
        }
        let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
        if lo < 0 || hi >= n_data {
            return Err(format!(
                "data-set indices {lo}..={hi} fall outside 0..{n_data} (metadata `n_data`)"
            ));
        }
    }
    Ok(())
}

/// Milliseconds per call of the method on `io`: loss, backward, after-step
/// hook, from dropped gradients each time (as a training step does).
fn time_calls(
    m: &mut dyn kd_core::DynMethod,
    io: &StepIo,
    leaves: &[(Tap, Tensor)],
    vs: &nn::VarStore,
    repeat: usize,
) -> Result<f64> {
    let mut grads: Vec<Tensor> = leaves.iter().map(|(_, t)| t.shallow_clone()).collect();
    grads.extend(vs.trainable_variables());
    let started = std::time::Instant::now();
    for _ in 0..repeat {
        kd_aten::grads_to_none(&grads)?;
        let mut losses = Losses::default();
        m.losses(io, &mut losses)?;
        losses.total().backward();
        tch::no_grad(|| m.after_step(io))?;
    }
    Ok(1e3 * started.elapsed().as_secs_f64() / repeat as f64)
}

/// Copies `method/<name>` tensors of the fixture into the method's variables.
fn set_vars(vs: &mut nn::VarStore, file: &TensorFile, path: &Path) -> Result<()> {
    let vars = vs.variables();
    for (name, value) in file.with_prefix("method/") {
        let Some(var) = vars.get(name) else {
            let mut known: Vec<_> = vars.keys().cloned().collect();
            known.sort();
            return Err(EngineError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "fixture sets `method/{name}`, which the method does not have; it has: {}",
                    known.join(", ")
                ),
            });
        };
        if var.size() != value.size() {
            return Err(EngineError::Format {
                path: path.to_path_buf(),
                msg: format!(
                    "`method/{name}` has shape {:?}, the method's has {:?}",
                    value.size(),
                    var.size()
                ),
            });
        }
        tch::no_grad(|| var.shallow_clone().copy_(&value.to_kind(var.kind())));
    }
    Ok(())
}

/// A fixture's metadata value parsed as `T`, or `default` when absent.
fn meta_or<T: std::str::FromStr>(
    file: &TensorFile,
    key: &str,
    default: T,
    what: &str,
    path: &Path,
) -> Result<T> {
    match file.metadata.get(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| EngineError::Format {
            path: path.to_path_buf(),
            msg: format!("metadata `{key}` must be {what}, got `{v}`"),
        }),
    }
}

/// Copies the fixture's `<prefix><state_dict key>` tensors into a network:
/// every variable must be given with its shape, and nothing else may be.
fn set_weights(net: &Net, file: &TensorFile, prefix: &str, path: &Path) -> Result<()> {
    let bad = |msg: String| EngineError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let vars = net.vs.variables();
    let mut missing: Vec<&String> = vars
        .keys()
        .filter(|k| file.get(&format!("{prefix}{k}")).is_none())
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(bad(format!(
            "`{prefix}*` lacks {} of the network's {} tensors: {}",
            missing.len(),
            vars.len(),
            missing
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (name, value) in file.with_prefix(prefix) {
        // PyTorch's BatchNorm counter has no counterpart here and no effect
        // with a fixed momentum.
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let var = vars.get(name).ok_or_else(|| {
            bad(format!(
                "`{prefix}{name}` is not a tensor of the network; state_dict keys look like `conv1.weight`, `layer1.0.bn1.running_mean`"
            ))
        })?;
        if var.size() != value.size() {
            return Err(bad(format!(
                "`{prefix}{name}` has shape {:?}, the network's has {:?}",
                value.size(),
                var.size()
            )));
        }
        tch::no_grad(|| var.shallow_clone().copy_(&value.to_kind(var.kind())));
    }
    Ok(())
}

/// Runs the step fixture at `path`: one training step of its method, the
/// student in train mode and the teacher in eval mode, with the engine's
/// own step and without the update. See tests/golden/gen.py for the layout.
///
/// `loss` is the sum of the method's terms before the recipe's weight; a
/// factor the method applies itself (BSS's epoch decay at the fixture's
/// `epoch` of `epochs`) is included.
pub fn probe_step(path: &Path, registry: &Registry) -> Result<TensorFile> {
    guarded("libtorch refused the fixture's tensors", || {
        step_of_fixture(path, registry)
    })
}

fn step_of_fixture(path: &Path, registry: &Registry) -> Result<TensorFile> {
    let file = tensors::read(path)?;
    let bad = |msg: String| EngineError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let meta = |key: &str| {
        file.metadata
            .get(key)
            .ok_or_else(|| bad(format!("metadata has no `{key}`")))
    };
    let method = meta("method")?;
    registry.get(method)?;
    let params: serde_json::Value = match file.metadata.get("params") {
        Some(p) => serde_json::from_str(p)
            .map_err(|e| bad(format!("metadata `params` is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    let student_arch = meta("student")?;
    let teacher_arch = file.metadata.get("teacher");
    let epoch: usize = meta_or(&file, "epoch", 0, "a non-negative integer", path)?;
    let epochs: usize = meta_or(&file, "epochs", 1, "a positive integer", path)?;
    if epoch >= epochs {
        return Err(bad(format!(
            "metadata `epoch` ({epoch}) must be below `epochs` ({epochs}); epochs count from 0"
        )));
    }

    let input = file
        .get("batch/input")
        .ok_or_else(|| bad("no `batch/input` (NCHW images)".into()))?;
    if input.dim() != 4 {
        return Err(bad(format!(
            "`batch/input` must be NCHW, got shape {:?}",
            input.size()
        )));
    }
    let rows = input.size()[0];
    let target = file
        .get("batch/target")
        .ok_or_else(|| bad("no `batch/target`".into()))?;
    if target.size() != [rows] || target.kind() != Kind::Int64 {
        return Err(bad(format!(
            "`batch/target` must be int64 [{rows}], got {:?} {:?}",
            target.kind(),
            target.size()
        )));
    }
    let draws = match file.get("batch/attack_u") {
        None => None,
        Some(u) => {
            let u = u.to_kind(Kind::Float);
            let in_range = u.numel() == 0
                || (u.min().double_value(&[]) >= 0.0 && u.max().double_value(&[]) < 1.0);
            if u.size() != [rows] || !in_range {
                return Err(bad(format!(
                    "`batch/attack_u` must be [{rows}] uniforms in [0, 1), got shape {:?}",
                    u.size()
                )));
            }
            Some(u)
        }
    };

    let classes_given = file
        .tensors
        .iter()
        .find(|(n, _)| n.starts_with("student.weights/") && kd_models::is_classifier_bias(n))
        .map(|(_, t)| t.size()[0]);
    let classes = match classes_given {
        Some(c) => meta_or(&file, "num_classes", c, "an integer", path)?,
        None => meta("num_classes")?
            .parse()
            .map_err(|_| bad("metadata `num_classes` must be an integer".into()))?,
    };
    let n_data: i64 = meta_or(&file, "n_data", rows, "an integer", path)?;

    let device = Device::Cpu;
    let mut student = Net::zoo(student_arch, classes, device)?;
    set_weights(&student, &file, "student.weights/", path)?;
    let mut teacher = match teacher_arch {
        Some(arch) => {
            let t = Net::zoo(arch, classes, device)?;
            set_weights(&t, &file, "teacher.weights/", path)?;
            Some(t)
        }
        None => None,
    };

    let mut mp = MethodPlan::new(method, 1.0);
    mp.config = params;
    let stage = StagePlan {
        name: "probe".into(),
        epochs,
        subject: Subject::Student,
        train: vec![crate::Part::Network, crate::Part::Methods],
        methods: vec![mp],
        optimizer: Default::default(),
        lr_schedule: Default::default(),
        keep_optimizer: false,
        clip_grad: None,
        ema: None,
    };
    let batch = kd_data::Batch {
        images: input.to_kind(Kind::Float),
        labels: target.shallow_clone(),
        soft_target: None,
        index: Tensor::arange(rows, (Kind::Int64, device)),
        contrast_index: None,
        strong: None,
    };
    let progress = Progress {
        epoch,
        epochs,
        step: 0,
        steps_per_epoch: 1,
        global_step: epoch,
    };
    let probed = run::probe_step(
        registry,
        &stage,
        &mut student,
        teacher.as_mut(),
        &mut |vs| set_vars(vs, &file, path),
        &batch,
        progress,
        draws,
        n_data,
        classes,
    )?;

    let mut out = TensorFile::default();
    out.metadata.insert("method".into(), method.clone());
    let loss: f64 = probed.terms.iter().map(|(_, v)| v).sum();
    out.push("loss", &Tensor::from(loss as f32));
    for (name, v) in &probed.terms {
        out.push(format!("terms/{name}"), &Tensor::from(*v as f32));
    }
    let mut vars: Vec<_> = student.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        if t.requires_grad() {
            let g = t.grad();
            let g = if g.defined() { g } else { t.zeros_like() };
            out.push(format!("grad/student/{name}"), &g);
        } else {
            out.push(format!("buffers/student/{name}"), &t);
        }
    }
    for (name, t) in &probed.method_vars {
        out.push(format!("method/{name}"), t);
    }
    Ok(out)
}
