"""ReviewKD as the authors' code, dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py:
`ABF` (conv1x1 + BN to mid channels; for all but the deepest level, the deeper
level's fused map upsampled (nearest) to this level's size, concatenated,
conv1x1 + sigmoid to two attention maps, weighted sum; nearest resize to the
teacher's size; conv3x3 + BN to the teacher's channels), `ReviewKD.forward`
(levels from the deepest up, `abfs` reversed so `abfs.0` is the deepest,
mid_channel = min(512, in_channels[-1])) and `hcl`. Student levels are
`feat[1:]` with the pooled vector last as a 1x1 map; the teacher's are
`preact[1:]` and its pooled vector (train.py: `teacher(images, is_feat=True,
preact=True)[0][1:]`). The ABFs run in training mode (batch statistics,
running statistics updated)."""
import torch
import torch.nn.functional as F
from torch import nn

from gen import fixture, resnet_taps


class ABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


class Review(nn.Module):
    """The ABFs of the authors' `ReviewKD` wrapper, without the student."""

    def __init__(self, in_channels, out_channels, shapes, out_shapes, max_mid=512):
        super().__init__()
        self.shapes, self.out_shapes = shapes, out_shapes
        mid_channel = min(max_mid, in_channels[-1])
        abfs = nn.ModuleList(ABF(c, mid_channel, out_channels[i], i < len(in_channels) - 1)
                             for i, c in enumerate(in_channels))
        self.abfs = abfs[::-1]
        # Non-trivial BatchNorm affine and running statistics, so every one is exercised.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, feats):
        x = feats[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results


def hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def as_map(t):
    return t.unsqueeze(-1).unsqueeze(-1) if t.dim() == 2 else t


def case(name, params, s, t, s_taps, t_taps, max_mid=512):
    in_channels = [s[k].shape[1] for k in s_taps]
    out_channels = [t[k].shape[1] for k in t_taps]
    # The authors' lists run deepest first.
    shapes = [as_map(s[k]).shape[-1] for k in s_taps][::-1]
    out_shapes = [as_map(t[k]).shape[-1] for k in t_taps][::-1]
    mod = Review(in_channels, out_channels, shapes, out_shapes, max_mid)

    def loss(s, t, y, idx, cidx, mod):
        results = mod([as_map(s[k]) for k in s_taps])
        return hcl(results, [as_map(t[k]) for k in t_taps])

    fixture(name, "reviewkd", params, {k: s[k] for k in s_taps}, {k: t[k] for k in t_taps},
            t["logits"].argmax(1), module=mod, loss_fn=loss)


def make():
    # Defaults: student feat/1..3 + embed, teacher preact/1..3 + embed (resnet8x4-like widths).
    s = resnet_taps(8, 61, channels=(16, 16, 32, 64))
    t = resnet_taps(8, 62, channels=(16, 32, 64, 128))
    case("reviewkd", {}, s, t, ["feat/1", "feat/2", "feat/3", "embed"], ["preact/1", "preact/2", "preact/3", "embed"])

    # Student maps half the teacher's size (as ShuffleNet students: the authors'
    # out_shapes), pre-activation student taps (mdistiller's STU_PREACT), a
    # narrower fusion width (mdistiller's MAX_MID_CHANNEL).
    s = resnet_taps(8, 63, channels=(16, 24, 48, 96), spatial=(16, 8, 4, 2))
    t = resnet_taps(8, 64, channels=(16, 32, 64, 64))
    s_taps = ["preact/1", "preact/2", "preact/3", "embed"]
    t_taps = ["preact/1", "preact/2", "preact/3", "embed"]
    case("reviewkd_resize", {"student_taps": s_taps, "teacher_taps": t_taps, "max_mid_channel": 32},
         s, t, s_taps, t_taps, max_mid=32)

    # Two map levels only, no vector level: every level pools (8 px: 4, 2, 1; 4 px: 2, 1).
    s = resnet_taps(8, 65, channels=(16, 16, 32, 64), spatial=(16, 16, 8, 4))
    t = resnet_taps(8, 66, channels=(16, 32, 48, 64), spatial=(16, 16, 8, 4))
    s_taps, t_taps = ["feat/2", "feat/3"], ["preact/2", "preact/3"]
    case("reviewkd_maps", {"student_taps": s_taps, "teacher_taps": t_taps}, s, t, s_taps, t_taps)
