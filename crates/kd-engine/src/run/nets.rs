//! The networks of a run: building them, their roles in a stage, and the
//! frozen teacher's inference form.

use std::rc::Rc;

use kd_core::{TapShapes, Taps};
use kd_models::Network;
use tch::{Device, Tensor, nn};

use super::graph::GraphBackend;
use crate::plan::{BatchNorm, DeviceChoice, ModelPlan, Plan, Precision, Subject};
use crate::tensors::TensorFile;
use crate::{EngineError, Result};

pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        // A rank of a data-parallel job uses the GPU of its local rank.
        DeviceChoice::Auto | DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(
            kd_dist::group().map_or(0, |g| g.world.local_rank),
        )),
        DeviceChoice::Auto => Ok(Device::Cpu),
        DeviceChoice::Cuda => Err(EngineError::Plan(
            "device `cuda` asked for, but no CUDA device is available; use `cpu` or `auto`".into(),
        )),
    }
}

/// How a run's forward passes execute: memory order, precision, and
/// whether BatchNorm ever uses batch statistics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exec {
    pub channels_last: bool,
    pub precision: Precision,
    pub device: Device,
    /// `batchnorm: frozen`: running statistics in training forwards too.
    pub frozen_bn: bool,
    /// `batchnorm: sync` in a job of several ranks: training forwards
    /// normalise with the whole job's batch (SyncBatchNorm).
    pub sync_bn: bool,
    /// `cuda_graph: true`: where the captured steps run.
    pub graph: Option<GraphBackend>,
}

impl Exec {
    pub(crate) fn of(plan: &Plan, device: Device) -> Result<Exec> {
        if !device.is_cuda() {
            // The CPU's autocast has a bf16 path through oneDNN; its fp16
            // kernels are few and slow, and without bf16 kernels (before
            // AVX-512) bf16 would be emulated, slower than fp32.
            let name = plan.precision.name();
            match plan.precision {
                Precision::Fp32 => {}
                Precision::Fp16 => {
                    return Err(EngineError::Plan(format!(
                        "precision `{name}` needs CUDA (device is {device:?}); on the CPU use `fp32`, or `bf16` / `teacher-bf16` where the CPU has bf16 kernels"
                    )));
                }
                Precision::Bf16 | Precision::TeacherBf16 if !kd_aten::cpu_bf16_supported() => {
                    return Err(EngineError::Plan(format!(
                        "precision `{name}` needs CUDA or a CPU with bf16 kernels (oneDNN on AVX-512 or newer), and libtorch reports none on this one; use `fp32`"
                    )));
                }
                Precision::Bf16 | Precision::TeacherBf16 => {}
            }
        }
        if device.is_cuda() {
            // A stage's shapes are fixed: cuDNN may time its kernels once
            // per shape and keep the fastest.
            tch::Cuda::cudnn_set_benchmark(true);
            // Autocast's lower precision is process-wide state; the runs of
            // one lockstep group share their precision.
            match plan.precision {
                Precision::Fp32 => {}
                Precision::Bf16 | Precision::TeacherBf16 => {
                    kd_aten::set_cuda_autocast_dtype(kd_aten::HalfKind::Bf16)?
                }
                Precision::Fp16 => kd_aten::set_cuda_autocast_dtype(kd_aten::HalfKind::F16)?,
            }
        }
        let graph = plan
            .cuda_graph
            .then(|| GraphBackend::on(device))
            .transpose()?;
        if graph.is_some() && kd_dist::group().is_some() {
            return Err(EngineError::Plan(
                "cuda_graph does not capture data-parallel steps (their gradient averaging is a collective); drop cuda_graph under torchrun".into(),
            ));
        }
        Ok(Exec {
            graph,
            frozen_bn: plan.batchnorm == BatchNorm::Frozen,
            // Without a process group (or with one rank) there is no other
            // batch to include: `sync` is `batch`.
            sync_bn: plan.batchnorm == BatchNorm::Sync
                && kd_dist::group().is_some_and(|g| g.world.size > 1),
            channels_last: plan.channels_last,
            precision: plan.precision,
            device,
        })
    }

    /// A batch of images in the layout the networks' weights use.
    pub(crate) fn input(&self, x: &Tensor) -> Result<Tensor> {
        if self.channels_last && x.dim() == 4 {
            Ok(kd_aten::channels_last(x)?)
        } else {
            Ok(x.shallow_clone())
        }
    }

