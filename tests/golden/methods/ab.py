"""AB: KD-Zoo's kd_losses/ab.py on preact/1..3 (m 2, mean, averaged over
stages) and RepDistiller's distiller_zoo/AB.py with models/util.py's
Connector (ConvReg without ReLU where channels or height differ)."""
import torch
import torch.nn as nn

from gen import fixture, resnet_taps

TAPS = ["preact/1", "preact/2", "preact/3"]


def boundary(s, t, m):
    return ((s + m).pow(2) * ((s > -m) & (t <= 0)).float()
            + (s - m).pow(2) * ((s <= m) & (t > 0)).float())


class ConvRegNoRelu(nn.Module):
    def __init__(self, s_c, t_c):
        super().__init__()
        self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x):
        return self.bn(self.conv(x))


class Connector(nn.Module):
    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        self.connectors = nn.ModuleList([
            nn.Sequential() if s[:2] == t[:2] else ConvRegNoRelu(s[0], t[0])
            for s, t in zip(s_shapes, t_shapes)])

    def forward(self, g_s):
        return [c(x) for c, x in zip(self.connectors, g_s)]


def make():
    s, t = resnet_taps(8, 71), resnet_taps(8, 72)
    pick = lambda x: {k: x[k] for k in TAPS}

    def kd_zoo(s, t, *_):
        return sum(boundary(s[k], t[k], 2.0).mean() for k in TAPS) / len(TAPS)

    fixture("ab", "ab", {}, pick(s), pick(t), t["logits"].argmax(1), loss_fn=kd_zoo)

    t = resnet_taps(8, 73, channels=(16, 16, 64, 64))
    torch.manual_seed(74)
    conn = Connector([tuple(s[k].shape[1:]) for k in TAPS], [tuple(t[k].shape[1:]) for k in TAPS])

    def repdistiller(s, t, y, i, c, mod):
        g_s = mod([s[k] for k in TAPS])
        n, bsz = len(TAPS), s[TAPS[0]].shape[0]
        return sum(2 ** (i - n + 1) * boundary(g, t[k], 1.0).abs().sum() / bsz / 1000 * 3
                   for i, (g, k) in enumerate(zip(g_s, TAPS)))

    params = {"m": 1.0, "connector": "conv_reg", "variant": "repdistiller"}
    fixture("ab_repdistiller", "ab", params, pick(s), pick(t), t["logits"].argmax(1), module=conn, loss_fn=repdistiller)
