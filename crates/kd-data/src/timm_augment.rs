//! timm's RandAugment as the primary training augmentation
//! (`rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)` in
//! `timm/data/auto_augment.py`, which DeiT's and OFA-KD's ViT recipes run
//! after the random crop and flip): `n` ops drawn uniformly with
//! replacement from timm's 15 (`_RAND_TRANSFORMS`, or with `increasing`
//! `_RAND_INCREASING_TRANSFORMS`), each applied with probability `prob` at a
//! magnitude `m` plus gaussian noise of std `mstd` clipped to
//! `[0, mmax]`, signed ops negated with probability 1/2, geometric ops
//! resampled bilinearly or bicubically (`interpolation`, random per op as
//! timm's `_RANDOM_INTERPOLATION` when not given) over the data set's mean
//! colour (`img_mean`).
//!
//! The point ops are [`crate::randaugment`]'s (Pillow's LUTs and blends);
//! the geometric ones repeat Pillow's `ImagingGenericTransform` with its
//! bilinear and bicubic filters in double precision
//! (`tests/golden/timm_randaugment.py` checks both against timm's own op
//! functions). Draws come from a ChaCha stream keyed per (seed, epoch,
//! sample), in timm's order.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::randaugment::{RandAugmentOp, apply_op, posterize, rotate_matrix};

/// timm's `_LEVEL_DENOM`: magnitudes are tenths of an op's range.
const LEVEL_DENOM: f64 = 10.0;

/// How the geometric ops resample (timm's `interpolation` hparam).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugInterpolation {
    /// Bilinear or bicubic with equal odds, per op (timm's default when
    /// `create_transform` gets `interpolation='random'`).
    #[default]
    Random,
    Bilinear,
    Bicubic,
}

impl std::str::FromStr for AugInterpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Self::Random),
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            other => Err(format!(
                "unknown RandAugment interpolation `{other}`; valid: random, bilinear, bicubic"
            )),
        }
    }
}

/// timm's RandAugment parameters; the defaults are `rand-m9-mstd0.5-inc1`
/// with `create_transform`'s hparams (random interpolation, translations
/// up to 45% of the side).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimmRandAugment {
    /// Ops per image (`n`, timm's `num_layers`), drawn with replacement.
    pub n: usize,
    /// Magnitude in tenths of each op's range (`m`).
    pub m: f64,
    /// Std of the gaussian noise on the magnitude (`mstd`); 0: none; above
    /// 100: uniform in `[0, m]`, as timm.
    pub mstd: f64,
    /// Upper clip of the drawn magnitude (`mmax`).
    pub mmax: f64,
    /// Probability that each drawn op is applied (`p`).
    pub prob: f64,
    /// timm's increasing op set (`inc1`): severity grows with magnitude.
    pub increasing: bool,
    pub interpolation: AugInterpolation,
    /// timm's `translate_pct` hparam: TranslateXRel/YRel's range.
    pub translate_pct: f64,
}

impl Default for TimmRandAugment {
    fn default() -> Self {
        TimmRandAugment {
            n: 2,
            m: 9.0,
            mstd: 0.5,
            mmax: LEVEL_DENOM,
            prob: 0.5,
            increasing: true,
            interpolation: AugInterpolation::Random,
            translate_pct: 0.45,
        }
    }
}

const CONFIG_KEYS: &str = "m (magnitude), n (ops), p (probability), mstd (magnitude std), mmax (magnitude bound), inc (0 or 1)";

impl std::str::FromStr for TimmRandAugment {
    type Err = String;
    /// timm's config string, `rand-m9-mstd0.5-inc1`: sections after `rand`
    /// set `m`, `n`, `p`, `mstd`, `mmax`, `inc`; what a section leaves out
    /// is timm's default (m 10, n 2, p 0.5, mstd 0, mmax 10, inc 0).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(format!(
                "RandAugment config `{s}` must start with `rand` (e.g. rand-m9-mstd0.5-inc1)"
            ));
        }
        let mut ra = TimmRandAugment {
            m: LEVEL_DENOM,
            mstd: 0.0,
            increasing: false,
            ..TimmRandAugment::default()
        };
        for part in parts {
            let at = part.find(|c: char| c.is_ascii_digit()).ok_or_else(|| {
                format!("RandAugment config `{s}`: section `{part}` has no value; valid keys: {CONFIG_KEYS}")
            })?;
            let (key, val) = part.split_at(at);
            let bad = |what: &str| format!("RandAugment config `{s}`: `{part}`: {what}");
            let float = || val.parse::<f64>().map_err(|_| bad("not a number"));
            let int = || val.parse::<usize>().map_err(|_| bad("not an integer"));
            match key {
                "m" => ra.m = int()? as f64,
                "n" => ra.n = int()?,
                "p" => ra.prob = float()?,
                "mstd" => ra.mstd = float()?,
                "mmax" => ra.mmax = int()? as f64,
                "inc" => ra.increasing = int()? != 0,
                _ => {
                    return Err(bad(&format!(
                        "unknown key `{key}`; valid keys: {CONFIG_KEYS}"
                    )));
                }
            }
        }
        ra.check()?;
        Ok(ra)
    }
}

