//! Forward passes against PyTorch (tests/golden/models.py): same weights,
//! same input, every tap in eval mode, logits and BN running statistics
//! after one train-mode pass. The ImageNet nets are checked at reduced width
//! on 64x64 inputs (`tv_resnet*_slim`, `MobileNetV1_slim`), their weights
//! saved under torchvision's and mdistiller's `state_dict` keys.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{assert_close, fixture, metadata, read};
use kd_models::{
    MobileNetV1Config, Network, ResNetV2Config, ShuffleV2Config, TvBlock, TvResNetConfig,
    VggConfig, build, load_weights,
};
use tch::nn::VarStore;
use tch::{Device, Tensor};

fn build_arch(
    name: &str,
    arch: &serde_json::Value,
    vs: &VarStore,
    classes: i64,
) -> Box<dyn Network> {
    if kd_models::names().contains(&name) {
        return build(name, &vs.root(), classes).unwrap();
    }
    let field = |key: &str| arch[key].clone();
    if arch["family"] == "resnetv2" {
        let net = ResNetV2Config::new(serde_json::from_value(field("blocks")).unwrap())
            .with_stem(serde_json::from_value(field("stem")).unwrap())
            .with_planes(serde_json::from_value(field("planes")).unwrap())
            .with_num_classes(classes)
            .init(&vs.root());
        return Box::new(net.unwrap());
    }
    if arch["family"] == "shufflev2" {
        let net = ShuffleV2Config::new()
            .with_out_channels(serde_json::from_value(field("out_channels")).unwrap())
            .with_num_blocks(serde_json::from_value(field("num_blocks")).unwrap())
            .with_num_classes(classes)
            .init(&vs.root());
        return Box::new(net.unwrap());
    }
    if arch["family"] == "tvresnet" {
        let block = match arch["block"].as_str() {
            Some("basic") => TvBlock::Basic,
            Some("bottleneck") => TvBlock::Bottleneck,
            other => panic!("{name}: unknown block {other:?}"),
        };
        let net = TvResNetConfig::new(block, serde_json::from_value(field("blocks")).unwrap())
            .with_stem(serde_json::from_value(field("stem")).unwrap())
            .with_planes(serde_json::from_value(field("planes")).unwrap())
            .with_num_classes(classes)
            .init(&vs.root());
        return Box::new(net.unwrap());
    }
    if arch["family"] == "mobilenetv1" {
        let net = MobileNetV1Config::new()
            .with_width_mult(arch["width"].as_f64().unwrap())
            .with_num_classes(classes)
            .init(&vs.root());
        return Box::new(net.unwrap());
    }
    assert_eq!(
        arch["family"], "vgg",
        "{name}: only slim VGGs, ResNetV2s, ShuffleNetV2s and ImageNet nets are built from a config"
    );
    let cfg: Vec<Vec<i64>> = serde_json::from_value(field("cfg")).unwrap();
    let net = VggConfig::new(8)
        .unwrap()
        .with_cfg(cfg)
        .with_num_classes(classes)
        .init(&vs.root());
    Box::new(net.unwrap())
}

fn check(name: &str) {
    let io_path = fixture(&format!("model_{name}_io.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(&metadata(&io_path)["fixture"]).unwrap();
    assert_eq!(meta["model"], name);
    let arch = &meta["arch"];
    let classes = meta["num_classes"].as_i64().unwrap();
    let stride = meta["tap_stride"].as_i64().unwrap();
    let shapes: BTreeMap<String, Vec<i64>> =
        serde_json::from_value(meta["tap_shapes"].clone()).unwrap();
    let io = read(&io_path);

    let mut vs = VarStore::new(Device::Cpu);
    let net = build_arch(name, arch, &vs, classes);
    load_weights(&mut vs, &fixture(&format!("model_{name}.safetensors"))).unwrap();

    let taps = tch::no_grad(|| net.forward_taps(&io["input"], false));
    let named = taps.named();
    let got: BTreeSet<String> = named.iter().map(|(t, _)| t.to_string()).collect();
    let want: BTreeSet<String> = shapes.keys().cloned().collect();
    assert_eq!(got, want, "{name}: tap names");
    for (tap, t) in named {
        let key = tap.to_string();
        assert_eq!(t.size(), shapes[&key], "{name} {key}: shape");
        let sampled: Tensor = if t.dim() > 2 {
            t.flatten(1, -1).slice(1, 0, None, stride)
        } else {
            t.shallow_clone()
        };
        assert_close(&format!("{name} {key}"), &sampled, &io[&key]);
    }

    let logits = tch::no_grad(|| net.forward_taps(&io["input"], true)).logits;
    assert_close(
        &format!("{name} train/logits"),
        &logits,
        &io["train/logits"],
    );
    let mut stats = 0;
    for (key, var) in vs.variables() {
        if key.ends_with("running_mean") || key.ends_with("running_var") {
            assert_close(
                &format!("{name} train/{key}"),
                &var,
                &io[&format!("train/{key}")],
            );
            stats += 1;
        }
    }
    let expected_stats = io
        .keys()
        .filter(|k| k.starts_with("train/") && *k != "train/logits")
        .count();
    assert_eq!(stats, expected_stats, "{name}: running statistics compared");
}

#[test]
fn resnet20_matches_pytorch() {
    check("resnet20");
}

#[test]
fn resnet8x4_matches_pytorch() {
    check("resnet8x4");
}

#[test]
fn wrn_16_2_matches_pytorch() {
    check("wrn_16_2");
}

#[test]
fn vgg_matches_pytorch() {
    check("vgg_slim");
}

#[test]
fn mobile_half_matches_pytorch() {
    check("mobile_half");
}

#[test]
fn shufflev1_matches_pytorch() {
    check("ShuffleV1");
}

#[test]
fn shufflev2_matches_pytorch() {
    check("shufflev2_slim");
}

#[test]
fn resnet50_matches_pytorch() {
    check("resnet50_slim");
}

#[test]
fn tv_resnet18_matches_pytorch() {
    check("tv_resnet18_slim");
}

#[test]
fn tv_resnet34_matches_pytorch() {
    check("tv_resnet34_slim");
}

#[test]
fn tv_resnet50_matches_pytorch() {
    check("tv_resnet50_slim");
}

#[test]
fn mobilenetv1_matches_pytorch() {
    check("MobileNetV1_slim");
}
