//! Batches with augmentation as tensor ops on the training device.
//!
//! All randomness (order, crops, flips, contrast indices) comes from a ChaCha
//! stream keyed by (seed, epoch, batch), so any batch can be rebuilt exactly:
//! a resumed run sees the same data as an uninterrupted one. Image files
//! are decoded and augmented on CPU worker threads instead, each sample's
//! crop and flip keyed by (seed, epoch, sample index), the next batch
//! decoded while the current one trains; normalisation and contrast
//! indices are then the same as for images in memory. timm's RandAugment,
//! when asked for, follows the crop and flip of either kind of set, keyed
//! by (seed, epoch, sample index). RandomErasing
//! (keyed by (seed, epoch, sample index)) and Mixup/CutMix (keyed by
//! (seed, epoch, batch)) follow, on the normalised batch, as timm applies
//! them.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::draw::Keyed;
use crate::erasing::{RandomErasing, erase};
use crate::folder::{FileImages, Transform};
use crate::mixup::{Mixup, mix_batch};
use crate::prefetch::{Prefetcher, to_device};
use crate::randaugment::{RandAugmentDraw, randaugment};
use crate::timm_augment::{TimmDraw, TimmRandAugment, fill_colour, keyed_draw, timm_randaugment};
use crate::transform::Normalization;
use crate::{DataError, Dataset};

/// Pixels on each side of the image that the random crop may shift into.
pub const CROP_PAD: i64 = 4;

/// What fills the border the random crop shifts into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropPadding {
    /// Zeros: torchvision's `RandomCrop(32, padding=4)`, as RepDistiller.
    #[default]
    Zero,
    /// The image mirrored about its edge row and column, which are not
    /// repeated: `Pad(4, padding_mode='reflect')`, as KD-Zoo.
    Reflect,
}

impl std::str::FromStr for CropPadding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(CropPadding::Zero),
            "reflect" => Ok(CropPadding::Reflect),
            other => Err(format!(
                "unknown crop padding `{other}`; valid: zero, reflect"
            )),
        }
    }
}

/// One image's augmentation draw: the top-left corner of its crop in the
/// padded image (each in `0..=2 * CROP_PAD`) and whether it is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub y: i64,
    pub x: i64,
    pub flip: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Random crop and horizontal flip.
    pub augment: bool,
    pub padding: CropPadding,
    pub drop_last: bool,
    /// `(k, other_classes)`: add `k` contrast indices per sample.
    pub contrast: Option<(usize, bool)>,
}

/// One batch: normalised images, labels, data-set indices, and, when asked
/// for, contrast indices `[B, k + 1]` whose column 0 is the sample itself
/// and a strongly augmented second view of the same samples.
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    /// Each row's own label (a mixed image's first component).
    pub labels: Tensor,
    /// With Mixup/CutMix: the mixed label distributions `[B, classes]`
    /// (float32, unsmoothed), `λ·onehot(y) + (1-λ)·onehot(y.flip(0))`, for
    /// every batch of the loader, one-hot rows when a batch's draw left it
    /// unmixed (timm's targets); `None` without Mixup.
    pub soft_target: Option<Tensor>,
    pub index: Tensor,
    pub contrast_index: Option<Tensor>,
    pub strong: Option<Tensor>,
}

pub struct Loader {
    /// In-memory images on the device (empty for image files).
    images: Tensor,
    /// Image files, with their normalisation and the batch decoded ahead.
    files: Option<(FileImages, Normalization, Prefetcher)>,
    device: Device,
    labels: Tensor,
    labels_host: Vec<i64>,
    cfg: LoaderConfig,
    seed: u64,
    mean: Tensor,
    std: Tensor,
    /// Indices grouped by class, with each class's start and size, so that
    /// "any sample of another class" is one uniform draw.
    by_class: Vec<i64>,
    class_span: Vec<(usize, usize)>,
    /// `(rank, world)`: this process reads every world-th sample of each
    /// epoch's order, from `rank` on (PyTorch's DistributedSampler).
    shard: (usize, usize),
    /// Also draw a strongly augmented view of every batch (RandAugment).
    strong: bool,
    classes: i64,
    /// timm's RandomErasing of each training image, then its Mixup/CutMix
    /// of the batch.
    erasing: Option<RandomErasing>,
    mixup: Option<Mixup>,
    /// timm's RandAugment after the crop and flip of training images, with
    /// its fill colour (the mean, timm's `img_mean`).
    rand_augment: Option<(TimmRandAugment, [f32; 3])>,
}

