//! Folding BatchNorm into the convolutions it reads: a frozen network's
//! eval-mode outputs stay those of the unfolded one, gradients still reach
//! the input, and unfolding returns to the parameters.

use tch::{Device, Kind, Tensor, nn};

/// A network whose BatchNorms are far from identity: random affine
/// parameters and running statistics gathered from a few train-mode passes.
fn calibrated(name: &str) -> (nn::VarStore, Box<dyn kd_models::Network>) {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = kd_models::build(name, &vs.root(), 10).unwrap();
    // In name order: the draws must not depend on a hash map's order.
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (n, mut v) in vars {
            // BNs: `bn*`, VGG's `block*` and MobileNetV1's `model.*` vectors.
            if n.contains("bn")
                || (n.starts_with("block") || n.starts_with("model.")) && v.dim() == 1
            {
                let _ = v.uniform_(0.5, 1.5);
            }
        }
        for _ in 0..3 {
            let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 + 0.3;
            let _ = net.forward_taps(&x, true);
        }
    });
    (vs, net)
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn folded_eval_outputs_equal_unfolded_ones() {
    for name in [
        "resnet8x4",
        "resnet20",
        "wrn_16_2",
        "vgg8",
        "ResNet50",
        "resnet18",
        "resnet50",
        "MobileNetV1",
    ] {
        let (_vs, mut net) = calibrated(name);
        let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let plain = tch::no_grad(|| net.forward_taps(&x, false));
        net.fold_batchnorm(true);
        let folded = tch::no_grad(|| net.forward_taps(&x, false));
        for ((tap, a), (_, b)) in folded.named().into_iter().zip(plain.named()) {
            let r = rel(a, b);
            assert!(r < 1e-5, "{name} {tap}: folded differs by {r:e} (relative)");
        }
        // A train-mode pass ignores the folded kernels and updates statistics.
        let train = net.forward_taps(&x, true).logits;
        // The folded kernels were computed once: the statistics the train
        // pass changed reach eval mode only after unfolding. (WRN's
        // pre-activation `bn1`s read no convolution and stay unfolded.)
        if !name.starts_with("wrn") {
            let still = tch::no_grad(|| net.forward_taps(&x, false));
            let r = rel(&still.logits, &folded.logits);
            assert_eq!(r, 0.0, "{name}: eval mode did not use the folded kernels");
        }
        net.fold_batchnorm(false);
        let again = tch::no_grad(|| net.forward_taps(&x, false));
        assert!(
            rel(&again.logits, &plain.logits) > 0.0,
            "{name}: train pass updated no statistics"
        );
        assert!(train.requires_grad());
    }
}

#[test]
fn folded_network_passes_gradients_to_its_input() {
    let (_vs, mut net) = calibrated("resnet8");
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let plain = Tensor::run_backward(
        &[net.forward_taps(&x, false).logits.sum(Kind::Float)],
        &[&x],
        false,
        false,
    )
    .remove(0);
    net.fold_batchnorm(true);
    let folded = Tensor::run_backward(
        &[net.forward_taps(&x, false).logits.sum(Kind::Float)],
        &[&x],
        false,
        false,
    )
    .remove(0);
    assert!(
        rel(&folded, &plain) < 1e-5,
        "input gradients differ by {:e}",
        rel(&folded, &plain)
    );
}