    /// Runs `f`, a forward of a network the stage trains, under autocast
    /// at the plan's precision (a no-op at fp32).
    pub(crate) fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        self.autocast_at(self.precision.trained(), f)
    }

    /// Runs `f`, a forward of a network the stage does not train, under
    /// autocast at the plan's precision for those (`teacher-bf16`: bf16).
    pub(crate) fn frozen_autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        self.autocast_at(self.precision.frozen(), f)
    }

    fn autocast_at<T>(&self, precision: Precision, f: impl FnOnce() -> T) -> T {
        match precision {
            Precision::Fp32 => f(),
            // `of` admits only bf16 on the CPU; tch's autocast is CUDA's.
            _ if !self.device.is_cuda() => kd_aten::cpu_autocast(f),
            _ => tch::autocast(true, f),
        }
    }

    /// Taps in fp32 (loss terms are computed in fp32 whatever the forward's precision).
    pub(crate) fn fp32_taps(&self, taps: Taps) -> Taps {
        match self.precision {
            Precision::Fp32 => taps,
            _ => taps.map(|t| t.to_kind(tch::Kind::Float)),
        }
    }
}

pub(crate) struct Net {
    pub(crate) vs: nn::VarStore,
    pub(crate) model: Box<dyn Network>,
}

impl Net {
    /// Its weights at `path` (safetensors), and beside it as
    /// `torch.save(state_dict)` (`.pt`) for a network from PyTorch.
    pub(crate) fn save(&self, path: &std::path::Path) -> Result<()> {
        kd_models::save_weights(&self.vs, path)?;
        if self.model.is_from_pytorch() {
            kd_models::save_pt(&self.vs, &path.with_extension("pt"))?;
        }
        Ok(())
    }

    /// A zoo network with fresh weights.
    pub(crate) fn zoo(arch: &str, classes: i64, device: Device) -> Result<Net> {
        let vs = nn::VarStore::new(device);
        let model = kd_models::build(arch, &vs.root(), classes)?;
        Ok(Net { vs, model })
    }

    /// Forward pass at the run's precision, taps in fp32; `train`: the
    /// stage trains this network (else it is frozen, kept for its
    /// gradient taps). With `batchnorm: sync`, a training forward is a
    /// collective: every rank must make it, in the same order.
    pub(crate) fn taps(&self, x: &Tensor, train: bool, exec: &Exec) -> Result<Taps> {
        let batch_stats = train && !exec.frozen_bn;
        let run = || self.model.forward_taps(x, batch_stats);
        let forward = || {
            exec.fp32_taps(if train {
                exec.autocast(run)
            } else {
                exec.frozen_autocast(run)
            })
        };
        match kd_dist::group().filter(|_| batch_stats && exec.sync_bn) {
            Some(g) => Ok(kd_models::with_train_batch_norm(
                sync_batch_norm(g),
                forward,
            )?),
            None => Ok(forward()),
        }
    }

    /// Forward pass of a frozen network: eval mode, no graph.
    pub(crate) fn frozen_taps(&self, x: &Tensor, exec: &Exec) -> Taps {
        tch::no_grad(|| exec.fp32_taps(exec.frozen_autocast(|| self.model.forward_taps(x, false))))
    }

    /// Puts 4-d weights (convolution kernels) in channels-last order, so
    /// that convolutions run on NHWC data without reordering each call.
    pub(crate) fn use_channels_last(&mut self) -> Result<()> {
        for (_, mut var) in self.vs.variables() {
            if var.dim() == 4 {
                let cl = kd_aten::channels_last(&var)?;
                tch::no_grad(|| var.set_data(&cl));
            }
        }
        Ok(())
    }
}

pub(crate) fn build_net(m: &ModelPlan, classes: i64, exec: &Exec) -> Result<Net> {
    let mut net = Net::zoo(&m.arch, classes, exec.device)?;
    if let Some(w) = &m.weights {
        kd_models::load_weights_with(&mut net.vs, w, m.load_options())?;
    }
    if exec.channels_last {
        net.use_channels_last()?;
    }
    Ok(net)
}

/// The plan's student and teacher, initialised from the plan's seed (student
/// first, so a run and a bench harness of the same plan start alike).
pub(crate) fn build_nets(plan: &Plan, classes: i64, exec: &Exec) -> Result<(Net, Option<Net>)> {
    tch::manual_seed(plan.seed as i64);
    let student = build_net(&plan.student, classes, exec)?;
    // A cached teacher's outputs are read, never computed.
    let teacher = plan
        .teacher
        .as_ref()
        .filter(|_| plan.teacher_cache.is_none())
        .map(|t| build_net(t, classes, exec))
        .transpose()?;
    Ok((student, teacher))
}

