//! Data for `kd`: the real CIFAR-10/100 binary files, an embedded synthetic
//! set for tests, the UCI digits the bootstrap writes (the demo's real
//! images), deterministic splits, and a loader that does augmentation as
//! batched tensor ops on the training device (a RandAugment second view
//! too, equal to Pillow's, for methods that train on one). Every sample
//! keeps its data-set index, which memory-bank methods need. ImageFolder
//! sets (JPEG and PNG files) stay on disk: only their file list is held,
//! and batches are decoded and transformed on CPU worker threads.

mod cifar;
mod digits;
mod draw;
mod erasing;
mod folder;
mod loader;
mod mixup;
mod normalize;
mod prefetch;
mod randaugment;
mod synthetic;
mod timm_augment;
pub mod transform;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use thiserror::Error;

pub use cifar::{read_cifar10, read_cifar100, write_folder as write_cifar_folder};
pub use digits::folder as digits_folder;
pub use draw::{DrawSource, Keyed};
pub use erasing::{EraseBox, EraseMode, RandomErasing, erase};
pub use folder::{
    Decoded, FileImages, FolderConfig, IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, Transform,
};
pub use loader::{Batch, CROP_PAD, Crop, CropPadding, Loader, LoaderConfig, crop_and_flip};
pub use mixup::{MixDraw, MixMode, Mixup, mix_batch};
pub use normalize::Normalize;
pub use prefetch::EvalBatches;
pub use randaugment::{
    CutoutDraw, OpDraw, RandAugmentDraw, RandAugmentOp, cutout, randaugment, randaugment_ops,
};
pub use synthetic::SyntheticConfig;
pub use timm_augment::{
    AugInterpolation, TimmDraw, TimmOp, TimmOpDraw, TimmRandAugment, fill_colour, timm_randaugment,
};

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("data: {0}")]
    Invalid(String),
}

/// Images as `u8 [N, 3, H, W]`, labels `i64 [N]`.
#[derive(Debug)]
pub struct Dataset {
    /// The images, in memory; for a set of image files (`files`), none:
    /// `[0, 3, S, S]`, `S` the side of the images its batches hold.
    pub images: Tensor,
    pub labels: Tensor,
    pub num_classes: i64,
    /// Per-channel mean and std in [0, 1] units, used to normalise.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Image files decoded batch by batch, in place of `images`.
    pub files: Option<FileImages>,
}

impl Dataset {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `index` (an i64 tensor), keeping normalisation.
    pub fn select(&self, index: &Tensor) -> Dataset {
        let (images, files) = match &self.files {
            None => (self.images.index_select(0, index), None),
            Some(f) => {
                let idx = Vec::<i64>::try_from(&index.to_device(tch::Device::Cpu))
                    .expect("an index is a 1-d integer tensor");
                (self.images.shallow_clone(), Some(f.select(&idx)))
            }
        };
        Dataset {
            images,
            labels: self.labels.index_select(0, index),
            num_classes: self.num_classes,
            mean: self.mean,
            std: self.std,
            files,
        }
    }

    pub fn to_device(&self, device: tch::Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            num_classes: self.num_classes,
            mean: self.mean,
            std: self.std,
            files: self.files.clone(),
        }
    }
}

/// Which data a run uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    Synthetic(SyntheticConfig),
    /// Folder holding `data_batch_{1..5}.bin` and `test_batch.bin`.
    Cifar10 {
        path: PathBuf,
    },
    /// Folder holding `train.bin` and `test.bin` (fine labels are used).
    Cifar100 {
        path: PathBuf,
    },
    /// torchvision's ImageFolder layout: `path/train/<class>/…` and
    /// `path/val/<class>/…` (the test split), JPEG and PNG files decoded
    /// as batches are needed; see docs/data.md.
    #[serde(rename = "imagefolder")]
    ImageFolder {
        path: PathBuf,
        /// Side of the square images batches hold: RandomResizedCrop's
        /// output in training, CenterCrop's in evaluation.
        #[serde(default = "default_image_size")]
        image_size: u32,
        /// Evaluation resizes the shorter side to this before the crop.
        #[serde(default = "default_resize_size")]
        resize_size: u32,
        /// Leave out files that cannot be decoded (a warning names each)
        /// instead of stopping the run with an error.
        #[serde(default, skip_serializing_if = "is_false")]
        skip_corrupt: bool,
    },
    /// The UCI handwritten digits scikit-learn ships (1,797 real 8×8
    /// images), as the bootstrap writes them into the cache (see
    /// [`digits_folder`]).
    Digits,
}

fn default_image_size() -> u32 {
    224
}

fn default_resize_size() -> u32 {
    256
}

fn is_false(b: &bool) -> bool {
    !b
}

