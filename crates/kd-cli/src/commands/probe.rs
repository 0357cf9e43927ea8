//! `kd probe loss|step|model`: conformance checks against a PyTorch
//! reference, on fixtures the reference wrote.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use kd_core::Registry;

use crate::out::outln;

#[derive(Subcommand, Debug)]
pub enum Probe {
    /// Run a method on a fixture's taps; write loss, tap gradients and method state.
    Loss {
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Then time this many more calls (loss, backward, after-step) and
        /// print `{"ms_per_call": ...}`.
        #[arg(long, default_value_t = 0)]
        repeat: usize,
    },
    /// Run one training step of a method on a fixture's networks and batch
    /// (student in train mode, teacher in eval mode, no update); write the
    /// loss, the gradient of every student parameter, the student's buffers
    /// and the method state.
    Step {
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a zoo model in eval mode on `input`; write `logits` and every tap.
    Model {
        name: String,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        num_classes: i64,
    },
}

pub fn run(p: Probe, registry: &Registry) -> Result<()> {
    match p {
        Probe::Model {
            name,
            weights,
            input,
            out,
            num_classes,
        } => probe_model(&name, &weights, &input, &out, num_classes),
        Probe::Loss {
            fixture,
            out,
            repeat,
        } => {
            let result = kd_engine::probe::probe_loss(&fixture, registry, repeat)
                .with_context(|| format!("probing {}", fixture.display()))?;
            kd_engine::tensors::write(&out, &result)?;
            if let Some(ms) = result.metadata.get("ms_per_call") {
                outln!(
                    "{}",
                    serde_json::json!({ "ms_per_call": ms.parse::<f64>().unwrap_or(f64::NAN) })
                )?;
            }
            Ok(())
        }
        Probe::Step { fixture, out } => {
            let result = kd_engine::probe::probe_step(&fixture, registry)
                .with_context(|| format!("probing {}", fixture.display()))?;
            kd_engine::tensors::write(&out, &result)?;
            Ok(())
        }
    }
}

fn probe_model(
    name: &str,
    weights: &Path,
    input: &Path,
    out: &Path,
    num_classes: i64,
) -> Result<()> {
    let file = kd_engine::tensors::read(input)?;
    let x = file
        .get("input")
        .context("input file has no tensor named `input`")?;
    let classes = if num_classes > 0 {
        num_classes
    } else {
        infer_classes(weights)?
    };
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = kd_models::build(name, &vs.root(), classes)?;
    kd_models::load_weights(&mut vs, weights)?;
    let taps = tch::no_grad(|| net.forward_taps(&x.to_kind(tch::Kind::Float), false));
    let mut outf = kd_engine::tensors::TensorFile::default();
    for (tap, t) in taps.named() {
        outf.push(tap.to_string(), t);
    }
    kd_engine::tensors::write(out, &outf)?;
    Ok(())
}

/// Number of classes from the classifier's bias in a weights file.
fn infer_classes(weights: &Path) -> Result<i64> {
    let file = kd_engine::tensors::read(weights)?;
    file.tensors
        .iter()
        .find(|(n, _)| kd_models::is_classifier_bias(n))
        .map(|(_, t)| t.size()[0])
        .context("cannot tell the number of classes from the weights; pass --num-classes")
}
