//! timm's Mixup/CutMix (`timm.data.Mixup`, mode `batch`) on a normalised
//! batch: one λ per batch, the batch mixed with itself reversed
//! (`x.flip(0)`), and the labels as the distributions
//! `λ·onehot(y) + (1-λ)·onehot(y.flip(0))`, unsmoothed: label smoothing is
//! the loss's (`StepIo::label_distribution`), so it is applied once.
//!
//! The draws are timm's, in its order, from a [`DrawSource`]: apply the mix
//! (`rand() < prob`), CutMix or Mixup (`rand() < switch_prob` when both are
//! on), λ from Beta(α, α), and for CutMix the box (`randint` of its centre,
//! or of its size and corner with `cutmix_minmax`), λ then corrected to
//! the box's clipped area (`correct_lam`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::draw::DrawSource;

/// How mixing parameters are applied. timm also has `pair` and `elem`
/// (per-sample λ); kd mixes per batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixMode {
    /// One λ, one choice of Mixup or CutMix, one box for the whole batch.
    #[default]
    Batch,
}

/// Mixup/CutMix with timm's parameters and defaults (`timm.data.Mixup`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mixup {
    /// Mixup's Beta(α, α); Mixup is on when above 0.
    pub mixup_alpha: f64,
    /// CutMix's Beta(α, α); CutMix is on when above 0.
    pub cutmix_alpha: f64,
    /// CutMix boxes with sides drawn uniformly in `[min, max]` of the image's
    /// instead of from λ (darknet's); turns CutMix on with α = 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutmix_minmax: Option<[f64; 2]>,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// Probability of CutMix rather than Mixup when both are on.
    pub switch_prob: f64,
    pub mode: MixMode,
    /// λ of a CutMix batch from the box's area after clipping at the
    /// image's borders (the box's actual share), not the drawn λ.
    pub correct_lam: bool,
}

impl Default for Mixup {
    fn default() -> Self {
        Mixup {
            mixup_alpha: 1.0,
            cutmix_alpha: 0.0,
            cutmix_minmax: None,
            prob: 1.0,
            switch_prob: 0.5,
            mode: MixMode::Batch,
            correct_lam: true,
        }
    }
}

/// One batch's draw: whether and how it is mixed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MixDraw {
    /// Left as it is (λ = 1): the probability missed, or Beta drew 1.
    Unmixed,
    /// `λ·x + (1-λ)·x.flip(0)`.
    Mixup { lam: f64 },
    /// Rows `yl..yh`, columns `xl..xh` of every image taken from the
    /// reversed batch; `lam` the share of each image left as it was.
    Cutmix {
        lam: f64,
        yl: i64,
        yh: i64,
        xl: i64,
        xh: i64,
    },
}

impl MixDraw {
    /// The weight of each sample's own image and label.
    pub fn lam(&self) -> f64 {
        match *self {
            MixDraw::Unmixed => 1.0,
            MixDraw::Mixup { lam } | MixDraw::Cutmix { lam, .. } => lam,
        }
    }
}

impl Mixup {
    /// CutMix's α, which `cutmix_minmax` sets to 1 as timm does.
    fn cutmix_alpha(&self) -> f64 {
        if self.cutmix_minmax.is_some() {
            1.0
        } else {
            self.cutmix_alpha
        }
    }