/// The stage's subject network and the other one (frozen teacher or peer).
pub(crate) fn roles<'a>(
    subject: Subject,
    student: &'a Net,
    teacher: Option<&'a Net>,
) -> (&'a Net, Option<&'a Net>) {
    match subject {
        Subject::Student => (student, teacher),
        Subject::Teacher => (
            teacher.expect("a teacher stage has a teacher, checked by validate"),
            None,
        ),
    }
}

pub(crate) fn shapes_of(net: &Net, probe: &Tensor) -> TapShapes {
    tch::no_grad(|| TapShapes::of(&net.model.forward_taps(probe, false)))
}

pub(crate) fn named_vars(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// SyncBatchNorm over the job, as the zoo's training-BatchNorm hook.
fn sync_batch_norm(g: &'static kd_dist::ProcessGroup) -> Rc<kd_models::TrainBatchNorm> {
    Rc::new(move |a: &kd_models::BatchNormArgs| Ok(g.sync_batch_norm(*a)?))
}

/// The job's collectives, as methods see them (`kd_core::dist`).
struct JobCollective(&'static kd_dist::ProcessGroup);

impl kd_core::dist::Collective for JobCollective {
    fn all_gather_cat(&self, t: &Tensor) -> kd_core::Result<Tensor> {
        let parts = self
            .0
            .all_gather(t)
            .map_err(|e| kd_core::KdError::Invalid(e.to_string()))?;
        Ok(Tensor::cat(&parts, 0))
    }

    fn all_reduce_mean(&self, t: &Tensor) -> kd_core::Result<()> {
        let sum = t.detach().contiguous();
        self.0
            .all_reduce_sum(std::slice::from_ref(&sum))
            .map_err(|e| kd_core::KdError::Invalid(e.to_string()))?;
        tch::no_grad(|| t.shallow_clone().copy_(&(sum / self.0.world.size as f64)));
        Ok(())
    }
}

/// Gives methods the job's collectives, when this process is a rank of one.
pub(crate) fn install_collectives() {
    if let Some(g) = kd_dist::group() {
        kd_core::dist::install(Box::new(JobCollective(g)));
    }
}

/// In a data-parallel job, checks that every rank holds the same values in
/// `vs` (a checksum per rank, gathered): ranks that drifted apart would
/// silently train different models.
pub(crate) fn check_in_sync(vs: &nn::VarStore, what: &str) -> Result<()> {
    let Some(g) = kd_dist::group() else {
        return Ok(());
    };
    let sum: f64 = vs
        .variables()
        .values()
        .map(|t| {
            t.to_kind(tch::Kind::Double)
                .abs()
                .sum(tch::Kind::Double)
                .double_value(&[])
        })
        .sum();
    let all = g.all_gather(&Tensor::from_slice(&[sum]))?;
    let sums: Vec<f64> = all.iter().map(|t| t.double_value(&[0])).collect();
    let spread = sums.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        - sums.iter().cloned().fold(f64::INFINITY, f64::min);
    if spread > 1e-9 * sum.abs().max(1.0) {
        return Err(EngineError::Plan(format!(
            "data-parallel ranks disagree on {what} (checksums {sums:?}); stopped"
        )));
    }
    Ok(())
}

/// In a data-parallel job, gives every rank rank 0's BatchNorm running
/// statistics (what DDP's `broadcast_buffers` leaves in effect: rank 0's
/// own batches); the rest of the state must already agree.
pub(crate) fn sync_bn_stats(vs: &nn::VarStore) -> Result<()> {
    let Some(g) = kd_dist::group() else {
        return Ok(());
    };
    let mut stats: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
        .collect();
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    let ts: Vec<Tensor> = stats.into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| g.broadcast(&ts, 0))?;
    Ok(())
}

/// In a data-parallel job, makes every rank's variables rank 0's (DDP's
/// broadcast at start): parameters, buffers, method state.
pub(crate) fn sync_from_main(vs: &nn::VarStore) -> Result<()> {
    let Some(g) = kd_dist::group() else {
        return Ok(());
    };
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let ts: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| g.broadcast(&ts, 0))?;
    Ok(())
}

pub(crate) fn load_into(
    vs: &nn::VarStore,
    file: &TensorFile,
    prefix: &str,
    path: &std::path::Path,
) -> Result<()> {
    for (name, var) in &vs.variables() {
        let key = format!("{prefix}{name}");
        let bad = |msg: String| EngineError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let src = file
            .get(&key)
            .ok_or_else(|| bad(format!("checkpoint lacks `{key}`")))?;
        if src.size() != var.size() {
            return Err(bad(format!(
                "`{key}` has shape {:?}, the run's has {:?}",
                src.size(),
                var.size()
            )));
        }
        tch::no_grad(|| var.shallow_clone().f_copy_(src))?;
    }
    Ok(())
}
