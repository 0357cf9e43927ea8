//! Boundary supporting samples (Heo et al., 2019): KL between student and
//! teacher on images the teacher's decision boundary was pushed toward by an
//! iterative targeted attack, as in KD-Zoo's train_bss.py.

use kd_core::{
    AttackSpec, BuildCx, Losses, Method, Progress, Result, StepIo, TapRef, ViewRef, register_method,
};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Softmax temperature of the KL term.
    #[serde(rename = "T")]
    pub t: f64,
    /// Most rows attacked per batch; more eligible rows are ranked by score.
    pub attack_size: usize,
    pub step_alpha: f64,
    pub num_steps: usize,
    pub eps: f64,
    /// Range of the attacked (normalised) image.
    pub clamp: [f64; 2],
    /// Epochs without the term at the start (KD-Zoo: 10).
    pub warmup_epochs: usize,
    /// Part of the stage, in epochs, after which the term stops (KD-Zoo: 80%).
    pub active_fraction: f64,
    /// Scale the term by 1 - epoch / (active_fraction * epochs), as KD-Zoo's
    /// lambda; turn off when the recipe schedules the weight itself.
    pub decay: bool,
    /// Multiply by T², which the reference leaves commented out.
    pub t_squared: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            t: 3.0,
            attack_size: 32,
            step_alpha: 0.3,
            num_steps: 10,
            eps: 1e-4,
            clamp: [-2.5, 2.5],
            warmup_epochs: 10,
            active_fraction: 0.8,
            decay: true,
            t_squared: false,
        }
    }
}

pub struct Bss {
    s: TapRef,
    t: TapRef,
    view: ViewRef,
    cfg: Config,
}

impl Bss {
    /// The term's factor this epoch, `None` while inactive.
    fn factor(&self, p: Progress) -> Option<f64> {
        let (epoch, end) = (p.epoch as f64, self.cfg.active_fraction * p.epochs as f64);
        if p.epoch < self.cfg.warmup_epochs || epoch >= end {
            return None;
        }
        Some(if self.cfg.decay {
            1.0 - epoch / end
        } else {
            1.0
        })
    }
}

