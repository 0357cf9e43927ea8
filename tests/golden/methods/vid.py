"""VID (Ahn et al. 2019), as KD-Zoo's kd_losses/vid.py with its train script's
taps (feat/1..3): per tap, a regressor conv1x1 → ReLU → conv1x1 → ReLU →
conv1x1 (no biases, hidden width sf·C_t) predicts the teacher map's mean from
the student's; the per-channel variance is log(1 + e^α) + 1e-6; the loss is the
mean Gaussian negative log-likelihood ½(log σ² + (μ - t)²/σ²), averaged over
the taps. State names follow an nn.ModuleList of per-tap modules."""
import math

import torch
import torch.nn as nn

from gen import fixture, resnet_taps

S_CH, T_CH = (16, 16, 32, 64), (32, 64, 128, 256)
EPS = 1e-6


class Stage(nn.Module):
    def __init__(self, c_s, c_t, sf, init_var):
        super().__init__()
        mid = int(sf * c_t)
        self.regressor = nn.Sequential(nn.Conv2d(c_s, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, c_t, 1, bias=False))
        for m in self.regressor:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Spread α around its initial value so a wrong broadcast shows up.
        a0 = math.log(math.exp(init_var - EPS) - 1.0)
        self.alpha = nn.Parameter(a0 + 0.3 * torch.randn(c_t))

    def forward(self, s, t):
        mu = self.regressor(s)
        var = torch.log(1.0 + torch.exp(self.alpha)).add(EPS)[None, :, None, None]
        return (0.5 * (var.log() + (mu - t) ** 2 / var)).mean()


def make():
    for name, sf, init_var in [("vid", 1.0, 5.0), ("vid_sf05", 0.5, 2.0)]:
        s, t = resnet_taps(8, 41, channels=S_CH), resnet_taps(8, 42, channels=T_CH)
        taps = ["feat/1", "feat/2", "feat/3"]
        mod = nn.ModuleList(Stage(S_CH[k], T_CH[k], sf, init_var) for k in (1, 2, 3))

        def loss(s, t, y, idx, cidx, mod):
            return sum(m(s[k], t[k]) for m, k in zip(mod, taps)) / len(taps)

        params = {} if name == "vid" else {"sf": sf, "init_var": init_var}
        fixture(name, "vid", params, {k: s[k] for k in taps}, {k: t[k] for k in taps}, t["logits"].argmax(1),
                module=mod, loss_fn=loss)
