//! torchvision's ImageNet ResNets (`torchvision/models/resnet.py`): zoo names
//! `resnet18`, `resnet34` (BasicBlocks) and `resnet50` (Bottlenecks, the
//! stride on the 3x3 convolution), with the taps mdistiller's
//! `models/imagenet/resnet.py` exposes. Not to be confused with `ResNet50`,
//! RepDistiller's CIFAR Bottleneck net ([`crate::ResNetV2`]).
//!
//! A 7x7 stride-2 stem and a 3x3 stride-2 max pool, then four stages, the
//! last three halving the resolution; the head pools adaptively, so any input
//! of at least 32 pixels runs (224 for ImageNet).
//!
//! Parameter names are torchvision's `state_dict` keys, so its checkpoints
//! load as they are: `conv1`, `bn1`,
//! `layer{1..4}.{i}.{conv1,bn1,conv2,bn2}` (`conv3`, `bn3` too in
//! Bottlenecks), `layer{s}.0.downsample.{0,1}` where a block changes shape,
//! `fc`. Initialisation as torchvision's (`zero_init_residual=False`):
//! convolutions He normal over fan-out, BN weight 1 bias 0, `fc` as
//! `nn.Linear` makes it.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module};

use crate::layers::{
    ConvBn, ConvInit, LinearInit, PreactBlock, Stage, bn, conv_grouped, global_pool, linear,
};
use crate::{ModelError, Network, check_classes};

const HE: ConvInit = ConvInit::HeFanOut;

/// The residual block of every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TvBlock {
    /// Two 3x3 convolutions; outputs `planes` channels (resnet18, resnet34).
    Basic,
    /// 1x1, 3x3 (strided), 1x1; outputs `4 * planes` channels (resnet50).
    Bottleneck,
}

impl TvBlock {
    /// Output channels over `planes`.
    pub fn expansion(self) -> i64 {
        match self {
            TvBlock::Basic => 1,
            TvBlock::Bottleneck => 4,
        }
    }
}

/// Block type, blocks per stage, stem width and the `planes` of the four
/// stages (stage `k` outputs `expansion * planes[k]` channels).
#[derive(Debug, Clone, PartialEq)]
pub struct TvResNetConfig {
    pub block: TvBlock,
    pub blocks: [i64; 4],
    pub stem: i64,
    pub planes: [i64; 4],
    pub num_classes: i64,
}

impl TvResNetConfig {
    /// torchvision's widths (stem 64, planes 64, 128, 256, 512) and ImageNet's
    /// 1000 classes.
    pub fn new(block: TvBlock, blocks: [i64; 4]) -> Self {
        TvResNetConfig {
            block,
            blocks,
            stem: 64,
            planes: [64, 128, 256, 512],
            num_classes: 1000,
        }
    }

    /// torchvision's `resnet18()`.
    pub fn resnet18() -> Self {
        Self::new(TvBlock::Basic, [2, 2, 2, 2])
    }

    /// torchvision's `resnet34()`.
    pub fn resnet34() -> Self {
        Self::new(TvBlock::Basic, [3, 4, 6, 3])
    }

    /// torchvision's `resnet50()`.
    pub fn resnet50() -> Self {
        Self::new(TvBlock::Bottleneck, [3, 4, 6, 3])
    }

    pub fn with_stem(mut self, stem: i64) -> Self {
        self.stem = stem;
        self
    }

    pub fn with_planes(mut self, planes: [i64; 4]) -> Self {
        self.planes = planes;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<TvResNet, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "tvresnet",
            reason,
        };
        if self.blocks.iter().any(|&n| n < 1) {
            return Err(invalid(format!(
                "blocks must be positive, got {:?}",
                self.blocks
            )));
        }
        if self.stem < 1 || self.planes.iter().any(|&c| c < 1) {
            return Err(invalid(format!(
                "widths must be positive, got stem {} and planes {:?}",
                self.stem, self.planes
            )));
        }
        check_classes("tvresnet", self.num_classes)?;
        let mut c_in = self.stem;
        let mut stages = Vec::with_capacity(4);
        for (s, (&planes, &n)) in self.planes.iter().zip(&self.blocks).enumerate() {
            let sp = p / format!("layer{}", s + 1);
            let stride = if s == 0 { 1 } else { 2 };
            let mut body: Vec<Block> = (0..n)
                .map(|i| {
                    let stride = if i == 0 { stride } else { 1 };
                    let b = Block::new(&(&sp / i), self.block, c_in, planes, stride);
                    c_in = planes * self.block.expansion();
                    b
                })
                .collect();
            let last = body.pop().expect("blocks >= 1");
            stages.push(Stage { body, last });
        }
        Ok(TvResNet {
            stem: ConvBn::new(
                conv_grouped(p / "conv1", (3, self.stem), 7, 2, 1, HE),
                bn(p / "bn1", self.stem),
                2,
                1,
            ),
            stages,
            fc: linear(p / "fc", c_in, self.num_classes, LinearInit::Torch),
        })
    }
}

