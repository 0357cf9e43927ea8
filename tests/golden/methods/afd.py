"""AFD, as KD-Zoo's kd_losses/afd.py with its train script's taps (feat/1..3):
an SE block (conv1x1 with bias → ReLU → conv1x1 with bias, hidden width
int(att_f·C)) on the average-pooled teacher map gives per-channel weights,
sigmoid then divided by their sum; each channel's map is divided by its L2 norm
plus 1e-6 on both sides; loss = batch mean of Σ_c ρ_c · mean over positions of
the squared difference, averaged over the taps. Student and teacher maps have
the same shape (AFD has no connector)."""
import torch
import torch.nn as nn

from gen import fixture, resnet_taps

CH = (16, 16, 32, 64)
TAPS = ["feat/1", "feat/2", "feat/3"]


def block(c, att_f):
    m = nn.Module()
    mid = int(c * att_f)
    m.attention = nn.Sequential(nn.Conv2d(c, mid, 1), nn.ReLU(), nn.Conv2d(mid, c, 1))
    for conv in (m.attention[0], m.attention[2]):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        # Non-zero biases, so a dropped bias shows up.
        nn.init.normal_(conv.bias, 0, 0.1)
    return m


def afd(m, s, t, eps=1e-6):
    w = torch.sigmoid(m.attention(t.mean((2, 3), keepdim=True)).flatten(1))
    w = w / w.sum(1, keepdim=True)
    s = s / (s.pow(2).sum((2, 3), keepdim=True).sqrt() + eps)
    t = t / (t.pow(2).sum((2, 3), keepdim=True).sqrt() + eps)
    return (w * (s - t).pow(2).mean((2, 3))).sum(1).mean()


def make():
    for name, att_f in [("afd", 1.0), ("afd_att05", 0.5)]:
        s, t = resnet_taps(8, 61, channels=CH), resnet_taps(8, 62, channels=CH)
        mod = nn.ModuleList(block(CH[k], att_f) for k in (1, 2, 3))

        def loss(s, t, y, idx, cidx, mod):
            return sum(afd(m, s[k], t[k]) for m, k in zip(mod, TAPS)) / len(TAPS)

        params = {} if name == "afd" else {"att_f": att_f}
        fixture(name, "afd", params, {k: s[k] for k in TAPS}, {k: t[k] for k in TAPS}, t["logits"].argmax(1),
                module=mod, loss_fn=loss)