/// Salts of the erasing and mixing streams, so that neither moves the
/// crops' draws nor each other's.
const ERASING: u64 = 0x4552_4153_494e_4731;
const MIXUP: u64 = 0x4d49_5855_505f_7631;

pub(crate) fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix64 over the combined key: nearby keys give unrelated streams.
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn permutation(n: usize, seed: u64) -> Vec<i64> {
    let mut v: Vec<i64> = (0..n as i64).collect();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    v
}

impl Loader {
    pub fn new(
        data: &Dataset,
        cfg: LoaderConfig,
        seed: u64,
        device: Device,
    ) -> Result<Loader, DataError> {
        if cfg.batch_size == 0 {
            return Err(DataError::Invalid("batch size must be at least 1".into()));
        }
        let labels_host: Vec<i64> = Vec::try_from(&data.labels.to_device(Device::Cpu))
            .map_err(|e| DataError::Invalid(format!("labels: {e}")))?;
        let classes = data.num_classes as usize;
        let mut by_class: Vec<i64> = (0..labels_host.len() as i64).collect();
        by_class.sort_by_key(|&i| labels_host[i as usize]);
        let mut class_span = vec![(0, 0); classes];
        for (pos, &i) in by_class.iter().enumerate().rev() {
            let c = labels_host[i as usize] as usize;
            class_span[c] = (pos, class_span[c].1 + 1);
        }
        if let Some((k, other)) = cfg.contrast {
            let n = labels_host.len();
            let smallest_pool = if other {
                class_span.iter().map(|s| n - s.1).min().unwrap_or(0)
            } else {
                n - 1
            };
            if smallest_pool == 0 {
                return Err(DataError::Invalid(format!(
                    "cannot draw {k} contrast indices: no sample of another class"
                )));
            }
        }
        let stats = |v: [f64; 3]| {
            Tensor::from_slice(&v)
                .to_kind(Kind::Float)
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        Ok(Loader {
            images: data.images.to_device(device),
            files: data.files.clone().map(|f| {
                let norm = Normalization::new(data.mean, data.std);
                (f, norm, Prefetcher::default())
            }),
            device,
            labels: data.labels.to_device(device),
            labels_host,
            mean: stats(data.mean),
            std: stats(data.std),
            cfg,
            seed,
            by_class,
            class_span,
            shard: (0, 1),
            strong: false,
            classes: data.num_classes,
            erasing: None,
            mixup: None,
            rand_augment: None,
        })
    }

    /// `[H, W]` of the batches' images.
    fn side(&self) -> (i64, i64) {
        let s = self.images.size();
        (s[2], s[3])
    }

    /// Mixes every batch with itself reversed, as timm's `Mixup` (mode
    /// `batch`) does, after any erasing; batches then carry
    /// `soft_target`. The draws come from a stream keyed by (seed, epoch,
    /// batch). The strongly augmented view is not mixed.
    pub fn mixup(mut self, cfg: Mixup) -> Result<Loader, DataError> {
        let (h, w) = self.side();
        cfg.check(h, w).map_err(DataError::Invalid)?;
        self.mixup = Some(cfg);
        Ok(self)
    }

    /// Erases boxes of each training image after normalisation, as timm's
    /// `RandomErasing` does, each image's draws keyed by (seed, epoch,
    /// sample index).
    pub fn random_erasing(mut self, cfg: RandomErasing) -> Result<Loader, DataError> {
        cfg.check().map_err(DataError::Invalid)?;
        self.erasing = Some(cfg);
        Ok(self)
    }

    /// Runs timm's RandAugment on every training image after its crop and
    /// flip (uint8 values, before normalisation), as timm's
    /// `create_transform(auto_augment='rand-…')` does, filling with the
    /// mean colour rounded to 0..=255 (timm's `img_mean`). Each image's
    /// draws come from a stream keyed by (seed, epoch, sample index). Only
    /// with `augment`: evaluation batches are never augmented.
    pub fn rand_augment(mut self, cfg: TimmRandAugment) -> Result<Loader, DataError> {
        cfg.check().map_err(DataError::Invalid)?;
        let mean: Vec<f64> = Vec::try_from(
            self.mean
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .view([-1]),
        )
        .map_err(|e| DataError::Invalid(format!("mean: {e}")))?;
        let fill = fill_colour([mean[0], mean[1], mean[2]]);
        self.rand_augment = Some((cfg, fill));
        Ok(self)
    }

    /// Adds to every batch a second view of the same samples: their own
    /// crop and flip, then RandAugment's two operations and a cutout, as
    /// FixMatch-style loaders do (`RandAugment(2, 10)` after `RandomCrop` and
    /// `RandomHorizontalFlip`). Drawn from a stream of its own, so the
    /// first view is what it is without it. In-memory sets only.
    pub fn strong_view(mut self) -> Result<Loader, DataError> {
        if self.files.is_some() {
            return Err(DataError::Invalid(
                "the strongly augmented view is built for in-memory sets (synthetic, digits, CIFAR), not image files".into(),
            ));
        }
        self.strong = true;
        Ok(self)
    }

    /// Reads rank `rank`'s share of every epoch, of `world` ranks: the
    /// epoch's order padded with its own start to a multiple of `world`,
    /// then every `world`-th sample from position `rank`, as PyTorch's
    /// `DistributedSampler` does. Augmentation draws differ per rank.
    pub fn shard(mut self, rank: usize, world: usize) -> Loader {
        self.shard = (rank.min(world.saturating_sub(1)), world.max(1));
        self
    }

    /// Samples this process reads per epoch.
    fn per_rank(&self) -> usize {
        self.len().div_ceil(self.shard.1)
    }

    pub fn len(&self) -> usize {
        self.labels_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels_host.is_empty()
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.per_rank(), self.cfg.batch_size);
        if self.cfg.drop_last && n >= b {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of an epoch.
    pub fn order(&self, epoch: usize) -> Vec<i64> {
        let full = if self.cfg.shuffle {
            permutation(self.len(), mix(self.seed, epoch as u64, u64::MAX))
        } else {
            (0..self.len() as i64).collect()
        };
        let (rank, world) = self.shard;
        if world == 1 {
            return full;
        }
        let padded = self.per_rank() * world;
        (0..padded)
            .skip(rank)
            .step_by(world)
            .map(|i| full[i % full.len()])
            .collect()
    }

    /// Batch `b` of an epoch whose order is `order`. Image files that
    /// cannot be decoded are an error naming the file, or, when the source
    /// skips them, left out of the batch.
    pub fn batch(&self, order: &[i64], epoch: usize, b: usize) -> Result<Batch, DataError> {
        let bs = self.cfg.batch_size;
        let idx = &order[b * bs..((b + 1) * bs).min(order.len())];
        let (rank, world) = self.shard;
        let key = (b * world + rank) as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, epoch as u64, key));
        let device = self.device;
        let (images, idx, index) = match &self.files {
            None => {
                let index = Tensor::from_slice(idx).to_device(device);
                let crops = self.cfg.augment.then(|| draw_crops(idx.len(), &mut rng));
                let images = match (&self.rand_augment, self.cfg.augment) {
                    (Some((ra, fill)), true) => {
                        self.rand_augmented(&index, idx, crops.as_deref(), ra, *fill, epoch)
                    }
                    _ => self.images_at(&index, crops.as_deref()),
                };
                (images, idx.to_vec(), index)
            }
            Some((files, norm, prefetch)) => {
                let how = match self.cfg.augment {
                    true => Transform::Train {
                        seed: self.seed,
                        epoch,
                        rand_augment: self.rand_augment,
                    },
                    false => Transform::Eval,
                };
                let decoded = prefetch.get(files, idx, how, norm, device)?;
                let next = &order[((b + 1) * bs).min(order.len())..((b + 2) * bs).min(order.len())];
                // Not past the epoch's last batch (`drop_last` leaves a tail).
                if !next.is_empty() && b + 1 < self.batches_per_epoch() {
                    prefetch.start(files, next.to_vec(), how, norm, device);
                }
                let kept: Vec<i64> = decoded.kept.iter().map(|&p| idx[p]).collect();
                if kept.is_empty() {
                    return Err(DataError::Invalid(format!(
                        "every image of batch {b} of epoch {epoch} was skipped as unreadable"
                    )));
                }
                let index = Tensor::from_slice(&kept).to_device(device);
                (to_device(&decoded.images, device), kept, index)
            }
        };
        let contrast_index = self
            .cfg
            .contrast
            .map(|(k, other)| self.contrast(&idx, k, other, &mut rng).to_device(device));
        let strong = self.strong.then(|| self.strong_images(&index, epoch, key));
        let labels = self.labels.index_select(0, &index);
        let images = match &self.erasing {
            Some(re) => self.erased(images, re, &idx, epoch),
            None => images,
        };
        let (images, soft_target) = match &self.mixup {
            Some(m) => {
                let (h, w) = self.side();
                let mut src = Keyed::new(mix(self.seed ^ MIXUP, epoch as u64, key));
                let (x, y) = mix_batch(&images, &labels, self.classes, &m.draw(&mut src, h, w));
                (x, Some(y))
            }
            None => (images, None),
        };
        Ok(Batch {
            images,
            labels,
            soft_target,
            index,
            contrast_index,
            strong,
        })
    }

