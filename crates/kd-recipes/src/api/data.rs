//! Data: which set, batch sizes, augmentation and the validation split.

use kd_data::{
    CropPadding, DataSource, Mixup, Normalize, RandomErasing, SyntheticConfig, TimmRandAugment,
};
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
        "digits",
        &["Data"],
        "The UCI handwritten digits (1,797 real 8×8 images, 10 classes) that the\nbootstrap writes into the cache in CIFAR-10's layout.",
        || with(DataSource::Digits),
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
        "imagefolder",
        &["path: String", "Data"],
        "JPEG/PNG files in torchvision's ImageFolder layout: `path/train/<class>/…`\nand `path/val/<class>/…` (the test split), decoded batch by batch;\nImageNet's transforms at 224 pixels (256 before evaluation's crop).",
        |path: &str| with(DataSource::image_folder(path)),
    );
    def(
        e,
        "image_size",
        &["data: Data", "pixels: int", "Data"],
        "ImageFolder data: side of the square images (RandomResizedCrop's and\nCenterCrop's size; default 224).",
        |d: DataPlan, n: i64| -> Fallible<DataPlan> {
            let v = side(n, "image_size")?;
            folder_option(d, "image_size", |size, _, _| *size = v)
        },
    );
    def(
        e,
        "resize_size",
        &["data: Data", "pixels: int", "Data"],
        "ImageFolder data: evaluation resizes the shorter side to this before\nthe centre crop (default 256).",
        |d: DataPlan, n: i64| -> Fallible<DataPlan> {
            let v = side(n, "resize_size")?;
            folder_option(d, "resize_size", |_, resize, _| *resize = v)
        },
    );
    def(
        e,
        "skip_corrupt",
        &["data: Data", "on: bool", "Data"],
        "ImageFolder data: leave out files that cannot be decoded (each named in\na warning) instead of stopping the run (off by default).",
        |d: DataPlan, on: bool| -> Fallible<DataPlan> {
            folder_option(d, "skip_corrupt", |_, _, skip| *skip = on)
        },
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
        "mixup",
        &["data: Data", "config: Map", "Data"],
        "timm's Mixup/CutMix of every training batch, mixed with itself reversed\n(one λ per batch; the teacher sees the mixed images, `ce` trains on the\nmixed labels): `#{mixup_alpha, cutmix_alpha, cutmix_minmax, prob,\nswitch_prob, mode, correct_lam}`, timm's defaults 1.0, 0.0, none, 1.0,\n0.5, \"batch\", true: `.mixup(#{mixup_alpha: 0.8, cutmix_alpha: 1.0})`.",
        |mut d: DataPlan, config: Map| -> Fallible<DataPlan> {
            let m: Mixup = typed(&Dynamic::from_map(config), "mixup")?;
            let side = d.source.image_size();
            m.check(side, side).map_err(user)?;
            d.mixup = Some(m);
            Ok(d)
        },
    );
    def(
        e,
        "random_erasing",
        &["data: Data", "config: Map", "Data"],
        "timm's RandomErasing of every training image after normalisation:\n`#{prob, min_area, max_area, min_aspect, max_aspect, mode, min_count,\nmax_count}`, defaults 0.5, 0.02, 1/3, 0.3, 1/min_aspect, \"pixel\"\n(or \"rand\", \"const\"), 1, min_count: `.random_erasing(#{prob: 0.25})`.",
        |mut d: DataPlan, config: Map| -> Fallible<DataPlan> {
            let re: RandomErasing = typed(&Dynamic::from_map(config), "random_erasing")?;
            re.check().map_err(user)?;
            d.random_erasing = Some(re);
            Ok(d)
        },
    );
    def(
        e,
        "randaugment",
        &["data: Data", "config: Map", "Data"],
        "timm's RandAugment of every training image after its crop and flip:\n`#{n, m, mstd, mmax, prob, increasing, interpolation, translate_pct}`,\ndefaults timm's `rand-m9-mstd0.5-inc1`: 2, 9, 0.5, 10, 0.5, true,\n\"random\" (or \"bilinear\", \"bicubic\"), 0.45: `.randaugment(#{m: 7})`.",
        |mut d: DataPlan, config: Map| -> Fallible<DataPlan> {
            let ra: TimmRandAugment = typed(&Dynamic::from_map(config), "randaugment")?;
            ra.check().map_err(user)?;
            d.randaugment = Some(ra);
            Ok(d)
        },
    );
    def(
        e,
        "auto_augment",
        &["data: Data", "config: String", "Data"],
        "timm's RandAugment from its `--aa` config string, sections `m`, `n`,\n`p`, `mstd`, `mmax`, `inc` (timm's defaults for those left out; random\ninterpolation): `.auto_augment(\"rand-m9-mstd0.5-inc1\")`.",
        |mut d: DataPlan, config: &str| -> Fallible<DataPlan> {
            let ra = config.parse::<TimmRandAugment>().map_err(user)?;
            d.randaugment = Some(ra);
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

/// Sets an option of an ImageFolder source; other sources have none.
fn folder_option(
    mut d: DataPlan,
    what: &str,
    set: impl FnOnce(&mut u32, &mut u32, &mut bool),
) -> Fallible<DataPlan> {
    match &mut d.source {
        DataSource::ImageFolder {
            image_size,
            resize_size,
            skip_corrupt,
            ..
        } => set(image_size, resize_size, skip_corrupt),
        _ => {
            return Err(user(format!(
                "`{what}` applies to `imagefolder(path)` data only"
            )));
        }
    }
    Ok(d)
}

fn side(n: i64, what: &str) -> Fallible<u32> {
    let max = kd_data::FolderConfig::MAX_SIDE;
    match u32::try_from(n) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(user(format!("{what} must be in 1..={max} pixels, got {n}"))),
    }
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