impl Method for Bss {
    const NAME: &'static str = "bss";
    const SUMMARY: &'static str = "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary (Heo et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let c = &cfg;
        let bad = [
            (c.t <= 0.0, format!("T must be positive, got {}", c.t)),
            (c.attack_size == 0, "attack_size must be at least 1".into()),
            (
                c.step_alpha <= 0.0 || c.num_steps == 0,
                "step_alpha and num_steps must be positive".into(),
            ),
            (
                c.eps < 0.0,
                format!("eps must not be negative, got {}", c.eps),
            ),
            (
                c.clamp[0] >= c.clamp[1],
                format!(
                    "clamp must be [low, high] with low < high, got {:?}",
                    c.clamp
                ),
            ),
            (
                !(c.active_fraction > 0.0 && c.active_fraction <= 1.0),
                format!(
                    "active_fraction must be in (0, 1], got {}",
                    c.active_fraction
                ),
            ),
        ];
        if let Some((_, msg)) = bad.into_iter().find(|(b, _)| *b) {
            return Err(cx.error(msg));
        }
        let (s, t) = cx.tap_pair("logits")?;
        if cx.shape(t)[0] < 2 {
            return Err(cx.error("needs at least two classes to choose an attack class"));
        }
        let view = cx.adversarial(AttackSpec {
            step_alpha: c.step_alpha,
            num_steps: c.num_steps,
            eps: c.eps,
            clamp: (c.clamp[0], c.clamp[1]),
        })?;
        Ok(Bss { s, t, view, cfg })
    }

    /// Rows both networks classify correctly; beyond `attack_size`, those
    /// where the two disagree most off the target class. Each row's attack
    /// class is drawn among the teacher's non-top classes in proportion to
    /// the teacher's probability, by inverting the cumulative sum at the
    /// row's draw (KD-Zoo draws `torch.rand` per chosen row; a draw per batch
    /// row has the same distribution and keeps runs reproducible).
    fn attack_targets(
        &mut self,
        view: ViewRef,
        io: &StepIo,
        draws: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if view != self.view || self.factor(io.progress()).is_none() {
            return Ok(None);
        }
        let (s, t, y) = (
            io.tap(self.s).detach(),
            io.tap(self.t).detach(),
            io.target(),
        );
        let correct = s
            .argmax(1, false)
            .eq_tensor(y)
            .logical_and(&t.argmax(1, false).eq_tensor(y));
        let mut rows = correct.nonzero().view([-1]);
        let n = rows.size()[0];
        if n == 0 {
            return Ok(None);
        }
        let k = self.cfg.attack_size as i64;
        if n > k {
            let diff = (t.index_select(0, &rows).softmax(1, Kind::Float)
                - s.index_select(0, &rows).softmax(1, Kind::Float))
            .square();
            let on_target = diff
                .gather(1, &y.index_select(0, &rows).unsqueeze(1), false)
                .squeeze_dim(1);
            let score = diff.sum_dim_intlist(1, false, Kind::Float) - on_target;
            rows = rows.index_select(0, &score.sort(0, true).1.narrow(0, 0, k));
        }
        let classes = t.size()[1];
        let (p, order) = t
            .index_select(0, &rows)
            .softmax(1, Kind::Float)
            .sort(1, true);
        let (p, order) = (p.narrow(1, 1, classes - 1), order.narrow(1, 1, classes - 1));
        if draws.size() != [y.size()[0]] {
            return Err(kd_core::KdError::Plan {
                method: Self::NAME.into(),
                msg: format!(
                    "needs one attack-class draw per batch row ([{}]), got shape {:?}",
                    y.size()[0],
                    draws.size()
                ),
            });
        }
        let u = draws.index_select(0, &rows).to_kind(Kind::Float)
            * p.sum_dim_intlist(1, false, Kind::Float);
        let first = p
            .cumsum(1, Kind::Float)
            .lt_tensor(&u.unsqueeze(1))
            .sum_dim_intlist(1, false, Kind::Int64);
        // A draw past the last cumulative sum (rounding) keeps the runner-up.
        let first = first.where_self(&first.lt(classes - 1), &first.zeros_like());
        Ok(Some((
            rows,
            order.gather(1, &first.unsqueeze(1), false).squeeze_dim(1),
        )))
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let view = io.view(self.view);
        let (Some(factor), Some(view)) = (self.factor(io.progress()), view) else {
            let s = io.tap(self.s);
            out.push("bss", Tensor::zeros([], (s.kind(), s.device())));
            return Ok(());
        };
        let temp = self.cfg.t;
        let (s, t) = (&view.student.logits, view.teacher.logits.detach());
        let log_p_s = (s / temp).log_softmax(1, s.kind());
        let log_p_t = (t / temp).log_softmax(1, s.kind());
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(s.kind()) / s.size()[0] as f64;
        let scale = factor * if self.cfg.t_squared { temp * temp } else { 1.0 };
        out.push("bss", kl * scale);
        Ok(())
    }
}

register_method!(Bss);

#[cfg(test)]
mod tests {
    use kd_core::{Needs, Side, Tap, TapShapes, Taps, ViewTaps};
    use tch::{Device, nn};

    use super::*;

    fn logits_taps(rows: &[[f32; 4]]) -> Taps {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Taps {
            feat: vec![],
            preact: vec![],
            embed: Tensor::new(),
            logits: Tensor::from_slice(&flat).view([-1, 4]),
            extra: Vec::new(),
        }
    }

    fn bss(cfg: Config) -> Bss {
        let (s, t) = (
            TapRef {
                side: Side::Student,
                tap: Tap::Logits,
            },
            TapRef {
                side: Side::Teacher,
                tap: Tap::Logits,
            },
        );
        Bss {
            s,
            t,
            view: ViewRef(0),
            cfg,
        }
    }

    fn draws(u: &[f32]) -> Tensor {
        Tensor::from_slice(u)
    }

