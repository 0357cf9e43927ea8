//! ShuffleNet V2 for CIFAR (RepDistiller `models/ShuffleNetv2.py`, zoo name
//! `ShuffleV2`: net size 1, widths 116, 232, 464, head 1024, blocks 3, 7, 3).
//!
//! Parameter names: `conv1`, `bn1` (1x1 stem to 24 channels),
//! `layer{1,2,3}.0.{conv1..conv5,bn1..bn5}` (the strided down block),
//! `layer{1,2,3}.{1..n}.{conv1,bn1,conv2,bn2,conv3,bn3}` (split blocks),
//! `conv2`, `bn2` (1x1 head), `linear`. RepDistiller leaves PyTorch's default
//! initialisation in place.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use crate::layers::{
    Bn, ConvInit, LinearInit, bn, channel_shuffle, conv_grouped, global_pool, linear,
};
use crate::{ModelError, Network, check_classes};

const STEM: i64 = 24;
const TORCH: ConvInit = ConvInit::Torch;

/// RepDistiller's `configs`: net size, stage widths and head width, split
/// blocks per stage.
const NET_SIZES: [(f64, [i64; 4], [i64; 3]); 6] = [
    (0.2, [40, 80, 160, 512], [3, 3, 3]),
    (0.3, [40, 80, 160, 512], [3, 7, 3]),
    (0.5, [48, 96, 192, 1024], [3, 7, 3]),
    (1.0, [116, 232, 464, 1024], [3, 7, 3]),
    (1.5, [176, 352, 704, 1024], [3, 7, 3]),
    (2.0, [224, 488, 976, 2048], [3, 7, 3]),
];

/// Widths of the three stages and the head, split blocks per stage (each
/// stage also opens with a down block).
#[derive(Debug, Clone, PartialEq)]
pub struct ShuffleV2Config {
    pub out_channels: [i64; 4],
    pub num_blocks: [i64; 3],
    pub num_classes: i64,
}

impl Default for ShuffleV2Config {
    fn default() -> Self {
        ShuffleV2Config {
            out_channels: [116, 232, 464, 1024],
            num_blocks: [3, 7, 3],
            num_classes: 100,
        }
    }
}

impl ShuffleV2Config {
    /// RepDistiller's `ShuffleV2` (net size 1) with 100 classes.
    pub fn new() -> Self {
        Self::default()
    }

    /// One of RepDistiller's net sizes: 0.2, 0.3, 0.5, 1, 1.5 or 2.
    pub fn net_size(size: f64) -> Result<Self, ModelError> {
        let Some(&(_, out_channels, num_blocks)) = NET_SIZES.iter().find(|(s, ..)| *s == size)
        else {
            return Err(ModelError::InvalidConfig {
                family: "shufflenetv2",
                reason: format!("net size must be 0.2, 0.3, 0.5, 1, 1.5 or 2, got {size}"),
            });
        };
        Ok(ShuffleV2Config {
            out_channels,
            num_blocks,
            num_classes: 100,
        })
    }

    pub fn with_out_channels(mut self, out_channels: [i64; 4]) -> Self {
        self.out_channels = out_channels;
        self
    }

    pub fn with_num_blocks(mut self, num_blocks: [i64; 3]) -> Self {
        self.num_blocks = num_blocks;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<ShuffleNetV2, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "shufflenetv2",
            reason,
        };
        // Blocks split their input in halves and down blocks concatenate two
        // halves, so stage widths are even.
        let stages_even = self.out_channels[..3].iter().all(|&c| c >= 2 && c % 2 == 0);
        if !stages_even || self.out_channels[3] < 1 {
            return Err(invalid(format!(
                "stage widths must be even and positive, the head positive, got {:?}",
                self.out_channels
            )));
        }
        if self.num_blocks.iter().any(|&n| n < 1) {
            return Err(invalid(format!(
                "num_blocks must be positive, got {:?}",
                self.num_blocks
            )));
        }
        check_classes("shufflenetv2", self.num_classes)?;
        let mut c_in = STEM;
        let mut stages = Vec::with_capacity(3);
        for (s, (&c, &n)) in self.out_channels.iter().zip(&self.num_blocks).enumerate() {
            let sp = p / format!("layer{}", s + 1);
            let down = DownBlock::new(&(&sp / 0), c_in, c);
            let mut body: Vec<SplitBlock> =
                (1..=n).map(|i| SplitBlock::new(&(&sp / i), c)).collect();
            let last = body.pop().expect("num_blocks >= 1");
            stages.push(Stage { down, body, last });
            c_in = c;
        }
        let head = self.out_channels[3];
        Ok(ShuffleNetV2 {
            conv1: conv_grouped(p / "conv1", (3, STEM), 1, 1, 1, TORCH),
            bn1: bn(p / "bn1", STEM),
            stages,
            conv2: conv_grouped(p / "conv2", (c_in, head), 1, 1, 1, TORCH),
            bn2: bn(p / "bn2", head),
            linear: linear(p / "linear", head, self.num_classes, LinearInit::Torch),
        })
    }
}

/// Two strided branches, concatenated and shuffled: depthwise 3x3 then 1x1
/// (left); 1x1, depthwise 3x3, 1x1 (right).
#[derive(Debug)]
struct DownBlock {
    convs: [nn::Conv2D; 5],
    bns: [Bn; 5],
}

