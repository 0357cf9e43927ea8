//! The strongly augmented view methods may ask for, as
//! `mdistiller/dataset/cifar100.py` of logit-standardization-KD draws it:
//! `RandAugment(2, 10)`, two of 14 PIL ops drawn
//! with replacement, each at a uniform magnitude in its range, then Cutout.
//! The reference runs them on PIL images; here they are batched tensor ops
//! on uint8-valued images that repeat Pillow's arithmetic (its LUTs, float32
//! blends, fixed-point affine sampling, rectangle filling), so a model sees
//! the same pixels as under the reference (`tests/golden/randaugment.py`).
//!
//! Per-image statistics (histograms, LUTs, sampling tables) are tiny and
//! are computed on the host; the pixels stay on the images' device.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// Cutout's fill colour (the reference's `CutoutAbs`).
const CUTOUT_FILL: [f32; 3] = [125.0, 123.0, 114.0];

/// The reference's `augment_list()`, in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RandAugmentOp {
    AutoContrast,
    Brightness,
    Color,
    Contrast,
    Equalize,
    Identity,
    Posterize,
    Rotate,
    Sharpness,
    ShearX,
    ShearY,
    Solarize,
    TranslateX,
    TranslateY,
}

impl RandAugmentOp {
    /// All ops, indexed as `augment_list()`: a uniform index picks one.
    pub const ALL: [Self; 14] = [
        Self::AutoContrast,
        Self::Brightness,
        Self::Color,
        Self::Contrast,
        Self::Equalize,
        Self::Identity,
        Self::Posterize,
        Self::Rotate,
        Self::Sharpness,
        Self::ShearX,
        Self::ShearY,
        Self::Solarize,
        Self::TranslateX,
        Self::TranslateY,
    ];

    /// `(min, max)` of the magnitude, as `augment_list()` gives them.
    pub fn range(self) -> (f64, f64) {
        use RandAugmentOp::*;
        match self {
            AutoContrast | Equalize | Identity => (0.0, 1.0),
            Brightness | Color | Contrast | Sharpness => (0.05, 0.95),
            Posterize => (4.0, 8.0),
            Rotate => (-30.0, 30.0),
            ShearX | ShearY | TranslateX | TranslateY => (-0.3, 0.3),
            Solarize => (0.0, 256.0),
        }
    }
}

/// One op with its magnitude, in the reference's units (fractions of the
/// side for translations, degrees counter-clockwise for Rotate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpDraw {
    pub op: RandAugmentOp,
    pub magnitude: f64,
}

/// Cutout: a square of side `size` × width (`size` in [0, 0.5); none at 0)
/// about the centre (`x`, `y`) in pixels, clipped to the image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CutoutDraw {
    pub size: f64,
    pub x: f64,
    pub y: f64,
}

/// One image's draw: two ops applied in order, then Cutout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandAugmentDraw {
    pub ops: [OpDraw; 2],
    pub cutout: CutoutDraw,
}

impl RandAugmentDraw {
    /// Draws as the reference does, in its order: both op indices
    /// (`random.choices`, `floor(u * 14)`), each op's magnitude
    /// `min + (max - min) * u`, Cutout's size `u * 0.5`, then its centre.
    /// The reference draws the centre with `np.random.uniform(w)`, which is
    /// `uniform(low=w, high=1.0)`, i.e. `w + (1 - w) * u` in (1, w], not
    /// [0, w); that is kept. The centre is drawn even for size 0 (the
    /// reference then skips it, but from numpy's separate generator), so
    /// every image consumes the same number of draws.
    pub fn sample(rng: &mut ChaCha8Rng, width: i64, height: i64) -> Self {
        let n = RandAugmentOp::ALL.len();
        let ops: [RandAugmentOp; 2] = std::array::from_fn(|_| {
            let u: f64 = rng.random();
            RandAugmentOp::ALL[((u * n as f64) as usize).min(n - 1)]
        });
        let ops = ops.map(|op| {
            let (lo, hi) = op.range();
            OpDraw {
                op,
                magnitude: lo + (hi - lo) * rng.random::<f64>(),
            }
        });
        let size = rng.random::<f64>() * 0.5;
        let (w, h) = (width as f64, height as f64);
        let x = w + (1.0 - w) * rng.random::<f64>();
        let y = h + (1.0 - h) * rng.random::<f64>();
        Self {
            ops,
            cutout: CutoutDraw { size, x, y },
        }
    }
}

