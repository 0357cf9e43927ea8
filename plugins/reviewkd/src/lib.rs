//! ReviewKD (Chen et al., CVPR 2021), as dvlab-research/ReviewKD
//! `CIFAR-100/model/reviewkd.py`: the student's levels are reviewed from the
//! deepest up. At each level an attention-based fusion (ABF) maps the
//! student's feature to a common width, mixes it with the fused result of
//! the deeper level through two sigmoid attention maps, and a 3×3 conv + BN
//! brings it to the teacher's channels and size. The hierarchical context
//! loss compares each output with the teacher's level at full size and after
//! average pooling to 4, 2 and 1 (weights 1, ½, ¼, ⅛, those smaller than the
//! map only, normalised by their sum); the levels are summed.

use kd_core::{BuildCx, Losses, Method, Result, Side, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init, Module, ModuleT};
use tch::{Kind, Reduction, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Student levels, shallow to deep. Empty: `feat/1..n`, then `embed` as a
    /// 1×1 map (the authors' `feat[1:]`, whose last entry is the pooled map).
    pub student_taps: Vec<String>,
    /// Teacher levels, one per student level. Empty: `preact/1..n`, then
    /// `embed` (the authors' teacher runs with `preact=True`).
    pub teacher_taps: Vec<String>,
    /// mdistiller's MAX_MID_CHANNEL: the ABFs' width is the smaller of this
    /// and the deepest student level's channels.
    pub max_mid_channel: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            student_taps: Vec::new(),
            teacher_taps: Vec::new(),
            max_mid_channel: 512,
        }
    }
}

/// The authors' `ABF`; parameters `conv1.{0,1}`, `conv2.{0,1}`, `att_conv.0`.
struct Abf {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    /// Absent at the deepest level, which has nothing to fuse.
    att_conv: Option<nn::Conv2D>,
}

impl Abf {
    fn new(p: &nn::Path, c_in: i64, mid: i64, c_out: i64, fuse: bool) -> Abf {
        // kaiming_uniform_(a=1): the leaky-ReLU gain for a = 1 is 1.
        let ws_init = Init::Kaiming {
            dist: NormalOrUniform::Uniform,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::Linear,
        };
        let conv = |padding| nn::ConvConfig {
            bias: false,
            padding,
            ws_init,
            ..Default::default()
        };
        let bn = nn::BatchNormConfig {
            ws_init: Init::Const(1.0),
            bs_init: Init::Const(0.0),
            ..Default::default()
        };
        // att_conv keeps PyTorch's default: U(±1/√fan_in) for weight and bias.
        let b = 1.0 / ((2 * mid) as f64).sqrt();
        let att = nn::ConvConfig {
            ws_init: Init::Uniform { lo: -b, up: b },
            bs_init: Init::Uniform { lo: -b, up: b },
            ..Default::default()
        };
        Abf {
            conv1: nn::conv2d(p / "conv1" / 0, c_in, mid, 1, conv(0)),
            bn1: nn::batch_norm2d(p / "conv1" / 1, mid, bn),
            conv2: nn::conv2d(p / "conv2" / 0, mid, c_out, 3, conv(1)),
            bn2: nn::batch_norm2d(p / "conv2" / 1, c_out, bn),
            att_conv: fuse.then(|| nn::conv2d(p / "att_conv" / 0, 2 * mid, 2, 1, att)),
        }
    }

    /// (output at the teacher's size, fused map handed to the next level up).
    fn forward(
        &self,
        x: &Tensor,
        deeper: Option<&Tensor>,
        out: &[i64],
        train: bool,
    ) -> (Tensor, Tensor) {
        let mut x = self.bn1.forward_t(&self.conv1.forward(x), train);
        if let (Some(att_conv), Some(y)) = (&self.att_conv, deeper) {
            let y = y.upsample_nearest2d(&x.size()[2..], None, None);
            let z = att_conv.forward(&Tensor::cat(&[&x, &y], 1)).sigmoid();
            x = &x * z.narrow(1, 0, 1) + y * z.narrow(1, 1, 1);
        }
        if x.size()[2..] != *out {
            x = x.upsample_nearest2d(out, None, None);
        }
        (self.bn2.forward_t(&self.conv2.forward(&x), train), x)
    }
}

