//! torchvision's `ImageFolder` layout: `ROOT/train/<class>/…` and
//! `ROOT/val/<class>/…`, classes the sorted names of the class folders
//! (the same in both splits), each class's files found recursively and
//! sorted as `ImageFolder` sorts them. Only the file list is held in
//! memory; images are decoded and transformed batch by batch on rayon's
//! worker threads (`transform`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::loader::mix;
use crate::timm_augment::{TimmRandAugment, augment_hwc, keyed_draw};
use crate::transform::{self, Normalization, Scratch};
use crate::{DataError, Dataset};

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively at the end
/// of the file name. kd decodes the JPEG and PNG files among them; the
/// others fail to decode (see `skip_corrupt`).
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// ImageNet's per-channel mean and std, torchvision's normalisation of
/// every ImageNet model: the default of ImageFolder sets.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// How an ImageFolder set is read, as its data source says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderConfig {
    /// Side of the square images a batch holds.
    pub image_size: u32,
    /// Shorter side of the image before evaluation's centre crop.
    pub resize_size: u32,
    /// Leave out files that fail to decode, with a warning, instead of
    /// failing the run.
    pub skip_corrupt: bool,
}

impl FolderConfig {
    /// Upper bound of `image_size` and `resize_size`: far above any
    /// model's input, low enough that a typo cannot ask for gigabytes per
    /// batch.
    pub const MAX_SIDE: u32 = 4096;