impl TimmRandAugment {
    /// The parameters a draw can use.
    pub fn check(&self) -> Result<(), String> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_nonneg(self.m) {
            return Err(format!(
                "RandAugment magnitude m must be finite and >= 0, got {}",
                self.m
            ));
        }
        if self.mstd.is_nan() || self.mstd < 0.0 {
            return Err(format!("RandAugment mstd must be >= 0, got {}", self.mstd));
        }
        if !(self.mmax.is_finite() && self.mmax > 0.0) {
            return Err(format!(
                "RandAugment mmax must be finite and > 0, got {}",
                self.mmax
            ));
        }
        if !(0.0..=1.0).contains(&self.prob) {
            return Err(format!(
                "RandAugment probability p must be in [0, 1], got {}",
                self.prob
            ));
        }
        if !finite_nonneg(self.translate_pct) {
            return Err(format!(
                "RandAugment translate_pct must be finite and >= 0, got {}",
                self.translate_pct
            ));
        }
        Ok(())
    }

    /// One image's draw, in timm's order: the `n` op indices
    /// (`np.random.choice`, `floor(u * 15)`), then per op its coin
    /// (`random.random() > p` skips it; no coin at `p = 1`), its magnitude
    /// (`random.gauss(m, mstd)`, Box–Muller here, or `uniform(0, m)` above
    /// 100), the sign of a signed op (`random.random() > 0.5` negates) and,
    /// for a geometric op with random interpolation, `random.choice` of
    /// bilinear and bicubic.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> TimmDraw {
        let k = TimmOp::ALL.len();
        let picks: Vec<TimmOp> = (0..self.n)
            .map(|_| TimmOp::ALL[((rng.random::<f64>() * k as f64) as usize).min(k - 1)])
            .collect();
        let mut ops = Vec::new();
        for op in picks {
            if self.prob < 1.0 && rng.random::<f64>() > self.prob {
                continue;
            }
            let mut magnitude = self.m;
            if self.mstd > 100.0 {
                magnitude *= rng.random::<f64>();
            } else if self.mstd > 0.0 {
                magnitude += self.mstd * gauss(rng);
            }
            let magnitude = magnitude.min(self.mmax).max(0.0);
            let negate = op.signed(self.increasing) && rng.random::<f64>() > 0.5;
            let bicubic = match (op.geometric(), self.interpolation) {
                (false, _) => false,
                (true, AugInterpolation::Random) => rng.random::<f64>() * 2.0 >= 1.0,
                (true, i) => i == AugInterpolation::Bicubic,
            };
            ops.push(TimmOpDraw {
                op,
                arg: op.arg(magnitude, negate, self.increasing, self.translate_pct),
                bicubic,
            });
        }
        TimmDraw { ops }
    }
}

/// Salt of the per-sample RandAugment stream, so that it moves no other
/// draw (crops, erasing) and none moves it.
const STREAM: u64 = 0x5449_4d4d_5241_5547;

/// Sample `sample`'s draw in epoch `epoch`, from its own keyed stream
/// (seed, epoch, sample index), as crops, flips and erasing are keyed: a
/// resumed run draws what an uninterrupted one drew.
pub(crate) fn keyed_draw(ra: &TimmRandAugment, seed: u64, epoch: usize, sample: u64) -> TimmDraw {
    use rand::SeedableRng;
    let key = crate::loader::mix(seed ^ STREAM, epoch as u64, sample);
    ra.sample(&mut ChaCha8Rng::seed_from_u64(key))
}

