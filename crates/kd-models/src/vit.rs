//! Vision Transformers under timm's names and `state_dict` keys
//! (`timm/models/vision_transformer.py`, `timm/models/deit.py`), so timm's
//! weight files load as they are: `vit_{tiny,small,base}_patch16_224`,
//! `deit_{tiny,small,base}_patch16_224` (the same networks; DeiT's weights)
//! and `deit_{tiny,small,base}_distilled_patch16_224` (a class and a
//! distillation token, two heads).
//!
//! Keys: `cls_token`, `dist_token`, `pos_embed` (`[1, prefix + N, D]`: the
//! position embedding covers the prefix tokens, as in the original ViT and
//! DeiT), `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
//! mlp.fc1,mlp.fc2}`, `norm`, `head`, `head_dist`. Initialisation as timm's
//! default: linear weights normal(0.02) (timm truncates at ±2, i.e. ±100σ),
//! biases zero, `pos_embed` and `dist_token` normal(0.02), `cls_token`
//! normal(1e-6), LayerNorm weight 1 bias 0, the patch projection as
//! `nn.Conv2d` makes it.
//!
//! Taps: `tokens/i` all tokens after block `i` (`[B, prefix + N, D]`);
//! `feat/0` the patch tokens entering the first block and `feat/k`
//! (k = 1..=stages) after the last block of stage `k`, reshaped to
//! `[B, D, H/p, W/p]` maps (up to four stages of `depth / stages` blocks),
//! so feature methods and projectors read ViTs and CNNs alike; `preact/k`
//! equals `feat/k` (no activation closes a block); `cls` and `dist` the
//! tokens after the final norm; `embed` what the head reads (the mean of
//! both tokens when distilled, timm's `pre_logits`); `logits_dist` the
//! distillation head. `logits` is the class head's output, except for a
//! distilled network in evaluation, where it is the mean of both heads
//! (timm's `forward_head`; in training the class head alone, as DeiT's own
//! `DistilledVisionTransformer` trains it).

use kd_core::{Tap, Taps};
use tch::Tensor;
use tch::nn::{self, Module};

use crate::droppath::{Draws, drop_path, linear_rates};
use crate::layers::{dense, timm_linear};
use crate::{ModelError, Network, check_classes, check_drop_path_rate, check_patch_grid};

/// timm's `VisionTransformer` arguments that kd's zoo varies.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub num_classes: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    /// A distillation token and head beside the class token's (DeiT).
    pub distilled: bool,
    /// Stochastic depth, rising linearly from 0 at the first block to this
    /// at the last (timm's `drop_path_rate`).
    pub drop_path_rate: f64,
}

impl VitConfig {
    /// ViT-Ti/16 (DeiT-Ti) at 224 pixels: 192 wide, 12 blocks, 3 heads.
    pub fn tiny() -> Self {
        Self::sized(192, 12, 3)
    }

    /// ViT-S/16 (DeiT-S): 384 wide, 12 blocks, 6 heads.
    pub fn small() -> Self {
        Self::sized(384, 12, 6)
    }

    /// ViT-B/16 (DeiT-B): 768 wide, 12 blocks, 12 heads.
    pub fn base() -> Self {
        Self::sized(768, 12, 12)
    }

    fn sized(embed_dim: i64, depth: i64, num_heads: i64) -> Self {
        VitConfig {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            num_classes: 1000,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            distilled: false,
            drop_path_rate: 0.0,
        }
    }

    pub fn with_num_classes(mut self, n: i64) -> Self {
        self.num_classes = n;
        self
    }

    pub fn with_distilled(mut self, on: bool) -> Self {
        self.distilled = on;
        self
    }

    pub(crate) fn check(&self) -> Result<(), ModelError> {
        check_classes("ViT", self.num_classes)?;
        let bad = |reason: String| {
            Err(ModelError::InvalidConfig {
                family: "ViT",
                reason,
            })
        };
        check_patch_grid(self.img_size, self.patch_size).or_else(bad)?;
        if self.depth < 1 || self.num_heads < 1 || self.embed_dim % self.num_heads != 0 {
            return bad(format!(
                "embed_dim {} must split evenly into num_heads {} (depth {} at least 1)",
                self.embed_dim, self.num_heads, self.depth
            ));
        }
        check_drop_path_rate(self.drop_path_rate).or_else(bad)?;
        Ok(())
    }

