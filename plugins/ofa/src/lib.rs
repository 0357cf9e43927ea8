//! One-for-All KD (Hao et al., NeurIPS 2023), as the authors' code
//! (Hao840/OFAKD `distillers/ofa.py`): with p = softmax(z/T) and m the
//! one-hot label,
//!
//! `ofa(z_s, z_t) = mean_b Σ_c −((p_t + m)^ε − m) · log p_s`,
//!
//! applied to the student's logits (`kd`, × `kd_loss_weight`) and to
//! projector branches that carry student stages `feat/k` into the logit
//! space (`stage{k}`, each × `loss_weight`). Only the teacher's logits are
//! read, so any pair of families works. Branches (parameters
//! `projector.{k}.*`, the authors' `state_dict` keys) follow the authors'
//! design: on a CNN student, `n − k` `SepConv`s (a 1×1 conv at the last
//! stage n), average pooling and a linear head; on a ViT student (one with
//! a `cls` tap), the stage's patch-token map goes through `PatchMerging`s
//! down to a 7×7 grid, `max(n − k, 1)` timm `Block`s (4 heads), the mean
//! over tokens and a linear head. The ViT branch reads kd's `feat/k`, which
//! carries no class token: it is the authors' branch for token-free
//! students (`token_num` 0, `GAP1d`), where theirs on a DeiT reads the
//! class token it carried through the blocks.

use kd_core::{BuildCx, Losses, Method, Result, Side, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// ε: one for every term, or one per stage then the logits' (`--ofa-eps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Eps {
    One(f64),
    Each(Vec<f64>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Student stages (`feat/k`) given a branch (`--ofa-stage`).
    pub stages: Vec<usize>,
    /// Exponent of the target-enhanced teacher distribution (`--ofa-eps`).
    pub eps: Eps,
    /// Softmax temperature of both sides, no T² (`--ofa-temperature`).
    pub temperature: f64,
    /// Weight of the summed branch terms (`--ofa-loss-weight`).
    pub loss_weight: f64,
    /// Weight of the term on the student's logits (`--kd-loss-weight`).
    pub kd_loss_weight: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stages: vec![1, 2, 3, 4],
            eps: Eps::One(1.0),
            temperature: 1.0,
            loss_weight: 1.0,
            kd_loss_weight: 1.0,
        }
    }
}

/// The authors' `ofa_loss`; `mask` is the float one-hot label.
pub fn ofa_loss(s: &Tensor, t: &Tensor, mask: &Tensor, eps: f64, temperature: f64) -> Tensor {
    let log_p_s = (s / temperature).log_softmax(1, Kind::Float);
    let p_t = (t / temperature).softmax(1, Kind::Float);
    let w = (p_t + mask).pow_tensor_scalar(eps) - mask;
    -(w * log_p_s)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

fn conv(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    groups: i64,
    bias: bool,
) -> nn::Conv2D {
    let ws_init = nn::Init::Kaiming {
        dist: nn::init::NormalOrUniform::Normal,
        fan: nn::init::FanInOut::FanOut,
        non_linearity: nn::init::NonLinearity::ReLU,
    };
    let bound = 1.0 / ((c_in / groups * k * k) as f64).sqrt(); // PyTorch's default bias
    let cfg = nn::ConvConfig {
        stride,
        padding: k / 2,
        groups,
        bias,
        ws_init,
        bs_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        p,
        c,
        nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        },
    )
}

/// `nn.Linear` under the authors' `init_weights`: N(0, 0.02) (timm's
/// truncation at ±2 lies 100σ out), bias zero.
fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, i, o, cfg)
}

/// The authors' `SepConv`: two depthwise-separable convolutions (the first
/// stride 2), each followed by BatchNorm and ReLU.
fn sep_conv(p: nn::Path, c: i64, c_out: i64) -> nn::SequentialT {
    let relu = |x: &Tensor| x.relu();
    nn::seq_t()
        .add(conv(&p / 0, c, c, 3, 2, c, false))
        .add(conv(&p / 1, c, c, 1, 1, 1, false))
        .add(bn(&p / 2, c))
        .add_fn(relu)
        .add(conv(&p / 4, c, c, 3, 1, c, false))
        .add(conv(&p / 5, c, c_out, 1, 1, 1, false))
        .add(bn(&p / 6, c_out))
        .add_fn(relu)
}

