//! Fresh weights follow RepDistiller's initialisation (torchvision's and
//! mdistiller's for the ImageNet nets), checked against the PyTorch formulas:
//! convs N(0, sqrt(2 / (out*k*k))) (PyTorch's default U(-1/sqrt(fan_in),
//! 1/sqrt(fan_in)) for the ShuffleNets and MobileNetV1, which keep it), BN
//! weight 1 bias 0, running stats 0/1, classifiers per family (nn.Linear
//! default for ResNet, ResNet50, the ShuffleNets, torchvision's ResNets and
//! MobileNetV1, zero bias for WRN, N(0, 0.01) with zero bias for VGG and
//! MobileNetV2).

use std::collections::HashMap;

use kd_models::build;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn stats(t: &Tensor) -> (f64, f64, f64) {
    let mean = f64::try_from(t.mean(Kind::Double)).unwrap();
    let std = f64::try_from(t.to_kind(Kind::Double).std(false)).unwrap();
    let max = f64::try_from(t.abs().max()).unwrap();
    (mean, std, max)
}

fn all_equal(t: &Tensor, v: f64) -> bool {
    bool::try_from(t.eq(v).all()).unwrap()
}

enum Conv {
    HeFanOut,
    TorchDefault,
}

enum Classifier {
    TorchDefault,
    ZeroBias,
    Normal001,
}

fn check(name: &str, conv: Conv, head: &str, classifier: Classifier) {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    build(name, &vs.root(), 100).unwrap();
    let vars: HashMap<String, Tensor> = vs.variables();
    let mut convs = 0;
    for (key, t) in &vars {
        let (module, leaf) = key.rsplit_once('.').unwrap();
        let is_bn = vars.contains_key(&format!("{module}.running_mean"));
        let what = format!("{name} {key}");
        match leaf {
            "running_mean" => assert!(all_equal(t, 0.), "{what}"),
            "running_var" => assert!(all_equal(t, 1.), "{what}"),
            "weight" if is_bn => assert!(all_equal(t, 1.), "{what}"),
            "bias" if is_bn => assert!(all_equal(t, 0.), "{what}"),
            "weight" if t.dim() == 4 => {
                let s = t.size();
                let (mean, std, max) = stats(t);
                let expected = match conv {
                    Conv::HeFanOut => (2.0 / (s[0] * s[2] * s[3]) as f64).sqrt(),
                    Conv::TorchDefault => {
                        // fan_in counts the inputs of one group: dim 1.
                        let bound = 1.0 / ((s[1] * s[2] * s[3]) as f64).sqrt();
                        assert!(max <= bound, "{what}: |w| {max} > {bound}");
                        bound / 3f64.sqrt()
                    }
                };
                if t.numel() >= 1000 {
                    assert!(
                        (std / expected - 1.).abs() < 0.1,
                        "{what}: std {std} vs {expected}"
                    );
                    assert!(mean.abs() < 0.1 * expected, "{what}: mean {mean}");
                }
                convs += 1;
            }
            "bias" if module != head => assert!(all_equal(t, 0.), "{what}: conv bias"),
            _ => {}
        }
    }
    assert!(convs > 0, "{name}: no convs seen");

    let w = &vars[&format!("{head}.weight")];
    let b = &vars[&format!("{head}.bias")];
    let bound = 1.0 / (w.size()[1] as f64).sqrt();
    let (_, w_std, w_max) = stats(w);
    let (_, _, b_max) = stats(b);
    match classifier {
        Classifier::TorchDefault | Classifier::ZeroBias => {
            assert!(w_max <= bound, "{name}: |w| {w_max} > {bound}");
            let expected = bound / 3f64.sqrt();
            assert!(
                (w_std / expected - 1.).abs() < 0.1,
                "{name}: fc std {w_std} vs {expected}"
            );
        }
        Classifier::Normal001 => {
            assert!(
                (w_std / 0.01 - 1.).abs() < 0.1,
                "{name}: classifier std {w_std}"
            );
        }
    }
    match classifier {
        Classifier::TorchDefault => {
            assert!(
                b_max <= bound && b_max > 0.5 * bound,
                "{name}: fc bias max {b_max}, bound {bound}"
            )
        }
        Classifier::ZeroBias | Classifier::Normal001 => assert!(all_equal(b, 0.), "{name}: bias"),
    }
}

#[test]
fn resnet_init() {
    check("resnet56", Conv::HeFanOut, "fc", Classifier::TorchDefault);
}

#[test]
fn wrn_init() {
    check("wrn_40_2", Conv::HeFanOut, "fc", Classifier::ZeroBias);
}

#[test]
fn vgg_init() {
    check("vgg8", Conv::HeFanOut, "classifier", Classifier::Normal001);
}

#[test]
fn resnet50_init() {
    check(
        "ResNet50",
        Conv::HeFanOut,
        "linear",
        Classifier::TorchDefault,
    );
}

#[test]
fn mobilenetv2_init() {
    check(
        "mobile_half",
        Conv::HeFanOut,
        "classifier.0",
        Classifier::Normal001,
    );
}

#[test]
fn shufflenet_init() {
    check(
        "ShuffleV1",
        Conv::TorchDefault,
        "linear",
        Classifier::TorchDefault,
    );
    check(
        "ShuffleV2",
        Conv::TorchDefault,
        "linear",
        Classifier::TorchDefault,
    );
}

#[test]
fn torchvision_resnet_init() {
    check("resnet18", Conv::HeFanOut, "fc", Classifier::TorchDefault);
    check("resnet50", Conv::HeFanOut, "fc", Classifier::TorchDefault);
}

#[test]
fn mobilenetv1_init() {
    check(
        "MobileNetV1",
        Conv::TorchDefault,
        "fc",
        Classifier::TorchDefault,
    );
}