impl DataSource {
    /// An ImageFolder source with torchvision's ImageNet sizes (224, 256).
    pub fn image_folder(path: impl Into<PathBuf>) -> DataSource {
        DataSource::ImageFolder {
            path: path.into(),
            image_size: default_image_size(),
            resize_size: default_resize_size(),
            skip_corrupt: false,
        }
    }

    /// Side of the square images of this source's batches.
    pub fn image_size(&self) -> i64 {
        match self {
            DataSource::ImageFolder { image_size, .. } => *image_size as i64,
            _ => 32,
        }
    }
}

fn folder_config(image_size: u32, resize_size: u32, skip_corrupt: bool) -> FolderConfig {
    FolderConfig {
        image_size,
        resize_size,
        skip_corrupt,
    }
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource::Synthetic(SyntheticConfig::default())
    }
}

/// Train, optional validation, and test sets.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub val: Option<Dataset>,
    pub test: Dataset,
}

/// Loads a source and holds out `val_fraction` of its training set, chosen
/// by a seeded permutation so the split is the same for every run.
pub fn load(source: &DataSource, val_fraction: f64, split_seed: u64) -> Result<Splits, DataError> {
    let (train, test) = match source {
        DataSource::Synthetic(cfg) => synthetic::generate(cfg)?,
        DataSource::Cifar10 { path } => cifar::read_cifar10(path)?,
        DataSource::Cifar100 { path } => cifar::read_cifar100(path)?,
        DataSource::Digits => digits::read()?,
        DataSource::ImageFolder {
            path,
            image_size,
            resize_size,
            skip_corrupt,
        } => folder::read(
            path,
            &folder_config(*image_size, *resize_size, *skip_corrupt),
        )?,
    };
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Invalid(format!(
            "val_fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let n_val = (train.len() as f64 * val_fraction).round() as i64;
    if n_val == 0 {
        return Ok(Splits {
            train,
            val: None,
            test,
        });
    }
    let perm = loader::permutation(train.len() as usize, split_seed);
    let perm = Tensor::from_slice(&perm);
    let (val_idx, train_idx) = (
        perm.narrow(0, 0, n_val),
        perm.narrow(0, n_val, train.len() - n_val),
    );
    let mut train_idx = train_idx.sort(0, false).0;
    train_idx = train_idx.to_kind(Kind::Int64);
    Ok(Splits {
        val: Some(train.select(&val_idx.sort(0, false).0)),
        train: train.select(&train_idx),
        test,
    })
}

/// Checks that a source can be loaded, without loading it: a CIFAR folder
/// has all its files, each a whole number of records; a synthetic set's
/// configuration is valid; an ImageFolder root has train/ and val/ with the
/// same class folders, each holding an image file (listed, not decoded).
pub fn check(source: &DataSource) -> Result<(), DataError> {
    match source {
        DataSource::Synthetic(cfg) => cfg.check(),
        DataSource::Cifar10 { path } => cifar::check_folder(path, false),
        DataSource::Cifar100 { path } => cifar::check_folder(path, true),
        DataSource::Digits => digits::check(),
        DataSource::ImageFolder {
            path,
            image_size,
            resize_size,
            skip_corrupt,
        } => folder::check(
            path,
            &folder_config(*image_size, *resize_size, *skip_corrupt),
        ),
    }
}

/// Training-set size and number of classes of a source, without reading it.
pub fn describe(source: &DataSource) -> Result<(i64, i64), DataError> {
    Ok(match source {
        DataSource::Synthetic(c) => (c.train_size, c.classes),
        DataSource::Cifar10 { .. } => (50_000, 10),
        DataSource::Cifar100 { .. } => (50_000, 100),
        DataSource::Digits => (digits::TRAIN_SIZE, 10),
        DataSource::ImageFolder { path, .. } => folder::describe(path)?,
    })
}

/// Per-channel mean and std (population, in [0, 1] units) of `u8` images
/// `[N, 3, H, W]`: the normalisation of sets without published constants.
pub(crate) fn channel_stats(images: &Tensor) -> ([f64; 3], [f64; 3]) {
    let x = images.to_kind(Kind::Double) / 255.0;
    let dims = [0i64, 2, 3];
    let mean_t = x.mean_dim(dims.as_slice(), true, Kind::Double);
    let std_t = (x - &mean_t)
        .square()
        .mean_dim(dims.as_slice(), false, Kind::Double)
        .sqrt();
    let three = |t: Tensor, fallback: f64| -> [f64; 3] {
        let v = Vec::<f64>::try_from(t.flatten(0, -1)).unwrap_or_else(|_| vec![fallback; 3]);
        [v[0], v[1], v[2]]
    };
    let mean = three(mean_t, 0.5);
    let std = three(std_t, 0.25).map(|s| s.max(1e-3));
    (mean, std)
}
