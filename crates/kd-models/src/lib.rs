//! The CIFAR model zoo of RepDistiller (`models/resnet.py`, `resnetv2.py`,
//! `wrn.py`, `vgg.py`, `mobilenetv2.py`, `ShuffleNetv1.py`, `ShuffleNetv2.py`)
//! and the ImageNet nets of mdistiller's zoo (torchvision's `resnet18`,
//! `resnet34`, `resnet50`; `MobileNetV1`), with the feature taps
//! distillation methods read.
//!
//! Architectures and parameter names follow RepDistiller (torchvision and
//! mdistiller for the ImageNet nets) exactly, so a PyTorch `state_dict`
//! saved as safetensors, or with `torch.save`, loads with [`load_weights`] as
//! it is. Models are built under a [`tch::nn::Path`]; `build("resnet20",
//! &vs.root(), 100)` gives the names `conv1.weight`,
//! `layer1.0.bn1.running_mean`, `fc.bias`, ...
//!
//! Taps ([`kd_core::Taps`]): `feat/0` is the stem, `feat/k` stage `k`,
//! `preact/k` the same point before its last ReLU, `embed` the pooled vector,
//! `logits` the classifier output. What each means per family is documented
//! on [`ResNet`], [`ResNetV2`], [`WideResNet`], [`Vgg`], [`MobileNetV2`],
//! [`ShuffleNetV1`], [`ShuffleNetV2`], [`TvResNet`] and [`MobileNetV1`].
//! The ImageNet nets are meant for 224x224 inputs but pool adaptively, so
//! any input of at least 32 pixels runs.
//!
//! Zoo names are RepDistiller's `model_dict` keys, case included: `resnet8`
//! ... `resnet110`, `resnet8x4`, `resnet32x4`, `ResNet50`, `wrn_16_1` ...
//! `wrn_40_2`, `vgg8` ... `vgg19`, `mobile_half`, `mobile_full`, `ShuffleV1`,
//! `ShuffleV2`; then torchvision's `resnet18`, `resnet34`, `resnet50` and
//! mdistiller's `MobileNetV1` (see [`names`]). Case matters: `resnet50` is
//! torchvision's ImageNet ResNet-50 (7x7 stem, max pool, `fc`), `ResNet50`
//! RepDistiller's CIFAR Bottleneck net (3x3 stem, no pool, `linear`).

pub mod droppath;
mod layers;
pub mod mobilenetv1;
pub mod mobilenetv2;
pub mod resnet;
pub mod resnetv2;
pub mod shufflenetv1;
pub mod shufflenetv2;
pub mod swin;
mod timm_filter;
pub mod torchscript;
pub mod tvresnet;
pub mod vgg;
pub mod vit;
mod weights;
pub mod wrn;

use std::path::PathBuf;

use kd_core::Taps;
use tch::{Tensor, nn};

pub use layers::{BatchNormArgs, TrainBatchNorm, with_train_batch_norm};
pub use mobilenetv1::{MobileNetV1, MobileNetV1Config};
pub use mobilenetv2::{MobileNetV2, MobileNetV2Config};
pub use resnet::{ResNet, ResNetConfig};
pub use resnetv2::{ResNetV2, ResNetV2Config};
pub use shufflenetv1::{ShuffleNetV1, ShuffleV1Config};
pub use shufflenetv2::{ShuffleNetV2, ShuffleV2Config};
pub use swin::{SwinConfig, SwinTransformer};
pub use tvresnet::{TvBlock, TvResNet, TvResNetConfig};
pub use vgg::{Vgg, VggConfig};
pub use vit::{VisionTransformer, VitConfig};
pub use weights::{
    LoadOptions, check_safetensors, load_weights, load_weights_with, plain as plain_tch_error,
    save_pt, save_weights,
};
pub use wrn::{WideResNet, WrnConfig};

/// A network of the zoo.
pub trait Network: Send {
    /// Full forward pass exposing every tap; `train` selects BatchNorm batch
    /// statistics (and updates the running ones).
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps;

