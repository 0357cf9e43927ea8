//! kd's ImageFolder pipeline: the transforms against torchvision's output
//! on the same files (`tests/golden/imagefolder.py`), the folder layout as
//! torchvision's ImageFolder reads it, and batches that are the same
//! whatever the batching, prefetching or sharding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kd_data::transform::{self, CropBox, Normalization, Scratch};
use kd_data::{DataSource, Loader, LoaderConfig, Splits};
use tch::{Device, Kind, Tensor};

fn fixture() -> (HashMap<String, Tensor>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/data/imagefolder.safetensors");
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (make golden writes it)", path.display()))
        .into_iter()
        .collect();
    let mut names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("file/").map(str::to_string))
        .collect();
    names.sort();
    (tensors, names)
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::try_from(t.flatten(0, -1)).unwrap()
}

/// kd's `size × size` HWC output as torchvision's CHW tensor.
fn chw(hwc: &[u8], size: i64) -> Tensor {
    Tensor::from_slice(hwc)
        .view([size, size, 3])
        .permute([2, 0, 1])
        .contiguous()
}

/// Mean and largest absolute difference, in 1/255 units.
fn diff(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.size(), want.size());
    let d = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs();
    (
        d.mean(Kind::Float).double_value(&[]),
        d.max().double_value(&[]),
    )
}

#[test]
fn eval_transform_matches_torchvision_within_one_level() {
    let (f, names) = fixture();
    assert!(names.len() >= 8, "{names:?}");
    let mut scratch = Scratch::default();
    for name in &names {
        let img = transform::decode(&bytes(&f[&format!("file/{name}")])).unwrap();
        for (key, resize, size) in [
            ("eval", 36, 32),
            ("eval_pad", 24, 32),
            ("eval_224", 256, 224),
        ] {
            let Some(want) = f.get(&format!("{key}/{name}")) else {
                continue;
            };
            let mut out = vec![0; (3 * size * size) as usize];
            transform::eval_into(&img, resize, size, &mut out, &mut scratch).unwrap();
            let (mean, max) = diff(&chw(&out, size as i64), want);
            eprintln!("{key}/{name}: mean |kd - torchvision| {mean:.3}/255, max {max}/255");
            assert!(mean < 1.0, "{key}/{name}: mean difference {mean}/255");
        }
    }
}

#[test]
fn train_transform_matches_torchvision_for_the_same_draws() {
    let (f, names) = fixture();
    let mut scratch = Scratch::default();
    for name in &names {
        let img = transform::decode(&bytes(&f[&format!("file/{name}")])).unwrap();
        let b: Vec<i64> = Vec::try_from(&f[&format!("box/{name}")]).unwrap();
        let crop = CropBox {
            top: b[0] as u32,
            left: b[1] as u32,
            height: b[2] as u32,
            width: b[3] as u32,
        };
        let mut out = vec![0; 3 * 32 * 32];
        transform::train_into(&img, crop, b[4] != 0, 32, &mut out, &mut scratch).unwrap();
        let (mean, max) = diff(&chw(&out, 32), &f[&format!("train/{name}")]);
        eprintln!("train/{name}: mean |kd - torchvision| {mean:.3}/255, max {max}/255");
        assert!(mean < 1.0, "train/{name}: mean difference {mean}/255");
    }
}

#[test]
fn grey_and_alpha_images_become_rgb_as_pil_converts_them() {
    let (f, _) = fixture();
    // Grey: the three channels equal. RGBA: alpha dropped, not blended
    // (the PNG is lossless, so the pixels are the encoder's exactly).
    let grey = transform::decode(&bytes(&f["file/gray.png"])).unwrap();
    assert!(grey.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    let rgba = transform::decode(&bytes(&f["file/rgba.png"])).unwrap();
    assert_eq!((rgba.width, rgba.height), (40, 30));
    // The first pixel is fully transparent: blending would have made it
    // black; PIL (and kd) keep its colour.
    assert_ne!(&rgba.pixels[..3], [0, 0, 0]);
}

// ---------------------------------------------------------------------
// Folders on disk.

fn picture(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + seed * 31) as u8,
            (y * 5 + seed * 17) as u8,
            ((x ^ y) + seed) as u8,
        ])
    })
}

/// `classes` classes of `per_class` JPEGs of varied sizes in train/, two
/// each in val/.
fn folder(root: &Path, classes: u32, per_class: u32) {
    for split in ["train", "val"] {
        let n = if split == "train" { per_class } else { 2 };
        for c in 0..classes {
            let dir = root.join(split).join(format!("class{c:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let (w, h) = (24 + 9 * i + c, 40 - 3 * i + 2 * c);
                picture(w, h, c * 10 + i)
                    .save(dir.join(format!("img{i}.jpg")))
                    .unwrap();
            }
        }
    }
}

fn source(root: &Path, skip_corrupt: bool) -> DataSource {
    DataSource::ImageFolder {
        path: PathBuf::from(root),
        image_size: 16,
        resize_size: 20,
        skip_corrupt,
    }
}

fn cfg(batch_size: usize, augment: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: true,
        augment,
        padding: Default::default(),
        drop_last: false,
        contrast: None,
    }
}

