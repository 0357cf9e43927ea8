//! Learning without Memorizing (Dhar et al., 2019), only its attention
//! distillation: L1 between the L2-normalised Grad-CAM maps of the
//! target class at one stage of student and teacher.

use kd_core::{BuildCx, GradRef, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// What the channel weights (the spatially pooled gradient) multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cam {
    /// The gradient itself, as KD-Zoo's lwm.py does.
    Grad,
    /// The feature map, as Grad-CAM in the paper does.
    Feature,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Stage whose attention is matched; KD-Zoo uses the middle one, since
    /// after the last stage the map is constant over space (GAP classifier).
    pub tap: String,
    pub cam: Cam,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tap: "feat/2".into(),
            cam: Cam::Grad,
        }
    }
}

struct Side1 {
    fm: TapRef,
    grad: GradRef,
}

pub struct Lwm {
    s: Side1,
    t: Side1,
    cam: Cam,
}

impl Lwm {
    fn cam(&self, side: &Side1, io: &StepIo) -> Tensor {
        let grad = io.grad(side.grad);
        let weights = grad.mean_dim([2i64, 3].as_slice(), true, grad.kind());
        let base = match self.cam {
            Cam::Grad => grad.shallow_clone(),
            Cam::Feature => io.tap(side.fm).shallow_clone(),
        };
        let kind = base.kind();
        let cam = (weights * base)
            .sum_dim_intlist(1, true, kind)
            .relu()
            .flatten(1, -1);
        let norm = cam.norm_scalaropt_dim(2, [1i64], true).clamp_min(1e-12);
        cam / norm
    }
}

impl Method for Lwm {
    const NAME: &'static str = "lwm";
    const SUMMARY: &'static str = "Learning without Memorizing (Dhar et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (fm_s, fm_t) = cx.tap_pair(&cfg.tap)?;
        let (ss, st) = (cx.shape(fm_s), cx.shape(fm_t));
        if ss.len() != 3 || st.len() != 3 {
            return Err(cx.error(format!(
                "tap `{}` must be a feature map [C, H, W]; got {ss:?} and {st:?}",
                cfg.tap
            )));
        }
        if ss[1..] != st[1..] {
            return Err(cx.error(format!(
                "tap `{}`: student map is {}x{}, teacher map {}x{}; the attention maps must have the same size",
                cfg.tap, ss[1], ss[2], st[1], st[2]
            )));
        }
        // The student's CAM is differentiated again, so its gradient keeps the graph.
        let s = Side1 {
            fm: fm_s,
            grad: cx.tap_grad(fm_s, true),
        };
        let t = Side1 {
            fm: fm_t,
            grad: cx.tap_grad(fm_t, false),
        };
        Ok(Lwm { s, t, cam: cfg.cam })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let cam_s = self.cam(&self.s, io);
        let cam_t = self.cam(&self.t, io).detach();
        out.push("lwm", cam_s.l1_loss(&cam_t, tch::Reduction::Mean));
        Ok(())
    }
}

register_method!(Lwm);

#[cfg(test)]
mod tests {
    use kd_core::{Needs, Progress, Side, Tap, TapShapes, Taps};
    use tch::{Device, Kind, nn};

    use super::*;

    fn shapes(feat2: &[i64]) -> TapShapes {
        TapShapes {
            taps: vec![
                (Tap::Feat(2), feat2.to_vec()),
                (Tap::Embed, vec![64]),
                (Tap::Logits, vec![10]),
            ],
        }
    }

    fn build(cfg: Config, s: &TapShapes, t: &TapShapes, needs: &mut Needs) -> Result<Lwm> {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cx = BuildCx::new("lwm", s, Some(t), vs.root(), needs, 10, 10);
        Lwm::build(cfg, &mut cx)
    }

    #[test]
    fn refuses_taps_without_space() {
        let s = shapes(&[32, 16, 16]);
        let mut needs = Needs::default();
        for tap in ["embed", "logits"] {
            let err = build(
                Config {
                    tap: tap.into(),
                    cam: Cam::Grad,
                },
                &s,
                &s,
                &mut needs,
            )
            .err()
            .unwrap();
            assert!(err.to_string().contains("must be a feature map"), "{err}");
        }
        let err = build(
            Config {
                tap: "feat/9".into(),
                cam: Cam::Grad,
            },
            &s,
            &s,
            &mut needs,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("unknown tap `feat/9`"), "{err}");
        let err = build(Config::default(), &s, &shapes(&[64, 8, 8]), &mut needs)
            .err()
            .unwrap();
        assert!(err.to_string().contains("same size"), "{err}");
        assert!(needs.grads.is_empty());
    }

    #[test]
    fn asks_for_feature_gradients() {
        let (s, t) = (shapes(&[32, 16, 16]), shapes(&[64, 16, 16]));
        let mut needs = Needs::default();
        build(Config::default(), &s, &t, &mut needs).unwrap();
        let got: Vec<_> = needs
            .grads
            .iter()
            .map(|g| (g.side, g.wrt, g.create_graph))
            .collect();
        assert_eq!(
            got,
            vec![
                (Side::Student, Some(Tap::Feat(2)), true),
                (Side::Teacher, Some(Tap::Feat(2)), false)
            ]
        );
    }

    fn loss(cam: Cam) -> f64 {
        // [B=1, C=2, H=1, W=2]. Student gradient: channel means (2, 2), so the
        // seed's CAM is 2*(1,3) + 2*(2,2) = (6, 10); the teacher's is (0.5, 0).
        let g_s = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 2.0]).view([1, 2, 1, 2]);
        let g_t = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]).view([1, 2, 1, 2]);
        let fm = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0]).view([1, 2, 1, 2]);
        let taps = Taps {
            feat: vec![fm.zeros_like(), fm.zeros_like(), fm],
            preact: vec![],
            embed: Tensor::new(),
            logits: Tensor::new(),
            extra: Vec::new(),
        };
        let target = Tensor::from_slice(&[0i64]);
        let grads = [g_s, g_t];
        let io = StepIo {
            student: &taps,
            teacher: Some(&taps),
            grads: &grads,
            views: &[],
            augmented: None,
            target: &target,
            index: None,
            contrast_index: None,
            progress: Progress::default(),
            train: true,
            soft_target: None,
        };
        let side = |side| Side1 {
            fm: TapRef {
                side,
                tap: Tap::Feat(2),
            },
            grad: GradRef(if side == Side::Student { 0 } else { 1 }),
        };
        let mut m = Lwm {
            s: side(Side::Student),
            t: side(Side::Teacher),
            cam,
        };
        let mut out = Losses::default();
        m.losses(&io, &mut out).unwrap();
        out.total().to_kind(Kind::Double).double_value(&[])
    }

    #[test]
    fn cam_weights_the_gradient_as_the_seed() {
        let n = 136f64.sqrt();
        let want = ((6.0 / n - 1.0).abs() + 10.0 / n) / 2.0;
        assert!(
            (loss(Cam::Grad) - want).abs() < 1e-6,
            "{} vs {want}",
            loss(Cam::Grad)
        );
    }

    #[test]
    fn paper_cam_weights_the_feature_map() {
        // Feature map (0, 1) in channel 0 only: student CAM (0, 2) -> (0, 1);
        // teacher 0.5 * (0, 1) -> (0, 1): identical maps.
        assert!(loss(Cam::Feature).abs() < 1e-6, "{}", loss(Cam::Feature));
    }

    #[test]
    fn config_names_its_fields() {
        let err = kd_core::build_config::<Lwm>(kd_core::serde_json::json!({"cam": "pixels"}))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("unknown variant `pixels`"),
            "{err}"
        );
    }
}
