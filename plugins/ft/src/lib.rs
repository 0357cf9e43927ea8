//! Factor transfer (Kim et al., 2018). A paraphraser, an autoencoder on the
//! teacher's last feature map, is first trained to reconstruct it; its
//! encoder's output is the teacher factor `F_t`. Then a translator on the
//! student's map produces `F_s`, and the student and translator minimise
//! `‖F_s/‖F_s‖₂ − F_t/‖F_t‖₂‖₁` (averaged over elements) with the paraphraser
//! frozen. The two steps are two recipe stages (`phase`), see
//! docs/methods.d/ft.md.

use kd_core::{BuildCx, KdError, Losses, Method, Result, StepIo, TapRef, register_method};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor, nn};

/// Which step of factor transfer this stage runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Train the paraphraser to reconstruct the teacher's map (MSE); the
    /// translator is frozen and unused.
    Paraphraser,
    /// Train the translator (and the student) on the factor loss; the
    /// paraphraser is frozen and in evaluation mode.
    #[default]
    Transfer,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Factor channels = ⌊teacher channels · k⌋.
    pub k: f64,
    /// BatchNorm after every convolution (else biased convolutions); `null`
    /// follows KD-Zoo: BatchNorm for 10-class data (CIFAR-10), none otherwise.
    pub use_bn: Option<bool>,
    /// Feature map paraphrased (teacher) and translated (student).
    pub tap: String,
    pub phase: Phase,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            k: 0.5,
            use_bn: None,
            tap: "feat/3".into(),
            phase: Phase::Transfer,
        }
    }
}

struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// One `Conv → [BatchNorm] → LeakyReLU(0.1)` step of the reference's
/// `nn.Sequential`: the convolution is entry `i`, the BatchNorm `i + 1`.
struct Block {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNorm>,
    transposed: bool,
}

