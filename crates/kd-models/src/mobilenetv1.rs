//! MobileNetV1 for ImageNet as mdistiller has it
//! (`mdistiller/models/imagenet/mobilenetv1.py`, zoo name `MobileNetV1`): a
//! 3x3 stride-2 stem, then 13 depthwise-separable layers (depthwise 3x3 with
//! BN and ReLU, pointwise 1x1 with BN and ReLU), a global mean and `fc`.
//!
//! Parameter names follow mdistiller's `nn.Sequential` `model`: `model.0.{0,1}`
//! (stem conv and BN), `model.{1..13}.{0,1,3,4}` (depthwise conv, BN,
//! pointwise conv, BN; the gaps are the ReLUs), `fc`. mdistiller pools with
//! `model.14` = `AvgPool2d(7)`, the global mean at 224 pixels; this pools
//! adaptively, so any input of at least 32 pixels runs. mdistiller leaves
//! every layer as PyTorch initialises it (convolutions and `fc`
//! kaiming_uniform_(a=sqrt(5)), BN weight 1 bias 0), and so does this.

use kd_core::Taps;
use tch::Tensor;
use tch::nn;

use crate::layers::{
    ConvBn, ConvInit, LinearInit, PreactBlock, Stage, bn, conv_grouped, linear, staged_taps,
};
use crate::{ModelError, Network, check_classes};

/// Stem width and stride.
const STEM: (i64, i64) = (32, 2);

/// Output width and stride of `model.1` .. `model.13`.
const LAYERS: [(i64, i64); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

/// The last `model` index of each stage: the layers whose outputs are the
/// taps `feat/1..4` (mdistiller's feat1..feat4).
const STAGE_ENDS: [usize; 4] = [3, 5, 11, 13];

/// Width multiplier (1 is mdistiller's net; the MobileNet paper's alpha,
/// `int(c * width_mult)` channels per layer) and number of classes.
#[derive(Debug, Clone, PartialEq)]
pub struct MobileNetV1Config {
    pub width_mult: f64,
    pub num_classes: i64,
}

impl Default for MobileNetV1Config {
    fn default() -> Self {
        Self::new()
    }
}

impl MobileNetV1Config {
    /// mdistiller's `MobileNetV1()`: width 1, 1000 classes.
    pub fn new() -> Self {
        MobileNetV1Config {
            width_mult: 1.0,
            num_classes: 1000,
        }
    }

    pub fn with_width_mult(mut self, width_mult: f64) -> Self {
        self.width_mult = width_mult;
        self
    }

    pub fn with_num_classes(mut self, num_classes: i64) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// `int(c * width_mult)`, as Python truncates it.
    fn width(&self, c: i64) -> i64 {
        (c as f64 * self.width_mult) as i64
    }

    pub fn init(&self, p: &nn::Path) -> Result<MobileNetV1, ModelError> {
        // The narrowest layer is the stem's 32 channels.
        if !(self.width_mult.is_finite() && self.width(STEM.0) >= 1) {
            return Err(ModelError::InvalidConfig {
                family: "mobilenetv1",
                reason: format!(
                    "width_mult must give every layer a channel (at least 1/32), got {}",
                    self.width_mult
                ),
            });
        }
        check_classes("mobilenetv1", self.num_classes)?;
        let m = p / "model";
        let torch = ConvInit::Torch;
        let mut c_in = self.width(STEM.0);
        let stem = ConvBn::new(
            conv_grouped(&m / "0" / "0", (3, c_in), 3, STEM.1, 1, torch),
            bn(&m / "0" / "1", c_in),
            STEM.1,
            1,
        );
        let mut stages = Vec::with_capacity(STAGE_ENDS.len());
        let mut body = Vec::new();
        for (i, &(c, stride)) in LAYERS.iter().enumerate() {
            let k = i + 1;
            let c_out = self.width(c);
            let layer = Separable::new(&(&m / k as i64), c_in, c_out, stride);
            c_in = c_out;
            if STAGE_ENDS.contains(&k) {
                stages.push(Stage {
                    body: std::mem::take(&mut body),
                    last: layer,
                });
            } else {
                body.push(layer);
            }
        }
        let fc = linear(p / "fc", c_in, self.num_classes, LinearInit::Torch);
        Ok(MobileNetV1 { stem, stages, fc })
    }
}

/// mdistiller's `conv_dw`: depthwise 3x3 (`0`, `1`), ReLU, pointwise 1x1
/// (`3`, `4`), ReLU.
#[derive(Debug)]
struct Separable {
    depthwise: ConvBn,
    pointwise: ConvBn,
}

impl Separable {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let torch = ConvInit::Torch;
        Separable {
            depthwise: ConvBn::new(
                conv_grouped(p / "0", (c_in, c_in), 3, stride, c_in, torch),
                bn(p / "1", c_in),
                stride,
                c_in,
            ),
            pointwise: ConvBn::new(
                conv_grouped(p / "3", (c_in, c_out), 1, 1, 1, torch),
                bn(p / "4", c_out),
                1,
                1,
            ),
        }
    }
}

impl PreactBlock for Separable {
    /// The pointwise BN's output, before the closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = self.depthwise.forward_t(x, train);
        self.pointwise.forward_t(&h.relu_(), train)
    }

    fn fold(&mut self, on: bool) {
        self.depthwise.fold(on);
        self.pointwise.fold(on);
    }
}

/// mdistiller's ImageNet MobileNetV1.
///
/// Taps (224x224 input; 32x32 in brackets): `feat/0` = the stem `model.0`
/// (stride 2, BN, ReLU) at 112 (16) pixels with 32 channels, `preact/0` its
/// BN output; `feat/k` (k = 1..4) = output of `model.3`, `model.5`,
/// `model.11` and `model.13` at 56, 28, 14, 7 (8, 4, 2, 1) pixels with 128,
/// 256, 512, 1024 channels (mdistiller's `feats`), `preact/k` the same
/// before their closing ReLU (its `preact_feats`, the outputs of the BNs its
/// `get_bn_before_relu` names); `embed` = global mean of `feat/4`
/// (`pooled_feat`), `logits` = fc(embed). mdistiller lists no stem tap; the
/// stages are its four.
#[derive(Debug)]
pub struct MobileNetV1 {
    /// `model.0`.
    stem: ConvBn,
    /// `model.1..=3`, `model.4..=5`, `model.6..=11`, `model.12..=13`.
    stages: Vec<Stage<Separable>>,
    fc: nn::Linear,
}

impl Network for MobileNetV1 {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let stem = self.stem.forward_t(xs, train);
        staged_taps(stem, &self.stages, &self.fc, train)
    }

    fn fold_batchnorm(&mut self, on: bool) {
        self.stem.fold(on);
        self.stages.iter_mut().for_each(|s| s.fold(on));
    }
}
