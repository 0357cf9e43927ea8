//! kd's optimiser against torch.optim.SGD: the trajectories of
//! `tests/golden/sgd.py` (PyTorch's for-loop and multi-tensor SGD, which
//! agree bit for bit on the CPU) are reproduced bit for bit.

use std::path::Path;

use kd_engine::{Optimizer, Sgd};
use tch::{Kind, Tensor};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    lr: Vec<f64>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

#[test]
fn trajectories_equal_pytorch_sgd_bit_for_bit() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/optim/sgd.safetensors");
    let file = kd_engine::tensors::read(&path).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&file.metadata["cases"]).unwrap();
    let n = file.with_prefix("init/").count();
    assert!(n > 0 && cases.len() >= 4);
    for case in &cases {
        let params: Vec<Tensor> = (0..n)
            .map(|i| {
                file.get(&format!("init/{i}"))
                    .unwrap()
                    .copy()
                    .set_requires_grad(true)
            })
            .collect();
        let cfg = Sgd {
            lr: case.lr[0],
            momentum: case.momentum,
            nesterov: case.nesterov,
            weight_decay: case.weight_decay,
            ..Default::default()
        };
        let named = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect();
        let mut opt = Optimizer::new(cfg, named);
        for (k, lr) in case.lr.iter().enumerate() {
            opt.zero_grad().unwrap();
            // d/dp sum(p * g) = g exactly: the fixture's gradient.
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, p)| (p * file.get(&format!("grad/{k}/{i}")).unwrap()).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
            opt.step(*lr).unwrap();
            for (i, p) in params.iter().enumerate() {
                let want = file.get(&format!("expect/{}/{k}/{i}", case.name)).unwrap();
                let diff = (p.detach() - want).abs().max().double_value(&[]);
                assert_eq!(
                    diff, 0.0,
                    "{}: step {k}, parameter {i} differs by {diff:e}",
                    case.name
                );
            }
        }
    }
}