impl Block {
    /// Initialised as KD-Zoo's network.py: convolutions Kaiming-normal
    /// (fan-out, ReLU) with zero bias; transposed convolutions keep PyTorch's
    /// default U(±1/√fan_in), fan-in read from weight dim 1 (`c_out`·9).
    fn new(
        seq: &nn::Path,
        i: usize,
        c_in: i64,
        c_out: i64,
        transposed: bool,
        use_bn: bool,
        trainable: bool,
    ) -> Result<Block> {
        // Frozen parameters are added untrainable, so no optimiser sees them.
        let var = |p: &nn::Path,
                   name: &str,
                   dims: &[i64],
                   init: nn::Init,
                   trainable: bool|
         -> Result<Tensor> {
            Ok(p.add(
                name,
                nn::f_init(init, dims, p.device(), p.kind())?,
                trainable,
            ))
        };
        let (conv, norm) = (seq / i, seq / (i + 1));
        let (dims, w_init, b_init) = if transposed {
            let bound = 1.0 / ((c_out * 9) as f64).sqrt();
            let u = nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            ([c_in, c_out, 3, 3], u, u)
        } else {
            let std = (2.0 / (c_out * 9) as f64).sqrt();
            (
                [c_out, c_in, 3, 3],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
                nn::Init::Const(0.0),
            )
        };
        let weight = var(&conv, "weight", &dims, w_init, trainable)?;
        let bias = if use_bn {
            None
        } else {
            Some(var(&conv, "bias", &[c_out], b_init, trainable)?)
        };
        let bn = if use_bn {
            let cst = |name: &str, value: f64, trainable: bool| {
                var(&norm, name, &[c_out], nn::Init::Const(value), trainable)
            };
            Some(BatchNorm {
                weight: cst("weight", 1.0, trainable)?,
                bias: cst("bias", 0.0, trainable)?,
                running_mean: cst("running_mean", 0.0, false)?,
                running_var: cst("running_var", 1.0, false)?,
            })
        } else {
            None
        };
        Ok(Block {
            weight,
            bias,
            bn,
            transposed,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = if self.transposed {
            x.conv_transpose2d(
                &self.weight,
                self.bias.as_ref(),
                [1, 1],
                [1, 1],
                [0, 0],
                1,
                [1, 1],
            )
        } else {
            x.conv2d(&self.weight, self.bias.as_ref(), [1, 1], [1, 1], [1, 1], 1)
        };
        let y = match &self.bn {
            Some(bn) => Tensor::batch_norm(
                &y,
                Some(&bn.weight),
                Some(&bn.bias),
                Some(&bn.running_mean),
                Some(&bn.running_var),
                train,
                0.1,
                1e-5,
                true,
            ),
            None => y,
        };
        kd_aten::leaky_relu(&y, 0.1).map_err(|e| KdError::Invalid(e.to_string()))
    }
}

/// Three blocks `c_in → c_in → c_mid → c_mid` (or back, transposed), at
/// entries 0, 3, 6 of the reference's `nn.Sequential`.
fn stack(
    p: &nn::Path,
    chans: [i64; 4],
    transposed: bool,
    use_bn: bool,
    trainable: bool,
) -> Result<Vec<Block>> {
    (0..3)
        .map(|j| {
            Block::new(
                p,
                3 * j,
                chans[j],
                chans[j + 1],
                transposed,
                use_bn,
                trainable,
            )
        })
        .collect()
}

fn run(blocks: &[Block], x: &Tensor, train: bool) -> Result<Tensor> {
    blocks
        .iter()
        .try_fold(x.shallow_clone(), |h, b| b.forward(&h, train))
}

/// Per-sample L2 normalisation of the flattened factor (F.normalize).
fn unit(f: &Tensor) -> Tensor {
    let f = f.flatten(1, -1);
    &f / f.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12)
}

pub struct Ft {
    s: TapRef,
    t: TapRef,
    phase: Phase,
    encoder: Vec<Block>,
    decoder: Vec<Block>,
    translator: Vec<Block>,
}

impl Method for Ft {
    const NAME: &'static str = "ft";
    const SUMMARY: &'static str =
        "Paraphrasing Complex Network: Network Compression via Factor Transfer (Kim et al., 2018)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        let (s, t, ss, ts) = cx.map_pair(&cfg.tap)?;
        if ss[1..] != ts[1..] {
            return Err(cx.error(format!(
                "tap `{}`: student and teacher maps differ in size ({ss:?} vs {ts:?}); the factors are compared position by position",
                cfg.tap
            )));
        }
        let factor = (ts[0] as f64 * cfg.k) as i64;
        // Also refuses k ≤ 0 and NaN (which casts to 0).
        if factor < 1 {
            return Err(cx.error(format!(
                "k = {} leaves no factor channels for a teacher with {} channels",
                cfg.k, ts[0]
            )));
        }
        let use_bn = cfg.use_bn.unwrap_or(cx.num_classes() == 10);
        let train_para = cfg.phase == Phase::Paraphraser;
        let p = cx.params();
        let para = p / "paraphraser";
        let (c_s, c_t) = (ss[0], ts[0]);
        Ok(Ft {
            s,
            t,
            phase: cfg.phase,
            encoder: stack(
                &(&para / "encoder"),
                [c_t, c_t, factor, factor],
                false,
                use_bn,
                train_para,
            )?,
            decoder: stack(
                &(&para / "decoder"),
                [factor, factor, c_t, c_t],
                true,
                use_bn,
                train_para,
            )?,
            translator: stack(
                &(p / "translator" / "encoder"),
                [c_s, c_s, factor, factor],
                false,
                use_bn,
                !train_para,
            )?,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        let t = io.tap(self.t);
        match self.phase {
            Phase::Paraphraser => {
                let rec = run(&self.decoder, &run(&self.encoder, t, io.train)?, io.train)?;
                out.push("ft_para", rec.mse_loss(t, Reduction::Mean));
            }
            Phase::Transfer => {
                let factor_s = unit(&run(&self.translator, io.tap(self.s), io.train)?);
                let factor_t = unit(&run(&self.encoder, t, false)?);
                out.push("ft", factor_s.l1_loss(&factor_t, Reduction::Mean));
            }
        }
        Ok(())
    }
}

register_method!(Ft);

#[cfg(test)]
mod tests {
    use kd_core::{TapShapes, Taps, testing, testing::Built};
    use tch::{Device, Kind};

