//! Instance relationship graph (Liu et al., 2019): match logits (vertices),
//! batch distance matrices of two stages and the embedding (edges), and the
//! per-sample distance between the two stages (transformation).

use kd_core::{BuildCx, Losses, Method, Result, StepIo, Tap, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub w_irg_vert: f64,
    pub w_irg_edge: f64,
    pub w_irg_tran: f64,
    /// `[feat/k, feat/k+1, vector tap, logits]`.
    pub taps: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        let taps = ["feat/2", "feat/3", "embed", "logits"]
            .map(String::from)
            .to_vec();
        Config {
            w_irg_vert: 0.1,
            w_irg_edge: 5.0,
            w_irg_tran: 5.0,
            taps,
        }
    }
}

pub struct Irg {
    cfg: Config,
    /// (fm1, fm2, embed, logits) of the student, then of the teacher.
    s: [TapRef; 4],
    t: [TapRef; 4],
}

const EPS: f64 = 1e-12;

/// Squared pairwise distances of the flattened samples, zero diagonal,
/// divided by the largest (so scale differences between networks vanish).
fn edges(x: &Tensor) -> Tensor {
    let x = x.flatten(1, -1);
    let sq = x
        .pow_tensor_scalar(2)
        .sum_dim_intlist(1, false, None::<Kind>);
    let d = (sq.unsqueeze(0) + sq.unsqueeze(1) - x.mm(&x.tr()) * 2.0).clamp_min(EPS);
    let n = x.size()[0];
    let d = d * (Tensor::eye(n, (x.kind(), x.device())) * -1.0 + 1.0);
    &d / d.max()
}

/// Per-sample squared distance from stage k to stage k+1, after pooling the
/// first to the second's resolution and averaging channel pairs of the second.
fn transformation(fm1: &Tensor, fm2: &Tensor) -> Tensor {
    let (s1, s2) = (fm1.size(), fm2.size());
    let fm1 = if s1[2] > s2[2] {
        fm1.adaptive_avg_pool2d([s2[2], s2[3]])
    } else {
        fm1.shallow_clone()
    };
    let fm2 = if s1[1] < s2[1] {
        (fm2.slice(1, 0, None, 2) + fm2.slice(1, 1, None, 2)) / 2.0
    } else {
        fm2.shallow_clone()
    };
    let d = (fm1.flatten(1, -1) - fm2.flatten(1, -1))
        .pow_tensor_scalar(2)
        .sum_dim_intlist(-1, false, None::<Kind>)
        .clamp_min(EPS);
    &d / d.max()
}

/// Whether `transformation` can align the two stages' per-sample shapes.
fn check_aligned(c1: &[i64], c2: &[i64]) -> std::result::Result<(), String> {
    if c1.len() != 3 || c2.len() != 3 {
        return Err(format!("needs two feature maps, got {c1:?} and {c2:?}"));
    }
    let a = if c1[1] > c2[1] {
        vec![c1[0], c2[1], c2[2]]
    } else {
        c1.to_vec()
    };
    if c1[0] < c2[0] && c2[0] % 2 == 1 {
        return Err(format!(
            "the later stage's {} channels cannot be paired",
            c2[0]
        ));
    }
    let b = if c1[0] < c2[0] {
        vec![c2[0] / 2, c2[1], c2[2]]
    } else {
        c2.to_vec()
    };
    if a != b {
        return Err(format!(
            "stages {c1:?} and {c2:?} become {a:?} and {b:?}, which differ"
        ));
    }
    Ok(())
}

impl Method for Irg {
    const NAME: &'static str = "irg";
    const SUMMARY: &'static str =
        "Knowledge Distillation via Instance Relationship Graph (Liu et al., 2019)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let [fm1, fm2, emb, logits] = cfg.taps.as_slice() else {
            return Err(cx.error(format!(
                "taps must be [feat/k, feat/k+1, embed, logits], got {:?}",
                cfg.taps
            )));
        };
        let (s1, t1) = cx.tap_pair(fm1)?;
        let (s2, t2) = cx.tap_pair(fm2)?;
        let (se, te) = cx.tap_pair(emb)?;
        let (sl, tl) = cx.tap_pair(logits)?;
        match (s1.tap, s2.tap) {
            (Tap::Feat(a), Tap::Feat(b)) if b == a + 1 => {}
            _ => return Err(cx.error(format!("the first two taps must be feature maps of consecutive stages (feat/k, feat/k+1), got `{fm1}`, `{fm2}`"))),
        }
        for (a, b) in [(s1, s2), (t1, t2)] {
            check_aligned(&cx.shape(a), &cx.shape(b))
                .map_err(|e| cx.error(format!("on the {}, {e}", a.side)))?;
        }
        if cx.shape(se).len() != 1 || cx.shape(te).len() != 1 {
            return Err(cx.error(format!(
                "third tap `{emb}` must be a vector tap such as `embed`"
            )));
        }
        if sl.tap != Tap::Logits || cx.shape(sl) != cx.shape(tl) {
            return Err(cx.error(format!("fourth tap must be `logits` with the same shape on both sides, got `{logits}`: {:?} vs {:?}", cx.shape(sl), cx.shape(tl))));
        }
        Ok(Irg {
            cfg,
            s: [s1, s2, se, sl],
            t: [t1, t2, te, tl],
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let [s1, s2, se, sl] = self.s.map(|r| io.tap(r));
        let [t1, t2, te, tl] = self.t.map(|r| io.tap(r));
        let mse = |a: Tensor, b: Tensor| a.mse_loss(&b, Reduction::Mean);
        let vert = sl.mse_loss(tl, Reduction::Mean);
        let edge =
            (mse(edges(se), edges(te)) + mse(edges(s1), edges(t1)) + mse(edges(s2), edges(t2)))
                / 3.0;
        let tran = mse(transformation(s1, s2), transformation(t1, t2));
        out.push("irg_vert", vert * self.cfg.w_irg_vert);
        out.push("irg_edge", edge * self.cfg.w_irg_edge);
        out.push("irg_tran", tran * self.cfg.w_irg_tran);
        Ok(())
    }
}

