//! CIFAR ResNets with BasicBlocks (RepDistiller `models/resnet.py`).
//!
//! Parameter names: `conv1`, `bn1`, `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`,
//! `layer{s}.0.downsample.{0,1}` where a block changes shape, `fc`.

use kd_core::Taps;
use tch::Tensor;
use tch::nn;

use crate::layers::{ConvBn, LinearInit, PreactBlock, Stage, bn, conv, linear, staged_taps};
use crate::{ModelError, Network, check_classes};

/// Depth `6n+2` (n blocks per stage) and the widths of stem and stages.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub depth: i64,
    /// Stem, stage 1, stage 2, stage 3.
    pub filters: [i64; 4],
    pub num_classes: i64,
}

impl ResNetConfig {
    /// RepDistiller's narrow widths (16, 16, 32, 64) and 100 classes.
    pub fn new(depth: i64) -> Self {
        ResNetConfig {
            depth,
            filters: [16, 16, 32, 64],
            num_classes: 100,
        }
    }

    pub fn with_filters(mut self, filters: [i64; 4]) -> Self {
        self.filters = filters;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<ResNet, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "resnet",
            reason,
        };
        if self.depth < 8 || (self.depth - 2) % 6 != 0 {
            return Err(invalid(format!(
                "depth must be 6n+2 with n >= 1, got {}",
                self.depth
            )));
        }
        if self.filters.iter().any(|&f| f < 1) {
            return Err(invalid(format!(
                "filters must be positive, got {:?}",
                self.filters
            )));
        }
        check_classes("resnet", self.num_classes)?;
        let n = (self.depth - 2) / 6;
        let f = self.filters;
        Ok(ResNet {
            stem: ConvBn::new(
                conv(p / "conv1", 3, f[0], 3, 1, false),
                bn(p / "bn1", f[0]),
                1,
                1,
            ),
            stages: vec![
                stage(&(p / "layer1"), n, f[0], f[1], 1),
                stage(&(p / "layer2"), n, f[1], f[2], 2),
                stage(&(p / "layer3"), n, f[2], f[3], 2),
            ],
            fc: linear(p / "fc", f[3], self.num_classes, LinearInit::Torch),
        })
    }
}

#[derive(Debug)]
struct BasicBlock {
    /// `conv1`, `bn1`.
    first: ConvBn,
    /// `conv2`, `bn2`.
    second: ConvBn,
    /// `downsample.0`, `downsample.1`.
    downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            let c = conv(&d / "0", c_in, c_out, 1, stride, false);
            ConvBn::new(c, bn(&d / "1", c_out), stride, 1)
        });
        let conv1 = conv(p / "conv1", c_in, c_out, 3, stride, false);
        let conv2 = conv(p / "conv2", c_out, c_out, 3, 1, false);
        BasicBlock {
            first: ConvBn::new(conv1, bn(p / "bn1", c_out), stride, 1),
            second: ConvBn::new(conv2, bn(p / "bn2", c_out), 1, 1),
            downsample,
        }
    }
}

impl PreactBlock for BasicBlock {
    /// The residual sum, before the block's closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // In place where autograd allows it: BN and add never save their
        // outputs for backward, ReLU saves the result it keeps.
        let mut h = self.first.forward_t(x, train);
        let h = h.relu_();
        let mut out = self.second.forward_t(&h, train);
        match &self.downsample {
            Some(d) => out += d.forward_t(x, train),
            None => out += x,
        }
        out
    }

    fn fold(&mut self, on: bool) {
        self.first.fold(on);
        self.second.fold(on);
        if let Some(d) = &mut self.downsample {
            d.fold(on);
        }
    }
}

/// `n` blocks, the first changing channels and stride.
fn stage(p: &nn::Path, n: i64, c_in: i64, c_out: i64, stride: i64) -> Stage<BasicBlock> {
    let mut body = Vec::new();
    let mut c = c_in;
    let mut s = stride;
    for i in 0..n - 1 {
        body.push(BasicBlock::new(&(p / i), c, c_out, s));
        c = c_out;
        s = 1;
    }
    Stage {
        body,
        last: BasicBlock::new(&(p / (n - 1)), c, c_out, s),
    }
}

/// A CIFAR ResNet.
///
/// Taps (32x32 input): `feat/0` = relu(bn1(conv1(x))); `feat/k` (k = 1..3) =
/// output of `layer{k}` (after its last block's ReLU), at 32, 16 and 8 pixels;
/// `preact/0` = bn1(conv1(x)), `preact/k` = the last block's residual sum
/// before that ReLU; `embed` = global mean of `feat/3`; `logits` = fc(embed).
/// `feat` and `preact/1..3` are RepDistiller's `is_feat` lists; its preact
/// list repeats the post-ReLU stem at index 0 where this gives bn1's output.
#[derive(Debug)]
pub struct ResNet {
    /// `conv1`, `bn1`.
    stem: ConvBn,
    /// `layer1`..`layer3`.
    stages: Vec<Stage<BasicBlock>>,
    fc: nn::Linear,
}

impl Network for ResNet {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.stem.forward_t(xs, train);
        staged_taps(stem, &self.stages, &self.fc, train)
    }

    fn fold_batchnorm(&mut self, on: bool) {
        self.stem.fold(on);
        self.stages.iter_mut().for_each(|s| s.fold(on));
    }
}