    pub fn check(&self) -> Result<(), DataError> {
        for (name, v) in [
            ("image_size", self.image_size),
            ("resize_size", self.resize_size),
        ] {
            if !(1..=Self::MAX_SIDE).contains(&v) {
                return Err(DataError::Invalid(format!(
                    "imagefolder {name} must be in 1..={} pixels, got {v}",
                    Self::MAX_SIDE
                )));
            }
        }
        Ok(())
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

const LAYOUT: &str = "an ImageFolder root holds train/ and val/, each with one folder per class";

fn is_image(path: &Path) -> bool {
    let name = path.to_string_lossy().to_lowercase();
    IMG_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// The sorted names of the folders in `dir` (symbolic links followed).
fn class_names(dir: &Path) -> Result<Vec<String>, DataError> {
    if !dir.is_dir() {
        return Err(file_err(dir, format!("no such folder; {LAYOUT}")));
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| file_err(dir, e.to_string()))? {
        let entry = entry.map_err(|e| file_err(dir, e.to_string()))?;
        if entry.path().is_dir() {
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                file_err(&entry.path(), "the class folder's name is not valid UTF-8")
            })?;
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The image files under `dir`, in `ImageFolder`'s order: folders by their
/// path (`sorted(os.walk(dir))`), then the files of each by name. Each
/// folder is read once, and only symbolic links are followed with a `stat`
/// (a listing of ImageNet would otherwise stat 1.3 million files).
fn class_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut pending = vec![dir.to_path_buf()];
    let mut folders: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    while let Some(here) = pending.pop() {
        let mut files = Vec::new();
        for entry in fs::read_dir(&here).map_err(|e| file_err(&here, e.to_string()))? {
            let entry = entry.map_err(|e| file_err(&here, e.to_string()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| file_err(&path, e.to_string()))?;
            // os.walk(followlinks=True): a link to a folder is a folder.
            let is_dir = kind.is_dir() || (kind.is_symlink() && path.is_dir());
            if is_dir {
                pending.push(path);
            } else if is_image(&path) {
                files.push(path);
            }
        }
        folders.push((here, files));
    }
    // Python compares the paths as strings (`a/b-c` before `a/b/c`), not
    // component by component as `Path`'s ordering does.
    folders.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    for (_, mut files) in folders {
        files.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
        out.extend(files);
    }
    Ok(())
}

/// One split's classes and its files with their labels.
struct Listing {
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<i64>,
}

fn list_split(root: &Path, split: &str) -> Result<Listing, DataError> {
    let dir = root.join(split);
    let classes = class_names(&dir)?;
    if classes.is_empty() {
        return Err(file_err(&dir, format!("no class folders; {LAYOUT}")));
    }
    let (mut files, mut labels, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate() {
        let before = files.len();
        class_files(&dir.join(class), &mut files)?;
        if files.len() == before {
            empty.push(class.as_str());
        }
        labels.resize(files.len(), label as i64);
    }
    // torchvision refuses a class without images (its label would never
    // be seen); so does kd.
    if !empty.is_empty() {
        return Err(file_err(
            &dir,
            format!(
                "no image file in class folder(s) {}; image files end in {}",
                empty.join(", "),
                IMG_EXTENSIONS.join(", ")
            ),
        ));
    }
    Ok(Listing {
        classes,
        files,
        labels,
    })
}

/// The train and val listings, checked to name the same classes.
fn list(root: &Path) -> Result<(Listing, Listing), DataError> {
    if !root.is_dir() {
        return Err(file_err(root, format!("no such folder; {LAYOUT}")));
    }
    let train = list_split(root, "train")?;
    let val = list_split(root, "val")?;
    if train.classes != val.classes {
        let (t, v): (BTreeSet<_>, BTreeSet<_>) =
            (train.classes.iter().collect(), val.classes.iter().collect());
        let only = |a: &BTreeSet<&String>, b: &BTreeSet<&String>| {
            let names: Vec<&str> = a.difference(b).take(5).map(|s| s.as_str()).collect();
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        };
        return Err(file_err(
            root,
            format!(
                "train/ and val/ must hold the same class folders; only in train/: {}; only in val/: {}",
                only(&t, &v),
                only(&v, &t)
            ),
        ));
    }
    Ok((train, val))
}

/// Checks the folder's layout by listing it: both splits, the same class
/// folders, an image in each class.
pub(crate) fn check(root: &Path, cfg: &FolderConfig) -> Result<(), DataError> {
    cfg.check()?;
    list(root).map(|_| ())
}

/// Training-set size and number of classes, by listing the files.
pub(crate) fn describe(root: &Path) -> Result<(i64, i64), DataError> {
    let (train, _) = list(root)?;
    Ok((train.files.len() as i64, train.classes.len() as i64))
}

/// The train and val splits as file-backed data sets.
pub(crate) fn read(root: &Path, cfg: &FolderConfig) -> Result<(Dataset, Dataset), DataError> {
    cfg.check()?;
    let (train, val) = list(root)?;
    let warned = Arc::new(Mutex::new(BTreeSet::new()));
    let make = |l: Listing| {
        let set = Arc::new(FileSet {
            paths: l.files,
            cfg: *cfg,
            warned: warned.clone(),
        });
        let n = set.paths.len();
        Dataset {
            images: Tensor::zeros(
                [0, 3, cfg.image_size as i64, cfg.image_size as i64],
                (Kind::Uint8, Device::Cpu),
            ),
            labels: Tensor::from_slice(&l.labels),
            num_classes: l.classes.len() as i64,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            files: Some(FileImages {
                set,
                pick: (0..n as u32).collect::<Vec<_>>().into(),
            }),
        }
    };
    Ok((make(train), make(val)))
}

/// Files of one split, shared by the data sets selected from it.
struct FileSet {
    paths: Vec<PathBuf>,
    cfg: FolderConfig,
    /// Files already reported as skipped (by any split of the folder).
    warned: Arc<Mutex<BTreeSet<PathBuf>>>,
}

/// A data set's images as files: sample `i` is file `pick[i]` of the split.
#[derive(Clone)]
pub struct FileImages {
    set: Arc<FileSet>,
    pick: Arc<[u32]>,
}

impl std::fmt::Debug for FileImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FileImages({} of {} files, {:?})",
            self.pick.len(),
            self.set.paths.len(),
            self.set.cfg
        )
    }
}

/// How a sample is transformed: training's random crop and flip drawn
/// from `(seed, epoch)` and the sample's index, or evaluation's resize and
/// centre crop.
/// With `rand_augment`, timm's RandAugment (and its fill colour) follows
/// the crop and flip, its draws keyed by (seed, epoch, sample index) too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Train {
        seed: u64,
        epoch: usize,
        rand_augment: Option<(TimmRandAugment, [f32; 3])>,
    },
    Eval,
}

/// Tells the per-sample augmentation stream apart from the loader's
/// per-batch stream, which `mix` keys with the same seed and epoch.
const SAMPLE_STREAM: u64 = 0x5A4D_504C_4520_4155;

/// A batch of decoded samples: `images`, normalised `f32 [n, S, S, 3]`
/// (NHWC, as the decoders write them), and which requested samples they
/// are (all of them, unless corrupt files were skipped).
pub struct Decoded {
    pub images: Tensor,
    pub kept: Vec<usize>,
}

impl FileImages {
    pub fn len(&self) -> usize {
        self.pick.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pick.is_empty()
    }

    pub fn config(&self) -> FolderConfig {
        self.set.cfg
    }