    pub fn init(self, p: &nn::Path) -> Result<VisionTransformer, ModelError> {
        self.check()?;
        let d = self.embed_dim;
        let grid = self.img_size / self.patch_size;
        let prefix = 1 + i64::from(self.distilled);
        let normal = |std| nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let cls_token = p.var("cls_token", &[1, 1, d], normal(1e-6));
        let dist_token = self
            .distilled
            .then(|| p.var("dist_token", &[1, 1, d], normal(0.02)));
        let pos_embed = p.var("pos_embed", &[1, prefix + grid * grid, d], normal(0.02));
        let proj = nn::conv2d(
            p / "patch_embed" / "proj",
            self.in_chans,
            d,
            self.patch_size,
            nn::ConvConfig {
                stride: self.patch_size,
                ..Default::default()
            },
        );
        let blocks = linear_rates(self.drop_path_rate, self.depth)
            .into_iter()
            .enumerate()
            .map(|(i, rate)| Block::new(&(p / "blocks" / i as i64), &self, rate))
            .collect();
        let head = timm_linear(p / "head", d, self.num_classes, true);
        let head_dist = self
            .distilled
            .then(|| timm_linear(p / "head_dist", d, self.num_classes, true));
        Ok(VisionTransformer {
            cls_token,
            dist_token,
            pos_embed,
            proj,
            blocks,
            norm: layer_norm(p / "norm", d),
            head,
            head_dist,
            patch_size: self.patch_size,
            img_size: self.img_size,
            prefix_tail: false,
        })
    }
}

fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![d],
        nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
    )
}

/// Pre-norm block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, each
/// branch dropped per sample with probability `drop_path` in training
/// (torch's generator, which the engine seeds per step from the run's
/// seed, stage, epoch and batch: exact on resume).
#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    drop_path: f64,
}

impl Block {
    fn new(p: &nn::Path, cfg: &VitConfig, drop_path: f64) -> Block {
        let d = cfg.embed_dim;
        let hidden = (d as f64 * cfg.mlp_ratio) as i64;
        Block {
            norm1: layer_norm(p / "norm1", d),
            qkv: timm_linear(p / "attn" / "qkv", d, 3 * d, true),
            proj: timm_linear(p / "attn" / "proj", d, d, true),
            norm2: layer_norm(p / "norm2", d),
            fc1: timm_linear(p / "mlp" / "fc1", d, hidden, true),
            fc2: timm_linear(p / "mlp" / "fc2", hidden, d, true),
            heads: cfg.num_heads,
            drop_path,
        }
    }

    /// Attention of the first `queries` tokens of `x` over all of them
    /// (every token when `queries` is `N`).
    fn attention(&self, x: &Tensor, queries: i64) -> Tensor {
        let (b, n, d) = x.size3().expect("tokens are [B, N, D]");
        let heads = |t: Tensor, n: i64| {
            t.reshape([b, n, -1, self.heads, d / self.heads])
                .permute([2, 0, 3, 1, 4])
        };
        let (q, k, v) = if queries == n {
            // [B, N, 3, heads, D/heads] -> three [B, heads, N, D/heads].
            let qkv = heads(dense(&self.qkv, x), n);
            (qkv.get(0), qkv.get(1), qkv.get(2))
        } else {
            // Keys and values of every token, queries of the first few:
            // the fused projection's rows split, so the rest's queries are
            // never computed.
            let (w, bias) = (&self.qkv.ws, self.qkv.bs.as_ref().expect("qkv has a bias"));
            let rows = |t: &Tensor, from: i64, len: i64| t.narrow(0, from, len);
            let q = kd_aten::linear(
                &x.narrow(1, 0, queries),
                &rows(w, 0, d),
                Some(&rows(bias, 0, d)),
            );
            let kv = heads(
                kd_aten::linear(x, &rows(w, d, 2 * d), Some(&rows(bias, d, 2 * d))),
                n,
            );
            (heads(q, queries).get(0), kv.get(0), kv.get(1))
        };
        // ATen's fused attention: flash / memory-efficient kernels on CUDA.
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        dense(&self.proj, &y.transpose(1, 2).reshape([b, queries, d]))
    }

