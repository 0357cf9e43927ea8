//! Sobolev training / Jacobian matching (Czarnecki et al., 2017; Srinivas &
//! Fleuret, 2018): MSE between the L2-normalised input gradients of the
//! target-class logit of student and teacher.

use kd_core::{BuildCx, GradRef, Losses, Method, Result, Side, StepIo, register_method};
use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {}

pub struct Sobolev {
    s: GradRef,
    t: GradRef,
}

/// `F.normalize(x.view(B, -1), p=2, dim=1)`: rows divided by max(‖row‖, 1e-12).
pub fn normalize_rows(x: &Tensor) -> Tensor {
    let x = x.flatten(1, -1);
    let norm = x.norm_scalaropt_dim(2, [1i64], true).clamp_min(1e-12);
    x / norm
}

impl Method for Sobolev {
    const NAME: &'static str = "sobolev";
    const SUMMARY: &'static str = "Sobolev Training for Neural Networks (Czarnecki et al., 2017)";
    type Config = Config;

    fn build(_: Config, cx: &mut BuildCx) -> Result<Self> {
        // The student's gradient keeps its graph: the loss trains the student
        // through d logit / d image (double backpropagation).
        let s = cx.input_grad(Side::Student, true)?;
        let t = cx.input_grad(Side::Teacher, false)?;
        Ok(Sobolev { s, t })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let g_s = normalize_rows(io.grad(self.s));
        let g_t = normalize_rows(&io.grad(self.t).detach());
        out.push("sobolev", g_s.mse_loss(&g_t, tch::Reduction::Mean));
        Ok(())
    }
}

register_method!(Sobolev);

#[cfg(test)]
mod tests {
    use kd_core::{Needs, Progress, Tap, TapShapes, Taps};
    use tch::{Device, Kind, nn};

    use super::*;

    #[test]
    fn asks_for_both_input_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let shapes = TapShapes {
            taps: vec![(Tap::Logits, vec![10])],
        };
        let mut needs = Needs::default();
        let mut cx = BuildCx::new("sobolev", &shapes, None, vs.root(), &mut needs, 10, 10);
        let err = Sobolev::build(Config {}, &mut cx)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs a teacher"), "{err}");

        let mut needs = Needs::default();
        let mut cx = BuildCx::new(
            "sobolev",
            &shapes,
            Some(&shapes),
            vs.root(),
            &mut needs,
            10,
            10,
        );
        Sobolev::build(Config {}, &mut cx).unwrap();
        // `GradSpec` is not re-exported by kd-core; compare its fields.
        let got: Vec<_> = needs
            .grads
            .iter()
            .map(|g| (g.side, g.wrt, g.create_graph))
            .collect();
        assert_eq!(
            got,
            vec![(Side::Student, None, true), (Side::Teacher, None, false)]
        );
    }

    #[test]
    fn loss_ignores_gradient_scale() {
        let g_t = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0, 0.0, 2.0]).view([2, 1, 1, 3]);
        let g_s = Tensor::from_slice(&[6.0f32, 8.0, 0.0, 0.0, 1.0, 0.0]).view([2, 1, 1, 3]);
        let taps = Taps {
            feat: vec![],
            preact: vec![],
            embed: Tensor::new(),
            logits: Tensor::zeros([2, 10], tch::kind::FLOAT_CPU),
            extra: Vec::new(),
        };
        let target = Tensor::from_slice(&[0i64, 1]);
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
        let mut out = Losses::default();
        Sobolev {
            s: GradRef(0),
            t: GradRef(1),
        }
        .losses(&io, &mut out)
        .unwrap();
        // Row 0 matches after normalisation; row 1 is (0,1,0) vs (0,0,1): 2 / 6 elements.
        let got = out.total().to_kind(Kind::Double).double_value(&[]);
        assert!((got - 2.0 / 6.0).abs() < 1e-6, "{got}");
    }
}