/// One HWC uint8 image (`side` × `side`, as the file decoder writes it)
/// augmented in place.
pub(crate) fn augment_hwc(pixels: &mut [u8], side: i64, draw: &TimmDraw, fill: [f32; 3]) {
    if draw.ops.is_empty() {
        return;
    }
    let x = Tensor::from_slice(pixels)
        .view([1, side, side, 3])
        .permute([0, 3, 1, 2]);
    let y = timm_randaugment(&x, std::slice::from_ref(draw), fill)
        .permute([0, 2, 3, 1])
        .contiguous()
        .view([-1]);
    y.copy_data(pixels, pixels.len());
}

/// A standard normal value (Box–Muller, cosine half), two uniforms.
fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// timm's op list, in `_RAND_TRANSFORMS`' order (the increasing list has
/// the same ops in the same places, with increasing level functions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimmOp {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

impl TimmOp {
    pub const ALL: [Self; 15] = [
        Self::AutoContrast,
        Self::Equalize,
        Self::Invert,
        Self::Rotate,
        Self::Posterize,
        Self::Solarize,
        Self::SolarizeAdd,
        Self::Color,
        Self::Contrast,
        Self::Brightness,
        Self::Sharpness,
        Self::ShearX,
        Self::ShearY,
        Self::TranslateXRel,
        Self::TranslateYRel,
    ];

    /// timm's name of the op in the (increasing) list.
    pub fn name(self, increasing: bool) -> &'static str {
        use TimmOp::*;
        match (self, increasing) {
            (AutoContrast, _) => "AutoContrast",
            (Equalize, _) => "Equalize",
            (Invert, _) => "Invert",
            (Rotate, _) => "Rotate",
            (Posterize, false) => "Posterize",
            (Posterize, true) => "PosterizeIncreasing",
            (Solarize, false) => "Solarize",
            (Solarize, true) => "SolarizeIncreasing",
            (SolarizeAdd, _) => "SolarizeAdd",
            (Color, false) => "Color",
            (Color, true) => "ColorIncreasing",
            (Contrast, false) => "Contrast",
            (Contrast, true) => "ContrastIncreasing",
            (Brightness, false) => "Brightness",
            (Brightness, true) => "BrightnessIncreasing",
            (Sharpness, false) => "Sharpness",
            (Sharpness, true) => "SharpnessIncreasing",
            (ShearX, _) => "ShearX",
            (ShearY, _) => "ShearY",
            (TranslateXRel, _) => "TranslateXRel",
            (TranslateYRel, _) => "TranslateYRel",
        }
    }

    /// Whether the op resamples (and so draws an interpolation).
    pub fn geometric(self) -> bool {
        use TimmOp::*;
        matches!(
            self,
            Rotate | ShearX | ShearY | TranslateXRel | TranslateYRel
        )
    }

    /// Whether timm's level function calls `_randomly_negate`: the
    /// geometric ops, and the enhance ops of the increasing set.
    pub fn signed(self, increasing: bool) -> bool {
        self.geometric() || (self.enhance() && increasing)
    }

    fn enhance(self) -> bool {
        use TimmOp::*;
        matches!(self, Color | Contrast | Brightness | Sharpness)
    }

    /// timm's level → argument function at `level` (the clipped
    /// magnitude): degrees, bits, thresholds, enhance factors, shear
    /// factors, or translations as fractions of the side. `negate` is
    /// `_randomly_negate`'s outcome (read by signed ops only; plain
    /// enhance ops ignore it).
    pub fn arg(self, level: f64, negate: bool, increasing: bool, translate_pct: f64) -> f64 {
        use TimmOp::*;
        let sign = |v: f64| if negate { -v } else { v };
        let frac = level / LEVEL_DENOM;
        match self {
            AutoContrast | Equalize | Invert => 0.0,
            Rotate => sign(frac * 30.0),
            Posterize => {
                let bits = (frac * 4.0) as i64;
                (if increasing { 4 - bits } else { bits }) as f64
            }
            Solarize => {
                let t = ((frac * 256.0) as i64).min(256);
                (if increasing { 256 - t } else { t }) as f64
            }
            SolarizeAdd => ((frac * 110.0) as i64).min(128) as f64,
            Color | Contrast | Brightness | Sharpness => {
                if increasing {
                    (1.0 + sign(frac * 0.9)).max(0.1)
                } else {
                    frac * 1.8 + 0.1
                }
            }
            ShearX | ShearY => sign(frac * 0.3),
            TranslateXRel | TranslateYRel => sign(frac * translate_pct),
        }
    }
}

