//! Swin Transformer under timm's name and `state_dict` keys
//! (`timm/models/swin_transformer.py`, timm 1.x layout), so timm's weight
//! files load as they are: `swin_tiny_patch4_window7_224` (Swin-T: 96 wide,
//! stages of 2, 2, 6, 2 blocks with 3, 6, 12, 24 heads, 7x7 windows),
//! `swin_small_patch4_window7_224` (2, 2, 18, 2 blocks) and
//! `swin_base_patch4_window7_224` (those at 128 wide, 4, 8, 16, 32 heads).
//!
//! Keys: `patch_embed.{proj,norm}`, `layers.{i}.downsample.{norm,reduction}`
//! (timm 1.x merges patches at the *start* of stages 1..3, stage 0 has no
//! `downsample`), `layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,
//! attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`, `norm`,
//! `head.fc`. The relative position index and the shift mask are
//! constants computed here, not variables: timm registers both as
//! non-persistent buffers, so its `state_dict` lacks them too.
//!
//! Initialisation as timm's default: linear weights normal(0.02) (timm
//! truncates at ±2, i.e. ±100σ), biases zero, the relative position bias
//! tables normal(0.02), LayerNorm weight 1 bias 0 (eps 1e-5, torch's
//! default, unlike the ViTs' 1e-6), the patch projection as `nn.Conv2d`
//! makes it. `drop_path_rate` defaults to timm's 0.1 for Swin.
//!
//! Shapes follow timm: after the patch embedding every tensor is NHWC
//! (`[B, H, W, C]`), each stage halves the resolution (rounding up: odd
//! sizes are padded before merging) and doubles the width. A block whose
//! resolution is at most the window size attends over the whole map
//! (window = resolution, no shift), as timm builds it; otherwise the map
//! is padded to a multiple of the window, and every second block shifts
//! its windows by half a window.
//!
//! Taps: `feat/0` the patch embedding (after its norm), `feat/k` the output
//! of stage `k` (k = 1..=4), both as `[B, C, H, W]` maps; `preact/k` equals
//! `feat/k` (no activation closes a stage); `tokens/i` the output of block
//! `i` counted over all stages, as `[B, H·W, C]`; `embed` the average of
//! the final-normed last stage (timm's `pre_logits`); `logits` `head.fc`'s.

use kd_core::{Tap, Taps};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::droppath::{Draws, drop_path, linear_rates};
use crate::layers::{dense, timm_linear};
use crate::{ModelError, Network, check_classes, check_drop_path_rate, check_patch_grid};

/// timm's `SwinTransformer` arguments that kd's zoo varies.
#[derive(Debug, Clone, PartialEq)]
pub struct SwinConfig {
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub num_classes: i64,
    /// Width of stage 0; stage `i` is `embed_dim · 2^i` wide.
    pub embed_dim: i64,
    pub depths: Vec<i64>,
    pub num_heads: Vec<i64>,
    /// The largest window, in tokens per side (a stage smaller than it
    /// attends over its whole map).
    pub window_size: i64,
    pub mlp_ratio: f64,
    /// Stochastic depth, rising linearly from 0 at the first block to this
    /// at the last, over all stages (timm's `drop_path_rate`).
    pub drop_path_rate: f64,
}

const FAMILY: &str = "Swin";

impl SwinConfig {
    /// Swin-T at 224 pixels: patch 4, window 7, 96 wide, 2-2-6-2 blocks.
    pub fn tiny() -> Self {
        SwinConfig {
            img_size: 224,
            patch_size: 4,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4.0,
            drop_path_rate: 0.1,
        }
    }

    /// Swin-S: Swin-T with 18 blocks in its third stage.
    pub fn small() -> Self {
        SwinConfig {
            depths: vec![2, 2, 18, 2],
            ..SwinConfig::tiny()
        }
    }

    /// Swin-B: Swin-S at 128 wide, 4-8-16-32 heads.
    pub fn base() -> Self {
        SwinConfig {
            embed_dim: 128,
            num_heads: vec![4, 8, 16, 32],
            ..SwinConfig::small()
        }
    }

    pub fn with_num_classes(mut self, n: i64) -> Self {
        self.num_classes = n;
        self
    }

    fn dim(&self, stage: usize) -> i64 {
        self.embed_dim << stage
    }

