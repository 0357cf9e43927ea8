//! The binary versions of CIFAR-10 (`cifar-10-batches-bin`) and CIFAR-100
//! (`cifar-100-binary`): fixed-size records of label byte(s) then 3072 pixel
//! bytes, channel-major (1024 red, 1024 green, 1024 blue).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::{DataError, Dataset};

const PIXELS: usize = 3 * 32 * 32;
// KD-Zoo's CIFAR-10 constants (train_kd.py) and RepDistiller's CIFAR-100
// ones (dataset/cifar100.py): what CIFAR runs were always normalised with.
pub(crate) const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub(crate) const CIFAR10_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
pub(crate) const CIFAR100_MEAN: [f64; 3] = [0.5071, 0.4867, 0.4408];
pub(crate) const CIFAR100_STD: [f64; 3] = [0.2675, 0.2565, 0.2761];
/// KD-Zoo's CIFAR-100 constants (train_kd.py, train_ft.py, ...).
pub(crate) const KDZOO_CIFAR100_MEAN: [f64; 3] = [0.5071, 0.4865, 0.4409];
pub(crate) const KDZOO_CIFAR100_STD: [f64; 3] = [0.2673, 0.2564, 0.2762];

/// Reads files of records `[label bytes][3072 pixels]`; `label_at` picks the
/// byte that holds the label (CIFAR-100: 0 coarse, 1 fine).
fn read_records(
    files: &[&Path],
    label_bytes: usize,
    label_at: usize,
    classes: i64,
) -> Result<(Tensor, Tensor), DataError> {
    let record = label_bytes + PIXELS;
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| DataError::File {
            path: path.to_path_buf(),
            msg: format!(
                "cannot read ({e}); expected a CIFAR binary file of {record}-byte records"
            ),
        })?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(DataError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "{} bytes is not a whole number of {record}-byte CIFAR records",
                    bytes.len()
                ),
            });
        }
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[label_at] as i64;
            if label >= classes {
                return Err(DataError::File {
                    path: path.to_path_buf(),
                    msg: format!("record {i} has label {label}, expected 0..{classes}"),
                });
            }
            labels.push(label);
            pixels.extend_from_slice(&rec[label_bytes..]);
        }
    }
    let n = labels.len() as i64;
    Ok((
        Tensor::from_slice(&pixels).view([n, 3, 32, 32]),
        Tensor::from_slice(&labels).to_kind(Kind::Int64),
    ))
}

fn dataset(images: Tensor, labels: Tensor, classes: i64, mean: [f64; 3], std: [f64; 3]) -> Dataset {
    Dataset {
        images,
        labels,
        num_classes: classes,
        mean,
        std,
        files: None,
    }
}

/// The files of a CIFAR-10 folder and their record size.
fn cifar10_files(dir: &Path) -> (Vec<std::path::PathBuf>, usize) {
    let mut files: Vec<_> = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .collect();
    files.push(dir.join("test_batch.bin"));
    (files, 1 + PIXELS)
}

/// The files of a CIFAR-100 folder and their record size.
fn cifar100_files(dir: &Path) -> (Vec<std::path::PathBuf>, usize) {
    (
        vec![dir.join("train.bin"), dir.join("test.bin")],
        2 + PIXELS,
    )
}

/// Checks, without reading them, that a folder has every file the loader
/// reads, each a whole number of records; so a run that would fail on its
/// data fails before anything trains. `hundred`: CIFAR-100's layout.
pub fn check_folder(dir: &Path, hundred: bool) -> Result<(), DataError> {
    let (files, record) = if hundred {
        cifar100_files(dir)
    } else {
        cifar10_files(dir)
    };
    if !dir.is_dir() {
        let names: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        return Err(DataError::File {
            path: dir.to_path_buf(),
            msg: format!("no such folder; expected one holding {}", names.join(", ")),
        });
    }
    for path in files {
        let len = std::fs::metadata(&path)
            .map_err(|e| DataError::File {
                path: path.clone(),
                msg: format!("missing from the data folder ({e})"),
            })?
            .len() as usize;
        if len == 0 || !len.is_multiple_of(record) {
            return Err(DataError::File {
                path,
                msg: format!("{len} bytes is not a whole number of {record}-byte CIFAR records"),
            });
        }
    }
    Ok(())
}