/// One applied op: which, its argument (after timm's level function) and,
/// for geometric ops, whether it resamples bicubically (else bilinearly).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimmOpDraw {
    pub op: TimmOp,
    pub arg: f64,
    pub bicubic: bool,
}

/// One image's applied ops, in order (the ones whose coin skipped them
/// left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimmDraw {
    pub ops: Vec<TimmOpDraw>,
}

/// timm's fill colour from a data set's mean in [0, 1] units, as
/// `create_transform` passes it: `min(255, round(255 * x))`, ties to even.
pub fn fill_colour(mean: [f64; 3]) -> [f32; 3] {
    mean.map(|x| (255.0 * x).round_ties_even().clamp(0.0, 255.0) as f32)
}

/// timm's RandAugment on `images` `[B, 3, H, W]` (float or uint8, values
/// in 0..=255), one draw per image, geometric ops filling with `fill`;
/// returns the same kind.
pub fn timm_randaugment(images: &Tensor, draws: &[TimmDraw], fill: [f32; 3]) -> Tensor {
    let s = images.size();
    assert!(
        s.len() == 4 && s[1] == 3 && s[0] == draws.len() as i64,
        "timm_randaugment: images {s:?} need [B, 3, H, W] with B = {} draws",
        draws.len()
    );
    let mut x = images.to_kind(Kind::Float);
    let layers = draws.iter().map(|d| d.ops.len()).max().unwrap_or(0);
    for slot in 0..layers {
        let ops: Vec<Option<TimmOpDraw>> = draws.iter().map(|d| d.ops.get(slot).copied()).collect();
        x = layer(&x, &ops, fill);
    }
    x.to_kind(images.kind())
}

/// One op per image (`None`: unchanged), each op run once on its images.
fn layer(x: &Tensor, ops: &[Option<TimmOpDraw>], fill: [f32; 3]) -> Tensor {
    // One image (an ImageFolder worker's): its op on it, without the
    // gather and scatter of the batch below.
    if let [op] = ops {
        return match op {
            Some(d) => apply(d.op, &x.contiguous(), std::slice::from_ref(d), fill),
            None => x.shallow_clone(),
        };
    }
    let mut out = x.copy();
    for op in TimmOp::ALL {
        let members: Vec<i64> = (0..ops.len() as i64)
            .filter(|&i| ops[i as usize].is_some_and(|d| d.op == op))
            .collect();
        if members.is_empty() {
            continue;
        }
        let draws: Vec<TimmOpDraw> = members.iter().map(|&i| ops[i as usize].unwrap()).collect();
        let idx = Tensor::from_slice(&members).to_device(x.device());
        let y = apply(op, &x.index_select(0, &idx), &draws, fill);
        out = out.index_copy(0, &idx, &y);
    }
    out
}

fn apply(op: TimmOp, x: &Tensor, draws: &[TimmOpDraw], fill: [f32; 3]) -> Tensor {
    use TimmOp::*;
    let args: Vec<f64> = draws.iter().map(|d| d.arg).collect();
    let reused = |o: RandAugmentOp| apply_op(o, x, &args);
    match op {
        AutoContrast => reused(RandAugmentOp::AutoContrast),
        Equalize => reused(RandAugmentOp::Equalize),
        Solarize => reused(RandAugmentOp::Solarize),
        Color => reused(RandAugmentOp::Color),
        Contrast => reused(RandAugmentOp::Contrast),
        Brightness => reused(RandAugmentOp::Brightness),
        Sharpness => reused(RandAugmentOp::Sharpness),
        // timm's `posterize` returns the image unchanged at 8 bits or more.
        Posterize => posterize(x, &args.iter().map(|&b| b as i64).collect::<Vec<_>>()),
        Invert => 255.0 - x,
        SolarizeAdd => {
            // Levels below 128 raised by `add`, capped at 255.
            let add = Tensor::from_slice(&args.iter().map(|&a| a as f32).collect::<Vec<_>>())
                .view([-1, 1, 1, 1])
                .to_device(x.device());
            x.where_self(&x.ge(128.0), &(x + add).clamp_max(255.0))
        }
        Rotate | ShearX | ShearY | TranslateXRel | TranslateYRel => geometric(op, x, draws, fill),
    }
}