    /// The block's output for the first `queries` tokens (every token when
    /// `queries` is `N`).
    fn forward(&self, x: &Tensor, queries: i64, train: bool) -> Tensor {
        let a = self.attention(&self.norm1.forward(x), queries);
        let x = x.narrow(1, 0, queries) + drop_path(&a, self.drop_path, train, Draws::Torch);
        let m = dense(
            &self.fc2,
            &dense(&self.fc1, &self.norm2.forward(&x)).gelu("none"),
        );
        &x + drop_path(&m, self.drop_path, train, Draws::Torch)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct VisionTransformer {
    cls_token: Tensor,
    dist_token: Option<Tensor>,
    pos_embed: Tensor,
    proj: nn::Conv2D,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    head: nn::Linear,
    head_dist: Option<nn::Linear>,
    patch_size: i64,
    img_size: i64,
    /// The last block computes the class (and distillation) tokens alone:
    /// set by `read_taps` when nobody reads its patch tokens, the head
    /// reading only those (a logit method on a ViT student).
    prefix_tail: bool,
}

impl VisionTransformer {
    fn prefix(&self) -> i64 {
        1 + i64::from(self.dist_token.is_some())
    }

    /// Blocks after which each stage's `feat/k` is taken.
    fn stage_ends(&self) -> Vec<usize> {
        let depth = self.blocks.len();
        let stages = depth.min(4);
        (1..=stages).map(|k| depth * k / stages - 1).collect()
    }

    /// The patch tokens of `x` (`[B, prefix + N, D]`) as `[B, D, H, W]`
    /// maps: a view, no copy.
    fn as_map(&self, x: &Tensor) -> Tensor {
        let grid = self.img_size / self.patch_size;
        x.narrow(1, self.prefix(), grid * grid)
            .transpose(1, 2)
            .unflatten(2, [grid, grid])
    }
}

impl Network for VisionTransformer {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let b = xs.size()[0];
        let patches = self.proj.forward(xs).flatten(2, 3).transpose(1, 2);
        let mut prefix = vec![self.cls_token.expand([b, -1, -1], false)];
        if let Some(t) = &self.dist_token {
            prefix.push(t.expand([b, -1, -1], false));
        }
        prefix.push(patches);
        let mut x = Tensor::cat(&prefix, 1) + &self.pos_embed;
        let mut feat = vec![self.as_map(&x)];
        let ends = self.stage_ends();
        let mut tokens = Vec::with_capacity(self.blocks.len());
        let (depth, n) = (self.blocks.len(), x.size()[1]);
        for (i, block) in self.blocks.iter().enumerate() {
            if i + 1 == depth && self.prefix_tail {
                // Its patch tokens and the map made of them stay undefined.
                x = block.forward(&x, self.prefix(), train);
                feat.push(Tensor::new());
                tokens.push(Tensor::new());
                break;
            }
            x = block.forward(&x, n, train);
            if ends.contains(&i) {
                feat.push(self.as_map(&x));
            }
            tokens.push(x.shallow_clone());
        }
        let x = self.norm.forward(&x);
        let cls = x.select(1, 0);
        let logits_cls = dense(&self.head, &cls);
        let mut extra: Vec<(Tap, Tensor)> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (Tap::Tokens(i), t))
            .collect();
        let (embed, logits) = match &self.head_dist {
            Some(head_dist) => {
                let dist = x.select(1, 1);
                let logits_dist = dense(head_dist, &dist);
                let logits = if train {
                    logits_cls
                } else {
                    (&logits_cls + &logits_dist) / 2.0
                };
                let embed = (&cls + &dist) / 2.0;
                extra.push((Tap::Dist, dist));
                extra.push((Tap::LogitsDist, logits_dist));
                (embed, logits)
            }
            None => (cls.shallow_clone(), logits_cls),
        };
        extra.insert(self.blocks.len(), (Tap::Cls, cls));
        Taps {
            preact: feat.iter().map(Tensor::shallow_clone).collect(),
            feat,
            embed,
            logits,
            extra,
        }
    }

    fn read_taps(&mut self, taps: Option<&[Tap]>) {
        let (depth, stages) = (self.blocks.len(), self.stage_ends().len());
        // The last block's patch tokens feed only these taps.
        let tail = [
            Tap::Tokens(depth - 1),
            Tap::Feat(stages),
            Tap::Preact(stages),
        ];
        self.prefix_tail = taps.is_some_and(|t| !t.iter().any(|t| tail.contains(t)));
    }

