"""NST, as KD-Zoo's kd_losses/nst.py: squared MMD with the polynomial kernel
(d = 2, c = 0) between L2-normalised channels of feat/3."""
import torch.nn.functional as F

from gen import fixture, resnet_taps


def poly_kernel_mean(a, b):
    # k(a_i, b_j) = (a_i . b_j)^2 over all channel pairs and samples.
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2).mean()


def nst(s, t, *_):
    fs = F.normalize(s["feat/3"].flatten(2), dim=2)
    ft = F.normalize(t["feat/3"].flatten(2), dim=2)
    return poly_kernel_mean(ft, ft) + poly_kernel_mean(fs, fs) - 2 * poly_kernel_mean(fs, ft)


def make():
    s = resnet_taps(8, 31)
    t = resnet_taps(8, 32, channels=(16, 32, 64, 128))
    # Teacher channels with a shared spatial pattern, so the MMD is well above
    # float rounding rather than a difference of near-equal terms.
    t["feat/3"] = t["feat/3"] + 2 * t["feat/3"][:, :1].abs()
    fixture("nst", "nst", {}, {"feat/3": s["feat/3"]}, {"feat/3": t["feat/3"]}, t["logits"].argmax(1), loss_fn=nst)
