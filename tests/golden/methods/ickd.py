"""ICKD (Liu et al., ICCV 2021), as torchdistill's ChSimLoss on its
Student4ICKD embedding (torchdistill/losses/mid_level.py,
models/wrapper.py ChannelSimilarityEmbed): the student map through
Conv2d(C_s, C_t, 3, padding=1, bias=False) and BatchNorm2d(C_t) in training
mode; per side G = f f^T over positions, rows F.normalize'd; loss =
sum((G_s - G_t)^2) / (C * B * B). State names: embed.conv2d, embed.l2norm."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gen import fixture, resnet_taps


class Embed(nn.Module):
    def __init__(self, c_s, c_t):
        super().__init__()
        self.conv2d = nn.Conv2d(c_s, c_t, kernel_size=3, stride=1, padding=1, bias=False)
        self.l2norm = nn.BatchNorm2d(c_t)

    def forward(self, x):
        return self.l2norm(self.conv2d(x))


class Module(nn.Module):
    def __init__(self, c_s, c_t):
        super().__init__()
        self.embed = Embed(c_s, c_t)
        # Off its initialisation, so a wrong affine term shows.
        with torch.no_grad():
            self.embed.l2norm.weight.uniform_(0.5, 1.5)
            self.embed.l2norm.bias.uniform_(-0.2, 0.2)


def gram(f):
    b, c = f.shape[:2]
    f = f.reshape(b, c, -1)
    return F.normalize(torch.bmm(f, f.permute(0, 2, 1)), dim=2)


def ickd(s, t, mod, tap):
    e = mod.embed(s[tap])
    b, c = e.shape[:2]
    diff = gram(e) - gram(t[tap])
    return (diff * diff).view(b, -1).sum() / (c * b * b)


def make():
    s = resnet_taps(8, 101)
    t = resnet_taps(8, 102, channels=(16, 32, 64, 128))
    target = t["logits"].argmax(1)
    for name, tap, params in [("ickd", "feat/3", {}), ("ickd_stage2", "feat/2", {"tap": "feat/2"})]:
        mod = Module(s[tap].shape[1], t[tap].shape[1])
        fixture(name, "ickd", params, {tap: s[tap]}, {tap: t[tap]}, target, module=mod,
                loss_fn=lambda s, t, y, i, c, m: ickd(s, t, m, tap))