fn load(root: &Path, skip: bool) -> Splits {
    kd_data::load(&source(root, skip), 0.0, 0).unwrap()
}

#[test]
fn the_layout_is_read_as_torchvision_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    folder(root, 3, 2);
    // Extensions match whatever their case; other files are not images;
    // files in subfolders of a class belong to it.
    picture(20, 20, 1)
        .save(root.join("train/class01/UPPER.JPG"))
        .unwrap();
    std::fs::write(root.join("train/class01/notes.txt"), "x").unwrap();
    std::fs::create_dir_all(root.join("train/class02/sub")).unwrap();
    picture(20, 20, 2)
        .save(root.join("train/class02/sub/a.png"))
        .unwrap();
    let src = source(root, false);
    kd_data::check(&src).unwrap();
    assert_eq!(kd_data::describe(&src).unwrap(), (8, 3));
    let s = load(root, false);
    assert_eq!(s.train.num_classes, 3);
    let labels: Vec<i64> = Vec::try_from(&s.train.labels).unwrap();
    assert_eq!(labels, [0, 0, 1, 1, 1, 2, 2, 2]);
    let files = s.train.files.as_ref().unwrap();
    let names: Vec<String> = (0..files.len())
        .map(|i| {
            let p = files.path(i).strip_prefix(root.join("train")).unwrap();
            p.to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "class00/img0.jpg",
            "class00/img1.jpg",
            "class01/UPPER.JPG",
            "class01/img0.jpg",
            "class01/img1.jpg",
            "class02/img0.jpg",
            "class02/img1.jpg",
            "class02/sub/a.png",
        ]
    );
    assert_eq!(s.test.len(), 6);
    assert_eq!(
        (s.train.mean, s.train.std),
        (kd_data::IMAGENET_MEAN, kd_data::IMAGENET_STD)
    );
    assert_eq!(s.train.images.size(), [0, 3, 16, 16]);
}

#[test]
fn layout_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let err = |src: &DataSource| kd_data::check(src).unwrap_err().to_string();
    let e = err(&source(&root.join("nope"), false));
    assert!(
        e.contains("nope: no such folder; an ImageFolder root holds train/ and val/"),
        "{e}"
    );
    folder(root, 2, 1);
    std::fs::remove_dir_all(root.join("val")).unwrap();
    let e = err(&source(root, false));
    assert!(e.contains("val: no such folder"), "{e}");
    std::fs::create_dir_all(root.join("val/class00")).unwrap();
    std::fs::create_dir_all(root.join("val/other")).unwrap();
    picture(8, 8, 0)
        .save(root.join("val/class00/a.jpg"))
        .unwrap();
    picture(8, 8, 0).save(root.join("val/other/a.jpg")).unwrap();
    let e = err(&source(root, false));
    assert!(
        e.contains("train/ and val/ must hold the same class folders; only in train/: class01; only in val/: other"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("val/other")).unwrap();
    std::fs::create_dir_all(root.join("val/class01")).unwrap();
    let e = err(&source(root, false));
    assert!(
        e.contains("no image file in class folder(s) class01"),
        "{e}"
    );
    let bad = DataSource::ImageFolder {
        path: root.into(),
        image_size: 0,
        resize_size: 20,
        skip_corrupt: false,
    };
    let e = err(&bad);
    assert!(
        e.contains("image_size must be in 1..=4096 pixels, got 0"),
        "{e}"
    );
}

fn all_batches(l: &Loader, epoch: usize) -> Vec<(Tensor, Vec<i64>)> {
    let order = l.order(epoch);
    (0..l.batches_per_epoch())
        .map(|b| {
            let batch = l.batch(&order, epoch, b).unwrap();
            (batch.images, Vec::try_from(&batch.index).unwrap())
        })
        .collect()
}

/// Each sample's image, by data-set index, over a whole epoch.
fn by_sample(batches: &[(Tensor, Vec<i64>)]) -> HashMap<i64, Tensor> {
    batches
        .iter()
        .flat_map(|(images, idx)| {
            idx.iter()
                .enumerate()
                .map(|(p, &i)| (i, images.get(p as i64)))
        })
        .collect()
}

