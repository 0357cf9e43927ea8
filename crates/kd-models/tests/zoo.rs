//! The zoo against PyTorch's: names, state_dict keys and shapes, parameter
//! counts, tap shapes (tests/golden/fixtures/model_zoo.json), plus user
//! errors and BatchNorm modes.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{fixture, is_ignored, read, zoo_table};
use kd_models::{ModelError, ResNetConfig, VggConfig, WrnConfig, build, names};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn names_are_sorted_and_cover_the_pytorch_zoo() {
    let names = names();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let zoo: BTreeSet<String> = zoo_table().keys().cloned().collect();
    let ours: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    assert_eq!(ours, zoo);
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
    assert!(
        !msg.contains("ShuffleV1") && !msg.contains("mobile_half"),
        "{msg}"
    );
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
    let err = build("resnet8", &p, 0).err().expect("zero classes");
    assert!(err.to_string().contains("num_classes"), "{err}");
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
    for name in ["resnet8", "wrn_16_1", "vgg8"] {
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
