//! The ImageNet-style ResNet with Bottleneck blocks on CIFAR inputs
//! (RepDistiller `models/resnetv2.py`, zoo name `ResNet50`: blocks 3, 4, 6,
//! 3 after a 3x3 stride-1 stem, no max pool).
//!
//! Parameter names: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}`,
//! `layer{s}.{i}.shortcut.{0,1}` where a block changes shape, `linear`.

use kd_core::Taps;
use tch::Tensor;
use tch::nn;

use crate::layers::{
    ConvBn, ConvInit, LinearInit, PreactBlock, Stage, bn, conv_grouped, linear, staged_taps,
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
            stem: ConvBn::new(
                conv_grouped(p / "conv1", (3, self.stem), 3, 1, 1, HE),
                bn(p / "bn1", self.stem),
                1,
                1,
            ),
            stages,
            linear: linear(p / "linear", c_in, self.num_classes, LinearInit::Torch),
        })
    }
}

#[derive(Debug)]
struct Bottleneck {
    /// `conv{1,2,3}` with `bn{1,2,3}`.
    layers: [ConvBn; 3],
    /// `shortcut.0`, `shortcut.1`.
    shortcut: Option<ConvBn>,
}

impl Bottleneck {
    fn new(p: &nn::Path, c_in: i64, planes: i64, stride: i64) -> Self {
        let c_out = planes * EXPANSION;
        let shortcut = (stride != 1 || c_in != c_out).then(|| {
            let s = p / "shortcut";
            let c = conv_grouped(&s / "0", (c_in, c_out), 1, stride, 1, HE);
            ConvBn::new(c, bn(&s / "1", c_out), stride, 1)
        });
        let layer = |k: usize, (c_in, c_out): (i64, i64), kernel, stride| {
            let c = conv_grouped(p / format!("conv{k}"), (c_in, c_out), kernel, stride, 1, HE);
            ConvBn::new(c, bn(p / format!("bn{k}"), c_out), stride, 1)
        };
        Bottleneck {
            layers: [
                layer(1, (c_in, planes), 1, 1),
                layer(2, (planes, planes), 3, stride),
                layer(3, (planes, c_out), 1, 1),
            ],
            shortcut,
        }
    }
}

impl PreactBlock for Bottleneck {
    /// The residual sum, before the block's closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let [l1, l2, l3] = &self.layers;
        let mut h = l1.forward_t(x, train);
        let mut h = l2.forward_t(&h.relu_(), train);
        let mut out = l3.forward_t(&h.relu_(), train);
        match &self.shortcut {
            Some(s) => out += s.forward_t(x, train),
            None => out += x,
        }
        out
    }

    fn fold(&mut self, on: bool) {
        self.layers
            .iter_mut()
            .chain(&mut self.shortcut)
            .for_each(|l| l.fold(on));
    }
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
    /// `conv1`, `bn1`.
    stem: ConvBn,
    stages: Vec<Stage<Bottleneck>>,
    linear: nn::Linear,
}

impl Network for ResNetV2 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.stem.forward_t(xs, train);
        staged_taps(stem, &self.stages, &self.linear, train)
    }

    fn fold_batchnorm(&mut self, on: bool) {
        self.stem.fold(on);
        self.stages.iter_mut().for_each(|s| s.fold(on));
    }
}
