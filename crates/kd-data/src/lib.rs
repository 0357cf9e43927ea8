//! Data for `kd`: the real CIFAR-10/100 binary files, an embedded synthetic
//! set for the demo and tests, deterministic splits, and a loader that does
//! augmentation as batched tensor ops on the training device. Every sample
//! keeps its data-set index, which memory-bank methods need.

mod cifar;
mod loader;
mod normalize;
mod synthetic;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use thiserror::Error;

pub use cifar::{read_cifar10, read_cifar100, write_folder as write_cifar_folder};
pub use loader::{Batch, CROP_PAD, Crop, CropPadding, Loader, LoaderConfig, crop_and_flip};
pub use normalize::Normalize;
pub use synthetic::SyntheticConfig;

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
    pub images: Tensor,
    pub labels: Tensor,
    pub num_classes: i64,
    /// Per-channel mean and std in [0, 1] units, used to normalise.
    pub mean: [f64; 3],
    pub std: [f64; 3],
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
        Dataset {
            images: self.images.index_select(0, index),
            labels: self.labels.index_select(0, index),
            num_classes: self.num_classes,
            mean: self.mean,
            std: self.std,
        }
    }

    pub fn to_device(&self, device: tch::Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            num_classes: self.num_classes,
            mean: self.mean,
            std: self.std,
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
/// configuration is valid.
pub fn check(source: &DataSource) -> Result<(), DataError> {
    match source {
        DataSource::Synthetic(cfg) => cfg.check(),
        DataSource::Cifar10 { path } => cifar::check_folder(path, false),
        DataSource::Cifar100 { path } => cifar::check_folder(path, true),
    }
}

/// Training-set size and number of classes of a source, without reading it.
pub fn describe(source: &DataSource) -> Result<(i64, i64), DataError> {
    Ok(match source {
        DataSource::Synthetic(c) => (c.train_size, c.classes),
        DataSource::Cifar10 { .. } => (50_000, 10),
        DataSource::Cifar100 { .. } => (50_000, 100),
    })
}
