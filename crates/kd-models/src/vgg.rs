//! VGG with BatchNorm for CIFAR (RepDistiller `models/vgg.py`, the `*_bn`
//! variants its `model_dict` uses under the plain names).
//!
//! Parameter names: `block{0..4}.{3j}` (conv j of the block, with bias),
//! `block{0..4}.{3j+1}` (its BN), `classifier`. The index gaps are the ReLUs
//! of PyTorch's `nn.Sequential`.

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module};

use crate::layers::{ConvBn, LinearInit, bn, conv, global_pool, linear};
use crate::{ModelError, Network, check_classes};

/// Conv widths of the five blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct VggConfig {
    pub cfg: Vec<Vec<i64>>,
    pub num_classes: i64,
}

impl VggConfig {
    /// vgg8 (cfg S), vgg11 (A), vgg13 (B), vgg16 (D) or vgg19 (E), 100 classes.
    pub fn new(depth: i64) -> Result<Self, ModelError> {
        let (b2, b3) = match depth {
            8 => (1, 1),
            11 => (2, 2),
            13 => (2, 2),
            16 => (3, 3),
            19 => (4, 4),
            _ => {
                return Err(ModelError::InvalidConfig {
                    family: "vgg",
                    reason: format!("depth must be 8, 11, 13, 16 or 19, got {depth}"),
                });
            }
        };
        // vgg8 and vgg11 have one conv in the first two blocks, the rest two.
        let b0 = if depth <= 11 { 1 } else { 2 };
        let widths = [(64, b0), (128, b0), (256, b2), (512, b3), (512, b3)];
        let cfg = widths.iter().map(|&(w, n)| vec![w; n]).collect();
        Ok(VggConfig {
            cfg,
            num_classes: 100,
        })
    }

    pub fn with_cfg(mut self, cfg: Vec<Vec<i64>>) -> Self {
        self.cfg = cfg;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn init(&self, p: &nn::Path) -> Result<Vgg, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "vgg",
            reason,
        };
        if self.cfg.len() != 5 || self.cfg.iter().any(Vec::is_empty) {
            return Err(invalid(format!(
                "cfg must have 5 non-empty blocks, got {:?}",
                self.cfg
            )));
        }
        if self.cfg.iter().flatten().any(|&w| w < 1) {
            return Err(invalid(format!(
                "widths must be positive, got {:?}",
                self.cfg
            )));
        }
        check_classes("vgg", self.num_classes)?;
        let mut c_in = 3;
        let mut blocks = Vec::with_capacity(5);
        for (i, widths) in self.cfg.iter().enumerate() {
            let bp = p / format!("block{i}");
            let mut layers = Vec::with_capacity(widths.len());
            for (j, &w) in widths.iter().enumerate() {
                let j = 3 * j as i64;
                let c = conv(&bp / j, c_in, w, 3, 1, true);
                layers.push(ConvBn::new(c, bn(&bp / (j + 1), w), 1, 1));
                c_in = w;
            }
            blocks.push(Block { layers });
        }
        // RepDistiller hardcodes 512 inputs, the last width of every cfg.
        let classifier = linear(
            p / "classifier",
            c_in,
            self.num_classes,
            LinearInit::Normal(0.01),
        );
        Ok(Vgg { blocks, classifier })
    }
}

#[derive(Debug)]
struct Block {
    layers: Vec<ConvBn>,
}

impl Block {
    /// Conv-BN pairs with ReLUs between them but not after the last: the
    /// block's output is its stage's preactivation.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.relu_();
            }
            x = layer.forward_t(&x, train);
        }
        x
    }
}

fn max_pool(x: &Tensor) -> Tensor {
    x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
}

/// A VGG with BatchNorm.
///
/// Taps: `feat/k` (k = 0..4) = relu(block{k}(..)) and `preact/k` the block
/// output before that ReLU, RepDistiller's lists except that its preact list
/// repeats the post-ReLU `feat/0` at index 0. Blocks 1, 2 and 3 read the
/// 2x2 max-pooled previous feature; block 4 reads `feat/3` unpooled unless
/// the input is 64 pixels high, as in RepDistiller, so on 32x32 inputs the
/// maps are 32, 16, 8, 4, 4 pixels. `embed` = global mean of `feat/4`,
/// `logits` = classifier(embed).
#[derive(Debug)]
pub struct Vgg {
    blocks: Vec<Block>,
    classifier: nn::Linear,
}

impl Network for Vgg {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let pool_before_last = xs.size().get(2) == Some(&64);
        let mut feat: Vec<Tensor> = Vec::with_capacity(self.blocks.len());
        let mut preact: Vec<Tensor> = Vec::with_capacity(self.blocks.len());
        for (k, block) in self.blocks.iter().enumerate() {
            let input = match feat.last() {
                None => xs.shallow_clone(),
                Some(prev) if k < 4 || pool_before_last => max_pool(prev),
                Some(prev) => prev.shallow_clone(),
            };
            let pre = block.forward(&input, train);
            feat.push(pre.relu());
            preact.push(pre);
        }
        // `init` guarantees five blocks, so `feat` is never empty.
        let embed = global_pool(feat.last().unwrap_or(xs));
        let logits = self.classifier.forward(&embed);
        Taps {
            feat,
            preact,
            embed,
            logits,
            extra: Vec::new(),
        }
    }

    fn fold_batchnorm(&mut self, on: bool) {
        for layer in self.blocks.iter_mut().flat_map(|b| b.layers.iter_mut()) {
            layer.fold(on);
        }
    }
}