    /// `images` (samples `idx`) with each one's boxes erased; the draws are
    /// made on the CPU threads, one keyed stream per sample.
    fn erased(&self, images: Tensor, re: &RandomErasing, idx: &[i64], epoch: usize) -> Tensor {
        use rayon::prelude::*;
        let s = images.size();
        let (c, h, w) = (s[1], s[2], s[3]);
        let seed = self.seed ^ ERASING;
        let boxes: Vec<_> = idx
            .par_iter()
            .map(|&i| {
                let mut src = Keyed::new(mix(seed, epoch as u64, i as u64));
                re.draw(&mut src, c, h, w)
            })
            .collect();
        if boxes.iter().all(Vec::is_empty) {
            return images;
        }
        // The batch may share its memory with what it was made from.
        let out = images.copy();
        for (i, b) in boxes.iter().enumerate() {
            erase(&out.get(i as i64), b);
        }
        out
    }

    /// The normalised images of samples `idx`, cropped and flipped as
    /// `crops` says (`None`: as stored): a batch's images for given draws.
    /// Image files are taken through the evaluation transform; the
    /// pad-and-crop draws are the in-memory sets' augmentation only.
    pub fn images(&self, idx: &[i64], crops: Option<&[Crop]>) -> Result<Tensor, DataError> {
        let Some((files, norm, _)) = &self.files else {
            let index = Tensor::from_slice(idx).to_device(self.device);
            return Ok(self.images_at(&index, crops));
        };
        if crops.is_some() {
            return Err(DataError::Invalid(
                "pad-and-crop draws apply to in-memory images; image files are augmented by RandomResizedCrop"
                    .into(),
            ));
        }
        let decoded = files.decode(idx, Transform::Eval, norm, None)?;
        if decoded.kept.len() < idx.len() {
            let skipped = idx.len() - decoded.kept.len();
            return Err(DataError::Invalid(format!(
                "{skipped} of the {} images asked for are unreadable",
                idx.len()
            )));
        }
        Ok(to_device(&decoded.images, self.device))
    }

