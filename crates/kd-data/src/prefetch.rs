//! One batch of image files decoded ahead: while the current batch trains
//! (or is evaluated), a background thread has rayon's workers decode the
//! next, and the batch waits in page-locked memory when it goes to CUDA.

use std::cell::RefCell;
use std::sync::mpsc;

use tch::{Device, Kind, Tensor};

use crate::folder::{Decoded, FileImages, Transform};
use crate::transform::Normalization;
use crate::{DataError, Dataset};

struct Pending {
    idx: Vec<i64>,
    how: Transform,
    rx: mpsc::Receiver<Result<Decoded, DataError>>,
}

/// A slot for the one batch decoded ahead.
#[derive(Default)]
pub(crate) struct Prefetcher {
    pending: RefCell<Option<Pending>>,
}

/// The device pixels are pinned for: CUDA only.
pub(crate) fn pin_for(device: Device) -> Option<Device> {
    matches!(device, Device::Cuda(_)).then_some(device)
}

impl Prefetcher {
    /// Samples `idx` decoded with `how`: the batch decoded ahead when it
    /// is that one, else decoded now.
    pub(crate) fn get(
        &self,
        files: &FileImages,
        idx: &[i64],
        how: Transform,
        norm: &Normalization,
        device: Device,
    ) -> Result<Decoded, DataError> {
        if let Some(p) = self.pending.borrow_mut().take()
            && p.how == how
            && p.idx == idx
            && let Ok(decoded) = p.rx.recv()
        {
            return decoded;
        }
        // Another batch was asked for (or the thread could not report):
        // a batch decoded ahead is dropped unseen.
        files.decode(idx, how, norm, pin_for(device))
    }

    /// Starts decoding samples `idx` in the background. Without a thread
    /// (the system refused one) the batch is decoded when asked for.
    pub(crate) fn start(
        &self,
        files: &FileImages,
        idx: Vec<i64>,
        how: Transform,
        norm: &Normalization,
        device: Device,
    ) {
        let (tx, rx) = mpsc::channel();
        let (files, ahead, norm) = (files.clone(), idx.clone(), norm.clone());
        let spawned = std::thread::Builder::new()
            .name("kd-prefetch".into())
            .spawn(move || {
                // The receiver is gone when the batch is no longer wanted.
                let _ = tx.send(files.decode(&ahead, how, &norm, pin_for(device)));
            });
        *self.pending.borrow_mut() = spawned.ok().map(|_| Pending { idx, how, rx });
    }
}

/// A decoded batch on `device` as `[n, 3, S, S]`: copied without blocking
/// the host (from pinned memory on CUDA), and seen through a transpose of
/// the decoders' NHWC, which is channels-last memory.
pub(crate) fn to_device(images: &Tensor, device: Device) -> Tensor {
    images
        .to_device_(device, Kind::Float, true, false)
        .permute([0, 3, 1, 2])
}

/// A data set's mean and std as `[1, 3, 1, 1]` on `device`.
pub(crate) fn stats(data: &Dataset, device: Device) -> (Tensor, Tensor) {
    let t = |v: [f64; 3]| {
        Tensor::from_slice(&v)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
            .to_device(device)
    };
    (t(data.mean), t(data.std))
}

/// A data set's samples `lo..hi` in batches for evaluation: normalised
/// images `[n, 3, S, S]` and labels, both on the device. In-memory images
/// are sliced and normalised there; image files are decoded with the
/// evaluation transform, the next batch in the background.
pub struct EvalBatches<'a> {
    data: &'a Dataset,
    start: i64,
    hi: i64,
    batch_size: i64,
    device: Device,
    mean: Tensor,
    std: Tensor,
    norm: Normalization,
    prefetch: Prefetcher,
}

impl Dataset {
    pub fn eval_batches(
        &self,
        lo: i64,
        hi: i64,
        batch_size: usize,
        device: Device,
    ) -> EvalBatches<'_> {
        let (mean, std) = stats(self, device);
        EvalBatches {
            data: self,
            start: lo,
            hi: hi.min(self.len()),
            batch_size: batch_size.max(1) as i64,
            device,
            mean,
            std,
            norm: Normalization::new(self.mean, self.std),
            prefetch: Prefetcher::default(),
        }
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Result<(Tensor, Tensor), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.start >= self.hi {
            return None;
        }
        let (start, device) = (self.start, self.device);
        let len = self.batch_size.min(self.hi - start);
        self.start += len;
        let Some(files) = &self.data.files else {
            let raw = self.data.images.narrow(0, start, len).to_device(device);
            let x = (raw.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std;
            let y = self.data.labels.narrow(0, start, len).to_device(device);
            return Some(Ok((x, y)));
        };
        let idx: Vec<i64> = (start..start + len).collect();
        let decoded = self
            .prefetch
            .get(files, &idx, Transform::Eval, &self.norm, device);
        if self.start < self.hi {
            let end = (self.start + self.batch_size).min(self.hi);
            let next = (self.start..end).collect();
            self.prefetch
                .start(files, next, Transform::Eval, &self.norm, device);
        }
        Some(decoded.map(|d| {
            let kept: Vec<i64> = d.kept.iter().map(|&p| idx[p]).collect();
            let at = Tensor::from_slice(&kept).to_device(self.data.labels.device());
            let labels = self.data.labels.index_select(0, &at);
            (to_device(&d.images, device), labels.to_device(device))
        }))
    }
}
