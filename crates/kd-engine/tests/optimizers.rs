//! kd's AdamW, LAMB, parameter groups, gradient clipping and EMA against
//! PyTorch and timm: the trajectories of `tests/golden/optimizers.py`
//! (torch.optim.AdamW, timm.optim.Lamb, timm's `param_groups_weight_decay`,
//! torch.nn.utils.clip_grad_norm_, timm's ModelEmaV3), reproduced bit for
//! bit on the CPU: the updates are the same ATen calls with the same
//! scalars.

use std::path::Path;

use kd_engine::tensors::TensorFile;
use kd_engine::{EmaPlan, Optimizer, OptimizerPlan, ema_update};
use tch::{Kind, Tensor};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    optimizer: OptimizerPlan,
    #[serde(default)]
    clip_grad: Option<f64>,
    lr: Vec<f64>,
}

fn fixture() -> TensorFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/optim/optimizers.safetensors");
    kd_engine::tensors::read(&path).unwrap()
}

fn get(file: &TensorFile, key: &str) -> Tensor {
    file.get(key)
        .unwrap_or_else(|| panic!("fixture lacks {key}"))
        .shallow_clone()
}

/// Largest |a - b|, 0 when they are equal bit for bit (and NaN-free).
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn trajectories_equal_pytorch_and_timm() {
    let file = fixture();
    let names: Vec<String> = serde_json::from_str(&file.metadata["params"]).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&file.metadata["cases"]).unwrap();
    assert!(cases.len() >= 6 && names.len() == 5);
    for case in &cases {
        let params: Vec<Tensor> = (0..names.len())
            .map(|i| {
                get(&file, &format!("init/{i}"))
                    .copy()
                    .set_requires_grad(true)
            })
            .collect();
        let named = names
            .iter()
            .zip(&params)
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect();
        let mut opt = Optimizer::new(case.optimizer.clone(), named).with_clip(case.clip_grad);
        for (k, lr) in case.lr.iter().enumerate() {
            opt.zero_grad().unwrap();
            // d/dp sum(p * g) = g exactly: the fixture's gradient.
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, p)| (p * get(&file, &format!("grad/{k}/{i}"))).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
            opt.step(*lr).unwrap();
            for (i, p) in params.iter().enumerate() {
                let want = get(&file, &format!("expect/{}/{k}/{i}", case.name));
                let diff = max_diff(&p.detach(), &want);
                assert_eq!(
                    diff, 0.0,
                    "{}: step {k}, parameter {} differs by {diff:e}",
                    case.name, names[i]
                );
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct EmaCase {
    name: String,
    plan: EmaPlan,
}

#[derive(serde::Deserialize)]
struct EmaMeta {
    keys: Vec<String>,
    params: Vec<String>,
    cases: Vec<EmaCase>,
}

#[test]
fn ema_equals_timm_model_ema_v3() {
    let file = fixture();
    let meta: EmaMeta = serde_json::from_str(&file.metadata["ema"]).unwrap();
    assert!(meta.cases.len() >= 3);
    let is_param: Vec<bool> = meta.keys.iter().map(|k| meta.params.contains(k)).collect();
    let steps = file.with_prefix("ema/model/").count() / meta.keys.len();
    assert!(steps >= 3);
    for case in &meta.cases {
        let ema: Vec<Tensor> = meta
            .keys
            .iter()
            .map(|k| get(&file, &format!("ema/init/{k}")).copy())
            .collect();
        for step in 0..steps {
            let model: Vec<Tensor> = meta
                .keys
                .iter()
                .map(|k| get(&file, &format!("ema/model/{step}/{k}")))
                .collect();
            ema_update(&case.plan, step as u64 + 1, &ema, &model, &is_param).unwrap();
            for (k, e) in meta.keys.iter().zip(&ema) {
                let want = get(&file, &format!("ema/expect/{}/{step}/{k}", case.name));
                assert_eq!(e.kind(), want.kind(), "{k}");
                let diff = max_diff(e, &want);
                assert_eq!(
                    diff, 0.0,
                    "{}: update {step}, `{k}` differs by {diff:e}",
                    case.name
                );
            }
        }
    }
}

/// The plan's optimiser keys: old SGD plans read as before, each kind
/// takes its own defaults, and a key of another kind is refused by name.
#[test]
fn optimizer_plans_read_by_kind() {
    let old: OptimizerPlan = serde_json::from_str(
        r#"{"lr": 0.1, "momentum": 0.9, "nesterov": true, "weight_decay": 1e-4}"#,
    )
    .unwrap();
    assert_eq!(old.kind, kd_engine::OptimizerKind::Sgd);
    assert!(!old.no_decay_1d && old.nesterov);
    // An SGD plan writes no `kind`, as before there was a choice.
    let text = serde_json::to_string(&old).unwrap();
    assert!(!text.contains("kind"), "{text}");
    let adamw: OptimizerPlan = serde_json::from_str(r#"{"kind": "adamw", "lr": 5e-4}"#).unwrap();
    assert_eq!(
        (
            adamw.betas,
            adamw.eps,
            adamw.weight_decay,
            adamw.no_decay_1d
        ),
        ([0.9, 0.999], 1e-8, 0.01, true)
    );
    let back: OptimizerPlan =
        serde_json::from_str(&serde_json::to_string(&adamw).unwrap()).unwrap();
    assert_eq!(back, adamw);
    let lamb: OptimizerPlan = serde_json::from_str(r#"{"kind": "lamb"}"#).unwrap();
    assert_eq!((lamb.eps, lamb.max_grad_norm), (1e-6, Some(1.0)));
    let err = serde_json::from_str::<OptimizerPlan>(r#"{"kind": "adamw", "momentum": 0.9}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adamw optimizer: unknown field `momentum`, expected one of `lr`, `betas`"),
        "{err}"
    );
    let err = serde_json::from_str::<OptimizerPlan>(r#"{"kind": "adam"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown optimizer `adam`; valid: sgd, adamw, lamb"),
        "{err}"
    );
}