    use super::*;

    fn taps(fm: Tensor) -> Taps {
        testing::maps(vec![fm], 2)
    }

    /// Builds on the shapes of `s` and `t` for a data set of `classes` classes.
    fn build(cfg: serde_json::Value, s: &Taps, t: &Taps, classes: i64) -> Result<Built<Ft>> {
        let cfg = kd_core::build_config::<Ft>(cfg)?;
        let (ss, ts) = (TapShapes::of(s), TapShapes::of(t));
        testing::build_on::<Ft>(cfg, &ss, Some(&ts), testing::N_DATA, classes)
    }

    fn step(m: &mut Ft, s: &Taps, t: &Taps) -> Vec<(String, Tensor)> {
        let target = Tensor::zeros([1], (Kind::Int64, Device::Cpu));
        let mut out = Losses::default();
        m.losses(&testing::io(s, Some(t), &target), &mut out)
            .unwrap();
        out.terms
    }

    fn maps(c_s: i64, c_t: i64) -> (Taps, Taps) {
        let f = |c| Tensor::randn([4, c, 3, 3], (Kind::Float, Device::Cpu)).relu();
        (taps(f(c_s)), taps(f(c_t)))
    }

    fn names(vs: &nn::VarStore, prefix: &str) -> Vec<String> {
        let mut n: Vec<String> = vs
            .variables()
            .into_keys()
            .filter(|k| k.starts_with(prefix))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn state_dict_names_follow_the_reference() {
        let (s, t) = maps(4, 8);
        let vs = build(
            serde_json::json!({"tap": "feat/0", "use_bn": true}),
            &s,
            &t,
            100,
        )
        .unwrap()
        .vs;
        let enc = names(&vs, "paraphraser.encoder.");
        assert_eq!(enc.len(), 3 * 5);
        assert!(
            enc.contains(&"paraphraser.encoder.0.weight".into())
                && enc.contains(&"paraphraser.encoder.7.running_var".into())
        );
        assert_eq!(
            vs.variables()["paraphraser.decoder.0.weight"].size(),
            [4, 4, 3, 3]
        );
        assert_eq!(
            vs.variables()["paraphraser.decoder.6.weight"].size(),
            [8, 8, 3, 3]
        );
        assert_eq!(
            vs.variables()["translator.encoder.0.weight"].size(),
            [4, 4, 3, 3]
        );
        assert_eq!(
            vs.variables()["translator.encoder.3.weight"].size(),
            [4, 4, 3, 3]
        );
        assert_eq!(names(&vs, "translator.").len(), 15);
        // KD-Zoo's rule: BatchNorm only for 10 classes; biased convolutions otherwise.
        let vs = build(serde_json::json!({"tap": "feat/0"}), &s, &t, 100)
            .unwrap()
            .vs;
        let want = [
            "translator.encoder.0.bias",
            "translator.encoder.0.weight",
            "translator.encoder.3.bias",
        ];
        assert_eq!(names(&vs, "translator.")[..3], want);
        assert_eq!(names(&vs, "translator.").len(), 6);
        let vs = build(serde_json::json!({"tap": "feat/0"}), &s, &t, 10)
            .unwrap()
            .vs;
        assert_eq!(names(&vs, "translator.").len(), 15);
    }

    #[test]
    fn each_phase_trains_its_own_module() {
        let (s, t) = maps(4, 8);
        for (phase, trained) in [("paraphraser", "paraphraser."), ("transfer", "translator.")] {
            let cfg = serde_json::json!({"tap": "feat/0", "use_bn": true, "phase": phase});
            let Built {
                method: mut m, vs, ..
            } = build(cfg, &s, &t, 10).unwrap();
            let trainable = vs.trainable_variables();
            // Conv weight, BatchNorm weight and bias per block; 3 blocks a stack.
            assert_eq!(
                trainable.len(),
                if phase == "transfer" { 9 } else { 18 },
                "{phase}"
            );
            let before: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .map(|(k, v)| (k, v.copy()))
                .collect();
            let terms = step(&mut m, &s, &t);
            assert_eq!(
                terms[0].0,
                if phase == "transfer" { "ft" } else { "ft_para" }
            );
            assert!(terms[0].1.double_value(&[]) > 0.0);
            // Only the trained module runs in training mode and updates its statistics.
            for (k, v) in before {
                let moved = (vs.variables()[&k].shallow_clone() - v)
                    .abs()
                    .max()
                    .double_value(&[])
                    > 0.0;
                assert_eq!(
                    moved,
                    k.contains("running_") && k.starts_with(trained),
                    "{phase}: {k}"
                );
            }
        }
    }

    #[test]
    fn identical_factors_give_zero() {
        // Without BatchNorm, a translator equal to the paraphraser's encoder
        // maps the teacher's own map to the teacher factor.
        let (_, t) = maps(8, 8);
        let mut m = build(
            serde_json::json!({"tap": "feat/0", "use_bn": false}),
            &t,
            &t,
            10,
        )
        .unwrap()
        .method;
        tch::no_grad(|| {
            for (a, b) in m.translator.iter().zip(&m.encoder) {
                a.weight.shallow_clone().copy_(&b.weight);
                a.bias
                    .as_ref()
                    .unwrap()
                    .shallow_clone()
                    .copy_(b.bias.as_ref().unwrap());
            }
        });
        let l = step(&mut m, &t, &t)[0].1.double_value(&[]);
        assert!(l.abs() < 1e-6, "{l}");
        tch::no_grad(|| {
            let _ = m.translator[0].weight.shallow_clone().g_mul_scalar_(-1.0);
        });
        assert!(step(&mut m, &t, &t)[0].1.double_value(&[]) > 1e-3);
    }

    #[test]
    fn initialisation_follows_kd_zoo() {
        let (s, t) = maps(16, 64);
        let vs = build(
            serde_json::json!({"tap": "feat/0", "use_bn": false}),
            &s,
            &t,
            10,
        )
        .unwrap()
        .vs;
        let v = vs.variables();
        // Conv: N(0, 2 / (c_out · 9)), here c_out = 32.
        let std = v["paraphraser.encoder.6.weight"]
            .std(true)
            .double_value(&[]);
        assert!((std - (2.0f64 / 288.0).sqrt()).abs() < 0.01, "{std}");
        assert_eq!(
            v["paraphraser.encoder.0.bias"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        // Transposed: U(±1/√(c_out · 9)), here c_out = 64.
        let max = v["paraphraser.decoder.6.weight"]
            .abs()
            .max()
            .double_value(&[]);
        assert!(max <= 1.0 / 24.0 && max > 0.9 / 24.0, "{max}");
        assert!(
            v["paraphraser.decoder.6.bias"]
                .abs()
                .max()
                .double_value(&[])
                <= 1.0 / 24.0
        );
    }

    #[test]
    fn refuses_bad_config() {
        let (s, t) = maps(4, 8);
        let err = build(serde_json::json!({}), &s, &t, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown tap `feat/3`") && err.contains("valid taps: feat/0"),
            "{err}"
        );
        let err = build(serde_json::json!({"tap": "feat/0", "k": 0.1}), &s, &t, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no factor channels"), "{err}");
        let err = build(serde_json::json!({"tap": "embed"}), &s, &t, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a feature map"), "{err}");
        let big = taps(Tensor::zeros([4, 8, 5, 5], (Kind::Float, Device::Cpu)));
        let err = build(serde_json::json!({"tap": "feat/0"}), &s, &big, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("differ in size"), "{err}");
        let err = build(serde_json::json!({"phase": "init"}), &s, &t, 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown variant `init`"), "{err}");
    }
}
