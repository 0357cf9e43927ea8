//! The ImageNet-style ResNet with Bottleneck blocks on CIFAR inputs
//! (RepDistiller `models/resnetv2.py`, zoo name `ResNet50`: blocks 3, 4, 6,
//! 3 after a 3x3 stride-1 stem, no max pool).
//!
//! Parameter names: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}`,
//! `layer{s}.{i}.shortcut.{0,1}` where a block changes shape, `linear`.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use crate::layers::{
    ConvInit, LinearInit, PreactBlock, Stage, bn, conv_grouped, linear, staged_taps,
};
use crate::{ModelError, Network, check_classes};

/// Bottleneck output width over its inner width.
const EXPANSION: i64 = 4;
const HE: ConvInit = ConvInit::HeFanOut;

/// Blocks per stage, stem width and inner widths of the four stages (stage
/// `k` outputs `4 * planes[k]` channels).
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetV2Config {
    pub blocks: [i64; 4],
    pub stem: i64,
    pub planes: [i64; 4],
    pub num_classes: i64,
}

impl ResNetV2Config {
    /// RepDistiller's widths (stem 64, planes 64, 128, 256, 512) and 100
    /// classes; `ResNet50` is `new([3, 4, 6, 3])`.
    pub fn new(blocks: [i64; 4]) -> Self {
        ResNetV2Config {
            blocks,
            stem: 64,
            planes: [64, 128, 256, 512],
            num_classes: 100,
        }
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

    pub fn init(&self, p: &nn::Path) -> Result<ResNetV2, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "resnetv2",
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
        check_classes("resnetv2", self.num_classes)?;
        let mut c_in = self.stem;
        let mut stages = Vec::with_capacity(4);
        for (s, (&planes, &n)) in self.planes.iter().zip(&self.blocks).enumerate() {
            let sp = p / format!("layer{}", s + 1);
            let stride = if s == 0 { 1 } else { 2 };
            let mut body: Vec<Bottleneck> = (0..n)
                .map(|i| {
                    let b =
                        Bottleneck::new(&(&sp / i), c_in, planes, if i == 0 { stride } else { 1 });
                    c_in = planes * EXPANSION;
                    b
                })
                .collect();
            let last = body.pop().expect("blocks >= 1");
            stages.push(Stage { body, last });
        }
        Ok(ResNetV2 {
            conv1: conv_grouped(p / "conv1", (3, self.stem), 3, 1, 1, HE),
            bn1: bn(p / "bn1", self.stem),
            stages,
            linear: linear(p / "linear", c_in, self.num_classes, LinearInit::Torch),
        })
    }
}

#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    shortcut: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Bottleneck {
    fn new(p: &nn::Path, c_in: i64, planes: i64, stride: i64) -> Self {
        let c_out = planes * EXPANSION;
        let shortcut = (stride != 1 || c_in != c_out).then(|| {
            let s = p / "shortcut";
            (
                conv_grouped(&s / "0", (c_in, c_out), 1, stride, 1, HE),
                bn(&s / "1", c_out),
            )
        });
        Bottleneck {
            conv1: conv_grouped(p / "conv1", (c_in, planes), 1, 1, 1, HE),
            bn1: bn(p / "bn1", planes),
            conv2: conv_grouped(p / "conv2", (planes, planes), 3, stride, 1, HE),
            bn2: bn(p / "bn2", planes),
            conv3: conv_grouped(p / "conv3", (planes, c_out), 1, 1, 1, HE),
            bn3: bn(p / "bn3", c_out),
            shortcut,
        }
    }
}

impl PreactBlock for Bottleneck {
    /// The residual sum, before the block's closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.bn1.forward_t(&self.conv1.forward(x), train);
        let h = h.relu_();
        let mut h = self.bn2.forward_t(&self.conv2.forward(&h), train);
        let h = h.relu_();
        let mut out = self.bn3.forward_t(&self.conv3.forward(&h), train);
        match &self.shortcut {
            Some((c, b)) => out += b.forward_t(&c.forward(x), train),
            None => out += x,
        }
        out
    }

    /// Not folded yet: the bottleneck runs its BatchNorms as they are.
    fn fold(&mut self, _on: bool) {}
}

/// A Bottleneck ResNet (RepDistiller's `ResNet50`).
///
/// Taps (32x32 input): `feat/0` = relu(bn1(conv1(x))) at 32 pixels,
/// `preact/0` = bn1(conv1(x)); `feat/k` (k = 1..4) = output of `layer{k}`
/// at 32, 16, 8 and 4 pixels (256, 512, 1024, 2048 channels for ResNet50),
/// `preact/k` = its last block's residual sum before the closing ReLU
/// (RepDistiller's `f{k}_pre`); `embed` = global mean of `feat/4`, `logits` =
/// linear(embed). RepDistiller's preact list repeats the post-ReLU stem at
/// index 0 where this gives its BN output.
#[derive(Debug)]
pub struct ResNetV2 {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    stages: Vec<Stage<Bottleneck>>,
    linear: nn::Linear,
}

impl Network for ResNetV2 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.bn1.forward_t(&self.conv1.forward(xs), train);
        staged_taps(stem, &self.stages, &self.linear, train)
    }
}