#[test]
fn augmentation_is_keyed_by_sample_not_by_batch_thread_or_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 4, 5);
    let s = load(dir.path(), false);
    let a = Loader::new(&s.train, cfg(6, true), 9, Device::Cpu).unwrap();
    let b = Loader::new(&s.train, cfg(4, true), 9, Device::Cpu).unwrap();
    let (ea, eb) = (
        by_sample(&all_batches(&a, 1)),
        by_sample(&all_batches(&b, 1)),
    );
    assert_eq!(ea.len(), 20);
    for (i, img) in &ea {
        assert_eq!(img.size(), [3, 16, 16]);
        assert!(img.equal(&eb[i]), "sample {i} differs between batch sizes");
    }
    // A batch asked for out of order (no prefetch) equals the prefetched one.
    let order = a.order(1);
    let again = a.batch(&order, 1, 2).unwrap();
    let first = &all_batches(&a, 1)[2];
    assert!(again.images.equal(&first.0));
    // Another epoch, other crops.
    let e2 = by_sample(&all_batches(&a, 2));
    assert!(ea.iter().any(|(i, img)| !img.equal(&e2[i])));
    // Shards read their share, with the same images.
    let shards: Vec<HashMap<i64, Tensor>> = (0..3)
        .map(|r| {
            let l = Loader::new(&s.train, cfg(3, true), 9, Device::Cpu)
                .unwrap()
                .shard(r, 3);
            by_sample(&all_batches(&l, 1))
        })
        .collect();
    let mut seen: Vec<i64> = shards.iter().flat_map(|m| m.keys().copied()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    for m in &shards {
        for (i, img) in m {
            assert!(img.equal(&ea[i]));
        }
    }
}

#[test]
fn evaluation_batches_hold_the_eval_transform_and_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 3, 2);
    let s = load(dir.path(), false);
    let files = s.test.files.as_ref().unwrap();
    let norm = Normalization::new(s.test.mean, s.test.std);
    let mut scratch = Scratch::default();
    let mut n = 0;
    for item in s.test.eval_batches(1, 6, 2, Device::Cpu) {
        let (images, labels) = item.unwrap();
        assert_eq!(images.kind(), Kind::Float);
        for p in 0..images.size()[0] {
            let i = (1 + n) as usize;
            let img = transform::decode(&std::fs::read(files.path(i)).unwrap()).unwrap();
            let mut out = vec![0; 3 * 16 * 16];
            transform::eval_into(&img, 20, 16, &mut out, &mut scratch).unwrap();
            let mut want = vec![0f32; out.len()];
            norm.apply(&out, &mut want);
            let want = Tensor::from_slice(&want)
                .view([16, 16, 3])
                .permute([2, 0, 1]);
            assert!(images.get(p).equal(&want), "sample {i}");
            assert_eq!(labels.int64_value(&[p]), i as i64 / 2);
            n += 1;
        }
    }
    assert_eq!(n, 5);
}

#[test]
fn a_validation_split_selects_files() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 2, 5);
    let s = kd_data::load(&source(dir.path(), false), 0.3, 0).unwrap();
    let val = s.val.as_ref().unwrap();
    assert_eq!((s.train.len(), val.len()), (7, 3));
    let (tf, vf) = (s.train.files.as_ref().unwrap(), val.files.as_ref().unwrap());
    let mut all: Vec<PathBuf> = (0..7).map(|i| tf.path(i).to_path_buf()).collect();
    all.extend((0..3).map(|i| vf.path(i).to_path_buf()));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "train and validation share no file");
    // Labels follow their files.
    for i in 0..3 {
        let class = vf
            .path(i)
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            format!("class{:02}", val.labels.int64_value(&[i as i64])),
            class
        );
    }
}

#[test]
fn a_corrupt_file_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 2, 3);
    let bad = dir.path().join("train/class01/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let s = load(dir.path(), false);
    let l = Loader::new(&s.train, cfg(7, true), 0, Device::Cpu).unwrap();
    let e = l.batch(&l.order(0), 0, 0).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()), "{e}");
    assert!(e.contains("skip_corrupt"), "{e}");

    let s = load(dir.path(), true);
    let l = Loader::new(&s.train, cfg(7, true), 0, Device::Cpu).unwrap();
    let b = l.batch(&l.order(0), 0, 0).unwrap();
    assert_eq!(b.images.size(), [6, 3, 16, 16]);
    let index: Vec<i64> = Vec::try_from(&b.index).unwrap();
    assert!(
        !index.contains(&3),
        "the broken file (sample 3) is left out"
    );
    assert_eq!(b.labels.size(), [6]);
    assert_eq!(s.train.files.as_ref().unwrap().skipped(), 1);
}

/// The table that normalises decoded pixels gives what torch computes for
/// in-memory images (`/ 255`, `- mean`, `/ std` in f32), bit for bit.
#[test]
fn tabulated_normalisation_equals_torch() {
    let (mean, std) = (kd_data::IMAGENET_MEAN, kd_data::IMAGENET_STD);
    let norm = Normalization::new(mean, std);
    let values: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
    let mut got = vec![0f32; values.len()];
    norm.apply(&values, &mut got);
    let stat = |v: [f64; 3]| Tensor::from_slice(&v).to_kind(Kind::Float).view([1, 3]);
    let want = (Tensor::from_slice(&values)
        .view([256, 3])
        .to_kind(Kind::Float)
        / 255.0
        - stat(mean))
        / stat(std);
    assert!(Tensor::from_slice(&got).view([256, 3]).equal(&want));
}
