//! The embedded synthetic data set: CIFAR-shaped images drawn procedurally
//! from a seed, so the demo and the tests need no download.
//!
//! Classes come in sibling pairs. A pair shares a coarse oriented grating;
//! each class adds a finer grating of its own, weaker than the shared one,
//! and every image carries random distractor gratings and pixel noise. A
//! fraction of training labels is flipped to the sibling class. The result
//! is learnable but not saturated by a small network, and the teacher's soft
//! outputs (which sibling is likely) carry information that hard labels lack,
//! which is what distillation can exploit.

use std::f64::consts::PI;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{DataError, Dataset};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of classes (even: classes come in sibling pairs).
    pub classes: i64,
    pub train_size: i64,
    pub test_size: i64,
    /// Seed of the class prototypes and of every sample.
    pub seed: u64,
    /// Pixel noise standard deviation, in [0, 1] intensity units.
    pub noise: f64,
    /// Fraction of training labels flipped to the sibling class.
    pub label_noise: f64,
}

impl SyntheticConfig {
    /// Refuses a configuration `generate` cannot honour.
    pub fn check(&self) -> Result<(), DataError> {
        // The set is generated into memory (3 KB an image) and its classes
        // size every classifier: bounds that keep both within a machine.
        if self.classes < 2 || self.classes % 2 != 0 || self.classes > MAX_CLASSES {
            return Err(DataError::Invalid(format!(
                "synthetic classes must be even, from 2 to {MAX_CLASSES}, got {}",
                self.classes
            )));
        }
        let sizes = 1..=MAX_SAMPLES;
        if !sizes.contains(&self.train_size) || !sizes.contains(&self.test_size) {
            return Err(DataError::Invalid(format!(
                "synthetic train_size and test_size must be from 1 to {MAX_SAMPLES}, got {} and {}",
                self.train_size, self.test_size
            )));
        }
        if !(0.0..0.5).contains(&self.label_noise) {
            return Err(DataError::Invalid(format!(
                "synthetic label_noise must be in [0, 0.5), got {}",
                self.label_noise
            )));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(DataError::Invalid(format!(
                "synthetic noise must be a finite number >= 0, got {}",
                self.noise
            )));
        }
        Ok(())
    }
}

const MAX_CLASSES: i64 = 10_000;
const MAX_SAMPLES: i64 = 1_000_000;

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            classes: 10,
            train_size: 5000,
            test_size: 1000,
            seed: 0,
            noise: 0.12,
            label_noise: 0.1,
        }
    }
}

const SIDE: i64 = 32;

/// Random tensors from our own seeded stream: torch's global generator is
/// shared by every thread, so it cannot make the data a function of the seed.
struct Noise(ChaCha8Rng);

impl Noise {
    fn rand(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.0.random::<f32>()).collect();
        Tensor::from_slice(&v).view(shape)
    }

    /// Standard normal draws by Box-Muller.
    fn randn(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let mut v = Vec::with_capacity(n as usize + 1);
        while (v.len() as i64) < n {
            let (u1, u2): (f64, f64) = (1.0 - self.0.random::<f64>(), self.0.random());
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((r * (2.0 * PI * u2).cos()) as f32);
            v.push((r * (2.0 * PI * u2).sin()) as f32);
        }
        v.truncate(n as usize);
        Tensor::from_slice(&v).view(shape)
    }
}

struct Prototypes {
    /// Per group: frequency (cycles per image), orientation, RGB colour.
    group: Tensor,
    /// Per class: the same for its own grating.
    class: Tensor,
}

fn prototypes(classes: i64, rng: &mut Noise) -> Prototypes {
    let groups = classes / 2;
    let mut spread = |n: i64, lo: f64, hi: f64| rng.rand(&[n, 1]) * (hi - lo) + lo;
    let (gf, cf) = (spread(groups, 1.5, 3.5), spread(classes, 4.0, 7.0));
    let group = Tensor::cat(
        &[
            gf,
            rng.rand(&[groups, 1]) * PI,
            rng.rand(&[groups, 3]) * 2.0 - 1.0,
        ],
        1,
    );
    // Siblings' own gratings differ in orientation by at least 45 degrees.
    let base = rng.rand(&[groups, 1]) * PI;
    let sibling_angle = Tensor::cat(
        &[
            &base,
            &(&base + PI / 4.0 + rng.rand(&[groups, 1]) * (PI / 2.0)),
        ],
        1,
    )
    .view([classes, 1]);
    let class = Tensor::cat(&[cf, sibling_angle, rng.rand(&[classes, 3]) * 2.0 - 1.0], 1);
    Prototypes { group, class }
}

/// `amp · sin(2π f (u cos θ + v sin θ) + φ)` coloured per channel, summed
/// over gratings: params `[N, G, 6]` (f, θ, r, g, b, φ), amps `[N, G]`.
fn render(params: &Tensor, amps: &Tensor) -> Tensor {
    let opts = (Kind::Float, params.device());
    let coord = Tensor::arange(SIDE, opts) / SIDE as f64;
    let (u, v) = (coord.view([1, 1, 1, SIDE]), coord.view([1, 1, SIDE, 1]));
    let p = |i: i64| params.select(2, i).unsqueeze(-1).unsqueeze(-1);
    let (f, theta, phase) = (p(0), p(1), p(5));
    let wave = ((u * theta.cos() + v * theta.sin()) * f * (2.0 * PI) + phase).sin()
        * amps.unsqueeze(-1).unsqueeze(-1);
    let colour = params.narrow(2, 2, 3);
    Tensor::einsum("ngc,nghw->nchw", &[colour, wave], None::<i64>)
}