    /// Token grid side of each stage: the patch grid, then halved
    /// (rounding up, as timm pads odd maps before merging).
    fn resolutions(&self) -> Vec<i64> {
        let mut res = self.img_size / self.patch_size;
        (0..self.depths.len())
            .map(|i| {
                if i > 0 {
                    res = (res + 1) / 2;
                }
                res
            })
            .collect()
    }

    pub(crate) fn check(&self) -> Result<(), ModelError> {
        check_classes(FAMILY, self.num_classes)?;
        let bad = |reason: String| {
            Err(ModelError::InvalidConfig {
                family: FAMILY,
                reason,
            })
        };
        check_patch_grid(self.img_size, self.patch_size).or_else(bad)?;
        if self.window_size < 1 {
            return bad(format!(
                "window_size must be at least 1, got {}",
                self.window_size
            ));
        }
        if self.depths.is_empty()
            || self.depths.len() != self.num_heads.len()
            || self.depths.iter().any(|&d| d < 1)
        {
            return bad(format!(
                "depths {:?} and num_heads {:?} must name the same stages, each at least 1 block",
                self.depths, self.num_heads
            ));
        }
        for (i, &heads) in self.num_heads.iter().enumerate() {
            let dim = self.dim(i);
            if heads < 1 || dim < 1 || dim % heads != 0 {
                return bad(format!(
                    "embed_dim {} gives stage {i} {dim} channels, which its {heads} heads do not split evenly",
                    self.embed_dim
                ));
            }
        }
        if self.mlp_ratio <= 0.0 {
            return bad(format!(
                "mlp_ratio must be positive, got {}",
                self.mlp_ratio
            ));
        }
        check_drop_path_rate(self.drop_path_rate).or_else(bad)?;
        Ok(())
    }

    pub fn init(self, p: &nn::Path) -> Result<SwinTransformer, ModelError> {
        self.check()?;
        let total: i64 = self.depths.iter().sum();
        let mut rates = linear_rates(self.drop_path_rate, total).into_iter();
        let resolutions = self.resolutions();
        let stages = (0..self.depths.len())
            .map(|i| {
                let rates: Vec<f64> = rates.by_ref().take(self.depths[i] as usize).collect();
                Stage::new(&(p / "layers" / i as i64), &self, i, resolutions[i], &rates)
            })
            .collect();
        let last = self.dim(self.depths.len() - 1);
        Ok(SwinTransformer {
            patch_embed: PatchEmbed::new(&(p / "patch_embed"), &self),
            stages,
            norm: layer_norm(p / "norm", last),
            head: timm_linear(p / "head" / "fc", last, self.num_classes, true),
            img_size: self.img_size,
            patch_size: self.patch_size,
            window_size: self.window_size,
        })
    }
}

/// torch's `nn.LayerNorm(d)` (eps 1e-5), which timm's Swin uses throughout.
fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], Default::default())
}

/// `[B, H, W, C]` → `[B, C, H, W]`, the maps feature methods read.
fn nchw(x: &Tensor) -> Tensor {
    x.permute([0, 3, 1, 2])
}

/// Non-overlapping `p`x`p` patches projected by a strided convolution,
/// then LayerNorm over channels (timm's `PatchEmbed(norm_layer=LayerNorm,
/// output_fmt='NHWC')`).
#[derive(Debug)]
struct PatchEmbed {
    proj: nn::Conv2D,
    norm: nn::LayerNorm,
}

impl PatchEmbed {
    fn new(p: &nn::Path, cfg: &SwinConfig) -> PatchEmbed {
        let proj = nn::conv2d(
            p / "proj",
            cfg.in_chans,
            cfg.embed_dim,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        PatchEmbed {
            proj,
            norm: layer_norm(p / "norm", cfg.embed_dim),
        }
    }

    /// `[B, 3, H, W]` → `[B, H/p, W/p, C]`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.norm
            .forward(&self.proj.forward(xs).permute([0, 2, 3, 1]))
    }
}

