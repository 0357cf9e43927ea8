//! kd's CIFAR training pipeline against torch's computation of the
//! torchvision transforms (`tests/golden/augment.py`): for the same crop
//! corners and flips, zero and reflect padding, and the normalisation
//! constants that kd knows by name, give the same tensors bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kd_data::{Crop, CropPadding, DataSource, Loader, LoaderConfig, Normalize, Splits};
use tch::{Device, Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/data/augment.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make golden writes it)", path.display()))
        .into_iter()
        .collect()
}

fn crops(f: &HashMap<String, Tensor>) -> Vec<Crop> {
    let rows: Vec<Vec<i64>> = Vec::try_from(&f["crops"]).unwrap();
    rows.iter()
        .map(|r| Crop {
            y: r[0],
            x: r[1],
            flip: r[2] != 0,
        })
        .collect()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = (got - want).abs().max().double_value(&[]);
    assert_eq!(diff, 0.0, "{what}: differs from torch by up to {diff:e}");
}

/// The fixture's images as a CIFAR-100 folder's training set, read as kd
/// reads one (default normalisation), with the split `norm` applied.
fn cifar100(images: &Tensor, norm: Normalize) -> Splits {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = Vec::try_from(images.flatten(0, 3)).unwrap();
    let mut bytes = Vec::new();
    for img in pixels.chunks_exact(3 * 32 * 32) {
        bytes.extend([0u8, 0u8]);
        bytes.extend_from_slice(img);
    }
    std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
    std::fs::write(dir.path().join("test.bin"), &bytes).unwrap();
    let source = DataSource::Cifar100 {
        path: PathBuf::from(dir.path()),
    };
    let mut splits = kd_data::load(&source, 0.0, 0).unwrap();
    splits.normalize_with(&norm, &source).unwrap();
    splits
}

fn loader(splits: &Splits, padding: CropPadding) -> Loader {
    let cfg = LoaderConfig {
        batch_size: 64,
        shuffle: false,
        augment: true,
        padding,
        drop_last: false,
        contrast: None,
    };
    Loader::new(&splits.train, cfg, 0, Device::Cpu).unwrap()
}

#[test]
fn crops_of_zero_and_reflect_padded_images_equal_torch() {
    let f = fixture();
    let x = f["images"].to_kind(Kind::Float) / 255.0;
    let c = crops(&f);
    for (padding, name) in [
        (CropPadding::Zero, "zero"),
        (CropPadding::Reflect, "reflect"),
    ] {
        let got = kd_data::crop_and_flip(&x, padding, &c);
        assert_same(&got, &f[name], name);
    }
    // The two paddings differ wherever a crop reaches into the border.
    let zero = kd_data::crop_and_flip(&x, CropPadding::Zero, &c);
    assert!(!zero.equal(&f["reflect"]));
}

#[test]
fn loader_normalises_with_each_frameworks_constants() {
    let f = fixture();
    let n = f["images"].size()[0];
    let idx: Vec<i64> = (0..n).collect();
    // Without the field, CIFAR-100 is normalised as RepDistiller does.
    for (norm, name) in [
        (Normalize::Default, "repdistiller"),
        (Normalize::Repdistiller, "repdistiller"),
        (Normalize::Kdzoo, "kdzoo"),
    ] {
        let splits = cifar100(&f["images"], norm);
        let l = loader(&splits, CropPadding::Zero);
        assert_same(
            &l.images(&idx, None).unwrap(),
            &f[&format!("plain/{name}")],
            name,
        );
        // Evaluation normalises the test split the same way.
        assert_eq!(
            (splits.test.mean, splits.test.std),
            (splits.train.mean, splits.train.std)
        );
    }
}

#[test]
fn kdzoo_and_repdistiller_training_transforms_equal_torch() {
    let f = fixture();
    let n = f["images"].size()[0];
    let idx: Vec<i64> = (0..n).collect();
    let c = crops(&f);
    for (norm, padding, name) in [
        (Normalize::Kdzoo, CropPadding::Reflect, "kdzoo"),
        (Normalize::Default, CropPadding::Zero, "repdistiller"),
    ] {
        let splits = cifar100(&f["images"], norm);
        let got = loader(&splits, padding).images(&idx, Some(&c)).unwrap();
        assert_same(&got, &f[&format!("full/{name}")], name);
    }
}

/// The loader's own draws stay within the padded image: every augmented
/// image is one of the windows `images` gives for some corner and flip.
#[test]
fn drawn_crops_are_windows_of_the_reflect_padded_image() {
    let f = fixture();
    let splits = cifar100(&f["images"], Normalize::Kdzoo);
    let l = loader(&splits, CropPadding::Reflect);
    let n = f["images"].size()[0];
    let idx: Vec<i64> = (0..n).collect();
    let batch = l.batch(&idx, 3, 0).unwrap();
    let windows: Vec<Tensor> = (0..=8)
        .flat_map(|y| (0..=8).flat_map(move |x| [false, true].map(|flip| Crop { y, x, flip })))
        .map(|c| l.images(&idx, Some(&vec![c; n as usize])).unwrap())
        .collect();
    for i in 0..n {
        let img = batch.images.get(i);
        assert!(
            windows.iter().any(|w| w.get(i).equal(&img)),
            "image {i} is no window of its padded original"
        );
    }
}