/// The authors' `hcl` for one level.
fn hcl(fs: &Tensor, ft: &Tensor) -> Tensor {
    let h = fs.size()[2];
    let full = fs.mse_loss(ft, Reduction::Mean);
    let pooled = |l: i64| {
        let pool = |t: &Tensor| t.adaptive_avg_pool2d([l, l]);
        pool(fs).mse_loss(&pool(ft), Reduction::Mean)
    };
    let (loss, tot, _) =
        [4, 2, 1]
            .into_iter()
            .filter(|&l| l < h)
            .fold((full, 1.0, 1.0), |(loss, tot, cnt), l| {
                let cnt = cnt / 2.0;
                (loss + pooled(l) * cnt, tot + cnt, cnt)
            });
    loss / tot
}

/// A vector tap (`embed`) is the authors' pooled map, `[B, C, 1, 1]`.
fn as_map(t: &Tensor) -> Tensor {
    match t.size()[..] {
        [b, c] => t.reshape([b, c, 1, 1]),
        _ => t.shallow_clone(),
    }
}

struct Level {
    s: TapRef,
    t: TapRef,
    out: Vec<i64>,
    abf: Abf,
}

pub struct ReviewKd {
    /// Deepest first, as the authors' reversed `abfs`.
    levels: Vec<Level>,
}

/// The given taps, or `{kind}/1..n` (as many as the side has) and `embed`.
fn taps(cx: &mut BuildCx, side: Side, given: &[String], kind: &str) -> Result<Vec<TapRef>> {
    let mut names = given.to_vec();
    if names.is_empty() {
        let stage = |k: usize| format!("{kind}/{k}");
        names.extend((1..).map(stage).take_while(|n| cx.tap(side, n).is_ok()));
        names.push("embed".into());
    }
    names.iter().map(|n| cx.tap(side, n)).collect()
}

/// `[C, H, W]` of a map tap, `[C, 1, 1]` of a vector tap.
fn chw(cx: &BuildCx, tap: TapRef) -> Result<[i64; 3]> {
    match cx.shape(tap)[..] {
        [c] => Ok([c, 1, 1]),
        [c, h, w] => Ok([c, h, w]),
        ref s => Err(cx.error(format!(
            "{} tap `{}` is neither a map nor a vector: {s:?}",
            tap.side, tap.tap
        ))),
    }
}

impl Method for ReviewKd {
    const NAME: &'static str = "reviewkd";
    const SUMMARY: &'static str = "Distilling Knowledge via Knowledge Review (Chen et al., 2021)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let s = taps(cx, Side::Student, &cfg.student_taps, "feat")?;
        let t = taps(cx, Side::Teacher, &cfg.teacher_taps, "preact")?;
        if s.len() != t.len() {
            let names = |v: &[TapRef]| {
                v.iter()
                    .map(|r| r.tap.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(cx.error(format!(
                "student and teacher taps pair up level by level, but the student has {} ({}) and the teacher {} ({}); give student_taps and teacher_taps of the same length",
                s.len(),
                names(&s),
                t.len(),
                names(&t)
            )));
        }
        if cfg.max_mid_channel < 1 {
            return Err(cx.error(format!(
                "max_mid_channel must be positive, got {}",
                cfg.max_mid_channel
            )));
        }
        let (s_chw, t_chw) = (
            s.iter().map(|&r| chw(cx, r)).collect::<Result<Vec<_>>>()?,
            t.iter().map(|&r| chw(cx, r)).collect::<Result<Vec<_>>>()?,
        );
        let n = s.len();
        let mid = cfg.max_mid_channel.min(s_chw[n - 1][0]);
        let levels = (0..n)
            .rev()
            .enumerate()
            .map(|(j, i)| Level {
                s: s[i],
                t: t[i],
                out: t_chw[i][1..].to_vec(),
                abf: Abf::new(
                    &(cx.params() / "abfs" / j),
                    s_chw[i][0],
                    mid,
                    t_chw[i][0],
                    i + 1 < n,
                ),
            })
            .collect();
        Ok(ReviewKd { levels })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let mut deeper: Option<Tensor> = None;
        let mut per_level = Vec::with_capacity(self.levels.len());
        for l in &self.levels {
            let (y, fused) = l
                .abf
                .forward(&as_map(io.tap(l.s)), deeper.as_ref(), &l.out, io.train);
            per_level.push(hcl(&y, &as_map(io.tap(l.t))));
            deeper = Some(fused);
        }
        out.push("hcl", Tensor::stack(&per_level, 0).sum(Kind::Float));
        Ok(())
    }
}

register_method!(ReviewKd);

#[cfg(test)]
mod tests {
    use kd_core::{Taps, testing};
    use serde_json::json;
    use tch::{Device, Kind};

    use super::*;