/// `x` (`[B, Hp, Wp, C]`, sides multiples of `ws`) as windows of `ws`x`ws`
/// tokens, `[B·nW, ws·ws, C]`, windows of an image contiguous and in row
/// order (timm's `window_partition`).
fn window_partition(x: &Tensor, ws: i64) -> Tensor {
    let (b, h, w, c) = x.size4().expect("NHWC");
    x.reshape([b, h / ws, ws, w / ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([-1, ws * ws, c])
}

/// The inverse of [`window_partition`]: `[B·nW, ws·ws, C]` → `[B, h, w, C]`.
fn window_reverse(windows: &Tensor, ws: i64, h: i64, w: i64) -> Tensor {
    let c = windows.size()[2];
    windows
        .view([-1, h / ws, w / ws, ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([-1, h, w, c])
}

/// Index into the relative position bias table of every pair of tokens
/// (query `a`, key `b`) of a `ws`x`ws` window, flattened to `[ws²·ws²]`:
/// `(dy + ws - 1) · (2ws - 1) + (dx + ws - 1)` with `d = a - b` (timm's
/// `get_relative_position_index`).
fn relative_position_index(ws: i64) -> Vec<i64> {
    let n = ws * ws;
    let mut index = Vec::with_capacity((n * n) as usize);
    for a in 0..n {
        for b in 0..n {
            let dy = a / ws - b / ws + ws - 1;
            let dx = a % ws - b % ws + ws - 1;
            index.push(dy * (2 * ws - 1) + dx);
        }
    }
    index
}

/// The additive mask of shifted windows, `[nW, N, N]` over a padded
/// `side`x`side` map (timm's `get_attn_mask`): after rolling by `-shift`, a
/// window on the bottom or right edge holds tokens that were far apart
/// before the roll; tokens may only attend within the region they came
/// from (-100 elsewhere, which softmax turns into ~0, as timm).
fn shift_mask(side: i64, ws: i64, shift: i64) -> Vec<f32> {
    // Region of a coordinate along one axis: before the last window, in
    // the last window but not rolled around, rolled around from the start.
    let region = |i: i64| {
        if i < side - ws {
            0
        } else if i < side - shift {
            1
        } else {
            2
        }
    };
    let per_side = side / ws;
    let n = ws * ws;
    let mut mask = Vec::with_capacity((per_side * per_side * n * n) as usize);
    for wy in 0..per_side {
        for wx in 0..per_side {
            let label = |t: i64| 3 * region(wy * ws + t / ws) + region(wx * ws + t % ws);
            for a in 0..n {
                for b in 0..n {
                    mask.push(if label(a) == label(b) { 0.0 } else { -100.0 });
                }
            }
        }
    }
    mask
}

/// Multi-head self-attention within each window, with a learnt bias per
/// head for every relative offset of two tokens (timm's `WindowAttention`).
#[derive(Debug)]
struct WindowAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    /// `[(2ws-1)², heads]`, a variable.
    relative_position_bias_table: Tensor,
    /// `[N·N]` indices into the table (a constant, not in timm's state_dict).
    relative_position_index: Tensor,
    heads: i64,
    ws: i64,
}

impl WindowAttention {
    fn new(p: &nn::Path, dim: i64, heads: i64, ws: i64) -> WindowAttention {
        let table = p.var(
            "relative_position_bias_table",
            &[(2 * ws - 1) * (2 * ws - 1), heads],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        WindowAttention {
            qkv: timm_linear(p / "qkv", dim, 3 * dim, true),
            proj: timm_linear(p / "proj", dim, dim, true),
            relative_position_bias_table: table,
            relative_position_index: Tensor::from_slice(&relative_position_index(ws))
                .to_device(p.device()),
            heads,
            ws,
        }
    }

    /// `[heads, N, N]`: the bias each head adds to its attention logits.
    fn relative_position_bias(&self) -> Tensor {
        let n = self.ws * self.ws;
        self.relative_position_bias_table
            .index_select(0, &self.relative_position_index)
            .view([n, n, self.heads])
            .permute([2, 0, 1])
    }

    /// `windows` `[B·nW, N, C]` of `b` images; `mask` `[nW, N, N]` for
    /// shifted windows.
    fn forward(&self, windows: &Tensor, b: i64, mask: Option<&Tensor>) -> Tensor {
        let (bw, n, c) = windows.size3().expect("windows are [B·nW, N, C]");
        let (heads, nw) = (self.heads, bw / b);
        let bias = self.relative_position_bias().unsqueeze(0); // [1, heads, N, N]
        let bias = match mask {
            Some(mask) => bias + mask.unsqueeze(1), // [nW, heads, N, N]
            None => bias,
        };
        // Windows ride in the heads dimension, `[B, nW·heads, N, C/heads]`,
        // so the bias and mask, which differ per window but not per image,
        // broadcast over the batch instead of being copied once per image
        // (timm's fused path expands them to `[B·nW, heads, N, N]`).
        let bias = bias
            .expand([nw, heads, n, n], false)
            .reshape([1, nw * heads, n, n]);
        let qkv = dense(&self.qkv, windows)
            .reshape([bw, n, 3, heads, c / heads])
            .permute([2, 0, 3, 1, 4])
            .reshape([3, b, nw * heads, n, c / heads]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // ATen's fused attention, as the ViTs; the mask must share q's
        // kind (bf16/fp16 under autocast).
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias.to_kind(q.kind())),
            0.0,
            false,
            None,
            false,
        );
        let y = y
            .reshape([bw, heads, n, c / heads])
            .transpose(1, 2)
            .reshape([bw, n, c]);
        dense(&self.proj, &y)
    }
}

/// Pre-norm block: `x + attn(norm1(x))` over (shifted) windows, then
/// `x + mlp(norm2(x))`, each branch dropped per sample with probability
/// `drop_path` in training (timm's `SwinTransformerBlock`).
#[derive(Debug)]
struct SwinBlock {
    norm1: nn::LayerNorm,
    attn: WindowAttention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    /// Window side actually used: the stage's resolution if smaller than
    /// the configured window.
    ws: i64,
    /// 0, or half a window for every second block of a stage that has
    /// more than one window per side.
    shift: i64,
    /// `[nW, N, N]` when shifted (a constant, not in timm's state_dict).
    mask: Option<Tensor>,
    drop_path: f64,
}

impl SwinBlock {
    fn new(
        p: &nn::Path,
        dim: i64,
        heads: i64,
        res: i64,
        cfg: &SwinConfig,
        shifted: bool,
        drop_path: f64,
    ) -> SwinBlock {
        let ws = res.min(cfg.window_size);
        let shift = if shifted && res > ws { ws / 2 } else { 0 };
        let padded = (res + ws - 1) / ws * ws;
        let mask = (shift > 0).then(|| {
            let n = ws * ws;
            Tensor::from_slice(&shift_mask(padded, ws, shift))
                .view([-1, n, n])
                .to_device(p.device())
        });
        let hidden = (dim as f64 * cfg.mlp_ratio) as i64;
        SwinBlock {
            norm1: layer_norm(p / "norm1", dim),
            attn: WindowAttention::new(&(p / "attn"), dim, heads, ws),
            norm2: layer_norm(p / "norm2", dim),
            fc1: timm_linear(p / "mlp" / "fc1", dim, hidden, true),
            fc2: timm_linear(p / "mlp" / "fc2", hidden, dim, true),
            ws,
            shift,
            mask,
            drop_path,
        }
    }

    /// Window attention over `x` (`[B, H, W, C]`, normed): roll by
    /// `-shift`, pad to whole windows, attend per window, undo all three.
    fn window_attention(&self, x: &Tensor) -> Tensor {
        let (b, h, w, _) = x.size4().expect("NHWC");
        let (ws, s) = (self.ws, self.shift);
        let x = if s > 0 {
            x.roll([-s, -s], [1, 2])
        } else {
            x.shallow_clone()
        };
        // timm pads after rolling, with zeros that the windows attend to
        // (unmasked) in blocks without shift.
        let (pad_h, pad_w) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        let x = if pad_h + pad_w > 0 {
            x.constant_pad_nd([0, 0, 0, pad_w, 0, pad_h])
        } else {
            x
        };
        let (hp, wp) = (h + pad_h, w + pad_w);
        let y = self
            .attn
            .forward(&window_partition(&x, ws), b, self.mask.as_ref());
        let y = window_reverse(&y, ws, hp, wp)
            .narrow(1, 0, h)
            .narrow(2, 0, w);
        if s > 0 { y.roll([s, s], [1, 2]) } else { y }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.window_attention(&self.norm1.forward(x));
        let x = x + drop_path(&a, self.drop_path, train, Draws::Torch);
        let m = dense(
            &self.fc2,
            &dense(&self.fc1, &self.norm2.forward(&x)).gelu("none"),
        );
        &x + drop_path(&m, self.drop_path, train, Draws::Torch)
    }
}

/// 2x2 neighbouring tokens concatenated (`[B, H/2, W/2, 4C]`, odd sides
/// padded with zeros), normed and projected to `2C` without bias (timm's
/// `PatchMerging`).
#[derive(Debug)]
struct PatchMerging {
    norm: nn::LayerNorm,
    reduction: nn::Linear,
}

impl PatchMerging {
    fn new(p: &nn::Path, dim: i64) -> PatchMerging {
        PatchMerging {
            norm: layer_norm(p / "norm", 4 * dim),
            reduction: timm_linear(p / "reduction", 4 * dim, 2 * dim, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, h, w, c) = x.size4().expect("NHWC");
        let x = if h % 2 + w % 2 > 0 {
            x.constant_pad_nd([0, 0, 0, w % 2, 0, h % 2])
        } else {
            x.shallow_clone()
        };
        let (h, w) = ((h + 1) / 2, (w + 1) / 2);
        // [B, H/2, dy, W/2, dx, C] → [B, H/2, W/2, dx, dy, C]: the four
        // neighbours in timm's order, (0,0), (1,0), (0,1), (1,1) as (dy,dx).
        let x = x
            .reshape([b, h, 2, w, 2, c])
            .permute([0, 1, 3, 4, 2, 5])
            .reshape([b, h, w, 4 * c]);
        dense(&self.reduction, &self.norm.forward(&x))
    }
}

/// One stage: patch merging (stages 1.. in timm 1.x), then blocks
/// alternating plain and shifted windows (timm's `SwinTransformerStage`).
#[derive(Debug)]
struct Stage {
    downsample: Option<PatchMerging>,
    blocks: Vec<SwinBlock>,
}

impl Stage {
    fn new(p: &nn::Path, cfg: &SwinConfig, i: usize, res: i64, rates: &[f64]) -> Stage {
        let dim = cfg.dim(i);
        let downsample = (i > 0).then(|| PatchMerging::new(&(p / "downsample"), cfg.dim(i - 1)));
        let blocks = rates
            .iter()
            .enumerate()
            .map(|(j, &rate)| {
                let q = p / "blocks" / j as i64;
                SwinBlock::new(&q, dim, cfg.num_heads[i], res, cfg, j % 2 == 1, rate)
            })
            .collect();
        Stage { downsample, blocks }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct SwinTransformer {
    patch_embed: PatchEmbed,
    stages: Vec<Stage>,
    norm: nn::LayerNorm,
    head: nn::Linear,
    img_size: i64,
    patch_size: i64,
    window_size: i64,
}

impl Network for SwinTransformer {
    fn forward_taps(&self, xs: &Tensor, train: bool) -> Taps {
        let mut x = self.patch_embed.forward(xs);
        let mut feat = vec![nchw(&x)];
        let mut extra = Vec::new();
        for stage in &self.stages {
            if let Some(merge) = &stage.downsample {
                x = merge.forward(&x);
            }
            for block in &stage.blocks {
                x = block.forward(&x, train);
                let i = extra.len();
                extra.push((Tap::Tokens(i), x.flatten(1, 2)));
            }
            feat.push(nchw(&x));
        }
        // Final norm on the NHWC map, then the average over positions.
        let embed = self
            .norm
            .forward(&x)
            .mean_dim([1i64, 2].as_slice(), false, None::<Kind>);
        let logits = dense(&self.head, &embed);
        Taps {
            preact: feat.iter().map(Tensor::shallow_clone).collect(),
            feat,
            embed,
            logits,
            extra,
        }
    }

    /// The relative position biases and shift masks are built for one
    /// resolution per stage: say which argument fits the data instead of
    /// failing inside the forward (timm asserts the same).
    fn check_input(&self, probe: &Tensor) -> Result<(), ModelError> {
        let (img_size, patch, window) = (self.img_size, self.patch_size, self.window_size);
        let size = probe.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        if h != img_size || w != img_size {
            return Err(ModelError::InvalidConfig {
                family: FAMILY,
                reason: format!(
                    "built for {img_size}x{img_size} images (patch {patch}, window {window}) but the data is \
                     {h}x{w}; give the model img_size={h}, e.g. \
                     swin_tiny_patch4_window7_224(img_size={h},window_size=4)"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, nn::VarStore};

    use super::*;

    fn cifar() -> SwinConfig {
        SwinConfig {
            img_size: 32,
            patch_size: 2,
            window_size: 4,
            ..SwinConfig::tiny()
        }
        .with_num_classes(10)
    }

    #[test]
    fn taps_have_the_documented_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let net = cifar().init(&vs.root()).unwrap();
        let taps = net.forward_taps(&Tensor::randn([2, 3, 32, 32], tch::kind::FLOAT_CPU), false);
        let shapes: Vec<Vec<i64>> = taps.feat.iter().map(Tensor::size).collect();
        assert_eq!(
            shapes,
            [
                [2, 96, 16, 16],
                [2, 96, 16, 16],
                [2, 192, 8, 8],
                [2, 384, 4, 4],
                [2, 768, 2, 2]
            ]
        );
        assert_eq!(taps.embed.size(), [2, 768]);
        assert_eq!(taps.logits.size(), [2, 10]);
        assert_eq!(taps.get(Tap::Tokens(11)).unwrap().size(), [2, 4, 768]);
        assert!(taps.get(Tap::Tokens(12)).is_none());
        // Only stages 0 and 1 have more than one 4x4 window per side.
        let shifts: Vec<(i64, i64)> = net
            .stages
            .iter()
            .flat_map(|s| s.blocks.iter().map(|b| (b.ws, b.shift)))
            .collect();
        assert_eq!(&shifts[..4], [(4, 0), (4, 2), (4, 0), (4, 2)]);
        assert!(shifts[4..10].iter().all(|&s| s == (4, 0)));
        assert_eq!(&shifts[10..], [(2, 0), (2, 0)]);
        for key in [
            "layers.0.blocks.1.attn.relative_position_bias_table",
            "layers.1.downsample.reduction.weight",
            "head.fc.bias",
        ] {
            assert!(vs.variables().contains_key(key), "{key}");
        }
        assert!(
            !vs.variables()
                .contains_key("layers.0.downsample.norm.weight")
        );
    }

    #[test]
    fn a_training_step_reaches_the_bias_tables() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let net = cifar().init(&vs.root()).unwrap();
        let x = Tensor::randn([4, 3, 32, 32], tch::kind::FLOAT_CPU);
        // Drop path at timm's default 0.1 is live in training.
        net.forward_taps(&x, true)
            .logits
            .square()
            .sum(Kind::Float)
            .backward();
        let vars = vs.variables();
        for key in [
            "layers.0.blocks.1.attn.relative_position_bias_table",
            "layers.3.blocks.0.attn.relative_position_bias_table",
            "patch_embed.proj.weight",
        ] {
            let g = vars[key].grad();
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{key}"
            );
        }
    }

    #[test]
    fn the_shift_mask_separates_rolled_regions() {
        // 8x8 map, 4x4 windows, shift 2: the top-left window is one
        // region; the bottom-right one holds four.
        let m = Tensor::from_slice(&shift_mask(8, 4, 2)).view([4, 16, 16]);
        assert_eq!(m.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let last = m.get(3);
        // Token (0,0) and (0,1) share a region, (0,0) and (0,2) do not.
        assert_eq!(last.double_value(&[0, 1]), 0.0);
        assert_eq!(last.double_value(&[0, 2]), -100.0);
        assert_eq!(last.double_value(&[0, 8]), -100.0);
        assert_eq!(
            relative_position_index(2),
            [4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
    }

    #[test]
    fn bad_sizes_are_refused_with_the_fix() {
        let vs = VarStore::new(Device::Cpu);
        let err = SwinConfig {
            img_size: 30,
            patch_size: 4,
            ..cifar()
        }
        .init(&vs.root())
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("img_size 30 is not divisible by patch_size 4"),
            "{err}"
        );
        let err = SwinConfig {
            embed_dim: 64,
            ..cifar()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(err.contains("3 heads"), "{err}");
        let net = cifar().init(&vs.root()).unwrap();
        let err = net
            .check_input(&Tensor::zeros([1, 3, 224, 224], tch::kind::FLOAT_CPU))
            .unwrap_err()
            .to_string();
        assert!(err.contains("img_size=224"), "{err}");
    }
}