/// The whole strong augmentation: `images` `[B, 3, H, W]`, float or uint8
/// with values in 0..=255, one draw per image; returns the same kind.
pub fn randaugment(images: &Tensor, draws: &[RandAugmentDraw]) -> Tensor {
    check(images, draws.len());
    let mut x = images.to_kind(Kind::Float);
    for slot in 0..2 {
        let ops: Vec<OpDraw> = draws.iter().map(|d| d.ops[slot]).collect();
        x = ops_f32(&x, &ops);
    }
    let cuts: Vec<CutoutDraw> = draws.iter().map(|d| d.cutout).collect();
    cutout_f32(&x, &cuts).to_kind(images.kind())
}

/// One op per image (as `randaugment`, without Cutout).
pub fn randaugment_ops(images: &Tensor, ops: &[OpDraw]) -> Tensor {
    check(images, ops.len());
    ops_f32(&images.to_kind(Kind::Float), ops).to_kind(images.kind())
}

/// Cutout alone, one per image.
pub fn cutout(images: &Tensor, cutouts: &[CutoutDraw]) -> Tensor {
    check(images, cutouts.len());
    cutout_f32(&images.to_kind(Kind::Float), cutouts).to_kind(images.kind())
}

fn check(images: &Tensor, n: usize) {
    let s = images.size();
    assert!(
        s.len() == 4 && s[1] == 3 && s[0] == n as i64,
        "randaugment: images {s:?} need [B, 3, H, W] with B = {n} draws"
    );
}

/// Groups the images by op, so that each op runs once on its images.
fn ops_f32(x: &Tensor, ops: &[OpDraw]) -> Tensor {
    let mut out = x.copy();
    for op in RandAugmentOp::ALL {
        let members: Vec<i64> = (0..ops.len() as i64)
            .filter(|&i| ops[i as usize].op == op)
            .collect();
        if members.is_empty() || op == RandAugmentOp::Identity {
            continue;
        }
        let idx = Tensor::from_slice(&members).to_device(x.device());
        let mags: Vec<f64> = members.iter().map(|&i| ops[i as usize].magnitude).collect();
        let y = apply_op(op, &x.index_select(0, &idx), &mags);
        out = out.index_copy(0, &idx, &y);
    }
    out
}

pub(crate) fn apply_op(op: RandAugmentOp, x: &Tensor, mags: &[f64]) -> Tensor {
    use RandAugmentOp::*;
    let dev = x.device();
    let (h, w) = (x.size()[2], x.size()[3]);
    let per_image = |v: Vec<f32>| Tensor::from_slice(&v).view([-1, 1, 1, 1]).to_device(dev);
    match op {
        AutoContrast => apply_luts(x, histograms(x).chunks(256).flat_map(autocontrast_lut)),
        Equalize => apply_luts(x, histograms(x).chunks(256).flat_map(equalize_lut)),
        Identity => x.shallow_clone(),
        Brightness => blend(&x.zeros_like(), x, mags),
        Color => blend(&luma(x).expand_as(x), x, mags),
        Contrast => {
            // ImageEnhance.Contrast: a uniform grey at int(mean(L) + 0.5).
            let sums: Vec<i64> = Vec::try_from(
                luma(x)
                    .sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Int64)
                    .to_device(Device::Cpu),
            )
            .unwrap();
            let grey = sums
                .iter()
                .map(|&s| ((s as f64 / (h * w) as f64) + 0.5) as i64 as f32);
            blend(&per_image(grey.collect()).expand_as(x), x, mags)
        }
        Sharpness => blend(&smooth(x), x, mags),
        Posterize => {
            // ImageOps.posterize(img, max(1, int(v))): keep the top bits.
            let bits: Vec<i64> = mags.iter().map(|&v| (v as i64).clamp(1, 8)).collect();
            posterize(x, &bits)
        }
        Solarize => {
            // Integers i < v exactly when i < ceil(v), which float32 holds exactly.
            let t = per_image(
                mags.iter()
                    .map(|v| v.ceil().clamp(0.0, 256.0) as f32)
                    .collect(),
            );
            x.where_self(&x.lt_tensor(&t), &(255.0 - x))
        }
        Rotate | ShearX | ShearY | TranslateX | TranslateY => {
            let tables: Vec<i64> = mags
                .iter()
                .flat_map(|&v| {
                    let a = match op {
                        Rotate => rotate_matrix(v, w, h),
                        ShearX => [1.0, v, 0.0, 0.0, 1.0, 0.0],
                        ShearY => [1.0, 0.0, 0.0, v, 1.0, 0.0],
                        TranslateX => [1.0, 0.0, v * w as f64, 0.0, 1.0, 0.0],
                        _ => [1.0, 0.0, 0.0, 0.0, 1.0, v * h as f64],
                    };
                    affine_table(a, w, h)
                })
                .collect();
            resample(x, &tables)
        }
    }
}

