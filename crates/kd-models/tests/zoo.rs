//! The zoo against PyTorch's: names, state_dict keys and shapes, parameter
//! counts, tap shapes (tests/golden/fixtures/model_zoo.json), plus user
//! errors and BatchNorm modes.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{fixture, is_ignored, read, zoo_table};
use kd_models::{
    MobileNetV1Config, MobileNetV2Config, ModelError, ResNetConfig, ResNetV2Config,
    ShuffleV1Config, ShuffleV2Config, TvBlock, TvResNetConfig, VggConfig, WrnConfig, build,
    is_classifier_bias, is_transformer, load_weights, names,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn names_are_sorted_and_cover_the_pytorch_zoo() {
    let names = names();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let zoo: BTreeSet<String> = zoo_table().keys().cloned().collect();
    // The transformers are timm's, checked against timm in tests/vit.rs.
    let ours: BTreeSet<String> = names
        .iter()
        .filter(|n| !is_transformer(n))
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ours, zoo);
    assert_eq!(names.iter().filter(|n| is_transformer(n)).count(), 12);
}

#[test]
fn resnet20_parameter_names_equal_pytorch() {
    let vs = VarStore::new(Device::Cpu);
    build("resnet20", &vs.root(), 10).unwrap();
    let ours: BTreeSet<String> = vs.variables().into_keys().collect();
    let torch: BTreeSet<String> = read(&fixture("model_resnet20.safetensors"))
        .into_keys()
        .filter(|k| !is_ignored(k))
        .collect();
    assert_eq!(ours, torch);
}

#[test]
fn every_model_matches_pytorch_state_params_and_tap_shapes() {
    tch::manual_seed(0);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    for (name, entry) in zoo_table() {
        let vs = VarStore::new(Device::Cpu);
        let net = build(&name, &vs.root(), 100).unwrap();

        let ours: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect();
        let torch: BTreeMap<String, Vec<i64>> = entry["state"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| serde_json::from_value::<(String, Vec<i64>)>(kv.clone()).unwrap())
            .filter(|(k, _)| !is_ignored(k))
            .collect();
        assert_eq!(ours, torch, "{name}: state_dict keys and shapes");

        let params: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum::<usize>() as i64;
        assert_eq!(
            params,
            entry["params"].as_i64().unwrap(),
            "{name}: trainable parameters"
        );

        let taps = tch::no_grad(|| net.forward_taps(&x, false));
        let ours: BTreeMap<String, Vec<i64>> = taps
            .named()
            .into_iter()
            .map(|(t, v)| (t.to_string(), v.size()[1..].to_vec()))
            .collect();
        let torch: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(entry["taps"].clone()).unwrap();
        assert_eq!(ours, torch, "{name}: tap shapes");
        assert_eq!(taps.feat.len(), taps.preact.len(), "{name}");
    }
}

#[test]
fn unknown_model_lists_valid_names() {
    let vs = VarStore::new(Device::Cpu);
    let err = build("resnet21", &vs.root(), 10)
        .err()
        .expect("resnet21 is not in the zoo");
    assert!(matches!(err, ModelError::UnknownModel { .. }));
    let msg = err.to_string();
    assert!(msg.contains("`resnet21`"), "{msg}");
    for name in names() {
        assert!(msg.contains(name), "{name} missing from: {msg}");
    }
}

