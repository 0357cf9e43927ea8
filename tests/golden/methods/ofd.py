"""OFD (Heo et al. 2019), as KD-Zoo's kd_losses/ofd.py with its train script's
taps (preact/1..3): the teacher's pre-activation is raised to a per-channel
margin, the mean of its negative entries over batch and positions (floor 1e-6
on the count); the student passes conv1x1 (no bias) + BatchNorm (training mode:
batch statistics, running statistics updated); squared error, skipped where
student ≤ teacher ≤ 0, averaged over all entries and then over the taps."""
import torch
import torch.nn as nn

from gen import fixture, resnet_taps

S_CH, T_CH = (16, 16, 32, 64), (32, 64, 128, 256)
TAPS = ["preact/1", "preact/2", "preact/3"]


def connector(c_s, c_t):
    m = nn.Module()
    m.connector = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
    nn.init.kaiming_normal_(m.connector[0].weight, mode="fan_out", nonlinearity="relu")
    # Non-trivial affine and running statistics, so every one of them is exercised.
    bn = m.connector[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def ofd(conn, s, t):
    neg = (t < 0).float()
    margin = (t * neg).sum((0, 2, 3), keepdim=True) / (neg.sum((0, 2, 3), keepdim=True) + 1e-6)
    t = torch.maximum(t, margin)
    s = conn.connector(s)
    keep = ~((s <= t) & (t <= 0))
    return ((s - t) ** 2 * keep.float()).mean()


def make():
    s, t = resnet_taps(8, 51, channels=S_CH), resnet_taps(8, 52, channels=T_CH)
    mod = nn.ModuleList(connector(S_CH[k], T_CH[k]) for k in (1, 2, 3))

    def loss(s, t, y, idx, cidx, mod):
        return sum(ofd(m, s[k], t[k]) for m, k in zip(mod, TAPS)) / len(TAPS)

    fixture("ofd", "ofd", {}, {k: s[k] for k in TAPS}, {k: t[k] for k in TAPS}, t["logits"].argmax(1),
            module=mod, loss_fn=loss)
