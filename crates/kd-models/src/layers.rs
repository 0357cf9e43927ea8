//! Layer constructors carrying the initialisation RepDistiller gives each
//! layer, so a freshly built network starts from the same distribution as its
//! PyTorch twin (tch's own defaults differ: BN weight U(0,1), linear weight
//! bound sqrt(6/fan_in)).

use std::cell::RefCell;
use std::rc::Rc;

use tch::Tensor;
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init};

use crate::ModelError;

/// He normal over fan-out. RepDistiller writes it two ways (`kaiming_normal_(
/// mode='fan_out')` in resnet.py, `normal_(0, sqrt(2/(k*k*out)))` in wrn.py and
/// vgg.py); both are this distribution.
const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// `nn.Conv2d`'s own initialisation, which RepDistiller's ShuffleNets keep:
/// kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
/// fan_in = (in / groups) * k * k, read from the weight's shape.
fn torch_conv_init() -> Init {
    Init::Kaiming {
        dist: NormalOrUniform::Uniform,
        fan: FanInOut::FanIn,
        non_linearity: NonLinearity::ExplicitGain(1.0 / 3f64.sqrt()),
    }
}

/// How a family initialises its convolutions.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConvInit {
    /// He normal over fan-out (ResNet, WRN, VGG, MobileNetV2, ResNet50).
    HeFanOut,
    /// PyTorch's default (ShuffleNet V1 and V2).
    Torch,
}

/// A square convolution with "same" padding for odd kernels.
pub(crate) fn conv(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    kernel: i64,
    stride: i64,
    bias: bool,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        bias,
        ws_init: CONV_INIT,
        bs_init: Init::Const(0.),
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, cfg)
}

/// A bias-free square convolution in `groups` groups (`groups == c_in ==
/// c_out` is depthwise), "same" padding for odd kernels.
pub(crate) fn conv_grouped(
    p: nn::Path,
    (c_in, c_out): (i64, i64),
    kernel: i64,
    stride: i64,
    groups: i64,
    init: ConvInit,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        groups,
        bias: false,
        ws_init: match init {
            ConvInit::HeFanOut => CONV_INIT,
            ConvInit::Torch => torch_conv_init(),
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, cfg)
}

/// PyTorch's BatchNorm2d epsilon, which every zoo network uses.
const BN_EPS: f64 = 1e-5;
/// PyTorch's BatchNorm2d momentum, which every zoo network uses.
const BN_MOMENTUM: f64 = 0.1;

/// BatchNorm2d as PyTorch builds it: weight 1, bias 0, momentum 0.1, eps 1e-5.
pub(crate) fn bn(p: nn::Path, c: i64) -> Bn {
    let cfg = nn::BatchNormConfig {
        ws_init: Init::Const(1.),
        bs_init: Init::Const(0.),
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        ..Default::default()
    };
    Bn(nn::batch_norm2d(p, c, cfg))
}

/// One training-mode BatchNorm forward as a [`TrainBatchNorm`] hook sees it.
pub use kd_aten::BatchNormArgs;

/// A replacement for the batch's own statistics in the zoo's training
/// BatchNorm forwards: the engine's SyncBatchNorm, which the zoo cannot
/// depend on. It returns the layer's output and updates the running
/// statistics in place, as `batch_norm` in training mode does.
pub type TrainBatchNorm =
    dyn Fn(&BatchNormArgs) -> Result<Tensor, Box<dyn std::error::Error + Send + Sync>>;

/// The hook of the forward in progress on this thread, and its first error.
struct Hooked {
    hook: Rc<TrainBatchNorm>,
    failed: Option<Box<dyn std::error::Error + Send + Sync>>,
}

thread_local! {
    static HOOK: RefCell<Option<Hooked>> = const { RefCell::new(None) };
}