/// timm's `Block` (pre-norm attention and MLP, no qkv bias, exact GELU).
fn block(p: nn::Path, d: i64, heads: i64) -> impl Module + use<> {
    let ln = |q: nn::Path| nn::layer_norm(q, vec![d], Default::default());
    let (norm1, norm2) = (ln(&p / "norm1"), ln(&p / "norm2"));
    let (qkv, proj) = (
        linear(&p / "attn" / "qkv", d, 3 * d, false),
        linear(&p / "attn" / "proj", d, d, true),
    );
    let (fc1, fc2) = (
        linear(&p / "mlp" / "fc1", d, 4 * d, true),
        linear(&p / "mlp" / "fc2", 4 * d, d, true),
    );
    nn::func(move |x| {
        let (b, n) = (x.size()[0], x.size()[1]);
        let qkv = qkv
            .forward(&x.apply(&norm1))
            .view([b, n, 3, heads, d / heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn =
            (q.matmul(&k.transpose(-2, -1)) / ((d / heads) as f64).sqrt()).softmax(-1, Kind::Float);
        let x = x + attn
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, d])
            .apply(&proj);
        &x + x.apply(&norm2).apply(&fc1).gelu("none").apply(&fc2)
    })
}

/// The authors' `PatchMerging` on `[B, H, W, C]`: each 2×2 neighbourhood
/// concatenated, LayerNorm, a linear map without bias, optional GELU.
fn patch_merging(p: nn::Path, c: i64, c_out: i64, gelu: bool) -> impl Module + use<> {
    let norm = nn::layer_norm(&p / "norm", vec![4 * c], Default::default());
    let reduction = linear(&p / "reduction", 4 * c, c_out, false);
    nn::func(move |x| {
        let at = |h: i64, w: i64| x.slice(1, h, None, 2).slice(2, w, None, 2);
        let y = Tensor::cat(&[at(0, 0), at(1, 0), at(0, 1), at(1, 1)], -1)
            .apply(&norm)
            .apply(&reduction);
        if gelu { y.gelu("none") } else { y }
    })
}

struct Stage {
    name: String,
    tap: TapRef,
    eps: f64,
    branch: nn::SequentialT,
}

pub struct Ofa {
    logits: TapRef,
    teacher: TapRef,
    stages: Vec<Stage>,
    eps: f64,
    cfg: Config,
}

