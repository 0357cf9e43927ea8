//! Networks: zoo names, checked when written, and weights to start from.

use kd_engine::ModelPlan;
use rhai::Engine;

use super::{Fallible, def};
use crate::error::user;

/// A zoo model, or a PyTorch one (`python:SPEC`, `torchscript:FILE`,
/// built when the plan runs); an unknown zoo name fails at the call that
/// names it.
pub(crate) fn model(arch: &str, weights: Option<&str>) -> Fallible<ModelPlan> {
    if let Err(e) = kd_models::check_name(arch) {
        return Err(user(match e {
            kd_models::ModelError::UnknownModel { .. } => format!(
                "unknown model `{arch}`; zoo models: {}, or python:FILE.py:NAME(args), torchscript:FILE",
                kd_models::names().join(", ")
            ),
            other => format!("model `{arch}`: {other}"),
        }));
    }
    Ok(ModelPlan {
        weights: weights.map(Into::into),
        ..ModelPlan::new(arch)
    })
}

pub(super) fn register(e: &mut Engine) {
    e.register_type_with_name::<ModelPlan>("Model");
    def(
        e,
        "model",
        &["arch: String", "Model"],
        "A zoo model (`kd models`), or `python:FILE.py:NAME(args)` / `torchscript:FILE`, with fresh weights.",
        |arch: &str| model(arch, None),
    );
    def(
        e,
        "model",
        &["arch: String", "weights: String", "Model"],
        "A zoo model starting from a safetensors file (a PyTorch `state_dict` loads as-is).",
        |arch: &str, weights: &str| model(arch, Some(weights)),
    );
    def(
        e,
        "weights",
        &["model: Model", "path: String", "Model"],
        "The same model starting from other weights.",
        |mut m: ModelPlan, path: &str| {
            m.weights = Some(path.into());
            m
        },
    );
    def(
        e,
        "reset_classifier",
        &["model: Model", "Model"],
        "Loads the model's weights except its classifier (fc, head, ...), which starts fresh for the run's classes: timm's `pretrained=True, num_classes=N`, e.g. an ImageNet ViT fine-tuned on CIFAR-100.",
        |mut m: ModelPlan| {
            m.reset_classifier = true;
            m
        },
    );
}
