//! Deep mutual learning (Zhang et al., 2018), two networks: each is trained
//! with KL(p_other || p_self) at temperature 1, the other network detached.

use kd_core::{BuildCx, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {}

pub struct Dml {
    s: TapRef,
    t: TapRef,
}

impl Method for Dml {
    const NAME: &'static str = "dml";
    const SUMMARY: &'static str = "Deep Mutual Learning (Zhang et al., 2018)";
    type Config = Config;

    fn build(_: Config, cx: &mut BuildCx) -> Result<Self> {
        cx.mutual()?;
        let (s, t) = cx.tap_pair("logits")?;
        Ok(Dml { s, t })
    }

    /// The engine calls this once per network with the sides swapped, so
    /// "student" is whichever network is being updated and "teacher" its
    /// peer, already detached (KD-Zoo's `criterionKD(out1, out2.detach())`).
    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (io.tap(self.s), io.tap(self.t).detach());
        let kind = s.kind();
        let log_p_s = s.log_softmax(1, kind);
        let log_p_t = t.log_softmax(1, kind);
        // F.kl_div(log p_s, p_t, reduction='batchmean'), no temperature.
        let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(kind) / s.size()[0] as f64;
        out.push("dml", kl);
        Ok(())
    }
}

register_method!(Dml);

#[cfg(test)]
mod tests {
    use kd_core::{Side, Tap, TapShapes, Taps, testing};
    use tch::{Kind, Tensor};

    use super::*;

    fn shapes() -> TapShapes {
        TapShapes {
            taps: vec![(Tap::Logits, vec![3])],
        }
    }

    fn taps(logits: &[f32]) -> Taps {
        let logits = Tensor::from_slice(logits).view([-1, 3]);
        Taps {
            feat: vec![],
            preact: vec![],
            embed: Tensor::new(),
            logits,
            extra: Vec::new(),
        }
    }

    #[test]
    fn needs_a_peer() {
        let s = shapes();
        let build = |t| testing::build_on::<Dml>(Config {}, &s, t, testing::N_DATA, 3);
        assert!(build(None).is_err());
        let needs = build(Some(&s)).unwrap().needs;
        assert!(needs.mutual && needs.teacher);
    }

    #[test]
    fn kl_direction_is_peer_to_self() {
        // p_s = (1/4, 1/2, 1/4), p_t uniform: KL(p_t || p_s) = sum_c 1/3 ln((1/3) / p_s,c),
        // which differs from the reverse KL(p_s || p_t) in the third decimal.
        let s = taps(&[0.0, 2f32.ln(), 0.0]);
        let t = taps(&[0.0, 0.0, 0.0]);
        let target = Tensor::from_slice(&[0i64]);
        let io = testing::io(&s, Some(&t), &target);
        let mut m = Dml {
            s: TapRef {
                side: Side::Student,
                tap: Tap::Logits,
            },
            t: TapRef {
                side: Side::Teacher,
                tap: Tap::Logits,
            },
        };
        let mut out = Losses::default();
        m.losses(&io, &mut out).unwrap();
        let got = out.total().to_kind(Kind::Double).double_value(&[]);
        let third = 1.0f64 / 3.0;
        let want = 2.0 * third * (third / 0.25).ln() + third * (third / 0.5).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
