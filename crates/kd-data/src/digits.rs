//! The UCI handwritten digits (scikit-learn's `load_digits`): 1,797 real
//! 8×8 grey images of 10 classes. `scripts/digits.py`, run by the
//! bootstrap, writes them enlarged to 32×32 in CIFAR-10's binary layout
//! (test set: every fifth image), so they are read like CIFAR-10 and
//! normalised with their own training statistics.

use std::path::PathBuf;

use crate::{DataError, Dataset, cifar};

/// Training images the bootstrap writes (1,797 less every fifth).
pub(crate) const TRAIN_SIZE: i64 = 1438;

/// Where the bootstrap writes the set: `$KD_CACHE/digits`, the cache
/// defaulting to `~/.cache/kd`.
pub fn folder() -> PathBuf {
    let cache = std::env::var_os("KD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kd")))
        .unwrap_or_else(|| PathBuf::from(".cache/kd"));
    cache.join("digits")
}

fn missing(e: DataError) -> DataError {
    DataError::Invalid(format!(
        "the digits set is not ready ({e}); `make bootstrap` writes it \
         (python scripts/digits.py {})",
        folder().display()
    ))
}

pub(crate) fn check() -> Result<(), DataError> {
    cifar::check_folder(&folder(), false).map_err(missing)
}

pub(crate) fn read() -> Result<(Dataset, Dataset), DataError> {
    check()?;
    let (mut train, mut test) = cifar::read_cifar10(&folder())?;
    let (mean, std) = crate::channel_stats(&train.images);
    for d in [&mut train, &mut test] {
        (d.mean, d.std) = (mean, std);
    }
    Ok((train, test))
}