    const F: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// ResNet-like taps: `feat/0..3` at 16, 16, 8, 4 px and a pooled `embed`.
    fn resnet(channels: [i64; 4]) -> Taps {
        let maps = channels
            .iter()
            .zip([16, 16, 8, 4])
            .map(|(&c, s)| Tensor::randn([2, c, s, s], F))
            .collect();
        let mut taps = testing::maps(maps, 10);
        taps.embed = taps.feat[3].mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        taps
    }

    #[test]
    fn hcl_weights_halve_and_normalise() {
        let ft = Tensor::zeros([1, 1, 8, 8], F);
        // A constant offset shows at every scale: d² whatever the weights.
        let l = hcl(&(&ft + 3.0), &ft).double_value(&[]);
        assert!((l - 9.0).abs() < 1e-5, "{l}");
        // A checkerboard vanishes under every pooling: 1 / (1 + ½ + ¼ + ⅛).
        let board =
            (Tensor::arange(8, F).view([8, 1]) + Tensor::arange(8, F)).remainder(2.0) * 2.0 - 1.0;
        let l = hcl(&board.view([1, 1, 8, 8]), &ft).double_value(&[]);
        assert!((l - 1.0 / 1.875).abs() < 1e-6, "{l}");
        // A 2×2 map pools to 1 only: 1 / (1 + ½).
        let board2 = board.narrow(0, 0, 2).narrow(1, 0, 2).reshape([1, 1, 2, 2]);
        let l = hcl(&board2, &Tensor::zeros([1, 1, 2, 2], F)).double_value(&[]);
        assert!((l - 1.0 / 1.5).abs() < 1e-6, "{l}");
    }

    #[test]
    fn modules_follow_the_authors_state_dict() {
        let (s, t) = (resnet([16, 16, 32, 64]), resnet([16, 32, 64, 128]));
        let mut m = testing::build::<ReviewKd>(json!({}), &s, Some(&t)).unwrap();
        assert!(m.loss(&s, Some(&t)).unwrap().is_finite());
        let names = m.names_and_sizes();
        // abfs.0 is the deepest level (embed, 64 → 128 channels), without attention.
        for want in [
            "abfs.0.conv1.0.weight[64, 64, 1, 1]",
            "abfs.0.conv2.0.weight[128, 64, 3, 3]",
            "abfs.1.att_conv.0.weight[2, 128, 1, 1]",
            "abfs.3.conv1.0.weight[64, 16, 1, 1]",
            "abfs.3.conv2.1.running_var[32]",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert!(!names.iter().any(|n| n.starts_with("abfs.0.att_conv")));
        assert_eq!(names.len(), 4 * 12 - 2);
        let v = m.vs.variables();
        let w = &v["abfs.3.conv1.0.weight"];
        let bound = (3.0f64 / 16.0).sqrt();
        let max = w.abs().max().double_value(&[]);
        assert!(max <= bound && max > 0.8 * bound, "{max}");
        assert_eq!(
            v["abfs.2.conv1.1.weight"]
                .sum(Kind::Float)
                .double_value(&[]),
            64.0
        );
    }

    #[test]
    fn student_level_is_resized_to_the_teacher() {
        let (s, t) = (resnet([16, 16, 32, 64]), resnet([16, 32, 64, 128]));
        let cfg = json!({"student_taps": ["feat/2", "feat/3"], "teacher_taps": ["preact/1", "preact/2"], "max_mid_channel": 8});
        let mut m = testing::build::<ReviewKd>(cfg, &s, Some(&t)).unwrap();
        assert!(m.loss(&s, Some(&t)).unwrap().is_finite());
        assert!(
            m.names_and_sizes()
                .contains(&"abfs.0.conv1.0.weight[8, 64, 1, 1]".to_string())
        );
    }

    #[test]
    fn refuses_unequal_levels_and_bad_width() {
        let s = resnet([16, 16, 32, 64]);
        let t = testing::maps((0..2).map(|_| Tensor::zeros([2, 8, 4, 4], F)).collect(), 10);
        let err = testing::build::<ReviewKd>(json!({}), &s, Some(&t))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("the student has 4 (feat/1, feat/2, feat/3, embed) and the teacher 2 (preact/1, embed)"),
            "{err}"
        );
        let err = testing::build::<ReviewKd>(json!({"max_mid_channel": 0}), &s, Some(&s))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("max_mid_channel must be positive"), "{err}");
        let err = testing::build::<ReviewKd>(json!({}), &s, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs a teacher"), "{err}");
    }
}
