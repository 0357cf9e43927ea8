//! timm's RandomErasing (`timm.data.random_erasing.RandomErasing`) on
//! normalised images, one sample at a time: with probability `prob`, up to
//! `max_count` boxes, each of an area share uniform in
//! `[min_area, max_area]` (divided by the count) and a log-uniform aspect
//! ratio, up to 10 tries for one that fits, filled with per-pixel normal
//! noise (`pixel`), one normal value per channel (`rand`) or zeros
//! (`const`). The draws are timm's, in its order, from a [`DrawSource`].

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::draw::DrawSource;

/// What an erased box is filled with (values of the normalised image).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseMode {
    /// Zeros (the data set's mean after normalisation).
    Const,
    /// One standard normal value per channel.
    Rand,
    /// A standard normal value per pixel and channel (timm's training
    /// script's default, `--remode pixel`).
    #[default]
    Pixel,
}

impl std::str::FromStr for EraseMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "const" => Ok(EraseMode::Const),
            "rand" => Ok(EraseMode::Rand),
            "pixel" => Ok(EraseMode::Pixel),
            other => Err(format!(
                "unknown random erasing mode `{other}`; valid: pixel, rand, const"
            )),
        }
    }
}

/// RandomErasing's parameters, with timm's defaults (`mode` that of its
/// training script).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomErasing {
    /// Probability that an image is erased at all (timm's `probability`).
    pub prob: f64,
    /// Bounds of an erased area's share of the image.
    pub min_area: f64,
    pub max_area: f64,
    /// Bounds of a box's aspect ratio (height / width), drawn
    /// log-uniformly; `max_aspect` defaults to `1 / min_aspect`.
    pub min_aspect: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_aspect: Option<f64>,
    pub mode: EraseMode,
    /// Boxes per erased image: uniform in `min_count..=max_count`
    /// (`max_count` defaults to `min_count`), each of the area share over
    /// the count.
    pub min_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u32>,
}

impl Default for RandomErasing {
    fn default() -> Self {
        RandomErasing {
            prob: 0.5,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
            max_aspect: None,
            mode: EraseMode::Pixel,
            min_count: 1,
            max_count: None,
        }
    }
}

/// One erased box of an image and what fills it.
#[derive(Debug, Clone, PartialEq)]
pub struct EraseBox {
    pub top: i64,
    pub left: i64,
    pub height: i64,
    pub width: i64,
    /// `C·height·width` values (`pixel`), `C` values (`rand`), or none
    /// (`const`: zeros).
    pub fill: Vec<f32>,
}

impl RandomErasing {
    fn max_count(&self) -> u32 {
        self.max_count.unwrap_or(self.min_count)
    }

    fn log_aspect(&self) -> (f64, f64) {
        let max = self.max_aspect.unwrap_or(1.0 / self.min_aspect);
        (self.min_aspect.ln(), max.ln())
    }

    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.prob) {
            return Err(format!(
                "random_erasing: prob must be in [0, 1], got {}",
                self.prob
            ));
        }
        if !(0.0 < self.min_area && self.min_area <= self.max_area && self.max_area <= 1.0) {
            return Err(format!(
                "random_erasing: areas must satisfy 0 < min_area <= max_area <= 1, got {} and {}",
                self.min_area, self.max_area
            ));
        }
        let max_aspect = self.max_aspect.unwrap_or(1.0 / self.min_aspect);
        if !(self.min_aspect.is_finite()
            && self.min_aspect > 0.0
            && max_aspect.is_finite()
            && max_aspect >= self.min_aspect)
        {
            return Err(format!(
                "random_erasing: aspect ratios must satisfy 0 < min_aspect <= max_aspect, got {} and {max_aspect}",
                self.min_aspect
            ));
        }
        if self.min_count == 0 || self.max_count() < self.min_count {
            return Err(format!(
                "random_erasing: counts must satisfy 1 <= min_count <= max_count, got {} and {}",
                self.min_count,
                self.max_count()
            ));
        }
        Ok(())
    }

    /// The boxes erased in one `c × h × w` image: timm's `_erase`, call for
    /// call (a box that does not fit after 10 tries is left out).
    pub fn draw(&self, src: &mut impl DrawSource, c: i64, h: i64, w: i64) -> Vec<EraseBox> {
        let mut boxes = Vec::new();
        // timm erases unless `random() > probability`.
        if src.uniform() > self.prob {
            return boxes;
        }
        let area = (h * w) as f64;
        let (min_count, max_count) = (self.min_count as i64, self.max_count() as i64);
        let count = if min_count == max_count {
            min_count
        } else {
            src.integer(min_count, max_count)
        };
        let (log_lo, log_hi) = self.log_aspect();
        for _ in 0..count {
            for _attempt in 0..10 {
                let target_area =
                    src.uniform_in(self.min_area, self.max_area) * area / count as f64;
                let aspect = src.uniform_in(log_lo, log_hi).exp();
                // Python's round: halves to even.
                let bh = (target_area * aspect).sqrt().round_ties_even() as i64;
                let bw = (target_area / aspect).sqrt().round_ties_even() as i64;
                if bw < w && bh < h {
                    let top = src.integer(0, h - bh);
                    let left = src.integer(0, w - bw);
                    let fill = match self.mode {
                        EraseMode::Pixel => src.normals((c * bh * bw) as usize),
                        EraseMode::Rand => src.normals(c as usize),
                        EraseMode::Const => Vec::new(),
                    };
                    boxes.push(EraseBox {
                        top,
                        left,
                        height: bh,
                        width: bw,
                        fill,
                    });
                    break;
                }
            }
        }
        boxes
    }
}

/// Erases `boxes` in `image` (`[C, H, W]`, float), in place and in order
/// (a later box overwrites an earlier one where they overlap).
pub fn erase(image: &Tensor, boxes: &[EraseBox]) {
    let (c, dev, kind) = (image.size()[0], image.device(), image.kind());
    for b in boxes {
        let mut window = image.narrow(1, b.top, b.height).narrow(2, b.left, b.width);
        if b.fill.is_empty() {
            let _ = window.fill_(0.0);
            continue;
        }
        let shape: [i64; 3] = if b.fill.len() as i64 == c {
            [c, 1, 1]
        } else {
            [c, b.height, b.width]
        };
        let fill = Tensor::from_slice(&b.fill)
            .view(shape)
            .to_device(dev)
            .to_kind(kind);
        window.copy_(&fill);
    }
}
