//! Contrastive representation distillation (Tian et al., 2020): NCE with
//! momentum memory banks of both embeddings, the teacher as anchor against
//! student memories and the student against teacher memories.

use kd_core::{
    BuildCx, ContrastSpec, KdError, Losses, Method, Result, StepIo, TapRef, register_method,
};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

const EPS: f64 = 1e-7;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Dimension of the shared projection space.
    pub feat_dim: i64,
    /// Negatives per positive, drawn by the loader from other classes.
    pub nce_n: usize,
    pub nce_t: f64,
    /// Momentum of the memory update.
    pub nce_mom: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            feat_dim: 128,
            nce_n: 16384,
            nce_t: 0.1,
            nce_mom: 0.5,
        }
    }
}

pub struct Crd {
    s: TapRef,
    t: TapRef,
    embed_s: nn::Linear,
    embed_t: nn::Linear,
    memory_s: Tensor,
    memory_t: Tensor,
    /// Normalisers of the teacher-anchored (`Z_t`) and student-anchored
    /// (`Z_s`) scores; `<= 0` means "not yet set".
    z_s: Tensor,
    z_t: Tensor,
    cfg: Config,
    n_data: i64,
    z_known: bool,
    /// Indices and detached embeddings of the last training step, written
    /// into the banks after the optimiser step.
    pending: Option<(Tensor, Tensor, Tensor)>,
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [1i64], true).clamp_min(1e-12)
}

/// `nn.Linear` with PyTorch's default initialisation (U(±1/√in) for both).
fn embed(p: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    nn::linear(
        p / "linear",
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias: true,
        },
    )
}

/// Eq. (18): -(log h(pos) + sum log(1 - h(neg))) averaged over the batch.
fn contrast_loss(x: &Tensor, n_data: i64) -> Tensor {
    let (b, k1) = x.size2().expect("scores are [B, K+1]");
    let c = (k1 - 1) as f64 / n_data as f64;
    let pos = x.select(1, 0);
    let log_pos = (&pos / (&pos + (c + EPS))).log();
    let log_neg = ((x.narrow(1, 1, k1 - 1) + (c + EPS)).reciprocal() * c).log();
    -(log_pos.sum(Kind::Float) + log_neg.sum(Kind::Float)) / b as f64
}

impl Crd {
    /// exp(<memory rows, anchor> / T) / Z; the memory rows are constants.
    fn scores(&self, memory: &Tensor, z: &Tensor, anchor: &Tensor, cidx: &Tensor) -> Tensor {
        let (b, k1) = (cidx.size()[0], cidx.size()[1]);
        let w = memory
            .index_select(0, &cidx.reshape([-1]))
            .view([b, k1, self.cfg.feat_dim]);
        let out = (w.bmm(&anchor.unsqueeze(2)).squeeze_dim(2) / self.cfg.nce_t).exp();
        if !self.z_known && z.double_value(&[]) <= 0.0 {
            // The seed fixes Z from the first batch it sees.
            tch::no_grad(|| {
                z.shallow_clone()
                    .copy_(&(out.mean(Kind::Float) * self.n_data as f64))
            });
            // Data-parallel: the job's first batch, so every rank's Z agrees.
            // A failure here leaves Z per rank, which the engine's
            // end-of-epoch check reports.
            let _ = kd_core::dist::all_reduce_mean(z);
        }
        out / z
    }
}

impl Method for Crd {
    const NAME: &'static str = "crd";
    const SUMMARY: &'static str = "Contrastive Representation Distillation (Tian et al., 2020)";
    type Config = Config;