/// The geometric ops on the host, image by image, as Pillow's
/// `Image.transform(size, AFFINE, a, resample, fillcolor=fill)` and
/// `Image.rotate(v, resample, fillcolor=fill)` compute them.
fn geometric(op: TimmOp, x: &Tensor, draws: &[TimmOpDraw], fill: [f32; 3]) -> Tensor {
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    let host: Vec<f32> = Vec::try_from(x.to_device(Device::Cpu).contiguous().view([-1])).unwrap();
    let per = 3 * (h * w) as usize;
    let mut out = vec![0f32; host.len()];
    out.par_chunks_mut(per)
        .zip(host.par_chunks(per))
        .zip(draws.par_iter())
        .for_each(|((dst, src), d)| {
            let v = d.arg;
            let a = match op {
                TimmOp::Rotate => {
                    // Image.rotate returns a copy at multiples of 360°.
                    if v.rem_euclid(360.0) == 0.0 {
                        dst.copy_from_slice(src);
                        return;
                    }
                    rotate_matrix(v, w, h)
                }
                TimmOp::ShearX => [1.0, v, 0.0, 0.0, 1.0, 0.0],
                TimmOp::ShearY => [1.0, 0.0, 0.0, v, 1.0, 0.0],
                TimmOp::TranslateXRel => [1.0, 0.0, v * w as f64, 0.0, 1.0, 0.0],
                _ => [1.0, 0.0, 0.0, 0.0, 1.0, v * h as f64],
            };
            affine_filtered(src, dst, h as usize, w as usize, a, d.bicubic, fill);
        });
    Tensor::from_slice(&out)
        .view(s.as_slice())
        .to_device(x.device())
}

/// Pillow's `ImagingGenericTransform` with `affine_transform` and its
/// `bilinear_filter32RGB` / `bicubic_filter32RGB`, on one CHW image:
/// each output pixel's centre mapped through `a` in double precision; a
/// position outside the image keeps the fill colour; inside, the
/// neighbours (columns clamped to the image, rows past the bottom repeating
/// the row above) are interpolated along x, then y, in Pillow's order of
/// operations, and truncated (bicubic: clipped to 0..=255 first).
fn affine_filtered(
    src: &[f32],
    dst: &mut [f32],
    h: usize,
    w: usize,
    a: [f64; 6],
    bicubic: bool,
    fill: [f32; 3],
) {
    let plane = h * w;
    let (wi, hi) = (w as i64, h as i64);
    let xclip = |x: i64| x.clamp(0, wi - 1) as usize;
    let yclip = |y: i64| y.clamp(0, hi - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let (xin, yin) = (x as f64 + 0.5, y as f64 + 0.5);
            let xx = a[0] * xin + a[1] * yin + a[2];
            let yy = a[3] * xin + a[4] * yin + a[5];
            let o = y * w + x;
            if xx < 0.0 || xx >= w as f64 || yy < 0.0 || yy >= h as f64 {
                for c in 0..3 {
                    dst[c * plane + o] = fill[c];
                }
                continue;
            }
            let (xs, ys) = (xx - 0.5, yy - 0.5);
            let (fx, fy) = (xs.floor() as i64, ys.floor() as i64);
            let (dx, dy) = (xs - fx as f64, ys - fy as f64);
            for c in 0..3 {
                let p = &src[c * plane..(c + 1) * plane];
                let at = |row: usize, col: usize| f64::from(p[row * w + col]);
                let v = if bicubic {
                    let (bx, by) = (fx - 1, fy - 1);
                    let cols = [xclip(bx), xclip(bx + 1), xclip(bx + 2), xclip(bx + 3)];
                    let row = |r: usize| {
                        cubic(
                            at(r, cols[0]),
                            at(r, cols[1]),
                            at(r, cols[2]),
                            at(r, cols[3]),
                            dx,
                        )
                    };
                    let v1 = row(yclip(by));
                    let next = |prev: f64, r: i64| {
                        if (0..hi).contains(&r) {
                            row(r as usize)
                        } else {
                            prev
                        }
                    };
                    let v2 = next(v1, by + 1);
                    let v3 = next(v2, by + 2);
                    let v4 = next(v3, by + 3);
                    let v = cubic(v1, v2, v3, v4, dy);
                    if v <= 0.0 {
                        0.0
                    } else if v >= 255.0 {
                        255.0
                    } else {
                        v.trunc()
                    }
                } else {
                    let (x0, x1) = (xclip(fx), xclip(fx + 1));
                    let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
                    let r0 = yclip(fy);
                    let v1 = lerp(at(r0, x0), at(r0, x1), dx);
                    let v2 = if (0..hi).contains(&(fy + 1)) {
                        let r1 = (fy + 1) as usize;
                        lerp(at(r1, x0), at(r1, x1), dx)
                    } else {
                        v1
                    };
                    lerp(v1, v2, dy).trunc()
                };
                dst[c * plane + o] = v as f32;
            }
        }
    }
}