    fn images_at(&self, index: &Tensor, crops: Option<&[Crop]>) -> Tensor {
        let raw = self.images.index_select(0, index).to_kind(Kind::Float) / 255.0;
        let raw = match crops {
            Some(c) => crop_and_flip(&raw, self.cfg.padding, c),
            None => raw,
        };
        (raw - &self.mean) / &self.std
    }

    /// Samples `idx` (at `index`) cropped and flipped as `crops` says,
    /// then through timm's RandAugment on 0..255 values, then normalised.
    fn rand_augmented(
        &self,
        index: &Tensor,
        idx: &[i64],
        crops: Option<&[Crop]>,
        ra: &TimmRandAugment,
        fill: [f32; 3],
        epoch: usize,
    ) -> Tensor {
        let raw = self.images.index_select(0, index).to_kind(Kind::Float);
        let raw = match crops {
            Some(c) => crop_and_flip(&raw, self.cfg.padding, c),
            None => raw,
        };
        let draws: Vec<TimmDraw> = idx
            .iter()
            .map(|&i| keyed_draw(ra, self.seed, epoch, i as u64))
            .collect();
        let augmented = timm_randaugment(&raw, &draws, fill);
        (augmented / 255.0 - &self.mean) / &self.std
    }

    /// The strong view of samples `index`: crop and flip, RandAugment and
    /// cutout on 0..255 values (PIL's order), then normalised.
    fn strong_images(&self, index: &Tensor, epoch: usize, key: u64) -> Tensor {
        // A salt of its own: the weak view's draws stay as they were.
        const STRONG: u64 = 0x5354_524f_4e47_5649;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed ^ STRONG, epoch as u64, key));
        let n = index.size()[0] as usize;
        let raw = self.images.index_select(0, index).to_kind(Kind::Float);
        let (h, w) = (raw.size()[2], raw.size()[3]);
        let crops = draw_crops(n, &mut rng);
        let draws: Vec<RandAugmentDraw> = (0..n)
            .map(|_| RandAugmentDraw::sample(&mut rng, w, h))
            .collect();
        let augmented = randaugment(&crop_and_flip(&raw, self.cfg.padding, &crops), &draws);
        (augmented / 255.0 - &self.mean) / &self.std
    }

    /// `[B, k + 1]`: the sample itself, then `k` negatives from the other
    /// classes (CRD's "exact" sampling) or from all other samples; distinct
    /// when the pool holds at least `k`, as `np.random.choice(replace=k > m)`.
    fn contrast(&self, idx: &[i64], k: usize, other_classes: bool, rng: &mut ChaCha8Rng) -> Tensor {
        let n = self.len();
        let mut out = Vec::with_capacity(idx.len() * (k + 1));
        for &i in idx {
            out.push(i);
            // The pool is every position outside one contiguous span of
            // `by_class` (the sample's class), or every index but `i`.
            let (start, count) = if other_classes {
                self.class_span[self.labels_host[i as usize] as usize]
            } else {
                (i as usize, 1)
            };
            let pool = n - count;
            let map = |r: usize| if r < start { r } else { r + count };
            let pick = |r: usize| {
                if other_classes {
                    self.by_class[map(r)]
                } else {
                    map(r) as i64
                }
            };
            if k <= pool {
                out.extend(rand::seq::index::sample(rng, pool, k).into_iter().map(pick));
            } else {
                out.extend((0..k).map(|_| pick(rng.random_range(0..pool))));
            }
        }
        Tensor::from_slice(&out).view([idx.len() as i64, k as i64 + 1])
    }
}