/// A BasicBlock or Bottleneck: convolutions with their BNs, a ReLU between
/// consecutive ones, then the residual sum.
#[derive(Debug)]
struct Block {
    /// `conv{k}` with `bn{k}`, k = 1, 2 (, 3).
    layers: Vec<ConvBn>,
    /// `downsample.0`, `downsample.1`.
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(p: &nn::Path, kind: TvBlock, c_in: i64, planes: i64, stride: i64) -> Self {
        let c_out = planes * kind.expansion();
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            let c = conv_grouped(&d / "0", (c_in, c_out), 1, stride, 1, HE);
            ConvBn::new(c, bn(&d / "1", c_out), stride, 1)
        });
        // (input, output, kernel, stride) of conv1, conv2, ...
        let shapes: Vec<(i64, i64, i64, i64)> = match kind {
            TvBlock::Basic => vec![(c_in, planes, 3, stride), (planes, planes, 3, 1)],
            TvBlock::Bottleneck => vec![
                (c_in, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, c_out, 1, 1),
            ],
        };
        let layers = shapes
            .into_iter()
            .enumerate()
            .map(|(k, (i, o, kernel, stride))| {
                let c = conv_grouped(p / format!("conv{}", k + 1), (i, o), kernel, stride, 1, HE);
                ConvBn::new(c, bn(p / format!("bn{}", k + 1), o), stride, 1)
            })
            .collect();
        Block { layers, downsample }
    }
}

impl PreactBlock for Block {
    /// The residual sum, before the block's closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (last, inner) = self.layers.split_last().expect("two or three layers");
        let mut h = x.shallow_clone();
        for layer in inner {
            let mut out = layer.forward_t(&h, train);
            h = out.relu_();
        }
        let mut out = last.forward_t(&h, train);
        match &self.downsample {
            Some(d) => out += d.forward_t(x, train),
            None => out += x,
        }
        out
    }

    fn fold(&mut self, on: bool) {
        self.layers
            .iter_mut()
            .chain(&mut self.downsample)
            .for_each(|l| l.fold(on));
    }
}

/// A torchvision ResNet.
///
/// Taps (224x224 input; 32x32 in brackets): `feat/0` = relu(bn1(conv1(x)))
/// before the max pool, at 112 (16) pixels with 64 channels, `preact/0` =
/// bn1(conv1(x)); `feat/k` (k = 1..4) = output of `layer{k}` at 56, 28, 14
/// and 7 (8, 4, 2, 1) pixels, with 64, 128, 256, 512 channels for resnet18
/// and resnet34 and 256, 512, 1024, 2048 for resnet50; `preact/k` = the last
/// block's residual sum before its closing ReLU. `embed` = global mean of
/// `feat/4`, `logits` = fc(embed). These are mdistiller's `feats`,
/// `preact_feats` and `pooled_feat` (its blocks move the closing ReLU to the
/// next block's input, which computes the same function as torchvision's).
#[derive(Debug)]
pub struct TvResNet {
    /// `conv1`, `bn1`.
    stem: ConvBn,
    /// `layer1`..`layer4`.
    stages: Vec<Stage<Block>>,
    fc: nn::Linear,
}

impl Network for TvResNet {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.stem.forward_t(xs, train);
        let f0 = stem.relu();
        let mut x = f0.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut feat = vec![f0];
        let mut preact = vec![stem];
        for stage in &self.stages {
            let (f, p) = stage.forward(&x, train);
            x = f.shallow_clone();
            feat.push(f);
            preact.push(p);
        }
        let embed = global_pool(&x);
        let logits = self.fc.forward(&embed);
        Taps {
            feat,
            preact,
            embed,
            logits,
            extra: Vec::new(),
        }
    }

    fn fold_batchnorm(&mut self, on: bool) {
        self.stem.fold(on);
        self.stages.iter_mut().for_each(|s| s.fold(on));
    }
}
