//! Drop path (stochastic depth) for the models' residual branches: timm's
//! `drop_path(x, drop_prob, training, scale_by_keep=True)`. In training,
//! each sample's branch is kept with probability `keep = 1 - p` and then
//! divided by `keep`, so its expectation is unchanged; otherwise (or at
//! `p = 0`) `x` is returned as it is.
//!
//! The per-sample coin comes from torch's generator
//! (`x.new_empty(shape).bernoulli_(keep)`, as timm draws it), which the
//! engine seeds before every training step from the run's seed, stage,
//! epoch and batch: a run is reproducible from its seed, a resumed run
//! draws the masks the uninterrupted one drew, and a run of a lockstep
//! group the masks it draws alone.
//! A caller that must draw from a keyed stream instead passes its own
//! uniforms ([`Draws::Given`]): sample `i` is kept when `u[i] < keep`,
//! which is what `bernoulli_` does with the uniforms it draws.

use tch::Tensor;

/// Where the per-sample keep/drop decisions come from.
#[derive(Debug, Clone, Copy)]
pub enum Draws<'a> {
    /// torch's generator, as timm.
    Torch,
    /// Given uniforms in `[0, 1)`, one per sample (`[B]`, any float kind).
    Given(&'a Tensor),
}

/// `x` (`[B, ...]`) with each sample's value dropped with probability `p`
/// and the kept ones scaled by `1 / (1 - p)` in training; `x` itself when
/// `!train` or `p == 0`. `p` must be in `[0, 1]` (a model checks its
/// configuration when it is built); at `p = 1` everything is dropped and
/// nothing is scaled, as in timm.
pub fn drop_path(x: &Tensor, p: f64, train: bool, draws: Draws) -> Tensor {
    if p == 0.0 || !train {
        return x.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = match draws {
        Draws::Torch => {
            Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep)
        }
        Draws::Given(u) => u
            .to_device(x.device())
            .lt(keep)
            .to_kind(x.kind())
            .view(shape.as_slice()),
    };
    let mask = if keep > 0.0 { mask / keep } else { mask };
    x * mask
}

/// The drop probability of each of `depth` blocks when it rises linearly
/// from 0 to `rate` (timm's `[x.item() for x in torch.linspace(0, rate,
/// depth)]`, the ViTs' and Swin's schedule), in f32 steps as torch's.
pub fn linear_rates(rate: f64, depth: i64) -> Vec<f64> {
    if depth <= 0 {
        return Vec::new();
    }
    let t = Tensor::linspace(0.0, rate, depth, (tch::Kind::Float, tch::Device::Cpu));
    Vec::<f32>::try_from(&t)
        .map(|v| v.into_iter().map(f64::from).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn eval_and_zero_rate_are_identity() {
        let x = Tensor::randn([4, 3, 2], (Kind::Float, Device::Cpu));
        assert!(drop_path(&x, 0.3, false, Draws::Torch).equal(&x));
        assert!(drop_path(&x, 0.0, true, Draws::Torch).equal(&x));
    }

    #[test]
    fn given_draws_keep_samples_below_keep_and_scale_them() {
        let x = Tensor::ones([4, 2, 3], (Kind::Float, Device::Cpu));
        let u = Tensor::from_slice(&[0.1f32, 0.9, 0.74, 0.76]);
        let y = drop_path(&x, 0.25, true, Draws::Given(&u));
        let per: Vec<f32> =
            Vec::try_from(y.mean_dim([1i64, 2].as_slice(), false, Kind::Float)).unwrap();
        let k = 1.0f32 / 0.75;
        assert_eq!(per, vec![k, 0.0, k, 0.0]);
        // Every element of a sample shares its decision.
        assert!(y.get(0).eq(k as f64).all().int64_value(&[]) == 1);
        // p = 1: all dropped, no division by zero.
        let none = drop_path(&x, 1.0, true, Draws::Given(&u));
        assert_eq!(none.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    /// torch's generator: timm's own expression on the same generator state
    /// gives the same mask, and the expectation is kept.
    #[test]
    fn torch_draws_are_timms_and_unbiased() {
        let x = Tensor::ones([20_000, 4], (Kind::Float, Device::Cpu));
        tch::manual_seed(3);
        let y = drop_path(&x, 0.2, true, Draws::Torch);
        tch::manual_seed(3);
        let timm = &x
            * (Tensor::empty([20_000, 1], (Kind::Float, Device::Cpu)).bernoulli_float_(0.8) / 0.8);
        assert!(y.equal(&timm));
        let mean = y.mean(Kind::Float).double_value(&[]);
        // The mean of 20,000 scaled coins: sd 0.5 / sqrt(20000) / 0.8 · 0.8 ≈ 0.0035.
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let kept = y
            .select(1, 0)
            .gt(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.8).abs() < 0.02, "kept share {kept}");
    }

    #[test]
    fn linear_rates_are_torch_linspace() {
        assert_eq!(linear_rates(0.1, 0), Vec::<f64>::new());
        let r = linear_rates(0.1, 12);
        assert_eq!(r.len(), 12);
        assert_eq!(r[0], 0.0);
        assert_eq!(r[11], 0.1f32 as f64);
    }
}
