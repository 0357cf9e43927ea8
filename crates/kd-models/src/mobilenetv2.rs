//! MobileNetV2 for CIFAR (RepDistiller `models/mobilenetv2.py`, after
//! "Knowledge Distillation via Route Constrained Optimization"): `mobile_half`
//! is expansion 6 at width 0.5, `mobile_full` expansion 6 at width 1.
//!
//! Parameter names: `conv1.{0,1}` (stem conv and BN), `blocks.{s}.{i}.conv.{0,1,3,4,6,7}`
//! (expansion conv, BN, depthwise conv, BN, projection conv, BN; the index
//! gaps are the ReLUs of PyTorch's `nn.Sequential`), `conv2.{0,1}` (the
//! 1x1 head), `classifier.0` (a Linear inside a Sequential).

use kd_core::Taps;
use tch::Tensor;
use tch::nn::{self, Module, ModuleT};

use crate::layers::{Bn, ConvInit, LinearInit, bn, conv_grouped, global_pool, linear};
use crate::{ModelError, Network, check_classes};

/// RepDistiller's `interverted_residual_setting`: (expands, channels, blocks,
/// stride). The first stage expands by 1, every other by the expansion T.
const SETTING: [(bool, i64, i64, i64); 7] = [
    (false, 16, 1, 1),
    (true, 24, 2, 1),
    (true, 32, 3, 2),
    (true, 64, 4, 2),
    (true, 96, 3, 1),
    (true, 160, 3, 2),
    (true, 320, 1, 1),
];

/// The stages whose outputs are the taps `feat/1..4` (RepDistiller's f1..f4).
const TAPPED: [usize; 4] = [1, 2, 4, 6];

/// Expansion ratio T of the inverted residuals and width multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV2Config {
    pub expansion: i64,
    pub width_mult: f64,
    pub num_classes: i64,
}

impl MobileNetV2Config {
    /// `mobilenetv2_T_w(T, W)` with 100 classes: `mobile_half` is `new(6, 0.5)`.
    pub fn new(expansion: i64, width_mult: f64) -> Self {
        MobileNetV2Config {
            expansion,
            width_mult,
            num_classes: 100,
        }
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// `int(c * width_mult)`, as Python truncates it.
    fn width(&self, c: i64) -> i64 {
        (c as f64 * self.width_mult) as i64
    }

    pub fn init(&self, p: &nn::Path) -> Result<MobileNetV2, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            family: "mobilenetv2",
            reason,
        };
        if self.expansion < 1 {
            return Err(invalid(format!(
                "expansion must be at least 1, got {}",
                self.expansion
            )));
        }
        // The narrowest layer is the first stage's 16 channels.
        if !(self.width_mult.is_finite() && self.width(16) >= 1) {
            return Err(invalid(format!(
                "width_mult must give every layer a channel (at least 1/16), got {}",
                self.width_mult
            )));
        }
        check_classes("mobilenetv2", self.num_classes)?;

        let mut c_in = self.width(32);
        let stem = (
            conv_grouped(p / "conv1" / "0", (3, c_in), 3, 2, 1, ConvInit::HeFanOut),
            bn(p / "conv1" / "1", c_in),
        );
        let mut stages = Vec::with_capacity(SETTING.len());
        for (s, &(expands, c, n, stride)) in SETTING.iter().enumerate() {
            let c_out = self.width(c);
            let t = if expands { self.expansion } else { 1 };
            let sp = p / "blocks" / s as i64;
            let blocks = (0..n)
                .map(|i| {
                    let b = InvertedResidual::new(
                        &(&sp / i),
                        c_in,
                        c_out,
                        if i == 0 { stride } else { 1 },
                        t,
                    );
                    c_in = c_out;
                    b
                })
                .collect();
            stages.push(blocks);
        }
        // RepDistiller widens the head only above width 1.
        let last = if self.width_mult > 1.0 {
            self.width(1280)
        } else {
            1280
        };
        let head = (
            conv_grouped(p / "conv2" / "0", (c_in, last), 1, 1, 1, ConvInit::HeFanOut),
            bn(p / "conv2" / "1", last),
        );
        let classifier = linear(
            p / "classifier" / "0",
            last,
            self.num_classes,
            LinearInit::Normal(0.01),
        );
        Ok(MobileNetV2 {
            stem,
            stages,
            head,
            classifier,
        })
    }
}

/// Expansion 1x1, depthwise 3x3, linear projection 1x1; a residual sum where
/// the block keeps stride and width.
#[derive(Debug)]
struct InvertedResidual {
    expand: (nn::Conv2D, Bn),
    depthwise: (nn::Conv2D, Bn),
    project: (nn::Conv2D, Bn),
    residual: bool,
}

impl InvertedResidual {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64, t: i64) -> Self {
        let hidden = c_in * t;
        let c = p / "conv";
        let he = ConvInit::HeFanOut;
        InvertedResidual {
            expand: (
                conv_grouped(&c / "0", (c_in, hidden), 1, 1, 1, he),
                bn(&c / "1", hidden),
            ),
            depthwise: (
                conv_grouped(&c / "3", (hidden, hidden), 3, stride, hidden, he),
                bn(&c / "4", hidden),
            ),
            project: (
                conv_grouped(&c / "6", (hidden, c_out), 1, 1, 1, he),
                bn(&c / "7", c_out),
            ),
            residual: stride == 1 && c_in == c_out,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.expand.1.forward_t(&self.expand.0.forward(x), train);
        let h = h.relu_();
        let mut h = self
            .depthwise
            .1
            .forward_t(&self.depthwise.0.forward(&h), train);
        let h = h.relu_();
        let mut out = self.project.1.forward_t(&self.project.0.forward(&h), train);
        if self.residual {
            out += x;
        }
        out
    }
}

/// MobileNetV2.
///
/// Taps (32x32 input): `feat/0` = the stem conv1 (stride 2, BN, ReLU) at 16
/// pixels, `preact/0` its BN output; `feat/k` (k = 1..4) = output of
/// `blocks[1]`, `blocks[2]`, `blocks[4]` and `blocks[6]`, at 16, 8, 4 and 2
/// pixels (RepDistiller's f1..f4). Inverted residuals end in a
/// linear projection (no ReLU), so `preact/k` = `feat/k` for k >= 1: the
/// tensors RepDistiller returns for `preact=True` too, and the outputs of the
/// BNs its `get_bn_before_relu` names (plus the residual). `embed` = global
/// mean of relu(conv2(feat/4)) (1280 channels), `logits` = classifier(embed).
/// RepDistiller's preact list repeats the post-ReLU stem at index 0 where
/// this gives its BN output, as for the other families.
#[derive(Debug)]
pub struct MobileNetV2 {
    stem: (nn::Conv2D, Bn),
    stages: Vec<Vec<InvertedResidual>>,
    head: (nn::Conv2D, Bn),
    classifier: nn::Linear,
}

impl Network for MobileNetV2 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let p0 = self.stem.1.forward_t(&self.stem.0.forward(xs), train);
        let mut x = p0.relu();
        let mut feat = vec![x.shallow_clone()];
        let mut preact = vec![p0];
        for (s, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x, train);
            }
            if TAPPED.contains(&s) {
                feat.push(x.shallow_clone());
                preact.push(x.shallow_clone());
            }
        }
        let mut h = self.head.1.forward_t(&self.head.0.forward(&x), train);
        let embed = global_pool(&h.relu_());
        let logits = self.classifier.forward(&embed);
        Taps {
            feat,
            preact,
            embed,
            logits,
            extra: Vec::new(),
        }
    }
}