/// ImageOps.posterize(img, bits) per image, `bits` in 0..=8: each level
/// keeps its top `bits` bits (none at 0).
pub(crate) fn posterize(x: &Tensor, bits: &[i64]) -> Tensor {
    let masks: Vec<i64> = bits
        .iter()
        .map(|&b| !((1i64 << (8 - b.clamp(0, 8))) - 1) & 0xff)
        .collect();
    let masks = Tensor::from_slice(&masks)
        .view([-1, 1, 1, 1])
        .to_device(x.device());
    x.to_kind(Kind::Int64)
        .bitwise_and_tensor(&masks)
        .to_kind(Kind::Float)
}

/// Per image and channel, the 256-bin histogram (flattened `[n * 3 * 256]`).
fn histograms(x: &Tensor) -> Vec<i64> {
    let s = x.size();
    let rows = s[0] * s[1];
    let offsets = Tensor::arange(rows, (Kind::Int64, x.device())).view([-1, 1]) * 256;
    let bins = (x.to_kind(Kind::Int64).reshape([rows, -1]) + offsets).view([-1]);
    let counts = bins.bincount(None::<Tensor>, rows * 256);
    Vec::try_from(counts.to_device(Device::Cpu)).unwrap()
}

/// ImageOps.autocontrast (no cutoff): the used range `lo..=hi` stretched
/// onto 0..=255 in double precision, truncated; a single level is kept.
fn autocontrast_lut(h: &[i64]) -> Vec<f32> {
    let lo = h.iter().position(|&c| c > 0).unwrap_or(255);
    let hi = h.iter().rposition(|&c| c > 0).unwrap_or(0);
    if hi <= lo {
        return (0..256).map(|i| i as f32).collect();
    }
    let scale = 255.0 / (hi - lo) as f64;
    let offset = -(lo as f64) * scale;
    (0..256)
        .map(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as f32)
        .collect()
}

/// ImageOps.equalize: the cumulative histogram in integer steps of
/// (pixels less the last used level's count) / 255. Entries can exceed 255
/// (few levels); Image.point clips them to 255.
fn equalize_lut(h: &[i64]) -> Vec<f32> {
    let used: Vec<i64> = h.iter().copied().filter(|&c| c > 0).collect();
    let step = match used.as_slice() {
        [_, .., last] => (used.iter().sum::<i64>() - last) / 255,
        _ => 0,
    };
    if step == 0 {
        return (0..256).map(|i| i as f32).collect();
    }
    let mut n = step / 2;
    h.iter()
        .map(|&c| {
            let level = (n / step).min(255);
            n += c;
            level as f32
        })
        .collect()
}