    /// Refuses settings timm would assert on or numpy would reject, for
    /// images of `h × w` pixels.
    pub fn check(&self, h: i64, w: i64) -> Result<(), String> {
        for (name, a) in [
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            if !(a.is_finite() && a >= 0.0) {
                return Err(format!(
                    "mixup: {name} must be a finite number >= 0, got {a}"
                ));
            }
        }
        for (name, p) in [("prob", self.prob), ("switch_prob", self.switch_prob)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("mixup: {name} must be in [0, 1], got {p}"));
            }
        }
        if self.mixup_alpha == 0.0 && self.cutmix_alpha() == 0.0 {
            return Err(
                "mixup: nothing to mix; set mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax"
                    .into(),
            );
        }
        if let Some([lo, hi]) = self.cutmix_minmax {
            if !(0.0 < lo && lo < hi && hi <= 1.0) {
                return Err(format!(
                    "mixup: cutmix_minmax must be [min, max] with 0 < min < max <= 1, got [{lo}, {hi}]"
                ));
            }
            for (side, what) in [(h, "height"), (w, "width")] {
                let (a, b) = ((side as f64 * lo) as i64, (side as f64 * hi) as i64);
                if a >= b {
                    return Err(format!(
                        "mixup: cutmix_minmax [{lo}, {hi}] leaves no box size for the {what} of {side} pixels (int({side}·{lo}) = {a} must be below int({side}·{hi}) = {b})"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The draw of a batch of `h × w` images: timm's `_params_per_batch`
    /// then `cutmix_bbox_and_lam`, call for call.
    pub fn draw(&self, src: &mut impl DrawSource, h: i64, w: i64) -> MixDraw {
        if src.uniform() >= self.prob {
            return MixDraw::Unmixed;
        }
        let cut_alpha = self.cutmix_alpha();
        let (cutmix, lam) = if self.mixup_alpha > 0.0 && cut_alpha > 0.0 {
            let cutmix = src.uniform() < self.switch_prob;
            let a = if cutmix { cut_alpha } else { self.mixup_alpha };
            (cutmix, src.beta(a))
        } else if self.mixup_alpha > 0.0 {
            (false, src.beta(self.mixup_alpha))
        } else {
            (true, src.beta(cut_alpha))
        };
        if lam == 1.0 {
            return MixDraw::Unmixed;
        }
        if !cutmix {
            return MixDraw::Mixup { lam };
        }
        let (yl, yh, xl, xh) = match self.cutmix_minmax {
            Some([lo, hi]) => {
                // rand_bbox_minmax: numpy's randint excludes its upper bound.
                let span = |side: i64| (side as f64 * lo) as i64..(side as f64 * hi) as i64;
                let (sh, sw) = (span(h), span(w));
                let cut_h = src.integer(sh.start, sh.end - 1);
                let cut_w = src.integer(sw.start, sw.end - 1);
                let yl = src.integer(0, h - cut_h);
                let xl = src.integer(0, w - cut_w);
                (yl, yl + cut_h, xl, xl + cut_w)
            }
            None => {
                // rand_bbox: a box of λ's complement's side ratio around a
                // uniform centre, clipped at the borders.
                let ratio = (1.0 - lam).sqrt();
                let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
                let cy = src.integer(0, h - 1);
                let cx = src.integer(0, w - 1);
                (
                    (cy - cut_h / 2).clamp(0, h),
                    (cy + (cut_h + 1) / 2).clamp(0, h),
                    (cx - cut_w / 2).clamp(0, w),
                    (cx + (cut_w + 1) / 2).clamp(0, w),
                )
            }
        };
        let lam = if self.correct_lam || self.cutmix_minmax.is_some() {
            1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64
        } else {
            lam
        };
        MixDraw::Cutmix {
            lam,
            yl,
            yh,
            xl,
            xh,
        }
    }
}

/// The batch `images` (`[B, C, H, W]`, float) mixed as `draw` says, and the
/// mixed label distributions `[B, classes]` (float32) of `labels`: timm's
/// `_mix_batch` and `mixup_target` without smoothing, the same tensor
/// operations (an unmixed batch's rows are its one-hot labels).
pub fn mix_batch(
    images: &Tensor,
    labels: &Tensor,
    classes: i64,
    draw: &MixDraw,
) -> (Tensor, Tensor) {
    let lam = draw.lam();
    let mixed = match *draw {
        MixDraw::Unmixed => images.shallow_clone(),
        MixDraw::Mixup { lam } => images * lam + images.flip([0]) * (1.0 - lam),
        MixDraw::Cutmix { yl, yh, xl, xh, .. } => {
            let out = images.copy();
            let window = |t: &Tensor| t.narrow(2, yl, yh - yl).narrow(3, xl, xh - xl);
            window(&out).copy_(&window(&images.flip([0])));
            out
        }
    };
    let y1 = labels.one_hot(classes).to_kind(Kind::Float);
    let target = &y1 * lam + y1.flip([0]) * (1.0 - lam);
    (mixed, target)
}