    fn build(cfg: Config, cx: &mut BuildCx) -> Result<Self> {
        if cfg.feat_dim <= 0
            || cfg.nce_n == 0
            || cfg.nce_t <= 0.0
            || !(0.0..1.0).contains(&cfg.nce_mom)
        {
            return Err(cx.error(format!(
                "needs feat_dim > 0, nce_n > 0, nce_t > 0 and 0 <= nce_mom < 1; got {cfg:?}"
            )));
        }
        let (s, t) = cx.tap_pair("embed")?;
        cx.contrast(ContrastSpec {
            k: cfg.nce_n,
            other_classes: true,
        })?;
        let (s_dim, t_dim) = (cx.shape(s).iter().product(), cx.shape(t).iter().product());
        let n_data = cx.n_data();
        let root = cx.params();
        let embed_s = embed(root / "embed_s", s_dim, cfg.feat_dim);
        let embed_t = embed(root / "embed_t", t_dim, cfg.feat_dim);
        let contrast = root / "contrast";
        let stdv = 1.0 / (cfg.feat_dim as f64 / 3.0).sqrt();
        let memory = |name: &str| {
            let m = contrast.zeros_no_train(name, &[n_data, cfg.feat_dim]);
            tch::no_grad(|| {
                let _ = m.shallow_clone().uniform_(-stdv, stdv);
            });
            m
        };
        let (memory_s, memory_t) = (memory("memory_s"), memory("memory_t"));
        let (z_s, z_t) = (
            contrast.zeros_no_train("Z_s", &[]),
            contrast.zeros_no_train("Z_t", &[]),
        );
        Ok(Crd {
            s,
            t,
            embed_s,
            embed_t,
            memory_s,
            memory_t,
            z_s,
            z_t,
            cfg,
            n_data,
            z_known: false,
            pending: None,
        })
    }

    fn losses(&mut self, io: &StepIo, out: &mut Losses) -> Result<()> {
        // The banks hold training samples; evaluation indices do not address them.
        if !io.train {
            return Ok(());
        }
        let missing =
            || KdError::Invalid("crd: the engine supplied no sample or contrast indices".into());
        let (idx, cidx) = (
            io.index.ok_or_else(missing)?,
            io.contrast_index.ok_or_else(missing)?,
        );
        if cidx.dim() != 2 || cidx.size()[1] != self.cfg.nce_n as i64 + 1 {
            return Err(KdError::Invalid(format!(
                "crd: contrast indices are {:?}, expected [B, {}]",
                cidx.size(),
                self.cfg.nce_n + 1
            )));
        }
        let f_s = normalize(&self.embed_s.forward(&io.tap(self.s).flatten(1, -1)));
        let f_t = normalize(
            &self
                .embed_t
                .forward(&io.tap(self.t).detach().flatten(1, -1)),
        );
        // Teacher as anchor against student memories, and the reverse.
        let out_t = self.scores(&self.memory_s, &self.z_t, &f_t, cidx);
        let out_s = self.scores(&self.memory_t, &self.z_s, &f_s, cidx);
        self.z_known = true;
        out.push(
            "crd",
            contrast_loss(&out_s, self.n_data) + contrast_loss(&out_t, self.n_data),
        );
        self.pending = Some((idx.shallow_clone(), f_s.detach(), f_t.detach()));
        Ok(())
    }

    fn after_step(&mut self, _io: &StepIo) -> Result<()> {
        let Some((idx, f_s, f_t)) = self.pending.take() else {
            return Ok(());
        };
        // Data-parallel: every rank writes the whole job's batch into its
        // banks, so the banks stay the same everywhere.
        let gather = kd_core::dist::all_gather_cat;
        let (idx, f_s, f_t) = (gather(&idx)?, gather(&f_s)?, gather(&f_t)?);
        let mom = self.cfg.nce_mom;
        tch::no_grad(|| {
            for (memory, f) in [(&mut self.memory_t, f_t), (&mut self.memory_s, f_s)] {
                let rows = normalize(&(memory.index_select(0, &idx) * mom + f * (1.0 - mom)));
                let _ = memory.index_copy_(0, &idx, &rows);
            }
        });
        Ok(())
    }
}

register_method!(Crd);

#[cfg(test)]
mod tests {
    use kd_core::{Needs, Tap, TapShapes, Taps, testing, testing::Built};
    use tch::{Device, nn::VarStore};

    use super::*;

    fn shapes(dim: i64) -> TapShapes {
        TapShapes {
            taps: vec![(Tap::Embed, vec![dim]), (Tap::Logits, vec![10])],
        }
    }

    /// Student embeddings of 8, teacher embeddings of 16, 10 classes.
    fn build(cfg: Config, n_data: i64) -> Result<Built<Crd>> {
        testing::build_on::<Crd>(cfg, &shapes(8), Some(&shapes(16)), n_data, 10)
    }

    /// The same, with the requests left in `needs` also when the build fails.
    fn try_build(cfg: Config, needs: &mut Needs, n_data: i64) -> Result<Crd> {
        let (s, t, vs) = (shapes(8), shapes(16), VarStore::new(Device::Cpu));
        let mut cx = BuildCx::new("crd", &s, Some(&t), vs.root(), needs, n_data, 10);
        Crd::build(cfg, &mut cx)
    }