/// Maps every pixel through its image's and channel's table.
fn apply_luts(x: &Tensor, luts: impl Iterator<Item = f32>) -> Tensor {
    let s = x.size();
    let luts: Vec<f32> = luts.collect();
    let luts = Tensor::from_slice(&luts)
        .view([s[0], s[1], 256])
        .to_device(x.device());
    let idx = x.to_kind(Kind::Int64).reshape([s[0], s[1], -1]);
    luts.gather(2, &idx, false).view(s.as_slice())
}

/// Image.blend(degenerate, image, v), Pillow's ImagingBlend: the factor
/// cast to float32, `deg + v * (img - deg)` in float32, truncated to uint8
/// (clipped first, which only matters for factors outside [0, 1]).
fn blend(deg: &Tensor, img: &Tensor, mags: &[f64]) -> Tensor {
    let v: Vec<f32> = mags.iter().map(|&v| v as f32).collect();
    let v = Tensor::from_slice(&v)
        .view([-1, 1, 1, 1])
        .to_device(img.device());
    (deg + (img - deg) * v).clamp(0.0, 255.0).trunc()
}

/// Pillow's RGB → L, `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`, as
/// `[n, 1, H, W]`; every intermediate is an integer below 2^24, so exact in
/// float32.
fn luma(x: &Tensor) -> Tensor {
    let c = |i| x.narrow(1, i, 1);
    ((c(0) * 19595.0 + c(1) * 38470.0 + c(2) * 7471.0 + 32768.0) / 65536.0).floor()
}

/// ImageFilter.SMOOTH as Pillow's 3×3 filter runs it on 8-bit images: the
/// kernel divided by 13 in float32, each row summed left to right, the rows
/// below, at and above added to 0.5 in that order, clipped and truncated;
/// the border rows and columns are copied.
fn smooth(x: &Tensor) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    let out = x.copy();
    if h < 3 || w < 3 {
        return out;
    }
    let (k1, k5) = (f64::from(1.0f32 / 13.0), f64::from(5.0f32 / 13.0));
    let row = |r: i64, centre: f64| {
        let s = x.narrow(2, r, h - 2);
        s.narrow(3, 0, w - 2) * k1 + s.narrow(3, 1, w - 2) * centre + s.narrow(3, 2, w - 2) * k1
    };
    let ss = (row(2, k1) + 0.5) + row(1, k5) + row(0, k1);
    out.narrow(2, 1, h - 2)
        .narrow(3, 1, w - 2)
        .copy_(&ss.clamp(0.0, 255.0).trunc());
    out
}

/// Python's `round(v, 15)`: correctly rounded to 15 decimals and back.
fn round15(v: f64) -> f64 {
    format!("{v:.15}").parse().unwrap()
}

/// Image.rotate(v)'s matrix (output → input, about the centre, no expand):
/// the angle reduced mod 360 as Python does, cos and sin rounded to 15
/// decimals, the centre's offset folded in with Python's order of terms.
pub(crate) fn rotate_matrix(v: f64, w: i64, h: i64) -> [f64; 6] {
    let angle = -v.rem_euclid(360.0).to_radians();
    let (a, b) = (round15(angle.cos()), round15(angle.sin()));
    let (d, e) = (round15(-angle.sin()), round15(angle.cos()));
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let c = a * -cx + b * -cy + 0.0 + cx;
    let f = d * -cx + e * -cy + 0.0 + cy;
    [a, b, c, d, e, f]
}

