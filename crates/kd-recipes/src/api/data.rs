//! Data: which set, batch sizes, augmentation and the validation split.

use kd_data::{CropPadding, DataSource, Normalize, SyntheticConfig};
use kd_engine::DataPlan;
use rhai::{Array, Dynamic, Engine, Map};

use super::{Fallible, def, number, positive, typed};
use crate::error::user;

fn with(source: DataSource) -> DataPlan {
    DataPlan {
        source,
        ..DataPlan::default()
    }
}

pub(super) fn register(e: &mut Engine) {
    e.register_type_with_name::<DataPlan>("Data");
    def(
        e,
        "synthetic",
        &["Data"],
        "The embedded synthetic set with its default size (no download).",
        || with(DataSource::Synthetic(SyntheticConfig::default())),
    );
    def(
        e,
        "synthetic",
        &["config: Map", "Data"],
        "The synthetic set with some fields changed:\n`#{classes, train_size, test_size, seed, noise, label_noise}`.",
        |config: Map| -> Fallible<DataPlan> {
            let cfg: SyntheticConfig = typed(&Dynamic::from_map(config), "synthetic")?;
            Ok(with(DataSource::Synthetic(cfg)))
        },
    );
    def(
        e,
        "cifar10",
        &["path: String", "Data"],
        "CIFAR-10 from the folder holding `data_batch_{1..5}.bin` and `test_batch.bin`.",
        |path: &str| with(DataSource::Cifar10 { path: path.into() }),
    );
    def(
        e,
        "cifar100",
        &["path: String", "Data"],
        "CIFAR-100 from the folder holding `train.bin` and `test.bin`.",
        |path: &str| with(DataSource::Cifar100 { path: path.into() }),
    );
    def(
        e,
        "batch_size",
        &["data: Data", "n: int", "Data"],
        "Training batch size.",
        |mut d: DataPlan, n: i64| -> Fallible<DataPlan> {
            d.batch_size = positive(n, "batch_size")?;
            Ok(d)
        },
    );
    def(
        e,
        "eval_batch_size",
        &["data: Data", "n: int", "Data"],
        "Batch size for evaluation.",
        |mut d: DataPlan, n: i64| -> Fallible<DataPlan> {
            d.eval_batch_size = positive(n, "eval_batch_size")?;
            Ok(d)
        },
    );
    def(
        e,
        "augment",
        &["data: Data", "on: bool", "Data"],
        "Random crop and flip of training images (on by default).",
        |mut d: DataPlan, on: bool| {
            d.augment = on;
            d
        },
    );
    def(
        e,
        "crop_padding",
        &["data: Data", "mode: String", "Data"],
        "What fills the 4-pixel border of the random crop: `\"zero\"` (default;\nRepDistiller) or `\"reflect\"` (the image mirrored; KD-Zoo).",
        |mut d: DataPlan, mode: &str| -> Fallible<DataPlan> {
            d.crop_padding = mode.parse::<CropPadding>().map_err(user)?;
            Ok(d)
        },
    );
    def(
        e,
        "normalize",
        &["data: Data", "name: String", "Data"],
        "Normalisation constants by name: `\"default\"` (the data set's own;\nCIFAR-100: RepDistiller's), `\"kdzoo\"` or `\"repdistiller\"`.",
        |mut d: DataPlan, name: &str| -> Fallible<DataPlan> {
            let norm = name.parse::<Normalize>().map_err(user)?;
            norm.stats(&d.source).map_err(|e| user(e.to_string()))?;
            d.normalize = norm;
            Ok(d)
        },
    );
    def(
        e,
        "normalize",
        &["data: Data", "mean: Array", "std: Array", "Data"],
        "Normalisation by per-channel mean and std in [0, 1] units:\n`.normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])`.",
        |mut d: DataPlan, mean: Array, std: Array| -> Fallible<DataPlan> {
            let norm = Normalize::Explicit {
                mean: channels(&mean, "mean")?,
                std: channels(&std, "std")?,
            };
            norm.stats(&d.source).map_err(|e| user(e.to_string()))?;
            d.normalize = norm;
            Ok(d)
        },
    );
    def(
        e,
        "validation",
        &["data: Data", "fraction: float", "Data"],
        "Holds out this fraction of the training set for validation;\nthe best checkpoint is then chosen on it.",
        |mut d: DataPlan, fraction: Dynamic| -> Fallible<DataPlan> {
            let f = number(&fraction, "validation fraction")?;
            if !(0.0..1.0).contains(&f) {
                return Err(user(format!(
                    "validation fraction must be in [0, 1), got {f}"
                )));
            }
            d.val_fraction = f;
            Ok(d)
        },
    );
}

fn channels(v: &Array, what: &str) -> Fallible<[f64; 3]> {
    let values = v
        .iter()
        .map(|x| number(x, what))
        .collect::<Fallible<Vec<f64>>>()?;
    values.try_into().map_err(|v: Vec<f64>| {
        user(format!(
            "{what} needs one number per channel (3), got {}",
            v.len()
        ))
    })
}
