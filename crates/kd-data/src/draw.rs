//! Where the batch-level augmentations (Mixup/CutMix, RandomErasing) get
//! their random numbers: a [`DrawSource`], whose calls are the draw points
//! of timm's code (numpy's `np.random.rand/beta/randint`, Python's
//! `random.random/uniform/randint`, torch's `normal_`). Training reads a
//! [`Keyed`] ChaCha stream seeded from (seed, epoch, batch or sample), never
//! torch's or numpy's global state, so a resumed run draws exactly what an
//! uninterrupted one drew; the golden tests read the values timm drew,
//! recorded call by call, through the same trait.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The random calls timm's Mixup and RandomErasing make, in their terms.
pub trait DrawSource {
    /// A uniform in `[0, 1)`: `np.random.rand()`, `random.random()`.
    fn uniform(&mut self) -> f64;
    /// `random.uniform(a, b)`: `a + (b - a) · u`.
    fn uniform_in(&mut self, a: f64, b: f64) -> f64;
    /// An integer in `lo..=hi`: `random.randint(lo, hi)`,
    /// `np.random.randint(lo, hi + 1)`. `lo <= hi`.
    fn integer(&mut self, lo: i64, hi: i64) -> i64;
    /// A draw of Beta(a, a): `np.random.beta(a, a)`, `a > 0`.
    fn beta(&mut self, a: f64) -> f64;
    /// `n` standard normal values: `torch.empty(n).normal_()`.
    fn normals(&mut self, n: usize) -> Vec<f32>;
}

/// kd's keyed stream: a ChaCha8 generator seeded with one key.
pub struct Keyed(ChaCha8Rng);

impl Keyed {
    pub fn new(key: u64) -> Keyed {
        Keyed(ChaCha8Rng::seed_from_u64(key))
    }

    /// A uniform in `(0, 1]`, for logarithms.
    fn open_zero(&mut self) -> f64 {
        1.0 - self.0.random::<f64>()
    }

    fn normal(&mut self) -> f64 {
        // Box–Muller; the sine half is dropped so that each call reads a
        // fixed number of values.
        let (u1, u2) = (self.open_zero(), self.0.random::<f64>());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The logarithm of a Gamma(a, 1) draw (Marsaglia and Tsang's method;
    /// for `a < 1` boosted as `Gamma(a + 1) · U^(1/a)`), in logarithms so
    /// that a Beta of a tiny `a` does not underflow to 0/0.
    fn ln_gamma_draw(&mut self, a: f64) -> f64 {
        if a < 1.0 {
            return self.ln_gamma_draw(a + 1.0) + self.open_zero().ln() / a;
        }
        let d = a - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.open_zero();
            if u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return d.ln() + v.ln();
            }
        }
    }
}

impl DrawSource for Keyed {
    fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    fn uniform_in(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.uniform()
    }

    fn integer(&mut self, lo: i64, hi: i64) -> i64 {
        self.0.random_range(lo..=hi)
    }

    fn beta(&mut self, a: f64) -> f64 {
        // X / (X + Y) for X, Y ~ Gamma(a): 1 / (1 + e^(ln Y - ln X)).
        let (lx, ly) = (self.ln_gamma_draw(a), self.ln_gamma_draw(a));
        1.0 / (1.0 + (ly - lx).exp())
    }

    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kolmogorov–Smirnov distance of `xs` from the distribution `cdf`.
    fn ks(mut xs: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
        xs.sort_by(f64::total_cmp);
        let n = xs.len() as f64;
        xs.iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
            })
            .fold(0.0, f64::max)
    }

    /// The 0.1 % critical value of the KS statistic for `n` samples: a
    /// correct sampler fails one run in a thousand, a wrong law always.
    fn critical(n: usize) -> f64 {
        1.95 / (n as f64).sqrt()
    }

    #[test]
    fn beta_draws_follow_the_beta_law() {
        let n = 20_000;
        let mut k = Keyed::new(11);
        // Beta(1, 1) is uniform; Beta(1/2, 1/2) is the arcsine law.
        let uniform: Vec<f64> = (0..n).map(|_| k.beta(1.0)).collect();
        assert!(ks(uniform, |x| x) < critical(n));
        let arcsine: Vec<f64> = (0..n).map(|_| k.beta(0.5)).collect();
        let d = ks(arcsine, |x| {
            std::f64::consts::FRAC_2_PI * x.clamp(0.0, 1.0).sqrt().asin()
        });
        assert!(d < critical(n), "KS distance {d}");
        // Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
        for a in [0.2, 0.8, 2.0, 5.0] {
            let xs: Vec<f64> = (0..n).map(|_| k.beta(a)).collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let want = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!(
                (mean - 0.5).abs() < 5.0 * (want / n as f64).sqrt(),
                "a={a}: mean {mean}"
            );
            assert!(
                (var / want - 1.0).abs() < 0.05,
                "a={a}: variance {var}, want {want}"
            );
        }
        // A tiny alpha puts nearly all mass at the ends, without NaN.
        assert!((0..1000).map(|_| k.beta(1e-4)).all(|x| x.is_finite()));
    }

    #[test]
    fn normals_are_standard_and_integers_in_range() {
        let n = 20_000;
        let mut k = Keyed::new(5);
        let xs: Vec<f64> = k.normals(n).into_iter().map(f64::from).collect();
        // The standard normal CDF through erf's series-free bound: compare
        // the sample's quartiles and moments instead.
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        let below = xs.iter().filter(|&&x| x < -0.674_489_75).count() as f64 / n as f64;
        assert!((below - 0.25).abs() < 0.02, "lower quartile share {below}");
        let ints: Vec<i64> = (0..1000).map(|_| k.integer(3, 5)).collect();
        assert!(ints.iter().all(|i| (3..=5).contains(i)));
        assert!((3..=5).all(|v| ints.contains(&v)));
        assert_eq!(Keyed::new(9).uniform(), Keyed::new(9).uniform());
    }
}