/// Runs `f` (forwards of zoo networks) with every training-mode BatchNorm
/// of the zoo going through `hook`. The hook is this thread's and lasts for
/// `f` only: several runs of one process (lockstep groups, parallel tests)
/// may train with different BatchNorm modes, and a process-wide switch
/// would leak from one into the others.
///
/// A forward cannot return an error, so a failing hook (a collective that
/// timed out) is recorded, the rest of `f` runs on plain batch statistics
/// (no further collective to wait for), and the first error is returned
/// here instead of `f`'s value.
pub fn with_train_batch_norm<T>(
    hook: Rc<TrainBatchNorm>,
    f: impl FnOnce() -> T,
) -> Result<T, ModelError> {
    /// Puts back the enclosing hook, also when `f` panics.
    struct Restore(Option<Hooked>);
    impl Drop for Restore {
        fn drop(&mut self) {
            HOOK.with(|h| *h.borrow_mut() = self.0.take());
        }
    }
    let outer = HOOK.with(|h| h.replace(Some(Hooked { hook, failed: None })));
    let restore = Restore(outer);
    let out = f();
    let failed = HOOK.with(|h| h.borrow_mut().as_mut().and_then(|k| k.failed.take()));
    drop(restore);
    match failed {
        None => Ok(out),
        Some(e) => Err(ModelError::TrainBatchNorm(e)),
    }
}

/// The zoo's BatchNorm2d: tch's layer, whose training forwards go through
/// this thread's [`TrainBatchNorm`] hook while one is installed.
#[derive(Debug)]
pub(crate) struct Bn(nn::BatchNorm);

impl std::ops::Deref for Bn {
    type Target = nn::BatchNorm;
    fn deref(&self) -> &nn::BatchNorm {
        &self.0
    }
}

impl nn::ModuleT for Bn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train && let Some(y) = self.hooked(xs) {
            return y;
        }
        self.0.forward_t(xs, train)
    }
}

impl Bn {
    /// The hook's output, when a hook is installed and has not failed.
    fn hooked(&self, xs: &Tensor) -> Option<Tensor> {
        // The hook is called outside the borrow: it may run a forward of
        // its own.
        let hook = HOOK.with(|h| {
            h.borrow()
                .as_ref()
                .filter(|k| k.failed.is_none())
                .map(|k| k.hook.clone())
        })?;
        let args = BatchNormArgs {
            input: xs,
            weight: self.0.ws.as_ref(),
            bias: self.0.bs.as_ref(),
            running_mean: &self.0.running_mean,
            running_var: &self.0.running_var,
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
        };
        match hook(&args) {
            Ok(y) => Some(y),
            Err(e) => {
                HOOK.with(|h| {
                    if let Some(k) = h.borrow_mut().as_mut() {
                        k.failed.get_or_insert(e);
                    }
                });
                None
            }
        }
    }
}

/// A convolution and the BatchNorm that reads its output. In eval mode
/// with frozen weights the pair can run as one convolution whose kernel and
/// bias absorb the normalisation (`fold`): `w' = w·γ/√(σ²+ε)`,
/// `b' = β + (b − μ)·γ/√(σ²+ε)`. The parameters stay as they are.
#[derive(Debug)]
pub(crate) struct ConvBn {
    pub conv: nn::Conv2D,
    pub bn: Bn,
    stride: i64,
    padding: i64,
    groups: i64,
    /// Folded kernel and bias while frozen.
    folded: Option<(Tensor, Tensor)>,
}

impl ConvBn {
    /// `conv(x)` then `bn`, with the geometry `conv` was built with.
    pub fn new(conv: nn::Conv2D, bn: Bn, stride: i64, groups: i64) -> ConvBn {
        let padding = conv.ws.size()[2] / 2;
        ConvBn {
            conv,
            bn,
            stride,
            padding,
            groups,
            folded: None,
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        use tch::nn::{Module, ModuleT};
        match (&self.folded, train) {
            (Some((w, b)), false) => x.conv2d(
                w,
                Some(b),
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                self.groups,
            ),
            _ => self.bn.forward_t(&self.conv.forward(x), train),
        }
    }

    /// Folds the BatchNorm into the kernel (`true`), or drops the folded
    /// copy (`false`) so that training sees the parameters again. The folded
    /// kernel keeps the memory order of the convolution's own.
    pub fn fold(&mut self, on: bool) {
        self.folded = on.then(|| {
            tch::no_grad(|| {
                let bn = &self.bn;
                let gamma = bn.ws.as_ref().expect("BatchNorm is affine");
                let beta = bn.bs.as_ref().expect("BatchNorm is affine");
                let scale = gamma / (&bn.running_var + BN_EPS).sqrt();
                let w = &self.conv.ws * scale.view([-1, 1, 1, 1]);
                let shift = match &self.conv.bs {
                    Some(b) => b - &bn.running_mean,
                    None => -&bn.running_mean,
                };
                (w, beta + shift * scale)
            })
        });
    }
}

/// How a family initialises its classifier.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LinearInit {
    /// `nn.Linear`'s own: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
    Torch,
    /// WRN: default weight, bias zeroed.
    ZeroBias,
    /// VGG: weight N(0, std), bias zeroed.
    Normal(f64),
}