    /// The path of sample `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.set.paths[self.pick[i] as usize]
    }

    /// The samples at positions `index` of this set.
    pub fn select(&self, index: &[i64]) -> FileImages {
        FileImages {
            set: self.set.clone(),
            pick: index.iter().map(|&i| self.pick[i as usize]).collect(),
        }
    }

    /// Decodes, transforms and normalises samples `idx` in parallel on
    /// rayon's pool. A file that cannot be read or decoded is an error
    /// naming it, or, with `skip_corrupt`, left out of the batch (reported
    /// once). `pin`: a CUDA device, whose copies then read the batch from
    /// page-locked memory without blocking the host.
    pub fn decode(
        &self,
        idx: &[i64],
        how: Transform,
        norm: &Normalization,
        pin: Option<Device>,
    ) -> Result<Decoded, DataError> {
        let s = self.set.cfg.image_size as i64;
        let per = (s * s * 3) as usize;
        let images = Tensor::empty([idx.len() as i64, s, s, 3], (Kind::Float, Device::Cpu));
        if idx.is_empty() {
            return Ok(Decoded {
                images,
                kept: Vec::new(),
            });
        }
        // SAFETY: `images` was just allocated, contiguous, of exactly
        // `idx.len() * per` f32 values; nothing else sees it until this
        // function returns it, and the slice does not outlive it.
        let buf: &mut [f32] = unsafe {
            std::slice::from_raw_parts_mut(images.data_ptr() as *mut f32, idx.len() * per)
        };
        let results: Vec<Result<(), String>> = buf
            .par_chunks_mut(per)
            .zip(idx.par_iter())
            .map_init(
                || (Scratch::default(), vec![0u8; per]),
                |(scratch, pixels), (out, &i)| {
                    self.one(i as usize, how, pixels, scratch)?;
                    norm.apply(pixels, out);
                    Ok(())
                },
            )
            .collect();
        let mut kept = Vec::with_capacity(idx.len());
        for (pos, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => kept.push(pos),
                Err(msg) => {
                    let path = self.path(idx[pos] as usize);
                    if !self.set.cfg.skip_corrupt {
                        return Err(file_err(
                            path,
                            format!("{msg} (set skip_corrupt to leave unreadable images out)"),
                        ));
                    }
                    self.warn(path, &msg);
                }
            }
        }
        // Close the gaps left by skipped samples, keeping the order.
        for (to, &from) in kept.iter().enumerate() {
            if to != from {
                buf.copy_within(from * per..(from + 1) * per, to * per);
            }
        }
        let images = images.narrow(0, 0, kept.len() as i64);
        let images = match pin {
            Some(d @ Device::Cuda(_)) => images.pin_memory(d),
            _ => images,
        };
        Ok(Decoded { images, kept })
    }

    /// Reads, decodes and transforms sample `i` into `out`.
    fn one(
        &self,
        i: usize,
        how: Transform,
        out: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<(), String> {
        let cfg = self.set.cfg;
        let bytes = fs::read(self.path(i)).map_err(|e| format!("cannot read: {e}"))?;
        let img = transform::decode(&bytes)?;
        match how {
            Transform::Eval => {
                transform::eval_into(&img, cfg.resize_size, cfg.image_size, out, scratch)
            }
            Transform::Train {
                seed,
                epoch,
                rand_augment,
            } => {
                // Keyed by the sample's index, so its crop does not depend
                // on the batch it falls in, the rank or the thread.
                let key = mix(seed ^ SAMPLE_STREAM, epoch as u64, i as u64);
                let mut rng = ChaCha8Rng::seed_from_u64(key);
                let crop = transform::random_resized_crop(img.width, img.height, &mut rng);
                let flip = rng.random_bool(0.5);
                transform::train_into(&img, crop, flip, cfg.image_size, out, scratch)?;
                if let Some((ra, fill)) = rand_augment {
                    let draw = keyed_draw(&ra, seed, epoch, i as u64);
                    augment_hwc(out, cfg.image_size as i64, &draw, fill);
                }
                Ok(())
            }
        }
    }

    fn warn(&self, path: &Path, msg: &str) {
        let mut warned = self.set.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.insert(path.to_path_buf()) {
            eprintln!(
                "warning: skipping unreadable image {}: {msg} ({} skipped so far)",
                path.display(),
                warned.len()
            );
        }
    }

    /// How many files have been skipped as unreadable so far (all splits).
    pub fn skipped(&self) -> usize {
        self.set.warned.lock().map(|w| w.len()).unwrap_or(0)
    }
}