#[test]
fn zoo_names_are_repdistillers_model_dict_keys() {
    let names = names();
    for name in [
        "ResNet50",
        "mobile_half",
        "mobile_full",
        "ShuffleV1",
        "ShuffleV2",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    // Case is part of the name, as in RepDistiller's model_dict.
    let vs = VarStore::new(Device::Cpu);
    assert!(build("shufflev1", &vs.root(), 10).is_err());
    // The ImageNet nets: torchvision's names and mdistiller's MobileNetV1.
    for name in ["resnet18", "resnet34", "resnet50", "MobileNetV1"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(build("mobilenetv1", &vs.root(), 10).is_err());
}

/// `resnet50` is torchvision's ImageNet net, `ResNet50` RepDistiller's CIFAR
/// one: a 7x7 stem and `fc` against a 3x3 stem and `linear`.
#[test]
fn torchvision_resnet50_is_not_repdistillers_resnet50() {
    let shapes = |name: &str| -> BTreeMap<String, Vec<i64>> {
        let vs = VarStore::new(Device::Cpu);
        build(name, &vs.root(), 10).unwrap();
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect()
    };
    let tv = shapes("resnet50");
    let rd = shapes("ResNet50");
    assert_eq!(tv["conv1.weight"], [64, 3, 7, 7]);
    assert_eq!(rd["conv1.weight"], [64, 3, 3, 3]);
    assert_eq!(tv["fc.weight"], [10, 2048]);
    assert_eq!(rd["linear.weight"], [10, 2048]);
    assert!(tv.contains_key("layer1.0.downsample.0.weight"));
    assert!(rd.contains_key("layer1.0.shortcut.0.weight"));
}

/// Trainable parameters at ImageNet's 1000 classes: torchvision's own counts
/// for the ResNets (resnet18 11,689,512), mdistiller's net for MobileNetV1,
/// as tests/golden/models.py computed them.
#[test]
fn imagenet_nets_have_the_reference_parameter_counts() {
    let mut seen = 0;
    for (name, entry) in zoo_table() {
        let Some(want) = entry.get("imagenet_params") else {
            continue;
        };
        let vs = VarStore::new(Device::Cpu);
        build(&name, &vs.root(), 1000).unwrap();
        let params: usize = vs.trainable_variables().iter().map(Tensor::numel).sum();
        assert_eq!(params as i64, want.as_i64().unwrap(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 4, "resnet18, resnet34, resnet50 and MobileNetV1");
}

/// A state_dict with torchvision's keys (mdistiller's for MobileNetV1;
/// `num_batches_tracked` included, as `torch.save` has it), listed by
/// tests/golden/models.py, loads into the zoo net of the same name.
#[test]
fn imagenet_state_dicts_load_under_their_reference_keys() {
    let table = zoo_table();
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(5);
    for name in ["resnet18", "resnet50", "MobileNetV1"] {
        let state: Vec<(String, Vec<i64>)> =
            serde_json::from_value(table[name]["state"].clone()).unwrap();
        let tensors: Vec<(String, Tensor)> = state
            .into_iter()
            .map(|(k, shape)| {
                let t = if is_ignored(&k) {
                    Tensor::from(7i64).reshape(shape.as_slice())
                } else {
                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu))
                };
                (k, t)
            })
            .collect();
        let path = dir.path().join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&tensors, &path).unwrap();
        let mut vs = VarStore::new(Device::Cpu);
        build(name, &vs.root(), 100).unwrap();
        load_weights(&mut vs, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let vars = vs.variables();
        for (k, t) in &tensors {
            if !is_ignored(k) {
                assert!(vars[k].equal(t), "{name} {k}: not loaded");
            }
        }
    }
}

/// Adaptive pooling: the ImageNet nets run on their 224x224 inputs and on
/// any other of at least 32 pixels.
#[test]
fn imagenet_nets_take_inputs_of_any_size() {
    tch::manual_seed(6);
    let cases: [(&str, [i64; 2], [i64; 3]); 4] = [
        ("resnet18", [224, 224], [512, 7, 7]),
        ("MobileNetV1", [224, 224], [1024, 7, 7]),
        ("resnet50", [45, 37], [2048, 2, 2]),
        ("MobileNetV1", [32, 64], [1024, 1, 2]),
    ];
    for (name, [h, w], last) in cases {
        let vs = VarStore::new(Device::Cpu);
        let net = build(name, &vs.root(), 10).unwrap();
        let x = Tensor::randn([1, 3, h, w], (Kind::Float, Device::Cpu));
        let taps = tch::no_grad(|| net.forward_taps(&x, false));
        assert_eq!(taps.feat[4].size()[1..], last, "{name} at {h}x{w}");
        assert_eq!(
            taps.feat[0].size()[2..],
            [(h + 1) / 2, (w + 1) / 2],
            "{name}"
        );
        assert_eq!(taps.logits.size(), [1, 10], "{name}");
    }
}

#[test]
fn classifier_biases_of_every_family_are_recognised() {
    for key in [
        "fc.bias",
        "classifier.bias",
        "classifier.0.bias",
        "linear.bias",
        "module.linear.bias",
        "student.weights/classifier.0.bias",
    ] {
        assert!(is_classifier_bias(key), "{key}");
    }
    for key in [
        "fc.weight",
        "bn1.bias",
        "layer1.0.bn3.bias",
        "block0.0.bias",
        "nonlinear.bias",
    ] {
        assert!(!is_classifier_bias(key), "{key}");
    }
    for name in names() {
        let vs = VarStore::new(Device::Cpu);
        build(name, &vs.root(), 7).unwrap();
        let biases: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .filter(|(k, _)| is_classifier_bias(k))
            .map(|(k, v)| (k, v.size()))
            .collect();
        // A distilled DeiT has two heads, `head` and `head_dist`.
        let heads = if name.contains("distilled") { 2 } else { 1 };
        assert_eq!(biases.len(), heads, "{name}: {biases:?}");
        assert!(biases.iter().all(|(_, s)| s == &[7]), "{name}: {biases:?}");
        // `reset_classifier` finds the same layers by their exact names.
        assert!(
            biases
                .iter()
                .all(|(k, _)| kd_models::is_model_classifier_bias(k)),
            "{name}: {biases:?}"
        );
    }
}

/// Per-sample tap shapes on a 32x32 input, written out by hand from the
/// architectures (the zoo table checks them against PyTorch as well).
#[test]
fn new_families_have_the_tap_shapes_of_their_stages() {
    let cases: [(&str, &[&[i64]], i64); 7] = [
        (
            "mobile_half",
            &[
                &[16, 16, 16],
                &[12, 16, 16],
                &[16, 8, 8],
                &[48, 4, 4],
                &[160, 2, 2],
            ],
            1280,
        ),
        (
            "ShuffleV1",
            &[&[24, 32, 32], &[240, 16, 16], &[480, 8, 8], &[960, 4, 4]],
            960,
        ),
        (
            "ShuffleV2",
            &[&[24, 32, 32], &[116, 16, 16], &[232, 8, 8], &[464, 4, 4]],
            1024,
        ),
        (
            "ResNet50",
            &[
                &[64, 32, 32],
                &[256, 32, 32],
                &[512, 16, 16],
                &[1024, 8, 8],
                &[2048, 4, 4],
            ],
            2048,
        ),
        (
            "resnet18",
            &[
                &[64, 16, 16],
                &[64, 8, 8],
                &[128, 4, 4],
                &[256, 2, 2],
                &[512, 1, 1],
            ],
            512,
        ),
        (
            "resnet50",
            &[
                &[64, 16, 16],
                &[256, 8, 8],
                &[512, 4, 4],
                &[1024, 2, 2],
                &[2048, 1, 1],
            ],
            2048,
        ),
        (
            "MobileNetV1",
            &[
                &[32, 16, 16],
                &[128, 8, 8],
                &[256, 4, 4],
                &[512, 2, 2],
                &[1024, 1, 1],
            ],
            1024,
        ),
    ];
    tch::manual_seed(3);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    for (name, stages, embed) in cases {
        let vs = VarStore::new(Device::Cpu);
        let net = build(name, &vs.root(), 10).unwrap();
        let taps = tch::no_grad(|| net.forward_taps(&x, false));
        let shapes = |ts: &[Tensor]| -> Vec<Vec<i64>> { ts.iter().map(|t| t.size()).collect() };
        let want: Vec<Vec<i64>> = stages.iter().map(|s| [&[2i64][..], *s].concat()).collect();
        assert_eq!(shapes(&taps.feat), want, "{name}: feat");
        assert_eq!(shapes(&taps.preact), want, "{name}: preact");
        assert_eq!(taps.embed.size(), [2, embed], "{name}: embed");
        assert_eq!(taps.logits.size(), [2, 10], "{name}: logits");
    }
}

#[test]
fn invalid_configurations_are_errors() {
    let vs = VarStore::new(Device::Cpu);
    let p = vs.root();
    assert!(ResNetConfig::new(21).init(&p).is_err());
    assert!(ResNetConfig::new(2).init(&p).is_err());
    assert!(
        ResNetConfig::new(8)
            .with_filters([16, 0, 32, 64])
            .init(&p)
            .is_err()
    );
    assert!(WrnConfig::new(15, 1).init(&p).is_err());
    assert!(WrnConfig::new(16, 0).init(&p).is_err());
    assert!(VggConfig::new(10).is_err());
    assert!(
        VggConfig::new(8)
            .unwrap()
            .with_cfg(vec![vec![8]; 4])
            .init(&p)
            .is_err()
    );
    assert!(ResNetV2Config::new([3, 0, 6, 3]).init(&p).is_err());
    assert!(
        ResNetV2Config::new([1; 4])
            .with_planes([8, 0, 8, 8])
            .init(&p)
            .is_err()
    );
    assert!(MobileNetV2Config::new(0, 0.5).init(&p).is_err());
    assert!(MobileNetV2Config::new(6, 0.05).init(&p).is_err());
    assert!(MobileNetV2Config::new(6, f64::NAN).init(&p).is_err());
    assert!(ShuffleV1Config::new().with_groups(0).init(&p).is_err());
    assert!(
        ShuffleV1Config::new()
            .with_num_blocks([4, 0, 4])
            .init(&p)
            .is_err()
    );
    // 480 - 240 = 240 channels for layer2.0, but 244 / 4 = 61 is not a
    // multiple of 3 groups.
    let err = ShuffleV1Config::new()
        .with_out_planes([240, 484, 960])
        .init(&p)
        .expect_err("groups do not divide");
    assert!(err.to_string().contains("layer2.0"), "{err}");
    assert!(
        ShuffleV1Config::new()
            .with_out_planes([24, 480, 960])
            .init(&p)
            .is_err()
    );
    assert!(
        ShuffleV2Config::new()
            .with_out_channels([116, 233, 464, 1024])
            .init(&p)
            .is_err()
    );
    assert!(
        ShuffleV2Config::new()
            .with_num_blocks([3, 0, 3])
            .init(&p)
            .is_err()
    );
    assert!(ShuffleV2Config::net_size(0.7).is_err());
    assert_eq!(
        ShuffleV2Config::net_size(1.0).unwrap(),
        ShuffleV2Config::new()
    );
    let err = build("resnet8", &p, 0).err().expect("zero classes");
    assert!(err.to_string().contains("num_classes"), "{err}");
    let err = build("ShuffleV2", &p, 0).err().expect("zero classes");
    assert!(err.to_string().contains("num_classes"), "{err}");
    assert!(
        TvResNetConfig::new(TvBlock::Basic, [2, 0, 2, 2])
            .init(&p)
            .is_err()
    );
    assert!(TvResNetConfig::resnet50().with_stem(0).init(&p).is_err());
    assert!(
        TvResNetConfig::resnet18()
            .with_planes([64, 128, 0, 512])
            .init(&p)
            .is_err()
    );
    assert_eq!(
        TvResNetConfig::resnet34(),
        TvResNetConfig::new(TvBlock::Basic, [3, 4, 6, 3])
    );
    assert!(
        MobileNetV1Config::new()
            .with_width_mult(0.01)
            .init(&p)
            .is_err()
    );
    assert!(
        MobileNetV1Config::new()
            .with_width_mult(f64::INFINITY)
            .init(&p)
            .is_err()
    );
    for name in ["resnet18", "MobileNetV1"] {
        let err = build(name, &p, 0).err().expect("zero classes");
        assert!(err.to_string().contains("num_classes"), "{err}");
    }
}

#[test]
fn train_forward_updates_running_stats_and_eval_does_not() {
    tch::manual_seed(1);
    let vs = VarStore::new(Device::Cpu);
    let net = build("resnet8", &vs.root(), 10).unwrap();
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 + 0.5;
    let snapshot = |key: &str| vs.variables()[key].copy();

    let mean = snapshot("layer3.0.bn2.running_mean");
    let var = snapshot("bn1.running_var");
    tch::no_grad(|| net.forward_taps(&x, false));
    assert!(
        mean.equal(&vs.variables()["layer3.0.bn2.running_mean"]),
        "eval changed stats"
    );

    tch::no_grad(|| net.forward_taps(&x, true));
    let new_mean = &vs.variables()["layer3.0.bn2.running_mean"];
    let new_var = &vs.variables()["bn1.running_var"];
    assert!(
        !mean.allclose(new_mean, 1e-6, 1e-6, false),
        "train left running_mean"
    );
    assert!(
        !var.allclose(new_var, 1e-6, 1e-6, false),
        "train left running_var"
    );
}

#[test]
fn gradients_reach_every_parameter_through_logits_and_taps() {
    tch::manual_seed(2);
    for name in [
        "resnet8",
        "wrn_16_1",
        "vgg8",
        "ResNet50",
        "mobile_half",
        "ShuffleV1",
        "ShuffleV2",
        "resnet18",
        "resnet50",
        "MobileNetV1",
    ] {
        let vs = VarStore::new(Device::Cpu);
        let net = build(name, &vs.root(), 10).unwrap();
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let taps = net.forward_taps(&x, true);
        let mut loss = taps.logits.sum(Kind::Float) + taps.embed.mean(Kind::Float);
        for t in taps.feat.iter().chain(&taps.preact) {
            loss += t.mean(Kind::Float);
        }
        loss.backward();
        for (key, v) in vs.variables() {
            if v.requires_grad() {
                assert!(v.grad().defined(), "{name} {key}: no gradient");
            }
        }
    }
}

/// One SGD step on a batch, as training takes it: train-mode forward, cross
/// entropy, backward, update. Every parameter moves and the loss on the same
/// batch goes down.
#[test]
fn new_models_train_one_step() {
    use tch::nn::OptimizerConfig;
    tch::manual_seed(4);
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 3, 7, 9]);
    for name in [
        "ResNet50",
        "mobile_half",
        "mobile_full",
        "ShuffleV1",
        "ShuffleV2",
        "resnet18",
        "MobileNetV1",
    ] {
        let vs = VarStore::new(Device::Cpu);
        let net = build(name, &vs.root(), 10).unwrap();
        let mut opt = tch::nn::Sgd {
            momentum: 0.9,
            dampening: 0.,
            wd: 5e-4,
            nesterov: false,
        }
        .build(&vs, 0.01)
        .unwrap();
        let before: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(k, v)| (k, v.copy()))
            .collect();
        let loss = |net: &dyn kd_models::Network| {
            net.forward_taps(&x, true)
                .logits
                .cross_entropy_for_logits(&y)
        };
        let l0 = loss(net.as_ref());
        opt.backward_step(&l0);
        let l1 = tch::no_grad(|| loss(net.as_ref()));
        let (l0, l1) = (l0.double_value(&[]), l1.double_value(&[]));
        assert!(l1.is_finite() && l1 < l0, "{name}: loss {l0} -> {l1}");
        let after = vs.variables();
        for (key, old) in before {
            assert!(!after[&key].equal(&old), "{name} {key}: not updated");
        }
    }
}