register_method!(Irg);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use tch::Device;

    use super::*;

    const F: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// Batch 3: feat/0 [4,4,4], feat/1 [8,2,2], feat/2 [9,1,1]; embed [1].
    fn taps(seed: i64, embed: &[f32], logits: f64) -> Taps {
        tch::manual_seed(seed);
        let feat = vec![
            Tensor::rand([3, 4, 4, 4], F),
            Tensor::rand([3, 8, 2, 2], F),
            Tensor::rand([3, 9, 1, 1], F),
        ];
        let preact = feat.iter().map(|f| f - 0.5).collect();
        Taps {
            feat,
            preact,
            embed: Tensor::from_slice(embed).view([3, 1]),
            logits: Tensor::full([3, 2], logits, F),
            extra: Vec::new(),
        }
    }

    fn run(cfg: Config, s: &Taps, t: &Taps) -> Result<f64> {
        testing::loss_typed::<Irg>(cfg, s, Some(t))
    }

    fn cfg(taps: [&str; 4]) -> Config {
        Config {
            taps: taps.map(String::from).to_vec(),
            ..Config::default()
        }
    }

    #[test]
    fn terms_by_hand() {
        let ok = cfg(["feat/0", "feat/1", "embed", "logits"]);
        // Vertices only: logits 0 vs 2, mse 4, weight 0.1.
        let (s, t) = (taps(1, &[0., 1., 2.], 0.), taps(1, &[0., 1., 2.], 2.));
        assert!((run(ok.clone(), &s, &t).unwrap() - 0.4).abs() < 1e-6);
        // Embedding edges only: squared distances (1, 4, 1)/4 against
        // (1, 9, 4)/9; off-diagonal gaps 0.138889 and -0.194444 twice each in
        // a 3×3 matrix: mse 0.0126886, /3 stages, ×5 = 0.0211476.
        let t = taps(1, &[0., 1., 3.], 0.);
        let l = run(ok.clone(), &s, &t).unwrap();
        assert!((l - 0.0211476).abs() < 1e-6, "{l}");
        // Normalising by the largest distance makes a rescaled teacher free.
        let mut t = taps(1, &[0., 10., 20.], 0.);
        t.feat = s.feat.iter().map(|f| f * 7.0).collect();
        assert!(run(ok, &s, &t).unwrap().abs() < 1e-6);
    }

    #[test]
    fn refuses_taps_that_do_not_form_a_graph() {
        let s = taps(1, &[0., 1., 2.], 0.);
        let err = |taps| run(cfg(taps), &s, &s).err().unwrap().to_string();
        assert!(err(["feat/0", "feat/2", "embed", "logits"]).contains("consecutive stages"));
        assert!(err(["preact/0", "preact/1", "embed", "logits"]).contains("consecutive stages"));
        // feat/1 → feat/2: 9 channels cannot be paired down to 8.
        let e = err(["feat/1", "feat/2", "embed", "logits"]);
        assert!(
            e.contains("the later stage's 9 channels cannot be paired"),
            "{e}"
        );
        assert!(err(["feat/0", "feat/1", "feat/2", "logits"]).contains("vector tap"));
        assert!(
            err(["feat/0", "feat/1", "embed", "embed"]).contains("fourth tap must be `logits`")
        );
        assert!(err(["feat/0", "feat/1", "embed", "feat/9"]).contains("unknown tap `feat/9`"));
        let e = run(
            Config {
                taps: vec!["feat/0".into()],
                ..Config::default()
            },
            &s,
            &s,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("taps must be [feat/k, feat/k+1, embed, logits]"),
            "{e}"
        );
    }
}