/// Pillow's BICUBIC macro (a = -1), in its order of operations.
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timm_config_strings() {
        let ra: TimmRandAugment = "rand-m9-mstd0.5-inc1".parse().unwrap();
        assert_eq!(ra, TimmRandAugment::default());
        let ra: TimmRandAugment = "rand-m7-n3-p0.8".parse().unwrap();
        assert_eq!(
            (ra.m, ra.n, ra.prob, ra.mstd, ra.increasing),
            (7.0, 3, 0.8, 0.0, false)
        );
        for bad in ["rand-x9", "augmix-m9", "rand-m", "rand-tweights", "rand-p2"] {
            assert!(bad.parse::<TimmRandAugment>().is_err(), "{bad}");
        }
        let e = "rand-q1".parse::<TimmRandAugment>().unwrap_err();
        assert!(e.contains("mstd") && e.contains("inc"), "{e}");
    }

    #[test]
    fn draws_are_keyed_and_within_ranges() {
        use rand::SeedableRng;
        let ra = TimmRandAugment::default();
        let a = ra.sample(&mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(a, ra.sample(&mut ChaCha8Rng::seed_from_u64(3)));
        let mut applied = 0;
        for seed in 0..400 {
            let d = ra.sample(&mut ChaCha8Rng::seed_from_u64(seed));
            assert!(d.ops.len() <= 2);
            applied += d.ops.len();
            for o in d.ops {
                let lim = match o.op {
                    TimmOp::Rotate => 30.0,
                    TimmOp::ShearX | TimmOp::ShearY => 0.3,
                    TimmOp::TranslateXRel | TimmOp::TranslateYRel => 0.45,
                    TimmOp::Posterize => 4.0,
                    TimmOp::Solarize => 256.0,
                    TimmOp::SolarizeAdd => 110.0,
                    _ => 1.9,
                };
                assert!(o.arg.abs() <= lim, "{o:?}");
            }
        }
        // Each op applied with probability 0.5: about 400 of 800.
        assert!((330..470).contains(&applied), "{applied}");
    }

    /// Rotate's level (|degrees| / 3) follows N(9, 0.5) clipped to 10,
    /// half the signs are negative and half the resamplings bicubic; ops
    /// are uniform over the 15.
    #[test]
    fn magnitudes_signs_and_interpolations_follow_timm() {
        use rand::SeedableRng;
        let ra = TimmRandAugment {
            prob: 1.0,
            ..TimmRandAugment::default()
        };
        let (mut levels, mut neg, mut cubic) = (Vec::new(), 0, 0);
        let mut counts = [0usize; 15];
        for seed in 0..6000 {
            for o in ra.sample(&mut ChaCha8Rng::seed_from_u64(seed)).ops {
                counts[TimmOp::ALL.iter().position(|&k| k == o.op).unwrap()] += 1;
                if o.op == TimmOp::Rotate {
                    levels.push(o.arg.abs() / 3.0);
                    neg += usize::from(o.arg < 0.0);
                    cubic += usize::from(o.bicubic);
                }
            }
        }
        let n = levels.len() as f64;
        let mean = levels.iter().sum::<f64>() / n;
        let sd = (levels.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((mean - 9.0).abs() < 0.05, "mean {mean}");
        assert!((sd - 0.49).abs() < 0.05, "sd {sd}");
        assert!(levels.iter().all(|&l| l <= 10.0 + 1e-12));
        assert!(
            levels.iter().any(|&l| (l - 10.0).abs() < 1e-12),
            "clipped at 10"
        );
        assert!((neg as f64 / n - 0.5).abs() < 0.06, "{neg} of {n}");
        assert!((cubic as f64 / n - 0.5).abs() < 0.06, "{cubic} of {n}");
        // 12000 picks, 800 per op.
        assert!(
            counts.iter().all(|&c| (650..950).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn fill_rounds_half_to_even() {
        assert_eq!(fill_colour([0.485, 0.456, 0.406]), [124.0, 116.0, 104.0]);
        assert_eq!(fill_colour([0.5, 0.0, 2.0]), [128.0, 0.0, 255.0]);
    }
}