/// A prototype grating `[n, 2 + 3]` (f, θ, rgb) with per-sample jitter and
/// a random phase appended.
fn jitter(t: &Tensor, rng: &mut Noise) -> Tensor {
    let n = t.size()[0];
    let f = t.select(1, 0) * (rng.randn(&[n]) * 0.08 + 1.0);
    let th = t.select(1, 1) + rng.randn(&[n]) * 0.12;
    let col = t.narrow(1, 2, 3) + rng.randn(&[n, 3]) * 0.15;
    Tensor::cat(
        &[
            f.unsqueeze(1),
            th.unsqueeze(1),
            col,
            rng.rand(&[n, 1]) * (2.0 * PI),
        ],
        1,
    )
}

fn distractor(n: i64, rng: &mut Noise) -> Tensor {
    let f = rng.rand(&[n, 1]) * 6.0 + 1.0;
    let th = rng.rand(&[n, 1]) * PI;
    let col = rng.rand(&[n, 3]) * 2.0 - 1.0;
    Tensor::cat(&[f, th, col, rng.rand(&[n, 1]) * (2.0 * PI)], 1)
}

fn draw(protos: &Prototypes, labels: &Tensor, noise: f64, rng: &mut Noise) -> Tensor {
    let n = labels.size()[0];
    let group = jitter(
        &protos
            .group
            .index_select(0, &labels.divide_scalar_mode(2, "floor")),
        rng,
    );
    let own = jitter(&protos.class.index_select(0, labels), rng);
    let params = Tensor::stack(&[group, own, distractor(n, rng), distractor(n, rng)], 1);
    let amps = Tensor::stack(
        &[
            rng.rand(&[n]) * 0.15 + 0.2,
            rng.rand(&[n]) * 0.1 + 0.08,
            rng.rand(&[n]) * 0.15,
            rng.rand(&[n]) * 0.15,
        ],
        1,
    );
    let img = render(&params, &amps) + 0.5 + rng.randn(&[n, 3, SIDE, SIDE]) * noise;
    (img.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8)
}

pub(crate) fn generate(cfg: &SyntheticConfig) -> Result<(Dataset, Dataset), DataError> {
    cfg.check()?;
    let rng = &mut Noise(ChaCha8Rng::seed_from_u64(cfg.seed));
    let protos = prototypes(cfg.classes, rng);
    let balanced = |n: i64| Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(cfg.classes);
    let train_y = balanced(cfg.train_size);
    let test_y = balanced(cfg.test_size);
    let train_x = draw(&protos, &train_y, cfg.noise, rng);
    let test_x = draw(&protos, &test_y, cfg.noise, rng);
    let flip = rng.rand(&[cfg.train_size]).lt(cfg.label_noise);
    let sibling = train_y.bitwise_xor(1);
    let train_y = sibling.where_self(&flip, &train_y);
    let (mean, std) = crate::channel_stats(&train_x);
    let make = |images, labels| Dataset {
        images,
        labels,
        num_classes: cfg.classes,
        mean,
        std,
        files: None,
    };
    Ok((make(train_x, train_y), make(test_x, test_y)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            train_size: 200,
            test_size: 50,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let (a, _) = generate(&small()).unwrap();
        let (b, _) = generate(&small()).unwrap();
        let (c, _) = generate(&SyntheticConfig { seed: 1, ..small() }).unwrap();
        assert!(a.images.equal(&b.images) && a.labels.equal(&b.labels));
        assert!(!a.images.equal(&c.images));
        assert_eq!(a.images.size(), [200, 3, 32, 32]);
        assert_eq!(a.images.kind(), Kind::Uint8);
    }

    #[test]
    fn label_noise_flips_to_siblings_only() {
        let cfg = SyntheticConfig {
            train_size: 2000,
            label_noise: 0.2,
            ..small()
        };
        let (train, test) = generate(&cfg).unwrap();
        let clean = Tensor::arange(2000, (Kind::Int64, Device::Cpu)).remainder(10);
        let changed = train.labels.ne_tensor(&clean);
        let rate = changed
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((0.15..0.25).contains(&rate), "flip rate {rate}");
        assert!(
            train
                .labels
                .eq_tensor(&clean.bitwise_xor(1))
                .logical_or(&changed.logical_not())
                .all()
                .int64_value(&[])
                == 1
        );
        assert!(
            test.labels
                .equal(&Tensor::arange(50, (Kind::Int64, Device::Cpu)).remainder(10)),
            "test labels stay clean"
        );
    }

    #[test]
    fn odd_classes_are_refused() {
        let err = generate(&SyntheticConfig {
            classes: 7,
            ..small()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("even"), "{err}");
    }
}