impl DownBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64) -> Self {
        let mid = c_out / 2;
        let c = |i: usize, chans: (i64, i64), k: i64, stride: i64, groups: i64| {
            conv_grouped(p / format!("conv{i}"), chans, k, stride, groups, TORCH)
        };
        let b = |i: usize, chans: i64| bn(p / format!("bn{i}"), chans);
        DownBlock {
            convs: [
                c(1, (c_in, c_in), 3, 2, c_in),
                c(2, (c_in, mid), 1, 1, 1),
                c(3, (c_in, mid), 1, 1, 1),
                c(4, (mid, mid), 3, 2, mid),
                c(5, (mid, mid), 1, 1, 1),
            ],
            bns: [b(1, c_in), b(2, mid), b(3, mid), b(4, mid), b(5, mid)],
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let layer = |i: usize, x: &Tensor| self.bns[i].forward_t(&self.convs[i].forward(x), train);
        let left = layer(1, &layer(0, x)).relu_();
        let right = layer(2, x).relu_();
        let right = layer(4, &layer(3, &right)).relu_();
        channel_shuffle(&Tensor::cat(&[left, right], 1), 2)
    }
}

/// Keeps the first half of the channels, runs 1x1, depthwise 3x3, 1x1 on the
/// second half, concatenates and shuffles.
#[derive(Debug)]
struct SplitBlock {
    half: i64,
    conv1: nn::Conv2D,
    bn1: Bn,
    conv2: nn::Conv2D,
    bn2: Bn,
    conv3: nn::Conv2D,
    bn3: Bn,
}

impl SplitBlock {
    fn new(p: &nn::Path, c: i64) -> Self {
        let half = c / 2;
        SplitBlock {
            half,
            conv1: conv_grouped(p / "conv1", (half, half), 1, 1, 1, TORCH),
            bn1: bn(p / "bn1", half),
            conv2: conv_grouped(p / "conv2", (half, half), 3, 1, half, TORCH),
            bn2: bn(p / "bn2", half),
            conv3: conv_grouped(p / "conv3", (half, half), 1, 1, 1, TORCH),
            bn3: bn(p / "bn3", half),
        }
    }

    /// (kept half, branch before its closing ReLU).
    fn branch(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let c = x.size()[1];
        let kept = x.narrow(1, 0, self.half);
        let mut h = self.bn1.forward_t(
            &self.conv1.forward(&x.narrow(1, self.half, c - self.half)),
            train,
        );
        let h = h.relu_();
        let h = self.bn2.forward_t(&self.conv2.forward(&h), train);
        (kept, self.bn3.forward_t(&self.conv3.forward(&h), train))
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (kept, mut pre) = self.branch(x, train);
        channel_shuffle(&Tensor::cat(&[kept, pre.relu_()], 1), 2)
    }
}

#[derive(Debug)]
struct Stage {
    down: DownBlock,
    body: Vec<SplitBlock>,
    last: SplitBlock,
}

impl Stage {
    /// (output, RepDistiller's preactivation of the last block: the kept half
    /// and the branch before its ReLU, concatenated but not shuffled).
    fn forward(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut x = self.down.forward(x, train);
        for block in &self.body {
            x = block.forward(&x, train);
        }
        let (kept, pre) = self.last.branch(&x, train);
        let out = channel_shuffle(&Tensor::cat(&[&kept, &pre.relu()], 1), 2);
        (out, Tensor::cat(&[kept, pre], 1))
    }
}

/// ShuffleNet V2.
///
/// Taps (32x32 input): `feat/0` = relu(bn1(conv1(x))) at 32 pixels, 24
/// channels, `preact/0` = bn1(conv1(x)); `feat/k` (k = 1..3) = output of
/// `layer{k}` at 16, 8 and 4 pixels; `preact/k` = RepDistiller's `f{k}_pre`:
/// the last block's kept half and its branch before the ReLU, concatenated
/// and not shuffled, so relu(preact/k) is `feat/k` before its channel
/// shuffle (the same values, channels in another order). `embed` = global
/// mean of relu(bn2(conv2(feat/3))), `logits` = linear(embed).
/// RepDistiller's preact list repeats the post-ReLU stem at index 0 where
/// this gives its BN output.
#[derive(Debug)]
pub struct ShuffleNetV2 {
    conv1: nn::Conv2D,
    bn1: Bn,
    stages: Vec<Stage>,
    conv2: nn::Conv2D,
    bn2: Bn,
    linear: nn::Linear,
}

impl Network for ShuffleNetV2 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let p0 = self.bn1.forward_t(&self.conv1.forward(xs), train);
        let mut feat = vec![p0.relu()];
        let mut preact = vec![p0];
        for stage in &self.stages {
            let (f, p) = stage.forward(&feat[feat.len() - 1], train);
            feat.push(f);
            preact.push(p);
        }
        let mut h = self
            .bn2
            .forward_t(&self.conv2.forward(&feat[feat.len() - 1]), train);
        let embed = global_pool(&h.relu_());
        let logits = self.linear.forward(&embed);
        Taps {
            feat,
            preact,
            embed,
            logits,
            extra: Vec::new(),
        }
    }
}
