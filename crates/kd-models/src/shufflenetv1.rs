//! ShuffleNet V1 for CIFAR (RepDistiller `models/ShuffleNetv1.py`, zoo name
//! `ShuffleV1`: out planes 240, 480, 960, blocks 4, 8, 4, 3 groups).
//!
//! Parameter names: `conv1`, `bn1` (1x1 stem to 24 channels),
//! `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}`, `linear`. RepDistiller
//! leaves PyTorch's default initialisation in place.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use crate::layers::{
    Bn, ConvInit, LinearInit, PreactBlock, Stage, bn, channel_shuffle, conv_grouped, linear,
    staged_taps,
};
use crate::{ModelError, Network, check_classes};

/// Stem width; a block reading exactly this many channels groups its first
/// conv as one (RepDistiller's `g = 1 if in_planes == 24`).
const STEM: i64 = 24;

/// Output width and block count of each stage, and the group count.
#[derive(Debug, Clone, PartialEq)]
pub struct ShuffleV1Config {
    pub out_planes: [i64; 3],
    pub num_blocks: [i64; 3],
    pub groups: i64,
    pub num_classes: i64,
}

impl Default for ShuffleV1Config {
    fn default() -> Self {
        ShuffleV1Config {
            out_planes: [240, 480, 960],
            num_blocks: [4, 8, 4],
            groups: 3,
            num_classes: 100,
        }
    }
}

impl ShuffleV1Config {
    /// RepDistiller's `ShuffleV1` with 100 classes.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_out_planes(mut self, out_planes: [i64; 3]) -> Self {
        self.out_planes = out_planes;
        self
    }

    pub fn with_num_blocks(mut self, num_blocks: [i64; 3]) -> Self {
        self.num_blocks = num_blocks;
        self
    }

    pub fn with_groups(mut self, groups: i64) -> Self {
        self.groups = groups;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<ShuffleNetV1, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "shufflenetv1",
            reason,
        };
        if self.groups < 1 || self.num_blocks.iter().any(|&n| n < 1) {
            return Err(invalid(format!(
                "groups and num_blocks must be positive, got {} and {:?}",
                self.groups, self.num_blocks
            )));
        }
        check_classes("shufflenetv1", self.num_classes)?;
        let mut c_in = STEM;
        let mut stages = Vec::with_capacity(3);
        for (s, (&out, &n)) in self.out_planes.iter().zip(&self.num_blocks).enumerate() {
            let sp = p / format!("layer{}", s + 1);
            let mut blocks = Vec::with_capacity(n as usize);
            for i in 0..n {
                // The first block strides and concatenates its pooled input,
                // so its branch only adds the missing channels.
                let branch = if i == 0 { out - c_in } else { out };
                let spec = BlockSpec {
                    c_in,
                    c_out: branch,
                    stride: if i == 0 { 2 } else { 1 },
                    groups: self.groups,
                };
                spec.check().map_err(|reason| {
                    invalid(format!("layer{}.{i} ({c_in} -> {out}): {reason}", s + 1))
                })?;
                blocks.push(Bottleneck::new(&(&sp / i), spec));
                c_in = out;
            }
            let last = blocks.pop().expect("num_blocks >= 1");
            stages.push(Stage { body: blocks, last });
        }
        let torch = ConvInit::Torch;
        Ok(ShuffleNetV1 {
            conv1: conv_grouped(p / "conv1", (3, STEM), 1, 1, 1, torch),
            bn1: bn(p / "bn1", STEM),
            stages,
            linear: linear(p / "linear", c_in, self.num_classes, LinearInit::Torch),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    c_in: i64,
    /// Channels of the residual branch.
    c_out: i64,
    stride: i64,
    groups: i64,
}

impl BlockSpec {
    fn mid(&self) -> i64 {
        self.c_out / 4
    }

    fn first_groups(&self) -> i64 {
        if self.c_in == STEM { 1 } else { self.groups }
    }

    fn check(&self) -> Result<(), String> {
        let (mid, g1, g) = (self.mid(), self.first_groups(), self.groups);
        if mid < 1 {
            return Err(format!(
                "the branch needs at least 4 channels, got {}",
                self.c_out
            ));
        }
        if self.c_in % g1 != 0 || mid % g1 != 0 || mid % g != 0 || self.c_out % g != 0 {
            return Err(format!(
                "channels {} -> {mid} -> {} do not split into {g} groups",
                self.c_in, self.c_out
            ));
        }
        Ok(())
    }
}

/// Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; added to the
/// input, or concatenated with its 3x3 average pool where the block strides.
#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: Bn,
    shuffle: i64,
    conv2: nn::Conv2D,
    bn2: Bn,
    conv3: nn::Conv2D,
    bn3: Bn,
    strided: bool,
}

impl Bottleneck {
    fn new(p: &nn::Path, spec: BlockSpec) -> Self {
        let (mid, g1) = (spec.mid(), spec.first_groups());
        let torch = ConvInit::Torch;
        Bottleneck {
            conv1: conv_grouped(p / "conv1", (spec.c_in, mid), 1, 1, g1, torch),
            bn1: bn(p / "bn1", mid),
            shuffle: g1,
            conv2: conv_grouped(p / "conv2", (mid, mid), 3, spec.stride, mid, torch),
            bn2: bn(p / "bn2", mid),
            conv3: conv_grouped(p / "conv3", (mid, spec.c_out), 1, 1, spec.groups, torch),
            bn3: bn(p / "bn3", spec.c_out),
            strided: spec.stride == 2,
        }
    }
}

impl PreactBlock for Bottleneck {
    /// The block before its closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.bn1.forward_t(&self.conv1.forward(x), train);
        let h = channel_shuffle(&h.relu_(), self.shuffle);
        let mut h = self.bn2.forward_t(&self.conv2.forward(&h), train);
        let h = h.relu_();
        let mut out = self.bn3.forward_t(&self.conv3.forward(&h), train);
        if self.strided {
            let res = x.avg_pool2d([3, 3], [2, 2], [1, 1], false, true, None::<i64>);
            Tensor::cat(&[out, res], 1)
        } else {
            out += x;
            out
        }
    }

    /// Not folded yet: the bottleneck runs its BatchNorms as they are.
    fn fold(&mut self, _on: bool) {}
}

/// ShuffleNet V1.
///
/// Taps (32x32 input): `feat/0` = relu(bn1(conv1(x))) at 32 pixels, 24
/// channels, `preact/0` = bn1(conv1(x)); `feat/k` (k = 1..3) = output of
/// `layer{k}` at 16, 8 and 4 pixels, `preact/k` = its last block before the
/// closing ReLU (RepDistiller's `f{k}_pre`); `embed` = global mean of
/// `feat/3`, `logits` = linear(embed). RepDistiller's preact list repeats the
/// post-ReLU stem at index 0 where this gives its BN output.
#[derive(Debug)]
pub struct ShuffleNetV1 {
    conv1: nn::Conv2D,
    bn1: Bn,
    stages: Vec<Stage<Bottleneck>>,
    linear: nn::Linear,
}

impl Network for ShuffleNetV1 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.bn1.forward_t(&self.conv1.forward(xs), train);
        staged_taps(stem, &self.stages, &self.linear, train)
    }
}