    /// While `on`, eval-mode forwards run each convolution and the
    /// BatchNorm reading it as one folded convolution (frozen weights only:
    /// the folded kernels are computed here, once); `false` returns to the
    /// parameters. Families without such pairs ignore it.
    fn fold_batchnorm(&mut self, _on: bool) {}

    /// The taps the coming forwards' readers will read (`None`, the
    /// default: any). A family may then skip work that only unlisted taps
    /// need and leave those taps undefined; `logits` and `embed` are always
    /// given.
    fn read_taps(&mut self, _taps: Option<&[kd_core::Tap]>) {}

    /// Whether it came from PyTorch (a Python module, a TorchScript file):
    /// its trained weights are also written as `torch.save` files.
    fn is_from_pytorch(&self) -> bool {
        false
    }

    /// Whether the network takes inputs shaped like `probe` (`[B, 3, H, W]`):
    /// a transformer's position embedding fixes its image size.
    fn check_input(&self, _probe: &Tensor) -> Result<(), ModelError> {
        Ok(())
    }

    /// Whether the network can be trained (run once on `probe` before a
    /// stage trains it): networks of foreign origin can say why not.
    fn check_trainable(&self, _probe: &Tensor) -> Result<(), ModelError> {
        Ok(())
    }
}

#[derive(thiserror::Error, Debug)]
pub enum ModelError {
    #[error("unknown model `{name}`; valid models: {valid}")]
    UnknownModel { name: String, valid: String },
    #[error("invalid {family} configuration: {reason}")]
    InvalidConfig {
        family: &'static str,
        reason: String,
    },
    #[error("weights {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot write weights to {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("weights in {} do not fit the model: {report}", path.display())]
    Mismatch { path: PathBuf, report: String },
    #[error("cannot copy `{key}` from {} into the model: {reason}", path.display())]
    Copy {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A model name's keyword arguments (`NAME(key=value,...)`) are wrong.
    #[error("model arguments: {0}")]
    Args(String),
    /// The [`TrainBatchNorm`] hook of a training forward failed.
    #[error("training BatchNorm: {0}")]
    TrainBatchNorm(Box<dyn std::error::Error + Send + Sync>),
}

const RESNET: [i64; 4] = [16, 16, 32, 64];
const RESNET_X4: [i64; 4] = [32, 64, 128, 256];

#[derive(Debug, Clone, Copy)]
enum Arch {
    ResNet { depth: i64, filters: [i64; 4] },
    Wrn { depth: i64, widen: i64 },
    Vgg { depth: i64 },
    ResNetV2 { blocks: [i64; 4] },
    MobileNetV2 { expansion: i64, width_mult: f64 },
    ShuffleV1,
    ShuffleV2,
    TvResNet { block: TvBlock, blocks: [i64; 4] },
    MobileNetV1,
    Vit { size: Size, distilled: bool },
    Swin(Size),
}

/// A transformer family's width and depth, timm's `tiny`/`small`/`base`.
#[derive(Debug, Clone, Copy)]
enum Size {
    Tiny,
    Small,
    Base,
}

/// RepDistiller's `model_dict`, then mdistiller's ImageNet nets.
const ZOO: &[(&str, Arch)] = &[
    (
        "resnet8",
        Arch::ResNet {
            depth: 8,
            filters: RESNET,
        },
    ),
    (
        "resnet14",
        Arch::ResNet {
            depth: 14,
            filters: RESNET,
        },
    ),
    (
        "resnet20",
        Arch::ResNet {
            depth: 20,
            filters: RESNET,
        },
    ),
    (
        "resnet32",
        Arch::ResNet {
            depth: 32,
            filters: RESNET,
        },
    ),
    (
        "resnet44",
        Arch::ResNet {
            depth: 44,
            filters: RESNET,
        },
    ),
    (
        "resnet56",
        Arch::ResNet {
            depth: 56,
            filters: RESNET,
        },
    ),
    (
        "resnet110",
        Arch::ResNet {
            depth: 110,
            filters: RESNET,
        },
    ),
    (
        "resnet8x4",
        Arch::ResNet {
            depth: 8,
            filters: RESNET_X4,
        },
    ),
    (
        "resnet32x4",
        Arch::ResNet {
            depth: 32,
            filters: RESNET_X4,
        },
    ),
    (
        "wrn_16_1",
        Arch::Wrn {
            depth: 16,
            widen: 1,
        },
    ),
    (
        "wrn_16_2",
        Arch::Wrn {
            depth: 16,
            widen: 2,
        },
    ),
    (
        "wrn_40_1",
        Arch::Wrn {
            depth: 40,
            widen: 1,
        },
    ),
    (
        "wrn_40_2",
        Arch::Wrn {
            depth: 40,
            widen: 2,
        },
    ),
    ("vgg8", Arch::Vgg { depth: 8 }),
    ("vgg11", Arch::Vgg { depth: 11 }),
    ("vgg13", Arch::Vgg { depth: 13 }),
    ("vgg16", Arch::Vgg { depth: 16 }),
    ("vgg19", Arch::Vgg { depth: 19 }),
    (
        "ResNet50",
        Arch::ResNetV2 {
            blocks: [3, 4, 6, 3],
        },
    ),
    (
        "mobile_half",
        Arch::MobileNetV2 {
            expansion: 6,
            width_mult: 0.5,
        },
    ),
    (
        "mobile_full",
        Arch::MobileNetV2 {
            expansion: 6,
            width_mult: 1.0,
        },
    ),
    ("ShuffleV1", Arch::ShuffleV1),
    ("ShuffleV2", Arch::ShuffleV2),
    (
        "resnet18",
        Arch::TvResNet {
            block: TvBlock::Basic,
            blocks: [2, 2, 2, 2],
        },
    ),
    (
        "resnet34",
        Arch::TvResNet {
            block: TvBlock::Basic,
            blocks: [3, 4, 6, 3],
        },
    ),
    (
        "resnet50",
        Arch::TvResNet {
            block: TvBlock::Bottleneck,
            blocks: [3, 4, 6, 3],
        },
    ),
    ("MobileNetV1", Arch::MobileNetV1),
    ("vit_tiny_patch16_224", vit(Size::Tiny, false)),
    ("vit_small_patch16_224", vit(Size::Small, false)),
    ("vit_base_patch16_224", vit(Size::Base, false)),
    ("deit_tiny_patch16_224", vit(Size::Tiny, false)),
    ("deit_small_patch16_224", vit(Size::Small, false)),
    ("deit_base_patch16_224", vit(Size::Base, false)),
    ("deit_tiny_distilled_patch16_224", vit(Size::Tiny, true)),
    ("deit_small_distilled_patch16_224", vit(Size::Small, true)),
    ("deit_base_distilled_patch16_224", vit(Size::Base, true)),
    ("swin_tiny_patch4_window7_224", Arch::Swin(Size::Tiny)),
    ("swin_small_patch4_window7_224", Arch::Swin(Size::Small)),
    ("swin_base_patch4_window7_224", Arch::Swin(Size::Base)),
];

const fn vit(size: Size, distilled: bool) -> Arch {
    Arch::Vit { size, distilled }
}

/// Classifier biases of the zoo's state_dicts (`fc`, also of the ImageNet
/// nets, VGG's `classifier`, MobileNetV2's `classifier.0`, `linear` of
/// ResNet50 and the ShuffleNets, a transformer's `head`, a distilled DeiT's
/// `head_dist`, a Swin's `head.fc`), whose length is the number of classes.
const CLASSIFIER_BIASES: [&str; 7] = [
    "fc.bias",
    "classifier.bias",
    "classifier.0.bias",
    "linear.bias",
    "head.bias",
    "head_dist.bias",
    "head.fc.bias",
];

/// Whether a model's own parameter `key` is the bias of its classifier: one
/// of the zoo's names exactly, not a layer of that name deeper inside (a
/// squeeze-excitation block's `fc`).
pub fn is_model_classifier_bias(key: &str) -> bool {
    CLASSIFIER_BIASES.contains(&key)
}

/// Whether state_dict key `key` is a zoo classifier's bias, also under a
/// prefix ending in `.` or `/` (`module.fc.bias`, `student.weights/linear.bias`).
pub fn is_classifier_bias(key: &str) -> bool {
    CLASSIFIER_BIASES.iter().any(|b| {
        key.strip_suffix(b)
            .is_some_and(|rest| rest.is_empty() || rest.ends_with(['.', '/']))
    })
}

/// Whether zoo name `name` (keyword arguments allowed) is a transformer:
/// no BatchNorm, an input size fixed by its position embedding (a
/// Swin's: by its windows), taps of its own (`tokens/i`, `cls`, ...),
/// checked against timm (tests/vit.rs)
/// rather than against RepDistiller's zoo.
pub fn is_transformer(name: &str) -> bool {
    let base = name.split_once('(').map_or(name, |(b, _)| b);
    ZOO.iter()
        .any(|(n, a)| *n == base && matches!(a, Arch::Vit { .. } | Arch::Swin(_)))
}

/// Every zoo name, sorted.
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = ZOO.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names
}

