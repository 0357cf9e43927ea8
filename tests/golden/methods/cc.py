"""CC (Peng et al. 2019), as KD-Zoo's kd_losses/cc.py: embeddings scaled to unit
length, cosine matrix S, kernel Σ_{p≤P} e^{-2γ}(2γ)^p/p! · S^p (Taylor series of
a Gaussian RBF), MSE between the student's and teacher's kernel matrices."""
import math

import torch

from gen import fixture, resnet_taps


def kernel(e, gamma, order):
    u = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = u @ u.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim ** p
               for p in range(order + 1))


def make():
    for name, gamma, order in [("cc", 0.4, 2), ("cc_g02_p3", 0.2, 3)]:
        s, t = resnet_taps(8, 21, channels=(16, 16, 32, 64)), resnet_taps(8, 22, channels=(32, 64, 128, 256))

        # Pooled post-ReLU features are all positive and nearly parallel; spread
        # them over all directions so the kernel sees cosines in [-1, 1].
        s["embed"], t["embed"] = s["preact/3"].mean((2, 3)) * 8, t["preact/3"].mean((2, 3)) * 8

        def loss(s, t, y, idx, cidx, mod, gamma=gamma, order=order):
            return ((kernel(s["embed"], gamma, order) - kernel(t["embed"], gamma, order)) ** 2).mean()

        params = {} if name == "cc" else {"gamma": gamma, "P_order": order}
        fixture(name, "cc", params, {"embed": s["embed"]}, {"embed": t["embed"]}, t["logits"].argmax(1),
                loss_fn=loss)