pub(crate) fn linear(p: nn::Path, c_in: i64, c_out: i64, init: LinearInit) -> nn::Linear {
    let bound = 1.0 / (c_in as f64).sqrt();
    let torch_uniform = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let (ws_init, bs_init) = match init {
        LinearInit::Torch => (torch_uniform, torch_uniform),
        LinearInit::ZeroBias => (torch_uniform, Init::Const(0.)),
        LinearInit::Normal(stdev) => (Init::Randn { mean: 0., stdev }, Init::Const(0.)),
    };
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init,
            bs_init: Some(bs_init),
            bias: true,
        },
    )
}

/// Global average pooling to the `[N, C]` vector the classifier reads.
///
/// RepDistiller pools with a fixed 8x8 window (ResNet, WRN), which equals the
/// global mean for 32x32 inputs and breaks for any other size; the global
/// mean keeps the CIFAR result and also serves other input sizes.
pub(crate) fn global_pool(x: &Tensor) -> Tensor {
    x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
}

/// ShuffleNet's channel shuffle: `[N, C, H, W]` viewed as `[N, g, C/g, H, W]`,
/// the two channel axes swapped, flattened back (channel `i*C/g + j` moves to
/// `j*g + i`). The identity for one group.
pub(crate) fn channel_shuffle(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    x.reshape([n, groups, c / groups, h, w])
        .permute([0, 2, 1, 3, 4])
        .reshape([n, c, h, w])
}

/// A residual block whose output before its closing ReLU is a tap.
pub(crate) trait PreactBlock {
    /// The block's output before its closing ReLU.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;
    /// See [`ConvBn::fold`].
    fn fold(&mut self, on: bool);
}

/// Blocks of one stage; the last is kept apart because its preactivation
/// is a tap.
#[derive(Debug)]
pub(crate) struct Stage<B> {
    pub body: Vec<B>,
    pub last: B,
}

impl<B: PreactBlock> Stage<B> {
    pub fn fold(&mut self, on: bool) {
        self.body.iter_mut().for_each(|b| b.fold(on));
        self.last.fold(on);
    }

    /// (output after ReLU, output before it).
    pub fn forward(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut x = x.shallow_clone();
        for block in &self.body {
            let mut pre = block.forward(&x, train);
            x = pre.relu_();
        }
        let pre = self.last.forward(&x, train);
        (pre.relu(), pre)
    }
}

/// The taps of a stem followed by stages: `preact/0` is the stem's output
/// (before its ReLU), `feat/k`/`preact/k` each stage's output after and
/// before its closing ReLU, `embed` the global mean of the last map and
/// `logits` the head applied to it.
pub(crate) fn staged_taps<B: PreactBlock>(
    stem: Tensor,
    stages: &[Stage<B>],
    head: &nn::Linear,
    train: bool,
) -> kd_core::Taps {
    use tch::nn::Module;
    let mut feat = vec![stem.relu()];
    let mut preact = vec![stem];
    for stage in stages {
        let (f, p) = stage.forward(&feat[feat.len() - 1], train);
        feat.push(f);
        preact.push(p);
    }
    let embed = global_pool(&feat[feat.len() - 1]);
    let logits = head.forward(&embed);
    kd_core::Taps {
        feat,
        preact,
        embed,
        logits,
        extra: Vec::new(),
    }
}

/// `nn.Linear` as timm's transformers initialise it: weight normal(0.02),
/// bias 0.
pub(crate) fn timm_linear(p: nn::Path, c_in: i64, c_out: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init: Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(Init::Const(0.0)),
            bias,
        },
    )
}

/// An `nn.Linear`'s forward through [`kd_aten::linear`]: oneDNN's fp32
/// matmul on the CPU (faster than ATen's MKL sgemm on a transformer's
/// shapes), ATen's `linear` elsewhere.
pub(crate) fn dense(l: &nn::Linear, x: &Tensor) -> Tensor {
    kd_aten::linear(x, &l.ws, l.bs.as_ref())
}