/// Builds zoo model `name` under `p` with freshly initialised weights, or
/// loads `torchscript:FILE` (a saved TorchScript module, with the weights
/// it was saved with) or `python:SPEC` (a PyTorch module built by Python
/// and scripted); for those two `num_classes` is the module's business.
pub fn build(name: &str, p: &nn::Path, num_classes: i64) -> Result<Box<dyn Network>, ModelError> {
    if let Some(spec) = name.strip_prefix(torchscript::PYTHON_PREFIX) {
        return Ok(Box::new(torchscript::TorchScriptNet::from_python(spec, p)?));
    }
    if let Some(file) = name.strip_prefix(torchscript::PREFIX) {
        return Ok(Box::new(torchscript::TorchScriptNet::load(
            std::path::Path::new(file),
            p,
        )?));
    }
    let (base, arch, mut args) = zoo_entry(name)?;
    let num_classes = args.num_classes(num_classes)?;
    if let Arch::Vit { size, distilled } = arch {
        let cfg = args.vit(vit_config(size, distilled).with_num_classes(num_classes))?;
        return Ok(Box::new(cfg.init(p)?));
    }
    if let Arch::Swin(size) = arch {
        let cfg = args.swin(swin_config(size).with_num_classes(num_classes))?;
        return Ok(Box::new(cfg.init(p)?));
    }
    args.none_left(base)?;
    Ok(match arch {
        Arch::ResNet { depth, filters } => Box::new(
            ResNetConfig::new(depth)
                .with_filters(filters)
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::Wrn { depth, widen } => Box::new(
            WrnConfig::new(depth, widen)
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::Vgg { depth } => Box::new(
            VggConfig::new(depth)?
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::ResNetV2 { blocks } => Box::new(
            ResNetV2Config::new(blocks)
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::MobileNetV2 {
            expansion,
            width_mult,
        } => Box::new(
            MobileNetV2Config::new(expansion, width_mult)
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::ShuffleV1 => Box::new(
            ShuffleV1Config::new()
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::ShuffleV2 => Box::new(
            ShuffleV2Config::new()
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::TvResNet { block, blocks } => Box::new(
            TvResNetConfig::new(block, blocks)
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::MobileNetV1 => Box::new(
            MobileNetV1Config::new()
                .with_num_classes(num_classes)
                .init(p)?,
        ),
        Arch::Vit { .. } | Arch::Swin(_) => unreachable!("built above"),
    })
}

/// Checks a zoo name and its keyword arguments (their names, numbers and
/// the architecture they give) without building the network, as a recipe
/// does when it names one; `python:`/`torchscript:` specs are built later.
pub fn check_name(name: &str) -> Result<(), ModelError> {
    if torchscript::is_foreign(name) {
        return Ok(());
    }
    let (base, arch, mut args) = zoo_entry(name)?;
    // The data's class count is compared when the network is built.
    args.take::<i64>("num_classes")?;
    match arch {
        Arch::Vit { size, distilled } => args.vit(vit_config(size, distilled))?.check(),
        Arch::Swin(size) => args.swin(swin_config(size))?.check(),
        _ => args.none_left(base),
    }
}

/// The zoo entry `name` names, and its keyword arguments.
fn zoo_entry(name: &str) -> Result<(&str, Arch, ModelArgs), ModelError> {
    let (base, args) = ModelArgs::parse(name)?;
    match ZOO.iter().find(|(n, _)| *n == base) {
        Some((_, arch)) => Ok((base, *arch, args)),
        None => Err(ModelError::UnknownModel {
            name: name.to_string(),
            valid: format!(
                "{}, or torchscript:FILE, or python:FILE.py:NAME(args)",
                names().join(", ")
            ),
        }),
    }
}

fn vit_config(size: Size, distilled: bool) -> VitConfig {
    let cfg = match size {
        Size::Tiny => VitConfig::tiny(),
        Size::Small => VitConfig::small(),
        Size::Base => VitConfig::base(),
    };
    cfg.with_distilled(distilled)
}

fn swin_config(size: Size) -> SwinConfig {
    match size {
        Size::Tiny => SwinConfig::tiny(),
        Size::Small => SwinConfig::small(),
        Size::Base => SwinConfig::base(),
    }
}

/// Keyword arguments after a zoo name, as timm's `create_model` takes them:
/// `vit_tiny_patch16_224(img_size=32,patch_size=4,drop_path_rate=0.1)`.
#[derive(Debug, Default)]
struct ModelArgs {
    args: Vec<(String, String)>,
}

/// The arguments a ViT takes.
const VIT_ARGS: &str =
    "img_size, patch_size, num_classes, drop_path_rate, depth, embed_dim, num_heads, mlp_ratio";

/// The arguments a Swin takes (timm's tuple-valued `depths` and
/// `num_heads` are not among them).
const SWIN_ARGS: &str =
    "img_size, patch_size, window_size, num_classes, drop_path_rate, embed_dim, mlp_ratio";

impl ModelArgs {
    fn parse(name: &str) -> Result<(&str, ModelArgs), ModelError> {
        let Some((base, rest)) = name.split_once('(') else {
            return Ok((name, ModelArgs::default()));
        };
        let bad = ModelError::Args;
        let Some(inner) = rest.strip_suffix(')') else {
            return Err(bad(format!(
                "`{name}` does not end with `)`; write NAME(key=value,...)"
            )));
        };
        let mut args = Vec::new();
        for kv in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(bad(format!("`{kv}` in `{name}` is not key=value")));
            };
            args.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok((base, ModelArgs { args }))
    }

    fn take<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, ModelError> {
        let Some(i) = self.args.iter().position(|(k, _)| k == key) else {
            return Ok(None);
        };
        let (_, v) = self.args.remove(i);
        v.parse()
            .map(Some)
            .map_err(|_| ModelError::Args(format!("`{key}={v}` is not a valid number")))
    }

    /// The data's class count, which a `num_classes` argument may repeat
    /// but not contradict.
    fn num_classes(&mut self, data: i64) -> Result<i64, ModelError> {
        match self.take::<i64>("num_classes")? {
            Some(n) if n != data => Err(ModelError::Args(format!(
                "num_classes={n}, but the data has {data} classes"
            ))),
            _ => Ok(data),
        }
    }

    fn vit(mut self, mut cfg: VitConfig) -> Result<VitConfig, ModelError> {
        if let Some(v) = self.take("img_size")? {
            cfg.img_size = v;
        }
        if let Some(v) = self.take("patch_size")? {
            cfg.patch_size = v;
        }
        if let Some(v) = self.take("drop_path_rate")? {
            cfg.drop_path_rate = v;
        }
        if let Some(v) = self.take("depth")? {
            cfg.depth = v;
        }
        if let Some(v) = self.take("embed_dim")? {
            cfg.embed_dim = v;
        }
        if let Some(v) = self.take("num_heads")? {
            cfg.num_heads = v;
        }
        if let Some(v) = self.take("mlp_ratio")? {
            cfg.mlp_ratio = v;
        }
        self.none_left("a ViT")?;
        Ok(cfg)
    }

    fn swin(mut self, mut cfg: SwinConfig) -> Result<SwinConfig, ModelError> {
        if let Some(v) = self.take("img_size")? {
            cfg.img_size = v;
        }
        if let Some(v) = self.take("patch_size")? {
            cfg.patch_size = v;
        }
        if let Some(v) = self.take("window_size")? {
            cfg.window_size = v;
        }
        if let Some(v) = self.take("drop_path_rate")? {
            cfg.drop_path_rate = v;
        }
        if let Some(v) = self.take("embed_dim")? {
            cfg.embed_dim = v;
        }
        if let Some(v) = self.take("mlp_ratio")? {
            cfg.mlp_ratio = v;
        }
        self.none_left("a Swin")?;
        Ok(cfg)
    }

    fn none_left(&self, what: &str) -> Result<(), ModelError> {
        match self.args.first() {
            None => Ok(()),
            Some((k, _)) => Err(ModelError::Args(format!(
                "{what} takes no argument `{k}`; ViTs take {VIT_ARGS}, Swin {SWIN_ARGS}, \
                 the CNNs only num_classes"
            ))),
        }
    }
}

fn check_classes(family: &'static str, num_classes: i64) -> Result<(), ModelError> {
    if num_classes < 1 {
        return Err(ModelError::InvalidConfig {
            family,
            reason: format!("num_classes must be at least 1, got {num_classes}"),
        });
    }
    Ok(())
}

/// A transformer's patch grid: `patch_size` between 1 and `img_size`,
/// dividing it.
fn check_patch_grid(img_size: i64, patch_size: i64) -> Result<(), String> {
    if patch_size < 1 || img_size < patch_size {
        return Err(format!(
            "patch_size {patch_size} must be between 1 and img_size {img_size}"
        ));
    }
    if img_size % patch_size != 0 {
        return Err(format!(
            "img_size {img_size} is not divisible by patch_size {patch_size}"
        ));
    }
    Ok(())
}

fn check_drop_path_rate(rate: f64) -> Result<(), String> {
    match (0.0..1.0).contains(&rate) {
        true => Ok(()),
        false => Err(format!("drop_path_rate must be in [0, 1), got {rate}")),
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, nn::VarStore};

    use super::*;

    fn error(name: &str, classes: i64) -> String {
        let vs = VarStore::new(Device::Cpu);
        match build(name, &vs.root(), classes) {
            Ok(_) => panic!("{name} built"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn keyword_arguments_reach_the_vit_and_mistakes_are_named() {
        let vs = VarStore::new(Device::Cpu);
        let net = build(
            "vit_tiny_patch16_224(img_size=32, patch_size=8,depth=2,num_classes=7)",
            &vs.root(),
            7,
        )
        .unwrap();
        let taps = net.forward_taps(&Tensor::zeros([1, 3, 32, 32], tch::kind::FLOAT_CPU), false);
        assert_eq!(taps.feat[0].size(), [1, 192, 4, 4]);
        assert_eq!(taps.logits.size(), [1, 7]);
        assert!(vs.variables().contains_key("blocks.1.mlp.fc2.weight"));
        assert!(!vs.variables().contains_key("blocks.2.mlp.fc2.weight"));
        for (name, want) in [
            ("resnet8(depth=3)", "resnet8 takes no argument `depth`"),
            (
                "vit_tiny_patch16_224(num_classes=5)",
                "num_classes=5, but the data has 10",
            ),
            ("vit_tiny_patch16_224(img_size=32", "does not end with `)`"),
            ("vit_tiny_patch16_224(img_size)", "`img_size` in"),
            (
                "vit_tiny_patch16_224(img_size=x)",
                "`img_size=x` is not a valid number",
            ),
            (
                "vit_tiny_patch16_224(img_size=40,patch_size=16)",
                "not divisible",
            ),
            ("vit_huge_patch14_224", "valid models:"),
        ] {
            let got = error(name, 10);
            assert!(got.contains(want), "{name}: {got}");
        }
    }
}
