//! The per-row uniform draws a step hands `Method::attack_targets`.

use kd_core::Progress;
use tch::{Device, Tensor};

/// Where a step's per-row uniform draws (`Method::attack_targets`) come from.
pub(crate) enum Draws {
    /// Training: a ChaCha stream keyed by this stage seed and (epoch, batch),
    /// never torch's global generator, so that a resumed run draws exactly
    /// what the uninterrupted one did.
    Seeded(u64),
    /// Fixed by the caller (the conformance probe).
    Given(Tensor),
}

/// splitmix64 of a combined key: nearby keys give unrelated seeds.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Tells the draw stream apart from the loader's, which is keyed by the
/// same run seed.
const DRAW_STREAM: u64 = 0x6472_6177_735f_7631;

/// Tells torch's per-step seed apart from the draws.
const TORCH_STREAM: u64 = 0x746f_7263_685f_7631;

impl Draws {
    pub(crate) fn seeded(run_seed: u64, stage: usize) -> Draws {
        Draws::Seeded(mix(run_seed, stage as u64, DRAW_STREAM))
    }

    pub(crate) fn for_step(&self, p: Progress, rows: i64, device: Device) -> Tensor {
        use rand::{Rng, SeedableRng};
        match self {
            Draws::Seeded(seed) => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(
                    *seed,
                    p.epoch as u64,
                    p.step as u64,
                ));
                let u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                Tensor::from_slice(&u).to_device(device)
            }
            Draws::Given(u) => u.to_device(device),
        }
    }

    /// Seeds torch's generator for a training step, keyed like the draws:
    /// what the step's forward draws from it (a model's drop path, a
    /// foreign module's dropout) is a function of (seed, stage, epoch,
    /// batch), so a resumed run draws what the uninterrupted one did and a
    /// run of a lockstep group what it draws alone. Given draws (the probe)
    /// leave the generator to the caller.
    pub(crate) fn seed_torch(&self, p: Progress) {
        if let Draws::Seeded(seed) = self {
            tch::manual_seed(mix(*seed ^ TORCH_STREAM, p.epoch as u64, p.step as u64) as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    fn at(epoch: usize, step: usize) -> Progress {
        Progress {
            epoch,
            epochs: 10,
            step,
            steps_per_epoch: 10,
            global_step: epoch * 10 + step,
        }
    }

    /// Draws are a function of (seed, stage, epoch, batch) alone: torch's
    /// global generator, which anything may advance, plays no part.
    #[test]
    fn draws_are_keyed_by_seed_stage_epoch_and_batch() {
        let get = |seed, stage, epoch, step| {
            Vec::<f32>::try_from(Draws::seeded(seed, stage).for_step(
                at(epoch, step),
                64,
                Device::Cpu,
            ))
            .unwrap()
        };
        tch::manual_seed(1);
        let first = get(7, 0, 3, 2);
        tch::manual_seed(2);
        let _ = Tensor::rand([100], (Kind::Float, Device::Cpu));
        assert_eq!(get(7, 0, 3, 2), first);
        assert!(first.iter().all(|u| (0.0..1.0).contains(u)));
        for other in [
            get(8, 0, 3, 2),
            get(7, 1, 3, 2),
            get(7, 0, 4, 2),
            get(7, 0, 3, 3),
        ] {
            assert_ne!(other, first);
        }
        let given = Draws::Given(Tensor::from_slice(&[0.25f32, 0.5]));
        assert_eq!(
            Vec::<f32>::try_from(given.for_step(at(0, 0), 2, Device::Cpu)).unwrap(),
            vec![0.25, 0.5]
        );
    }
}
