//! The run folder's checkpoint (everything needed to resume, written
//! atomically after every epoch) and its epoch log.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use super::methods::Active;
use super::momentum::Momentum;
use super::nets::{Net, load_into, named_vars};
use crate::observe::{EpochRecord, StageResult};
use crate::optim::Optimizer;
use crate::tensors::{self, TensorFile};
use crate::{EngineError, Result};

/// Metadata of the resume checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Resume {
    pub(crate) stage: usize,
    pub(crate) next_epoch: usize,
    pub(crate) history: Vec<EpochRecord>,
    pub(crate) best_top1: f64,
    pub(crate) best_epoch: usize,
    pub(crate) finished: Vec<StageResult>,
    /// Ranks of the job that wrote it: each rank's share of an epoch
    /// depends on their number, so a resume needs the same.
    #[serde(default = "one")]
    pub(crate) world: usize,
    /// No stage so far has trained the teacher (mutual learning): a resumed
    /// run may share its teacher's forward again only then.
    #[serde(default = "yes")]
    pub(crate) pristine_teacher: bool,
    /// The teacher's tensors are in the checkpoint. A teacher still as its
    /// weights file gave it is left out (it is most of a distillation
    /// checkpoint) and loaded from that file again on resume, whose
    /// SHA-256 must then be `teacher_sha256`.
    #[serde(default = "yes")]
    pub(crate) teacher_saved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) teacher_sha256: Option<String>,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// This process's job size: its ranks, or 1.
pub(crate) fn world_size() -> usize {
    kd_dist::group().map_or(1, |g| g.world.size)
}

/// Method parameters carried from one stage to the next, by label.
pub(crate) type Carry = BTreeMap<String, Vec<(String, Tensor)>>;

pub(crate) fn append_jsonl(path: &Path, stage: &str, record: &EpochRecord) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| EngineError::io(path, e))?;
    let line = serde_json::json!({"stage": stage, "record": record});
    writeln!(f, "{line}").map_err(|e| EngineError::io(path, e))
}

/// Everything a checkpoint holds, borrowed from the run.
pub(crate) struct Snapshot<'a> {
    pub(crate) student: &'a Net,
    pub(crate) teacher: Option<&'a Net>,
    /// The stage in progress's methods and peers (none between stages).
    pub(crate) methods: &'a [Active],
    pub(crate) peers: &'a [Active],
    pub(crate) opt: Option<&'a Optimizer>,
    /// The stage's EMA network (`ema.<var>`).
    pub(crate) ema: Option<&'a Net>,
    pub(crate) carry: &'a Carry,
    pub(crate) momentum: &'a Momentum,
    pub(crate) meta: &'a Resume,
}

/// Writes `snap` to `path` atomically.
pub(crate) fn write_checkpoint(path: &Path, snap: &Snapshot) -> Result<()> {
    let Snapshot {
        student,
        teacher,
        methods,
        peers,
        opt,
        ema,
        carry,
        momentum,
        meta,
    } = *snap;
    let mut file = TensorFile::default();
    let mut add = |prefix: String, vs: &nn::VarStore| {
        for (n, t) in named_vars(vs, &prefix) {
            file.push(n, &t);
        }
    };
    add("student.".into(), &student.vs);
    if let Some(t) = teacher {
        add("teacher.".into(), &t.vs);
    }
    for (i, a) in methods.iter().enumerate() {
        add(format!("method.{i}."), &a.vs);
    }
    for (i, a) in peers.iter().enumerate() {
        add(format!("peermethod.{i}."), &a.vs);
    }
    if let Some(e) = ema {
        add("ema.".into(), &e.vs);
    }
    if let Some(opt) = opt {
        for (n, b) in opt.state() {
            file.push(format!("optim.{n}"), b);
        }
    }
    for (label, vars) in carry {
        for (n, t) in vars {
            file.push(format!("carry.{label}/{n}"), t);
        }
    }
    for (key, t) in momentum {
        file.push(format!("momentum.{key}"), t);
    }
    file.metadata.insert(
        "resume".into(),
        serde_json::to_string(meta).map_err(|e| EngineError::Plan(e.to_string()))?,
    );
    file.metadata
        .insert("format".into(), "kd-checkpoint-1".into());
    tensors::write(path, &file)
}

/// What a run folder's checkpoint restores before the first stage runs.
pub(crate) struct Restored {
    pub(crate) meta: Resume,
    pub(crate) file: TensorFile,
    pub(crate) carry: Carry,
    pub(crate) momentum: Momentum,
}

/// Reads `path` into the networks and returns the rest for the stages.
pub(crate) fn restore(
    path: &Path,
    student: &Net,
    teacher: Option<&Net>,
    device: tch::Device,
) -> Result<Restored> {
    let file = tensors::read(path)?;
    let meta: Resume = file
        .metadata
        .get("resume")
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| EngineError::Format {
            path: path.to_path_buf(),
            msg: "not a kd checkpoint (no resume metadata)".into(),
        })?;
    if meta.stage != meta.finished.len() || meta.history.len() != meta.next_epoch {
        return Err(EngineError::Format {
            path: path.to_path_buf(),
            msg: "resume metadata does not hold together (stage, epochs and history disagree)"
                .into(),
        });
    }
    load_into(&student.vs, &file, "student.", path)?;
    if let Some(t) = teacher.filter(|_| meta.teacher_saved) {
        load_into(&t.vs, &file, "teacher.", path)?;
    }
    let mut carry = Carry::new();
    for (name, t) in file.with_prefix("carry.") {
        if let Some((label, var)) = name.split_once('/') {
            carry
                .entry(label.to_string())
                .or_default()
                .push((var.to_string(), t.to_device(device)));
        }
    }
    let momentum = file
        .with_prefix("momentum.")
        .map(|(key, t)| (key.to_string(), t.to_device(device)))
        .collect();
    Ok(Restored {
        meta,
        file,
        carry,
        momentum,
    })
}

/// A resumed stage's methods and momentum buffers, from the checkpoint.
pub(crate) fn restore_stage(
    file: &TensorFile,
    path: &Path,
    methods: &[Active],
    peers: &[Active],
    opt: &mut Optimizer,
) -> Result<()> {
    for (i, a) in methods.iter().enumerate() {
        load_into(&a.vs, file, &format!("method.{i}."), path)?;
    }
    for (i, a) in peers.iter().enumerate() {
        load_into(&a.vs, file, &format!("peermethod.{i}."), path)?;
    }
    for (n, t) in file.with_prefix("optim.") {
        if let Some(buf) = opt.buffer_mut(n) {
            if buf.size() != t.size() {
                return Err(EngineError::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`optim.{n}` has shape {:?}, the run's has {:?}",
                        t.size(),
                        buf.size()
                    ),
                });
            }
            tch::no_grad(|| buf.f_copy_(t))?;
        }
    }
    Ok(())
}
