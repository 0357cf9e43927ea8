//! Step values not yet read back to the host. The stage loop reads them
//! every few steps in one copy, so the device runs ahead of the host
//! instead of stopping at every step to report its loss.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::step::StepOut;
use crate::Result;

struct Row {
    step: usize,
    lr: f64,
    at: Instant,
    out: StepOut,
}

/// One step's values on the host.
pub(crate) struct StepValues {
    pub(crate) step: usize,
    pub(crate) lr: f64,
    /// When the host issued the step (for images/s).
    pub(crate) at: Instant,
    pub(crate) weights: Vec<f64>,
    /// `label/term` and its value, before the weight.
    pub(crate) terms: Vec<(String, f64)>,
    pub(crate) total: f64,
    pub(crate) correct: i64,
    pub(crate) n: i64,
}

impl StepValues {
    /// The first term (or the total) that is not a finite number.
    pub(crate) fn non_finite(&self) -> Option<(String, f64)> {
        self.terms
            .iter()
            .find(|(_, v)| !v.is_finite())
            .cloned()
            .or_else(|| (!self.total.is_finite()).then(|| ("total".to_string(), self.total)))
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    rows: Vec<Row>,
}

impl Pending {
    pub(crate) fn push(&mut self, step: usize, lr: f64, out: StepOut) {
        self.rows.push(Row {
            step,
            lr,
            at: Instant::now(),
            out,
        });
    }

    /// Every pending step's values, in order, through one device-to-host copy.
    pub(crate) fn read(&mut self) -> Result<Vec<StepValues>> {
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<&Tensor> = self.rows.iter().map(|r| &r.out.values).collect();
        let host: Vec<f64> = Vec::try_from(
            Tensor::cat(&parts, 0)
                .to_device(Device::Cpu)
                .to_kind(Kind::Double),
        )?;
        let mut at = 0;
        let mut out = Vec::with_capacity(self.rows.len());
        for row in self.rows.drain(..) {
            let k = row.out.names.len();
            let v = &host[at..at + k + 2];
            at += k + 2;
            out.push(StepValues {
                step: row.step,
                lr: row.lr,
                at: row.at,
                weights: row.out.weights,
                terms: row
                    .out
                    .names
                    .into_iter()
                    .zip(v[..k].iter().copied())
                    .collect(),
                total: v[k],
                correct: v[k + 1] as i64,
                n: row.out.n,
            });
        }
        Ok(out)
    }
}