impl Method for Ofa {
    const NAME: &'static str = "ofa";
    const SUMMARY: &'static str = "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation (Hao et al., 2023)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let n_terms = cfg.stages.len() + 1;
        let eps = match &cfg.eps {
            Eps::One(e) => vec![*e; n_terms],
            Eps::Each(e) if e.len() == 1 => vec![e[0]; n_terms],
            Eps::Each(e) => e.clone(),
        };
        if eps.len() != n_terms || !eps.iter().all(|e| e.is_finite() && *e > 0.0) {
            return Err(cx.error(format!(
                "eps must be one positive number or {n_terms} (one per stage of {:?}, then the logits'), got {:?}",
                cfg.stages, cfg.eps
            )));
        }
        let positive = cfg.temperature > 0.0 && cfg.temperature.is_finite();
        let weights = [cfg.loss_weight, cfg.kd_loss_weight];
        if !positive || weights.iter().any(|w| !(*w >= 0.0 && w.is_finite())) {
            return Err(cx.error(format!(
                "temperature must be finite and positive, loss_weight and kd_loss_weight finite and non-negative; got {}, {}, {}",
                cfg.temperature, cfg.loss_weight, cfg.kd_loss_weight
            )));
        }
        let (logits, teacher) = cx.tap_pair("logits")?;
        let (cs, ct) = (cx.shape(logits), cx.shape(teacher));
        if cs != ct || cs.len() != 1 {
            return Err(cx.error(format!(
                "needs logits over the same classes, got student {cs:?} and teacher {ct:?}"
            )));
        }
        let classes = cs[0];
        let dim = |cx: &mut BuildCx, side| -> Result<i64> {
            let embed = cx.tap(side, "embed")?;
            Ok(cx.shape(embed).last().copied().unwrap_or(0))
        };
        let (dim_s, dim_t) = (dim(cx, Side::Student)?, dim(cx, Side::Teacher)?);
        let vit = cx.tap(Side::Student, "cls").is_ok();
        // The student's last stage n (the authors' 4).
        let last = (1..=64i64)
            .filter(|k| cx.tap(Side::Student, &format!("feat/{k}")).is_ok())
            .max()
            .unwrap_or(0);
        let mut stages = Vec::new();
        for (i, &k) in cfg.stages.iter().enumerate() {
            let name = format!("feat/{k}");
            let tap = cx
                .tap(Side::Student, &name)
                .map_err(|e| cx.error(format!("stage {k} of `stages` {:?}: {e}", cfg.stages)))?;
            let &[c, h, w] = cx.shape(tap).as_slice() else {
                return Err(cx.error(format!(
                    "stage {k}: `{name}` must be a [C, H, W] map, got {:?}",
                    cx.shape(tap)
                )));
            };
            if stages.iter().any(|s: &Stage| s.tap == tap) {
                return Err(cx.error(format!("stage {k} is listed twice in {:?}", cfg.stages)));
            }
            let p = cx.params() / "projector" / k;
            let (down, k) = (last - k as i64, k as i64);
            let mut branch = nn::seq_t();
            if vit {
                // Merges to a 7×7 grid, as the authors' `final_patch_grid`.
                let merges = (h as f64 / 7.0).log2().max(0.0) as u32;
                let even = (0..merges).all(|i| (h >> i) % 2 == 0);
                if h != w || !even || dim_s % 4 != 0 || (merges == 0 && c != dim_s) {
                    return Err(cx.error(format!(
                        "stage {k}: the ViT branch needs a square map halving evenly to 7×7 and a width divisible by 4 heads, got `{name}` [{c}, {h}, {w}] and embed [{dim_s}]"
                    )));
                }
                branch = branch.add_fn(|x| x.permute([0, 2, 3, 1]));
                for i in 0..merges as i64 {
                    let gelu = i == 0 || i != merges as i64 - 1;
                    branch = branch.add(patch_merging(
                        &p / 0 / "fn" / i,
                        if i == 0 { c } else { dim_s },
                        dim_s,
                        gelu,
                    ));
                }
                branch = branch.add_fn(|x| x.flatten(1, 2));
                for j in 0..down.max(1) {
                    branch = branch.add(block(&p / 1 / j, dim_s, 4));
                }
                branch = branch
                    .add_fn(|x| x.mean_dim(1, false, x.kind()))
                    .add(linear(&p / 3, dim_s, classes, true));
            } else {
                let width = dim_s.max(dim_t);
                let mut c = c;
                for i in 0..down {
                    branch = branch.add(sep_conv(
                        &p / i / "op",
                        c,
                        if i == down - 1 { width } else { 2 * c },
                    ));
                    c *= 2;
                }
                if down <= 0 {
                    branch = branch.add(conv(&p / 0, c, width, 1, 1, 1, true));
                }
                let head = linear(&p / (down.max(1) + 2), width, classes, true);
                branch = branch
                    .add_fn(|x| x.mean_dim([2i64, 3].as_slice(), false, x.kind()))
                    .add(head);
            }
            stages.push(Stage {
                name: format!("stage{k}"),
                tap,
                eps: eps[i],
                branch,
            });
        }
        Ok(Ofa {
            logits,
            teacher,
            stages,
            eps: eps[n_terms - 1],
            cfg,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let (s, t) = (io.tap(self.logits), io.tap(self.teacher));
        // The authors' mask: a mixed label's dominant class.
        let y = match io.soft_target {
            Some(soft) => soft.argmax(1, false),
            None => io.target().shallow_clone(),
        };
        let mask = y.one_hot(s.size()[1]).to_kind(Kind::Float);
        let temp = self.cfg.temperature;
        for st in &self.stages {
            let z = st.branch.forward_t(io.tap(st.tap), io.train);
            out.push(
                &st.name,
                ofa_loss(&z, t, &mask, st.eps, temp) * self.cfg.loss_weight,
            );
        }
        out.push(
            "kd",
            ofa_loss(s, t, &mask, self.eps, temp) * self.cfg.kd_loss_weight,
        );
        Ok(())
    }
}

register_method!(Ofa);

#[cfg(test)]
mod tests {
    use kd_core::{Tap, Taps, testing};
    use serde_json::json;
    use tch::Device;

    use super::*;

    const F: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// A CNN-like student: stages 1..=4 halving from 8×8, 16 → 128 channels.
    fn cnn(b: i64, classes: i64) -> Taps {
        let maps = (0..5)
            .map(|k| Tensor::randn([b, 8 << k.min(4), 16 >> k, 16 >> k], F))
            .collect();
        let mut s = testing::taps(maps, Tensor::randn([b, classes], F));
        s.embed = Tensor::randn([b, 128], F);
        s
    }

    #[test]
    fn hand_computed_loss() {
        // p_s = (½, ½); p_t = (¾, ¼), label 0, ε = 2:
        // w = ((¾ + 1)² − 1, ¼²) = (33/16, 1/16); loss = (34/16)·ln 2.
        let (s, t) = (
            Tensor::from_slice(&[0f32, 0.0]).view([1, 2]),
            Tensor::from_slice(&[3f32.ln(), 0.0]).view([1, 2]),
        );
        let mask = Tensor::from_slice(&[1f32, 0.0]).view([1, 2]);
        let v = ofa_loss(&s, &t, &mask, 2.0, 1.0).double_value(&[]);
        assert!((v - 34.0 / 16.0 * 2f64.ln()).abs() < 1e-6, "{v}");
        // ε = 1: cross-entropy with the teacher's distribution.
        let v = ofa_loss(&s, &t, &mask, 1.0, 1.0).double_value(&[]);
        assert!((v - 2f64.ln()).abs() < 1e-6, "{v}");
    }