    fn at_epoch(epoch: usize) -> Progress {
        Progress {
            epoch,
            epochs: 200,
            step: 0,
            steps_per_epoch: 1,
            global_step: epoch,
        }
    }

    fn io<'a>(
        s: &'a Taps,
        t: &'a Taps,
        y: &'a Tensor,
        views: &'a [Option<ViewTaps>],
        epoch: usize,
    ) -> StepIo<'a> {
        StepIo {
            student: s,
            teacher: Some(t),
            grads: &[],
            views,
            augmented: None,
            target: y,
            index: None,
            contrast_index: None,
            progress: at_epoch(epoch),
            train: true,
            soft_target: None,
        }
    }

    #[test]
    fn config_errors_and_view_request() {
        let vs = nn::VarStore::new(Device::Cpu);
        let shapes = TapShapes {
            taps: vec![(Tap::Logits, vec![10])],
        };
        let mut needs = Needs::default();
        let mut cx = BuildCx::new(
            "bss",
            &shapes,
            Some(&shapes),
            vs.root(),
            &mut needs,
            100,
            10,
        );
        for (cfg, msg) in [
            (
                Config {
                    t: 0.0,
                    ..Config::default()
                },
                "T must be positive",
            ),
            (
                Config {
                    attack_size: 0,
                    ..Config::default()
                },
                "attack_size",
            ),
            (
                Config {
                    clamp: [1.0, -1.0],
                    ..Config::default()
                },
                "clamp",
            ),
            (
                Config {
                    active_fraction: 1.5,
                    ..Config::default()
                },
                "active_fraction",
            ),
        ] {
            let err = Bss::build(cfg, &mut cx).err().unwrap().to_string();
            assert!(err.contains(msg), "{err}");
        }
        Bss::build(Config::default(), &mut cx).unwrap();
        assert_eq!(
            needs.views,
            vec![AttackSpec {
                step_alpha: 0.3,
                num_steps: 10,
                eps: 1e-4,
                clamp: (-2.5, 2.5)
            }]
        );
    }

    #[test]
    fn active_from_epoch_10_until_80_percent_with_decay() {
        let m = bss(Config::default());
        assert_eq!(m.factor(at_epoch(9)), None);
        assert_eq!(m.factor(at_epoch(10)), Some(1.0 - 1.25 * 10.0 / 200.0));
        assert!((m.factor(at_epoch(159)).unwrap() - (1.0 - 1.25 * 159.0 / 200.0)).abs() < 1e-12);
        assert_eq!(m.factor(at_epoch(160)), None);
        assert_eq!(
            bss(Config {
                decay: false,
                ..Config::default()
            })
            .factor(at_epoch(100)),
            Some(1.0)
        );
    }

    #[test]
    fn attacks_rows_both_get_right_with_the_largest_disagreement() {
        // Row 0: student wrong. Rows 1-3 both right; off the target their
        // squared disagreement is about 0.012, 0.080 and 0.224.
        let s = logits_taps(&[
            [0., 5., 0., 0.],
            [5., 0., 0., 0.],
            [5., 4., 0., 0.],
            [5., 0., 0., 4.9],
        ]);
        let t = logits_taps(&[
            [5., 0., 0., 3.],
            [5., 0., 0., 3.],
            [5., 0., 0., 3.],
            [5., 0., 0., -5.],
        ]);
        let y = Tensor::from_slice(&[0i64, 0, 0, 0]);
        let mut m = bss(Config {
            attack_size: 2,
            ..Config::default()
        });
        assert!(
            m.attack_targets(ViewRef(0), &io(&s, &t, &y, &[], 5), &draws(&[0.5; 4]))
                .unwrap()
                .is_none(),
            "warm-up"
        );
        let (rows, classes) = m
            .attack_targets(ViewRef(0), &io(&s, &t, &y, &[], 50), &draws(&[0.5; 4]))
            .unwrap()
            .unwrap();
        assert_eq!(Vec::<i64>::try_from(rows).unwrap(), vec![3, 2]);
        let classes = Vec::<i64>::try_from(classes).unwrap();
        assert!(classes.iter().all(|&c| c != 0), "{classes:?}");
        let none_right = logits_taps(&[[0., 5., 0., 0.]; 4]);
        assert!(
            m.attack_targets(
                ViewRef(0),
                &io(&none_right, &t, &y, &[], 50),
                &draws(&[0.5; 4])
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn attack_class_follows_the_teacher() {
        // Teacher's non-top mass is all on class 2, up to e^-30.
        let t = logits_taps(&[[10., -20., 9., -20.]; 64]);
        let y = Tensor::zeros([64], (Kind::Int64, Device::Cpu));
        let mut m = bss(Config {
            attack_size: 64,
            ..Config::default()
        });
        let (_, classes) = m
            .attack_targets(
                ViewRef(0),
                &io(&t, &t, &y, &[], 50),
                &Tensor::rand([64], tch::kind::FLOAT_CPU),
            )
            .unwrap()
            .unwrap();
        assert!(
            Vec::<i64>::try_from(classes)
                .unwrap()
                .iter()
                .all(|&c| c == 2)
        );
    }

    /// The attack class is the inverse of the cumulative teacher probability
    /// over the non-top classes at the row's own draw; the draws are indexed
    /// by batch row, not by rank among the chosen rows.
    #[test]
    fn attack_class_inverts_the_cumulative_probability_at_the_row_draw() {
        // Non-top probabilities of the teacher, sorted: class 1, 2, 3 with
        // p proportional to e^2, e^1, e^0 (about 0.665, 0.245, 0.090).
        let t = logits_taps(&[[9., 2., 1., 0.]; 3]);
        let y = Tensor::from_slice(&[0i64, 0, 0]);
        let mut m = bss(Config {
            attack_size: 3,
            ..Config::default()
        });
        let mut classes = |u: &[f32]| {
            let (rows, classes) = m
                .attack_targets(ViewRef(0), &io(&t, &t, &y, &[], 50), &draws(u))
                .unwrap()
                .unwrap();
            assert_eq!(Vec::<i64>::try_from(rows).unwrap(), vec![0, 1, 2]);
            Vec::<i64>::try_from(classes).unwrap()
        };
        assert_eq!(classes(&[0.0, 0.6, 0.7]), vec![1, 1, 2]);
        assert_eq!(classes(&[0.95, 0.89, 0.999]), vec![3, 2, 3]);
        let err = m
            .attack_targets(ViewRef(0), &io(&t, &t, &y, &[], 50), &draws(&[0.5]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("one attack-class draw per batch row"), "{err}");
    }

    #[test]
    fn kl_on_the_view_scaled_by_the_decay() {
        let clean = logits_taps(&[[1., 0., 0., 0.]]);
        let y = Tensor::from_slice(&[0i64]);
        let views = [Some(ViewTaps {
            student: logits_taps(&[[0., 0., 0., 0.]]),
            teacher: logits_taps(&[[3., 0., 0., 0.]]),
        })];
        let loss = |cfg: Config, epoch| {
            let mut out = Losses::default();
            bss(cfg)
                .losses(&io(&clean, &clean, &y, &views, epoch), &mut out)
                .unwrap();
            out.total().double_value(&[])
        };
        // At T = 3, p_t = softmax(1, 0, 0, 0) and p_s is uniform.
        let e = 1f64.exp();
        let p = [e / (e + 3.0), 1.0 / (e + 3.0)];
        let kl = p[0] * (p[0] * 4.0).ln() + 3.0 * p[1] * (p[1] * 4.0).ln();
        assert!((loss(Config::default(), 80) - kl * 0.5).abs() < 1e-6);
        assert!(
            (loss(
                Config {
                    t_squared: true,
                    decay: false,
                    ..Config::default()
                },
                80
            ) - kl * 9.0)
                .abs()
                < 1e-5
        );
        assert_eq!(loss(Config::default(), 170), 0.0);
    }
}