    /// The position embedding fixes the input size: say which argument
    /// fits the data instead of failing inside the forward.
    fn check_input(&self, probe: &Tensor) -> Result<(), ModelError> {
        let (img_size, patch) = (self.img_size, self.patch_size);
        let size = probe.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        if h != img_size || w != img_size {
            return Err(ModelError::InvalidConfig {
                family: "ViT",
                reason: format!(
                    "built for {img_size}x{img_size} images (patch {patch}) but the data is {h}x{w}; \
                 give the model img_size={h}, e.g. vit_tiny_patch16_224(img_size={h},patch_size=4)"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, nn::VarStore};

    use super::*;

    fn small(distilled: bool) -> VitConfig {
        VitConfig {
            img_size: 32,
            patch_size: 4,
            depth: 6,
            ..VitConfig::tiny()
        }
        .with_num_classes(10)
        .with_distilled(distilled)
    }

    #[test]
    fn taps_have_the_documented_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let net = small(true).init(&vs.root()).unwrap();
        let taps = net.forward_taps(&Tensor::randn([2, 3, 32, 32], tch::kind::FLOAT_CPU), false);
        assert_eq!(taps.feat.len(), 5);
        assert_eq!(taps.feat[4].size(), [2, 192, 8, 8]);
        assert_eq!(taps.get(Tap::Tokens(5)).unwrap().size(), [2, 66, 192]);
        assert_eq!(taps.get(Tap::LogitsDist).unwrap().size(), [2, 10]);
        // Stage k of 4 ends after block floor(6·k/4) (1-based): 1, 3, 4, 6.
        assert_eq!(net.stage_ends(), [0, 2, 3, 5]);
        let last = taps.get(Tap::Tokens(5)).unwrap();
        let patch = last
            .narrow(1, 2, 64)
            .transpose(1, 2)
            .reshape([2, 192, 8, 8]);
        assert!(patch.equal(&taps.feat[4]));
    }

    /// Logits and every parameter's gradient of `sum(logits · probe)`.
    fn logits_and_grads(net: &VisionTransformer, vs: &VarStore, x: &Tensor) -> Vec<Tensor> {
        vs.variables().values().for_each(|v| {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        });
        let logits = net.forward_taps(x, true).logits;
        let probe = Tensor::linspace(-1.0, 1.0, logits.numel() as i64, tch::kind::FLOAT_CPU)
            .view(logits.size().as_slice());
        (&logits * probe).sum(Kind::Float).backward();
        let mut names: Vec<_> = vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        std::iter::once(logits.detach())
            .chain(
                names
                    .into_iter()
                    .map(|(_, v)| v.grad())
                    .map(|g| match g.defined() {
                        true => g.copy(),
                        // The distillation head in training: not in the logits.
                        false => Tensor::zeros([1], tch::kind::FLOAT_CPU),
                    }),
            )
            .collect()
    }

    #[test]
    fn a_logits_only_reader_gets_the_same_logits_and_gradients() {
        for distilled in [false, true] {
            tch::manual_seed(3);
            let vs = VarStore::new(Device::Cpu);
            let mut net = small(distilled).init(&vs.root()).unwrap();
            let x = Tensor::randn([3, 3, 32, 32], tch::kind::FLOAT_CPU);
            let full = logits_and_grads(&net, &vs, &x);
            net.read_taps(Some(&[Tap::Logits, Tap::Feat(3), Tap::Tokens(4)]));
            assert!(net.prefix_tail);
            let taps = net.forward_taps(&x, false);
            assert!(taps.get(Tap::Tokens(5)).is_none() && taps.get(Tap::Feat(4)).is_none());
            assert!(taps.get(Tap::Feat(3)).is_some() && taps.get(Tap::Cls).is_some());
            let pruned = logits_and_grads(&net, &vs, &x);
            for (i, (a, b)) in full.iter().zip(&pruned).enumerate() {
                let diff = (a - b).abs().max().double_value(&[]);
                let scale = b.abs().max().double_value(&[]).max(1e-12);
                assert!(
                    diff / scale < 1e-5,
                    "tensor {i} (0: logits): {diff} of {scale}"
                );
            }
        }
    }

    #[test]
    fn a_reader_of_the_last_tokens_or_of_everything_gets_them_all() {
        let vs = VarStore::new(Device::Cpu);
        let mut net = small(false).init(&vs.root()).unwrap();
        for read in [
            Some(&[Tap::Logits, Tap::Feat(4)][..]),
            Some(&[Tap::Tokens(5)]),
            None,
        ] {
            net.read_taps(read);
            assert!(!net.prefix_tail, "{read:?}");
        }
        let taps = net.forward_taps(&Tensor::randn([1, 3, 32, 32], tch::kind::FLOAT_CPU), false);
        assert_eq!(taps.get(Tap::Tokens(5)).unwrap().size(), [1, 65, 192]);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_fix() {
        let vs = VarStore::new(Device::Cpu);
        let cfg = VitConfig {
            img_size: 30,
            ..small(false)
        };
        let err = cfg.init(&vs.root()).unwrap_err().to_string();
        assert!(
            err.contains("img_size 30 is not divisible by patch_size 4"),
            "{err}"
        );
        let net = small(false).init(&vs.root()).unwrap();
        let err = net
            .check_input(&Tensor::zeros([1, 3, 64, 64], tch::kind::FLOAT_CPU))
            .unwrap_err()
            .to_string();
        assert!(err.contains("img_size=64"), "{err}");
    }
}
