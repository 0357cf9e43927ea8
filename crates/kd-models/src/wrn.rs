//! Wide ResNets, pre-activation blocks (RepDistiller `models/wrn.py`).
//!
//! Parameter names: `conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2}`,
//! `block{s}.layer.0.convShortcut` where a block changes width, the final
//! `bn1`, `fc`.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use crate::layers::{Bn, ConvBn, LinearInit, bn, conv, global_pool, linear};
use crate::{ModelError, Network, check_classes};

/// Depth `6n+4` (n blocks per stage); stage widths are 16, 32, 64 times
/// `widen_factor`, after a 16-channel stem.
#[derive(Debug, Clone, PartialEq)]
pub struct WrnConfig {
    pub depth: i64,
    pub widen_factor: i64,
    pub num_classes: i64,
}

impl WrnConfig {
    /// `wrn_<depth>_<widen>` with 100 classes.
    pub fn new(depth: i64, widen_factor: i64) -> Self {
        WrnConfig {
            depth,
            widen_factor,
            num_classes: 100,
        }
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<WideResNet, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "wrn",
            reason,
        };
        if self.depth < 10 || (self.depth - 4) % 6 != 0 {
            return Err(invalid(format!(
                "depth must be 6n+4 with n >= 1, got {}",
                self.depth
            )));
        }
        if self.widen_factor < 1 {
            return Err(invalid(format!(
                "widen_factor must be positive, got {}",
                self.widen_factor
            )));
        }
        check_classes("wrn", self.num_classes)?;
        let n = (self.depth - 4) / 6;
        let w = self.widen_factor;
        let c = [16, 16 * w, 32 * w, 64 * w];
        Ok(WideResNet {
            conv1: conv(p / "conv1", 3, c[0], 3, 1, false),
            block1: Stage::new(&(p / "block1" / "layer"), n, c[0], c[1], 1),
            block2: Stage::new(&(p / "block2" / "layer"), n, c[1], c[2], 2),
            block3: Stage::new(&(p / "block3" / "layer"), n, c[2], c[3], 2),
            bn1: bn(p / "bn1", c[3]),
            fc: linear(p / "fc", c[3], self.num_classes, LinearInit::ZeroBias),
        })
    }
}

#[derive(Debug)]
struct WideBlock {
    bn1: Bn,
    /// `conv1`, then `bn2`, which reads it (pre-activation blocks: `bn1`
    /// reads the block input, which no convolution of this block makes).
    mid: ConvBn,
    conv2: nn::Conv2D,
    /// Present exactly when the block changes width, as in RepDistiller
    /// (the zoo never strides a block without also widening it).
    shortcut: Option<nn::Conv2D>,
}

impl WideBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        WideBlock {
            bn1: bn(p / "bn1", c_in),
            mid: ConvBn::new(
                conv(p / "conv1", c_in, c_out, 3, stride, false),
                bn(p / "bn2", c_out),
                stride,
                1,
            ),
            conv2: conv(p / "conv2", c_out, c_out, 3, 1, false),
            shortcut: (c_in != c_out)
                .then(|| conv(p / "convShortcut", c_in, c_out, 1, stride, false)),
        }
    }

    /// The block given its input `x` and `act` = relu(bn1(x)). A widening
    /// block takes its shortcut from `act`, an identity block from `x`.
    fn finish(&self, x: &Tensor, act: &Tensor, train: bool) -> Tensor {
        let mut h = self.mid.forward_t(act, train);
        let h = h.relu_();
        let mut out = self.conv2.forward(&h);
        match &self.shortcut {
            Some(c) => out += c.forward(act),
            None => out += x,
        }
        out
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut pre = self.bn1.forward_t(x, train);
        let act = pre.relu_();
        self.finish(x, &act, train)
    }
}

#[derive(Debug)]
struct Stage {
    first: WideBlock,
    rest: Vec<WideBlock>,
}

impl Stage {
    fn new(p: &nn::Path, n: i64, c_in: i64, c_out: i64, stride: i64) -> Self {
        Stage {
            first: WideBlock::new(&(p / 0), c_in, c_out, stride),
            rest: (1..n)
                .map(|i| WideBlock::new(&(p / i), c_out, c_out, 1))
                .collect(),
        }
    }

    fn fold(&mut self, on: bool) {
        self.first.mid.fold(on);
        self.rest.iter_mut().for_each(|b| b.mid.fold(on));
    }

    fn run_rest(&self, mut x: Tensor, train: bool) -> Tensor {
        for block in &self.rest {
            x = block.forward(&x, train);
        }
        x
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.run_rest(self.first.forward(x, train), train)
    }

    /// Also returns the first block's bn1(x): the preactivation of the
    /// previous stage's output, which no layer of that stage computes.
    fn forward_with_input_preact(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let pre = self.first.bn1.forward_t(x, train);
        let act = pre.relu();
        let out = self.first.finish(x, &act, train);
        (self.run_rest(out, train), pre)
    }
}

/// A Wide ResNet.
///
/// Pre-activation blocks leave each stage's output without an activation;
/// the BN+ReLU that follows belongs to the next stage's first block (or the
/// final `bn1`). Taps follow RepDistiller's `is_feat` lists: `feat/0` =
/// conv1(x) (the stem has no BN or ReLU, so `preact/0` is the same tensor);
/// `feat/k` (k = 1..3) = output of `block{k}`, the raw residual sum;
/// `preact/1` = block2.layer.0.bn1(feat/1), `preact/2` =
/// block3.layer.0.bn1(feat/2), `preact/3` = bn1(feat/3), i.e. the point just
/// before the ReLU that consumes stage k, so relu(preact/k) != feat/k here.
/// `embed` = global mean of relu(bn1(feat/3)); `logits` = fc(embed).
/// Unlike RepDistiller, whose `preact=True` applies those BNs a second time
/// (updating running statistics twice in training), each BN runs once.
#[derive(Debug)]
pub struct WideResNet {
    conv1: nn::Conv2D,
    block1: Stage,
    block2: Stage,
    block3: Stage,
    bn1: Bn,
    fc: nn::Linear,
}

impl Network for WideResNet {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let f0 = self.conv1.forward(xs);
        let f1 = self.block1.forward(&f0, train);
        let (f2, p1) = self.block2.forward_with_input_preact(&f1, train);
        let (f3, p2) = self.block3.forward_with_input_preact(&f2, train);
        let p3 = self.bn1.forward_t(&f3, train);
        let embed = global_pool(&p3.relu());
        let logits = self.fc.forward(&embed);
        let p0 = f0.shallow_clone();
        Taps {
            feat: vec![f0, f1, f2, f3],
            preact: vec![p0, p1, p2, p3],
            embed,
            logits,
            extra: Vec::new(),
        }
    }

    fn fold_batchnorm(&mut self, on: bool) {
        for stage in [&mut self.block1, &mut self.block2, &mut self.block3] {
            stage.fold(on);
        }
    }
}