    #[test]
    fn config_errors() {
        let mut needs = Needs::default();
        for cfg in [
            Config {
                feat_dim: 0,
                ..Config::default()
            },
            Config {
                nce_t: 0.0,
                ..Config::default()
            },
            Config {
                nce_mom: 1.0,
                ..Config::default()
            },
        ] {
            assert!(try_build(cfg, &mut needs, 50_000).is_err());
        }
        let err = try_build(Config::default(), &mut needs, 100)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("16384 negatives but the data set has 100"),
            "{err}"
        );
        assert!(needs.contrast.is_none());
    }

    #[test]
    fn state_names_and_initialisation() {
        let Built { vs, needs, .. } = build(
            Config {
                feat_dim: 12,
                nce_n: 4,
                ..Config::default()
            },
            40,
        )
        .unwrap();
        assert_eq!(
            needs.contrast,
            Some(ContrastSpec {
                k: 4,
                other_classes: true
            })
        );
        assert!(needs.index && needs.teacher);
        let vars = vs.variables();
        let mut names: Vec<_> = vars.keys().cloned().collect();
        names.sort();
        let want = [
            "contrast.Z_s",
            "contrast.Z_t",
            "contrast.memory_s",
            "contrast.memory_t",
            "embed_s.linear.bias",
        ];
        assert_eq!(names[..5], want);
        assert_eq!(
            names[5..],
            [
                "embed_s.linear.weight",
                "embed_t.linear.bias",
                "embed_t.linear.weight"
            ]
        );
        assert_eq!(vars["contrast.memory_t"].size(), [40, 12]);
        assert_eq!(vars["embed_t.linear.weight"].size(), [12, 16]);
        let stdv = 1.0 / 4f64.sqrt();
        let m = &vars["contrast.memory_s"];
        assert!(m.abs().max().double_value(&[]) <= stdv && m.std(true).double_value(&[]) > 0.2);
        assert_eq!(
            vs.trainable_variables().len(),
            4,
            "banks and Z are not trained"
        );
    }

    #[test]
    fn z_is_set_once_and_banks_move_toward_the_batch() {
        let mut m = build(
            Config {
                feat_dim: 4,
                nce_n: 3,
                ..Config::default()
            },
            10,
        )
        .unwrap()
        .method;
        let taps = |dim| Taps {
            feat: vec![],
            preact: vec![],
            embed: Tensor::randn([2, dim], tch::kind::FLOAT_CPU),
            logits: Tensor::new(),
            extra: Vec::new(),
        };
        let (s, t) = (taps(8), taps(16));
        let (y, idx) = (
            Tensor::from_slice(&[0i64, 1]),
            Tensor::from_slice(&[5i64, 7]),
        );
        let cidx = Tensor::from_slice(&[5i64, 1, 2, 3, 7, 4, 8, 9]).view([2, 4]);
        let io = |train| StepIo {
            index: Some(&idx),
            contrast_index: Some(&cidx),
            train,
            ..testing::io(&s, Some(&t), &y)
        };
        let mut out = Losses::default();
        m.losses(&io(false), &mut out).unwrap();
        assert!(
            out.terms.is_empty() && m.z_s.double_value(&[]) == 0.0,
            "evaluation leaves CRD alone"
        );
        let before = m.memory_s.copy();
        m.losses(&io(true), &mut out).unwrap();
        let z = m.z_s.double_value(&[]);
        assert!(z > 0.0 && m.z_t.double_value(&[]) > 0.0);
        m.after_step(&io(true)).unwrap();
        m.losses(&io(true), &mut out).unwrap();
        assert_eq!(
            m.z_s.double_value(&[]),
            z,
            "Z stays fixed after the first batch"
        );
        let changed = (&m.memory_s - &before)
            .abs()
            .sum_dim_intlist(1, false, Kind::Float)
            .gt(0.0);
        let changed: Vec<bool> = Vec::try_from(changed).unwrap();
        assert_eq!(
            changed,
            [
                false, false, false, false, false, true, false, true, false, false
            ]
        );
        let norms = m
            .memory_s
            .index_select(0, &idx)
            .norm_scalaropt_dim(2, [1i64], false);
        assert!(
            (norms - 1.0).abs().max().double_value(&[]) < 1e-6,
            "updated rows are unit length"
        );
    }
}
