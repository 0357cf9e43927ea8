//! Momentum buffers carried into a stage that keeps the optimiser
//! (`keep_optimizer`), as if one `torch.optim.SGD` served both stages.
//!
//! The optimiser names its parameters by their role in the stage (`net.`,
//! `peer.`, `method.<i>.`), which changes between stages: the network a
//! stage trains may be the teacher, and a method's index depends on the
//! stage's list. Carried buffers are keyed by owner instead:
//! `student/<var>`, `teacher/<var>`, `method/<label>/<var>`,
//! `peermethod/<label>/<var>`.

use std::collections::BTreeMap;

use tch::Tensor;

use super::methods::Active;
use super::prepare::Prepared;
use crate::plan::{OptimizerKind, StagePlan, Subject};
use crate::{EngineError, Result};

pub(crate) type Momentum = BTreeMap<String, Tensor>;

/// The owner key of the stage optimiser's parameter `name`.
fn owner_key(name: &str, subject: Subject, methods: &[Active], peers: &[Active]) -> Option<String> {
    let (me, other) = match subject {
        Subject::Student => ("student", "teacher"),
        Subject::Teacher => ("teacher", "student"),
    };
    if let Some(v) = name.strip_prefix("net.") {
        return Some(format!("{me}/{v}"));
    }
    if let Some(v) = name.strip_prefix("peer.") {
        return Some(format!("{other}/{v}"));
    }
    for (prefix, list, owner) in [
        ("method.", methods, "method"),
        ("peermethod.", peers, "peermethod"),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let (i, v) = rest.split_once('.')?;
            let a = list.get(i.parse::<usize>().ok()?)?;
            return Some(format!("{owner}/{}/{v}", a.label));
        }
    }
    None
}

/// Starts a prepared stage's optimiser from the carried buffers of the
/// parameters it shares with them; the others start at zero, as a
/// parameter torch's SGD has not stepped yet.
pub(crate) fn resume_momentum(
    prep: &mut Prepared,
    subject: Subject,
    carried: &Momentum,
) -> Result<()> {
    let keys: Vec<(String, String)> = prep
        .opt
        .momentum()
        .filter_map(|(n, _)| owner_key(&n, subject, &prep.methods, &prep.peers).map(|k| (n, k)))
        .collect();
    for (name, key) in keys {
        let (Some(saved), Some(buf)) = (carried.get(&key), prep.opt.buffer_mut(&name)) else {
            continue;
        };
        // A method rebuilt with another shape under the same label starts
        // afresh, as its parameters do (`build_methods`).
        if saved.size() == buf.size() {
            tch::no_grad(|| buf.f_copy_(saved))?;
        }
    }
    Ok(())
}

/// What a finished stage leaves for the next: nothing unless the next stage
/// keeps the optimiser; then this stage's buffers, over those it was itself
/// handed when it kept the optimiser too (a chain of stages is one optimiser,
/// which holds the state of parameters a middle stage did not train).
pub(crate) fn hand_on(
    carried: &mut Momentum,
    prep: &Prepared,
    stage: &StagePlan,
    next: Option<&StagePlan>,
) {
    if !next.is_some_and(|n| n.keep_optimizer) {
        carried.clear();
        return;
    }
    if !stage.keep_optimizer {
        carried.clear();
    }
    for (n, buf) in prep.opt.momentum() {
        if let Some(key) = owner_key(&n, stage.subject, &prep.methods, &prep.peers) {
            carried.insert(key, buf.shallow_clone());
        }
    }
}

/// A stage that keeps the optimiser needs a stage before it with an
/// optimiser of the same kind (SGD or AdamW: LAMB's step count is its
/// group's, which a stage does not hand on).
pub(crate) fn check_keep(stages: &[StagePlan]) -> Result<()> {
    if let Some(s) = stages.first().filter(|s| s.keep_optimizer) {
        return Err(EngineError::Plan(format!(
            "stage `{}` keeps the optimiser of the stage before it, but it is the first stage",
            s.name
        )));
    }
    for w in stages.windows(2) {
        let (before, s) = (&w[0], &w[1]);
        let (a, b) = (before.optimizer.kind, s.optimizer.kind);
        if s.keep_optimizer && (a != b || matches!(b, OptimizerKind::Lamb | OptimizerKind::Dot)) {
            return Err(EngineError::Plan(format!(
                "stage `{}` keeps the optimiser of stage `{}`, but it is {} there and {} here; a kept optimiser is sgd or adamw in both stages (lamb's and dot's step counts are their own)",
                s.name,
                before.name,
                a.name(),
                b.name()
            )));
        }
    }
    Ok(())
}