/// Writes a CIFAR folder in the real binary layout with `n_train` training
/// records (per file, for CIFAR-10's five) and `n_test` test records:
/// labels cycle through the classes, pixels are a fixed pattern. For tests
/// and examples that need a data folder where the real one cannot be had.
pub fn write_folder(
    dir: &Path,
    hundred: bool,
    n_train: usize,
    n_test: usize,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (files, record) = if hundred {
        cifar100_files(dir)
    } else {
        cifar10_files(dir)
    };
    let last = files.len() - 1;
    for (f, path) in files.iter().enumerate() {
        let n = if f == last { n_test } else { n_train };
        let mut bytes = Vec::with_capacity(n * record);
        for i in 0..n {
            let label = (i % if hundred { 100 } else { 10 }) as u8;
            if hundred {
                bytes.push(label / 5);
            }
            bytes.push(label);
            bytes.extend((0..PIXELS).map(|p| ((p * 7 + i * 13 + f) % 256) as u8));
        }
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// Reads `dir/data_batch_{1..5}.bin` (train) and `dir/test_batch.bin` (test).
pub fn read_cifar10(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    let (files, _) = cifar10_files(dir);
    let train_refs: Vec<&Path> = files[..5].iter().map(|p| p.as_path()).collect();
    let (xi, yi) = read_records(&train_refs, 1, 0, 10)?;
    let (xt, yt) = read_records(&[&dir.join("test_batch.bin")], 1, 0, 10)?;
    Ok((
        dataset(xi, yi, 10, CIFAR10_MEAN, CIFAR10_STD),
        dataset(xt, yt, 10, CIFAR10_MEAN, CIFAR10_STD),
    ))
}

/// Reads `dir/train.bin` and `dir/test.bin` with their fine (100-class) labels.
pub fn read_cifar100(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    let (xi, yi) = read_records(&[&dir.join("train.bin")], 2, 1, 100)?;
    let (xt, yt) = read_records(&[&dir.join("test.bin")], 2, 1, 100)?;
    Ok((
        dataset(xi, yi, 100, CIFAR100_MEAN, CIFAR100_STD),
        dataset(xt, yt, 100, CIFAR100_MEAN, CIFAR100_STD),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `n` records whose pixels encode (record, channel) so layout
    /// errors show up as wrong values.
    fn write(path: &Path, n: usize, label_bytes: usize, label: impl Fn(usize) -> Vec<u8>) {
        let mut bytes = Vec::new();
        for i in 0..n {
            let l = label(i);
            assert_eq!(l.len(), label_bytes);
            bytes.extend(l);
            for c in 0..3 {
                bytes.extend(std::iter::repeat_n((i * 3 + c) as u8, 1024));
            }
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn cifar10_reads_all_batches_channel_major() {
        let dir = tempfile::tempdir().unwrap();
        for b in 1..=5 {
            write(&dir.path().join(format!("data_batch_{b}.bin")), 2, 1, |i| {
                vec![(i + b) as u8 % 10]
            });
        }
        write(&dir.path().join("test_batch.bin"), 3, 1, |i| vec![i as u8]);
        let (train, test) = read_cifar10(dir.path()).unwrap();
        assert_eq!(train.images.size(), [10, 3, 32, 32]);
        assert_eq!(test.len(), 3);
        assert_eq!(
            Vec::<i64>::try_from(&train.labels).unwrap(),
            [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
        );
        // record 1 of the test file: channel c is filled with 3 + c
        let px = test.images.get(1);
        for c in 0..3 {
            assert_eq!(px.get(c).get(31).int64_value(&[5]), 3 + c);
        }
    }

    #[test]
    fn cifar100_uses_fine_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("train.bin"), 4, 2, |i| {
            vec![7, 90 + i as u8]
        });
        write(&dir.path().join("test.bin"), 1, 2, |_| vec![1, 42]);
        let (train, test) = read_cifar100(dir.path()).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&train.labels).unwrap(),
            [90, 91, 92, 93]
        );
        assert_eq!(test.labels.int64_value(&[0]), 42);
        assert_eq!(train.num_classes, 100);
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_cifar100(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("train.bin") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_says_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.bin"), vec![0u8; 3000]).unwrap();
        let err = read_cifar100(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("3000 bytes is not a whole number of 3074-byte CIFAR records"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_label_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for b in 1..=5 {
            write(
                &dir.path().join(format!("data_batch_{b}.bin")),
                1,
                1,
                |_| vec![12],
            );
        }
        write(&dir.path().join("test_batch.bin"), 1, 1, |_| vec![0]);
        let err = read_cifar10(dir.path()).unwrap_err().to_string();
        assert!(err.contains("label 12, expected 0..10"), "{err}");
    }
}