    #[test]
    fn cnn_branches_follow_the_authors_layout() {
        let (s, t) = (cnn(2, 10), cnn(2, 10));
        let mut b = testing::build::<Ofa>(
            json!({"stages": [2, 4], "eps": [1.5, 1.2, 1.0]}),
            &s,
            Some(&t),
        )
        .unwrap();
        let names = b.names_and_sizes();
        for want in [
            "projector.2.0.op.0.weight[32, 1, 3, 3]",
            "projector.2.0.op.5.weight[64, 32, 1, 1]",
            "projector.2.1.op.5.weight[128, 64, 1, 1]",
            "projector.2.1.op.6.running_var[128]",
            "projector.2.4.weight[10, 128]",
            "projector.4.0.bias[128]",
            "projector.4.3.weight[10, 128]",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert_eq!(names.len(), 2 * (4 + 2 * 4) + 2 + 2 + 2, "{names:?}");
        let out = b.losses(&s, Some(&t)).unwrap();
        let terms: Vec<&str> = out.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(terms, ["stage2", "stage4", "kd"]);
        let w = &b.vs.variables()["projector.2.0.op.5.weight"];
        let std = w.std(true).double_value(&[]);
        assert!(
            (std - (2.0f64 / 64.0).sqrt()).abs() < 0.03,
            "kaiming fan-out std {std}"
        );
    }

    #[test]
    fn vit_branch_merges_to_seven_and_keeps_the_width() {
        let mut s = testing::maps(
            (0..5).map(|_| Tensor::randn([2, 8, 14, 14], F)).collect(),
            10,
        );
        s.embed = Tensor::randn([2, 8], F);
        s.extra.push((Tap::Cls, s.embed.shallow_clone()));
        let t = cnn(2, 10);
        let mut b = testing::build::<Ofa>(json!({"stages": [1, 4]}), &s, Some(&t)).unwrap();
        let names = b.names_and_sizes();
        for want in [
            "projector.1.0.fn.0.reduction.weight[8, 32]",
            "projector.1.1.2.attn.qkv.weight[24, 8]",
            "projector.4.1.0.mlp.fc2.weight[8, 32]",
            "projector.4.3.weight[10, 8]",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("projector.1.1.3") || n.starts_with("projector.4.1.1"))
        );
        assert!(b.loss(&s, Some(&t)).unwrap().is_finite());
    }

    #[test]
    fn mixed_labels_mask_their_dominant_class() {
        let (s, t) = (cnn(1, 3), cnn(1, 3));
        let cfg = json!({"stages": [], "eps": 2.0});
        let mut b = testing::build::<Ofa>(cfg, &s, Some(&t)).unwrap();
        let (y, soft) = (
            Tensor::from_slice(&[0i64]),
            Tensor::from_slice(&[0.3f32, 0.0, 0.7]).view([1, 3]),
        );
        let io = StepIo {
            soft_target: Some(&soft),
            ..testing::io(&s, Some(&t), &y)
        };
        let got = b.losses_with(&io).unwrap().total().double_value(&[]);
        let mask = Tensor::from_slice(&[0f32, 0.0, 1.0]).view([1, 3]);
        let want = ofa_loss(&s.logits, &t.logits, &mask, 2.0, 1.0).double_value(&[]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn refuses_bad_config_and_taps() {
        let (s, t) = (cnn(1, 10), cnn(1, 10));
        let err = |cfg: serde_json::Value, s: &Taps| {
            testing::build::<Ofa>(cfg, s, Some(&t))
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(json!({"eps": [1.0, 2.0]}), &s).contains("one per stage"));
        assert!(err(json!({"eps": -1.0}), &s).contains("eps must be"));
        assert!(err(json!({"temperature": 0.0}), &s).contains("temperature"));
        assert!(err(json!({"stages": [5]}), &s).contains("valid taps: feat/0"));
        assert!(err(json!({"stages": [2, 2]}), &s).contains("twice"));
        assert!(err(json!({"stage": [2]}), &s).contains("unknown field"));
        let mut v = testing::maps(
            (0..2).map(|_| Tensor::randn([1, 6, 10, 10], F)).collect(),
            10,
        );
        v.extra.push((Tap::Cls, Tensor::zeros([1, 6], F)));
        assert!(err(json!({"stages": [1]}), &v).contains("ViT branch"));
    }
}