/// For each output pixel, the flat input index that Pillow's
/// `transform((w, h), AFFINE, a, NEAREST)` reads, or `w * h` where it
/// leaves the fill (0). Pillow has two NEAREST paths (ImagingTransformAffine):
/// without rotation or shear, positions accumulated in double per axis and
/// truncated (negative → outside); otherwise 16.16 fixed point from pixel
/// centres, floored by an arithmetic shift. (Its third, float, path is only
/// taken beyond ±32768 px.)
fn affine_table(a: [f64; 6], w: i64, h: i64) -> Vec<i64> {
    let mut table = vec![w * h; (w * h) as usize];
    let inside = |v: i64, n: i64| (0..n).contains(&v);
    if a[1] == 0.0 && a[3] == 0.0 {
        let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
        let mut cols = vec![0; w as usize];
        let (mut xmin, mut xmax) = (w, 0);
        let mut xo = a[2] + a[0] * 0.5;
        for x in 0..w {
            let xin = coord(xo);
            if inside(xin, w) {
                (xmin, xmax) = (xmin.min(x), x + 1);
                cols[x as usize] = xin;
            }
            xo += a[0];
        }
        let mut yo = a[5] + a[4] * 0.5;
        for y in 0..h {
            let yin = coord(yo);
            if inside(yin, h) {
                for x in xmin..xmax {
                    table[(y * w + x) as usize] = yin * w + cols[x as usize];
                }
            }
            yo += a[4];
        }
    } else {
        let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let mut row_x = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
        let mut row_y = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
        for y in 0..h {
            let (mut xx, mut yy) = (row_x, row_y);
            for x in 0..w {
                let (xin, yin) = (xx >> 16, yy >> 16);
                if inside(xin, w) && inside(yin, h) {
                    table[(y * w + x) as usize] = yin * w + xin;
                }
                xx += a0;
                yy += a3;
            }
            row_x += a1;
            row_y += a4;
        }
    }
    table
}

/// Gathers each image's pixels by its table (`w * h` reads a zero).
fn resample(x: &Tensor, tables: &[i64]) -> Tensor {
    let s = x.size();
    let (n, c, hw) = (s[0], s[1], s[2] * s[3]);
    let zero = Tensor::zeros([n, c, 1], (Kind::Float, x.device()));
    let flat = Tensor::cat(&[x.reshape([n, c, hw]), zero], 2);
    let idx = Tensor::from_slice(tables)
        .view([n, 1, hw])
        .to_device(x.device());
    flat.gather(2, &idx.expand([n, c, hw], false), false)
        .view(s.as_slice())
}

/// The pixels the reference's CutoutAbs fills, `[x0, x1, y0, y1]`
/// inclusive: corner `int(max(0, centre - v / 2))`, far side
/// `min(side, corner + v)` as a float, and ImageDraw's rectangle truncates
/// both to integers and fills both ends, clipped to the image. The side is
/// `size * width` for both axes, as in the reference.
fn cutout_rect(c: &CutoutDraw, w: i64, h: i64) -> Option<[i64; 4]> {
    if c.size.is_nan() || c.size <= 0.0 {
        return None;
    }
    let v = c.size * w as f64;
    let x0 = (c.x - v / 2.0).max(0.0) as i64;
    let y0 = (c.y - v / 2.0).max(0.0) as i64;
    let x1 = (w as f64).min(x0 as f64 + v) as i64;
    let y1 = (h as f64).min(y0 as f64 + v) as i64;
    (x0 < w && y0 < h).then(|| [x0, x1.min(w - 1), y0, y1.min(h - 1)])
}

fn cutout_f32(x: &Tensor, cuts: &[CutoutDraw]) -> Tensor {
    let (h, w, dev) = (x.size()[2], x.size()[3], x.device());
    // An empty column range where nothing is cut.
    let bounds: Vec<i64> = cuts
        .iter()
        .flat_map(|c| cutout_rect(c, w, h).unwrap_or([0, -1, 0, -1]))
        .collect();
    let b = Tensor::from_slice(&bounds)
        .view([-1, 4, 1, 1])
        .to_device(dev);
    let rows = Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]);
    let cols = Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]);
    let bound = |i| b.narrow(1, i, 1);
    let inside = cols
        .ge_tensor(&bound(0))
        .logical_and(&cols.le_tensor(&bound(1)))
        .logical_and(&rows.ge_tensor(&bound(2)))
        .logical_and(&rows.le_tensor(&bound(3)));
    let fill = Tensor::from_slice(&CUTOUT_FILL)
        .view([1, 3, 1, 1])
        .to_device(dev);
    fill.where_self(&inside, x)
}
