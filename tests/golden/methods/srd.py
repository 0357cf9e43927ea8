"""SRD (Miles & Mikolajczyk, AAAI 2024), as torchdistill's SRDLoss on its
SRDModelWrappers (torchdistill/losses/mid_level.py, models/wrapper.py): the
student's pooled feature through nn.Linear then BatchNorm1d(affine=False),
the teacher's through BatchNorm1d(affine=False), both in training mode;
loss = 2 * log(sum(|z_s - z_t| ** exponent)) + KLDivLoss(batchmean) of
log_softmax(s / T) against softmax(t / T). State names: linear, norm_s,
norm_t."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gen import fixture, resnet_taps


class Projector(nn.Module):
    def __init__(self, c_s, c_t, eps):
        super().__init__()
        self.linear = nn.Linear(c_s, c_t)
        self.norm_s = nn.BatchNorm1d(c_t, eps=eps, affine=False)
        self.norm_t = nn.BatchNorm1d(c_t, eps=eps, affine=False)


def pooled(x):
    return x.mean(-1).mean(-1) if x.dim() == 4 else x


def srd(s, t, mod, tap, exponent, temperature):
    z_s = mod.norm_s(mod.linear(pooled(s[tap])))
    z_t = mod.norm_t(pooled(t[tap]))
    feat = torch.log(torch.abs(z_s - z_t).pow(exponent).sum())
    kl = nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s["logits"] / temperature, dim=1), torch.softmax(t["logits"] / temperature, dim=1))
    return 2 * feat + kl, {"feat": 2 * feat, "kl": kl}


def make():
    s = resnet_taps(16, 91)
    t = resnet_taps(16, 92, channels=(16, 32, 64, 128))
    target = t["logits"].argmax(1)
    for name, tap, params, exponent, temperature in [
        ("srd", "embed", {}, 4.0, 1.0),
        ("srd_map", "feat/3", {"tap": "feat/3", "exponent": 2.0, "T": 2.0}, 2.0, 2.0),
    ]:
        mod = Projector(s[tap].shape[1], t[tap].shape[1], 1e-4)
        pick = lambda taps: {tap: taps[tap], "logits": taps["logits"]}
        fixture(name, "srd", params, pick(s), pick(t), target, module=mod,
                loss_fn=lambda s, t, y, i, c, m: srd(s, t, m, tap, exponent, temperature))