/// Every image's crop corner and flip. All rows, then all columns, then all
/// flips: the order earlier runs drew them in, so they stay reproducible.
fn draw_crops(n: usize, rng: &mut ChaCha8Rng) -> Vec<Crop> {
    let ys: Vec<i64> = (0..n).map(|_| rng.random_range(0..=2 * CROP_PAD)).collect();
    let xs: Vec<i64> = (0..n).map(|_| rng.random_range(0..=2 * CROP_PAD)).collect();
    ys.into_iter()
        .zip(xs)
        .map(|(y, x)| Crop {
            y,
            x,
            flip: rng.random_bool(0.5),
        })
        .collect()
}

/// The loader's augmentation with its draws given: each image of `x`
/// (`[B, C, H, W]`, float) padded by `CROP_PAD` on every side as `padding`
/// says, its `H×W` window at `crops[i]` taken, then mirrored left to right
/// when asked: torchvision's `RandomCrop` then `RandomHorizontalFlip`.
pub fn crop_and_flip(x: &Tensor, padding: CropPadding, crops: &[Crop]) -> Tensor {
    let (b, c, h, w) = x.size4().expect("images are NCHW");
    assert_eq!(crops.len() as i64, b, "one crop per image");
    let pad = CROP_PAD;
    let padded = match padding {
        CropPadding::Zero => x.constant_pad_nd([pad, pad, pad, pad]),
        CropPadding::Reflect => x.reflection_pad2d([pad, pad, pad, pad]),
    };
    let dev = x.device();
    let column = |v: Vec<i64>| Tensor::from_slice(&v).to_device(dev).view([b, 1, 1, 1]);
    let oy = column(crops.iter().map(|c| c.y).collect());
    let ox = column(crops.iter().map(|c| c.x).collect());
    let flip: Vec<bool> = crops.iter().map(|c| c.flip).collect();
    let rows = (Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]) + oy)
        .expand([b, c, h, w + 2 * pad], false);
    let cols = Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]) + ox;
    let flip_t = Tensor::from_slice(&flip).to_device(dev).view([b, 1, 1, 1]);
    // A flipped crop reads its columns right to left.
    let cols = cols
        .where_self(&flip_t.logical_not(), &cols.flip([3]))
        .expand([b, c, h, w], false);
    padded.gather(2, &rows, false).gather(3, &cols, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: i64, classes: i64) -> Dataset {
        let images = Tensor::arange(n * 3 * 32 * 32, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([n, 3, 32, 32]);
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        Dataset {
            images,
            labels,
            num_classes: classes,
            mean: [0.0; 3],
            std: [1.0; 3],
            files: None,
        }
    }

    fn cfg(bs: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: bs,
            shuffle: true,
            augment: true,
            padding: CropPadding::Zero,
            drop_last: false,
            contrast: Some((5, true)),
        }
    }

    #[test]
    fn the_strong_view_leaves_the_first_view_alone_and_is_reproducible() {
        let d = data(24, 4);
        let plain = Loader::new(&d, cfg(8), 7, Device::Cpu).unwrap();
        let strong = Loader::new(&d, cfg(8), 7, Device::Cpu)
            .unwrap()
            .strong_view()
            .unwrap();
        let order = plain.order(3);
        assert_eq!(strong.order(3), order);
        let (p, s, again) = (
            plain.batch(&order, 3, 1).unwrap(),
            strong.batch(&order, 3, 1).unwrap(),
            strong.batch(&order, 3, 1).unwrap(),
        );
        assert!(p.strong.is_none());
        assert!(p.images.equal(&s.images), "the first view is unchanged");
        assert!(p.contrast_index.unwrap().equal(&s.contrast_index.unwrap()));
        let (v, w) = (s.strong.unwrap(), again.strong.unwrap());
        assert_eq!(v.size(), s.images.size());
        assert!(v.equal(&w), "the view is rebuilt exactly from its key");
        assert!(!v.equal(&s.images), "the view is augmented on its own");
        let other = strong.batch(&order, 4, 1).unwrap().strong.unwrap();
        assert!(!other.equal(&v), "another epoch draws another view");
    }

    #[test]
    fn batches_are_reproducible_by_key() {
        let d = data(20, 4);
        let l = Loader::new(&d, cfg(8), 7, Device::Cpu).unwrap();
        assert_eq!(l.batches_per_epoch(), 3);
        let (o1, o2) = (l.order(1), l.order(1));
        assert_eq!(o1, o2);
        assert_ne!(l.order(0), o1);
        let (a, b) = (l.batch(&o1, 1, 2).unwrap(), l.batch(&o2, 1, 2).unwrap());
        assert_eq!(a.images.size(), [4, 3, 32, 32]);
        assert!(
            a.images.equal(&b.images)
                && a.contrast_index.unwrap().equal(&b.contrast_index.unwrap())
        );
        let mut seen: Vec<i64> = (0..3)
            .flat_map(|b| Vec::<i64>::try_from(&l.batch(&o1, 1, b).unwrap().index).unwrap())
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            (0..20).collect::<Vec<_>>(),
            "an epoch visits every sample once"
        );
    }

    #[test]
    fn crop_without_shift_or_flip_is_identity_and_flip_mirrors() {
        let d = data(64, 2);
        let l = Loader::new(
            &d,
            LoaderConfig {
                contrast: None,
                ..cfg(64)
            },
            3,
            Device::Cpu,
        )
        .unwrap();
        let order: Vec<i64> = (0..64).collect();
        let batch = l.batch(&order, 0, 0).unwrap();
        let raw = d.images.to_kind(Kind::Float) / 255.0;
        // Each augmented image must equal a shifted, possibly mirrored, window
        // of its zero-padded original.
        let padded = raw.constant_pad_nd([4, 4, 4, 4]);
        for i in 0..64 {
            let img = batch.images.get(i);
            let found = (0..=8).any(|dy| {
                (0..=8).any(|dx| {
                    let win = padded.get(i).narrow(1, dy, 32).narrow(2, dx, 32);
                    win.equal(&img) || win.flip([2]).equal(&img)
                })
            });
            assert!(found, "image {i} is not a crop of its original");
        }
    }

    #[test]
    fn contrast_negatives_come_from_other_classes() {
        let d = data(30, 3);
        let l = Loader::new(&d, cfg(10), 1, Device::Cpu).unwrap();
        let order = l.order(0);
        let b = l.batch(&order, 0, 0).unwrap();
        let ci = b.contrast_index.unwrap();
        assert_eq!(ci.size(), [10, 6]);
        assert!(ci.select(1, 0).equal(&b.index));
        let labels = d.labels.index_select(0, &ci.flatten(0, 1)).view([10, 6]);
        let own = labels.select(1, 0).unsqueeze(1);
        assert!(
            !labels
                .narrow(1, 1, 5)
                .eq_tensor(&own)
                .any()
                .int64_value(&[])
                != 0
        );
        // 20 samples of other classes are available for 5 draws: all distinct.
        for row in 0..10 {
            let mut negs: Vec<i64> = Vec::try_from(ci.get(row).narrow(0, 1, 5)).unwrap();
            negs.sort();
            negs.dedup();
            assert_eq!(negs.len(), 5, "row {row} repeats a negative");
        }
    }

    #[test]
    fn shards_cover_the_epoch_like_distributed_sampler() {
        let data = crate::synthetic::generate(&crate::SyntheticConfig {
            train_size: 10,
            test_size: 2,
            ..Default::default()
        })
        .unwrap()
        .0;
        let cfg = LoaderConfig {
            batch_size: 2,
            shuffle: true,
            augment: false,
            padding: CropPadding::Zero,
            drop_last: false,
            contrast: None,
        };
        let whole = Loader::new(&data, cfg.clone(), 3, Device::Cpu).unwrap();
        let shards: Vec<Vec<i64>> = (0..3)
            .map(|r| {
                Loader::new(&data, cfg.clone(), 3, Device::Cpu)
                    .unwrap()
                    .shard(r, 3)
                    .order(1)
            })
            .collect();
        let full = whole.order(1);
        // 10 samples over 3 ranks: 4 each, the first two padded from the start.
        assert!(shards.iter().all(|s| s.len() == 4));
        for (i, &x) in full.iter().chain(&full[..2]).enumerate() {
            assert_eq!(shards[i % 3][i / 3], x);
        }
        let one = Loader::new(&data, cfg, 3, Device::Cpu).unwrap().shard(0, 3);
        assert_eq!(one.batches_per_epoch(), 2);
    }
}
