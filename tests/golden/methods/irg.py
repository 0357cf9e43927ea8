"""IRG (Liu et al. 2019), as KD-Zoo's kd_losses/irg.py with its train script's
taps (feat/2, feat/3, embed, logits):
  vertex          MSE of the logits
  edge            mean over (embed, feat/2, feat/3) of the MSE between squared
                  pairwise-distance matrices (floor 1e-12, zero diagonal,
                  divided by their maximum)
  transformation  MSE of the per-sample squared distance feat/2 → feat/3
                  (feat/2 average-pooled to feat/3's size, feat/3's channel
                  pairs (0,1), (2,3), ... averaged), divided by its maximum
weighted 0.1 / 5 / 5 by default."""
import torch
import torch.nn.functional as F

from gen import fixture, resnet_taps

TAPS = ["feat/2", "feat/3", "embed", "logits"]


def edges(x):
    x = x.flatten(1)
    sq = (x * x).sum(1)
    d = (sq[None, :] + sq[:, None] - 2 * x @ x.T).clamp(min=1e-12)
    d = d * (1 - torch.eye(len(x)))
    return d / d.max()


def transformation(a, b):
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    if a.shape[1] < b.shape[1]:
        b = b.reshape(b.shape[0], b.shape[1] // 2, 2, *b.shape[2:]).mean(2)
    d = ((a.flatten(1) - b.flatten(1)) ** 2).sum(-1).clamp(min=1e-12)
    return d / d.max()


def mse(a, b):
    return ((a - b) ** 2).mean()


def make():
    for name, w in [("irg", (0.1, 5.0, 5.0)), ("irg_w", (1.0, 2.0, 3.0))]:
        s, t = resnet_taps(8, 31, channels=(16, 16, 32, 64)), resnet_taps(8, 32, channels=(32, 64, 128, 256))

        def loss(s, t, y, idx, cidx, mod, w=w):
            s2, s3, se, sl = (s[k] for k in TAPS)
            t2, t3, te, tl = (t[k] for k in TAPS)
            vert = mse(sl, tl)
            edge = (mse(edges(se), edges(te)) + mse(edges(s2), edges(t2)) + mse(edges(s3), edges(t3))) / 3.0
            tran = mse(transformation(s2, s3), transformation(t2, t3))
            return w[0] * vert + w[1] * edge + w[2] * tran

        params = {} if name == "irg" else dict(zip(["w_irg_vert", "w_irg_edge", "w_irg_tran"], w))
        fixture(name, "irg", params, {k: s[k] for k in TAPS}, {k: t[k] for k in TAPS}, t["logits"].argmax(1),
                loss_fn=loss)
